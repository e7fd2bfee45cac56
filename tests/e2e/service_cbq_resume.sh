#!/usr/bin/env bash
# labels: integration slow
# Issue #5 part 4: a CBQ job is a chain of window tasks (embed → capture-0000..0003 → cbq-window-0000
# → cbq-window-0001 → cbq-window-0002 → assemble → validate), each resuming from
# the state the previous window saved. Job A runs uninterrupted. Job B (same
# recipe) loses its worker to `kill -9` in the middle of window 1; a second
# worker reclaims window 1 once the lease runs out and starts it again from
# window 0's state: window 0 (and the captures) are not re-run, window 1 is, the
# output is byte-identical to A's and the job status carries per-window losses.
# Job C (20x the epochs) is cancelled inside window 0, which stops within a few
# steps instead of finishing the window.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
"$QCAL" synth --out "$T/m" --layers 4 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128 \
  --vocab 256 --seed 7 --outlier-norm 2 >/dev/null
"$QCAL" synth-data --model "$T/m" --tokens 4096 --seed 1 --out "$T/calib.jsonl" >/dev/null
"$QCAL" synth-data --model "$T/m" --tokens 1024 --seed 2 --out "$T/eval.jsonl" >/dev/null

# W2A16 g32, LoRA-Rounding, CBQ windows of 2 blocks overlapping by 1: (0,1) (1,2) (2,3).
EPOCHS=${QCAL_CBQ_TEST_EPOCHS:-100}  # 3-10 s per window (QCAL_THREADS=1, load)
spec() {  # spec OUT
  cat <<EOF
{"model": "$T/m",
 "recipe": {"weight_solver": "lora-rounding", "w_bits": 2, "w_group": 32,
            "reconstruction": "cbq", "cbq_window": 2, "cbq_overlap": 1,
            "cbq_epochs": $EPOCHS, "lora_rank": 8},
 "calib": {"path": "$T/calib.jsonl", "nsamples": 16, "seqlen": 32},
 "eval": {"path": "$T/eval.jsonl", "nsamples": 8, "seqlen": 32},
 "output": {"path": "$1"},
 "gate": {"max_kl": 10}}
EOF
}
submit() {  # submit OUT → job id
  api POST /v1/jobs -d "$(spec "$1")"
  [ "$HTTP_CODE" = 202 ] || fail "POST /v1/jobs: HTTP $HTTP_CODE $HTTP_BODY"
  echo "$HTTP_BODY" | pyj 'd["id"]'
}
task_field() {  # task_field JOB_JSON TASK FIELD
  echo "$1" | pyj "[t for t in d['progress']['tasks'] if t['id'] == '$2'][0]['$3']"
}

# Nonsense calibration recipes: 400 naming the field, nothing created.
for bad in '{"a_bits": 5}:recipe.a_bits' '{"reconstruction": "cbq", "window": 2}:recipe.window' \
  '{"reconstruction": "cbq", "w_group": 48}:recipe.w_group' '{"weight_solver": "lora-rounding", "w_bits": 2, "reconstruction": "cbq", "cbq_overlap": 2}:recipe'; do
  recipe=${bad%:*} field=${bad##*:}
  api POST /v1/jobs -d "$(spec "$T/out_bad" | pyj "dict(d, recipe=$recipe)")"
  [ "$HTTP_CODE" = 400 ] || fail "recipe $recipe: HTTP $HTTP_CODE $HTTP_BODY (expected 400)"
  msg=$(echo "$HTTP_BODY" | pyj 'd["error"]["message"]')
  [[ $msg == "$field"* ]] || fail "recipe $recipe: message '$msg' does not name $field"
  note "recipe $recipe → 400: $msg"
done

# ---- A: uninterrupted.
start_worker w0 --lease-ms 3000
t0=$SECONDS
a=$(submit "$T/out_a")
note "submitted A $a"
wait_job "$a" succeeded 300
ja=$(job_json "$a")
note "A succeeded in $((SECONDS - t0)) s: $(echo "$ja" | pyj '[(t["id"], round(t["seconds"], 1)) for t in d["progress"]["tasks"]]')"
echo "$ja" | pyj '[t["id"] for t in d["progress"]["tasks"]]' |
  grep -q '"embed", "capture-0000", "capture-0001", "capture-0002", "capture-0003", "cbq-window-0000", "cbq-window-0001", "cbq-window-0002", "assemble", "validate"' ||
  fail "unexpected DAG: $(echo "$ja" | pyj '[t["id"] for t in d["progress"]["tasks"]]')"
kill_worker w0
# Into window 1 by about a third of its length in A (the poll itself takes a moment).
KILL_AFTER=${QCAL_CBQ_TEST_KILL_AFTER:-$(echo "$ja" |
  pyj "round(0.3 * [t['seconds'] for t in d['progress']['tasks'] if t['id'] == 'cbq-window-0001'][0], 2)")}

# ---- B: kill -9 the worker in the middle of window 1.
start_worker w1 --lease-ms 3000
b=$(submit "$T/out_b")
note "submitted B $b"
_window1_on_w1() {
  [ "$(job_json "$b" | pyj "[t['state'] + ' ' + t['worker'] for t in d['progress']['tasks'] if t['id'] == 'cbq-window-0001'][0]")" = "running w1" ]
}
wait_until 300 "cbq-window-0001 running on w1" _window1_on_w1
sleep "$KILL_AFTER"
kill -KILL "${WPID[w1]}"
wait "${WPID[w1]}" 2>/dev/null || true
unset "WPID[w1]"
# A dead worker reports nothing: still running under w1 means the kill landed inside.
jb=$(job_json "$b")
[ "$(task_field "$jb" cbq-window-0001 state)" = running ] ||
  fail "window 1 finished before the kill; raise QCAL_CBQ_TEST_EPOCHS ($EPOCHS)"
w0_finished=$(task_field "$jb" cbq-window-0000 seconds)
note "killed w1 (-9) $(task_field "$jb" cbq-window-0001 seconds) s into cbq-window-0001"

t1=$SECONDS
start_worker w2 --lease-ms 3000
wait_job "$b" succeeded 300
note "B finished $((SECONDS - t1)) s after the restart"
jb=$(job_json "$b")

# Window 0, embed and the captures ran once, on w1; window 1 ran again on w2.
echo "$jb" | python3 -c "
import json, sys
d = json.load(sys.stdin)
t = {t['id']: t for t in d['progress']['tasks']}
assert all(x['state'] == 'done' for x in t.values()), t
for i in ('embed', 'capture-0000', 'cbq-window-0000'):
    assert t[i]['attempts'] == 1 and t[i]['worker'] == 'w1', t[i]
assert abs(t['cbq-window-0000']['seconds'] - $w0_finished) < 1e-6, t['cbq-window-0000']
w1 = t['cbq-window-0001']
assert w1['attempts'] >= 2 and w1['worker'] == 'w2', w1
for i in ('cbq-window-0002', 'assemble', 'validate'):
    assert t[i]['attempts'] == 1 and t[i]['worker'] == 'w2', t[i]
print('embed, captures, cbq-window-0000: 1 attempt on w1; cbq-window-0001:', w1['attempts'],
      'attempts, finished on w2')
" || fail "task records after the kill: $jb"

api GET "/v1/jobs/$b/logs"
[ "$HTTP_CODE" = 200 ] || fail "GET logs: HTTP $HTTP_CODE"
echo "$HTTP_BODY" | python3 -c "
import json, sys
lines = json.load(sys.stdin)['lines']
def count(s): return sum(s in l for l in lines)
assert count('claimed cbq-window-0000') == 1, [l for l in lines if 'claimed' in l]
assert count('claimed embed') == 1, [l for l in lines if 'claimed' in l]
assert count('claimed cbq-window-0001') >= 2, [l for l in lines if 'claimed' in l]
assert count('[w2] cbq-window-0001: resuming from the state of cbq-window-0000') == 1, lines
" || fail "job log of B: $HTTP_BODY"

# Per-window losses in the status, identical in both runs.
for j in "$ja" "$jb"; do
  echo "$j" | python3 -c "
import json, math, sys
d = json.load(sys.stdin)
w = d['windows']
assert [x['window'] for x in w] == [0, 1, 2], w
assert [(x['first'], x['last']) for x in w] == [(0, 1), (1, 2), (2, 3)], w
for x in w:
    for k in ('loss_first', 'loss_last', 'loss_hard_init', 'loss_hard'):
        assert isinstance(x[k], (int, float)) and math.isfinite(x[k]) and x[k] >= 0, (k, x)
    assert x['steps'] > 0, x
" || fail "windows in the job status: $(echo "$j" | pyj 'd.get("windows")')"
done
[ "$(echo "$ja" | pyj '[(w["loss_hard_init"], w["loss_hard"]) for w in d["windows"]]')" = \
  "$(echo "$jb" | pyj '[(w["loss_hard_init"], w["loss_hard"]) for w in d["windows"]]')" ] ||
  fail "window losses differ between A and B"
note "windows: $(echo "$jb" | pyj '[(w["window"], round(w["loss_hard_init"], 5), round(w["loss_hard"], 5), round(w["seconds"], 1)) for w in d["windows"]]')"
note "report: $(echo "$jb" | pyj '{k: d["report"].get(k) for k in ("ppl", "fp_ppl", "kl")}')"

compare_dirs "$T/out_a" "$T/out_b"
(cd "$T/out_b" && sha256sum $(find . -type f | sort))

# ---- C: `qcal cancel` in the middle of a long window stops it within a few
# steps (the window polls the cancel flag before every step), not at its end.
# C's windows are 20x longer than A's, so the window would otherwise run on for
# 20x A's window time.
w0_secs=$(echo "$ja" | pyj "[t['seconds'] for t in d['progress']['tasks'] if t['id'] == 'cbq-window-0000'][0]")
c=$(api POST /v1/jobs -d "$(spec "$T/out_c" | pyj "dict(d, recipe=dict(d['recipe'], cbq_epochs=$((EPOCHS * 20))))")"
  [ "$HTTP_CODE" = 202 ] || fail "POST C: HTTP $HTTP_CODE $HTTP_BODY"; echo "$HTTP_BODY" | pyj 'd["id"]')
note "submitted C $c (cbq_epochs $((EPOCHS * 20)))"
_window0_running() { [ "$(job_json "$c" | pyj "[t['state'] for t in d['progress']['tasks'] if t['id'] == 'cbq-window-0000'][0]")" = running ]; }
wait_until 300 "C's cbq-window-0000 running" _window0_running
sleep 1
tc=$SECONDS
out=$(q cancel "$c")
echo "$out" | grep -q "job $c cancelled" || fail "qcal cancel: $out"
_c_let_go() { grep "$c/cbq-window-0000" "$T/worker-w2.log" | grep -q "stopped"; }
wait_until 60 "w2 to stop C's window 0" _c_let_go
stop_secs=$((SECONDS - tc))
note "C's window 0 stopped $stop_secs s after the cancel (A's whole window 0: $w0_secs s; C's: ~20x that)"
python3 -c "import sys; sys.exit(0 if $stop_secs < max(10, 5 * $w0_secs) else 1)" ||
  fail "the cancelled window ran on for $stop_secs s (A's window 0 took $w0_secs s)"
[ "$(job_state "$c")" = cancelled ] || fail "job $c is $(job_state "$c") after cancel"
passed "CBQ job resumed at window 1 after kill -9, output byte-identical; cancel stops a window mid-way"

#!/usr/bin/env bash
# labels: integration
# Issue #10 "done means", kill -9 inside a parallel FlatQuant block: FlatQuant
# W4A4KV4 + GPTQ in parallel mode (every flatquant-LLLL and quantize-LLLL task on
# FP inputs, so the blocks run side by side) on two workers. Worker w1 is killed
# with SIGKILL while it runs a flatquant-LLLL task; w2 reclaims that task once
# w1's lease runs out. The job succeeds; the killed block's task shows attempts 2
# (re-run once, by w2) and every other task attempts 1 — nothing w1 had finished,
# and nothing w2 was running, is run again — and the checkpoint is byte-identical
# to `qcal quantize --mode parallel` with the same flags in one process.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
make_model "$T/m" medium  # 4 layers, hidden 256
# FlatQuant epochs: long enough that the kill lands inside a transform task
# (a few seconds each at QCAL_THREADS=1 on a loaded machine).
EPOCHS=${QCAL_FQ_TEST_EPOCHS:-2}
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 32 --seqlen 128 --transform flatquant
  --weight-solver gptq --w-bits 4 --a-bits 4 --kv-bits 4 --epochs "$EPOCHS" --mode parallel)
start_worker w1 --lease-ms 3000
start_worker w2 --lease-ms 3000
t0=$SECONDS
id=$(q submit "${R[@]}" --out "$T/out")
note "submitted $id"

# A flatquant task running on w1 (either worker may hold the other ones).
victim=""
_transform_on_w1() {
  victim=$(job_json "$id" | pyj "next((t['id'] for t in d['progress']['tasks'] if t['type'] == 'transform' and t['state'] == 'running' and t['worker'] == 'w1'), '')")
  [ -n "$victim" ]
}
wait_until 300 "a flatquant task running on w1" _transform_on_w1
sleep 0.5
kill -KILL "${WPID[w1]}"
wait "${WPID[w1]}" 2>/dev/null || true
unset "WPID[w1]"
# A dead worker reports nothing: still running under w1 means the kill landed inside.
j=$(job_json "$id")
[ "$(echo "$j" | pyj "[t['state'] + ' ' + t['worker'] for t in d['progress']['tasks'] if t['id'] == '$victim'][0]")" = "running w1" ] ||
  fail "$victim finished before the kill; raise QCAL_FQ_TEST_EPOCHS ($EPOCHS)"
note "killed w1 (-9) $(echo "$j" | pyj "round([t['seconds'] for t in d['progress']['tasks'] if t['id'] == '$victim'][0], 1)") s into $victim; others: $(echo "$j" | pyj "' '.join(t['id'] + ':' + t['state'] + '@' + t['worker'] for t in d['progress']['tasks'] if t['state'] != 'waiting')")"

# The in-process reference while w2 finishes the job (stopped by the EXIT trap
# through WPID if the test fails first).
"$QCAL" quantize "${R[@]}" --out "$T/ref" --quiet >"$T/ref.log" 2>&1 &
WPID[ref]=$!

wait_job "$id" succeeded 600
note "job succeeded in $((SECONDS - t0)) s"
j=$(job_json "$id")
echo "$j" | python3 -c "
import json, sys
d = json.load(sys.stdin)
tasks = d['progress']['tasks']
ids = [t['id'] for t in tasks]
L = 4
want = (['embed'] + ['capture-%04d' % l for l in range(L)] + ['flatquant-%04d' % l for l in range(L)]
        + ['quantize-%04d' % l for l in range(L)] + ['assemble', 'validate'])
assert ids == want, ids
# Parallel mode: the quantize tasks read FP inputs, not the previous block's output.
for t in tasks:
    if t['type'] == 'quantize':
        assert t['params']['input'] == 'fp' and not any(x.startswith('quantize') for x in t['deps']), t
for t in tasks:
    assert t['state'] == 'done', t
    if t['id'] == '$victim':
        assert t['attempts'] == 2 and t['worker'] == 'w2', t
    else:
        assert t['attempts'] == 1, t
print('$victim: attempts 2, finished by w2; the other', len(tasks) - 1, 'tasks: attempts 1')
" || fail "task records after the kill: $j"

# The job log: the victim claimed twice (w1, then w2), every other task once.
api GET "/v1/jobs/$id/logs"
[ "$HTTP_CODE" = 200 ] || fail "GET logs: HTTP $HTTP_CODE"
echo "$HTTP_BODY" | python3 -c "
import json, re, sys
lines = json.load(sys.stdin)['lines']
claims = {}
for l in lines:
    m = re.search(r'\[(w\d)\].*claimed (\S+)', l)
    if m:
        claims.setdefault(m.group(2), []).append(m.group(1))
assert claims.get('$victim') == ['w1', 'w2'], claims.get('$victim')
assert all(len(v) == 1 for k, v in claims.items() if k != '$victim'), claims
" || fail "job log: $HTTP_BODY"

wait "${WPID[ref]}" || fail "qcal quantize failed (ref.log)"
unset "WPID[ref]"
compare_dirs "$T/ref" "$T/out"
passed "parallel FlatQuant job survived kill -9 of its worker during $victim; only that block re-ran"

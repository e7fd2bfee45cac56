#!/usr/bin/env bash
# labels: integration
# Issue #10 "done means", byte identity: the transform recipes submitted through
# the service (REST → Redis → two qcal-worker processes, each task on whichever
# worker claims it) write checkpoints byte-identical to `qcal quantize` in one
# process with the same flags and QCAL_THREADS — every file compared with cmp,
# the output manifest (.qcal-output.json) aside:
#   A  FlatQuant W4A4KV4 + GPTQ                       (flatquant-LLLL, quantize-LLLL)
#   B  FlatQuant + CBQ(window 2, overlap 1) + IntactKV W4A4KV4   (cbq-window-WWWW)
#   C  QuaRot W4A4KV4 + GPTQ
# on the trained fixtures (tests/fixtures: 4 layers, hidden 128), with one
# FlatQuant epoch and 8 calibration sequences of 128 tokens so the whole test stays near a
# minute on two loaded cores. The DAG each job ran is checked too, so a planner
# change that drops the transform or window tasks cannot pass silently.
source "$(dirname "$0")/lib/service.bash" "$@"

FIX=$(realpath "$(dirname "$0")/../fixtures")
# Inside the roots the workers may read ($T).
cp -r "$FIX/grammar-tiny-outlier" "$FIX/grammar-sink" "$FIX/grammar-data" "$T/"

start_redis
start_coordinator
start_worker w1
start_worker w2

# Calibration, and evaluation on held-out tokens (the validate task's report).
D=(--calib "$T/grammar-data/calib.u32" --nsamples 8 --seqlen 128
  --eval-data "$T/grammar-data/eval.u32" --eval-nsamples 4 --eval-seqlen 128)
W4A4KV4=(--w-bits 4 --a-bits 4 --kv-bits 4)
FA=(--model "$T/grammar-tiny-outlier" "${D[@]}" --transform flatquant --weight-solver gptq
  "${W4A4KV4[@]}" --epochs 1)
FB=(--model "$T/grammar-sink" "${D[@]}" --transform flatquant --reconstruction cbq --cbq-window 2
  --cbq-overlap 1 --cbq-epochs 2 --intactkv "${W4A4KV4[@]}" --epochs 1)
FC=(--model "$T/grammar-tiny-outlier" "${D[@]}" --transform quarot --weight-solver gptq
  "${W4A4KV4[@]}")

t0=$SECONDS
ida=$(q submit "${FA[@]}" --out "$T/out_a")
idb=$(q submit "${FB[@]}" --out "$T/out_b")
idc=$(q submit "${FC[@]}" --out "$T/out_c")
note "submitted A $ida, B $idb, C $idc"

# The in-process references while the workers run (same QCAL_THREADS: service.bash).
for c in a b c; do
  declare -n flags="F${c^^}"
  "$QCAL" quantize "${flags[@]}" --out "$T/ref_$c" --quiet >/dev/null ||
    fail "qcal quantize (${c^^}) failed"
done
note "references written in $((SECONDS - t0)) s"

for id in "$ida" "$idb" "$idc"; do wait_job "$id" succeeded 300; done
note "jobs succeeded in $((SECONDS - t0)) s"

# The DAGs, in order, and who ran what (both workers took part).
check_dag() {  # check_dag ID EXPECTED_IDS_JSON
  job_json "$1" | python3 -c "
import json, sys
d = json.load(sys.stdin)
tasks = d['progress']['tasks']
ids = [t['id'] for t in tasks]
assert ids == $2, ids
assert all(t['state'] == 'done' and t['attempts'] == 1 for t in tasks), tasks
print(len(ids), 'tasks:', ' '.join(f\"{t['id']}@{t['worker']}\" for t in tasks))
" || fail "job $1: unexpected DAG or task records"
}
caps='"capture-0000", "capture-0001", "capture-0002", "capture-0003"'
fqs='"flatquant-0000", "flatquant-0001", "flatquant-0002", "flatquant-0003"'
qs='"quantize-0000", "quantize-0001", "quantize-0002", "quantize-0003"'
dag=$(check_dag "$ida" "[\"embed\", $caps, $fqs, $qs, \"assemble\", \"validate\"]")
note "A: $dag"
dag=$(check_dag "$idb" "[\"embed\", $caps, $fqs, \"cbq-window-0000\", \"cbq-window-0001\", \"cbq-window-0002\", \"assemble\", \"validate\"]")
note "B: $dag"
dag=$(check_dag "$idc" "[\"embed\", $qs, \"assemble\", \"validate\"]")
note "C: $dag"
workers=$(for id in "$ida" "$idb" "$idc"; do job_json "$id" | pyj '" ".join(t["worker"] for t in d["progress"]["tasks"])'; done |
  tr ' ' '\n' | sort -u | tr '\n' ' ')
[ "$workers" = "w1 w2 " ] || fail "expected both workers to run tasks, got: $workers"

# The validate task's report on the eval tokens: a working W4A4KV4 model.
for id in "$ida" "$idb" "$idc"; do
  r=$(job_json "$id" | pyj 'd["report"]')
  rep=$(echo "$r" | python3 -c "
import json, math, sys
r = json.load(sys.stdin)
assert math.isfinite(r['kl']) and 0 <= r['kl'] < 1 and math.isfinite(r['ppl']) and r['ppl'] < 2 * r['fp_ppl'], r
print('kl %.4f ppl %.3f (fp %.3f)' % (r['kl'], r['ppl'], r['fp_ppl']))
") || fail "job $id: report $r"
  note "$id: $rep"
done

compare_dirs "$T/ref_a" "$T/out_a"
compare_dirs "$T/ref_b" "$T/out_b"
compare_dirs "$T/ref_c" "$T/out_c"
# The outputs are what the recipes say: native W4A4KV4 checkpoints (qcal_quant.json,
# docs/NATIVE_FORMAT.md), B with its IntactKV prefix.
for c in a b c; do
  python3 - "$T/out_$c/qcal_quant.json" "$c" <<'PY' || fail "out_$c: qcal_quant.json is not the recipe's"
import json, sys
q = json.load(open(sys.argv[1]))
r = q["recipe"]
assert q["format"] == "qcal-native" and (r["w_bits"], r["a_bits"], r["kv_bits"]) == (4, 4, 4), q
want = {"a": ("flatquant", "gptq", "none"), "b": ("flatquant", "rtn", "cbq"),
        "c": ("quarot", "gptq", "none")}[sys.argv[2]]
assert (r["transform"], r["weight_solver"], r["reconstruction"]) == want, r
assert (q.get("intactkv") is not None) == (sys.argv[2] == "b"), q.get("intactkv")
PY
done
passed "FlatQuant+GPTQ, FlatQuant+CBQ+IntactKV, QuaRot+GPTQ (W4A4KV4) byte-identical to qcal quantize in $((SECONDS - t0)) s"

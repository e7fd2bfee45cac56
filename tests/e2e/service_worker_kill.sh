#!/usr/bin/env bash
# labels: integration slow
# Service scenario (b): `kill -9` of the worker in the middle of a quantize
# task. A second worker (short --lease-ms) reclaims the task once its lease
# runs out; the job succeeds, the killed task shows a second attempt, and the
# checkpoint is byte-identical to `qcal quantize` in process.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
make_model "$T/m" medium
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 64 --seqlen 128 --method gptq --w-bits 4
  --group-size 16)
start_worker w1 --lease-ms 3000
id=$(q submit "${R[@]}" --out "$T/out" --eval-data "$T/m.eval.jsonl" --eval-nsamples 8 \
  --max-ppl-increase 1)
note "submitted $id"

# Kill w1 while it runs a quantize task past the first one (so earlier
# artifacts exist and must be reused, not recomputed).
victim=""
_calibrating() {
  local rt
  rt=$(running_block "$id") || return 1
  set -- $rt
  [ "${1:-}" != "" ] && [ "$1" != quantize-0000 ] && victim=$1 && [ "${2:-}" = w1 ]
}
wait_until 300 "a quantize task (after the first) running on w1" _calibrating
kill -KILL "${WPID[w1]}"
wait "${WPID[w1]}" 2>/dev/null || true
unset "WPID[w1]"
# The task w1 held at its death stays "running" (under w1) until reclaimed.
victim=$(running_block "$id")
set -- $victim
[ "${2:-}" = w1 ] || fail "no block task was running on w1 when it died ($victim)"
victim=$1
note "killed w1 (-9) during $victim"

start_worker w2 --lease-ms 3000
wait_job "$id" succeeded 600
j=$(job_json "$id")
echo "$j" | python3 -c "
import json, sys
d = json.load(sys.stdin)
t = [t for t in d['progress']['tasks'] if t['id'] == '$victim'][0]
assert t['state'] == 'done' and t['attempts'] >= 2 and t['worker'] == 'w2', t
assert all(t['state'] == 'done' for t in d['progress']['tasks']), d['progress']['tasks']
print('$victim: attempts', t['attempts'], 'finished by', t['worker'])
" || fail "task record after the kill: $j"

"$QCAL" quantize "${R[@]}" --out "$T/ref" --quiet >/dev/null
compare_dirs "$T/ref" "$T/out"
passed "job survived kill -9 of its worker during $victim"

#!/usr/bin/env bash
# labels: integration slow
# Service scenario (e): two workers run two jobs at once (both jobs show a
# running task, on different workers, at the same moment); `qcal cancel`
# stops one (state cancelled, no task of it left running, its worker goes on
# to other work — a third job — or idles); the other job and the third
# succeed, byte-identical to `qcal quantize`.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
make_model "$T/m" medium
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 64 --seqlen 128 --method gptq --w-bits 4
  --group-size 16)
start_worker w1
start_worker w2
a=$(q submit "${R[@]}" --out "$T/out-a" --labels job=a)
b=$(q submit "${R[@]}" --out "$T/out-b" --labels job=b)
note "submitted $a and $b"

# Sequential jobs: each has one task in flight at a time, so two jobs running
# at once means one on each worker.
_running_task() {  # prints "task worker" of the job's running task
  job_json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
r = [t for t in d["progress"]["tasks"] if t["state"] == "running"]
print(r[0]["id"], r[0]["worker"]) if r else print("")'
}
_both_running() {
  local ra rb
  ra=$(_running_task "$a") || return 1
  rb=$(_running_task "$b") || return 1
  [ -n "$ra" ] && [ -n "$rb" ] || return 1
  set -- $ra $rb
  [ "$2" != "$4" ] || return 1
  note "at once: $a runs $1 on $2, $b runs $3 on $4"
  b_task=$3 b_worker=$4
}
wait_until 300 "both jobs running at the same time" _both_running

out=$(q cancel "$b")
echo "$out" | grep -q "job $b cancelled" || fail "qcal cancel: $out"
[ "$(job_state "$b")" = cancelled ] || fail "job $b is $(job_state "$b") after cancel"
# Cancelling it again is a conflict: exit 2, HTTP 409.
set +e
out=$(q cancel "$b" 2>&1); rc=$?
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "(HTTP 409)" || fail "second cancel: rc $rc: $out"

# Within a few lease periods no task of the cancelled job is running any more.
_b_stopped() {
  [ "$(job_json "$b" | pyj 'sum(t["state"] == "running" for t in d["progress"]["tasks"])')" = 0 ]
}
wait_until 60 "the cancelled job's tasks to stop" _b_stopped
# The worker lets go of the task it held: dropped at its next heartbeat, or
# (when the cancel raced with the task's end) finished just before.
_let_go() { grep "$b" "$T/worker-$b_worker.log" | grep "$b_task" | grep -q -E "done in|stopped|refused"; }
wait_until 60 "worker $b_worker to let go of $b_task" _let_go
note "$b_worker: $(grep "$b" "$T/worker-$b_worker.log" | grep "$b_task" | tail -1)"
sleep 2
claims_b=$(cat "$T"/worker-*.log | grep -c "$b: claimed")
note "job $b: $(job_json "$b" | pyj '" ".join(t["id"] + ":" + t["state"] for t in d["progress"]["tasks"])')"
set +e
q wait "$b" --quiet --timeout 10 >/dev/null 2>&1; rc=$?
set -e
[ $rc -eq 1 ] || fail "qcal wait on a cancelled job exited $rc, expected 1"

# The cancelled job's worker takes new work.
c=$(q submit --model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 16 --seqlen 128 --method rtn \
  --w-bits 8 --group-size -1 --out "$T/out-c" --labels job=c)
wait_job "$c" succeeded 300
wait_job "$a" succeeded 600
workers_c=$(job_json "$c" | pyj '" ".join(sorted(set(t["worker"] for t in d["progress"]["tasks"])))')
note "job $c ran on: $workers_c (the cancelled job's worker was $b_worker)"
[ "$(job_state "$b")" = cancelled ] || fail "job $b left the cancelled state"
[ "$(cat "$T"/worker-*.log | grep -c "$b: claimed")" = "$claims_b" ] ||
  fail "a task of the cancelled job $b was claimed after the cancel"
[ ! -e "$T/out-b" ] || note "(the cancelled job's output directory exists: $(ls "$T/out-b"))"
worker_alive w1 && worker_alive w2 || fail "a worker exited"

"$QCAL" quantize "${R[@]}" --out "$T/ref" --quiet >/dev/null
compare_dirs "$T/ref" "$T/out-a"
"$QCAL" quantize --model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 16 --seqlen 128 --method rtn \
  --w-bits 8 --group-size -1 --out "$T/ref-c" --quiet >/dev/null
compare_dirs "$T/ref-c" "$T/out-c"
passed "two jobs ran concurrently; cancel stopped one; the others succeeded"

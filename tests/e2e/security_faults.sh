#!/usr/bin/env bash
# labels: integration security
# Security suite, part 2 (issue #11): faults a hostile or unlucky user can
# cause, against a real redis-server, qcal-coordinator and two qcal-workers on
# loopback; each must be survived with nothing lost:
#   1. an input replaced by a FIFO after submission: the task fails at once
#      naming the file, and the worker goes on to the next job;
#   2. a paused (SIGSTOP) worker of a cancelled job, stopped in the middle of
#      publishing, resumes (SIGCONT) after a later job published the same
#      output: it never replaces the later job's output (the publishing
#      fence and the manifest generation);
#   3. what a kill during publish leaves (`.partial.` / `.qcal-stage.` of a
#      dead process) is swept by the next publish into that directory;
# and storage is reclaimed: with retention 0 the artifacts of finished jobs
# leave the store and /metrics reports the store's usage.
# Prints "requests tried N, refused correctly N; faults injected N, survived
# with nothing lost N".
source "$(dirname "$0")/lib/service.bash" "$@"
source "$(dirname "$0")/lib/security.bash"

R=$T/read W=$T/write
mkdir -p "$R" "$W/p"
ALLOW=(--allow-read "$R" --allow-write "$W")
start_redis
start_coordinator --retain-succeeded-h 0 --retain-failed-h 0 --sweep-interval-s 1
make_model "$R/m" small

spec() {  # spec OUT [PYTHON-DICT-UPDATE]
  python3 -c "
import json, sys
d = {'model': sys.argv[1], 'calib': {'path': sys.argv[2], 'nsamples': 8, 'seqlen': 64},
     'eval': {'path': sys.argv[3], 'nsamples': 4, 'seqlen': 64},
     'recipe': {'method': 'gptq', 'w_bits': 4, 'group_size': 64},
     'output': {'path': sys.argv[4], 'overwrite': True}}
upd = eval(sys.argv[5]) if len(sys.argv) > 5 else {}
for k, v in upd.items():
    if isinstance(v, dict) and isinstance(d.get(k), dict): d[k].update(v)
    else: d[k] = v
print(json.dumps(d))" "$R/m" "$R/m.calib.jsonl" "$R/m.eval.jsonl" "$@"
}
submit() {  # submit JSON → job id
  api POST /v1/jobs --data-binary "$1"
  [ "$HTTP_CODE" = 202 ] || fail "POST /v1/jobs: HTTP $HTTP_CODE $HTTP_BODY"
  echo "$HTTP_BODY" | pyj 'd["id"]'
}
publishing() { [ -n "$(redis-cli -p "$REDIS_PORT" HGET "qcal:task:$1:assemble" publishing)" ]; }

# ---- 1. a FIFO swapped in for the calibration data after submission
cp "$R/m.calib.jsonl" "$R/swap.jsonl"
id=$(submit "$(spec "$W/fifo-out" "{'calib': {'path': '$R/swap.jsonl'}}")")
rm "$R/swap.jsonl" && mkfifo "$R/swap.jsonl"
fault_injected "calib.path of $id replaced by a FIFO after submission"
start_worker w1 --lease-ms 3000
t0=$SECONDS
wait_until 60 "job $id to fail" bash -c "[ \"\$(curl -s -H 'Authorization: Bearer $TOKEN' $URL/v1/jobs/$id | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"state\"])')\" = failed ]"
err=$(job_json "$id" | pyj 'd["error"]')
case $err in *swap.jsonl*FIFO* | *FIFO*swap.jsonl*) ;; *) fail "the error does not name the FIFO: $err" ;; esac
worker_alive w1 || fail "the worker died on the FIFO"
ok=$(submit "$(spec "$W/after-fifo")")
wait_job "$ok" succeeded 180
survived "the job failed in $((SECONDS - t0)) s naming the FIFO; the same worker then ran $ok"
rm -f "$R/swap.jsonl"

# ---- 2. a paused publisher of a cancelled job, and a later owner of its output
# Hold the output's parent locked so that w1 stops inside the publish, after
# the fence's first check (the task is marked "publishing").
tag_stage=$(staging_tag_for 999999)
mkdir -p "$W/p/.o.qcal-stage.$tag_stage.a1" "$W/p/o.partial.$(staging_tag_for 999998)"
echo junk >"$W/p/o.partial.$(staging_tag_for 999998)/x"
# One process holds the lock (no child to outlive it and keep the test's output open).
python3 -c 'import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); time.sleep(600)' \
  "$W/p" </dev/null >/dev/null 2>&1 &
LOCK_PID=$!
WPID[lock]=$LOCK_PID  # stopped by the EXIT trap with the workers should the test fail
wait_until 10 "the lock holder" bash -c "! flock -n '$W/p' true"
a=$(submit "$(spec "$W/p/o")")
wait_until 120 "job $a to reach its publish" publishing "$a"
kill -STOP "${WPID[w1]}"
fault_injected "worker w1 stopped (SIGSTOP) inside job $a's publish"
api DELETE "/v1/jobs/$a"
[ "$HTTP_CODE" = 200 ] || fail "cancel $a: HTTP $HTTP_CODE $HTTP_BODY"
start_worker w2 --lease-ms 3000
b=$(submit "$(spec "$W/p/o")")
wait_until 120 "job $b to reach its publish" publishing "$b"
kill "$LOCK_PID" 2>/dev/null || true
wait "$LOCK_PID" 2>/dev/null || true
unset 'WPID[lock]'
wait_job "$b" succeeded 120
# The bytes job b's assemble task published (its result).
b_bytes=$(redis-cli -p "$REDIS_PORT" HGET "qcal:task:$b:assemble" result | pyj 'd["bytes"]')
kill -CONT "${WPID[w1]}"
wait_until 60 "w1 to give up the stale publish" \
  grep -qE "newer owner|stopped without reporting" "$T/worker-w1.log"
sleep 1
[ "$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['job'])" "$W/p/o/.qcal-output.json")" = "$b" ] ||
  fail "the output is no longer job $b's: $(cat "$W/p/o/.qcal-output.json")"
now_bytes=$(python3 -c "
import os, sys
print(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(sys.argv[1]) for f in fs))" "$W/p/o")
[ "$now_bytes" = "$b_bytes" ] || fail "job $b's output changed: $now_bytes bytes, $b_bytes published"
[ "$(job_state "$a")" = cancelled ] || fail "job $a is $(job_state "$a")"
[ "$(job_state "$b")" = succeeded ] || fail "job $b is $(job_state "$b")"
worker_alive w1 || fail "w1 died"
left=$(ls -A "$W/p" | grep -v '^o$' || true)
[ -z "$left" ] || fail "staging left next to the output: $left"
survived "job $b's output intact ($b_bytes bytes) after w1 resumed; w1: $(grep -hoE "newer owner[^;]*|stopped without reporting[^)]*" "$T/worker-w1.log" | head -1)"
fault_injected "a kill during publish left .partial / .qcal-stage of dead pids"
survived "the next publish into $W/p swept them"

# ---- storage is reclaimed
wait_until 30 "the artifacts of finished jobs to leave the store" \
  bash -c "[ -z \"\$(ls -A '$STORE/jobs' 2>/dev/null)\" ]"
m=$(curl -s "$URL/metrics")
bytes=$(echo "$m" | awk '/^qcal_store_bytes /{print $2}')
reclaimed=$(echo "$m" | awk '/^qcal_store_reclaimed_bytes_total /{print $2}')
[ -n "$bytes" ] || fail "/metrics has no qcal_store_bytes: $m"
[ "${reclaimed:-0}" -gt 0 ] || fail "/metrics reports nothing reclaimed: $m"
note "store: $bytes bytes after the sweeps, $reclaimed bytes reclaimed"

security_summary
passed "FIFO swap, stale publisher, leftovers of killed publishes survived; storage reclaimed"

#!/usr/bin/env bash
# labels: integration slow
# Service scenario (c): the coordinator is stopped (SIGTERM) in the middle of
# a job and started again on the same port. Workers keep going without it
# (all state is in Redis); the job succeeds with output byte-identical to
# `qcal quantize`, and a `qcal wait` started before the restart rides it out
# (it retries while the coordinator is unreachable) and exits 0.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
make_model "$T/m" medium
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 64 --seqlen 128 --method gptq --w-bits 4
  --group-size 16)
start_worker w1
id=$(q submit "${R[@]}" --out "$T/out" --eval-data "$T/m.eval.jsonl" --eval-nsamples 8 \
  --max-ppl-increase 1 --labels scenario=coordinator-restart)
note "submitted $id"

q wait "$id" --interval 0.5 --timeout 600 >"$T/wait.out" 2>"$T/wait.err" &
WPID[waiter]=$!

_calibrating() { [ -n "$(running_block "$id")" ]; }
wait_until 300 "a block task to run" _calibrating
running=$(running_block "$id")
stop_coordinator TERM
note "coordinator stopped (SIGTERM) while $running ran"
curl -s -o /dev/null "$URL/healthz" && fail "the coordinator still answers after SIGTERM"
done_before=$(redis-cli -p "$REDIS_PORT" hget "qcal:job:$id" tasks_done)
sleep 4
done_during=$(redis-cli -p "$REDIS_PORT" hget "qcal:job:$id" tasks_done)
note "tasks done while the coordinator was down: $done_before → $done_during"
start_coordinator
note "coordinator restarted on port $PORT"

wait_job "$id" succeeded 600
wait "${WPID[waiter]}" || fail "qcal wait across the restart exited $? ($(cat "$T/wait.err"))"
unset "WPID[waiter]"
grep -q "succeeded" "$T/wait.out" || fail "qcal wait output: $(cat "$T/wait.out")"
grep -q "retrying" "$T/wait.err" || note "(qcal wait never saw the coordinator down)"
[ "$(q jobs --label scenario=coordinator-restart --json | pyj 'len(d["jobs"])')" = 1 ] ||
  fail "the job list after the restart: $(q jobs --json)"

"$QCAL" quantize "${R[@]}" --out "$T/ref" --quiet >/dev/null
compare_dirs "$T/ref" "$T/out"
passed "job survived a coordinator restart"

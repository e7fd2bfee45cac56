#!/usr/bin/env bash
# labels: integration slow
# Service scenario (d): Redis is stopped (SIGTERM: it writes its AOF and
# exits) in the middle of a job and started again on the same port with the
# same directory. The coordinator answers 503 meanwhile (/readyz too), the
# worker waits Redis out, and the job succeeds with output byte-identical to
# `qcal quantize`.
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator
make_model "$T/m" medium
R=(--model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 64 --seqlen 128 --method gptq --w-bits 4
  --group-size 16)
start_worker w1
id=$(q submit "${R[@]}" --out "$T/out" --eval-data "$T/m.eval.jsonl" --eval-nsamples 8 \
  --max-ppl-increase 1)
note "submitted $id"

_calibrating() { [ -n "$(running_block "$id")" ]; }
wait_until 300 "a block task to run" _calibrating
running=$(running_block "$id")
stop_redis TERM
note "redis stopped (SIGTERM) while $running ran"
[ -s "$T/redis/appendonly.aof" ] || ls "$T/redis/appendonlydir" >/dev/null 2>&1 ||
  fail "redis left no AOF in $T/redis"

# While Redis is gone: /healthz stays 200, /readyz and job reads answer 503 JSON.
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/healthz")" = 200 ] || fail "/healthz without redis"
code=$(curl -s -o "$T/readyz" -w '%{http_code}' "$URL/readyz")
[ "$code" = 503 ] || fail "/readyz without redis answered $code: $(cat "$T/readyz")"
api GET "/v1/jobs/$id"
[ "$HTTP_CODE" = 503 ] || fail "GET /v1/jobs/$id without redis answered $HTTP_CODE: $HTTP_BODY"
echo "$HTTP_BODY" | pyj 'd["error"]["message"]' >/dev/null || fail "503 body is not a JSON error: $HTTP_BODY"
set +e
out=$(q status "$id" 2>&1); rc=$?
set -e
[ $rc -eq 1 ] && echo "$out" | grep -q "(HTTP 503)" || fail "qcal status without redis: rc $rc: $out"
sleep 3
worker_alive w1 || fail "the worker exited while Redis was down (see worker-w1.log)"

start_redis
note "redis restarted on port $REDIS_PORT from $T/redis"
wait_until 30 "/readyz after the redis restart" curl -sf -o /dev/null "$URL/readyz"
wait_job "$id" succeeded 600

"$QCAL" quantize "${R[@]}" --out "$T/ref" --quiet >/dev/null
compare_dirs "$T/ref" "$T/out"
passed "job survived a Redis restart"

#!/usr/bin/env bash
# labels: integration
# Service scenario (f): requests the coordinator must refuse — malformed
# JSON, an oversized body, a missing or wrong token, an invalid spec — each
# get a 4xx with a JSON error body {"error": {"code", "message"}}, and nothing
# is created: GET /v1/jobs stays empty and Redis holds no job keys. The
# client prints them as "qcal <cmd>: error: <message> (HTTP <status>)" with
# exit 2 (4xx) or 1 (unreachable).
source "$(dirname "$0")/lib/service.bash" "$@"

start_redis
start_coordinator --max-body-mb 1
make_model "$T/m" small

jobs_now() { API_TOKEN=$TOKEN api GET /v1/jobs; [ "$HTTP_CODE" = 200 ] || fail "GET /v1/jobs: $HTTP_CODE"; echo "$HTTP_BODY" | pyj 'len(d["jobs"])'; }
redis_jobs() { redis-cli -p "$REDIS_PORT" --scan --pattern 'qcal:job*' | wc -l; }
[ "$(jobs_now)" = 0 ] || fail "fresh coordinator lists jobs"
keys0=$(redis_jobs)

expect() {  # expect CODE WHAT METHOD PATH [curl args...]: 4xx JSON error, nothing created
  local want=$1 what=$2; shift 2
  api "$@"
  [ "$HTTP_CODE" = "$want" ] || fail "$what: HTTP $HTTP_CODE (expected $want): $HTTP_BODY"
  local msg
  msg=$(echo "$HTTP_BODY" | pyj 'd["error"]["code"] + ": " + d["error"]["message"]') ||
    fail "$what: body is not {\"error\": {\"code\", \"message\"}}: $HTTP_BODY"
  [ "$(jobs_now)" = 0 ] || fail "$what created a job"
  [ "$(redis_jobs)" = "$keys0" ] || fail "$what wrote job keys to Redis"
  note "$what → $HTTP_CODE $msg"
}

good=$("$QCAL" submit --model "$T/m" --calib "$T/m.calib.jsonl" --nsamples 8 --seqlen 64 \
  --out "$T/out" --dry-run)

expect 400 "malformed JSON" POST /v1/jobs --data-binary '{"model": "/x", "calib": {'
expect 400 "a JSON array body" POST /v1/jobs --data-binary '[1, 2]'
expect 400 "an empty body" POST /v1/jobs --data-binary ''
python3 -c "
import json, sys
d = json.loads(sys.argv[1]); d['labels'] = {'pad': 'x' * (2 << 20)}
open(sys.argv[2], 'w').write(json.dumps(d))" "$good" "$T/big.json"
expect 413 "a 2 MiB body (limit 1 MiB)" POST /v1/jobs --data-binary "@$T/big.json"
API_TOKEN= expect 401 "no token" POST /v1/jobs --data-binary "$good"
API_TOKEN="not-$TOKEN" expect 401 "a wrong token" POST /v1/jobs --data-binary "$good"
API_TOKEN= expect 401 "no token, GET" GET /v1/jobs
expect 400 "an unknown spec field" POST /v1/jobs --data-binary \
  "$(echo "$good" | pyj 'dict(d, recipe={"w_bitz": 4})')"
expect 400 "w_bits 5" POST /v1/jobs --data-binary "$(echo "$good" | pyj 'dict(d, recipe={"w_bits": 5})')"
api POST /v1/jobs --data-binary "$(echo "$good" | pyj 'dict(d, model="/nonexistent/model")')"
case $HTTP_CODE in 4*) ;; *) fail "a missing model: HTTP $HTTP_CODE: $HTTP_BODY" ;; esac
[ "$(jobs_now)" = 0 ] || fail "a job with a missing model was created"
note "missing model → $HTTP_CODE $(echo "$HTTP_BODY" | pyj 'd["error"]["message"]')"
expect 404 "an unknown job" GET /v1/jobs/j-0-0
expect 404 "an unknown route" GET /v1/nothing-here
expect 400 "an unknown state filter" GET '/v1/jobs?state=sleeping'
expect 400 "a bad cron" POST /v1/schedules --data-binary "{\"cron\": \"61 * * * *\", \"template\": $good}"

# The client's rendering and exit codes.
echo '{"model": ' >"$T/bad.json"
set +e
out=$(q submit --spec "$T/bad.json" 2>&1); rc=$?
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "qcal submit: error: .*bad.json" || fail "client, bad spec file: $rc $out"
echo "$good" | pyj 'dict(d, recipe={"w_bits": 5})' >"$T/bits5.json"
set +e
out=$(q submit --spec "$T/bits5.json" 2>&1); rc=$?
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "^qcal submit: error: .*w_bits.*(HTTP 400)$" ||
  fail "client, invalid spec: rc $rc: $out"
set +e
out=$("$QCAL" jobs --server "$URL" 2>&1); rc=$?   # no token (QCAL_TOKEN unset)
set -e
[ $rc -eq 2 ] && echo "$out" | grep -q "(HTTP 401)" || fail "client without token: rc $rc: $out"
out=$(QCAL_SERVER=$URL QCAL_TOKEN=$TOKEN "$QCAL" jobs --json) || fail "client with env: $out"
set +e
out=$("$QCAL" jobs --server "http://127.0.0.1:$(free_port)" --token x 2>&1); rc=$?
set -e
[ $rc -eq 1 ] && echo "$out" | grep -q "cannot reach coordinator at http://127.0.0.1:" ||
  fail "client, nothing listening: rc $rc: $out"

# And a good request still works afterwards.
api POST /v1/jobs --data-binary "$good"
[ "$HTTP_CODE" = 202 ] || fail "the valid spec: HTTP $HTTP_CODE: $HTTP_BODY"
[ "$(jobs_now)" = 1 ] || fail "the valid spec did not create exactly one job"
api DELETE "/v1/jobs/$(echo "$HTTP_BODY" | pyj 'd["id"]')"
[ "$HTTP_CODE" = 200 ] || fail "cancel: HTTP $HTTP_CODE: $HTTP_BODY"
passed "malformed, oversized, unauthenticated and invalid requests refused; nothing created"

#!/usr/bin/env bash
# The service demo (the README's first command runs it), all on this machine
# and all on loopback: starts a private redis-server (AOF on, a free port, a
# temporary directory), qcal-coordinator and two qcal-workers (one compute
# thread each), then quantizes a trained model through the REST API with the
# methods the service exists for, next to the weight-only baseline:
#
#   GPTQ W4                           weight-only, per output channel (GPTQ format)
#   RTN W4A4KV4                       weights, activations and K/V cache at 4 bits,
#                                     no transform: what the methods below repair
#   FlatQuant W4A4KV4 + IntactKV      learned affine transforms per block, GPTQ
#                                     weights, the FP K/V cache of BOS kept
#   FlatQuant + CBQ(2,1) + IntactKV   FlatQuant, then CBQ windows of 2 blocks
#                                     (overlap 1) starting from GPTQ's solution,
#                                     learning the rounding, step sizes and clip
#                                     ratios against the FP BOS cache
#
# Every job has the same eval data and the same gate (--max-ppl-increase,
# --max-kl); the job fails when its result exceeds either bound. The demo
# follows the jobs (progress bar on a terminal), prints one before/after table
# from their reports and stops everything it started, whatever happens (trap
# on EXIT). It exits 0 when every job ran to a report — a job stopped by its
# gate is shown as such — and non-zero when a job failed for any other reason.
# The model (the shared real model when ../shared/models exists, else the
# committed fixture; the demo says which), the budget and the gate are
# deploy/demo-lib.sh's, shared with deploy/embedded-demo.sh.
#
#   bash deploy/service-demo.sh              # builds first if the binaries are missing
#   QCAL_DEMO_MODEL=fixture bash deploy/service-demo.sh   # the committed fixture even so
#   QCAL_BUILD_DIR=build-x bash deploy/service-demo.sh
#
# Outputs (checkpoints, each finished job as JSON, the table) stay in
# out/service-demo/ (QCAL_DEMO_OUT=DIR: there instead); Redis data, the
# artifact store and the logs live in a temporary directory that is removed at
# the end (QCAL_KEEP_TMP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${QCAL_BUILD_DIR:-build}
QCAL=$BUILD_DIR/api/qcal
COORD=$BUILD_DIR/coordinator/qcal-coordinator
WORKER=$BUILD_DIR/worker/qcal-worker
if [ ! -x "$QCAL" ] || [ ! -x "$COORD" ] || [ ! -x "$WORKER" ]; then
  echo "service-demo: building into $BUILD_DIR"
  bash deploy/build.sh
fi
command -v redis-server >/dev/null || { echo "service-demo: redis-server missing (run deploy/install-deps.sh)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "service-demo: python3 missing (run deploy/install-deps.sh)" >&2; exit 1; }

# MODEL CALIB EVAL SEQLEN DATA_ROOT ABOUT NSAMPLES, DEMO_JOBS, DEMO_GATE, demo_table
. deploy/demo-lib.sh

D=${QCAL_DEMO_OUT:-out/service-demo}
# Outputs of an earlier run (also the earlier demo's generated model): qcal
# replaces only directories it published (.qcal-output.json).
rm -rf "$D/m" "$D"/q-* "$D"/job-*.json "$D/report.json" "$D/table.txt"
mkdir -p "$D"
ROOT=$(realpath "$D")
TMP=$(mktemp -d "${TMPDIR:-/tmp}/qcal-demo.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  set +e
  # Stop in reverse order of start: workers, coordinator, then Redis (by pid).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ $rc -ne 0 ]; then
    for f in "$TMP"/*.log; do [ -f "$f" ] && { echo "--- $(basename "$f")"; tail -n 20 "$f"; }; done >&2
  fi
  if [ "${QCAL_KEEP_TMP:-0}" = 1 ]; then echo "service-demo: kept $TMP"; else rm -rf "$TMP"; fi
  echo "service-demo: stopped everything it started"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_for() {  # wait_for SECONDS WHAT CMD...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "service-demo: $what did not come up (logs below)" >&2; exit 1; }
    sleep 0.2
  done
}
T0=$SECONDS

# ---- Redis, private to this demo
REDIS_PORT=$(free_port)
mkdir -p "$TMP/redis" "$TMP/store"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$TMP/redis" --appendonly yes --save '' \
  --logfile "$TMP/redis.log" &
PIDS+=($!)
wait_for 10 "redis-server" redis-cli -p "$REDIS_PORT" ping
echo "service-demo: redis-server on 127.0.0.1:$REDIS_PORT (AOF in $TMP/redis)"

# ---- coordinator with a fresh token, and two workers of one thread each
PORT=$(free_port)
export QCAL_SERVER=http://127.0.0.1:$PORT
QCAL_TOKEN=demo-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
export QCAL_TOKEN
printf '%s\n' "$QCAL_TOKEN" >"$TMP/tokens"
chmod 600 "$TMP/tokens"
# Jobs may read only the model and its data and write only under the demo's
# directory (common/path_policy.h).
CONFINE=(--allow-read "$MODEL" --allow-read "$DATA_ROOT" --allow-read "$ROOT" --allow-write "$ROOT")
"$COORD" --host 127.0.0.1 --port "$PORT" --redis "redis://127.0.0.1:$REDIS_PORT" \
  --tokens "$TMP/tokens" --store "$TMP/store" "${CONFINE[@]}" >"$TMP/coordinator.log" 2>&1 &
PIDS+=($!)
wait_for 20 "qcal-coordinator" "$QCAL" jobs   # answers once it serves and reaches Redis
echo "service-demo: qcal-coordinator on $QCAL_SERVER"
for w in 1 2; do
  "$WORKER" --redis "redis://127.0.0.1:$REDIS_PORT" --store "$TMP/store" --worker-id demo-worker-$w \
    --threads 1 "${CONFINE[@]}" >"$TMP/worker-$w.log" 2>&1 &
  PIDS+=($!)
done
echo "service-demo: qcal-worker demo-worker-1 and demo-worker-2 started (1 thread each)"
echo "service-demo: model $ABOUT"
echo "service-demo: gate for every job: ppl increase <= $MAX_PPL, KL <= $MAX_KL nats"

# ---- the jobs (the same data, eval set and gate for each; paths in a job
# spec are absolute: coordinator and workers may run elsewhere)
IDS=()
for j in "${DEMO_JOBS[@]}"; do
  name=${j%%|*} flags=${j#*|}
  # The two quick baselines go first on the shared workers (the queue's priority).
  prio=normal
  case $name in gptq-w4 | rtn-w4a4kv4) prio=high ;; esac
  # shellcheck disable=SC2086 # the flags are words
  id=$("$QCAL" submit --priority $prio --model "$MODEL" --calib "$CALIB" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    $flags --eval-data "$EVAL" "${DEMO_GATE[@]}" \
    --out "$ROOT/q-$name" --overwrite --labels demo=service,row=$name)
  IDS+=("$id")
  echo "service-demo: submitted $name: job $id, priority $prio ($flags)"
done

# ---- follow them (they run at once on the two workers)
failed=0
for i in "${!IDS[@]}"; do
  id=${IDS[i]} name=${DEMO_JOBS[i]%%|*}
  echo
  echo "service-demo: $name (job $id)"
  "$QCAL" wait "$id" --json >"$D/job-$name.json" || true
  state=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["state"], "-", j.get("error") or "ok")' "$D/job-$name.json")
  echo "service-demo: $name: $state"
  # A job without a gate verdict in its report failed before validation.
  if ! python3 -c 'import json,sys; r=json.load(open(sys.argv[1])).get("report") or {}; sys.exit(0 if "gate" in r else 1)' "$D/job-$name.json"; then
    echo "service-demo: job $id ($name) ended without a report; its log:" >&2
    "$QCAL" logs "$id" >&2 || true
    failed=1
  fi
done
echo
[ -d "$D/q-gptq-w4" ] && "$QCAL" inspect "$D/q-gptq-w4"
echo

# ---- the before/after table from the jobs' reports
demo_table "$D" "${DEMO_JOBS[@]%%|*}" | tee "$D/table.txt"
echo "service-demo: the whole demo took $((SECONDS - T0)) s; each job as JSON in $D/job-*.json, the table in $D/table.txt"
if command -v curl >/dev/null; then
  echo "service-demo: metrics ($QCAL_SERVER/metrics):"
  curl -s "$QCAL_SERVER/metrics" | grep -E '^qcal_(jobs\{|tasks_completed_total |task_seconds_count |workers )' || true
fi
exit $failed

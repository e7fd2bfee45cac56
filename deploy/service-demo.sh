#!/usr/bin/env bash
# The service demo, all on this machine and all on loopback: starts a private
# redis-server (AOF on, a free port, a temporary directory), qcal-coordinator
# and one qcal-worker; generates a small LLaMA-shaped model and token data;
# submits a GPTQ job (W4 g128) with an eval set and a validation gate over
# REST; follows it with `qcal wait` (progress bar on a terminal); prints the
# report; and stops everything it started, whatever happens (trap on EXIT).
#
#   bash deploy/service-demo.sh            # builds first if the binaries are missing
#   QCAL_BUILD_DIR=build-x bash deploy/service-demo.sh
#
# Outputs (model, data, quantized checkpoint) stay in out/service-demo/;
# Redis data, the artifact store and the logs live in a temporary directory
# that is removed at the end (QCAL_KEEP_TMP=1 keeps it).
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

D=out/service-demo
# Outputs of an earlier run: qcal replaces only directories it published
# (.qcal-output.json), and a run from before that marker existed has none.
rm -rf "$D/m" "$D/q-gptq"
mkdir -p "$D"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/qcal-demo.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  set +e
  # Stop in reverse order of start: worker, coordinator, then Redis (by pid).
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

# ---- Redis, private to this demo
REDIS_PORT=$(free_port)
mkdir -p "$TMP/redis" "$TMP/store"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$TMP/redis" --appendonly yes --save '' \
  --logfile "$TMP/redis.log" &
PIDS+=($!)
wait_for 10 "redis-server" redis-cli -p "$REDIS_PORT" ping
echo "service-demo: redis-server on 127.0.0.1:$REDIS_PORT (AOF in $TMP/redis)"

# ---- coordinator with a fresh token, and one worker
PORT=$(free_port)
export QCAL_SERVER=http://127.0.0.1:$PORT
QCAL_TOKEN=demo-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
export QCAL_TOKEN
printf '%s\n' "$QCAL_TOKEN" >"$TMP/tokens"
chmod 600 "$TMP/tokens"
# Jobs may read and write only under the demo's directory (common/path_policy.h).
ROOT=$(realpath "$D")
"$COORD" --host 127.0.0.1 --port "$PORT" --redis "redis://127.0.0.1:$REDIS_PORT" \
  --tokens "$TMP/tokens" --store "$TMP/store" --allow-read "$ROOT" --allow-write "$ROOT" \
  >"$TMP/coordinator.log" 2>&1 &
PIDS+=($!)
wait_for 20 "qcal-coordinator" "$QCAL" jobs   # answers once it serves and reaches Redis
echo "service-demo: qcal-coordinator on $QCAL_SERVER"
"$WORKER" --redis "redis://127.0.0.1:$REDIS_PORT" --store "$TMP/store" --worker-id demo-worker-1 \
  --allow-read "$ROOT" --allow-write "$ROOT" >"$TMP/worker.log" 2>&1 &
PIDS+=($!)
echo "service-demo: qcal-worker demo-worker-1 started"

# ---- a model and data
"$QCAL" synth --out "$D/m" --layers 4 --hidden 256 --heads 8 --kv-heads 4 --intermediate 688 \
  --vocab 512 --seed 1 --outlier-norm 4 --overwrite
"$QCAL" synth-data --model "$D/m" --tokens 32768 --seed 2 --out "$D/calib.jsonl"
"$QCAL" synth-data --model "$D/m" --tokens 16384 --seed 3 --out "$D/eval.jsonl"

# ---- the job: GPTQ W4 g128, evaluated against the FP model, gated
# Paths in a job spec are absolute: coordinator and workers may run elsewhere.
id=$("$QCAL" submit --model "$ROOT/m" --method gptq --w-bits 4 --group-size 128 \
  --calib "$ROOT/calib.jsonl" --nsamples 64 --seqlen 256 \
  --eval-data "$ROOT/eval.jsonl" --eval-nsamples 32 --max-ppl-increase 0.10 --max-kl 0.05 \
  --format gptq --out "$ROOT/q-gptq" --overwrite --labels demo=service)
echo "service-demo: submitted job $id"
echo
status=0
"$QCAL" wait "$id" || status=$?
echo
"$QCAL" status "$id"
echo
if "$QCAL" report "$id" --json >"$D/report.json" 2>/dev/null; then
  echo "report ($D/report.json):"
  python3 -m json.tool "$D/report.json"
fi
if [ $status -ne 0 ]; then
  echo "service-demo: job $id did not succeed; its log:" >&2
  "$QCAL" logs "$id" >&2 || true
  exit $status
fi
echo
"$QCAL" inspect "$D/q-gptq"
echo
if command -v curl >/dev/null; then
  echo "service-demo: metrics ($QCAL_SERVER/metrics):"
  curl -s "$QCAL_SERVER/metrics" | grep -E '^qcal_(jobs\{|tasks_completed_total |task_seconds_count |workers )' || true
fi

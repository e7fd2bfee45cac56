#!/usr/bin/env bash
# Hostile clients against a private coordinator (issue #11): starts a
# redis-server (AOF on) and qcal-coordinator on free loopback ports, submits
# one job (so GET /v1/jobs has something to list), then runs
# build/bench/hostile_client once per attack: 33 idle connections (one more
# than cpp-httplib's old 32-thread pool), 200 idle connections, 200 slowloris
# heads, 200 unauthenticated slow bodies, 200 authenticated slow bodies, the
# first three mixed, and one 200 MiB chunked body. Each run prints
# p50/p99/max of /healthz and an authenticated GET /v1/jobs measured
# meanwhile (docs/PERFORMANCE.md, "Hostile clients").
#
# Then, beyond the connection cap: 1000 idle connections against the
# default --max-connections 512 (probes get fast 503s: reported, not counted
# as a failure), and against a second coordinator with
# --max-connections-per-ip 256 while the probes come from 127.0.0.2.
#
#   bench/hostile.sh [BUILD_DIR]                (default: build; needs redis-server, python3)
#   QCAL_COORDINATOR=/path/to/qcal-coordinator bench/hostile.sh build   (another server binary)
#   QCAL_HOSTILE_SECONDS=20 QCAL_HOSTILE_CONNS=500 bench/hostile.sh
#
# Exit status: 0 when every probe of every run answered 200 and the chunked
# body was refused with 413; 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
QCAL=$B/api/qcal
COORD=${QCAL_COORDINATOR:-$B/coordinator/qcal-coordinator}
HOSTILE=${QCAL_HOSTILE_CLIENT:-$B/bench/hostile_client}
SECONDS_PER_RUN=${QCAL_HOSTILE_SECONDS:-10}
CONNS=${QCAL_HOSTILE_CONNS:-200}
for b in "$QCAL" "$COORD" "$HOSTILE"; do [ -x "$b" ] || { echo "hostile: build $b first" >&2; exit 1; }; done
for t in redis-server redis-cli curl python3; do
  command -v $t >/dev/null || { echo "hostile: $t missing (deploy/install-deps.sh)" >&2; exit 1; }
done

T=$(mktemp -d "${TMPDIR:-/tmp}/qcal-hostile.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$T"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_for() {
  local deadline=$((SECONDS + 30))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "hostile: timed out: $*" >&2; exit 1; }
    sleep 0.2
  done
}

RP=$(free_port)
mkdir -p "$T/redis" "$T/store"
redis-server --port "$RP" --bind 127.0.0.1 --dir "$T/redis" --appendonly yes --save '' \
  --logfile "$T/redis.log" &
PIDS+=($!)
wait_for redis-cli -p "$RP" ping
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
TOKEN=hostile-$RANDOM$RANDOM
echo "$TOKEN" >"$T/tokens"
"$COORD" --host 127.0.0.1 --port "$PORT" --redis "redis://127.0.0.1:$RP" --tokens "$T/tokens" \
  --store "$T/store" --allow-read "$T" --allow-write "$T" >"$T/coordinator.log" 2>&1 &
PIDS+=($!)
wait_for curl -sf "$URL/readyz"

"$QCAL" synth --out "$T/m" --layers 2 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128 \
  --vocab 256 --seed 1 >/dev/null
"$QCAL" synth-data --model "$T/m" --tokens 4096 --seed 1 --out "$T/calib.jsonl" >/dev/null
"$QCAL" submit --server "$URL" --token "$TOKEN" --model "$T/m" --calib "$T/calib.jsonl" \
  --nsamples 8 --seqlen 64 --out "$T/out" >/dev/null

echo "coordinator: $COORD; $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
ok=0
run() {  # run MODE CONNS
  echo
  echo "== $2 x $1, ${SECONDS_PER_RUN} s"
  "$HOSTILE" --port "$PORT" --token "$TOKEN" --mode "$1" --conns "$2" \
    --seconds "$SECONDS_PER_RUN" || ok=1
  # Let the server drop what the attack left before the next run.
  sleep 1
}
run idle 0
run idle 33
run idle "$CONNS"
run slowloris "$CONNS"
run slowbody "$CONNS"
run authbody "$CONNS"
run mix "$CONNS"
echo
echo "== chunked body"
"$HOSTILE" --port "$PORT" --token "$TOKEN" --mode chunked --chunked-mb 200 || ok=1
jobs=$(curl -s -m 10 -H "Authorization: Bearer $TOKEN" "$URL/v1/jobs" | python3 -c \
  'import json,sys; print(len(json.load(sys.stdin)["jobs"]))' 2>/dev/null || echo "?")
echo "jobs stored after the chunked body: $jobs (1 expected)"
[ "$jobs" = 1 ] || ok=1

if [ "${QCAL_HOSTILE_BEYOND_CAP:-1}" = 1 ]; then
  echo
  echo "== 1000 x idle, beyond --max-connections 512 (503s expected)"
  "$HOSTILE" --port "$PORT" --token "$TOKEN" --mode idle --conns 1000 --seconds "$SECONDS_PER_RUN"
  PORT2=$(free_port)
  "$COORD" --host 127.0.0.1 --port "$PORT2" --redis "redis://127.0.0.1:$RP" --tokens "$T/tokens" \
    --store "$T/store" --allow-read "$T" --allow-write "$T" --max-connections-per-ip 256 \
    >"$T/coordinator2.log" 2>&1 &
  PIDS+=($!)
  wait_for curl -sf "http://127.0.0.1:$PORT2/readyz"
  sleep 1
  echo
  echo "== 1000 x idle from 127.0.0.1, --max-connections-per-ip 256, probes from 127.0.0.2"
  "$HOSTILE" --port "$PORT2" --token "$TOKEN" --mode idle --conns 1000 \
    --seconds "$SECONDS_PER_RUN" --probe-from 127.0.0.2 || ok=1
fi
exit $ok

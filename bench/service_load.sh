#!/usr/bin/env bash
# Load figures for the coordinator's hottest read: GET /v1/jobs/{id} (what
# every `qcal wait` polls). Starts a private redis-server (AOF on, as in
# production) and qcal-coordinator on free loopback ports, submits one job
# (8 layers: an 11-task DAG; no worker, so it stays queued and every request
# reads the same job and task hashes), then runs
#   wrk -t2 -c16 -d10s --latency -H "Authorization: Bearer <token>" URL/v1/jobs/<id>
# and prints requests/s and p99 against the targets (≥ 1,000 req/s, p99 < 20 ms).
# /healthz (no Redis, no auth) is measured the same way as the HTTP layer's ceiling.
#
#   bench/service_load.sh [BUILD_DIR]        (default: build; needs wrk, redis-server)
#   QCAL_LOAD_DURATION=30s QCAL_LOAD_CONNECTIONS=64 bench/service_load.sh build
#
# Exit status: 0 when both targets are met, 1 otherwise (or on any error).
# Note the client and server share the machine: on a small box wrk's own CPU
# use lowers the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
QCAL=$B/api/qcal
COORD=$B/coordinator/qcal-coordinator
DURATION=${QCAL_LOAD_DURATION:-10s}
CONNS=${QCAL_LOAD_CONNECTIONS:-16}
THREADS=${QCAL_LOAD_THREADS:-2}
for b in "$QCAL" "$COORD"; do [ -x "$b" ] || { echo "service_load: build $b first" >&2; exit 1; }; done
for t in wrk redis-server redis-cli curl python3; do
  command -v $t >/dev/null || { echo "service_load: $t missing (deploy/install-deps.sh)" >&2; exit 1; }
done

T=$(mktemp -d "${TMPDIR:-/tmp}/qcal-load.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  [ $rc -eq 0 ] || tail -n 20 "$T"/*.log >&2 2>/dev/null
  rm -rf "$T"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
wait_for() {
  local deadline=$((SECONDS + 20))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "service_load: timed out: $*" >&2; exit 1; }
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
TOKEN=load-$RANDOM$RANDOM
echo "$TOKEN" >"$T/tokens"
"$COORD" --host 127.0.0.1 --port "$PORT" --redis "redis://127.0.0.1:$RP" --tokens "$T/tokens" \
  --store "$T/store" --allow-read "$T" --allow-write "$T" >"$T/coordinator.log" 2>&1 &
PIDS+=($!)
wait_for curl -sf "$URL/readyz"

"$QCAL" synth --out "$T/m" --layers 8 --hidden 128 --heads 4 --kv-heads 2 --intermediate 256 \
  --vocab 256 --seed 1 >/dev/null
"$QCAL" synth-data --model "$T/m" --tokens 8192 --seed 1 --out "$T/calib.jsonl" >/dev/null
id=$("$QCAL" submit --server "$URL" --token "$TOKEN" --model "$T/m" --calib "$T/calib.jsonl" \
  --nsamples 16 --seqlen 128 --eval-data "$T/calib.jsonl" --max-kl 0.1 --out "$T/out")
bytes=$(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/jobs/$id" | wc -c)
echo "job $id queued; GET /v1/jobs/$id answers $bytes bytes"

run_wrk() {  # run_wrk NAME URL [wrk args] → prints "rps p99_ms non2xx socket requests"
  local name=$1 url=$2; shift 2
  wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$@" "$url" >"$T/wrk-$name.txt"
  python3 - "$T/wrk-$name.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errs = re.search(r"Socket errors:.*", text)
n = int(re.search(r"(\d+) requests in", text).group(1))
print(f"{rps:.0f} {p99:.2f} {int(bad.group(1)) if bad else 0} {'socket-errors' if errs else 'ok'} {n}")
PY
}

echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency (client and server on this machine, $(nproc) cores)"
# CPU seconds (user + system) a process has used: with the machine shared,
# CPU time per request says what a dedicated core would sustain.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
COORD_PID=${PIDS[1]} REDIS_PID=${PIDS[0]}
cpu_per_req() {  # cpu_per_req PID BEFORE REQUESTS → CPU microseconds per request
  python3 -c "print(f'{($(cpu_s "$1") - $2) / $3 * 1e6:.0f}')"
}
c0=$(cpu_s "$COORD_PID") r0=$(cpu_s "$REDIS_PID")
read -r h_rps h_p99 h_bad h_sock h_n < <(run_wrk healthz "$URL/healthz")
h_cpu=$(cpu_per_req "$COORD_PID" "$c0" "$h_n")
c0=$(cpu_s "$COORD_PID") r0=$(cpu_s "$REDIS_PID")
read -r j_rps j_p99 j_bad j_sock j_n < <(run_wrk job "$URL/v1/jobs/$id" -H "Authorization: Bearer $TOKEN")
j_cpu=$(cpu_per_req "$COORD_PID" "$c0" "$j_n") j_rcpu=$(cpu_per_req "$REDIS_PID" "$r0" "$j_n")
printf '%-20s %9s %9s %8s %22s %14s\n' route "req/s" "p99 ms" non-2xx "coordinator CPU us/req" "redis us/req"
printf '%-20s %9s %9s %8s %22s %14s\n' "GET /healthz" "$h_rps" "$h_p99" "$h_bad" "$h_cpu" -
printf '%-20s %9s %9s %8s %22s %14s\n' "GET /v1/jobs/{id}" "$j_rps" "$j_p99" "$j_bad" "$j_cpu" "$j_rcpu"
[ "$h_sock" = ok ] && [ "$j_sock" = ok ] || echo "socket errors: see wrk output"
cat "$T/wrk-job.txt"

ok=1
python3 -c "import sys; sys.exit(0 if $j_rps >= 1000 else 1)" || { echo "MISS: $j_rps req/s < 1000"; ok=0; }
python3 -c "import sys; sys.exit(0 if $j_p99 < 20 else 1)" || { echo "MISS: p99 $j_p99 ms ≥ 20 ms"; ok=0; }
[ "$j_bad" = 0 ] || { echo "MISS: $j_bad non-2xx answers"; ok=0; }
[ $ok = 1 ] && echo "targets met: ≥ 1000 req/s and p99 < 20 ms on GET /v1/jobs/{id}"
[ $ok = 1 ]

# Shared set-up for the service integration tests (tests/e2e/service_*.sh).
# Sourced, not run: lives under lib/ so CTest's e2e/*.sh glob skips it.
#
#   source "$(dirname "$0")/lib/service.bash" "$@"   # args: QCAL [COORDINATOR [WORKER]]
#
# Every test gets its own temporary directory ($T), its own redis-server on a
# free loopback port (AOF on), its own coordinator and workers, all on
# 127.0.0.1. Everything started here is stopped by the EXIT trap, by pid
# (TERM, then KILL after 5 s); on failure the tails of every log are printed.
# QCAL_KEEP_TMP=1 keeps $T for a post-mortem.
#
# Helpers (each fails the test with a message on timeout / error):
#   start_redis / stop_redis [SIG]          $REDIS_PORT, $REDIS_URL; data in $T/redis
#   start_coordinator [extra flags]         $PORT, $URL; token in $TOKEN; roots: $ALLOW
#                                           (default: --allow-read $T --allow-write $T)
#   stop_coordinator [SIG]
#   start_worker NAME [extra flags]         pid in WPID[NAME]; log $T/worker-NAME.log; roots $ALLOW
#   kill_worker NAME [SIG]
#   api METHOD PATH [curl args...]          sets HTTP_CODE and HTTP_BODY (token: $API_TOKEN
#                                           when set, else $TOKEN; API_TOKEN= sends none)
#   q CMD [args...]                         the qcal client against this coordinator
#   job_json ID                             GET /v1/jobs/ID body (retries while unreachable)
#   job_state ID                            its state
#   wait_until TIMEOUT_S WHAT CMD...        polls CMD every 0.2 s
#   wait_job ID STATE TIMEOUT_S             until the job reaches STATE (any other terminal: fail)
#   running_block ID                        "task worker" of a running block task
#                                           (quantize, transform, cbq-window), or ""
#   make_model DIR SIZE                     SIZE small (2 layers, hidden 128) | medium (4, 256)
#   compare_dirs A B                        same file list, every file byte-identical (cmp),
#                                           the output manifest (.qcal-output.json) aside
#   pyj EXPR                                evaluates EXPR with d = JSON read from stdin
set -euo pipefail

QCAL=$(realpath "${1:?usage: $0 path/to/qcal [path/to/qcal-coordinator [path/to/qcal-worker]]}")
_bin=$(dirname "$QCAL")/..
COORD=$(realpath -m "${2:-$_bin/coordinator/qcal-coordinator}")
WORKER=$(realpath -m "${3:-$_bin/worker/qcal-worker}")
TEST_NAME=$(basename "$0" .sh)
for _b in "$QCAL" "$COORD" "$WORKER"; do
  [ -x "$_b" ] || { echo "$TEST_NAME: missing executable $_b (build qcal-coordinator and qcal-worker)" >&2; exit 1; }
done
command -v redis-server >/dev/null || { echo "$TEST_NAME: redis-server not installed" >&2; exit 1; }
command -v curl >/dev/null || { echo "$TEST_NAME: curl not installed" >&2; exit 1; }

# One BLAS thread everywhere: the in-process reference and the workers run the
# same arithmetic, and tests running side by side do not oversubscribe.
export QCAL_THREADS=${QCAL_THREADS:-1}
export QCAL_LOG_LEVEL=${QCAL_LOG_LEVEL:-info}

T=$(mktemp -d "${TMPDIR:-/tmp}/qcal-$TEST_NAME.XXXXXX")
STORE=$T/store
mkdir -p "$STORE" "$T/redis"
TOKEN=tok-$RANDOM$RANDOM$RANDOM
# The directories jobs may read and write (common/path_policy.h): the test's
# own temporary directory, unless a test sets ALLOW before starting processes.
ALLOW=(--allow-read "$T" --allow-write "$T")
printf '%s\n' "$TOKEN" >"$T/tokens"
REDIS_PID="" COORD_PID=""
declare -A WPID=()
_passed=0

_stop_pid() {  # _stop_pid PID [SIG]: signal, wait up to 5 s, then KILL
  local pid=$1 sig=${2:-TERM}
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

_cleanup() {
  local rc=$?
  set +e
  for n in "${!WPID[@]}"; do _stop_pid "${WPID[$n]}"; done
  _stop_pid "$COORD_PID"
  _stop_pid "$REDIS_PID"
  if [ $rc -ne 0 ] || [ $_passed -ne 1 ]; then
    for f in "$T"/*.log; do
      [ -f "$f" ] || continue
      echo "----- tail of $(basename "$f")" >&2
      tail -n 25 "$f" >&2
    done
  fi
  if [ "${QCAL_KEEP_TMP:-0}" = 1 ]; then echo "$TEST_NAME: kept $T" >&2; else rm -rf "$T"; fi
  exit $rc
}
trap _cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL $TEST_NAME: $*" >&2; exit 1; }
note() { echo "[$TEST_NAME $(date +%T)] $*"; }
passed() { _passed=1; echo "PASS $TEST_NAME${1:+: $1}"; }

pyj() { python3 -c "import json,sys; d=json.load(sys.stdin); v=($1); print(json.dumps(v) if isinstance(v,(dict,list,bool)) or v is None else v)"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_until() {  # wait_until TIMEOUT_S WHAT CMD...
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || fail "timed out after ${timeout}s waiting for $what"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- redis
REDIS_PORT=$(free_port)
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
_redis_up() { [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$T/redis" --appendonly yes \
    --appendfsync everysec --save '' --daemonize no --logfile "$T/redis.log" &
  REDIS_PID=$!
  wait_until 10 "redis-server on port $REDIS_PORT" _redis_up
}
stop_redis() { _stop_pid "$REDIS_PID" "${1:-TERM}"; REDIS_PID=""; }

# ---------------------------------------------------------------- coordinator
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
_coord_up() {
  kill -0 "$COORD_PID" 2>/dev/null || fail "qcal-coordinator exited (see coordinator.log)"
  curl -sf -o /dev/null "$URL/healthz"
}
start_coordinator() {
  "$COORD" --host 127.0.0.1 --port "$PORT" --redis "$REDIS_URL" --tokens "$T/tokens" \
    --store "$STORE" "${ALLOW[@]}" "$@" >>"$T/coordinator.log" 2>&1 &
  COORD_PID=$!
  wait_until 20 "qcal-coordinator on port $PORT" _coord_up
}
stop_coordinator() { _stop_pid "$COORD_PID" "${1:-TERM}"; COORD_PID=""; }

# ---------------------------------------------------------------- workers
start_worker() {  # start_worker NAME [flags]
  local name=$1; shift
  "$WORKER" --redis "$REDIS_URL" --store "$STORE" --worker-id "$name" --block-ms 500 \
    "${ALLOW[@]}" "$@" >>"$T/worker-$name.log" 2>&1 &
  WPID[$name]=$!
}
kill_worker() { _stop_pid "${WPID[$1]}" "${2:-TERM}"; unset "WPID[$1]"; }
worker_alive() { kill -0 "${WPID[$1]}" 2>/dev/null; }

# ---------------------------------------------------------------- REST
api() {  # api METHOD PATH [curl args...] → HTTP_CODE, HTTP_BODY
  # The bearer token is $TOKEN, or $API_TOKEN when set (API_TOKEN= sends none).
  local m=$1 p=$2 auth=()
  shift 2
  [ -n "${API_TOKEN-$TOKEN}" ] && auth=(-H "Authorization: Bearer ${API_TOKEN-$TOKEN}")
  HTTP_CODE=$(curl -sS -o "$T/.body" -w '%{http_code}' -X "$m" "${auth[@]}" \
    -H 'Content-Type: application/json' "$@" "$URL$p" 2>/dev/null) ||
    HTTP_CODE=000
  HTTP_BODY=$(cat "$T/.body" 2>/dev/null || true)
  rm -f "$T/.body"
}
q() { "$QCAL" "$@" --server "$URL" --token "$TOKEN"; }

job_json() {  # retries for 30 s while the coordinator is unreachable / 5xx
  local deadline=$((SECONDS + 30))
  while :; do
    api GET "/v1/jobs/$1"
    [ "$HTTP_CODE" = 200 ] && { printf '%s' "$HTTP_BODY"; return 0; }
    case $HTTP_CODE in 4*) fail "GET /v1/jobs/$1: HTTP $HTTP_CODE $HTTP_BODY" ;; esac
    [ $SECONDS -lt $deadline ] || fail "GET /v1/jobs/$1: HTTP $HTTP_CODE for 30 s: $HTTP_BODY"
    sleep 0.3
  done
}
job_state() { job_json "$1" | pyj 'd["state"]'; }

_job_reached() {  # _job_reached ID STATE
  local s
  s=$(job_state "$1") || fail "cannot read the state of job $1"
  [ "$s" = "$2" ] && return 0
  case $s in
    succeeded | failed | cancelled)
      job_json "$1" | pyj '{k: d.get(k) for k in ("state", "error", "report")}' >&2
      fail "job $1 ended $s, expected $2" ;;
  esac
  return 1
}
wait_job() { wait_until "$3" "job $1 to be $2" _job_reached "$1" "$2"; }

# "task worker" of the first running calibrate task of job $1, or nothing.
running_block() {
  job_json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for t in d.get("progress", {}).get("tasks", []):
    if t.get("type") in ("quantize", "transform", "cbq-window") and t.get("state") == "running":
        print(t["id"], t.get("worker", "")); break'
}

# ---------------------------------------------------------------- data
make_model() {  # make_model DIR small|medium ; writes DIR, DIR.calib.jsonl, DIR.eval.jsonl
  local dir=$1 size=$2
  case $size in
    small) "$QCAL" synth --out "$dir" --layers 2 --hidden 128 --heads 4 --kv-heads 2 \
             --intermediate 256 --vocab 256 --seed 7 --outlier-norm 2 >/dev/null ;;
    medium) "$QCAL" synth --out "$dir" --layers 4 --hidden 256 --heads 4 --kv-heads 2 \
              --intermediate 688 --vocab 512 --seed 11 --outlier-norm 2 >/dev/null ;;
    *) fail "make_model: unknown size $size" ;;
  esac
  "$QCAL" synth-data --model "$dir" --tokens 16384 --seed 1 --out "$dir.calib.jsonl" >/dev/null
  "$QCAL" synth-data --model "$dir" --tokens 4096 --seed 2 --out "$dir.eval.jsonl" >/dev/null
}

compare_dirs() {  # compare_dirs A B
  local a=$1 b=$2 f n=0
  [ -d "$a" ] || fail "compare_dirs: $a is not a directory"
  [ -d "$b" ] || fail "compare_dirs: $b is not a directory"
  # The manifest names who published (job, attempt): not part of the checkpoint.
  diff <(cd "$a" && find . -type f ! -name .qcal-output.json | sort) \
    <(cd "$b" && find . -type f ! -name .qcal-output.json | sort) >&2 ||
    fail "$a and $b hold different files"
  while IFS= read -r f; do
    cmp "$a/$f" "$b/$f" >&2 || fail "$f differs between $a and $b"
    n=$((n + 1))
  done < <(cd "$a" && find . -type f ! -name .qcal-output.json | sort)
  [ $n -gt 0 ] || fail "$a is empty"
  note "compared $n files: byte-identical ($a vs $b)"
}

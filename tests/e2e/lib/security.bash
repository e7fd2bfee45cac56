# The security suite's counters and checks (tests/e2e/security_*.sh, issue #11).
# Sourced after lib/service.bash:
#
#   source "$(dirname "$0")/lib/service.bash" "$@"
#   source "$(dirname "$0")/lib/security.bash"
#
#   refused CODE WHAT METHOD PATH [curl args...]
#       one hostile request: it must be answered CODE with the JSON error body
#       {"error": {"code", "message"}}, create no job, and (for 403) say
#       nothing of whether a path outside the roots exists. Counts a request
#       tried and, when all holds, one refused correctly.
#   refused_spec CODE WHAT JSON     POST /v1/jobs with JSON (the common case)
#   fault_injected WHAT             counts a fault (a kill, a pause, a swap, ...)
#   survived WHAT                   counts one survived with nothing lost
#   security_summary                prints the counts line:
#       "requests tried N, refused correctly N; faults injected N, survived with nothing lost N"
#       and fails the test when either pair differs.
#
# Further checks (the HTTP transport's, say) add lines of their own with the
# same helpers; nothing here depends on what a request is.
SEC_TRIED=0 SEC_REFUSED=0 SEC_FAULTS=0 SEC_SURVIVED=0

_jobs_total() {
  API_TOKEN=$TOKEN api GET '/v1/jobs?limit=1000'
  [ "$HTTP_CODE" = 200 ] || fail "GET /v1/jobs: HTTP $HTTP_CODE $HTTP_BODY"
  echo "$HTTP_BODY" | pyj 'len(d["jobs"])'
}

refused() {  # refused CODE WHAT METHOD PATH [curl args...]
  local want=$1 what=$2 before
  shift 2
  SEC_TRIED=$((SEC_TRIED + 1))
  before=$(_jobs_total)
  api "$@"
  [ "$HTTP_CODE" = "$want" ] || fail "$what: HTTP $HTTP_CODE (expected $want): $HTTP_BODY"
  local msg
  msg=$(echo "$HTTP_BODY" | pyj 'd["error"]["code"] + ": " + d["error"]["message"]') ||
    fail "$what: the body is not {\"error\": {\"code\", \"message\"}}: $HTTP_BODY"
  [ "$(_jobs_total)" = "$before" ] || fail "$what created a job"
  case $msg in *"is outside the directories"*)
    # Whether something outside the roots exists, or what it is, must not leak.
    case $msg in *"does not exist"* | *"No such file"* | *"not a directory"* | *"FIFO"* | *"regular file"*)
      fail "$what: a 403 that tells about the file: $msg" ;;
    esac ;;
  esac
  SEC_REFUSED=$((SEC_REFUSED + 1))
  note "refused $what → $HTTP_CODE $msg"
}

refused_spec() {  # refused_spec CODE WHAT JSON
  refused "$1" "$2" POST /v1/jobs --data-binary "$3"
}

fault_injected() { SEC_FAULTS=$((SEC_FAULTS + 1)); note "fault: $*"; }
survived() { SEC_SURVIVED=$((SEC_SURVIVED + 1)); note "survived: $*"; }

security_summary() {
  local line="requests tried $SEC_TRIED, refused correctly $SEC_REFUSED; faults injected $SEC_FAULTS, survived with nothing lost $SEC_SURVIVED"
  echo "$TEST_NAME: $line"
  [ "$SEC_TRIED" = "$SEC_REFUSED" ] && [ "$SEC_FAULTS" = "$SEC_SURVIVED" ] || fail "$line"
}

# The owner tag of staging names (common/fsutil.h staging_tag) for a pid.
staging_tag_for() {
  local h
  h=$(hostname)
  h=${h//./_}
  h=${h//-/_}
  h=${h//\//_}
  echo "$h-$1"
}

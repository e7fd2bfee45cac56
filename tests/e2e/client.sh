#!/usr/bin/env bash
# End-to-end test of the service client without a server: the quantize-style
# flags → JobSpec JSON mapping (`qcal submit --dry-run`, api/spec_flags.h;
# weight-only and calibration recipes; tests/unit/test_spec_flags.cc checks
# the coordinator's parser on the calibration specs),
# the flag errors (exit 2, message naming the flag), and the connection
# errors (exit 1, "cannot reach coordinator at URL").
set -euo pipefail
QCAL=$(realpath "${1:?usage: client.sh path/to/qcal}")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
unset QCAL_SERVER QCAL_TOKEN
cd "$T"

# Every weight-only flag (the earlier spellings included), and the JSON it must
# produce (relative paths made absolute; dotted recipe keys nested).
$QCAL submit --dry-run --model m --calib c.jsonl --out o --method gptq --w-bits 8 --group-size -1 \
  --asym --act-order --static-groups --damp 0.05 --mse-clip --no-true-sequential --mode parallel \
  --window 2 --overlap 0 --seed 9 --nsamples 64 --seqlen 256 --eval-data /abs/e.u32 \
  --eval-nsamples 16 --format compressed-tensors --overwrite --max-ppl-increase 0.05 \
  --max-kl 0.1 --priority low --labels "team=infra, run = 3,," >"$T/all.json"
python3 - "$T" "$T/all.json" <<'PY' || fail "flag mapping: $(cat "$T/all.json")"
import json, sys
t, got = sys.argv[1], json.load(open(sys.argv[2]))
want = {
    "model": f"{t}/m",
    "recipe": {"weight_solver": "gptq", "w_bits": 8, "w_group": -1, "w_sym": False,
               "gptq": {"act_order": True, "static_groups": True, "percdamp": 0.05,
                        "true_sequential": False},
               "w_mse_clip": True, "mode": "parallel", "blocks_per_task": 2, "seed": 9},
    "calib": {"path": f"{t}/c.jsonl", "nsamples": 64, "seqlen": 256},
    "eval": {"path": "/abs/e.u32", "nsamples": 16, "seqlen": 256},
    "output": {"path": f"{t}/o", "format": "compressed-tensors", "overwrite": True},
    "gate": {"max_ppl_increase": 0.05, "max_kl": 0.1},
    "priority": "low",
    "labels": {"team": "infra", "run": "3"},
}
assert got == want, json.dumps({"got": got, "want": want}, indent=1)
PY

# Only what was given: the schema's defaults apply to the rest (GPTQ W4 g128 is
# what the flags fill in for a weight-only recipe).
$QCAL submit --dry-run --model /m --calib /c --out /o >"$T/min.json"
[ "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])))' "$T/min.json")" = \
  "{'calib': {'path': '/c'}, 'model': '/m', 'output': {'path': '/o'}, 'recipe': {'w_group': 128, 'weight_solver': 'gptq'}}" ] ||
  fail "minimal spec: $(cat "$T/min.json")"
# --eval-seqlen overrides the calibration seqlen for the eval set.
$QCAL submit --dry-run --model /m --calib /c --out /o --seqlen 128 --eval-data /e --eval-seqlen 512 |
  python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["eval"] == {"path": "/e", "seqlen": 512}, d' ||
  fail "--eval-seqlen"

# A calibration recipe: only the keys given (and the filled-in solver), method
# resolved into transform / weight_solver.
$QCAL submit --model m --calib c.jsonl --out o --method flatquant --w-bits 4 --a-bits 4 --kv-bits 4 \
  --reconstruction cbq --cbq-window 2 --intactkv --seqlen 64 --dry-run >"$T/cbq.json"
python3 - "$T" "$T/cbq.json" <<'PY' || fail "calibration flags: $(cat "$T/cbq.json")"
import json, sys
t, got = sys.argv[1], json.load(open(sys.argv[2]))
assert got["model"] == f"{t}/m" and got["calib"] == {"path": f"{t}/c.jsonl", "seqlen": 64}, got
assert got["output"] == {"path": f"{t}/o"}, got  # format: auto (native here), the parser's default
want = {"transform": "flatquant", "weight_solver": "rtn", "w_bits": 4, "a_bits": 4, "kv_bits": 4,
        "reconstruction": "cbq", "cbq_window": 2, "intactkv": True}
assert got["recipe"] == want, got["recipe"]
PY
$QCAL submit --model /m --calib /c --out /o --reconstruction block --weight-solver rtn --cbq-overlap 0 \
  --format native --dry-run | python3 -c 'import json,sys; r=json.load(sys.stdin)["recipe"]
assert (r["weight_solver"], r["reconstruction"], r["cbq_overlap"]) == ("rtn", "block", 0), r' ||
  fail "--reconstruction block --weight-solver rtn"

expect() {  # expect RC WORDS cmd...
  local want=$1 words=$2; shift 2
  set +e; out=$("$@" 2>&1); rc=$?; set -e
  [ $rc -eq "$want" ] || fail "expected exit $want from: $* (got $rc: $out)"
  echo "$out" | grep -q -- "$words" || fail "expected '$words' in: $out"
}
B=(--model /m --calib /c --out /o)
expect 2 "missing required flag --model" $QCAL submit --calib /c --out /o --dry-run
expect 2 "exclusive" $QCAL submit "${B[@]}" --sym --asym --dry-run
expect 2 "flag --w-bits: 'four' is not an integer" $QCAL submit "${B[@]}" --w-bits four --dry-run
expect 2 "flag --damp" $QCAL submit "${B[@]}" --damp x --dry-run
expect 2 "--priority: must be high, normal or low" $QCAL submit "${B[@]}" --priority urgent --dry-run
expect 2 "--labels: 'team' is not of the form key=value" $QCAL submit "${B[@]}" --labels team --dry-run
expect 2 "has an empty key" $QCAL submit "${B[@]}" --labels =x --dry-run
expect 2 "label 'a' given twice" $QCAL submit "${B[@]}" --labels a=1,a=2 --dry-run
expect 2 "--eval-nsamples needs --eval-data" $QCAL submit "${B[@]}" --eval-nsamples 4 --dry-run
expect 2 "--seed: must be in \[0, 9007199254740992\] (got -1)" $QCAL submit "${B[@]}" --seed -1 --dry-run
echo '{}' >"$T/s.json"
expect 2 "--spec and --w-bits are exclusive" $QCAL submit --spec "$T/s.json" --w-bits 4
echo '{"model":' >"$T/bad.json"
expect 2 "bad.json: not valid JSON" $QCAL submit --spec "$T/bad.json"
expect 2 "nope.json" $QCAL submit --spec "$T/nope.json"
expect 2 "unknown flag --w-bitz" $QCAL submit "${B[@]}" --w-bitz 4
# Calibration recipes: validated like `qcal quantize`, and the output format as the planner will.
expect 2 "--spec and --cbq-window are exclusive" $QCAL submit --spec "$T/s.json" --cbq-window 2
expect 2 "--spec and --intactkv are exclusive" $QCAL submit --spec "$T/s.json" --intactkv
expect 2 "--spec and --method are exclusive" $QCAL submit --spec "$T/s.json" --method flatquant
expect 2 "--weight-solver: lora-rounding learns the rounding inside a block reconstruction" \
  $QCAL submit "${B[@]}" --weight-solver lora-rounding --dry-run
expect 2 "--weight-solver rtn contradicts --method gptq" \
  $QCAL submit "${B[@]}" --method gptq --weight-solver rtn --dry-run
expect 2 "--a-bits: must be 2, 3, 4, 6, 8 or 16 (got 5)" $QCAL submit "${B[@]}" --method quarot --a-bits 5 --dry-run
expect 2 "--intactkv-prefix: set without intactkv" $QCAL submit "${B[@]}" --intactkv-prefix 1 --dry-run
expect 2 "--asym: asymmetric weights are written only as GPTQ / compressed-tensors" \
  $QCAL submit "${B[@]}" --method flatquant --a-bits 4 --asym --dry-run
expect 2 "--window is the number of blocks per quantize task; a reconstruction's window is --cbq-window" \
  $QCAL submit "${B[@]}" --reconstruction cbq --window 2 --dry-run
expect 2 "--overlap: rtn / gptq quantize disjoint blocks" $QCAL submit "${B[@]}" --reconstruction cbq --overlap 1 --dry-run
expect 2 "--format: gptq holds quantized weights only" \
  $QCAL submit "${B[@]}" --reconstruction cbq --a-bits 4 --format gptq --dry-run
expect 2 "--format: compressed-tensors holds quantized weights only, but the recipe leaves transforms" \
  $QCAL submit "${B[@]}" --method flatquant --a-bits 4 --format compressed-tensors --dry-run
# Options of a method the recipe does not run are refused instead of dropped.
expect 2 "--alpha: an option of transform smoothquant, but the recipe's transform is none" \
  $QCAL submit "${B[@]}" --method gptq --alpha 0.7 --dry-run
expect 2 "--no-lwc: an option of transform flatquant" $QCAL submit "${B[@]}" --no-lwc --dry-run
expect 2 "--no-act-order: an option of weight_solver gptq, but the recipe's weight_solver is rtn" \
  $QCAL submit "${B[@]}" --method rtn --no-act-order --dry-run
# submit --help tells the service's blocks per task from CBQ's window.
help=$($QCAL submit --help)
grep -q -- "^  --window N  *blocks per quantize task (CBQ's window: --cbq-window)" <<<"$help" ||
  fail "submit --help: --window"
grep -q -- "^  --cbq-window N  *blocks trained jointly" <<<"$help" || fail "submit --help: --cbq-window"
grep -q -- "^  --cbq-overlap N  *blocks shared with the next window" <<<"$help" ||
  fail "submit --help: --cbq-overlap"
expect 2 "usage: qcal status ID" $QCAL status
expect 2 "usage: qcal wait ID" $QCAL wait a b
expect 2 "unknown subcommand 'frobnicate'" $QCAL schedules frobnicate
expect 2 "--cron is for 'schedules create'" $QCAL schedules list --cron "* * * * *"
expect 2 "missing required flag --cron" $QCAL schedules create --spec "$T/s.json"
expect 2 "scheme must be http or https" $QCAL jobs --server ftp://h:1
expect 2 "bad port" $QCAL jobs --server http://h:99999
expect 2 "--state" $QCAL jobs --state
# Nothing listening: exit 1 and the URL in the message (flag, then env).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
expect 1 "qcal jobs: error: cannot reach coordinator at http://127.0.0.1:$port" \
  $QCAL jobs --server "http://127.0.0.1:$port"
expect 1 "qcal status: error: cannot reach coordinator at http://127.0.0.1:$port/base" \
  env QCAL_SERVER="http://127.0.0.1:$port/base" $QCAL status j-1
expect 1 "cannot reach coordinator" $QCAL submit "${B[@]}" --server "http://127.0.0.1:$port"
expect 1 "qcal wait: error: cannot reach coordinator" \
  $QCAL wait j-1 --server "http://127.0.0.1:$port"
echo "e2e client: 1 passed, 0 failed"

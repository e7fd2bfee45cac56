#!/usr/bin/env bash
# End-to-end test of the embedded CLI as a user runs it:
# synth → synth-data → quantize (RTN, GPTQ; gptq and compressed-tensors) →
# inspect → eval, plus the error paths a user hits first. Asserts on values.
set -euo pipefail
QCAL=${1:?usage: cli.sh path/to/qcal}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

$QCAL synth --out "$T/m" --layers 2 --hidden 128 --heads 4 --kv-heads 2 --intermediate 256 \
  --vocab 256 --seed 7 --outlier-norm 2 >/dev/null
$QCAL synth-data --model "$T/m" --tokens 8192 --seed 1 --out "$T/calib.jsonl" >/dev/null
$QCAL synth-data --model "$T/m" --tokens 4096 --seed 2 --out "$T/eval.jsonl" >/dev/null

# Determinism: the same synth flags give byte-identical files.
$QCAL synth --out "$T/m2" --layers 2 --hidden 128 --heads 4 --kv-heads 2 --intermediate 256 \
  --vocab 256 --seed 7 --outlier-norm 2 >/dev/null
cmp "$T/m/model.safetensors" "$T/m2/model.safetensors" || fail "synth is not deterministic"

Q="--w-bits 4 --group-size 64 --calib $T/calib.jsonl --nsamples 16 --seqlen 128 --quiet"
$QCAL quantize --model "$T/m" --method rtn $Q --format gptq --out "$T/rtn" >/dev/null
QCAL_THREADS=1 $QCAL quantize --model "$T/m" --method gptq $Q --format gptq --out "$T/gptq" >/dev/null
$QCAL quantize --model "$T/m" --method gptq $Q --format compressed-tensors --out "$T/ct" >/dev/null
$QCAL quantize --model "$T/m" --method rtn --w-bits 8 --group-size -1 --calib "$T/calib.jsonl" \
  --nsamples 16 --seqlen 128 --format gptq --out "$T/rtn8" --quiet >/dev/null

# The same recipe written twice is byte-identical (determinism of the solver),
# at any thread count (the pool's chunks and the GEMM panels do not depend on it).
QCAL_THREADS=2 $QCAL quantize --model "$T/m" --method gptq $Q --format gptq --out "$T/gptq2" >/dev/null
cmp "$T/gptq/model.safetensors" "$T/gptq2/model.safetensors" ||
  fail "gptq output differs between 1 and 2 threads"

[ "$($QCAL inspect "$T/gptq" --json | json 'd["quantization"]["bits"]')" = 4 ] || fail "inspect bits"
$QCAL inspect "$T/ct" >/dev/null

E="--data $T/eval.jsonl --seqlen 128 --fp-model $T/m --json"
fp=$($QCAL eval --model "$T/m" $E)
rtn=$($QCAL eval --model "$T/rtn" $E)
gptq=$($QCAL eval --model "$T/gptq" $E)
ct=$($QCAL eval --model "$T/ct" $E)
rtn8=$($QCAL eval --model "$T/rtn8" $E)
echo "fp   $fp"; echo "rtn  $rtn"; echo "gptq $gptq"; echo "ct   $ct"; echo "rtn8 $rtn8"

[ "$(echo "$fp" | json 'd["kl"] == 0 and d["top1_agree"] == 1.0')" = True ] || fail "fp vs itself"
[ "$(echo "$fp" | json 'd["tokens"]')" = $((32 * 127)) ] || fail "token count"
python3 - "$rtn" "$gptq" "$ct" "$rtn8" <<'PY' || fail "quality ordering"
import json, math, sys
rtn, gptq, ct, rtn8 = (json.loads(a) for a in sys.argv[1:])
for d in (rtn, gptq, ct, rtn8):
    assert all(math.isfinite(d[k]) for k in ("ppl", "nll", "kl", "top1_agree")), d
assert gptq["kl"] < rtn["kl"], ("GPTQ should beat RTN", gptq["kl"], rtn["kl"])
assert abs(ct["kl"] - gptq["kl"]) < 1e-6, ("same solver, two formats", ct["kl"], gptq["kl"])
assert rtn8["kl"] < 0.01 * rtn["kl"] and rtn8["top1_agree"] > 0.97, ("8-bit near-lossless", rtn8)
PY

# Errors a user meets: each exits 2 with a message naming the problem, and
# leaves nothing behind.
expect_err() {  # expect_err "words" cmd...
  local words=$1; shift
  set +e; out=$("$@" 2>&1); rc=$?; set -e
  [ $rc -eq 2 ] || fail "expected exit 2 from: $* (got $rc: $out)"
  echo "$out" | grep -q -- "$words" || fail "expected '$words' in: $out"
}
expect_err "unknown flag --w-bitz" $QCAL quantize --model "$T/m" --w-bitz 4
expect_err "output exists" $QCAL quantize --model "$T/m" $Q --out "$T/gptq"
echo '{"input_ids": [1, 2,' > "$T/bad.jsonl"
expect_err "bad.jsonl" $QCAL eval --model "$T/m" --data "$T/bad.jsonl" --seqlen 8
echo '{"input_ids": [1, 2, 99999]}' > "$T/oov.jsonl"
expect_err "99999" $QCAL eval --model "$T/m" --data "$T/oov.jsonl" --seqlen 2
mkdir "$T/trunc" && cp "$T/m/config.json" "$T/trunc/"
head -c 1000 "$T/m/model.safetensors" > "$T/trunc/model.safetensors"
expect_err "model.safetensors" $QCAL eval --model "$T/trunc" --data "$T/eval.jsonl" --seqlen 128
expect_err "w-bits\|bits" $QCAL quantize --model "$T/m" $Q --w-bits 5 --out "$T/x5"
expect_err "4 and 8\|4 or 8" $QCAL quantize --model "$T/m" --method rtn --w-bits 2 \
  --calib "$T/calib.jsonl" --nsamples 4 --seqlen 128 --format compressed-tensors --out "$T/x2" --quiet
[ ! -e "$T/x5" ] && [ ! -e "$T/x2" ] || fail "a failed quantize left an output directory"

# A failed gate exits 3, names what it exceeded, and keeps the output and report (as the
# service keeps a failed job's output); a passed gate exits 0.
set +e
out=$($QCAL quantize --model "$T/m" --method rtn $Q --format gptq --out "$T/gated" \
  --eval-data "$T/eval.jsonl" --eval-nsamples 4 --max-kl 0 --report "$T/gated.json" 2>&1)
rc=$?
set -e
[ $rc -eq 3 ] || fail "a failed gate exited $rc, expected 3: $out"
echo "$out" | grep -q "the gate failed: kl .* > max 0" || fail "the gate's message: $out"
[ -f "$T/gated/model.safetensors" ] && [ -f "$T/gated.json" ] || fail "a failed gate lost the output"
[ "$(json 'd["eval"]["gate"]["passed"]' <"$T/gated.json")" = False ] || fail "report: gate passed"
$QCAL quantize --model "$T/m" --method rtn $Q --format gptq --out "$T/gated2" \
  --eval-data "$T/eval.jsonl" --eval-nsamples 4 --max-kl 10 >/dev/null || fail "a passed gate failed"
ls "$T" | grep -q partial && fail "a staging directory was left behind"
echo "e2e cli: 1 passed, 0 failed"

#!/usr/bin/env bash
# The embedded (single-process, no services) demo: installs the dependencies,
# builds, generates a small LLaMA-shaped model and token data, quantizes it
# with GPTQ (W4, group 128) and with RTN in-process, and evaluates both
# against the FP model. Everything stays under ./out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
QCAL=${QCAL_BUILD_DIR:-build}/api/qcal
D=out/demo
# Outputs of an earlier run: qcal replaces only directories it published
# (.qcal-output.json), and a run from before that marker existed has none.
rm -rf "$D/m" "$D/q-rtn" "$D/q-gptq"
mkdir -p "$D"

$QCAL synth --out "$D/m" --layers 4 --hidden 256 --heads 8 --kv-heads 4 --intermediate 688 \
  --vocab 512 --seed 1 --outlier-norm 4 --overwrite
$QCAL synth-data --model "$D/m" --tokens 32768 --seed 2 --out "$D/calib.jsonl"
$QCAL synth-data --model "$D/m" --tokens 16384 --seed 3 --out "$D/eval.jsonl"

for method in rtn gptq; do
  $QCAL quantize --model "$D/m" --method $method --w-bits 4 --group-size 128 \
    --calib "$D/calib.jsonl" --nsamples 64 --seqlen 256 --format gptq --out "$D/q-$method" \
    --overwrite --quiet
done
$QCAL inspect "$D/q-gptq"
echo
printf '%-6s %s\n' method "eval vs FP (W4 g128, 64 x 256 eval tokens)"
for method in rtn gptq; do
  printf '%-6s ' $method
  $QCAL eval --model "$D/q-$method" --data "$D/eval.jsonl" --seqlen 256 --fp-model "$D/m" --quiet
done
printf '%-6s ' fp
$QCAL eval --model "$D/m" --data "$D/eval.jsonl" --seqlen 256 --quiet

#!/usr/bin/env bash
# Peak memory of `qcal quantize` on a model whose fp32 weights exceed 1.5 GB.
# Usage: bench/memory_bound.sh path/to/qcal [workdir]
# Prints the model size and, for RTN and GPTQ, wall time and peak RSS
# (/usr/bin/time -v "Maximum resident set size").
set -euo pipefail
QCAL=${1:?usage: memory_bound.sh path/to/qcal [workdir]}
W=${2:-$(mktemp -d)}
mkdir -p "$W"
# 8 layers x (4·2048² + 3·2048·5632) + 2 x 2048·4096 ≈ 427 M parameters ≈ 1.71 GB fp32.
$QCAL synth --out "$W/big" --layers 8 --hidden 2048 --heads 16 --kv-heads 16 --intermediate 5632 \
  --vocab 4096 --seed 1 --overwrite >/dev/null
$QCAL synth-data --model "$W/big" --tokens 16384 --seed 2 --out "$W/calib.jsonl" >/dev/null
size=$(du -b "$W/big/model.safetensors" | cut -f1)
printf '%-8s %12s %10s %14s\n' method weights_MB wall_s peak_rss_MB
for method in rtn gptq; do
  /usr/bin/time -v "$QCAL" quantize --model "$W/big" --method $method --w-bits 4 --group-size 128 \
    --calib "$W/calib.jsonl" --nsamples 32 --seqlen 256 --format gptq --out "$W/q-$method" \
    --overwrite --quiet >/dev/null 2>"$W/time-$method.txt"
  rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$W/time-$method.txt")
  wall=$(awk '/Elapsed \(wall clock\)/ {print $NF}' "$W/time-$method.txt")
  printf '%-8s %12.0f %10s %14.0f\n' $method $((size / 1000000)) "$wall" $((rss / 1024))
done

#!/usr/bin/env bash
# Peak memory and time of `qcal eval` (the streaming evaluator, issue #10) on a
# generated model with a 32000-token vocabulary, for a GPTQ output, a native
# W4A8KV8 output and the same with IntactKV, each against the FP model.
# Usage: bench/eval_memory.sh path/to/qcal [path/to/old/qcal [workdir]]
# With a second qcal (e.g. a build of an earlier commit) both are run on the same
# files, each twice. Prints wall / user seconds and peak RSS (/usr/bin/time).
set -euo pipefail
QCAL=${1:?usage: eval_memory.sh path/to/qcal [path/to/old/qcal [workdir]]}
OLD=${2:-}
W=${3:-$(mktemp -d)}
mkdir -p "$W"
# 4 layers x (4·1024² + 3·1024·2816) + 2 x 32000·1024 ≈ 117 M parameters, bf16.
$QCAL synth --out "$W/m" --layers 4 --hidden 1024 --heads 16 --kv-heads 16 --intermediate 2816 \
  --vocab 32000 --dtype bfloat16 --seed 1 --overwrite >/dev/null
$QCAL synth-data --model "$W/m" --tokens 40960 --seed 2 --out "$W/eval.jsonl" >/dev/null
$QCAL synth-data --model "$W/m" --tokens 16384 --seed 3 --out "$W/calib.jsonl" >/dev/null
q() { $QCAL quantize --model "$W/m" --calib "$W/calib.jsonl" --nsamples 8 --seqlen 512 \
  --overwrite --quiet "$@" >/dev/null; }
[ -d "$W/q_gptq" ] || q --method rtn --w-bits 4 --group-size 128 --format gptq --out "$W/q_gptq"
[ -d "$W/q_native" ] || q --method rtn --w-bits 4 --a-bits 8 --kv-bits 8 --out "$W/q_native"
[ -d "$W/q_intact" ] || q --method rtn --w-bits 4 --a-bits 8 --kv-bits 8 --intactkv \
  --out "$W/q_intact"
# IntactKV evaluates sequences that begin with BOS (id 1): the same tokens as
# 512-token windows with the first one replaced.
python3 - "$W" <<'EOF'
import json, struct, sys
w = sys.argv[1]
toks = [t for line in open(w + "/eval.jsonl") for t in json.loads(line)["input_ids"]]
with open(w + "/eval_bos.u32", "wb") as out:
    for i in range(0, len(toks) - 511, 512):
        out.write(struct.pack("<512I", 1, *toks[i + 1:i + 512]))
EOF
printf '%-5s %-9s %8s %8s %12s %10s %10s\n' qcal model wall_s user_s peak_rss_MiB ppl kl
for model in q_gptq q_native q_intact; do
  data=$W/eval.jsonl
  [ $model = q_intact ] && data=$W/eval_bos.u32
  for bin in new ${OLD:+old}; do
    exe=$QCAL
    [ $bin = old ] && exe=$OLD
    for run in 1 2; do
      /usr/bin/time -f '%e %U %M' -o "$W/time.txt" "$exe" eval --model "$W/$model" \
        --fp-model "$W/m" --data "$data" --seqlen 512 --nsamples 16 --json >"$W/out.json"
      read -r wall user rss <"$W/time.txt"
      python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%s %s" % (r["ppl"], r["kl"]))' \
        "$W/out.json" | {
        read -r ppl kl
        printf '%-5s %-9s %8s %8s %12.0f %10.4f %10.6f\n' $bin $model "$wall" "$user" \
          $((rss / 1024)) "$ppl" "$kl"
      }
    done
  done
done

# shellcheck shell=bash disable=SC2034 # sourced: the variables are the callers'
# Sourced by deploy/service-demo.sh and deploy/embedded-demo.sh (not run on
# its own): the demo's model, data, budget, gate and recipes, and the
# before/after table, so that both demos run and print the same thing.
#
# The model: the shared real model ../shared/models/babyllama-tok361 (a llama2.c
# TinyStories model, 5 layers, hidden 128) when the ../shared/models directory
# exists next to the checkout, else the committed fixture tests/fixtures/
# grammar-tiny (4 layers, trained by qcal train-lm) with its token data.
# QCAL_DEMO_MODEL=shared|fixture picks one (default auto).
#
# Budget (to stay a few minutes on 2 busy cores): 32 calibration sequences,
# FlatQuant 8 epochs per block (the recipe's default is 15), CBQ 4 epochs per
# window (default 20); more of either lowers the error of those rows
# (docs/RESULTS.md). The gate, the same for every job: ppl / FP ppl − 1 ≤ 0.15
# and KL ≤ 0.15 nats on the shared model, ≤ 0.02 and ≤ 0.01 on the fixture.
# QCAL_DEMO_NSAMPLES, QCAL_DEMO_EPOCHS, QCAL_DEMO_CBQ_EPOCHS,
# QCAL_DEMO_MAX_PPL_INCREASE and QCAL_DEMO_MAX_KL change them.
#
# Defines: MODEL CALIB EVAL SEQLEN DATA_ROOT ABOUT NSAMPLES MAX_PPL MAX_KL (paths
# absolute), DEMO_JOBS ("name|recipe flags", one per row), DEMO_GATE (the gate
# flags) and demo_table DIR NAME... (prints the table from DIR/job-NAME.json,
# each a finished service job or a `qcal quantize --json` report).

NSAMPLES=${QCAL_DEMO_NSAMPLES:-32}
DEMO_EPOCHS=${QCAL_DEMO_EPOCHS:-8}
DEMO_CBQ_EPOCHS=${QCAL_DEMO_CBQ_EPOCHS:-4}

demo_pick_model() {
  local shared=../shared/models/babyllama-tok361 which
  case "${QCAL_DEMO_MODEL:-auto}" in
    auto) if [ -d ../shared/models ]; then which=shared; else which=fixture; fi ;;
    shared | fixture) which=$QCAL_DEMO_MODEL ;;
    *)
      echo "demo: QCAL_DEMO_MODEL must be auto, shared or fixture (got '$QCAL_DEMO_MODEL')" >&2
      return 2
      ;;
  esac
  if [ "$which" = shared ]; then
    [ -f "$shared/config.json" ] || {
      echo "demo: ../shared/models exists but holds no babyllama-tok361/config.json" >&2
      return 1
    }
    MODEL=$(realpath "$shared")
    DATA_ROOT=$MODEL
    CALIB=$MODEL/samples_64x256.u32 EVAL=$MODEL/samples_32x256.u32 SEQLEN=256
    # A character-level model of 1M parameters loses much at A4/KV4: the gate
    # admits FlatQuant's result and stops the untransformed one.
    MAX_PPL=${QCAL_DEMO_MAX_PPL_INCREASE:-0.15} MAX_KL=${QCAL_DEMO_MAX_KL:-0.15}
    ABOUT="babyllama-tok361 from ../shared/models (llama2.c TinyStories, 5 layers, hidden 128, vocab 361); calib $NSAMPLES x 256 tokens of samples_64x256, eval 32 x 256 of samples_32x256"
  else
    MODEL=$(realpath tests/fixtures/grammar-tiny)
    DATA_ROOT=$(realpath tests/fixtures/grammar-data)
    CALIB=$DATA_ROOT/calib.u32 EVAL=$DATA_ROOT/eval.u32 SEQLEN=128
    # The grammar model quantizes more easily (RTN W4A4KV4: KL about 0.04).
    MAX_PPL=${QCAL_DEMO_MAX_PPL_INCREASE:-0.02} MAX_KL=${QCAL_DEMO_MAX_KL:-0.01}
    ABOUT="tests/fixtures/grammar-tiny, the committed fixture (qcal train-lm on the grammar corpus, 4 layers, hidden 128, vocab 256); calib $NSAMPLES x 128 tokens of grammar-data/calib.u32, eval 64 x 128 of eval.u32"
  fi
}
demo_pick_model || exit $?

# The rows. Weight-only GPTQ is the baseline that fits a GPTQ checkpoint; RTN
# W4A4KV4 shows what 4-bit activations and K/V cache do without a method; the
# last two are the seeds' combination: FlatQuant with IntactKV, and with CBQ.
DEMO_JOBS=(
  "gptq-w4|--method gptq --w-bits 4 --group-size -1 --format gptq"
  "rtn-w4a4kv4|--method rtn --w-bits 4 --a-bits 4 --kv-bits 4"
  "flatquant-intactkv|--transform flatquant --weight-solver gptq --w-bits 4 --a-bits 4 --kv-bits 4 --epochs $DEMO_EPOCHS --intactkv"
  "flatquant-cbq-intactkv|--transform flatquant --weight-solver gptq --reconstruction cbq --cbq-window 2 --cbq-overlap 1 --w-bits 4 --a-bits 4 --kv-bits 4 --epochs $DEMO_EPOCHS --cbq-epochs $DEMO_CBQ_EPOCHS --intactkv"
)
DEMO_GATE=(--max-ppl-increase "$MAX_PPL" --max-kl "$MAX_KL")

demo_table() {  # demo_table DIR NAME...
  python3 - "$ABOUT" "$MAX_PPL" "$MAX_KL" "$@" <<'EOF'
import json, sys
about, max_ppl, max_kl, d, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]

def recipe_name(r):
    t, s, c = r.get("transform", "none"), r.get("weight_solver", "rtn"), r.get("reconstruction", "none")
    parts = [] if t == "none" else [{"flatquant": "FlatQuant"}.get(t, t)]
    if c == "cbq":
        parts.append("CBQ(%d,%d)" % (r.get("cbq_window", 2), r.get("cbq_overlap", 1)))
    elif c != "none":
        parts.append(c)
    parts.append({"gptq": "GPTQ", "rtn": "RTN", "lora-rounding": "LoRA-Rnd"}.get(s, s))
    if r.get("intactkv"):
        parts.append("IntactKV")
    bits = "W%d" % r.get("w_bits", 16)
    if r.get("a_bits", 16) < 16:
        bits += "A%d" % r["a_bits"]
    if r.get("kv_bits", 16) < 16:
        bits += "KV%d" % r["kv_bits"]
    return " + ".join(parts) + " " + bits

def fmt(x, f, scale=1):
    return "-" if x is None else f % (scale * x)

rows = []
for n in names:
    j = json.load(open("%s/job-%s.json" % (d, n)))
    if "spec" in j:  # a finished service job (GET /v1/jobs/{id})
        tasks = (j.get("progress") or {}).get("tasks") or []
        rep, recipe, form = j.get("report") or {}, j["spec"].get("recipe") or {}, j["spec"]["output"]["format"]
        # "auto" as the assemble task resolved it
        form = next((t["params"]["format"] for t in tasks if t.get("type") == "assemble"
                     and "format" in (t.get("params") or {})), form)
        secs = ["%.0f" % sum(t.get("seconds") or 0 for t in tasks),
                "%.0f" % (j["updated_at"] - j["created_at"])]
        service = True
    else:  # qcal quantize --json
        rep, recipe, form = j.get("eval") or {}, j.get("recipe") or {}, j.get("format", "?")
        secs = ["%.0f" % j.get("seconds", 0)]
        service = False
    gate = rep.get("gate") or {}
    rows.append([recipe_name(recipe), form, fmt(rep.get("ppl"), "%.4f"), fmt(rep.get("fp_ppl"), "%.4f"),
                 fmt(gate.get("ppl_increase"), "%+.1f%%", 100), fmt(rep.get("kl"), "%.4f"),
                 fmt(rep.get("top1_agree"), "%.1f%%", 100),
                 {True: "passed", False: "FAILED"}.get(gate.get("passed"), "no report")] + secs)
head = ["recipe", "format", "ppl", "FP ppl", "ppl +", "KL", "top-1", "gate"]
head += ["task s", "wall s"] if service else ["time s"]
w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
line = lambda r: "  ".join(c.ljust(w[i]) if i in (0, 1, 7) else c.rjust(w[i]) for i, c in enumerate(r))
print("model: " + about)
print("gate (every job): ppl / FP ppl - 1 <= %s and mean KL(FP || quantized) <= %s nats per token" % (max_ppl, max_kl))
print(line(head))
print("  ".join("-" * x for x in w))
for r in rows:
    print(line(r))
print("top-1: eval tokens where the quantized model's most likely next token is the FP model's")
if service:
    print("task s: the job's task seconds summed over the workers; wall s: submitted to finished")
    print("(the jobs share the two workers, so a job also waits for the others' tasks)")
else:
    print("time s: the whole qcal quantize run, evaluation included")
EOF
}

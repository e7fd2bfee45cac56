#!/usr/bin/env bash
# The embedded demo (one process per job, no services): installs the
# dependencies, builds, and runs the service demo's jobs with `qcal quantize`
# in this process instead of through Redis, a coordinator and workers — the
# same model, data, budget, gate and recipes (deploy/demo-lib.sh): GPTQ W4,
# RTN W4A4KV4, FlatQuant W4A4KV4 + IntactKV, FlatQuant + CBQ(2,1) + IntactKV —
# each evaluated against the FP model on the eval set, then prints the same
# before/after table. The jobs run one after another, one compute thread each
# (QCAL_THREADS overrides). `qcal quantize` reports a gate it does not meet
# (the table's "gate" column) and still writes the checkpoint; the service
# fails such a job. Everything stays under ./out/demo.
#
#   bash deploy/embedded-demo.sh
#   QCAL_DEMO_MODEL=fixture bash deploy/embedded-demo.sh   # the committed fixture even so
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
QCAL=${QCAL_BUILD_DIR:-build}/api/qcal
export QCAL_THREADS=${QCAL_THREADS:-1}

# MODEL CALIB EVAL SEQLEN ABOUT NSAMPLES, DEMO_JOBS, DEMO_GATE, demo_table
. deploy/demo-lib.sh

D=out/demo
# Outputs of an earlier run (also the earlier demo's generated model): qcal
# replaces only directories it published (.qcal-output.json).
rm -rf "$D/m" "$D"/q-* "$D"/job-*.json "$D/table.txt"
mkdir -p "$D"
echo "embedded-demo: model $ABOUT"
T0=$SECONDS
for j in "${DEMO_JOBS[@]}"; do
  name=${j%%|*} flags=${j#*|}
  echo "embedded-demo: $name ($flags)"
  # shellcheck disable=SC2086 # the flags are words
  "$QCAL" quantize --model "$MODEL" --calib "$CALIB" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    $flags --eval-data "$EVAL" "${DEMO_GATE[@]}" --out "$D/q-$name" --overwrite --quiet --json \
    >"$D/job-$name.json"
done
echo
"$QCAL" inspect "$D/q-gptq-w4"
echo
demo_table "$D" "${DEMO_JOBS[@]%%|*}" | tee "$D/table.txt"
echo "embedded-demo: the whole demo took $((SECONDS - T0)) s; each report in $D/job-*.json, the table in $D/table.txt"

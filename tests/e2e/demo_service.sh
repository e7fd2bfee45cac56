#!/usr/bin/env bash
# labels: integration
# The README's demo (deploy/service-demo.sh) keeps working: on the committed
# fixture with a tiny budget (8 calibration sequences, 1 FlatQuant and 1 CBQ
# epoch) and a KL bound of 0.01, it runs its four jobs through a private
# redis-server, coordinator and two workers, exits 0 although a gate fails,
# prints the table with the values of the jobs' reports, applies the gate as
# stated, and leaves no process behind.
set -euo pipefail
QCAL=$(realpath "${1:?usage: demo_service.sh qcal qcal-coordinator qcal-worker}")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=$(dirname "$(dirname "$QCAL")")
[ -x "$BUILD/coordinator/qcal-coordinator" ] && [ -x "$BUILD/worker/qcal-worker" ] ||
  { echo "FAIL: no qcal-coordinator / qcal-worker next to $QCAL" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "SKIP: redis-server missing" >&2; exit 77; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

rc=0
QCAL_BUILD_DIR=$BUILD QCAL_DEMO_OUT=$T/out QCAL_DEMO_MODEL=fixture QCAL_DEMO_NSAMPLES=8 \
  QCAL_DEMO_EPOCHS=1 QCAL_DEMO_CBQ_EPOCHS=1 QCAL_DEMO_MAX_KL=0.01 QCAL_DEMO_MAX_PPL_INCREASE=0.15 \
  bash "$REPO/deploy/service-demo.sh" >"$T/log" 2>&1 || rc=$?
[ $rc -eq 0 ] || { cat "$T/log" >&2; fail "the demo exited $rc"; }
grep -q '^service-demo: model tests/fixtures/grammar-tiny, the committed fixture' "$T/log" ||
  fail "the demo does not say which model it ran"
grep -q '^service-demo: stopped everything it started$' "$T/log" || fail "no stop line"
# Every process it started named the output directory in its flags.
if pgrep -f -- "--allow-write $T/out" >/dev/null; then fail "processes left: $(pgrep -af -- "--allow-write $T/out")"; fi

python3 - "$T/out" <<'EOF' || { cat "$T/log" >&2; exit 1; }
import json, math, sys
d = sys.argv[1]
names = ["gptq-w4", "rtn-w4a4kv4", "flatquant-intactkv", "flatquant-cbq-intactkv"]
recipes = ["GPTQ W4", "RTN W4A4KV4", "FlatQuant + GPTQ + IntactKV W4A4KV4",
           "FlatQuant + CBQ(2,1) + GPTQ + IntactKV W4A4KV4"]
formats = ["gptq", "native", "native", "native"]
table = open(d + "/table.txt").read().splitlines()
rows = [l for l in table if any(l.startswith(r + "  ") for r in recipes)]
assert len(rows) == 4, "table rows: %r" % table
fp = []
for n, recipe, form, row in zip(names, recipes, formats, rows):
    j = json.load(open("%s/job-%s.json" % (d, n)))
    r, g = j["report"], j["report"]["gate"]
    cells = row[len(recipe):].split()
    assert cells[0] == form, (n, cells)
    for k in ("ppl", "fp_ppl", "kl", "top1_agree"):
        assert isinstance(r[k], float) and math.isfinite(r[k]), (n, k, r[k])
    assert r["ppl"] > 1 and r["kl"] >= 0 and 0 < r["top1_agree"] <= 1, (n, r)
    fp.append(r["fp_ppl"])
    # The table shows the report's values.
    assert cells[1] == "%.4f" % r["ppl"] and cells[2] == "%.4f" % r["fp_ppl"], (n, cells, r)
    assert cells[4] == "%.4f" % r["kl"] and cells[5] == "%.1f%%" % (100 * r["top1_agree"]), (n, cells)
    # The gate as stated, and the job's state with it.
    want = r["ppl"] / r["fp_ppl"] - 1 <= 0.15 and r["kl"] <= 0.01
    assert g["passed"] == want and cells[6] == ("passed" if want else "FAILED"), (n, g, cells)
    assert j["state"] == ("succeeded" if want else "failed"), (n, j["state"])
kl = {n: json.load(open("%s/job-%s.json" % (d, n)))["report"]["kl"] for n in names}
# The fixture's FP perplexity on eval.u32 (tests/fixtures/README.md), the same for every job.
assert all(abs(x - 5.0766) < 1e-3 for x in fp), fp
# Weight-only W4 is far gentler than W4A4KV4: the first passes the KL bound, RTN W4A4KV4 does not.
assert kl["gptq-w4"] < 0.01 < kl["rtn-w4a4kv4"], kl
print("demo_service: ok", {n: round(kl[n], 4) for n in names})
EOF

#!/usr/bin/env bash
# Issue #10 "done means", the 7B-wide service benchmark (not in CI): FlatQuant
# W4A4KV4 with RTN weights submitted through the service (redis-server,
# qcal-coordinator, qcal-worker processes on loopback: tests/e2e/lib/service.bash)
# on generated models with LLaMA-2-7B-wide blocks (hidden 4096, intermediate
# 11008, 32 heads, vocab 32000, bf16), 2 and 8 layers. Three runs:
#   L=2, 1 worker    the block tasks one after another
#   L=2, 2 workers   the block tasks side by side (FlatQuant's transform tasks
#                    read FP captures: independent per block; --mode parallel)
#   L=8, 2 workers   the worker's memory against L=2
# and a table per run: each worker's peak RSS (VmHWM of /proc/<pid>/status at the
# end) and its largest sampled RSS (every 0.5 s) while it ran each task type, so
# the assemble task's memory shows apart from the block tasks'; the span of the
# transform (flatquant-LLLL) tasks from the job store's task records (first
# started_at to last finished_at) and each one's seconds. Then the checks:
#   - a worker's peak RSS over the block tasks at L=8 within ±10% of L=2
#   - the transform span with 2 workers ≤ 0.6× the span with 1 worker
# (reported PASS / MISS; the exit status is 0 unless something failed to run).
#
#   bench/service_7b.sh [BUILD_DIR]              (default build)
# Knobs (environment; the defaults are the 7B shape):
#   QCAL_7B_HIDDEN 4096  QCAL_7B_INTERMEDIATE 11008  QCAL_7B_HEADS 32  QCAL_7B_VOCAB 32000
#   QCAL_7B_LAYERS "2 8"   the two depths (the first is also the 1-vs-2-worker one)
#   QCAL_7B_NSAMPLES 4  QCAL_7B_SEQLEN 64  QCAL_7B_EPOCHS 1  QCAL_7B_CALI_BSZ 2
#   QCAL_THREADS 1 (each worker)
#   TMPDIR: the models (1.3 + 3.6 GB, bf16) and one run's artifacts and output
#   (≤ 3 GB; each run's are removed once measured): ~8 GB free at the 7B shape
# A rehearsal at a small width:
#   QCAL_7B_HIDDEN 512 QCAL_7B_INTERMEDIATE 1376 QCAL_7B_HEADS 8 QCAL_7B_VOCAB 4096 bench/service_7b.sh
# Results are written to $QCAL_7B_RESULTS (default bench-service_7b.txt) too.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
HIDDEN=${QCAL_7B_HIDDEN:-4096}
INTER=${QCAL_7B_INTERMEDIATE:-11008}
HEADS=${QCAL_7B_HEADS:-32}
VOCAB=${QCAL_7B_VOCAB:-32000}
read -r -a LAYERS <<<"${QCAL_7B_LAYERS:-2 8}"
NSAMPLES=${QCAL_7B_NSAMPLES:-4}
SEQLEN=${QCAL_7B_SEQLEN:-64}
EPOCHS=${QCAL_7B_EPOCHS:-1}
CALI_BSZ=${QCAL_7B_CALI_BSZ:-2}
RESULTS=$(realpath -m "${QCAL_7B_RESULTS:-bench-service_7b.txt}")
[ ${#LAYERS[@]} -eq 2 ] || { echo "service_7b: QCAL_7B_LAYERS needs two depths" >&2; exit 1; }
command -v redis-cli >/dev/null || { echo "service_7b: redis-cli missing" >&2; exit 1; }
source tests/e2e/lib/service.bash "$B/api/qcal"
: >"$RESULTS"
out() { echo "$*" | tee -a "$RESULTS"; }

out "# bench/service_7b.sh $(date -u +%FT%TZ) on $(hostname): $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
out "# hidden $HIDDEN intermediate $INTER heads $HEADS vocab $VOCAB bf16; FlatQuant W4A4KV4, rtn weights,"
out "# $NSAMPLES x $SEQLEN calibration tokens, epochs $EPOCHS, cali-bsz $CALI_BSZ; QCAL_THREADS=$QCAL_THREADS per worker"
for L in "${LAYERS[@]}"; do
  t=$SECONDS
  "$QCAL" synth --out "$T/m$L" --layers "$L" --hidden "$HIDDEN" --intermediate "$INTER" \
    --heads "$HEADS" --vocab "$VOCAB" --dtype bfloat16 --seed 1 --outlier-norm 4 >/dev/null
  note "model m$L: $(du -sh "$T/m$L" | cut -f1) in $((SECONDS - t)) s"
done
"$QCAL" synth-data --vocab "$VOCAB" --tokens $((NSAMPLES * SEQLEN)) --seed 1 --out "$T/calib.jsonl" >/dev/null
"$QCAL" synth-data --vocab "$VOCAB" --tokens $((2 * SEQLEN)) --seed 2 --out "$T/eval.jsonl" >/dev/null

start_redis
start_coordinator

# Samples every worker's RSS with the task it runs until the job ends:
# "elapsed_s worker task_type task_id rss_kb hwm_kb" lines.
sample() {  # sample JOB OUT NAME=PID...
  python3 - "$URL" "$TOKEN" "$@" <<'PY'
import json, sys, time, urllib.request
url, token, job, out = sys.argv[1:5]
pids = dict(a.split("=") for a in sys.argv[5:])
def status(pid):
    d = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                d[k] = int(v.split()[0])
    except OSError:
        pass
    return d
t0 = time.time()
with open(out, "w") as f:
    while True:
        try:
            req = urllib.request.Request(f"{url}/v1/jobs/{job}", headers={"Authorization": f"Bearer {token}"})
            d = json.load(urllib.request.urlopen(req, timeout=10))
        except Exception:
            time.sleep(0.5)
            continue
        running = {t["worker"]: t for t in d["progress"]["tasks"] if t["state"] == "running"}
        for name, pid in pids.items():
            s = status(pid)
            t = running.get(name)
            f.write("%.1f %s %s %s %d %d\n" % (time.time() - t0, name, t["type"] if t else "idle",
                    t["id"] if t else "-", s.get("VmRSS", 0), s.get("VmHWM", 0)))
        f.flush()
        if d["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
PY
}

# One run: L layers, N workers. Writes $T/run-L-N.json (the summary).
run() {
  local L=$1 N=$2 names=() pids=() i id t
  for i in $(seq "$N"); do
    start_worker "w$i"
    names+=("w$i")
    pids+=("w$i=${WPID[w$i]}")
  done
  t=$SECONDS
  id=$(q submit --model "$T/m$L" --calib "$T/calib.jsonl" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
    --eval-data "$T/eval.jsonl" --eval-nsamples 2 --eval-seqlen "$SEQLEN" \
    --transform flatquant --weight-solver rtn --w-bits 4 --a-bits 4 --kv-bits 4 \
    --epochs "$EPOCHS" --cali-bsz "$CALI_BSZ" --mode parallel --out "$T/out-$L-$N")
  note "L=$L N=$N: job $id"
  sample "$id" "$T/samples-$L-$N.txt" "${pids[@]}" &
  WPID[sampler]=$!
  wait_job "$id" succeeded 7200
  wait "${WPID[sampler]}" || true
  unset "WPID[sampler]"
  note "L=$L N=$N: succeeded in $((SECONDS - t)) s"
  # Peak RSS of each worker over its whole life (before stopping it).
  local hwm=()
  for i in "${names[@]}"; do
    hwm+=("$i=$(awk '/^VmHWM/ {print $2}' "/proc/${WPID[$i]}/status")")
  done
  # The task records: type, worker, started_at, finished_at (the job store's clock).
  job_json "$id" | pyj '"\n".join(t["id"] for t in d["progress"]["tasks"])' |
    while read -r task; do
      echo "$task $(redis-cli -p "$REDIS_PORT" --raw HMGET "qcal:task:$id:$task" type worker started_at finished_at | tr '\n' ' ')"
    done >"$T/tasks-$L-$N.txt"
  for i in "${names[@]}"; do kill_worker "$i"; done
  python3 - "$L" "$N" "$T/tasks-$L-$N.txt" "$T/samples-$L-$N.txt" "${hwm[@]}" >"$T/run-$L-$N.json" <<'PY'
import json, sys
L, N, tasks_f, samples_f = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
hwm = {a.split("=")[0]: int(a.split("=")[1]) for a in sys.argv[5:]}
tasks = []
for line in open(tasks_f):
    tid, typ, worker, s, f = line.split()
    tasks.append({"id": tid, "type": typ, "worker": worker, "start": float(s), "end": float(f)})
tr = [t for t in tasks if t["type"] == "transform"]
assert len(tr) == L, tr
span = max(t["end"] for t in tr) - min(t["start"] for t in tr)
# Largest sampled RSS per worker and task type.
rss = {}
for line in open(samples_f):
    _, w, typ, _, r, _ = line.split()
    if typ != "idle":
        rss.setdefault(w, {})
        rss[w][typ] = max(rss[w].get(typ, 0), int(r))
job = min(t["start"] for t in tasks), max(t["end"] for t in tasks)
print(json.dumps({"L": L, "N": N, "span": span, "job_s": job[1] - job[0],
                  "transform_s": {t["id"]: round(t["end"] - t["start"], 1) for t in tr},
                  "transform_workers": {t["id"]: t["worker"] for t in tr},
                  "hwm_kb": hwm, "rss_kb": rss,
                  "task_s": {t["id"]: round(t["end"] - t["start"], 1) for t in tasks}}))
PY
  rm -rf "${T:?}/out-$L-$N" "${STORE:?}/jobs/$id"  # disk: keep one run's at a time
}

L1=${LAYERS[0]} L2=${LAYERS[1]}
run "$L1" 1
run "$L1" 2
rm -rf "${T:?}/m$L1"
run "$L2" 2

python3 - "$T" "$L1" "$L2" <<'PY' | tee -a "$RESULTS"
import json, sys
T, L1, L2 = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {k: json.load(open(f"{T}/run-{k}.json")) for k in (f"{L1}-1", f"{L1}-2", f"{L2}-2")}
mb = lambda kb: kb / 1024
block = ("embed", "capture", "transform", "quantize")
print()
print("%-7s %-7s %-6s %9s %9s %10s %12s %11s %11s %12s %8s %17s" % ("layers", "workers", "worker",
      "VmHWM_MB", "blocks_MB", "capture_MB", "transform_MB", "quantize_MB", "assemble_MB",
      "validate_MB", "job_s", "transform_span_s"))
opt = lambda rs, t: "%.0f" % mb(rs[t]) if t in rs else "-"
peak_blocks = {}
for k, r in runs.items():
    for w in sorted(r["hwm_kb"]):
        rs = r["rss_kb"].get(w, {})
        b = max([rs.get(t, 0) for t in block])
        peak_blocks.setdefault(k, []).append(b)
        print("%-7d %-7d %-6s %9.0f %9.0f %10s %12s %11s %11s %12s %8.0f %17.1f" % (r["L"], r["N"], w,
              mb(r["hwm_kb"][w]), mb(b), opt(rs, "capture"), opt(rs, "transform"),
              opt(rs, "quantize"), opt(rs, "assemble"), opt(rs, "validate"), r["job_s"], r["span"]))
print()
for k, r in runs.items():
    print("L=%d N=%d transform tasks (s, worker): %s" % (r["L"], r["N"], ", ".join(
        "%s %.1f %s" % (t, s, r["transform_workers"][t]) for t, s in sorted(r["transform_s"].items()))))
    print("L=%d N=%d every task (s): %s" % (r["L"], r["N"], " ".join("%s %.1f" % kv for kv in r["task_s"].items())))
print()
a, b = max(peak_blocks[f"{L1}-2"]), max(peak_blocks[f"{L2}-2"])
ratio = b / a
print("worker peak RSS over the block tasks, L=%s vs L=%s (2 workers): %.0f vs %.0f MB, ratio %.3f: %s (±10%%)"
      % (L2, L1, mb(b), mb(a), ratio, "PASS" if abs(ratio - 1) <= 0.10 else "MISS"))
h1 = max(runs[f"{L1}-2"]["hwm_kb"].values())
h2 = max(runs[f"{L2}-2"]["hwm_kb"].values())
print("worker VmHWM (whole life, assemble and validate included), L=%s vs L=%s: %.0f vs %.0f MB, ratio %.3f: %s (±10%%)"
      % (L2, L1, mb(h2), mb(h1), h2 / h1, "PASS" if abs(h2 / h1 - 1) <= 0.10 else "MISS"))
s1, s2 = runs[f"{L1}-1"]["span"], runs[f"{L1}-2"]["span"]
print("transform span, L=%s: 2 workers %.1f s vs 1 worker %.1f s, ratio %.3f: %s (≤ 0.6)"
      % (L1, s2, s1, s2 / s1, "PASS" if s2 / s1 <= 0.6 else "MISS"))
per_block = sum(runs[f"{L1}-1"]["transform_s"].values()) / len(runs[f"{L1}-1"]["transform_s"])
print("per-block transform time (1 worker, L=%s): %.1f s" % (L1, per_block))
PY
passed "results in $RESULTS"

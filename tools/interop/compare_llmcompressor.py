#!/usr/bin/env python3
"""qcal's GPTQ against llm-compressor's on the same data and settings (issue #14).

    tools/interop/compare_llmcompressor.py [--qcal build/api/qcal] [--venv build/llmc-venv]
        [--babyllama DIR] [--rows all|NAME,...] [--out docs/RESULTS.md] [--json-out FILE]

Each row quantizes one model at one setting with every contender, then scores
each output with the same evaluator, `qcal eval --fp-model FP --json` (ppl on the
held-out tokens and mean KL(FP ‖ quantized) per token):

- *qcal*: `qcal quantize --method gptq` with its defaults (act-order with static
  groups since issue #14: columns by descending diag(H), group parameters fixed on
  the original columns, llm-compressor's default actorder "static"; full symmetric
  grid);
- *qcal + mse-clip*: the same with `--mse-clip`, qcal's clip search of every
  group's range, each column's error weighted by its Hessian diagonal H_cc
  (llm-compressor's default observer is plain min-max);
- *qcal no act-order*: `--no-act-order --no-static-groups`, qcal's defaults before
  issue #14 (group parameters from the error-updated columns);
- *qcal old grid*: the same with `--w-grid narrow`, the symmetric scale
  absmax/(2^(b−1)−1) qcal used before issue #14 (what the grid moved);
- *llm-compressor*: `GPTQModifier` (llmcompressor 0.14.0.1, compressed-tensors
  0.19.0, its default actorder "static"), through tools/interop/llmc_quantize.py
  in a venv of its own (tools/interop/requirements-llmcompressor.txt).

Shared settings: symmetric int weights, damping 0.01 of mean diag(H), block size
128, the same calibration sequences (the first N windows of the .u32 stream, one
sequence per batch), 2 threads (QCAL_THREADS=2; torch.set_num_threads(2)).
Time is the wall time of the whole quantize process (llm-compressor: also its
oneshot() call alone); peak RSS is the process's maximum resident set (wait4).

The table goes between `<!-- make_results: section llmc -->` markers of --out
(tools/make_results.py's splice: the rest of the page is kept).
Exit 77 when PyPI is unreachable and the venv is not there yet.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import pyenv  # noqa: E402
from make_results import splice  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures")
GRAMMAR = (os.path.join(FIX, "grammar-data", "calib.u32"), os.path.join(FIX, "grammar-data", "eval.u32"),
           128, 64)

# name, model dir (None: --babyllama), (calib, eval, seqlen, nsamples), bits, group size
def row_specs(babyllama):
    rows = []
    for fx in ("grammar-tiny", "grammar-tiny-outlier"):
        for bits, gs in ((4, 128), (4, -1)):
            rows.append((fx, os.path.join(FIX, fx), GRAMMAR, bits, gs))
    if babyllama:
        data = (os.path.join(babyllama, "samples_64x256.u32"),
                os.path.join(babyllama, "samples_32x256.u32"), 256, 64)
        for bits, gs in ((4, -1), (4, 32)):
            rows.append(("babyllama-tok361", babyllama, data, bits, gs))
    return rows


CONTENDERS = [
    ("qcal", []),
    ("qcal + mse-clip", ["--mse-clip"]),
    ("qcal no act-order", ["--no-act-order", "--no-static-groups"]),
    ("qcal old grid", ["--w-grid", "narrow", "--no-act-order", "--no-static-groups"]),
    ("qcal narrow + mse-clip", ["--w-grid", "narrow", "--mse-clip"]),
    ("llm-compressor", None),
]


def run_measured(cmd, env=None):
    """Runs cmd; returns (rc, stdout, stderr, wall seconds, peak RSS in MiB, CPU seconds).
    CPU seconds (user + system of the process and its threads) are the stable
    measure on a shared machine, where wall time depends on the other load."""
    t0 = time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode(), err.read().decode(), wall,
                ru.ru_maxrss / 1024.0, ru.ru_utime + ru.ru_stime)


def last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def default_babyllama():
    for base in (os.path.join(ROOT, "..", "shared"), os.path.join(ROOT, "..", "..", "shared")):
        d = os.path.join(base, "models", "babyllama-tok361")
        if os.path.exists(os.path.join(d, "model.safetensors")):
            return os.path.abspath(d)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qcal", default=os.path.join(ROOT, "build", "api", "qcal"))
    ap.add_argument("--venv", default=None, help="default: <build dir of --qcal>/llmc-venv")
    ap.add_argument("--requirements", default=os.path.join(HERE, "requirements-llmcompressor.txt"))
    ap.add_argument("--babyllama", default=default_babyllama())
    ap.add_argument("--rows", default="all", help="all, or model names to keep (comma-separated)")
    ap.add_argument("--contenders", default=",".join(c[0] for c in CONTENDERS))
    # No W3 rows: qcal writes compressed-tensors for 4 and 8 bits only, and llm-compressor's
    # 3-bit pack-quantized (dense cross-word packing) is not read by qcal eval, the common
    # evaluator here.
    ap.add_argument("--bits", default="4", help="weight bit widths of the rows to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table, do not splice it")
    ap.add_argument("--json-out", default=os.path.join(tempfile.gettempdir(), "qcal_llmc.json"))
    ap.add_argument("--merge", default=None,
                    help="a --json-out of an earlier run: its results are kept where this run "
                         "has none for the same model, setting and contender")
    a = ap.parse_args()
    qcal = os.path.abspath(a.qcal)
    venv = a.venv or os.path.join(os.path.dirname(os.path.dirname(qcal)), "llmc-venv")
    want = set(a.contenders.split(","))
    py = pyenv.ensure_venv(venv, a.requirements) if "llm-compressor" in want else None

    env = dict(os.environ, QCAL_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    tmp = tempfile.mkdtemp(prefix="qcal_llmc_")
    results = []
    try:
        for name, model, (calib, evald, seqlen, nsamples), bits, gs in row_specs(a.babyllama):
            if a.rows != "all" and name not in a.rows.split(","):
                continue
            if str(bits) not in a.bits.split(","):
                continue
            setting = f"W{bits} " + (f"g{gs}" if gs > 0 else "per channel")
            fp = None
            for who, flags in CONTENDERS:
                if who not in want:
                    continue
                out = os.path.join(tmp, "q")
                shutil.rmtree(out, ignore_errors=True)
                r = {"model": name, "setting": setting, "who": who}
                if flags is not None:
                    cmd = [qcal, "quantize", "--model", model, "--calib", calib, "--out", out,
                           "--method", "gptq", "--w-bits", str(bits), "--group-size", str(gs),
                           "--seqlen", str(seqlen), "--nsamples", str(nsamples), "--damp",
                           "0.01", "--blocksize", "128", "--format",
                           # qcal writes compressed-tensors for 4 and 8 bits only (formats.md)
                           "compressed-tensors" if bits in (4, 8) else "gptq",
                           "--quiet", "--report", out + ".report.json"] + flags
                    rc, so, err, wall, rss, cpu = run_measured(cmd, env)
                    if rc == 0:
                        # Layer 0's q/k/v see the same Hessian (the FP embeddings) under
                        # every qcal contender: their GPTQ losses compare grids directly.
                        rep = json.load(open(out + ".report.json"))
                        l0 = rep["layers"][0]["proj_losses"]
                        r["l0_qkv_loss"] = sum(l0[f"self_attn.{p}_proj"] for p in "qkv")
                else:
                    cmd = [py, os.path.join(HERE, "llmc_quantize.py"), "--model", model, "--calib",
                           calib, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--bits",
                           str(bits), "--group-size", str(gs), "--damp", "0.01", "--block-size",
                           "128", "--threads", str(a.threads), "--out", out]
                    rc, so, err, wall, rss, cpu = run_measured(cmd, env)
                    if rc == 0:
                        r.update(json.loads(last_line(so)))
                r.update(seconds=round(wall, 2), cpu_seconds=round(cpu, 2), peak_rss_mb=round(rss, 1))
                if rc != 0:
                    r["error"] = last_line(err)
                else:
                    rc, so, err, _, _, _ = run_measured(
                        [qcal, "eval", "--model", out, "--data", evald, "--seqlen", str(seqlen),
                         "--fp-model", model, "--json"], env)
                    if rc != 0:
                        r["error"] = "qcal eval: " + last_line(err)
                    else:
                        ev = json.loads(so)
                        r.update(ppl=ev["ppl"], kl=ev["kl"], top1=ev.get("top1_agree"))
                        fp = ev.get("fp_ppl", fp)
                r["fp_ppl"] = fp
                results.append(r)
                print(f"{name:22s} {setting:14s} {who:24s} " +
                      (f"ppl {r['ppl']:.4f} kl {r['kl']:.6f} {r['seconds']:.1f} s "
                       f"({r['cpu_seconds']:.1f} s CPU) {r['peak_rss_mb']:.0f} MiB"
                       + (f" l0 qkv loss {r['l0_qkv_loss']:.4g}" if "l0_qkv_loss" in r else "")
                       if "ppl" in r else "ERROR " + r["error"]),
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.merge:
        have = {(r["model"], r["setting"], r["who"]) for r in results}
        old = [r for r in json.load(open(a.merge))
               if (r["model"], r["setting"], r["who"]) not in have]
        results = old + results
        order = [(n, f"W{b} " + (f"g{g}" if g > 0 else "per channel"))
                 for n, _, _, b, g in row_specs(a.babyllama)]
        results.sort(key=lambda r: order.index((r["model"], r["setting"]))
                     if (r["model"], r["setting"]) in order else len(order))
    with open(a.json_out, "w") as f:
        json.dump(results, f, indent=1)
    lines = table_lines(results, a)
    print("\n".join(lines))
    if not a.no_write:
        splice(a.out, {"llmc": lines})
    return 0


def table_lines(results, a):
    versions = next((r["versions"] for r in results if "versions" in r), {})
    vs = ", ".join(f"{k} {v}" for k, v in versions.items())
    lines = [
        "## qcal's GPTQ against llm-compressor's (issue #14)",
        "",
        "Produced by `tools/interop/compare_llmcompressor.py` (between these markers; rerun it "
        "rather than edit). Same calibration sequences for every contender (grammar fixtures: 64 "
        "× 128 tokens of `grammar-data/calib.u32`; babyllama: 64 × 256 of its "
        "`samples_64x256.u32`), symmetric int weights, damping 0.01, block size 128, "
        f"{a.threads} threads; every output scored by the same `qcal eval --fp-model` on the "
        "held-out tokens (grammar: `eval.u32`, 64 × 128; babyllama: `samples_32x256.u32`). "
        "KL = mean KL(FP ‖ quantized) per token, nats (lower is better). Time = CPU seconds "
        "(user + system) of the whole quantize process, wall seconds in parentheses "
        "(llm-compressor: also its `oneshot()` call alone, without Python and torch start-up); "
        "the machine was shared with other builds, so wall time is inflated and CPU time is "
        "the comparable measure. RSS = the process's peak resident set, MiB. *L0 qkv* = "
        "GPTQ loss ½tr(ΔW H ΔWᵀ) summed over layer 0's q/k/v (they see the same Hessian, "
        "from the FP embeddings, in every qcal run), *no act-order* / *old grid* (the same "
        "column order, so the grid alone). "
        f"Versions: {vs or 'llm-compressor not run'}.",
        "",
        "Contenders: **qcal** = `qcal quantize --method gptq` with its defaults (since issue "
        "#14: act-order with static groups, llm-compressor's default order: columns by "
        "descending diag(H), group parameters fixed on the original columns); **+mse** = the "
        "same with `--mse-clip` (each group's range by qcal's clip search, each column's "
        "error weighted by H_cc); **no act-order** = `--no-act-order --no-static-groups` "
        "(qcal's defaults before issue #14); **old grid** = the same with `--w-grid narrow` "
        "(scale absmax/(2^(b−1)−1), qcal's symmetric grid before issue #14); **narrow + mse** "
        "= the defaults with `--w-grid narrow --mse-clip`; **best / llmc** = the lowest KL of "
        "the qcal columns over llm-compressor's (≤ 1: qcal at least as good); **llmc** = "
        "llm-compressor `GPTQModifier` with its defaults (actorder static, memoryless min-max "
        "observer, fp32 scales).",
        "",
        "| model | setting | FP ppl | qcal ppl | KL | +mse ppl | KL | no act-order ppl "
        "| KL | old grid ppl | KL | narrow + mse ppl | KL | llmc ppl | KL | best / llmc "
        "| L0 qkv new/old grid | qcal time / RSS | llmc time / RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = []
    for r in results:
        k = (r["model"], r["setting"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        by = {r["who"]: r for r in results if (r["model"], r["setting"]) == k}
        fp = next((r["fp_ppl"] for r in by.values() if r.get("fp_ppl")), None)
        cells = [k[0], k[1], f"{fp:.4f}" if fp else ""]
        qcal_cols = ("qcal", "qcal + mse-clip", "qcal no act-order", "qcal old grid",
                     "qcal narrow + mse-clip")
        for who in qcal_cols + ("llm-compressor",):
            r = by.get(who)
            if r is None:
                cells += ["", ""]
            elif "ppl" in r:
                cells += [f"{r['ppl']:.4f}", f"{r['kl']:.6f}"]
            else:
                cells += [f"error: {r['error'][:60]}", ""]
        q = by.get("qcal", {})
        n = by.get("qcal no act-order", {})
        o = by.get("qcal old grid", {})
        l = by.get("llm-compressor", {})
        best = min((by[w]["kl"] for w in qcal_cols if "kl" in by.get(w, {})), default=None)
        cells.append(f"{best / l['kl']:.3f}" if best is not None and l.get("kl") else "")
        cells.append(f"{n['l0_qkv_loss'] / o['l0_qkv_loss']:.3f}"
                     if "l0_qkv_loss" in n and "l0_qkv_loss" in o else "")
        cells.append(f"{q['cpu_seconds']:.1f} ({q['seconds']:.0f}) / {q['peak_rss_mb']:.0f}"
                     if "ppl" in q else "")
        cells.append(f"{l['cpu_seconds']:.1f} ({l['seconds']:.0f}; oneshot {l.get('calib_seconds', 0):.0f})"
                     f" / {l['peak_rss_mb']:.0f}" if "ppl" in l else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())

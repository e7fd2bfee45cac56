#!/usr/bin/env python3
"""Produces docs/RESULTS.md: perplexity and KL of every calibration method on the
trained fixtures (tests/fixtures/grammar-tiny and its outlier-injected variant).

    tools/make_results.py [--qcal build/api/qcal] [--out docs/RESULTS.md] [--jobs 2]
                          [--sections 1,2,3,4]

Section 1: each cell is one `qcal quantize --method M --weight-solver S ...` followed
by `qcal eval --fp-model FP --json` on the held-out split. Section 2 (issue #5):
block reconstruction, CBQ windows and LoRA-Rounding, each with and without IntactKV,
run `--jobs` at a time (QCAL_THREADS=1 each). Uses only the standard library; runs
in a few minutes on 2 cores. Section 3: the attention-sink diagnostic of every
fixture, transforms combined with reconstruction, and IntactKV (+Cal) on the sink
fixture. Section 4 (issue #12): the real pretrained model ../shared/models/babyllama-tok361
at W4A4KV4, W4A16 and W2A16: RTN, GPTQ, QuaRot, SpinQuant, FlatQuant (RTN and GPTQ
weights), CBQ (and from GPTQ) and the composition FlatQuant + CBQ + IntactKV from GPTQ.

Each section sits between `<!-- make_results: section N -->` markers in the output;
a run replaces only the sections it was asked for and keeps the rest of the page
(the hand-written readings between them) as it is.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = [
    ("grammar-tiny", "trained on the grammar corpus"),
    ("grammar-tiny-outlier", "the same model with outlier channels injected (function-preserving)"),
]
# Section 2 also runs on the attention-sink fixture (train-lm --sink-init).
SINK_FIXTURE = ("grammar-sink", "trained on the same corpus from an initialization with a planted "
                "attention-sink circuit (`qcal train-lm --sink-init`): most heads put most of "
                "their attention on BOS, as in real LLMs")
CBQ_FIXTURES = FIXTURES + [SINK_FIXTURE]
METHODS = ["none", "smoothquant", "quarot", "spinquant", "flatquant"]
SOLVERS = ["rtn", "gptq"]
SETTINGS = [("W4A4KV4", ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4"]),
            ("W4A16", ["--w-bits", "4", "--a-bits", "16", "--kv-bits", "16"])]
# Per-method recipe flags (methods.md §3.3, §4.2, §5.6 settings scaled to the fixture).
EXTRA = {
    "none": [],
    "smoothquant": ["--alpha", "0.5"],
    "quarot": [],
    "spinquant": [],
    "flatquant": ["--epochs", "8"],
}


# Section 2 (issue #5): reconstruction recipes on the untransformed model.
CBQ_SETTINGS = [("W4A4KV4", ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4"]),
                ("W2A16 g64", ["--w-bits", "2", "--group-size", "64"]),
                ("W4A16", ["--w-bits", "4"])]
CBQ_ROWS = [("RTN, no reconstruction", ["--method", "rtn"]),
            ("per-block reconstruction", ["--weight-solver", "rtn", "--reconstruction", "block"]),
            ("CBQ windows (2, overlap 1)", ["--weight-solver", "rtn", "--reconstruction", "cbq"]),
            ("CBQ + LoRA-Rounding", ["--weight-solver", "lora-rounding", "--reconstruction", "cbq"])]


# Section 4 (issue #12): the real pretrained model ../shared/models/babyllama-tok361
# (TinyStories LLaMA: hidden 128, 5 layers, 8/4 heads, intermediate 352, vocab 361),
# its own calibration (64 × 256) and held-out (32 × 256) samples.
REAL_MODEL = os.path.join(os.path.dirname(ROOT), "shared", "models", "babyllama-tok361")
REAL_SETTINGS = [("W4A4KV4", ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4"]),
                 ("W4A16", ["--w-bits", "4"]),
                 ("W2A16", ["--w-bits", "2"])]


def real_rows(fq_epochs):
    fq = ["--method", "flatquant", "--epochs", fq_epochs]
    return [("RTN", ["--method", "rtn"]),
            ("GPTQ", ["--method", "gptq"]),
            ("QuaRot + GPTQ", ["--method", "quarot", "--weight-solver", "gptq"]),
            ("SpinQuant + GPTQ", ["--method", "spinquant", "--weight-solver", "gptq"]),
            ("FlatQuant + RTN", fq + ["--weight-solver", "rtn"]),
            ("FlatQuant + GPTQ", fq + ["--weight-solver", "gptq"]),
            ("FlatQuant folded + GPTQ", fq + ["--flat-fold", "--weight-solver", "gptq"]),
            ("CBQ + LoRA-Rounding", ["--weight-solver", "lora-rounding", "--reconstruction", "cbq"]),
            ("CBQ + LoRA-Rounding from GPTQ", ["--weight-solver", "gptq", "--reconstruction", "cbq"]),
            ("FlatQuant + CBQ (from GPTQ) + IntactKV",
             fq + ["--weight-solver", "gptq", "--reconstruction", "cbq", "--intactkv"]),
            ("FlatQuant + CBQ (from RTN) + IntactKV",
             fq + ["--weight-solver", "lora-rounding", "--reconstruction", "cbq", "--intactkv"])]


def real_rows_for(fq_epochs, sflags, starts="gptq,rtn"):
    """real_rows for one setting: flat_fold is weight-only (refused with --a-bits); the
    composed rows whose CBQ start (gptq, rtn) is in `starts`."""
    keep = {REAL_COMPOSED_BY_START[k] for k in starts.split(",") if k}
    return [(n, f) for n, f in real_rows(fq_epochs)
            if not ("--flat-fold" in f and "--a-bits" in sflags)
            and (n not in REAL_COMPOSED or n in keep)]


# The composed row and the rows of its components (the page checks it against them).
REAL_COMPOSED_BY_START = {"gptq": "FlatQuant + CBQ (from GPTQ) + IntactKV",
                          "rtn": "FlatQuant + CBQ (from RTN) + IntactKV"}
REAL_COMPOSED = list(REAL_COMPOSED_BY_START.values())
REAL_COMPONENTS = ["GPTQ", "FlatQuant + RTN", "FlatQuant + GPTQ", "CBQ + LoRA-Rounding",
                   "CBQ + LoRA-Rounding from GPTQ"]


def run(cmd, env=None):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1:] or ["failed"], time.time() - t0
    return p.stdout, None, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qcal", default=os.path.join(ROOT, "build", "api", "qcal"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    ap.add_argument("--nsamples", default="64")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sections", default="1,2,3,4")
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs in section 2")
    ap.add_argument("--cbq-nsamples", default="32")
    ap.add_argument("--cbq-epochs", default="8")
    ap.add_argument("--json-out", default=os.path.join(tempfile.gettempdir(), "qcal_results.json"))
    ap.add_argument("--real-nsamples", default="64", help="section 4 calibration sequences")
    ap.add_argument("--real-fq-epochs", default="15", help="section 4 FlatQuant epochs")
    ap.add_argument("--real-cbq-epochs", default="20", help="section 4 CBQ epochs per window")
    ap.add_argument("--real-composed-cbq", default="",
                    help="section 4: the composed row's CBQ as "
                         "EPOCHS,WINDOW,OVERLAP[,LOGIT[,HOLDOUT]] (LOGIT: --cbq-logit-loss, "
                         "HOLDOUT: --cbq-holdout; default: --real-cbq-epochs, windows of 2, "
                         "overlap 1, no logit loss, no held-out choice, as the other CBQ rows)")
    ap.add_argument("--real-composed-starts", default="gptq,rtn",
                    help="section 4: the composed rows to run, by CBQ's start: gptq "
                         "(--weight-solver gptq), rtn (--weight-solver lora-rounding)")
    a = ap.parse_args()
    sections = a.sections.split(",")
    data = os.path.join(ROOT, "tests", "fixtures", "grammar-data")
    calib, evald = os.path.join(data, "calib.u32"), os.path.join(data, "eval.u32")
    seqlen = "128"
    tmp = tempfile.mkdtemp(prefix="qcal_results_")
    rows = {}
    fp = {}
    cbq_rows = {}
    s3 = {}
    s4 = {}
    try:
        if "4" in sections:
            s4 = run_section4(a, tmp)
        for fx, desc in (CBQ_FIXTURES if set(sections) & {"1", "2", "3"} else []):
            model = os.path.join(ROOT, "tests", "fixtures", fx)
            out, err, _ = run([a.qcal, "eval", "--model", model, "--data", evald, "--seqlen", seqlen, "--json"])
            fp[fx] = json.loads(out)["ppl"] if out else float("nan")
            if (fx, desc) not in FIXTURES:  # section 1 runs on the two grammar-tiny fixtures
                continue
            for setting, sflags in (SETTINGS if "1" in sections else []):
                for m in a.methods.split(","):
                    for s in SOLVERS:
                        qdir = os.path.join(tmp, f"{fx}-{setting}-{m}-{s}")
                        method = s if m == "none" else m
                        cmd = [a.qcal, "quantize", "--model", model, "--calib", calib, "--seqlen", seqlen,
                               "--nsamples", a.nsamples, "--out", qdir, "--method", method, "--quiet",
                               "--format", "native"] + sflags + EXTRA[m]
                        if m != "none":
                            cmd += ["--weight-solver", s]
                        _, qerr, qsec = run(cmd)
                        key = (fx, setting, m, s)
                        if qerr:
                            rows[key] = {"error": qerr[0]}
                        else:
                            out, eerr, _ = run([a.qcal, "eval", "--model", qdir, "--data", evald,
                                                "--seqlen", seqlen, "--fp-model", model, "--json"])
                            rows[key] = json.loads(out) if out else {"error": eerr[0]}
                            rows[key]["seconds"] = qsec
                        shutil.rmtree(qdir, ignore_errors=True)
                        r = rows[key]
                        print(f"{fx:22s} {setting:8s} {m:12s} {s:5s} " +
                              (f"ppl {r['ppl']:.3f} kl {r['kl']:.4f} ({r['seconds']:.1f} s)" if "ppl" in r
                               else r["error"]), flush=True)
        if "2" in sections:
            cbq_rows = run_cbq_section(a, tmp, calib, evald, seqlen)
        if "3" in sections:
            s3 = run_section3(a, tmp, calib, evald, seqlen)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    generated = {}
    if "1" in sections:
        generated["1"] = section1_lines(a, rows, fp, seqlen)
    if "2" in sections:
        generated["2"] = cbq_section_lines(a, cbq_rows, fp, seqlen)
    if "3" in sections:
        generated["3"] = section3_lines(a, s3, fp, seqlen)
    if "4" in sections:
        generated["4"] = section4_lines(a, s4)
    splice(a.out, generated)
    path = a.json_out  # the raw numbers, for notes; not committed
    out = {}
    out.update({"|".join(k): v for k, v in rows.items()})
    out.update({"cbq|" + "|".join(k): v for k, v in cbq_rows.items()})
    out.update({"s3|" + "|".join(k): v for k, v in s3.items() if k[0] != "sinks"})
    out.update({"sinks|" + k[1]: v for k, v in s3.items() if k[0] == "sinks"})
    out.update({"real|" + "|".join(k): v for k, v in s4.items()})
    json.dump(out, open(path, "w"), indent=1)
    print("raw numbers in", path)


def section1_lines(a, rows, fp, seqlen):
    lines = [
             "Produced by `tools/make_results.py` (sections 1–3 between their markers; do not "
             "edit them by hand, rerun it). Each cell is "
             "`qcal quantize --method M --weight-solver S` with the recipe's bit widths on "
             f"{a.nsamples} calibration sequences of {seqlen} tokens, then `qcal eval --fp-model` "
             "on the held-out split (integer kernels of the native checkpoint). "
             "PPL = perplexity (lower is better); KL = mean KL(FP ‖ quantized) per token in nats.",
             "", "Methods: `none` = plain RTN / GPTQ weights; the others as in "
             "`../shared/design/methods.md` (SmoothQuant α 0.5; QuaRot random Hadamards; "
             "SpinQuant R1/R2 by 100 steps of Cayley SGD at lr 1.5; FlatQuant 8 epochs × 16 "
             "minibatches of 4 = 512 steps, about the reference's 480, with LWC, LAC and the "
             "diagonal). Activations symmetric per token, K/V asymmetric per head, clip ratios "
             "1.0 for every method: the reference's a_clip 0.9 / kv_clip 0.95 made QuaRot worse "
             "on these fixtures (outlier W4A4KV4 RTN: ppl 5.72 with them, 5.29 without), so "
             "they are off here.",
             ""]
    for fx, desc in FIXTURES:
        lines += [f"## {fx}", "", f"{desc}. FP perplexity: **{fp[fx]:.3f}**.", ""]
        for setting, _ in SETTINGS:
            lines += [f"### {setting}", "", "| method | RTN weights: PPL | KL | GPTQ weights: PPL | KL |",
                      "|---|---|---|---|---|"]
            for m in a.methods.split(","):
                cells = []
                for s in SOLVERS:
                    r = rows.get((fx, setting, m, s), {"error": "not run"})
                    cells += ([f"{r['ppl']:.3f}", f"{r['kl']:.4f}"] if "ppl" in r
                              else [f"error: {r['error']}", ""])
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def splice(path, generated):
    """Replaces each generated section between its markers in `path` (appending the
    ones the page does not have yet); the text outside the markers is kept."""
    text = open(path).read() if os.path.exists(path) else \
        "# Results: the calibration methods on the trained fixtures\n\n"
    for n in sorted(generated):
        begin, end = f"<!-- make_results: section {n} -->", f"<!-- /make_results: section {n} -->"
        body = begin + "\n" + "\n".join(generated[n]).rstrip("\n") + "\n" + end
        i, j = text.find(begin), text.find(end)
        if i >= 0 and j > i:
            text = text[:i] + body + text[j + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + body + "\n"
    with open(path, "w") as f:
        f.write(text)
    print("wrote", path)


def quantize_and_eval(a, qdir, model, calib, evald, seqlen, flags, env, nsamples=None):
    """One cell: quantize to qdir (native), evaluate against the FP model, remove qdir."""
    cmd = [a.qcal, "quantize", "--model", model, "--calib", calib, "--seqlen", seqlen,
           "--nsamples", nsamples or a.cbq_nsamples, "--out", qdir, "--quiet", "--format",
           "native"] + flags
    _, qerr, qsec = run(cmd, env)
    if qerr:
        r = {"error": qerr[0]}
    else:
        out, eerr, _ = run([a.qcal, "eval", "--model", qdir, "--data", evald, "--seqlen", seqlen,
                            "--fp-model", model, "--json"], env)
        r = json.loads(out) if out else {"error": eerr[0]}
        r["seconds"] = qsec
    shutil.rmtree(qdir, ignore_errors=True)
    return r


def run_cells(a, tmp, calib, evald, seqlen, cells):
    """Runs every (key, model, flags) cell through quantize_and_eval, a.jobs at a time
    (QCAL_THREADS=1 each when parallel); reconstructions use a.cbq_nsamples sequences,
    the rest a.nsamples. Returns {key: eval result or {"error": ...}}."""
    env = dict(os.environ)
    if a.jobs > 1:
        env["QCAL_THREADS"] = "1"
    rows = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futs = {}
        for i, (key, model, flags) in enumerate(cells):
            qdir = os.path.join(tmp, "cell-" + "-".join(key).replace(" ", "_").replace("/", "_") + f"-{i}")
            ns = a.cbq_nsamples if "--reconstruction" in flags else a.nsamples
            futs[pool.submit(quantize_and_eval, a, qdir, model, calib, evald, seqlen, flags, env,
                             ns)] = key
        for fut in concurrent.futures.as_completed(futs):
            key = futs[fut]
            r = rows[key] = fut.result()
            print(f"{key[0]:22s} {key[1]:9s} {key[2]:32s} {key[3]:12s} " +
                  (f"ppl {r['ppl']:.3f} kl {r['kl']:.4f} ({r['seconds']:.1f} s)" if "ppl" in r
                   else r["error"]), flush=True)
    return rows


def table_lines(rows, fx, setting, names, cols):
    """One markdown table: a row per recipe name, a PPL | KL pair per (key, label)
    column, and the first column's seconds."""
    head = "| recipe | " + " | ".join(f"{label}PPL | KL" for _, label in cols) + " | seconds |"
    lines = [head, "|---|" + "---|---|" * len(cols) + "---|"]
    for name in names:
        cells, secs = [], ""
        for i, (c, _) in enumerate(cols):
            r = rows.get((fx, setting, name, c), {"error": "not run"})
            if "ppl" in r:
                cells += [f"{r['ppl']:.3f}", f"{r['kl']:.4f}"]
                if i == 0:
                    secs = f"{r['seconds']:.1f}"
            else:
                cells += [f"error: {r['error']}", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    return lines + [""]


def fixture_tables(rows, fx, intro, settings, names, cols):
    """A fixture's heading, its intro line, and one table_lines per setting."""
    lines = [f"### {fx}", "", intro, ""]
    for setting, _ in settings:
        lines += [f"#### {setting}", ""] + table_lines(rows, fx, setting, names, cols)
    return lines


def run_cbq_section(a, tmp, calib, evald, seqlen):
    """Issue #5: every (fixture, setting, recipe, IntactKV) cell."""
    cells = []
    for fx, _ in CBQ_FIXTURES:
        model = os.path.join(ROOT, "tests", "fixtures", fx)
        for setting, sflags in CBQ_SETTINGS:
            for name, rflags in CBQ_ROWS:
                for ikv in (False, True):
                    flags = sflags + rflags + (["--intactkv"] if ikv else [])
                    if "--reconstruction" in rflags:
                        flags += ["--cbq-epochs", a.cbq_epochs]
                    cells.append(((fx, setting, name, "intactkv" if ikv else "plain"), model, flags))
    return run_cells(a, tmp, calib, evald, seqlen, cells)


# Section 3: transforms combined with reconstruction (on the outlier fixture) and
# IntactKV / IntactKV+Cal where the model has attention sinks (the sink fixture).
S3_FIXTURES = [("grammar-tiny-outlier", False), ("grammar-sink", True)]  # (fixture, IntactKV columns)
S3_SETTINGS = [("W4A4KV4", ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4"]),
               ("W4A16", ["--w-bits", "4"])]
S3_ROWS = [("RTN", ["--method", "rtn"]),
           ("QuaRot", ["--method", "quarot", "--weight-solver", "rtn"]),
           ("FlatQuant", ["--method", "flatquant", "--weight-solver", "rtn", "--epochs", "8"]),
           ("CBQ + LoRA-Rounding", ["--weight-solver", "lora-rounding", "--reconstruction", "cbq"]),
           ("QuaRot + CBQ + LoRA-Rounding",
            ["--method", "quarot", "--weight-solver", "lora-rounding", "--reconstruction", "cbq"]),
           ("FlatQuant + CBQ + LoRA-Rounding",
            ["--method", "flatquant", "--epochs", "8", "--weight-solver", "lora-rounding",
             "--reconstruction", "cbq"])]
S3_IKV = [("plain", []), ("IntactKV", ["--intactkv"]),
          ("IntactKV+Cal", ["--intactkv", "--intactkv-cal"])]


def run_section3(a, tmp, calib, evald, seqlen):
    rows = {}
    for fx, _ in CBQ_FIXTURES:
        model = os.path.join(ROOT, "tests", "fixtures", fx)
        out, err, _ = run([a.qcal, "sinks", "--model", model, "--data", evald, "--seqlen", seqlen,
                           "--max-seqs", "64", "--json"])
        rows[("sinks", fx)] = json.loads(out) if out else {"error": err[0]}
    cells = []
    for fx, ikv_cols in S3_FIXTURES:
        model = os.path.join(ROOT, "tests", "fixtures", fx)
        for setting, sflags in S3_SETTINGS:
            for name, rflags in S3_ROWS:
                for ikv, iflags in (S3_IKV if ikv_cols else S3_IKV[:1]):
                    flags = sflags + rflags + iflags
                    if "--reconstruction" in rflags:
                        flags += ["--cbq-epochs", a.cbq_epochs]
                    cells.append(((fx, setting, name, ikv), model, flags))
    rows.update(run_cells(a, tmp, calib, evald, seqlen, cells))
    return rows


def section3_lines(a, rows, fp, seqlen):
    lines = ["## Attention sinks, IntactKV+Cal, and transforms with reconstruction", "",
             "**Attention mass on the first token** (`qcal sinks`: mean over heads and query "
             "positions 1..127 of the attention probability on position 0, on the 64 held-out "
             "sequences; a head spreading its attention evenly over the causal window gives "
             "0.035):", "",
             "| fixture | " + " | ".join(f"layer {l}" for l in range(4)) + " | mean |",
             "|---|" + "---|" * 5]
    for fx, _ in CBQ_FIXTURES:
        r = rows.get(("sinks", fx), {"error": "not run"})
        if "per_layer" in r:
            lines.append(f"| {fx} | " + " | ".join(f"{x:.3f}" for x in r["per_layer"]) +
                         f" | {r['mean']:.3f} |")
        else:
            lines.append(f"| {fx} | error: {r['error']} |")
    lines += ["", "Each cell: `qcal quantize` with the row's recipe (transforms with "
              f"{a.nsamples} calibration sequences; reconstructions with {a.cbq_nsamples} "
              f"sequences × {a.cbq_epochs} epochs per window, as in section 2), then `qcal eval "
              "--fp-model` on the held-out split. *IntactKV*: the FP K/V cache of BOS, computed "
              "by the transformed FP model; *IntactKV+Cal* (methods.md §6.4): that cache "
              "trained as the only parameters against the FP model's layer outputs "
              "(`--intactkv-cal` with the paper's settings, the recipe's defaults: AdamW lr "
              "2e-4, 160 steps of 16 sequences, clip 0.3).", ""]
    for fx, ikv_cols in S3_FIXTURES:
        cols = [(c, "" if c == "plain" else c + ": ") for c, _ in (S3_IKV if ikv_cols else S3_IKV[:1])]
        lines += fixture_tables(rows, fx, f"FP perplexity: **{fp[fx]:.3f}**.", S3_SETTINGS,
                                [n for n, _ in S3_ROWS], cols)
    return lines


def cbq_section_lines(a, rows, fp, seqlen):
    lines = ["## Issue #5: block reconstruction, CBQ windows, LoRA-Rounding and IntactKV", "",
             "Recipes on the untransformed model (`qcal quantize --reconstruction block|cbq "
             "--weight-solver rtn|lora-rounding [--intactkv]`, methods.md §6–§7, "
             "worker/calib/cbq.h): *per-block reconstruction* trains each block alone "
             "(windows of 1) on the quantized model's inputs, learning the weight step sizes "
             "(and, at A4/KV4, the activation / K/V clip ratios) with round-to-nearest; *CBQ "
             "windows* trains windows of 2 consecutive blocks with an overlap of 1 (the paper's "
             "default) with the same parameters; *CBQ + LoRA-Rounding* adds the learned "
             "low-rank rounding (rank 16). All reconstructions use coarse-to-fine preprocessing "
             "(CFP), its weight truncation kept per block only where it lowers the block's "
             "output error (issue #12). IntactKV keeps the FP K/V cache of BOS (every evaluation sequence begins "
             "with it). Weights are symmetric per output channel unless a group is named; "
             "activations per token, K/V asymmetric per head.", "",
             f"**Reduced budget** (to keep this script short on 2 cores): {a.cbq_nsamples} "
             f"calibration sequences of {seqlen} tokens (section 1 uses {a.nsamples}) and "
             f"{a.cbq_epochs} epochs per window at a batch of 4 sequences "
             f"({int(a.cbq_epochs) * ((int(a.cbq_nsamples) + 3) // 4)} steps per window; "
             "the recipe's default is 20 epochs). More epochs and samples improve every "
             "reconstruction row (measured when this section was written, W2A16 g64 on "
             "grammar-tiny, CBQ + LoRA-Rounding: KL 0.055 at 32 sequences × 8 epochs, 0.015 "
             "(PPL 5.152) at 64 × 20 in 54 s with one thread). Seconds are the "
             "wall time of `qcal quantize` with one thread on a shared machine.", ""]
    for fx, desc in CBQ_FIXTURES:
        lines += fixture_tables(rows, fx, f"{desc}. FP perplexity: **{fp[fx]:.3f}**.",
                                CBQ_SETTINGS, [n for n, _ in CBQ_ROWS],
                                [("plain", ""), ("intactkv", "+ IntactKV: ")])
    return lines


def run_section4(a, tmp):
    """Issue #12: every (setting, recipe) cell on the real pretrained model."""
    calib = os.path.join(REAL_MODEL, "samples_64x256.u32")
    evald = os.path.join(REAL_MODEL, "samples_32x256.u32")
    cells = []
    for setting, sflags in REAL_SETTINGS:
        for name, rflags in real_rows_for(a.real_fq_epochs, sflags, a.real_composed_starts):
            flags = sflags + rflags
            if name in REAL_COMPOSED and a.real_composed_cbq:
                e, w, o, *lg = a.real_composed_cbq.split(",")
                flags += ["--cbq-epochs", e, "--cbq-window", w, "--cbq-overlap", o]
                if lg:
                    flags += ["--cbq-logit-loss", lg[0]]
                if len(lg) > 1:
                    flags += ["--cbq-holdout", lg[1]]
            elif "--reconstruction" in flags:
                flags += ["--cbq-epochs", a.real_cbq_epochs]
            cells.append((("babyllama-tok361", setting, name, "plain"), REAL_MODEL, flags))
    b = argparse.Namespace(**vars(a))
    b.nsamples = b.cbq_nsamples = a.real_nsamples
    rows = run_cells(b, tmp, calib, evald, "256", cells)
    out, err, _ = run([a.qcal, "eval", "--model", REAL_MODEL, "--data", evald, "--seqlen", "256",
                       "--json"])
    rows[("fp",)] = json.loads(out) if out else {"error": err[0]}
    return rows


def composed_cbq_text(spec):
    """The page's sentence for --real-composed-cbq (empty when not given)."""
    if not spec:
        return ""
    e, w, o, *lg = spec.split(",")
    text = f"The composed rows' CBQ: {e} epochs per window, windows of {w} blocks, overlap {o}"
    if lg:
        text += (f", the last window's loss adds {lg[0]} × the next-token KL of the model's "
                 "head (`--cbq-logit-loss`)")
    if len(lg) > 1:
        text += (f", and each window trains on all but the last {lg[1]} calibration sequences "
                 "and keeps the epoch (its start included) whose hardened loss on those is "
                 "lowest (`--cbq-holdout`)")
    return text + ". "


def section4_lines(a, rows):
    fp = rows.get(("fp",), {})
    lines = ["## Issue #12: the real pretrained model (babyllama-tok361)", "",
             "`../shared/models/babyllama-tok361`: a TinyStories LLaMA (hidden 128, 5 layers, "
             "8 query / 4 K/V heads, intermediate 352 = 11·32, vocab 361), calibrated on "
             f"{a.real_nsamples} of its 64 calibration sequences of 256 tokens and evaluated "
             "on its 32 held-out sequences (`qcal eval --fp-model`; IntactKV rows with the "
             "IntactKV protocol, every sequence begins with BOS). FP perplexity: "
             + (f"**{fp['ppl']:.4f}**." if "ppl" in fp else "not measured.") +
             " Weights symmetric per output channel (no groups), activations per token, K/V "
             "asymmetric per head. QuaRot / SpinQuant: online Hadamards of order 352 by the "
             f"Paley construction (44·8). FlatQuant: {a.real_fq_epochs} epochs. *FlatQuant "
             "folded* (`--flat-fold`, weight-only): only the diagonals, V's per-head transform "
             "and LWC are learned, the transforms fold into the weights (GPTQ picks the "
             "weights' ranges), and the result "
             "is a plain GPTQ / compressed-tensors checkpoint (nothing online). CBQ: windows "
             f"of 2 blocks, overlap 1, {a.real_cbq_epochs} epochs per window, LoRA-Rounding "
             "rank 16, CFP kept per block only where it lowers the block's RTN output error. "
             "*from GPTQ* (`--weight-solver gptq --reconstruction cbq`): GPTQ rounds each "
             "block of a window first and the LoRA-Rounding and step sizes start from its "
             "solution; a window whose training ends above its start keeps the start; *from "
             "RTN* (`--weight-solver lora-rounding`): they start from round to nearest. "
             "*IntactKV* with CBQ: the windows train against the FP BOS cache the output "
             "carries. " + composed_cbq_text(a.real_composed_cbq) +
             "Seconds: wall time of `qcal quantize` with one thread on a shared "
             "machine (2 jobs at a time).", ""]
    for setting, sflags in REAL_SETTINGS:
        names = [n for n, _ in real_rows_for(a.real_fq_epochs, sflags, a.real_composed_starts)]
        lines += [f"#### {setting}", ""]
        lines += table_lines(rows, "babyllama-tok361", setting, names, [("plain", "")])
        kl = {n: rows.get(("babyllama-tok361", setting, n, "plain"), {}).get("kl") for n in names}
        parts = {n: kl[n] for n in REAL_COMPONENTS if kl.get(n) is not None}
        for cname in REAL_COMPOSED:
            comp = kl.get(cname)
            if comp is None or not parts:
                continue
            best = min(parts, key=parts.get)
            verdict = "no worse than" if comp <= parts[best] else "WORSE than"
            line = (f"{cname}: KL {comp:.4f} is {verdict} its best component ({best}, "
                    f"{parts[best]:.4f}; ratio {comp / parts[best]:.3f})")
            if kl.get("FlatQuant + GPTQ"):
                line += f"; {comp / kl['FlatQuant + GPTQ']:.3f} × FlatQuant + GPTQ's"
            lines += [line + ".", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())

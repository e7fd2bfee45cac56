#!/usr/bin/env python3
"""Interop checked by real loaders (issue #14 part 6).

Has qcal write each checkpoint format it produces for a small model, loads each
with every third-party loader that claims the format, and compares the loader's
perplexity with `qcal eval` on the same tokens:

    tools/interop/check_loaders.py [--qcal build/api/qcal] [--venv build/interop-venv]
        [--model tests/fixtures/grammar-tiny] [--calib .../calib.u32] [--data .../eval.u32]
        [--seqlen 128] [--nsamples 16] [--json-out FILE] [--markdown]

The loaders (tools/interop/requirements-loaders.txt, pinned) are installed into
a virtual environment on the first run (about 3 GB with torch's CUDA runtime
wheels; reused while the requirements file is unchanged). Cases:

| case               | qcal writes                        | loaders                  |
|--------------------|------------------------------------|--------------------------|
| gptq-v1-sym        | GPTQ, checkpoint_format gptq       | transformers, gptqmodel  |
| gptq-v1-sym-act    | act-order, dynamic groups (g_idx)  | transformers, gptqmodel  |
| gptq-v2-asym       | GPTQ, checkpoint_format gptq_v2    | transformers, gptqmodel  |
| ct-sym             | compressed-tensors pack-quantized  | transformers (packed and dequantize=True) |
| ct-asym            | the same with zero points          | transformers dequantize=True |
| gptq-flatfold      | weight-only FlatQuant (flat_fold): GPTQ with its norms changed | transformers, gptqmodel |

(transformers loads GPTQ checkpoints through GPTQModel's kernels, so the two
GPTQ rows differ in the entry point and dtype, not in the dequantization.
transformers' default compressed-tensors path keeps the packed layout and
cannot take asymmetric zero points, see docs/INTEROP.md.) Every row
passes when |ppl_loader − ppl_qcal| ≤ tol · ppl_qcal, tol 1e-6 where the loader
keeps float32 weights, 2e-5 where its kernel rounds the dequantized weights to
float16 and 3e-4 where it runs the whole model in float16 (the issue measured
about 1e-7 and 1e-5; load_eval.py measures which case applies). One more check: the GPTQ and compressed-tensors
outputs of one symmetric run give the same `qcal eval` perplexity, bit for bit
(they decode to identical weights).

Exit codes: 0 all rows pass; 1 a row fails (the table says which and why);
77 PyPI unreachable on the first run (the test is then skipped, not passed).
Uses only the standard library; the loaders run in the venv (load_eval.py).
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
import pyenv  # noqa: E402

# Relative ppl tolerance by what the loader computes in (load_eval.py precision()).
# Measured on grammar-tiny: ≤ 2e-8, ≤ 5e-6, ≤ 8e-5. A v1/v2 zero-point mix-up or a
# wrong scale moves the ppl by more than 1e-2.
TOL = {"float32": 1e-6, "float16 weights": 2e-5, "float16": 3e-4}

CASES = [
    # name, qcal quantize flags, loaders
    ("gptq-v1-sym", ["--format", "gptq"], ["transformers", "gptqmodel"]),
    ("gptq-v1-sym-act", ["--format", "gptq", "--act-order", "--no-static-groups"], ["transformers", "gptqmodel"]),
    ("gptq-v2-asym", ["--format", "gptq", "--asym"], ["transformers", "gptqmodel"]),
    ("ct-sym", ["--format", "compressed-tensors"], ["transformers", "transformers-dequantize"]),
    # transformers' default (packed) layout cannot load asymmetric compressed-tensors:
    # it expects weight_zero_point unpacked, [O, G] (llm-compressor#1618); dense works.
    ("ct-asym", ["--format", "compressed-tensors", "--asym"], ["transformers-dequantize"]),
    # Weight-only FlatQuant that folds completely: the diagonals are in the norms.
    ("gptq-flatfold", ["--format", "gptq", "--method", "flatquant", "--flat-fold", "--epochs", "2",
                       "--weight-solver", "gptq"], ["transformers", "gptqmodel"]),
]


def run(cmd, timeout=900):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qcal", default=os.path.join(ROOT, "build", "api", "qcal"))
    ap.add_argument("--venv", default=None, help="default: <build dir of --qcal>/interop-venv")
    ap.add_argument("--requirements", default=os.path.join(HERE, "requirements-loaders.txt"))
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "grammar-tiny"))
    data = os.path.join(ROOT, "tests", "fixtures", "grammar-data")
    ap.add_argument("--calib", default=os.path.join(data, "calib.u32"))
    ap.add_argument("--data", default=os.path.join(data, "eval.u32"))
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=16, help="evaluation sequences")
    ap.add_argument("--calib-nsamples", type=int, default=32)
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--loaders", default=None,
                    help="comma-separated subset of transformers, transformers-dequantize, "
                         "gptqmodel, autogptq (default: all but autogptq)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--autogptq", action="store_true",
                    help="also load the GPTQ outputs with AutoGPTQ 0.7.1 (a third venv, "
                         "requirements-autogptq.txt); its rows are informational")
    a = ap.parse_args()
    qcal = os.path.abspath(a.qcal)
    if not os.access(qcal, os.X_OK):
        print(f"FAIL: {qcal} is not an executable qcal", file=sys.stderr)
        return 1
    venv = a.venv or os.path.join(os.path.dirname(os.path.dirname(qcal)), "interop-venv")
    t_start = time.time()
    py = None
    if a.loaders is None or set(a.loaders.split(",")) - {"autogptq"}:
        py = pyenv.ensure_venv(venv, a.requirements)
    t_env = time.time() - t_start

    tmp = tempfile.mkdtemp(prefix="qcal_interop_")
    rows = []
    qcal_ppl = {}  # case -> qcal eval ppl
    outs = {}  # case -> output dir
    try:
        cases = [c for c in CASES if c[0] in a.cases.split(",")]
        for name, flags, _ in cases:
            out = os.path.join(tmp, name)
            rc, _, err = run([qcal, "quantize", "--model", a.model, "--calib", a.calib, "--out", out,
                              "--method", "gptq", "--w-bits", "4", "--group-size", a.group_size,
                              "--seqlen", str(a.seqlen), "--nsamples", str(a.calib_nsamples),
                              "--quiet"] + flags)
            if rc != 0:
                rows.append({"case": name, "loader": "qcal quantize", "ok": False,
                             "why": last_line(err)})
                continue
            rc, so, err = run([qcal, "eval", "--model", out, "--data", a.data, "--seqlen",
                               str(a.seqlen), "--nsamples", str(a.nsamples), "--json"])
            if rc != 0:
                rows.append({"case": name, "loader": "qcal eval", "ok": False,
                             "why": last_line(err)})
                continue
            qcal_ppl[name] = json.loads(so)["ppl"]
            outs[name] = out
        # One process per loader: importing torch and the loader dominates the time.
        loaders = [("transformers", py), ("transformers-dequantize", py), ("gptqmodel", py)]
        if a.autogptq:
            ag_venv = os.path.join(os.path.dirname(venv), "autogptq-venv")
            ag_py = pyenv.ensure_venv(ag_venv, os.path.join(HERE, "requirements-autogptq.txt"))
            loaders.append(("autogptq", ag_py))
        if a.loaders:
            loaders = [(l, p) for l, p in loaders if l in a.loaders.split(",")]
        for loader, lpy in loaders:
            if loader == "autogptq":
                mine = [c for c in cases if c[0].startswith("gptq") and c[0] in outs]
            else:
                mine = [c for c in cases if loader in c[2] and c[0] in outs]
            if not mine:
                continue
            t0 = time.time()
            rc, so, err = run([lpy, os.path.join(HERE, "load_eval.py"), "--loader", loader, "--data",
                               a.data, "--seqlen", str(a.seqlen), "--nsamples", str(a.nsamples)] +
                              [outs[c[0]] for c in mine])
            got = {}
            for line in so.splitlines():
                if line.startswith("{"):
                    j = json.loads(line)
                    got[j["model"]] = j
            for name, _, _ in mine:
                ref = qcal_ppl[name]
                row = {"case": name, "loader": loader, "qcal_ppl": ref}
                j = got.get(outs[name])
                if j is None:
                    row.update(ok=False, why=f"load_eval.py exited {rc}: {last_line(err)}")
                elif "error" in j:
                    row.update(ok=False, why=j["error"])
                else:
                    rel = abs(j["ppl"] - ref) / ref
                    tol = TOL.get(j["precision"])
                    row.update(loader_ppl=j["ppl"], rel=rel, dtype=j["precision"], tol=tol,
                               seconds=j["seconds"], versions=j["versions"])
                    if tol is None:
                        row.update(ok=False, why=f"no tolerance for precision {j['precision']}")
                    else:
                        ok = rel <= tol  # False for NaN
                        row.update(ok=ok, why="" if ok else f"relative difference {rel:.3g} > {tol:g}")
                if loader == "autogptq":
                    row["info"] = True  # documents AutoGPTQ's behaviour; not a verdict
                rows.append(row)
                print(f"{name:16s} {loader:13s} " +
                      (f"ppl {row['loader_ppl']:.9f} vs qcal {ref:.9f}: rel {row['rel']:.2e} "
                       f"({row['dtype']}) {'ok' if row['ok'] else 'FAIL ' + row['why']}"
                       if "loader_ppl" in row else f"FAIL {row['why']}"), flush=True)
            print(f"  ({loader}: {time.time() - t0:.0f} s for {len(mine)} checkpoints)", flush=True)
        if "gptq-v1-sym" in qcal_ppl and "ct-sym" in qcal_ppl:
            same = qcal_ppl["gptq-v1-sym"] == qcal_ppl["ct-sym"]
            rows.append({"case": "gptq-v1-sym = ct-sym", "loader": "qcal eval", "ok": same,
                         "qcal_ppl": qcal_ppl["gptq-v1-sym"], "loader_ppl": qcal_ppl["ct-sym"],
                         "rel": abs(qcal_ppl["gptq-v1-sym"] - qcal_ppl["ct-sym"]),
                         "why": "" if same else "the two formats of one run decode differently"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if a.markdown:
        print("| case | loader | qcal eval ppl | loader ppl | relative difference | loader precision |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "loader_ppl" in r:
                print(f"| {r['case']} | {r['loader']} | {r['qcal_ppl']:.7f} | {r['loader_ppl']:.7f} "
                      f"| {r['rel']:.1e} | {r.get('dtype', '')} |")
            else:
                print(f"| {r['case']} | {r['loader']} | fails: {r['why']} | | | |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"rows": rows, "env_seconds": t_env,
                       "total_seconds": time.time() - t_start}, f, indent=1)
    bad = [r for r in rows if not r["ok"] and not r.get("info")]
    checked = [r for r in rows if not r.get("info")]
    print(f"interop: {len(checked) - len(bad)} passed, {len(bad)} failed "
          f"({time.time() - t_start:.0f} s, of which {t_env:.0f} s for the venv)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

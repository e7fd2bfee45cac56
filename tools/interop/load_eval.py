#!/usr/bin/env python3
"""Loads checkpoints that qcal wrote with a third-party loader and prints each
one's perplexity on a token file as one JSON line. Runs inside the virtual
environment that tools/interop/check_loaders.py makes (torch, transformers,
compressed-tensors, GPTQModel); it downloads nothing. One process per loader
(importing torch and a loader takes longer than evaluating these models).

    load_eval.py --loader transformers|transformers-dequantize|gptqmodel|autogptq --data FILE.u32
                 --seqlen 128 [--nsamples 0] [--batch 8] DIR [DIR ...]

Scoring is `qcal eval`'s (worker/engine/eval.h): the .u32 token stream cut into
consecutive windows of `seqlen` tokens (a remainder is dropped), token t+1
predicted from tokens <= t inside each window, positions 0..seqlen-2 scored,
ppl = exp(mean NLL) with the NLL summed in float64.

Output per DIR: {"model", "loader", "ppl", "nll", "tokens", "precision", "seconds",
"versions"}, or {"model", "loader", "error"} with the loader's own error message
when it fails (so a reader sees what broke); the exit code is 0 either way.
"""
import argparse
import json
import math
import sys
import time


def load_tokens(path, seqlen, nsamples, vocab):
    import numpy as np

    if not path.endswith(".u32"):
        raise SystemExit(f"{path}: load_eval.py reads .u32 token files only")
    toks = np.fromfile(path, dtype="<u4")
    n = len(toks) // seqlen
    if nsamples > 0:
        n = min(n, nsamples)
    if n == 0:
        raise SystemExit(f"{path}: fewer than {seqlen} tokens")
    toks = toks[: n * seqlen].astype(np.int64).reshape(n, seqlen)
    if toks.max() >= vocab:
        raise SystemExit(f"{path}: token id {int(toks.max())} >= vocab_size {vocab}")
    return toks


def load_model(loader, model_dir):
    import torch

    if loader in ("transformers", "transformers-dequantize"):
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        # dtype float32: the loader's own choice of compute dtype for the
        # non-quantized tensors would otherwise follow config.json (bf16 here).
        kw = {}
        if loader == "transformers-dequantize":
            # compressed-tensors checkpoints dequantized to dense Linear weights on load
            # (the default keeps the packed layout and decompresses in forward).
            kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                    device_map="cpu", **kw)
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        ensure_tokenizer(model_dir)
        # Its torch kernel (TorchLinear) computes in float16 or bfloat16 only.
        m = GPTQModel.load(model_dir, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        return m.model
    if loader == "autogptq":
        from auto_gptq import AutoGPTQForCausalLM

        m = AutoGPTQForCausalLM.from_quantized(model_dir, device="cpu", use_triton=False,
                                               disable_exllama=True, disable_exllamav2=True,
                                               torch_dtype=torch.float32)
        return m.model
    raise SystemExit(f"unknown loader {loader}")


def ensure_tokenizer(model_dir):
    """GPTQModel.load insists on a tokenizer in the model directory; qcal copies the
    source model's tokenizer files, and the test fixtures have none. Writes a
    word-level tokenizer over the ids (t0, t1, ...): scoring never tokenizes text."""
    import os

    if any(os.path.exists(os.path.join(model_dir, f))
           for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  bos_token=f"t{cfg.get('bos_token_id', 1)}",
                                  eos_token=f"t{cfg.get('eos_token_id', 2)}", unk_token="t0",
                                  pad_token="t0")
    tok.save_pretrained(model_dir)


def precision(model, logits_dtype):
    """What the loader computes in, measured rather than read from the config:
    "float16" when the logits come out in fp16 (the whole model runs in fp16);
    "float16 weights" when the effective weight of layer 0's q_proj (the module
    applied to the identity, through the loader's own kernel) is fp16-rounded, as
    when a kernel dequantizes with the fp16 scales in fp16; "float32" otherwise."""
    import torch

    if logits_dtype == torch.float16:
        return "float16"
    q = model.model.layers[0].self_attn.q_proj
    dtype = next(iter(model.parameters())).dtype
    n_in = model.config.hidden_size
    with torch.no_grad():
        w = q(torch.eye(n_in, dtype=dtype)).float()
    if torch.equal(w, w.half().float()):
        return "float16 weights"
    return str(dtype).replace("torch.", "")


def versions(loader):
    import importlib.metadata as md

    out = {}
    names = ["torch", "transformers", "compressed-tensors", "gptqmodel", "optimum", "auto-gptq"]
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def evaluate(loader, model_dir, a):
    import torch

    t0 = time.time()
    with open(f"{model_dir}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    toks = load_tokens(a.data, a.seqlen, a.nsamples, vocab)
    model = load_model(loader, model_dir)
    model.eval()
    total = 0.0
    count = 0
    logits_dtype = None
    with torch.no_grad():
        for s0 in range(0, toks.shape[0], a.batch):
            ids = torch.from_numpy(toks[s0:s0 + a.batch])
            logits = model(input_ids=ids).logits
            logits_dtype = logits.dtype
            logits = logits.to(torch.float64)
            logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            total += float(nll.sum())
            count += nll.numel()
    nll = total / count
    return {"model": model_dir, "loader": loader, "ppl": math.exp(nll), "nll": nll,
            "tokens": count, "precision": precision(model, logits_dtype),
            "seconds": round(time.time() - t0, 2), "versions": versions(loader)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loader", required=True,
                    choices=["transformers", "transformers-dequantize", "gptqmodel", "autogptq"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    for model_dir in a.models:
        try:
            out = evaluate(a.loader, model_dir, a)
        except Exception as e:  # the loader's own message is the diagnosis
            msg = f"{type(e).__name__}: {e}".strip().splitlines()
            out = {"model": model_dir, "loader": a.loader, "error": " ".join(msg)[:400]}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

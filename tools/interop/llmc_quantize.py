#!/usr/bin/env python3
"""Runs llm-compressor's GPTQ on a local model with qcal's calibration tokens and
writes a compressed-tensors checkpoint (then read by `qcal eval`). Runs inside
the venv of tools/interop/requirements-llmcompressor.txt; downloads nothing.

    llmc_quantize.py --model DIR --calib FILE.u32 --nsamples 64 --seqlen 128
                     --bits 4 --group-size 128|-1 --out DIR [--actorder static|none]
                     [--damp 0.01] [--block-size 128] [--threads 2]

Calibration: the first `nsamples` consecutive windows of `seqlen` tokens of the
.u32 stream, exactly the sequences `qcal quantize` uses, one per batch.
Prints one JSON line: {"calib_seconds", "load_seconds", "save_seconds", "versions"}.
"""
import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--actorder", default="static", choices=["static", "none"])
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    t0 = time.time()
    import numpy as np
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    toks = np.fromfile(a.calib, dtype="<u4")
    n = min(a.nsamples, len(toks) // a.seqlen)
    toks = torch.from_numpy(toks[: n * a.seqlen].astype(np.int64).reshape(n, a.seqlen))
    loader = torch.utils.data.DataLoader(
        [{"input_ids": toks[i], "attention_mask": torch.ones(a.seqlen, dtype=torch.int64)}
         for i in range(n)], batch_size=1, shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    # oneshot() wants a processor when given data; the token windows are never
    # tokenized, so a word-level tokenizer over the ids stands in for the model's.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  unk_token="t0", pad_token="t0")
    weights = {"num_bits": a.bits, "type": "int", "symmetric": True,
               "strategy": "group" if a.group_size > 0 else "channel"}
    if a.group_size > 0:
        weights["group_size"] = a.group_size
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"], block_size=a.block_size, dampening_frac=a.damp,
        actorder=None if a.actorder == "none" else a.actorder)
    t_load = time.time() - t0
    t1 = time.time()
    oneshot(model=model, processor=tok, dataset=loader, recipe=recipe,
            num_calibration_samples=n, max_seq_length=a.seqlen)
    t_calib = time.time() - t1
    t2 = time.time()
    model.save_pretrained(a.out, save_compressed=True)
    t_save = time.time() - t2
    import importlib.metadata as md
    print(json.dumps({"calib_seconds": round(t_calib, 2), "load_seconds": round(t_load, 2),
                      "save_seconds": round(t_save, 2),
                      "versions": {p: md.version(p) for p in
                                   ["torch", "transformers", "compressed-tensors",
                                    "llmcompressor"]}}))


if __name__ == "__main__":
    main()

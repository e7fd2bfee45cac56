#!/usr/bin/python3
"""The PyTorch (CPU, float32, autograd) reference timing of one FlatQuant
calibration step, the counterpart of bench/bench_flatquant_step.cc.

Same step, same shapes: a LLaMA-2-7B-shaped block (H 4096, I 11008, 32 heads,
n_kv 32, d 128, no bias) on B×T tokens; W4 per-row sym + LWC, A4 per-token sym +
LAC, K/V 4-bit asym per head + LAC; Kronecker pairs 64×64 (attention and MLP
inputs) and 86×128 (down_proj input), P_o 32×32, P_v / P_k 128×128, each with
its inverse transpose as an independent input, and the diagonals. The forward
is tools/golden_block.py's block() (the code the golden fixture checks QBlock
against), written the way FlatQuant's PyTorch code computes it (kron as two
matmuls, amax/amin ranges, round_ste). Weights frozen (no grad), x needs no
grad; the transforms, diagonals and clip parameters are leaves with grad.
Timed: forward + loss (MSE, divided by its detached value, as FlatQuant) and
loss.backward(). Not timed: building the matrices (they are inputs, as for
QBlock) and the optimizer step.

Development tool only (needs PyTorch; run with /usr/bin/python3):
    /usr/bin/python3 tools/bench_flatquant_torch.py [--B 1] [--T 256] [--threads 2] [--reps 3]
"""

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_block as gb  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    cfg = gb.Config(H=4096, NH=32, NKV=32, D=128, I=11008, B=args.B, T=args.T,
                    a_n=(64, 64), d_n=(86, 128))
    H, I, Q, KV, N = cfg.H, cfg.I, cfg.NH * cfg.D, cfg.NKV * cfg.D, cfg.B * cfg.T
    f32 = torch.float32

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=f32) * scale

    def near_identity(n):
        return (torch.eye(n, dtype=f32) + randn(n, n, scale=0.1 / n ** 0.5)).requires_grad_()

    def positive(n):
        return (0.5 + torch.rand(n, dtype=f32)).requires_grad_()

    shapes = {"q_proj": (Q, H), "k_proj": (KV, H), "v_proj": (KV, H), "o_proj": (H, Q),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    w = {p: randn(*s, scale=1.0 / s[1] ** 0.5) for p, s in shapes.items()}
    w["input_norm"] = 0.5 + torch.rand(H, dtype=f32)
    w["post_norm"] = 0.5 + torch.rand(H, dtype=f32)
    t = {}
    for pre, n1, n2 in [("a", 64, 64), ("u", 64, 64), ("d", 86, 128)]:
        for j, n in [("1", n1), ("2", n2)]:
            t[pre + j] = near_identity(n)
            t[pre + j + "_it"] = near_identity(n)
    for name, n in [("po", 32), ("pv", 128), ("pk", 128)]:
        t[name] = near_identity(n)
        t[name + "_it"] = near_identity(n)
    t["ca"], t["cu"], t["cd"] = positive(H), positive(H), positive(I)
    clip = {}
    for p, (rows, _) in shapes.items():
        for side in ("max", "min"):
            clip[f"act_{side}.{p}"] = torch.full((1,), 4.0, dtype=f32, requires_grad=True)
            clip[f"w_{side}.{p}"] = torch.full((rows,), 4.0, dtype=f32, requires_grad=True)
    for n in ("k_max", "k_min", "v_max", "v_min"):
        clip[n] = torch.full((1,), 4.0, dtype=f32, requires_grad=True)
    x = randn(N, H)
    target = randn(N, H)
    leaves = list(t.values()) + list(clip.values())

    print(f"PyTorch {torch.__version__} FlatQuant calibration step, LLaMA-2-7B block, "
          f"B {cfg.B} x T {cfg.T} tokens, fp32, {torch.get_num_threads()} thread(s)")
    best_f = best_b = best_t = float("inf")
    for r in range(args.reps + 1):  # r == 0: warm-up
        for p in leaves:
            p.grad = None
        t0 = time.perf_counter()
        y, _ = gb.block(x, w, t, clip, True, cfg)
        mse = torch.mean((y - target) ** 2)
        loss = mse / mse.detach()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        del y, mse, loss
        print(f"  rep {r}{' (warm-up)' if r == 0 else ''}: forward {(t1 - t0) * 1e3:.1f} ms, "
              f"backward {(t2 - t1) * 1e3:.1f} ms, total {(t2 - t0) * 1e3:.1f} ms", flush=True)
        if r > 0:
            best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
            best_t = min(best_t, t2 - t0)
    bad = [p for p in leaves if p.grad is None or not torch.isfinite(p.grad).all()]
    if bad:
        print(f"{len(bad)} parameters without a finite gradient", file=sys.stderr)
        return 1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nbest of {args.reps}:")
    print("| phase | ms |\n|---|---|")
    print(f"| forward | {best_f * 1e3:.1f} |\n| backward | {best_b * 1e3:.1f} |\n"
          f"| total (best step) | {best_t * 1e3:.1f} |")
    print(f"peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The PyTorch peer of bench/bench_cuda_ops.cc (issue #13): the same op set of
one FlatQuant calibration step, at the same shapes and T, forward + backward
through autograd on the same GPU, fp32 (TF32 off unless --tf32).

STATUS: a skeleton. It has never run: the machine it was written on has neither
a GPU nor torch; without them it prints why and exits 77 (skipped).
deploy/gpu-check.sh runs it after bench_cuda_ops on the GPU machine (whose
python3 holds torch); a failure there is recorded, not fatal.

Ops (as bench_cuda_ops): rmsnorm; rope on q and k; swiglu; fake quant with a
straight-through round (per token A4 sym LAC, per channel W4 sym LWC, per head
K4 asym LAC); the two Kronecker transforms L^T X R; causal GQA attention, both
written out (matmul, mask, softmax, matmul: the device ops' algorithm) and as
F.scaled_dot_product_attention (PyTorch's fused kernel: the flash-style peer);
one AdamW step over the transform parameters (fp64); the seven linears forward
X W^T and backward dY W. Each is the median of --reps synchronized runs after
one warm-up. The output table has bench_cuda_ops's columns.

Usage: python3 bench/torch_flatquant_ops.py [--T 2048] [--reps 10]
                                            [--shapes 7b,70b] [--tf32] [--out FILE.tsv]
"""
import argparse
import statistics
import sys
import time

SHAPES = {
    # name: H, I, n_h, n_kv, d, (k1, k2), (m1, m2)
    "7b": (4096, 11008, 32, 32, 128, (64, 64), (86, 128)),
    "70b": (8192, 28672, 64, 8, 128, (64, 128), (224, 128)),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default="7b,70b")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not 1 <= a.T <= 65536 or not 1 <= a.reps <= 1000:
        ap.error("--T must be in 1..65536 and --reps in 1..1000")
    shapes = a.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape '{s}' (7b, 70b)")
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"torch_flatquant_ops: skipped: no torch ({e})")
        return 77
    if not torch.cuda.is_available():
        print("torch_flatquant_ops: skipped: torch sees no GPU")
        return 77
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"torch_flatquant_ops: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"T {a.T}, reps {a.reps}, matmuls {'TF32' if a.tf32 else 'fp32'}", flush=True)

    def timed(body):
        body()
        torch.cuda.synchronize()
        t = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            body()
            torch.cuda.synchronize()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t)

    def leaf(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, device=dev, dtype=dtype) * scale).requires_grad_(True)

    def ste_round(v):
        return v + (torch.round(v) - v).detach()

    def fake_quant(x, bits, sym, group, bmax, bmin, lwc):
        """x (R, C) in groups of `group` columns; learned clip sigmoid(beta)."""
        R, C = x.shape
        xg = x.reshape(R, C // group, group)
        mx = xg.amax(dim=-1, keepdim=True)
        mn = xg.amin(dim=-1, keepdim=True)
        if not lwc:
            mx, mn = mx.clamp(min=0), mn.clamp(max=0)
        xmax = mx * torch.sigmoid(bmax)
        xmin = mn * torch.sigmoid(bmin)
        if sym:
            qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
            s = (torch.maximum(xmax, xmin.abs()) / qmax).clamp(min=1e-8)
            z = torch.zeros_like(s)
        else:
            qmax, qmin = 2 ** bits - 1, 0
            s = ((xmax - xmin) / qmax).clamp(min=1e-8)
            z = torch.round(-xmin / s).detach()
        xc = torch.minimum(torch.maximum(xg, xmin), xmax) if lwc else xg
        q = torch.clamp(ste_round(xc / s) + z, qmin, qmax)
        return (s * (q - z)).reshape(R, C)

    rows = []

    def add(shape, op, dims, ms, gemm=False):
        print(f"  {shape:<4} {op:<34} {dims:<22} {ms:9.3f} ms", flush=True)
        rows.append((shape, op, dims, ms, gemm))

    for name in shapes:
        H, I, n_h, n_kv, d, (k1, k2), (m1, m2) = SHAPES[name]
        T = a.T
        qd, kd = n_h * d, n_kv * d

        x, gamma = leaf(T, H), leaf(H)
        dy = torch.randn(T, H, device=dev)

        def rmsnorm():
            y = gamma * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            y.backward(dy)
        add(name, "torch rmsnorm fwd+bwd", f"{T}x{H}", timed(rmsnorm))
        del x, gamma, dy

        q, k = leaf(T, n_h, d), leaf(T, n_kv, d)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float64) / d))
        ang = torch.arange(T, device=dev, dtype=torch.float64)[:, None] * inv[None, :]
        cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None, :]
        sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None, :]
        dq, dk = torch.randn_like(q), torch.randn_like(k)

        def rot(t):
            h = t.shape[-1] // 2
            return torch.cat([-t[..., h:], t[..., :h]], -1)

        def rope():
            torch.autograd.backward([q * cos + rot(q) * sin, k * cos + rot(k) * sin], [dq, dk])
        add(name, "torch rope fwd+bwd (q, k)", f"{T}x{qd + kd}", timed(rope))
        del q, k, dq, dk

        g, u = leaf(T, I), leaf(T, I)
        dout = torch.randn(T, I, device=dev)

        def swiglu():
            (F.silu(g) * u).backward(dout)
        add(name, "torch swiglu fwd+bwd", f"{T}x{I}", timed(swiglu))
        del g, u, dout

        for op, R, C, bits, sym, group, lwc, nb in (
                ("torch fq per-token A4 LAC", T, H, 4, True, H, False, 1),
                ("torch fq per-channel W4 LWC", I, H, 4, True, H, True, I),
                ("torch fq per-head K4 asym LAC", T, kd, 4, False, d, False, 1)):
            xx = leaf(R, C)
            shape_b = (nb, 1, 1) if nb > 1 else (1, 1, 1)
            bmax, bmin = leaf(*shape_b, scale=0.1), leaf(*shape_b, scale=0.1)
            dyy = torch.randn(R, C, device=dev)

            def fq():
                fake_quant(xx, bits, sym, group, bmax, bmin, lwc).backward(dyy)
            add(name, op, f"{R}x{C}", timed(fq))
            del xx, bmax, bmin, dyy

        for op, n1, n2 in (("torch kron fwd+bwd (block input)", k1, k2),
                           ("torch kron fwd+bwd (down input)", m1, m2)):
            X, L, Rm = leaf(T, n1, n2), leaf(n1, n1, scale=0.1), leaf(n2, n2, scale=0.1)
            dY = torch.randn(T, n1, n2, device=dev)

            def kron():
                (L.t() @ X @ Rm).backward(dY)
            add(name, op, f"{T}x{n1}x{n2}", timed(kron))
            del X, L, Rm, dY

        q, k, v = leaf(n_h, T, d), leaf(n_kv, T, d), leaf(n_kv, T, d)
        do = torch.randn(n_h, T, d, device=dev)
        mask = torch.ones(T, T, device=dev, dtype=torch.bool).triu(1)

        def attn_manual():
            kk, vv = k.repeat_interleave(n_h // n_kv, 0), v.repeat_interleave(n_h // n_kv, 0)
            s = (q @ kk.transpose(1, 2)) * (1.0 / d ** 0.5)
            p = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
            (p @ vv).backward(do)

        def attn_sdpa():
            kk, vv = k.repeat_interleave(n_h // n_kv, 0), v.repeat_interleave(n_h // n_kv, 0)
            F.scaled_dot_product_attention(q[None], kk[None], vv[None], is_causal=True).backward(do[None])
        add(name, "torch attention fwd+bwd", f"{T}x{n_h}x{n_kv}x{d}", timed(attn_manual))
        add(name, "torch attention sdpa fwd+bwd", f"{T}x{n_h}x{n_kv}x{d}", timed(attn_sdpa))
        del q, k, v, do, mask

        n = k1 * k1 + k2 * k2 + m1 * m1 + m2 * m2 + n_h * n_h + d * d
        p = torch.nn.Parameter(torch.randn(n, device=dev, dtype=torch.float64))
        p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
        add(name, "torch adamw step", f"{n}", timed(opt.step))
        del p, opt

        for lname, fin, fout in (("q", H, qd), ("k", H, kd), ("v", H, kd), ("o", qd, H),
                                 ("gate", H, I), ("up", H, I), ("down", I, H)):
            X = torch.randn(T, fin, device=dev)
            W = torch.randn(fout, fin, device=dev) * 0.02

            def lin():
                y = X @ W.t()
                return y @ W
            add(name, f"torch gemm {lname} fwd+bwd", f"{T}x{fin}x{fout}", timed(lin), gemm=True)
            del X, W
        torch.cuda.empty_cache()

    out = open(a.out, "w") if a.out else None
    if out:
        out.write("shape\top\tdims\tms\tshare\tkind\n")
    print(f"\n{'shape':<5} {'op':<34} {'dims':<22} {'ms':>10} {'share':>7}")
    for name in shapes:
        total = sum(r[3] for r in rows if r[0] == name)
        for shape, op, dims, ms, gemm in rows:
            if shape != name:
                continue
            share = 100.0 * ms / total if total > 0 else 0.0
            print(f"{shape:<5} {op:<34} {dims:<22} {ms:10.3f} {share:6.1f}%")
            if out:
                out.write(f"{shape}\t{op}\t{dims}\t{ms:.4f}\t{share:.2f}\t{'gemm' if gemm else 'op'}\n")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

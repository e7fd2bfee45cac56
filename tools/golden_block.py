#!/usr/bin/python3
"""Golden values for calib::QBlock (worker/calib/qblock.h), from an independent
PyTorch float64 autograd implementation of the forward in qblock.h's top comment
(methods.md §0.1, §0.2, §5.1, §5.2; quantizer formulas of kernels/grad.h).

Development tool only: needs PyTorch (Debian python3-torch; run with
/usr/bin/python3). The product never imports it; CI uses the committed fixture
tests/fixtures/golden_block.bin, read by tests/unit/test_qblock_golden.cc.

    /usr/bin/python3 tools/golden_block.py [--out tests/fixtures/golden_block.bin] [--seed 3]

Block: H=16, n_h=4, n_kv=2 (GQA, query head h uses KV head h // 2), d=4, I=24,
B=2 sequences × T=5 tokens, rope_theta 1e4 (HF rotate-half, positions 0..T−1 per
sequence), RMSNorm eps 1e-6, q/k/v biases. Random weights; random invertible
Kronecker factors (H = 4×4, I = 4×6) and po (n_h), pv, pk (d), each P given
together with its inverse transpose P_it as a separate, independent input;
positive random diagonals ca, cu, cd; clip parameters β drawn uniformly in
[2.5, 5] (FlatQuant initializes them to 4). The default seed 3 was picked so
that every rounding argument is ≥ 1e-4 away from a half-integer (robust to the
float64 noise of a different summation order) and no clip gradient is exactly 0.

Two cases, same inputs:
  "quant": W4 per-row sym with LWC (ClipMode::kLearned + lwc_range, one β pair per
           row, min_scale 1e-5); A4 per-token sym with LAC (one scalar β pair per
           linear: q, k, v, o, gate, up, down); K and V 4-bit asym per (token, head)
           (group = d) with LAC. Straight-through estimator: FlatQuant's
           round_ste(v) = v + (round(v) − v).detach(), scale not detached, zero
           point round(−xmin/s) detached. torch.round is half-to-even.
  "fp":    every quantizer off (bits 16), transforms on.
The loss is sum(y ⊙ G) for a fixed random G (B·T, H); the script stores y and the
autograd gradient of the loss w.r.t. x, every transform matrix (P and P_it
separately), every diagonal, every clip parameter ("quant" only), every weight,
bias and norm; and ("quant" only) the effective weights, i.e. the tensors each
linear multiplies by (transformed, LWC-clipped, fake-quantized), and the
effective (per-head transformed) bias of v.

File format (little-endian):
  8 bytes   magic "QCALGOLD"
  u32       version = 1
  u32       number of tensors N
  N times:  u32 name length L, L bytes name (ASCII),
            u32 ndim, ndim × i64 dims, prod(dims) × f64 data (row-major)

Tensor names. Inputs:
  config            [H, n_h, n_kv, d, I, B, T, rope_theta, rms_eps]
  x, G              (B·T, H)
  w.input_norm, w.post_norm (H); w.q_proj, w.k_proj, w.v_proj, w.o_proj,
  w.gate_proj, w.up_proj, w.down_proj (HF [out, in]); w.q_bias, w.k_bias, w.v_bias
  t.<a1|a2|a1_it|a2_it|ca|u1|u2|u1_it|u2_it|cu|d1|d2|d1_it|d2_it|cd|po|po_it|pv|pv_it|pk|pk_it>
  clip.act_max.<proj>, clip.act_min.<proj> (1); clip.w_max.<proj>, clip.w_min.<proj>
  (out rows); clip.k_max, clip.k_min, clip.v_max, clip.v_min (1)
  (<proj> is q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
Outputs, for <case> in {quant, fp}:
  <case>.y, <case>.dx (B·T, H); <case>.dw.<name> for each w.<name>;
  <case>.dt.<name> for each t.<name>; quant.dclip.<name> for each clip.<name>;
  quant.weff.<proj> (effective weight, [out, in]); quant.beff.v_proj (n_kv·d)
"""

import argparse
import struct
import sys

import numpy as np
import torch

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Config:
    """Block shape. The defaults are the fixture's; tools/bench_flatquant_torch.py
    uses the same code with LLaMA-2-7B sizes."""

    def __init__(self, H=16, NH=4, NKV=2, D=4, I=24, B=2, T=5, theta=10000.0, eps=1e-6,
                 a_n=(4, 4), d_n=(4, 6)):
        self.H, self.NH, self.NKV, self.D, self.I = H, NH, NKV, D, I
        self.B, self.T, self.THETA, self.EPS = B, T, theta, eps
        self.A_N1, self.A_N2 = a_n  # Kronecker factors of H
        self.D_N1, self.D_N2 = d_n  # Kronecker factors of I


# Smallest distance of any rounded argument to a half-integer (a rounding
# decision that float64 noise could flip); tracked when MARGIN[1] is set, must
# stay far above 1e-12.
MARGIN = [float("inf"), False]


def round_ste(v):
    if MARGIN[1]:
        frac = v.detach() - torch.floor(v.detach())
        MARGIN[0] = min(MARGIN[0], (frac - 0.5).abs().min().item())
    return v + (torch.round(v) - v).detach()


def fake_quant(x, bits, sym, group, beta_max, beta_min, lwc_range, min_scale):
    """kernels/grad.h FakeQuantSpec with ClipMode::kLearned, Ste::kLsq on x (rows, cols)."""
    if bits >= 16:
        return x
    rows, cols = x.shape
    g = cols if group < 0 else group
    ng = cols // g
    X = x.reshape(rows, ng, g)
    # LAC: one scalar pair; LWC: one pair per row·group.
    shape = (1, 1, 1) if beta_max.numel() == 1 else (rows, ng, 1)
    cmax = torch.sigmoid(beta_max).reshape(shape)
    cmin = torch.sigmoid(beta_min).reshape(shape)
    rmax = X.amax(dim=-1, keepdim=True)
    rmin = X.amin(dim=-1, keepdim=True)
    if lwc_range:
        xmax = rmax * cmax
        xmin = rmin * cmin
        X = torch.clamp(X, min=xmin, max=xmax)
    else:
        xmax = torch.clamp(rmax, min=0.0) * cmax
        xmin = torch.clamp(rmin, max=0.0) * cmin
    if sym:
        maxq = 2 ** (bits - 1) - 1
        s = torch.maximum(xmin.abs(), xmax) / maxq
        s = torch.where(s == 0, torch.ones_like(s), s)
        if min_scale > 0:
            s = torch.clamp(s, min=min_scale)
        q = torch.clamp(round_ste(X / s), -(maxq + 1), maxq)
        y = s * q
    else:
        maxq = 2 ** bits - 1
        s = (xmax - xmin) / maxq
        s = torch.where(xmax == xmin, torch.ones_like(s), s)
        if min_scale > 0:
            s = torch.clamp(s, min=min_scale)
        z = torch.round(-xmin / s).detach()
        q = torch.clamp(round_ste(X / s) + z, 0, maxq)
        y = s * (q - z)
    return y.reshape(rows, cols)


def kron(x, L, R, n1, n2):
    """Each row x (n1·n2) as X (n1, n2): Y = Lᵀ X R  (= x (L ⊗ R)). None = identity."""
    X = x.reshape(-1, n1, n2)
    if L is not None:
        X = torch.matmul(L.t(), X)
    if R is not None:
        X = torch.matmul(X, R)
    return X.reshape(x.shape)


def rmsnorm(x, g, eps):
    r = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return g * (x * r)


def rope(x, heads, cfg):
    """x (B·T, heads·D), HF rotate-half, positions 0..T−1 per sequence."""
    B, T, D, THETA = cfg.B, cfg.T, cfg.D, cfg.THETA
    inv_freq = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = torch.arange(T, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (T, D)
    X = x.reshape(B, T, heads, D)
    x1, x2 = X[..., : D // 2], X[..., D // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    Y = X * cos[None, :, None, :] + rot * sin[None, :, None, :]
    return Y.reshape(x.shape)


def attention(q, k, v, cfg):
    """Causal GQA, scale 1/sqrt(D). q (B·T, NH·D), k/v (B·T, NKV·D)."""
    B, T, NH, NKV, D = cfg.B, cfg.T, cfg.NH, cfg.NKV, cfg.D
    Q = q.reshape(B, T, NH, D).permute(0, 2, 1, 3)
    K = k.reshape(B, T, NKV, D).permute(0, 2, 1, 3).repeat_interleave(NH // NKV, dim=1)
    V = v.reshape(B, T, NKV, D).permute(0, 2, 1, 3).repeat_interleave(NH // NKV, dim=1)
    S = torch.matmul(Q, K.transpose(-1, -2)) / (D ** 0.5)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    S = S.masked_fill(mask, float("-inf"))
    P = torch.softmax(S, dim=-1)
    O = torch.matmul(P, V)
    return O.permute(0, 2, 1, 3).reshape(B * T, NH * D)


def block(x, w, t, clip, quant, cfg):
    """The qblock.h forward. Returns y and the effective weights / v bias."""
    B, T, H, NH, NKV, D = cfg.B, cfg.T, cfg.H, cfg.NH, cfg.NKV, cfg.D
    A_N1, A_N2, D_N1, D_N2 = cfg.A_N1, cfg.A_N2, cfg.D_N1, cfg.D_N2
    def fq_act(p, a):
        if not quant:
            return a
        return fake_quant(a, 4, True, -1, clip["act_max." + p], clip["act_min." + p], False, 0.0)

    def fq_w(p, W):
        if not quant:
            return W
        return fake_quant(W, 4, True, -1, clip["w_max." + p], clip["w_min." + p], True, 1e-5)

    def fq_kv(which, a):
        if not quant:
            return a
        return fake_quant(a, 4, False, D, clip[which + "_max"], clip[which + "_min"], False, 0.0)

    weff = {}
    h = rmsnorm(x, w["input_norm"], cfg.EPS)
    ht = kron(h * t["ca"], t["a1"], t["a2"], A_N1, A_N2)
    outs = {}
    for p in ["q_proj", "k_proj", "v_proj"]:
        Wt = kron(w[p] / t["ca"], t["a1_it"], t["a2_it"], A_N1, A_N2)
        b = w.get(p[0] + "_bias")
        if p == "v_proj" and b is not None:
            # Bias per KV head ← b_h pv.
            b = torch.matmul(b.reshape(NKV, D), t["pv"]).reshape(NKV * D)
            weff["beff.v_proj"] = b
        if p == "v_proj":
            # Per KV head block Wb (D, H) ← pvᵀ Wb.
            Wt = torch.matmul(t["pv"].t(), Wt.reshape(NKV, D, H)).reshape(NKV * D, H)
        Wq = fq_w(p, Wt)
        weff[p] = Wq
        outs[p] = torch.matmul(fq_act(p, ht), Wq.t()) + (b if b is not None else 0)
    q = rope(outs["q_proj"], NH, cfg)
    k = rope(outs["k_proj"], NKV, cfg)
    v = outs["v_proj"]
    q = torch.matmul(q.reshape(-1, NH, D), t["pk_it"]).reshape(B * T, NH * D)
    k = torch.matmul(k.reshape(-1, NKV, D), t["pk"]).reshape(B * T, NKV * D)
    k = fq_kv("k", k)
    v = fq_kv("v", v)
    a = attention(q, k, v, cfg)
    at = kron(a, t["po"], None, NH, D)
    Wo = fq_w("o_proj", kron(w["o_proj"], t["po_it"], t["pv_it"], NH, D))
    weff["o_proj"] = Wo
    x = x + torch.matmul(fq_act("o_proj", at), Wo.t())
    m = rmsnorm(x, w["post_norm"], cfg.EPS)
    mt = kron(m * t["cu"], t["u1"], t["u2"], A_N1, A_N2)
    gu = {}
    for p in ["gate_proj", "up_proj"]:
        Wt = fq_w(p, kron(w[p] / t["cu"], t["u1_it"], t["u2_it"], A_N1, A_N2))
        weff[p] = Wt
        gu[p] = torch.matmul(fq_act(p, mt), Wt.t())
    g = gu["gate_proj"]
    z = g * torch.sigmoid(g) * gu["up_proj"]
    zt = kron(z * t["cd"], t["d1"], t["d2"], D_N1, D_N2)
    Wd = fq_w("down_proj", kron(w["down_proj"] / t["cd"], t["d1_it"], t["d2_it"], D_N1, D_N2))
    weff["down_proj"] = Wd
    y = x + torch.matmul(fq_act("down_proj", zt), Wd.t())
    return y, weff


def rand_invertible(rng, n):
    """Random well-conditioned invertible matrix U diag(σ) Vᵀ, σ in [0.7, 1.4]."""
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = rng.uniform(0.7, 1.4, n)
    return (u * s) @ v.T


def make_inputs(seed, cfg):
    H, NH, NKV, D, I, B, T = cfg.H, cfg.NH, cfg.NKV, cfg.D, cfg.I, cfg.B, cfg.T
    A_N1, A_N2, D_N1, D_N2 = cfg.A_N1, cfg.A_N2, cfg.D_N1, cfg.D_N2
    rng = np.random.default_rng(seed)
    w = {
        "input_norm": 1.0 + 0.2 * rng.standard_normal(H),
        "post_norm": 1.0 + 0.2 * rng.standard_normal(H),
        "q_proj": rng.standard_normal((NH * D, H)) / np.sqrt(H),
        "k_proj": rng.standard_normal((NKV * D, H)) / np.sqrt(H),
        "v_proj": rng.standard_normal((NKV * D, H)) / np.sqrt(H),
        "o_proj": rng.standard_normal((H, NH * D)) / np.sqrt(NH * D),
        "gate_proj": rng.standard_normal((I, H)) / np.sqrt(H),
        "up_proj": rng.standard_normal((I, H)) / np.sqrt(H),
        "down_proj": rng.standard_normal((H, I)) / np.sqrt(I),
        "q_bias": 0.1 * rng.standard_normal(NH * D),
        "k_bias": 0.1 * rng.standard_normal(NKV * D),
        "v_bias": 0.1 * rng.standard_normal(NKV * D),
    }
    t = {}
    for pre, n1, n2 in [("a", A_N1, A_N2), ("u", A_N1, A_N2), ("d", D_N1, D_N2)]:
        for j, n in [("1", n1), ("2", n2)]:
            P = rand_invertible(rng, n)
            t[pre + j] = P
            t[pre + j + "_it"] = np.linalg.inv(P).T
    for name, n in [("po", NH), ("pv", D), ("pk", D)]:
        P = rand_invertible(rng, n)
        t[name] = P
        t[name + "_it"] = np.linalg.inv(P).T
    t["ca"] = rng.uniform(0.5, 2.0, H)
    t["cu"] = rng.uniform(0.5, 2.0, H)
    t["cd"] = rng.uniform(0.5, 2.0, I)
    rows = {"q_proj": NH * D, "k_proj": NKV * D, "v_proj": NKV * D, "o_proj": H,
            "gate_proj": I, "up_proj": I, "down_proj": H}
    clip = {}
    for p in PROJS:
        clip["act_max." + p] = rng.uniform(2.5, 5.0, 1)
        clip["act_min." + p] = rng.uniform(2.5, 5.0, 1)
    for p in PROJS:
        clip["w_max." + p] = rng.uniform(2.5, 5.0, rows[p])
        clip["w_min." + p] = rng.uniform(2.5, 5.0, rows[p])
    for n in ["k_max", "k_min", "v_max", "v_min"]:
        clip[n] = rng.uniform(2.5, 5.0, 1)
    x = rng.standard_normal((B * T, H))
    G = rng.standard_normal((B * T, H))
    return x, G, w, t, clip


def run_case(x0, G0, w0, t0, clip0, quant, cfg):
    to = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)
    x = to(x0)
    w = {k: to(v) for k, v in w0.items()}
    t = {k: to(v) for k, v in t0.items()}
    clip = {k: to(v) for k, v in clip0.items()}
    y, weff = block(x, w, t, clip, quant, cfg)
    loss = (y * torch.tensor(G0)).sum()
    leaves = [x] + list(w.values()) + list(t.values()) + (list(clip.values()) if quant else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    gmap = dict(zip(["x"] + ["w." + k for k in w] + ["t." + k for k in t]
                    + (["clip." + k for k in clip] if quant else []), grads))
    case = "quant" if quant else "fp"
    out = {case + ".y": y.detach().numpy()}
    for name, g in gmap.items():
        if g is None:
            g = torch.zeros_like(x if name == "x" else (w | t | clip)[name.split(".", 1)[1]])
        key = {"x": "dx"}.get(name, "d" + name)
        out[case + "." + key] = g.detach().numpy()
    if quant:
        for k, v in weff.items():
            out["quant." + (k if k.startswith("beff") else "weff." + k)] = v.detach().numpy()
    return out


def self_check(x0, w0, t0, cfg):
    """With quantizers off, P·P⁻¹ = I makes the block equal to the plain LLaMA block."""
    x = torch.tensor(x0)
    w = {k: torch.tensor(v) for k, v in w0.items()}
    t = {k: torch.tensor(v) for k, v in t0.items()}
    ident = {k: (torch.ones_like(v) if k.startswith("c") else torch.eye(v.shape[0]))
             for k, v in t.items()}
    y_t, _ = block(x, w, t, {}, False, cfg)
    y_0, _ = block(x, w, ident, {}, False, cfg)
    err = (y_t - y_0).abs().max().item()
    assert err < 1e-12, f"transformed FP block differs from the plain block by {err}"
    return err


def write_fixture(path, tensors):
    buf = bytearray()
    buf += b"QCALGOLD"
    buf += struct.pack("<II", 1, len(tensors))
    for name, a in tensors.items():
        a = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
        nb = name.encode("ascii")
        buf += struct.pack("<I", len(nb)) + nb
        buf += struct.pack("<I", a.ndim)
        for dim in a.shape:
            buf += struct.pack("<q", dim)
        buf += a.tobytes()
    with open(path, "wb") as f:
        f.write(buf)
    return len(buf)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/golden_block.bin")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    cfg = Config()
    x, G, w, t, clip = make_inputs(args.seed, cfg)
    err = self_check(x, w, t, cfg)
    MARGIN[1] = True
    tensors = {"config": np.array([cfg.H, cfg.NH, cfg.NKV, cfg.D, cfg.I, cfg.B, cfg.T, cfg.THETA,
                                   cfg.EPS], dtype=np.float64),
               "x": x, "G": G}
    tensors.update({"w." + k: v for k, v in w.items()})
    tensors.update({"t." + k: v for k, v in t.items()})
    tensors.update({"clip." + k: v for k, v in clip.items()})
    for quant in (True, False):
        tensors.update(run_case(x, G, w, t, clip, quant, cfg))
    assert MARGIN[0] > 1e-9, f"a rounding argument is {MARGIN[0]} from a half-integer"
    n = write_fixture(args.out, tensors)
    print(f"wrote {args.out}: {len(tensors)} tensors, {n} bytes (FP transformed vs plain "
          f"block: {err:.2e}; rounding margin {MARGIN[0]:.2e})", file=sys.stderr)


if __name__ == "__main__":
    main()

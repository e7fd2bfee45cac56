// The calibration pipelines (methods.md §1 SmoothQuant, §3 QuaRot, §4 SpinQuant's
// folding, §5 FlatQuant) on an in-memory FP model.
//
// Every method ends in the same "deployed" form of a layer (struct Deployed): the
// effective weights the inference engine multiplies with (every offline transform
// folded in float64 and cast once), the norms with their diagonals folded, the
// online, activation-side transforms only (a1/a2, u1/u2, d1/d2, po, pk/pk_it), and
// the activation / K / V quantizers with fixed clip ratios. A QBlock<float> over the
// deployed form computes exactly what native_logits computes (up to the integer
// kernels' rounding), so the GPTQ walk collects its Hessians from it (transformed,
// act-quantized inputs; §2.3: the quantized outputs feed the next layer), and the
// NativeLayer is a copy of it with the weights packed.
//
// Letters: N calibration sequences of T tokens, H hidden, I intermediate, n_h / n_kv
// heads, d head dim, V vocab.
#include "worker/calib/methods.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/dtype.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/model_dir.h"
#include "common/path_policy.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "kernels/grad.h"
#include "kernels/hadamard.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/param.h"
#include "worker/calib/qblock.h"
#include "worker/engine/gptq.h"
#include "worker/engine/qformats.h"
#include "worker/engine/quantize.h"
#include "worker/engine/quantizer.h"

namespace qcal::calib {

namespace {

using Vec = std::vector<double>;

Vec to_d(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }
std::vector<float> to_f(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

// kProjNames entry ("self_attn.q_proj") or its last component ("q_proj") → Proj; -1 if none.
int proj_index(const std::string& name) {
  for (int p = 0; p < kNumProj; ++p) {
    const std::string full = kProjNames[p];
    if (name == full) return p;
    const std::string tail = full.substr(full.find('.') + 1);
    if (name == tail) return p;
  }
  return -1;
}

// A (rows, n) ← A·M (M n×n), in float64, cast back once.
void right_mul(std::vector<float>& A, int64_t rows, int64_t n, const Vec& M) {
  Vec a = to_d(A), out(static_cast<size_t>(rows * n));
  gemm_t(false, false, rows, n, n, 1.0, a.data(), n, M.data(), n, 0.0, out.data(), n);
  A = to_f(out);
}
// A (n, cols) ← Mᵀ·A (M n×n), in float64, cast back once.
void left_mul_t(std::vector<float>& A, int64_t n, int64_t cols, const Vec& M) {
  Vec a = to_d(A), out(static_cast<size_t>(n * cols));
  gemm_t(true, false, n, cols, n, 1.0, M.data(), n, a.data(), cols, 0.0, out.data(), cols);
  A = to_f(out);
}
// Columns of W (rows, n) times s (n), in float64.
void scale_cols(std::vector<float>& W, int64_t n, const Vec& s) {
  const int64_t rows = static_cast<int64_t>(W.size()) / n;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float& w = W[static_cast<size_t>(r * n + j)];
      w = static_cast<float>(static_cast<double>(w) * s[static_cast<size_t>(j)]);
    }
}

bool all_ones(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return x == 1.0f; });
}

double sigmoid(double b) { return 1.0 / (1.0 + std::exp(-b)); }

// ---- Activations of the calibration set.

// x (N·T, H) = embedding rows of every calibration token.
std::vector<float> embed_tokens(const FpModel& m, const TokenSequences& calib) {
  const int64_t H = m.config.hidden_size;
  std::vector<float> x(calib.tokens.size() * static_cast<size_t>(H));
  for (size_t i = 0; i < calib.tokens.size(); ++i) {
    const float* e = m.embed.data() + static_cast<int64_t>(calib.tokens[i]) * H;
    std::copy(e, e + H, x.begin() + static_cast<int64_t>(i) * H);
  }
  return x;
}

// Runs `qb` over the N sequences of x (N·T, H) in batches of `batch`; writes y
// (N·T, H; must not alias x) unless null. `hook` gets each linear's input and
// *cur_batch is set to the batch's sequence count before its forward.
void run_block(const QBlock<float>& qb, const float* x, float* y, int64_t N, int64_t T, int64_t H,
               int64_t batch, const LinearInputHook& hook = nullptr, int64_t* cur_batch = nullptr) {
  std::vector<float> scratch;
  for (int64_t b0 = 0; b0 < N; b0 += batch) {
    const int64_t nb = std::min(batch, N - b0);
    float* out = y;
    if (y) {
      out = y + b0 * T * H;
    } else {
      scratch.resize(static_cast<size_t>(nb * T * H));
      out = scratch.data();
    }
    if (cur_batch) *cur_batch = nb;
    qb.forward(x + b0 * T * H, out, nb, T, nullptr, hook);
  }
}

// Per-channel running max |x| (initialized at 1e-5, FlatQuant's convention) of the
// inputs of q (= k, v), gate (= up) and down of one FP layer.
struct ActStats {
  std::vector<float> attn, mlp, down;  // (H), (H), (I)
};
void update_max(std::vector<float>& m, const float* x, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j)
      m[static_cast<size_t>(j)] = std::max(m[static_cast<size_t>(j)], std::fabs(x[r * n + j]));
}

// The FP forward of one layer over the calibration activations: y = layer(x), with the
// act-max statistics when `stats` is set.
void fp_layer(const ModelConfig& c, const BlockWeightsT<float>& w, const float* x, float* y,
              int64_t N, int64_t T, int64_t batch, ActStats* stats) {
  static const BlockTransformsT<float> kNoTransforms;
  static const BlockQuantSpec kNoQuant;
  static const BlockClipT<float> kNoClip;
  QBlock<float> qb(c, &w, &kNoTransforms, &kNoQuant, &kNoClip);
  LinearInputHook hook;
  if (stats) {
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    stats->attn.assign(static_cast<size_t>(H), 1e-5f);
    stats->mlp.assign(static_cast<size_t>(H), 1e-5f);
    stats->down.assign(static_cast<size_t>(I), 1e-5f);
    hook = [stats, H, I](const std::string& proj, const float* xin, int64_t rows, int64_t) {
      const int p = proj_index(proj);
      if (p == kQ) update_max(stats->attn, xin, rows, H);
      if (p == kGate) update_max(stats->mlp, xin, rows, H);
      if (p == kDown) update_max(stats->down, xin, rows, I);
    };
  }
  run_block(qb, x, y, N, T, c.hidden_size, batch, hook);
}

// ---- The deployed form of a layer (see the file comment).
struct Deployed {
  BlockWeightsT<float> w;          // effective weights, folded norms, transformed biases
  BlockTransformsT<float> online;  // activation side only
  BlockQuantSpec q;                // weights off; act/K/V with fixed clip ratios
};

// The deployed weights of layer weights `w` under transforms `t` (float64; the "_it"
// matrices act on the weights, the others on activations) and the weight quantizer
// spec `wq` + `clip` (FlatQuant's LWC is baked in: the clamp to the learned range).
Deployed deploy(const ModelConfig& c, const BlockWeightsT<float>& w,
                const BlockTransformsT<double>& t, const BlockQuantSpec& wq,
                const BlockClipT<double>& clip) {
  Deployed dl;
  dl.w = w;
  const BlockWeightsT<double> wd = cast_weights<double>(w);
  QBlock<double> qb(c, &wd, &t, &wq, &clip);
  for (int p = 0; p < kNumProj; ++p) dl.w.w[p] = to_f(qb.effective_weight(p, /*quantized=*/false));
  for (int p = 0; p < 3; ++p)
    if (!w.bias[p].empty()) dl.w.bias[p] = to_f(qb.effective_bias(p));
  // Diagonals: x ⊙ c on the activation side goes into the norm γ (ca, cu), and into the
  // rows of W_up for cd (z ⊙ cd = silu(gate) ⊙ (up ⊙ cd)); a positive or negative row
  // scale commutes with per-row symmetric quantization (the grid is symmetric up to
  // the unused −2^(b−1) code and rounding is odd-symmetric).
  auto fold_diag = [](std::vector<float>& g, const Vec& cdiag) {
    for (size_t j = 0; j < g.size(); ++j)
      g[j] = static_cast<float>(static_cast<double>(g[j]) * cdiag[j]);
  };
  if (!t.ca.empty()) {
    dl.w.input_norm = w.input_norm;
    fold_diag(dl.w.input_norm, t.ca);
  }
  if (!t.cu.empty()) {
    dl.w.post_norm = w.post_norm;
    fold_diag(dl.w.post_norm, t.cu);
  }
  if (!t.cd.empty()) {
    Vec up = qb.effective_weight(kUp, false);
    const int64_t I = c.intermediate_size, H = c.hidden_size;
    for (int64_t i = 0; i < I; ++i)
      for (int64_t j = 0; j < H; ++j)
        up[static_cast<size_t>(i * H + j)] *= t.cd[static_cast<size_t>(i)];
    dl.w.w[kUp] = to_f(up);
  }
  dl.online.a1 = to_f(t.a1);
  dl.online.a2 = to_f(t.a2);
  dl.online.u1 = to_f(t.u1);
  dl.online.u2 = to_f(t.u2);
  dl.online.d1 = to_f(t.d1);
  dl.online.d2 = to_f(t.d2);
  dl.online.po = to_f(t.po);
  dl.online.pk = to_f(t.pk);
  dl.online.pk_it = to_f(t.pk_it);
  return dl;
}

// The act/K/V quantizers of the deployed form: the recipe's, weights off, learned
// clips (LAC) turned into their fixed ratios sigmoid(β).
BlockQuantSpec deployed_spec(const CalibRecipe& r, const ModelConfig& c,
                             const BlockClipT<double>* lac) {
  BlockQuantSpec q = block_quant_spec(r, c, /*training=*/false);
  auto fix = [](FakeQuantSpec& s, const Vec* beta) {
    if (s.clip != ClipMode::kLearned) return;
    s.clip = ClipMode::kFixed;
    float ratio = 1.0f;
    if (beta && !beta->empty()) ratio = std::max(static_cast<float>(sigmoid((*beta)[0])), 1e-6f);
    s.clip_ratio = ratio;
  };
  for (int p = 0; p < kNumProj; ++p) {
    q.w[p].bits = 16;
    fix(q.act[p], lac ? &lac->act_max[p] : nullptr);
  }
  fix(q.k, lac ? &lac->k_max : nullptr);
  fix(q.v, lac ? &lac->v_max : nullptr);
  return q;
}

QuantSpec weight_spec(const CalibRecipe& r) {
  QuantSpec s;
  s.bits = r.w_bits;
  s.group_size = r.w_group;
  s.sym = true;
  s.mse_clip = r.w_mse_clip;
  return s;
}

Tensor to_tensor(const std::vector<float>& W, int64_t out, int64_t in) {
  Tensor t({out, in});
  std::copy(W.begin(), W.end(), t.data.begin());
  return t;
}

// Engine codes (unsigned, zero 2^(b−1)) → the native signed codes and (out, G) scales.
PackedWeight to_packed(const QuantizedLinear& q, int64_t w_group) {
  const int64_t O = q.out_features, I = q.in_features, G = q.num_groups();
  std::vector<int8_t> codes(static_cast<size_t>(O * I));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) {
      const int64_t g = q.g_idx[static_cast<size_t>(i)];
      codes[static_cast<size_t>(o * I + i)] =
          static_cast<int8_t>(static_cast<int32_t>(q.q[static_cast<size_t>(o * I + i)]) -
                              q.zeros[static_cast<size_t>(g * O + o)]);
    }
  std::vector<float> scales(static_cast<size_t>(O * G));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t g = 0; g < G; ++g)
      scales[static_cast<size_t>(o * G + g)] = q.scales[static_cast<size_t>(g * O + o)];
  return pack_weight(codes.data(), scales.data(), O, I, q.spec.bits, w_group > 0 ? w_group : -1);
}

// Quantizes the deployed weights of one layer with RTN or GPTQ and replaces them by their
// dequantized values. GPTQ: true-sequential groups {q,k,v} → {o} → {gate,up} → {down},
// Hessians from the deployed block's linear inputs (transformed, act-quantized) over
// x (N·T, H), the layer's input on the quantized path.
Status quantize_layer_weights(const ModelConfig& c, const CalibRecipe& r, int64_t l, Deployed& dl,
                              const std::vector<float>& x, int64_t N, int64_t T,
                              std::array<QuantizedLinear, kNumProj>* ql) {
  const QuantSpec spec = weight_spec(r);
  auto finish = [&](int p, Result<QuantizedLinear> res) -> Status {
    if (!res.is_ok()) {
      return res.status().with_context("layer " + std::to_string(l) + " " + kProjNames[p]);
    }
    (*ql)[p] = std::move(res).value();
    dl.w.w[p] = (*ql)[p].dequantize().data;
    return Status::ok();
  };
  if (r.weight_solver == WeightSolver::kRtn) {
    for (int p = 0; p < kNumProj; ++p)
      QCAL_RETURN_IF_ERROR(
          finish(p, rtn_quantize(to_tensor(dl.w.w[p], proj_out(c, p), proj_in(c, p)), spec)));
    return Status::ok();
  }
  static const BlockClipT<float> kNoClip;
  const std::vector<std::vector<int>> groups = {{kQ, kK, kV}, {kO}, {kGate, kUp}, {kDown}};
  for (const auto& group : groups) {
    std::array<std::unique_ptr<HessianAccumulator>, kNumProj> acc;
    for (int p : group) acc[p] = std::make_unique<HessianAccumulator>(proj_in(c, p));
    int64_t nb = 0;
    LinearInputHook hook = [&](const std::string& proj, const float* xin, int64_t rows,
                               int64_t in) {
      const int p = proj_index(proj);
      if (p >= 0 && acc[p] && in == proj_in(c, p)) acc[p]->add_batch(xin, rows, nb);
    };
    QBlock<float> qb(c, &dl.w, &dl.online, &dl.q, &kNoClip);
    run_block(qb, x.data(), nullptr, N, T, c.hidden_size, r.batch, hook, &nb);
    for (int p : group) {
      auto res = gptq_quantize(to_tensor(dl.w.w[p], proj_out(c, p), proj_in(c, p)),
                               acc[p]->hessian(), spec, r.gptq);
      if (!res.is_ok()) {
        return res.status().with_context("layer " + std::to_string(l) + " " + kProjNames[p]);
      }
      QCAL_RETURN_IF_ERROR(finish(p, std::move(res->qlinear)));
    }
  }
  return Status::ok();
}

NativeActQuant native_act(const FakeQuantSpec& s) {
  NativeActQuant a;
  a.bits = s.on() ? s.bits : 16;
  a.sym = s.sym;
  a.group = s.group > 0 ? s.group : -1;
  a.clip = static_cast<float>(s.clip_ratio);
  return a;
}

NativeLayer native_layer(const Deployed& dl, const std::array<QuantizedLinear, kNumProj>* ql,
                         const CalibRecipe& r) {
  NativeLayer y;
  y.input_norm = dl.w.input_norm;
  y.post_norm = dl.w.post_norm;
  for (int p = 0; p < kNumProj; ++p) {
    if (ql) {
      y.qw[p] = to_packed((*ql)[p], r.w_group);
    } else {
      y.fw[p] = dl.w.w[p];
    }
    y.act[p] = native_act(dl.q.act[p]);
  }
  y.bias = dl.w.bias;
  y.online = dl.online;
  y.k = native_act(dl.q.k);
  y.v = native_act(dl.q.v);
  return y;
}

// ---- Methods with fixed (or separately learned) transforms: the model after its
// offline folds, and per layer the transforms of the deployed form.
struct Prepared {
  FpModel m;
  std::vector<BlockTransformsT<double>> t;  // (L)
};

Result<Prepared> prepare_fixed(const FpModel& fp, const TokenSequences& calib, const CalibRecipe& r,
                               CalibReport* report, const CalibProgress& progress) {
  const ModelConfig& c = fp.config;
  const int64_t L = c.num_hidden_layers, N = calib.count(), T = calib.seqlen;
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim,
                nh = c.num_attention_heads;
  Prepared out;
  out.m = fp;
  out.t.resize(static_cast<size_t>(L));
  const bool fold = r.transforms_fold();
  switch (r.transform) {
    case Transform::kNone:
    case Transform::kFlatQuant: break;
    case Transform::kSmoothQuant: {
      // Statistics on the FP model (smoothing preserves its function, so one pass).
      std::vector<float> x = embed_tokens(fp, calib), y(x.size());
      for (int64_t l = 0; l < L; ++l) {
        if (progress) progress("smoothquant", l, L);
        ActStats st;
        fp_layer(c, fp.layers[static_cast<size_t>(l)], x.data(), y.data(), N, T, r.batch, &st);
        std::swap(x, y);
        smooth_layer(out.m.layers[static_cast<size_t>(l)], st.attn, st.mlp, r.sq_alpha);
      }
      break;
    }
    case Transform::kQuaRot:
    case Transform::kSpinQuant: {
      fold_norms(out.m, r.embed_mean_sub);
      Vec R1;
      std::vector<Vec> R2;
      if (r.transform == Transform::kQuaRot) {
        R1 = random_hadamard_matrix(H, r.seed);
        R2.assign(static_cast<size_t>(L), hadamard_matrix(d));
      } else {
        if (progress) progress("spinquant", 0, 1);
        if (r.weight_solver == WeightSolver::kGptq && r.w_bits < 16)
          LOG_INFO
              << "spinquant: rotations trained at W16 (GPTQ quantizes the weights after, §4.2)";
        QCAL_RETURN_IF_ERROR(spinquant_learn(out.m, calib, r, &R1, &R2, report));
        if (static_cast<int64_t>(R1.size()) != H * H || static_cast<int64_t>(R2.size()) != L)
          return internal_error("spinquant_learn returned rotations of the wrong shape");
      }
      rotate_residual(out.m, R1);
      Vec hn = (!fold && r.transform == Transform::kQuaRot) ? hadamard_matrix(nh) : Vec();
      Vec dl, dr;
      if (!fold) hadamard_kron_factors(I, &dl, &dr);
      Vec hk = r.kv_bits < 16 ? hadamard_matrix(d) : Vec();
      for (int64_t l = 0; l < L; ++l) {
        auto& t = out.t[static_cast<size_t>(l)];
        // V/O: pv per head on the V output, folded; on the o input as (po ⊗ pv)⁻ᵀ with
        // the cross-head po online (QuaRot §3.2 step 4). SpinQuant's R2 needs no po.
        t.pv = R2[static_cast<size_t>(l)];
        t.pv_it = t.pv;  // orthogonal
        t.po = hn;
        t.po_it = hn;
        // R4: W_down ← W_down·H_I offline, z·H_I online (a Kronecker pair for the kernel).
        t.d1 = dl;
        t.d2 = dr;
        t.d1_it = dl;
        t.d2_it = dr;
        // R3: Hadamard on K (and Q) after RoPE, only when K is quantized.
        t.pk = hk;
        t.pk_it = hk;
      }
      break;
    }
  }
  return out;
}

Deployed deploy_fixed(const CalibRecipe& r, const ModelConfig& c, const BlockWeightsT<float>& w,
                      const BlockTransformsT<double>& t) {
  static const BlockClipT<double> kNoClip;
  BlockQuantSpec off;  // the effective weights need no quantizer
  Deployed dl = (r.transform == Transform::kNone || r.transform == Transform::kSmoothQuant)
                    ? Deployed{w, {}, {}}
                    : deploy(c, w, t, off, kNoClip);
  dl.q = deployed_spec(r, c, nullptr);
  return dl;
}

// ---- FlatQuant (§5): per-layer training of the transforms, diagonals and clips.

// Factor slots: a1 a2 u1 u2 d1 d2 po pv pk.
constexpr int kNumFactors = 9;
const char* const kFactorNames[kNumFactors] = {"a1", "a2", "u1", "u2", "d1",
                                               "d2", "po", "pv", "pk"};
template <typename T>
std::vector<T>& slot_p(BlockTransformsT<T>& t, int i) {
  switch (i) {
    case 0: return t.a1;
    case 1: return t.a2;
    case 2: return t.u1;
    case 3: return t.u2;
    case 4: return t.d1;
    case 5: return t.d2;
    case 6: return t.po;
    case 7: return t.pv;
    default: return t.pk;
  }
}
template <typename T>
std::vector<T>& slot_it(BlockTransformsT<T>& t, int i) {
  switch (i) {
    case 0: return t.a1_it;
    case 1: return t.a2_it;
    case 2: return t.u1_it;
    case 3: return t.u2_it;
    case 4: return t.d1_it;
    case 5: return t.d2_it;
    case 6: return t.po_it;
    case 7: return t.pv_it;
    default: return t.pk_it;
  }
}
const char* const kDiagNames[3] = {"ca", "cu", "cd"};
template <typename T>
std::vector<T>& slot_diag(BlockTransformsT<T>& t, int i) {
  return i == 0 ? t.ca : (i == 1 ? t.cu : t.cd);
}

// FP64 master parameters of one layer. Not movable once registered with AdamW.
struct FlatParams {
  std::array<SvdFactor, kNumFactors> f;  // n == 0: absent
  std::array<Vec, 3> diag;               // empty: absent
  BlockClipT<double> clip;
};

template <typename T>
void materialize(const FlatParams& fp, BlockTransformsT<T>* t) {
  for (int i = 0; i < kNumFactors; ++i) {
    if (fp.f[i].n == 0) continue;
    Vec P, Pit;
    fp.f[i].materialize(&P, &Pit);
    slot_p(*t, i).assign(P.begin(), P.end());
    slot_it(*t, i).assign(Pit.begin(), Pit.end());
  }
  for (int i = 0; i < 3; ++i) slot_diag(*t, i).assign(fp.diag[i].begin(), fp.diag[i].end());
}

// sq-style diagonal (§5.1): c_j = max(w_j^(1−α) / a_j^α, 1e-5), w_j = max |W_ij| over the
// rows of every linear in `projs`.
Vec diag_init(const BlockWeightsT<float>& w, std::initializer_list<int> projs, int64_t n,
              const std::vector<float>& act_max, double alpha) {
  Vec wmax(static_cast<size_t>(n), 0.0);
  for (int p : projs) {
    const auto& W = w.w[p];
    const int64_t rows = static_cast<int64_t>(W.size()) / n;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j)
        wmax[static_cast<size_t>(j)] =
            std::max(wmax[static_cast<size_t>(j)],
                     std::fabs(static_cast<double>(W[static_cast<size_t>(r * n + j)])));
  }
  Vec c(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    const double a = act_max[static_cast<size_t>(j)];
    c[static_cast<size_t>(j)] =
        std::max(std::pow(wmax[static_cast<size_t>(j)], 1.0 - alpha) / std::pow(a, alpha), 1e-5);
  }
  return c;
}

bool finite_all(const Vec& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

// Trains layer l on x (N·T, H) → targets y (the FP layer's outputs) and returns its
// deployed form (reparameterized in float64, LWC baked in, diagonals folded).
Result<Deployed> flatquant_layer(const ModelConfig& c, const CalibRecipe& r, int64_t l,
                                 const BlockWeightsT<float>& w, const std::vector<float>& x,
                                 const std::vector<float>& y, int64_t N, int64_t T,
                                 const ActStats& st, CalibLayerReport* rep) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim,
                nh = c.num_attention_heads;
  QCAL_ASSIGN_OR_RETURN(auto hdims, decompose_dim(H));
  QCAL_ASSIGN_OR_RETURN(auto idims, decompose_dim(I));
  Rng rng(r.seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull * static_cast<uint64_t>(l + 1));

  auto params = std::make_unique<FlatParams>();
  FlatParams& fp = *params;
  const int64_t sizes[kNumFactors] = {
      hdims.first,  hdims.second, hdims.first, hdims.second,          idims.first,
      idims.second, nh,           d,           r.kv_bits < 16 ? d : 0};
  for (int i = 0; i < kNumFactors; ++i)
    if (sizes[i] > 0) fp.f[i] = SvdFactor::init_random(sizes[i], rng);
  if (r.add_diag) {
    fp.diag[0] = diag_init(w, {kQ, kK, kV}, H, st.attn, r.diag_alpha);
    fp.diag[1] = diag_init(w, {kGate, kUp}, H, st.mlp, r.diag_alpha);
    fp.diag[2] = diag_init(w, {kDown}, I, st.down, r.diag_alpha);
  }
  const BlockQuantSpec spec = block_quant_spec(r, c, /*training=*/true);
  fp.clip = init_clip_params<double>(spec, c, 4.0);

  // Parameter groups (§5.3): transforms + diagonals at flat_lr, clips at 10×, both
  // cosine-annealed to the same absolute eta_min.
  AdamW opt_t, opt_c;
  for (int i = 0; i < kNumFactors; ++i) {
    if (fp.f[i].n == 0) continue;
    opt_t.add(&fp.f[i].u_raw);
    opt_t.add(&fp.f[i].v_raw);
    opt_t.add(&fp.f[i].sigma);
  }
  for (int i = 0; i < 3; ++i)
    if (!fp.diag[i].empty()) opt_t.add(&fp.diag[i]);
  // LAC: one β per quantizer (the native kernels take one clip ratio for both signs),
  // kept in *_max and copied to *_min; LWC: a (max, min) pair per row·group.
  std::vector<Vec*> lac_params;
  for (int p = 0; p < kNumProj; ++p)
    if (!fp.clip.act_max[p].empty()) lac_params.push_back(&fp.clip.act_max[p]);
  if (!fp.clip.k_max.empty()) lac_params.push_back(&fp.clip.k_max);
  if (!fp.clip.v_max.empty()) lac_params.push_back(&fp.clip.v_max);
  for (Vec* v : lac_params) opt_c.add(v);
  for (int p = 0; p < kNumProj; ++p) {
    if (!fp.clip.w_max[p].empty()) opt_c.add(&fp.clip.w_max[p]);
    if (!fp.clip.w_min[p].empty()) opt_c.add(&fp.clip.w_min[p]);
  }
  auto tie_lac = [&fp]() {
    for (int p = 0; p < kNumProj; ++p)
      if (!fp.clip.act_max[p].empty()) fp.clip.act_min[p] = fp.clip.act_max[p];
    if (!fp.clip.k_max.empty()) fp.clip.k_min = fp.clip.k_max;
    if (!fp.clip.v_max.empty()) fp.clip.v_min = fp.clip.v_max;
  };
  tie_lac();

  const int64_t bsz = std::min(r.cali_bsz, N);
  const int64_t nb = (N + bsz - 1) / bsz;
  const int64_t total = r.epochs * nb;
  const double eta_min = r.flat_lr * 1e-3;  // 5e-6 at the default 5e-3
  std::vector<float> out(static_cast<size_t>(bsz * T * H)), dy(out.size());
  const std::string where = "flatquant: layer " + std::to_string(l) + " step ";
  auto lose = [](double v) { return std::isnan(v) ? std::string("NaN") : std::string("inf"); };

  for (int64_t step = 0; step < total; ++step) {
    const int64_t j = step % nb, b0 = j * bsz, B = std::min(bsz, N - b0);
    BlockTransformsT<float> tf;
    materialize(fp, &tf);
    const BlockClipT<float> cf = cast_clip<float>(fp.clip);
    QBlock<float> qb(c, &w, &tf, &spec, &cf);
    auto tape = make_tape<float>();
    const int64_t n = B * T * H;
    const float* xb = x.data() + b0 * T * H;
    const float* yb = y.data() + b0 * T * H;
    qb.forward(xb, out.data(), B, T, tape.get());
    double sse = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double e = static_cast<double>(out[static_cast<size_t>(i)]) - yb[i];
      sse += e * e;
    }
    const double loss = sse / static_cast<double>(n);
    if (!std::isfinite(loss))
      return internal_error(where + std::to_string(step) + ": loss is " + lose(loss));
    if (step == 0) rep->loss_first = loss;
    rep->loss_last = loss;
    if (loss == 0.0) continue;  // exact already: no gradient (and MSE/MSE is undefined)
    // d(MSE / stopgrad(MSE)) / d out = 2 (out − y) / (n · MSE).
    const double k = 2.0 / (static_cast<double>(n) * loss);
    for (int64_t i = 0; i < n; ++i)
      dy[static_cast<size_t>(i)] =
          static_cast<float>(k * (static_cast<double>(out[static_cast<size_t>(i)]) - yb[i]));
    BlockGradsT<float> g;
    BackwardOptions bo;
    bo.input = false;
    bo.transforms = true;
    bo.clip = true;
    bo.weights = false;
    qb.backward(*tape, dy.data(), &g, bo);

    std::vector<Vec> gt, gc;
    for (int i = 0; i < kNumFactors; ++i) {
      if (fp.f[i].n == 0) continue;
      Vec du, dv, ds;
      fp.f[i].backward(to_d(slot_p(g.t, i)), to_d(slot_it(g.t, i)), &du, &dv, &ds);
      for (Vec* v : {&du, &dv, &ds})
        if (!finite_all(*v))
          return internal_error(where + std::to_string(step) + ": gradient of " + kFactorNames[i] +
                                " is not finite");
      gt.push_back(std::move(du));
      gt.push_back(std::move(dv));
      gt.push_back(std::move(ds));
    }
    for (int i = 0; i < 3; ++i) {
      if (fp.diag[i].empty()) continue;
      Vec gd = to_d(slot_diag(g.t, i));
      if (!finite_all(gd))
        return internal_error(where + std::to_string(step) + ": gradient of " + kDiagNames[i] +
                              " is not finite");
      gt.push_back(std::move(gd));
    }
    auto tied = [](const std::vector<float>& a, const std::vector<float>& b) {
      Vec s;
      if (a.empty() && b.empty()) return s;
      s.assign(1, 0.0);
      if (!a.empty()) s[0] += a[0];
      if (!b.empty()) s[0] += b[0];
      return s;
    };
    for (int p = 0; p < kNumProj; ++p)
      if (!fp.clip.act_max[p].empty()) gc.push_back(tied(g.clip.act_max[p], g.clip.act_min[p]));
    if (!fp.clip.k_max.empty()) gc.push_back(tied(g.clip.k_max, g.clip.k_min));
    if (!fp.clip.v_max.empty()) gc.push_back(tied(g.clip.v_max, g.clip.v_min));
    for (int p = 0; p < kNumProj; ++p) {
      if (!fp.clip.w_max[p].empty()) gc.push_back(to_d(g.clip.w_max[p]));
      if (!fp.clip.w_min[p].empty()) gc.push_back(to_d(g.clip.w_min[p]));
    }
    for (const Vec& v : gc)
      if (!finite_all(v))
        return internal_error(where + std::to_string(step) +
                              ": gradient of a clip parameter is not finite");
    opt_t.step(gt, cosine_lr(r.flat_lr, eta_min, step, total));
    opt_c.step(gc, cosine_lr(10.0 * r.flat_lr, eta_min, step, total));
    tie_lac();
  }

  // Reparameterize in float64 (§5.4): effective weights with the LWC clamp baked in.
  BlockTransformsT<double> td;
  materialize(fp, &td);
  for (int i = 0; i < kNumFactors; ++i)
    if (!finite_all(slot_p(td, i)) || !finite_all(slot_it(td, i)))
      return internal_error("flatquant: layer " + std::to_string(l) + ": transform " +
                            kFactorNames[i] + " is not finite after training");
  Deployed dl = deploy(c, w, td, spec, fp.clip);
  dl.q = deployed_spec(r, c, &fp.clip);
  return dl;
}

// x (N·T, H) → the deployed layer's output (weights as they are in dl).
void advance(const ModelConfig& c, const Deployed& dl, std::vector<float>& x, int64_t N, int64_t T,
             int64_t batch) {
  static const BlockClipT<float> kNoClip;
  QBlock<float> qb(c, &dl.w, &dl.online, &dl.q, &kNoClip);
  std::vector<float> y(x.size());
  run_block(qb, x.data(), y.data(), N, T, c.hidden_size, batch);
  x.swap(y);
}

// IntactKV (§6): the FP twin of `nm` (its embed / norms / lm_head / online transforms
// with `fp_layers`, or nm's own layers when they are empty, i.e. at W16) through
// fp_view, and its prefix cache attached to `nm`.
Status attach_fp_prefix(NativeModel& nm, std::vector<NativeLayer> fp_layers,
                        const std::vector<int32_t>& prefix, NativeModel* fp_twin) {
  NativeModel fp_t;
  if (fp_layers.empty()) {
    fp_t = fp_view(nm);
  } else {
    // A shell that borrows nm's embed / final_norm / lm_head for the copy fp_view makes.
    NativeModel shell;
    shell.config = nm.config;
    shell.recipe = nm.recipe;
    shell.w_bits = 16;
    shell.w_group = -1;
    shell.embed.swap(nm.embed);
    shell.final_norm.swap(nm.final_norm);
    shell.lm_head.swap(nm.lm_head);
    shell.layers = std::move(fp_layers);
    fp_t = fp_view(shell);
    nm.embed.swap(shell.embed);
    nm.final_norm.swap(shell.final_norm);
    nm.lm_head.swap(shell.lm_head);
  }
  Status st = attach_intactkv(nm, fp_t, prefix);
  if (!st.is_ok()) return st.with_context("intactkv");
  if (fp_twin) *fp_twin = std::move(fp_t);
  return st;
}

// attach_fp_prefix, then (intactkv_cal) "+Cal" on the calibration data (§6.4).
Status intactkv_stage(NativeModel& nm, std::vector<NativeLayer> fp_layers, const CalibRecipe& r,
                      const TokenSequences* calib, CalibReport* report,
                      const CalibProgress& progress) {
  const std::vector<int32_t> prefix = r.intactkv_prefix_for(nm.config);
  if (r.intactkv_cal && !calib)
    return invalid_input("intactkv_cal: training the IntactKV cache needs the calibration data");
  if (r.intactkv_cal && static_cast<int64_t>(prefix.size()) >= calib->seqlen) {
    return invalid_input("intactkv_cal: the IntactKV prefix of " + std::to_string(prefix.size()) +
                         " tokens leaves nothing of calibration sequences of " +
                         std::to_string(calib->seqlen));
  }
  NativeModel fp_t;
  QCAL_RETURN_IF_ERROR(
      attach_fp_prefix(nm, std::move(fp_layers), prefix, r.intactkv_cal ? &fp_t : nullptr));
  if (!r.intactkv_cal) return Status::ok();
  int64_t replaced = 0;
  const TokenSequences data = intactkv_cal_data(*calib, prefix, &replaced);
  if (replaced > 0) {
    LOG_INFO << "intactkv-cal: " << replaced << " of " << data.count()
             << " calibration sequences did not begin with the prefix; their first "
             << prefix.size() << " token(s) were replaced by it";
  }
  IntactKvCalOptions o;
  o.steps = r.intactkv_cal_steps;
  o.lr = r.intactkv_cal_lr;
  // Progress at the first and last step and about every 1/16 of the way between.
  const int64_t every = std::max<int64_t>(1, (o.steps + 15) / 16);
  auto rep = calibrate_intactkv(nm, fp_t, data, o, [&](int64_t step, int64_t steps, double) {
    if (progress && (step % every == 0 || step + 1 == steps)) progress("intactkv-cal", step, steps);
  });
  if (!rep.is_ok()) return rep.status().with_context("intactkv_cal");
  if (report) report->intactkv_cal = *rep;
  return Status::ok();
}

// Checks shared by calibrate() and calibrate_to_dir(). The all-16-bit recipe (the
// transform-only check of methods.md §10 item 6) is accepted here.
Status check_recipe(const CalibRecipe& r, const ModelConfig& c, const TokenSequences& calib) {
  CalibRecipe probe = r;
  if (probe.w_bits == 16 && probe.a_bits == 16 && probe.kv_bits == 16) probe.a_bits = 8;
  QCAL_RETURN_IF_ERROR(probe.validate());
  QCAL_RETURN_IF_ERROR(r.validate_for(c));
  if (calib.count() < 1 || calib.seqlen < 1)
    return invalid_input("calib: no calibration sequences");
  for (int32_t t : calib.tokens)
    if (t < 0 || t >= c.vocab_size)
      return invalid_input("calib: token id " + std::to_string(t) + " outside the vocabulary (" +
                           std::to_string(c.vocab_size) + ")");
  return Status::ok();
}

// The transformed FP model of a recipe that folds completely (nothing online).
Result<FpModel> folded_fp_model(const FpModel& fp, const TokenSequences& calib,
                                const CalibRecipe& r, CalibReport* report,
                                const CalibProgress& progress) {
  QCAL_ASSIGN_OR_RETURN(Prepared prep, prepare_fixed(fp, calib, r, report, progress));
  FpModel out = std::move(prep.m);
  for (size_t l = 0; l < out.layers.size(); ++l) {
    Deployed dl = deploy_fixed(r, fp.config, out.layers[l], prep.t[l]);
    out.layers[l] = std::move(dl.w);
  }
  return out;
}

// ---- The transform stage shared by every pipeline: the model after its offline
// folds, then layer by layer (in order) each layer's deployed FP form. FlatQuant
// trains layer l here on the FP outputs of layer l − 1 (§5.3 step 6).
class TransformStage {
 public:
  Status init(const FpModel& fp, const TokenSequences& calib, const CalibRecipe& r,
              CalibReport* report, const CalibProgress& progress) {
    r_ = &r;
    N_ = calib.count();
    T_ = calib.seqlen;
    flat_ = r.transform == Transform::kFlatQuant;
    if (flat_) {
      prep_.m = fp;
      prep_.t.resize(static_cast<size_t>(fp.config.num_hidden_layers));
      xfp_ = embed_tokens(prep_.m, calib);
      yfp_.resize(xfp_.size());
    } else {
      QCAL_ASSIGN_OR_RETURN(prep_, prepare_fixed(fp, calib, r, report, progress));
    }
    return Status::ok();
  }
  bool flat() const { return flat_; }
  // The transformed model; layer l may be replaced once layer(l) returned.
  FpModel& model() { return prep_.m; }
  // The deployed form of layer l (called for l = 0, 1, ... in order).
  Result<Deployed> layer(int64_t l, CalibLayerReport* lr) {
    const ModelConfig& c = prep_.m.config;
    const BlockWeightsT<float>& w = prep_.m.layers[static_cast<size_t>(l)];
    if (!flat_) return deploy_fixed(*r_, c, w, prep_.t[static_cast<size_t>(l)]);
    // §5.3: targets and statistics from the FP layer on FP inputs; the next layer
    // trains on these FP outputs.
    ActStats st;
    fp_layer(c, w, xfp_.data(), yfp_.data(), N_, T_, r_->batch, &st);
    QCAL_ASSIGN_OR_RETURN(Deployed dl, flatquant_layer(c, *r_, l, w, xfp_, yfp_, N_, T_, st, lr));
    xfp_.swap(yfp_);
    if (l + 1 == c.num_hidden_layers) {
      xfp_ = {};
      yfp_ = {};
    }
    return dl;
  }

 private:
  const CalibRecipe* r_ = nullptr;
  int64_t N_ = 0, T_ = 0;
  bool flat_ = false;
  Prepared prep_;
  std::vector<float> xfp_, yfp_;  // FlatQuant: FP inputs / outputs of the current layer
};

// ---- Reconstruction (CBQ) plumbing.

// Recipes whose transform leaves activation-side transforms online (methods.cc
// prepare_fixed: QuaRot/SpinQuant unless everything folds; FlatQuant always).
bool keeps_online(const CalibRecipe& r) {
  switch (r.transform) {
    case Transform::kNone:
    case Transform::kSmoothQuant: return false;
    case Transform::kQuaRot:
    case Transform::kSpinQuant: return !r.transforms_fold();
    case Transform::kFlatQuant: return true;
  }
  return true;
}

bool has_online(const BlockTransformsT<float>& t) {
  for (const auto* v : {&t.a1, &t.a2, &t.u1, &t.u2, &t.d1, &t.d2, &t.po, &t.pk, &t.pk_it})
    if (!v->empty()) return true;
  return false;
}

Result<CbqSetup> cbq_prepare_impl(const FpModel& fp, const TokenSequences& calib,
                                  const CalibRecipe& r, CalibReport* report,
                                  const CalibProgress& progress) {
  const ModelConfig& c = fp.config;
  QCAL_RETURN_IF_ERROR(check_recipe(r, c, calib));
  if (r.reconstruction == Reconstruction::kNone)
    return invalid_input(
        "reconstruction: none (cbq_prepare is the first step of a reconstruction)");
  CalibReport local;
  CalibReport* rep = report ? report : &local;
  const int64_t L = c.num_hidden_layers;
  TransformStage ts;
  QCAL_RETURN_IF_ERROR(ts.init(fp, calib, r, rep, progress));
  CbqSetup s;
  s.online.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    if (progress && ts.flat()) progress("flatquant", l, L);
    const double tl = steady_seconds();
    CalibLayerReport lr;
    lr.layer = l;
    QCAL_ASSIGN_OR_RETURN(Deployed dl, ts.layer(l, &lr));
    NativeLayer& nl = s.online[static_cast<size_t>(l)];
    nl.online = std::move(dl.online);
    for (int p = 0; p < kNumProj; ++p) nl.act[p] = native_act(dl.q.act[p]);
    nl.k = native_act(dl.q.k);
    nl.v = native_act(dl.q.v);
    ts.model().layers[static_cast<size_t>(l)] = std::move(dl.w);
    if (ts.flat()) {
      lr.seconds = steady_seconds() - tl;
      LOG_INFO << "flatquant: layer " << l << " loss " << lr.loss_first << " -> " << lr.loss_last
               << " (" << lr.seconds << " s)";
      rep->layers.push_back(lr);
    }
  }
  s.model = std::move(ts.model());
  s.N = calib.count();
  s.T = calib.seqlen;
  s.x0 = embed_tokens(s.model, calib);
  return s;
}

// Exactly cbq.cc's fold of the CFP smoothing into a norm: γ_j / s_j in float64.
void divide_norm(std::vector<float>& g, const std::vector<double>& s) {
  if (s.empty()) return;
  for (size_t j = 0; j < g.size(); ++j)
    if (s[j] != 1.0) g[j] = static_cast<float>(static_cast<double>(g[j]) / s[j]);
}

// A finalized layer's result against the model and recipe it claims to be for.
Status check_layer_result(const CbqLayerResult& res, const ModelConfig& c, const CalibRecipe& r) {
  const std::string at = "cbq: result of layer " + std::to_string(res.layer);
  for (int p = 0; p < kNumProj; ++p) {
    const QuantizedLinear& q = res.q[p];
    const int64_t O = proj_out(c, p), I = proj_in(c, p);
    const std::string lin = at + " " + kProjNames[p];
    if (q.out_features != O || q.in_features != I)
      return invalid_input(lin + " is (" + std::to_string(q.out_features) + ", " +
                           std::to_string(q.in_features) + "), the model has (" +
                           std::to_string(O) + ", " + std::to_string(I) + ")");
    if (q.spec.bits != r.w_bits)
      return invalid_input(lin + " has " + std::to_string(q.spec.bits) + "-bit codes, the recipe " +
                           std::to_string(r.w_bits));
    const int64_t gc = r.w_group > 0 && r.w_group < I ? r.w_group : I, G = (I + gc - 1) / gc;
    if (q.q.size() != static_cast<size_t>(O * I) || q.scales.size() != static_cast<size_t>(G * O) ||
        q.zeros.size() != static_cast<size_t>(G * O) || q.g_idx.size() != static_cast<size_t>(I))
      return invalid_input(lin + ": sizes of codes / scales / zeros / g_idx do not match");
    const int maxq = (1 << q.spec.bits) - 1;
    for (uint8_t v : q.q)
      if (v > maxq) return invalid_input(lin + ": code outside [0, " + std::to_string(maxq) + "]");
    for (int64_t i = 0; i < I; ++i)
      if (q.g_idx[static_cast<size_t>(i)] != i / gc)
        return invalid_input(lin + ": g_idx is not column / group");
    for (size_t i = 0; i < q.scales.size(); ++i)
      if (!(std::isfinite(q.scales[i]) && q.scales[i] > 0) || q.zeros[i] != (maxq + 1) / 2)
        return invalid_input(lin + ": scales must be positive and finite, zeros 2^(b-1)");
  }
  auto clip_ok = [](double v) { return std::isfinite(v) && v > 0 && v <= 1; };
  for (double v : res.act_clip)
    if (!clip_ok(v)) return invalid_input(at + ": activation clip ratio outside (0, 1]");
  if (!clip_ok(res.k_clip) || !clip_ok(res.v_clip))
    return invalid_input(at + ": K/V clip ratio outside (0, 1]");
  const std::pair<const std::vector<double>*, int64_t> sm[3] = {
      {&res.smooth_attn, c.hidden_size},
      {&res.smooth_mlp, c.hidden_size},
      {&res.smooth_down, c.intermediate_size}};
  for (const auto& [v, n] : sm) {
    if (!v->empty() && static_cast<int64_t>(v->size()) != n)
      return invalid_input(at + ": CFP smoothing of the wrong size");
    for (double x : *v)
      if (!(std::isfinite(x) && x > 0)) return invalid_input(at + ": CFP smoothing not positive");
  }
  return Status::ok();
}

// The results sorted by layer, one per layer 0..L−1.
Result<std::vector<const CbqLayerResult*>> results_by_layer(
    const std::vector<CbqLayerResult>& layers, const ModelConfig& c, const CalibRecipe& r) {
  const int64_t L = c.num_hidden_layers;
  std::vector<const CbqLayerResult*> by(static_cast<size_t>(L), nullptr);
  for (const CbqLayerResult& res : layers) {
    if (res.layer < 0 || res.layer >= L)
      return invalid_input("cbq: a result for layer " + std::to_string(res.layer) +
                           " of a model with " + std::to_string(L) + " layers");
    if (by[static_cast<size_t>(res.layer)])
      return invalid_input("cbq: two results for layer " + std::to_string(res.layer));
    QCAL_RETURN_IF_ERROR(check_layer_result(res, c, r));
    by[static_cast<size_t>(res.layer)] = &res;
  }
  for (int64_t l = 0; l < L; ++l)
    if (!by[static_cast<size_t>(l)])
      return invalid_input("cbq: no result for layer " + std::to_string(l) + " (" +
                           std::to_string(layers.size()) + " of " + std::to_string(L) +
                           " layers finalized)");
  return by;
}

// Runs every window of the plan from `state` on the setup, in one process.
Status run_windows(const CbqSetup& s, const CalibRecipe& r, CbqState* state,
                   std::vector<CbqLayerResult>* fin, CalibReport* rep,
                   const CalibProgress& progress) {
  const CbqOptions o = cbq_options(r, s);
  const int64_t nw =
      static_cast<int64_t>(cbq_plan(s.model.config.num_hidden_layers, o.window, o.overlap).size());
  while (state->next_window < nw) {
    if (progress) progress(reconstruction_str(r.reconstruction), state->next_window, nw);
    CbqWindowReport wr;
    QCAL_RETURN_IF_ERROR(cbq_run_setup_window(s, r, state, fin, &wr));
    LOG_INFO << reconstruction_str(r.reconstruction) << ": window " << wr.window << " (layers "
             << wr.first << ".." << wr.last << ") loss " << wr.loss_first << " -> " << wr.loss_last
             << ", hardened " << wr.loss_hard_init << " -> " << wr.loss_hard << " (" << wr.seconds
             << " s)";
    if (rep) rep->windows.push_back(wr);
  }
  return Status::ok();
}

// Copies the tokenizer / generation files of `model_dir` into `dir` (where absent).
void copy_side_files(const std::string& model_dir, const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(model_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || name == "config.json" || name.ends_with(".safetensors") ||
        name.ends_with(".safetensors.index.json") || path_exists(join_path(dir, name)))
      continue;
    // A regular file inside the process policy's roots (common/path_policy.h).
    (void)copy_input_file(e.path().string(), join_path(dir, name));
  }
}

// ---- Persistence helpers (safetensors with a JSON metadata entry; little-endian host).

struct StEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string_view bytes;
};
template <typename T>
std::string_view bytes_of(const std::vector<T>& v) {
  return {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)};
}
template <typename T>
void add_vec(std::vector<StEntry>& e, std::string name, DType dt, const std::vector<T>& v) {
  if (!v.empty()) e.push_back({std::move(name), dt, {static_cast<int64_t>(v.size())}, bytes_of(v)});
}

Status write_st(const std::string& path, const std::vector<StEntry>& entries,
                const std::string& meta_key, const nlohmann::json& meta) {
  SafetensorsWriter w(path);
  w.set_metadata(meta_key, meta.dump());
  for (const StEntry& e : entries) w.add(e.name, e.dtype, e.shape);
  QCAL_RETURN_IF_ERROR(w.begin());
  for (const StEntry& e : entries) QCAL_RETURN_IF_ERROR(w.write(e.bytes));
  return w.finish();
}

template <typename T>
DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  if constexpr (std::is_same_v<T, double>) return DType::kF64;
  if constexpr (std::is_same_v<T, uint8_t>) return DType::kU8;
  if constexpr (std::is_same_v<T, int32_t>) return DType::kI32;
  return DType::kI64;
}

// Tensor `name` as a flat vector (absent: empty, or kCorrupt when `required`);
// kCorrupt for another dtype or, with want ≥ 0, another element count.
template <typename T>
Result<std::vector<T>> read_vec(const SafetensorsFile& f, const std::string& name, int64_t want,
                                bool required = false) {
  std::vector<T> v;
  const TensorInfo* t = f.find(name);
  if (!t) {
    if (required || want > 0) return corrupt(f.path() + ": tensor " + name + " is missing");
    return v;
  }
  if (t->dtype != dtype_of<T>())
    return corrupt(f.path() + ": tensor " + name + " is " + dtype_name(t->dtype) + ", expected " +
                   dtype_name(dtype_of<T>()));
  const std::string_view raw = f.raw(*t);
  v.resize(raw.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), raw.data(), v.size() * sizeof(T));
  if (want >= 0 && static_cast<int64_t>(v.size()) != want)
    return corrupt(f.path() + ": tensor " + name + " has " + std::to_string(v.size()) +
                   " elements, expected " + std::to_string(want));
  return v;
}

Result<nlohmann::json> read_meta(const SafetensorsFile& f, const std::string& key,
                                 const std::string& format) {
  auto it = f.header().metadata.find(key);
  if (it == f.header().metadata.end())
    return corrupt(f.path() + ": no " + key + " metadata (not a " + format + " file)");
  nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.value("format", "") != format || !j.contains("version") ||
      !j["version"].is_number_integer())
    return corrupt(f.path() + ": " + key + " metadata is not a " + format + " header");
  if (j["version"].get<int64_t>() != 1)
    return corrupt(f.path() + ": " + format + " version " + j["version"].dump() +
                   " (this build reads version 1)");
  return j;
}

// Integer field `k` of a metadata object, in [lo, hi].
Result<int64_t> meta_int(const nlohmann::json& j, const std::string& k, int64_t lo, int64_t hi,
                         const std::string& what) {
  if (!j.contains(k) || !j[k].is_number_integer())
    return corrupt(what + ": metadata field " + k + " is missing or not an integer");
  const int64_t v = j[k].get<int64_t>();
  if (v < lo || v > hi)
    return corrupt(what + ": metadata field " + k + " = " + std::to_string(v) + " out of range");
  return v;
}

// Every matrix / diagonal of a BlockTransformsT by name.
template <typename T, typename F>
void for_each_transform(T& t, F&& f) {
  f("a1", t.a1), f("a2", t.a2), f("a1_it", t.a1_it), f("a2_it", t.a2_it), f("ca", t.ca);
  f("u1", t.u1), f("u2", t.u2), f("u1_it", t.u1_it), f("u2_it", t.u2_it), f("cu", t.cu);
  f("d1", t.d1), f("d2", t.d2), f("d1_it", t.d1_it), f("d2_it", t.d2_it), f("cd", t.cd);
  f("po", t.po), f("po_it", t.po_it), f("pv", t.pv), f("pv_it", t.pv_it);
  f("pk", t.pk), f("pk_it", t.pk_it);
}

// Side length of a square matrix of n elements (1 for an absent one), or −1.
int64_t side(const std::vector<float>& m) {
  if (m.empty()) return 1;
  const int64_t n = static_cast<int64_t>(m.size());
  int64_t s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  return s * s == n ? s : -1;
}

Status check_online(const BlockTransformsT<float>& t, const ModelConfig& c, const std::string& at) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim,
                nh = c.num_attention_heads;
  auto pair = [&](const std::vector<float>& x, const std::vector<float>& y, int64_t n,
                  const char* what) -> Status {
    const int64_t a = side(x), b = side(y);
    if (x.empty() && y.empty()) return Status::ok();
    if (a < 0 || b < 0 || a * b != n)
      return corrupt(at + ": online " + what + " factors do not multiply to " + std::to_string(n));
    return Status::ok();
  };
  QCAL_RETURN_IF_ERROR(pair(t.a1, t.a2, H, "a1/a2"));
  QCAL_RETURN_IF_ERROR(pair(t.a1_it, t.a2_it, H, "a1_it/a2_it"));
  QCAL_RETURN_IF_ERROR(pair(t.u1, t.u2, H, "u1/u2"));
  QCAL_RETURN_IF_ERROR(pair(t.u1_it, t.u2_it, H, "u1_it/u2_it"));
  QCAL_RETURN_IF_ERROR(pair(t.d1, t.d2, I, "d1/d2"));
  QCAL_RETURN_IF_ERROR(pair(t.d1_it, t.d2_it, I, "d1_it/d2_it"));
  const std::pair<const std::vector<float>*, int64_t> sq[] = {
      {&t.po, nh}, {&t.po_it, nh}, {&t.pv, d}, {&t.pv_it, d}, {&t.pk, d}, {&t.pk_it, d}};
  for (const auto& [m, n] : sq)
    if (!m->empty() && static_cast<int64_t>(m->size()) != n * n)
      return corrupt(at + ": an online head transform is not " + std::to_string(n) + "x" +
                     std::to_string(n));
  const std::pair<const std::vector<float>*, int64_t> dg[] = {{&t.ca, H}, {&t.cu, H}, {&t.cd, I}};
  for (const auto& [v, n] : dg)
    if (!v->empty() && static_cast<int64_t>(v->size()) != n)
      return corrupt(at + ": an online diagonal has the wrong size");
  return Status::ok();
}

nlohmann::json act_json(const NativeActQuant& a) {
  return {{"bits", a.bits}, {"sym", a.sym}, {"group", a.group}, {"clip", a.clip}};
}
Result<NativeActQuant> act_from_json(const nlohmann::json& j, const std::string& at) {
  NativeActQuant a;
  if (!j.is_object() || !j.contains("bits") || !j["bits"].is_number_integer() ||
      !j.contains("sym") || !j["sym"].is_boolean() || !j.contains("group") ||
      !j["group"].is_number_integer() || !j.contains("clip") || !j["clip"].is_number())
    return corrupt(at + ": quantizer entry needs bits, sym, group, clip");
  a.bits = j["bits"].get<int>();
  a.sym = j["sym"].get<bool>();
  a.group = j["group"].get<int64_t>();
  a.clip = j["clip"].get<float>();
  if (a.bits < 2 || a.bits > 16 || !(a.clip > 0 && a.clip <= 1) || (a.group != -1 && a.group < 1))
    return corrupt(at + ": quantizer bits / group / clip out of range");
  return a;
}

constexpr const char* kSetupMeta = "qcal_cbq_setup";
constexpr const char* kSetupFormat = "qcal-cbq-setup";
constexpr const char* kStateMeta = "qcal_cbq_state";
constexpr const char* kStateFormat = "qcal-cbq-state";

}  // namespace

// ---------------------------------------------------------------- public API

nlohmann::json CalibReport::to_json() const {
  nlohmann::json j;
  j["seconds"] = seconds;
  j["layers"] = nlohmann::json::array();
  for (const auto& l : layers) {
    j["layers"].push_back({{"layer", l.layer},
                           {"loss_first", l.loss_first},
                           {"loss_last", l.loss_last},
                           {"seconds", l.seconds}});
  }
  j["spin_loss"] = spin_loss;
  if (intactkv_cal) {
    j["intactkv_cal"] = {{"loss_first", intactkv_cal->loss_first},
                         {"loss_last", intactkv_cal->loss_last},
                         {"steps", intactkv_cal->steps},
                         {"seconds", intactkv_cal->seconds}};
  }
  if (!windows.empty()) {
    j["windows"] = nlohmann::json::array();
    for (const auto& w : windows) {
      j["windows"].push_back({{"window", w.window},
                              {"first", w.first},
                              {"last", w.last},
                              {"loss_first", w.loss_first},
                              {"loss_last", w.loss_last},
                              {"loss_hard_init", w.loss_hard_init},
                              {"loss_hard", w.loss_hard},
                              {"steps", w.steps},
                              {"seconds", w.seconds}});
    }
  }
  return j;
}

void fold_norms(FpModel& m, bool embed_mean_sub) {
  const int64_t H = m.config.hidden_size;
  for (auto& w : m.layers) {
    const Vec gi = to_d(w.input_norm), gp = to_d(w.post_norm);
    for (int p : {kQ, kK, kV}) scale_cols(w.w[p], H, gi);
    for (int p : {kGate, kUp}) scale_cols(w.w[p], H, gp);
    std::fill(w.input_norm.begin(), w.input_norm.end(), 1.0f);
    std::fill(w.post_norm.begin(), w.post_norm.end(), 1.0f);
  }
  scale_cols(m.lm_head, H, to_d(m.final_norm));
  std::fill(m.final_norm.begin(), m.final_norm.end(), 1.0f);
  if (embed_mean_sub) {
    const int64_t V = static_cast<int64_t>(m.embed.size()) / H;
    for (int64_t v = 0; v < V; ++v) {
      float* e = m.embed.data() + v * H;
      double mean = 0.0;
      for (int64_t j = 0; j < H; ++j) mean += e[j];
      mean /= static_cast<double>(H);
      for (int64_t j = 0; j < H; ++j) e[j] = static_cast<float>(e[j] - mean);
    }
  }
  // lm_head (a copy when tied) no longer equals the embedding.
  m.config.tie_word_embeddings = false;
}

void rotate_residual(FpModel& m, const std::vector<double>& R1) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size;
  QCAL_CHECK(static_cast<int64_t>(R1.size()) == H * H);
  QCAL_CHECK(all_ones(m.final_norm));
  right_mul(m.embed, static_cast<int64_t>(m.embed.size()) / H, H, R1);
  right_mul(m.lm_head, static_cast<int64_t>(m.lm_head.size()) / H, H, R1);
  for (auto& w : m.layers) {
    QCAL_CHECK(all_ones(w.input_norm) && all_ones(w.post_norm));  // fold_norms first
    for (int p : {kQ, kK, kV, kGate, kUp})
      right_mul(w.w[p], static_cast<int64_t>(w.w[p].size()) / H, H, R1);
    for (int p : {kO, kDown}) left_mul_t(w.w[p], H, static_cast<int64_t>(w.w[p].size()) / H, R1);
  }
  m.config.tie_word_embeddings = false;
}

void rotate_heads(BlockWeightsT<float>& w, const ModelConfig& c, const std::vector<double>& R2) {
  const int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_attention_heads,
                nkv = c.num_key_value_heads;
  QCAL_CHECK(static_cast<int64_t>(R2.size()) == d * d);
  // v: every KV head's (d, H) block of rows ← R2ᵀ·block; bias block ← b·R2.
  for (int64_t g = 0; g < nkv; ++g) {
    std::vector<float> blk(w.w[kV].begin() + g * d * H, w.w[kV].begin() + (g + 1) * d * H);
    left_mul_t(blk, d, H, R2);
    std::copy(blk.begin(), blk.end(), w.w[kV].begin() + g * d * H);
    if (!w.bias[kV].empty()) {
      std::vector<float> b(w.bias[kV].begin() + g * d, w.bias[kV].begin() + (g + 1) * d);
      right_mul(b, 1, d, R2);
      std::copy(b.begin(), b.end(), w.bias[kV].begin() + g * d);
    }
  }
  // o: every head's column block ← block·R2.
  const int64_t Q = nh * d;
  std::vector<float> blk(static_cast<size_t>(H * d));
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t i = 0; i < H; ++i)
      std::copy_n(w.w[kO].begin() + i * Q + h * d, d, blk.begin() + i * d);
    right_mul(blk, H, d, R2);
    for (int64_t i = 0; i < H; ++i)
      std::copy_n(blk.begin() + i * d, d, w.w[kO].begin() + i * Q + h * d);
  }
}

void smooth_layer(BlockWeightsT<float>& w, const std::vector<float>& attn_act_max,
                  const std::vector<float>& mlp_act_max, double alpha) {
  const int64_t H = static_cast<int64_t>(w.input_norm.size());
  auto smooth = [&](std::vector<float>& gamma, std::initializer_list<int> projs,
                    const std::vector<float>& act) {
    QCAL_CHECK(static_cast<int64_t>(act.size()) == H);
    Vec wmax(static_cast<size_t>(H), 0.0);
    for (int p : projs) {
      const int64_t rows = static_cast<int64_t>(w.w[p].size()) / H;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < H; ++j)
          wmax[static_cast<size_t>(j)] =
              std::max(wmax[static_cast<size_t>(j)],
                       std::fabs(static_cast<double>(w.w[p][static_cast<size_t>(r * H + j)])));
    }
    Vec s(static_cast<size_t>(H)), inv(static_cast<size_t>(H));
    for (int64_t j = 0; j < H; ++j) {
      const double wj = std::max(wmax[static_cast<size_t>(j)], 1e-5);
      const double aj = std::fabs(static_cast<double>(act[static_cast<size_t>(j)]));
      s[static_cast<size_t>(j)] = std::max(std::pow(aj, alpha) / std::pow(wj, 1.0 - alpha), 1e-5);
      inv[static_cast<size_t>(j)] = 1.0 / s[static_cast<size_t>(j)];
    }
    for (int64_t j = 0; j < H; ++j)
      gamma[static_cast<size_t>(j)] = static_cast<float>(
          static_cast<double>(gamma[static_cast<size_t>(j)]) * inv[static_cast<size_t>(j)]);
    for (int p : projs) scale_cols(w.w[p], H, s);
  };
  smooth(w.input_norm, {kQ, kK, kV}, attn_act_max);
  smooth(w.post_norm, {kGate, kUp}, mlp_act_max);
}

BlockQuantSpec block_quant_spec(const CalibRecipe& r, const ModelConfig& c, bool training) {
  const bool flat = r.transform == Transform::kFlatQuant;
  const Ste ste = r.transform == Transform::kSpinQuant ? Ste::kIdentity : Ste::kLsq;
  BlockQuantSpec q;
  for (int p = 0; p < kNumProj; ++p) {
    FakeQuantSpec& a = q.act[p];
    a.bits = r.a_bits;
    a.sym = true;
    a.group = -1;
    a.ste = ste;
    a.clip = flat && r.lac ? ClipMode::kLearned : ClipMode::kFixed;
    a.clip_ratio = flat && r.lac ? 1.0 : r.a_clip;
    a.min_scale = 0.0;
    // Weights are quantized offline (RTN / GPTQ) outside training; the block then
    // sees the dequantized weights.
    FakeQuantSpec& wq = q.w[p];
    wq.bits = training ? r.w_bits : 16;
    wq.sym = true;
    wq.group = r.w_group;
    wq.ste = ste;
    wq.clip = flat && r.lwc ? ClipMode::kLearned : ClipMode::kFixed;
    wq.lwc_range = flat && r.lwc;
    wq.clip_ratio = 1.0;
    wq.min_scale = 1e-5;
  }
  for (FakeQuantSpec* s : {&q.k, &q.v}) {
    s->bits = r.kv_bits;
    s->sym = false;
    s->group = c.head_dim;
    s->ste = ste;
    s->clip = flat && r.lac ? ClipMode::kLearned : ClipMode::kFixed;
    s->clip_ratio = flat && r.lac ? 1.0 : r.kv_clip;
    s->min_scale = 0.0;
  }
  return q;
}

// ---------------------------------------------------------------- reconstruction

Result<CbqSetup> cbq_prepare(const FpModel& fp, const TokenSequences& calib, const CalibRecipe& r,
                             CalibReport* report) {
  return cbq_prepare_impl(fp, calib, r, report, nullptr);
}

CbqOptions cbq_options(const CalibRecipe& r, const ModelConfig& c) {
  CbqOptions o;
  o.w_bits = r.w_bits;
  o.w_group = r.w_group;
  o.a_bits = r.a_bits;
  o.a_clip = r.a_clip;
  o.kv_bits = r.kv_bits;
  o.kv_clip = r.kv_clip;
  if (r.reconstruction == Reconstruction::kBlock) {
    o.window = 1;
    o.overlap = 0;
  } else {
    // A window longer than the model is the whole model (cbq_plan cuts it at L).
    const int64_t L = std::max<int64_t>(1, c.num_hidden_layers);
    o.window = static_cast<int>(std::clamp<int64_t>(r.cbq_window, 1, std::max<int64_t>(L, 1)));
    o.overlap = static_cast<int>(std::clamp<int64_t>(r.cbq_overlap, 0, o.window - 1));
  }
  o.parallel = r.cbq_parallel;
  o.lora_rounding = r.weight_solver == WeightSolver::kLoraRounding;
  o.rank = o.lora_rounding ? static_cast<int>(r.lora_rank) : 0;
  o.v0_follows_scale = true;  // cbq.h: measured better at W4A16, W2A16 and W4A4KV4
  o.cfp = r.cfp;
  o.epochs = static_cast<int>(std::clamp<int64_t>(r.cbq_epochs, 1, 1000000));
  o.bsz = r.cali_bsz;
  o.seed = r.seed;
  o.needs_online = keeps_online(r);
  return o;
}

CbqOptions cbq_options(const CalibRecipe& r, const CbqSetup& s) {
  CbqOptions o = cbq_options(r, s.model.config);
  bool any = false;
  for (const NativeLayer& l : s.online) any = any || has_online(l.online);
  if (any || o.needs_online) {
    o.online.reserve(s.online.size());
    for (const NativeLayer& l : s.online) o.online.push_back(l.online);
  }
  return o;
}

Status cbq_run_setup_window(const CbqSetup& s, const CalibRecipe& r, CbqState* state,
                            std::vector<CbqLayerResult>* finalized, CbqWindowReport* report) {
  const ModelConfig& c = s.model.config;
  const int64_t L = c.num_hidden_layers;
  if (!state) return invalid_input("cbq: no state");
  if (static_cast<int64_t>(s.model.layers.size()) != L ||
      static_cast<int64_t>(s.online.size()) != L)
    return invalid_input("cbq: the setup does not have one block and one online entry per layer");
  const CbqOptions o = cbq_options(r, s);
  const std::vector<CbqWindow> plan = cbq_plan(L, o.window, o.overlap);
  if (state->next_window < 0 || state->next_window >= static_cast<int64_t>(plan.size()))
    return invalid_input("cbq: state.next_window " + std::to_string(state->next_window) +
                         " outside the plan of " + std::to_string(plan.size()) + " windows");
  const CbqWindow& w = plan[static_cast<size_t>(state->next_window)];
  // Copies: the setup stays the FP model (a service task reloads it per window too).
  std::vector<BlockWeightsT<float>> blocks(s.model.layers.begin() + w.first,
                                           s.model.layers.begin() + w.last + 1);
  std::vector<BlockWeightsT<float>*> ptrs;
  for (auto& b : blocks) ptrs.push_back(&b);
  return cbq_run_window(c, o, plan, s.N, s.T, ptrs, state, finalized, report);
}

TokenSequences intactkv_cal_data(const TokenSequences& calib, const std::vector<int32_t>& prefix,
                                 int64_t* replaced) {
  TokenSequences d = calib;
  const int64_t P = static_cast<int64_t>(prefix.size());
  int64_t n = 0;
  if (P < d.seqlen) {
    for (int64_t s = 0; s < d.count(); ++s) {
      int32_t* seq = d.tokens.data() + s * d.seqlen;
      if (std::equal(prefix.begin(), prefix.end(), seq)) continue;
      std::copy(prefix.begin(), prefix.end(), seq);
      ++n;
    }
  }
  if (replaced) *replaced = n;
  return d;
}

Result<NativeModel> cbq_finish(const CbqSetup& setup, const std::vector<CbqLayerResult>& layers,
                               const CalibRecipe& r) {
  return cbq_finish(setup, layers, r, nullptr, nullptr, nullptr);
}

Result<NativeModel> cbq_finish(const CbqSetup& setup, const std::vector<CbqLayerResult>& layers,
                               const CalibRecipe& r, const TokenSequences* calib,
                               CalibReport* report, const CalibProgress& progress) {
  const ModelConfig& c = setup.model.config;
  const int64_t L = c.num_hidden_layers;
  QCAL_RETURN_IF_ERROR(r.validate());
  if (r.reconstruction == Reconstruction::kNone)
    return invalid_input("reconstruction: none (cbq_finish assembles a reconstruction)");
  if (static_cast<int64_t>(setup.model.layers.size()) != L ||
      static_cast<int64_t>(setup.online.size()) != L)
    return invalid_input("cbq: the setup does not have one block and one online entry per layer");
  QCAL_ASSIGN_OR_RETURN(std::vector<const CbqLayerResult*> by, results_by_layer(layers, c, r));
  NativeModel nm;
  nm.config = c;
  nm.recipe = r.to_json();
  nm.w_bits = r.w_bits;
  nm.w_group = r.w_group > 0 ? r.w_group : -1;
  nm.embed = setup.model.embed;
  nm.final_norm = setup.model.final_norm;
  nm.lm_head = setup.model.lm_head;
  std::vector<NativeLayer> fp_layers;  // IntactKV's FP twin
  for (int64_t l = 0; l < L; ++l) {
    const BlockWeightsT<float>& w = setup.model.layers[static_cast<size_t>(l)];
    const NativeLayer& on = setup.online[static_cast<size_t>(l)];
    const CbqLayerResult& res = *by[static_cast<size_t>(l)];
    NativeLayer y;
    y.input_norm = w.input_norm;
    y.post_norm = w.post_norm;
    divide_norm(y.input_norm, res.smooth_attn);
    divide_norm(y.post_norm, res.smooth_mlp);
    for (int p = 0; p < kNumProj; ++p) {
      y.qw[p] = to_packed(res.q[p], r.w_group);
      y.act[p] = on.act[p];
      if (y.act[p].bits < 16) y.act[p].clip = static_cast<float>(res.act_clip[p]);
    }
    y.bias = w.bias;
    y.online = on.online;
    y.k = on.k;
    y.v = on.v;
    if (y.k.bits < 16) y.k.clip = static_cast<float>(res.k_clip);
    if (y.v.bits < 16) y.v.clip = static_cast<float>(res.v_clip);
    if (r.intactkv) {
      NativeLayer f = y;
      f.qw = {};
      f.input_norm = w.input_norm;
      f.post_norm = w.post_norm;
      f.fw = w.w;
      fp_layers.push_back(std::move(f));
    }
    nm.layers.push_back(std::move(y));
  }
  if (r.intactkv)
    QCAL_RETURN_IF_ERROR(intactkv_stage(nm, std::move(fp_layers), r, calib, report, progress));
  return nm;
}

Status save_cbq_setup(const CbqSetup& s, const std::string& dir) {
  const ModelConfig& c = s.model.config;
  const int64_t L = c.num_hidden_layers, H = c.hidden_size;
  if (static_cast<int64_t>(s.online.size()) != L || s.N < 1 || s.T < 1 ||
      static_cast<int64_t>(s.x0.size()) != s.N * s.T * H)
    return invalid_input("save_cbq_setup: online entries / N / T / x0 do not match the model");
  // The model in float32 (exact); torch_dtype and tying are restored on load.
  const bool tie_ok = !c.tie_word_embeddings || s.model.lm_head == s.model.embed;
  FpModel copy;
  const FpModel* m = &s.model;
  if (c.torch_dtype != DType::kF32 || !tie_ok) {
    copy = s.model;
    copy.config.torch_dtype = DType::kF32;
    copy.config.tie_word_embeddings = tie_ok && c.tie_word_embeddings;
    m = &copy;
  }
  QCAL_ASSIGN_OR_RETURN(std::string staging, make_staging_dir(dir));
  struct Guard {
    std::string path;
    ~Guard() {
      std::error_code ec;
      if (!path.empty()) std::filesystem::remove_all(path, ec);
    }
  } guard{staging};
  QCAL_RETURN_IF_ERROR(write_fp_model(*m, join_path(staging, "model"), /*overwrite=*/true));
  copy = FpModel();
  nlohmann::json meta = {{"format", kSetupFormat},
                         {"version", 1},
                         {"N", s.N},
                         {"T", s.T},
                         {"torch_dtype", torch_dtype_name(c.torch_dtype)},
                         {"tie_word_embeddings", c.tie_word_embeddings},
                         {"layers", nlohmann::json::array()}};
  std::vector<StEntry> e;
  e.push_back({"x0", DType::kF32, {s.N * s.T, H}, bytes_of(s.x0)});
  for (int64_t l = 0; l < L; ++l) {
    const NativeLayer& nl = s.online[static_cast<size_t>(l)];
    nlohmann::json lj = {
        {"act", nlohmann::json::array()}, {"k", act_json(nl.k)}, {"v", act_json(nl.v)}};
    for (int p = 0; p < kNumProj; ++p) lj["act"].push_back(act_json(nl.act[p]));
    meta["layers"].push_back(lj);
    for_each_transform(nl.online, [&](const char* name, const std::vector<float>& v) {
      add_vec(e, "layers." + std::to_string(l) + ".online." + name, DType::kF32, v);
    });
  }
  QCAL_RETURN_IF_ERROR(write_st(join_path(staging, "cbq_setup.safetensors"), e, kSetupMeta, meta));
  QCAL_RETURN_IF_ERROR(publish_dir(staging, dir, /*overwrite=*/true));
  guard.path.clear();
  return Status::ok();
}

Result<CbqSetup> load_cbq_setup(const std::string& dir) {
  CbqSetup s;
  QCAL_ASSIGN_OR_RETURN(s.model, load_fp_model(join_path(dir, "model")));
  ModelConfig& c = s.model.config;
  const std::string path = join_path(dir, "cbq_setup.safetensors");
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::open(path));
  QCAL_ASSIGN_OR_RETURN(nlohmann::json meta, read_meta(*f, kSetupMeta, kSetupFormat));
  const int64_t L = c.num_hidden_layers, H = c.hidden_size;
  QCAL_ASSIGN_OR_RETURN(s.N, meta_int(meta, "N", 1, int64_t{1} << 40, path));
  QCAL_ASSIGN_OR_RETURN(s.T, meta_int(meta, "T", 1, int64_t{1} << 40, path));
  if (!meta.contains("torch_dtype") || !meta["torch_dtype"].is_string() ||
      !meta.contains("tie_word_embeddings") || !meta["tie_word_embeddings"].is_boolean())
    return corrupt(path + ": metadata needs torch_dtype and tie_word_embeddings");
  const auto dt = dtype_from_torch_name(meta["torch_dtype"].get<std::string>());
  if (!dt || !is_float_dtype(*dt)) return corrupt(path + ": unknown torch_dtype");
  c.torch_dtype = *dt;
  c.tie_word_embeddings = meta["tie_word_embeddings"].get<bool>();
  if (s.N > (int64_t{1} << 40) / (s.T * H)) return corrupt(path + ": N·T·H too large");
  QCAL_ASSIGN_OR_RETURN(s.x0, read_vec<float>(*f, "x0", s.N * s.T * H, true));
  if (!meta.contains("layers") || !meta["layers"].is_array() ||
      static_cast<int64_t>(meta["layers"].size()) != L)
    return corrupt(path + ": metadata has no entry per layer (" + std::to_string(L) + ")");
  s.online.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    const std::string at = path + ": layer " + std::to_string(l);
    const nlohmann::json& lj = meta["layers"][static_cast<size_t>(l)];
    NativeLayer& nl = s.online[static_cast<size_t>(l)];
    if (!lj.is_object() || !lj.contains("act") || !lj["act"].is_array() ||
        lj["act"].size() != kNumProj || !lj.contains("k") || !lj.contains("v"))
      return corrupt(at + ": needs act (7 entries), k and v");
    for (int p = 0; p < kNumProj; ++p) {
      QCAL_ASSIGN_OR_RETURN(nl.act[p], act_from_json(lj["act"][static_cast<size_t>(p)], at));
    }
    QCAL_ASSIGN_OR_RETURN(nl.k, act_from_json(lj["k"], at));
    QCAL_ASSIGN_OR_RETURN(nl.v, act_from_json(lj["v"], at));
    Status st = Status::ok();
    for_each_transform(nl.online, [&](const char* name, std::vector<float>& v) {
      if (!st.is_ok()) return;
      auto r = read_vec<float>(*f, "layers." + std::to_string(l) + ".online." + name, -1);
      if (!r.is_ok()) {
        st = r.status();
      } else {
        v = std::move(r).value();
      }
    });
    QCAL_RETURN_IF_ERROR(st);
    QCAL_RETURN_IF_ERROR(check_online(nl.online, c, at));
  }
  return s;
}

Status save_cbq_state(const CbqState& s, const std::vector<CbqLayerResult>& finalized,
                      const std::string& path) {
  if (s.x_fp.empty() || (!s.x_q.empty() && s.x_q.size() != s.x_fp.size()) || s.next_window < 0)
    return invalid_input("save_cbq_state: state without activations or of mismatched sizes");
  std::vector<StEntry> e;
  nlohmann::json meta = {{"format", kStateFormat},
                         {"version", 1},
                         {"next_window", s.next_window},
                         {"rows", static_cast<int64_t>(s.x_fp.size())},
                         {"carried", nlohmann::json::array()},
                         {"finalized", nlohmann::json::array()}};
  add_vec(e, "x_fp", DType::kF32, s.x_fp);
  add_vec(e, "x_q", DType::kF32, s.x_q);
  for (size_t j = 0; j < s.carried.size(); ++j) {
    const CbqBlockParams& b = s.carried[j];
    meta["carried"].push_back({{"layer", b.layer}});
    const std::string pre = "carried." + std::to_string(j) + ".";
    for (int p = 0; p < kNumProj; ++p) {
      const std::string ps = std::to_string(p);
      add_vec(e, pre + "rho." + ps, DType::kF64, b.rho[p]);
      add_vec(e, pre + "a1." + ps, DType::kF64, b.a1[p]);
      add_vec(e, pre + "a2." + ps, DType::kF64, b.a2[p]);
      add_vec(e, pre + "act_max." + ps, DType::kF64, b.clip.act_max[p]);
      add_vec(e, pre + "act_min." + ps, DType::kF64, b.clip.act_min[p]);
      add_vec(e, pre + "w_max." + ps, DType::kF64, b.clip.w_max[p]);
      add_vec(e, pre + "w_min." + ps, DType::kF64, b.clip.w_min[p]);
    }
    add_vec(e, pre + "k_max", DType::kF64, b.clip.k_max);
    add_vec(e, pre + "k_min", DType::kF64, b.clip.k_min);
    add_vec(e, pre + "v_max", DType::kF64, b.clip.v_max);
    add_vec(e, pre + "v_min", DType::kF64, b.clip.v_min);
  }
  // Clip ratios and CFP counts as tensors (exact); codes as U8.
  std::vector<std::vector<double>> clips(finalized.size());
  std::vector<std::vector<int64_t>> counts(finalized.size());
  std::vector<std::array<std::vector<int64_t>, 3>> outl(finalized.size());
  for (size_t i = 0; i < finalized.size(); ++i) {
    const CbqLayerResult& res = finalized[i];
    nlohmann::json fj = {{"layer", res.layer}, {"q", nlohmann::json::array()}};
    const std::string pre = "finalized." + std::to_string(i) + ".";
    for (int p = 0; p < kNumProj; ++p) {
      const QuantizedLinear& q = res.q[p];
      fj["q"].push_back({{"out", q.out_features},
                         {"in", q.in_features},
                         {"bits", q.spec.bits},
                         {"group_size", q.spec.group_size},
                         {"sym", q.spec.sym}});
      const std::string ps = pre + "q." + std::to_string(p) + ".";
      add_vec(e, ps + "codes", DType::kU8, q.q);
      add_vec(e, ps + "scales", DType::kF32, q.scales);
      add_vec(e, ps + "zeros", DType::kI32, q.zeros);
      add_vec(e, ps + "g_idx", DType::kI32, q.g_idx);
    }
    meta["finalized"].push_back(fj);
    clips[i].assign(res.act_clip.begin(), res.act_clip.end());
    clips[i].push_back(res.k_clip);
    clips[i].push_back(res.v_clip);
    counts[i].assign(res.cfp_truncated.begin(), res.cfp_truncated.end());
    add_vec(e, pre + "clips", DType::kF64, clips[i]);
    add_vec(e, pre + "cfp_truncated", DType::kI64, counts[i]);
    add_vec(e, pre + "smooth_attn", DType::kF64, res.smooth_attn);
    add_vec(e, pre + "smooth_mlp", DType::kF64, res.smooth_mlp);
    add_vec(e, pre + "smooth_down", DType::kF64, res.smooth_down);
    for (int k = 0; k < 3; ++k)
      add_vec(e, pre + "outliers." + std::to_string(k), DType::kI64, res.outlier_channels[k]);
  }
  return write_st(path, e, kStateMeta, meta);
}

Result<CbqState> load_cbq_state(const std::string& path, std::vector<CbqLayerResult>* finalized) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::open(path));
  QCAL_ASSIGN_OR_RETURN(nlohmann::json meta, read_meta(*f, kStateMeta, kStateFormat));
  CbqState s;
  QCAL_ASSIGN_OR_RETURN(s.next_window, meta_int(meta, "next_window", 0, 1 << 30, path));
  QCAL_ASSIGN_OR_RETURN(const int64_t rows, meta_int(meta, "rows", 1, int64_t{1} << 40, path));
  QCAL_ASSIGN_OR_RETURN(s.x_fp, read_vec<float>(*f, "x_fp", rows, true));
  if (f->find("x_q")) {
    QCAL_ASSIGN_OR_RETURN(s.x_q, read_vec<float>(*f, "x_q", rows, true));
  }
  if (!meta.contains("carried") || !meta["carried"].is_array() || !meta.contains("finalized") ||
      !meta["finalized"].is_array())
    return corrupt(path + ": metadata needs carried and finalized lists");
  auto finite = [](const std::vector<double>& v) {
    return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
  };
  for (size_t j = 0; j < meta["carried"].size(); ++j) {
    const std::string pre = "carried." + std::to_string(j) + ".";
    const std::string at = path + ": carried block " + std::to_string(j);
    CbqBlockParams b;
    QCAL_ASSIGN_OR_RETURN(b.layer, meta_int(meta["carried"][j], "layer", 0, 1 << 30, at));
    if (j > 0 && b.layer != s.carried.back().layer + 1)
      return corrupt(at + ": carried blocks are not consecutive layers");
    std::vector<std::vector<double>*> all;
    for (int p = 0; p < kNumProj; ++p) {
      const std::string ps = std::to_string(p);
      QCAL_ASSIGN_OR_RETURN(b.rho[p], read_vec<double>(*f, pre + "rho." + ps, -1));
      QCAL_ASSIGN_OR_RETURN(b.a1[p], read_vec<double>(*f, pre + "a1." + ps, -1));
      QCAL_ASSIGN_OR_RETURN(b.a2[p], read_vec<double>(*f, pre + "a2." + ps, -1));
      QCAL_ASSIGN_OR_RETURN(b.clip.act_max[p], read_vec<double>(*f, pre + "act_max." + ps, -1));
      QCAL_ASSIGN_OR_RETURN(b.clip.act_min[p], read_vec<double>(*f, pre + "act_min." + ps, -1));
      QCAL_ASSIGN_OR_RETURN(b.clip.w_max[p], read_vec<double>(*f, pre + "w_max." + ps, -1));
      QCAL_ASSIGN_OR_RETURN(b.clip.w_min[p], read_vec<double>(*f, pre + "w_min." + ps, -1));
      if (b.rho[p].empty() || (b.a1[p].empty() != b.a2[p].empty()))
        return corrupt(at + ": step sizes missing or only one LoRA factor of linear " + ps);
      for (auto* v : {&b.rho[p], &b.a1[p], &b.a2[p], &b.clip.act_max[p], &b.clip.act_min[p],
                      &b.clip.w_max[p], &b.clip.w_min[p]})
        all.push_back(v);
    }
    QCAL_ASSIGN_OR_RETURN(b.clip.k_max, read_vec<double>(*f, pre + "k_max", -1));
    QCAL_ASSIGN_OR_RETURN(b.clip.k_min, read_vec<double>(*f, pre + "k_min", -1));
    QCAL_ASSIGN_OR_RETURN(b.clip.v_max, read_vec<double>(*f, pre + "v_max", -1));
    QCAL_ASSIGN_OR_RETURN(b.clip.v_min, read_vec<double>(*f, pre + "v_min", -1));
    for (auto* v : {&b.clip.k_max, &b.clip.k_min, &b.clip.v_max, &b.clip.v_min}) all.push_back(v);
    for (auto* v : all)
      if (!finite(*v)) return corrupt(at + ": a parameter is not finite");
    s.carried.push_back(std::move(b));
  }
  if (!finalized) return s;
  std::vector<CbqLayerResult> fin;
  for (size_t i = 0; i < meta["finalized"].size(); ++i) {
    const nlohmann::json& fj = meta["finalized"][i];
    const std::string pre = "finalized." + std::to_string(i) + ".";
    const std::string at = path + ": finalized result " + std::to_string(i);
    CbqLayerResult res;
    QCAL_ASSIGN_OR_RETURN(res.layer, meta_int(fj, "layer", 0, 1 << 30, at));
    if (!fin.empty() && res.layer <= fin.back().layer)
      return corrupt(at + ": finalized layers are not ascending");
    if (!fj.contains("q") || !fj["q"].is_array() || fj["q"].size() != kNumProj)
      return corrupt(at + ": needs 7 linears");
    for (int p = 0; p < kNumProj; ++p) {
      const nlohmann::json& qj = fj["q"][static_cast<size_t>(p)];
      const std::string lat = at + " linear " + std::to_string(p);
      QuantizedLinear& q = res.q[p];
      QCAL_ASSIGN_OR_RETURN(q.out_features, meta_int(qj, "out", 1, int64_t{1} << 24, lat));
      QCAL_ASSIGN_OR_RETURN(q.in_features, meta_int(qj, "in", 1, int64_t{1} << 24, lat));
      QCAL_ASSIGN_OR_RETURN(const int64_t bits, meta_int(qj, "bits", 2, 8, lat));
      QCAL_ASSIGN_OR_RETURN(q.spec.group_size, meta_int(qj, "group_size", -1, q.in_features, lat));
      if (!qj.contains("sym") || !qj["sym"].is_boolean()) return corrupt(lat + ": no sym");
      q.spec.bits = static_cast<int>(bits);
      q.spec.sym = qj["sym"].get<bool>();
      const int64_t O = q.out_features, I = q.in_features;
      const int64_t gc = q.spec.group_size > 0 ? q.spec.group_size : I, G = (I + gc - 1) / gc;
      const std::string ps = pre + "q." + std::to_string(p) + ".";
      QCAL_ASSIGN_OR_RETURN(q.q, read_vec<uint8_t>(*f, ps + "codes", O * I, true));
      QCAL_ASSIGN_OR_RETURN(q.scales, read_vec<float>(*f, ps + "scales", G * O, true));
      QCAL_ASSIGN_OR_RETURN(q.zeros, read_vec<int32_t>(*f, ps + "zeros", G * O, true));
      QCAL_ASSIGN_OR_RETURN(q.g_idx, read_vec<int32_t>(*f, ps + "g_idx", I, true));
      const int maxq = (1 << q.spec.bits) - 1;
      for (uint8_t v : q.q)
        if (v > maxq) return corrupt(lat + ": a code is outside [0, " + std::to_string(maxq) + "]");
      for (int32_t z : q.zeros)
        if (z < 0 || z > maxq) return corrupt(lat + ": a zero point is out of range");
      for (int32_t g : q.g_idx)
        if (g < 0 || g >= G) return corrupt(lat + ": g_idx out of range");
      for (float sc : q.scales)
        if (!(std::isfinite(sc) && sc > 0)) return corrupt(lat + ": a scale is not positive");
    }
    QCAL_ASSIGN_OR_RETURN(std::vector<double> clips,
                          read_vec<double>(*f, pre + "clips", kNumProj + 2, true));
    for (double v : clips)
      if (!(std::isfinite(v) && v > 0 && v <= 1))
        return corrupt(at + ": clip ratio outside (0, 1]");
    std::copy(clips.begin(), clips.begin() + kNumProj, res.act_clip.begin());
    res.k_clip = clips[kNumProj];
    res.v_clip = clips[kNumProj + 1];
    QCAL_ASSIGN_OR_RETURN(std::vector<int64_t> counts,
                          read_vec<int64_t>(*f, pre + "cfp_truncated", kNumProj, true));
    std::copy(counts.begin(), counts.end(), res.cfp_truncated.begin());
    QCAL_ASSIGN_OR_RETURN(res.smooth_attn, read_vec<double>(*f, pre + "smooth_attn", -1));
    QCAL_ASSIGN_OR_RETURN(res.smooth_mlp, read_vec<double>(*f, pre + "smooth_mlp", -1));
    QCAL_ASSIGN_OR_RETURN(res.smooth_down, read_vec<double>(*f, pre + "smooth_down", -1));
    for (const auto* v : {&res.smooth_attn, &res.smooth_mlp, &res.smooth_down})
      for (double x : *v)
        if (!(std::isfinite(x) && x > 0)) return corrupt(at + ": CFP smoothing not positive");
    for (int k = 0; k < 3; ++k) {
      QCAL_ASSIGN_OR_RETURN(res.outlier_channels[k],
                            read_vec<int64_t>(*f, pre + "outliers." + std::to_string(k), -1));
    }
    fin.push_back(std::move(res));
  }
  *finalized = std::move(fin);
  return s;
}

Result<NativeModel> calibrate(const FpModel& fp, const TokenSequences& calib, const CalibRecipe& r,
                              CalibReport* report, const CalibProgress& progress) {
  const double t0 = steady_seconds();
  const ModelConfig& c = fp.config;
  QCAL_RETURN_IF_ERROR(check_recipe(r, c, calib));
  CalibReport local;
  CalibReport* rep = report ? report : &local;
  const int64_t L = c.num_hidden_layers, N = calib.count(), T = calib.seqlen;
  const bool flat = r.transform == Transform::kFlatQuant;
  const bool gptq = r.weight_solver == WeightSolver::kGptq && r.w_bits < 16;

  if (r.reconstruction != Reconstruction::kNone) {
    // prepare → windows → finish: the steps the service runs as separate tasks.
    QCAL_ASSIGN_OR_RETURN(CbqSetup setup, cbq_prepare_impl(fp, calib, r, rep, progress));
    CbqState state = cbq_initial_state(setup.x0, cbq_options(r, setup.model.config));
    setup.x0 = {};
    std::vector<CbqLayerResult> fin;
    QCAL_RETURN_IF_ERROR(run_windows(setup, r, &state, &fin, rep, progress));
    state = CbqState();
    if (r.intactkv && progress) progress("intactkv", 0, 1);
    QCAL_ASSIGN_OR_RETURN(NativeModel nm, cbq_finish(setup, fin, r, &calib, rep, progress));
    rep->seconds = steady_seconds() - t0;
    return nm;
  }

  TransformStage ts;
  QCAL_RETURN_IF_ERROR(ts.init(fp, calib, r, rep, progress));
  const FpModel& m = ts.model();

  NativeModel nm;
  nm.config = m.config;
  nm.recipe = r.to_json();
  nm.w_bits = r.w_bits;
  nm.w_group = r.w_bits < 16 && r.w_group > 0 ? r.w_group : -1;
  nm.embed = m.embed;
  nm.final_norm = m.final_norm;
  nm.lm_head = m.lm_head;

  // IntactKV's FP twin (intactkv.h fp_view): the deployed layers before their weights
  // are quantized. At W16 the native layers already are that.
  std::vector<NativeLayer> fp_layers;

  std::vector<float> xq;  // (N·T, H): the quantized path's layer inputs (GPTQ)
  if (gptq) xq = embed_tokens(m, calib);
  for (int64_t l = 0; l < L; ++l) {
    if (progress) progress(flat ? "flatquant" : "quantize", l, L);
    const double tl = steady_seconds();
    CalibLayerReport lr;
    lr.layer = l;
    QCAL_ASSIGN_OR_RETURN(Deployed dl, ts.layer(l, &lr));
    if (r.w_bits < 16) {
      if (r.intactkv) fp_layers.push_back(native_layer(dl, nullptr, r));
      std::array<QuantizedLinear, kNumProj> ql;
      QCAL_RETURN_IF_ERROR(quantize_layer_weights(c, r, l, dl, xq, N, T, &ql));
      nm.layers.push_back(native_layer(dl, &ql, r));
    } else {
      nm.layers.push_back(native_layer(dl, nullptr, r));
    }
    if (gptq && l + 1 < L) advance(c, dl, xq, N, T, r.batch);
    lr.seconds = steady_seconds() - tl;
    if (flat) {
      LOG_INFO << "flatquant: layer " << l << " loss " << lr.loss_first << " -> " << lr.loss_last
               << " (" << lr.seconds << " s)";
    }
    rep->layers.push_back(lr);
  }
  if (r.intactkv) {
    if (progress) progress("intactkv", 0, 1);
    QCAL_RETURN_IF_ERROR(intactkv_stage(nm, std::move(fp_layers), r, &calib, rep, progress));
  }
  rep->seconds = steady_seconds() - t0;
  return nm;
}

Result<CalibReport> calibrate_to_dir(const std::string& model_dir, const TokenSequences& calib,
                                     const CalibRecipe& r, const std::string& out_dir,
                                     const std::string& format, bool overwrite,
                                     const CalibProgress& progress) {
  const double t0 = steady_seconds();
  QCAL_RETURN_IF_ERROR(r.validate());
  const bool native = format == "native" || format.empty();
  std::optional<CheckpointFormat> ckpt;
  if (!native) {
    QCAL_ASSIGN_OR_RETURN(CheckpointFormat f, parse_checkpoint_format(format));
    ckpt = f;
  }
  CalibReport report;
  if (!r.folds_completely() || native) {
    if (!native && r.transforms_fold()) {
      LOG_WARN << "quantize: IntactKV's prefix cache needs the native format; writing it "
               << "instead of " << format;
    } else if (!native) {
      LOG_WARN << "quantize: " << transform_name(r.transform) << " with a" << r.a_bits << " kv"
               << r.kv_bits << " keeps transforms or quantizers online; writing the native "
               << "format instead of " << format;
    }
    QCAL_ASSIGN_OR_RETURN(FpModel fp, load_fp_model(model_dir));
    QCAL_ASSIGN_OR_RETURN(NativeModel nm, calibrate(fp, calib, r, &report, progress));
    QCAL_RETURN_IF_ERROR(write_native(nm, out_dir, overwrite));
    report.seconds = steady_seconds() - t0;
    return report;
  }

  if (r.reconstruction != Reconstruction::kNone) {
    // A weight-only reconstruction: the transformed FP model with every linear
    // replaced by its trained codes, through worker/engine's writer.
    QCAL_ASSIGN_OR_RETURN(FpModel fp, load_fp_model(model_dir));
    QCAL_RETURN_IF_ERROR(check_recipe(r, fp.config, calib));
    QCAL_ASSIGN_OR_RETURN(CbqSetup setup, cbq_prepare_impl(fp, calib, r, &report, progress));
    fp = FpModel();
    CbqState state = cbq_initial_state(setup.x0, cbq_options(r, setup.model.config));
    setup.x0 = {};
    std::vector<CbqLayerResult> fin;
    QCAL_RETURN_IF_ERROR(run_windows(setup, r, &state, &fin, &report, progress));
    state = CbqState();
    const ModelConfig& c = setup.model.config;
    QCAL_ASSIGN_OR_RETURN(std::vector<const CbqLayerResult*> by, results_by_layer(fin, c, r));
    std::map<std::string, QuantizedLinear> qlinears;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const CbqLayerResult& res = *by[static_cast<size_t>(l)];
      if (!res.smooth_attn.empty() || !res.smooth_mlp.empty() || !res.smooth_down.empty())
        return internal_error("cbq: activation smoothing in a weight-only reconstruction");
      for (int p = 0; p < kNumProj; ++p) {
        QuantizedLinear q = res.q[p];
        q.spec.group_size = r.w_group > 0 ? r.w_group : -1;  // one group_size for all modules
        qlinears[layer_prefix(l) + kProjNames[p]] = std::move(q);
      }
    }
    fin.clear();
    const std::string tmp = out_dir + ".qcal-transformed." + staging_tag();
    std::error_code ec;
    std::filesystem::remove_all(tmp, ec);
    Status st = write_fp_model(setup.model, tmp, /*overwrite=*/true);
    setup = CbqSetup();
    if (st.is_ok()) {
      copy_side_files(model_dir, tmp);
      auto md = ModelDir::open(tmp);
      if (!md.is_ok()) {
        st = md.status();
      } else {
        WriteOptions wo;
        wo.format = *ckpt;
        wo.overwrite = overwrite;
        wo.extra_config = {{"meta", {{"qcal_recipe", r.to_json()}}}};
        st = write_quantized_checkpoint(*md.value(), qlinears, wo, out_dir);
      }
    }
    std::filesystem::remove_all(tmp, ec);
    QCAL_RETURN_IF_ERROR(st);
    report.seconds = steady_seconds() - t0;
    return report;
  }

  // Everything folds: an FP model (transformed when needed) through worker/engine.
  QuantizeOptions opts;
  opts.method = r.weight_solver == WeightSolver::kGptq ? WeightMethod::kGptq : WeightMethod::kRtn;
  opts.spec = weight_spec(r);
  opts.gptq = r.gptq;
  opts.true_sequential = true;
  opts.batch = r.batch;
  opts.write.format = *ckpt;
  opts.write.overwrite = overwrite;
  opts.write.extra_config = {{"meta", {{"qcal_recipe", r.to_json()}}}};
  ProgressFn engine_progress;
  if (progress) {
    engine_progress = [&progress](int64_t l, int64_t n) { progress("quantize", l, n); };
  }
  std::string src = model_dir;
  std::string tmp;
  if (r.transform != Transform::kNone) {
    QCAL_ASSIGN_OR_RETURN(FpModel fp, load_fp_model(model_dir));
    QCAL_RETURN_IF_ERROR(check_recipe(r, fp.config, calib));
    QCAL_ASSIGN_OR_RETURN(FpModel tm, folded_fp_model(fp, calib, r, &report, progress));
    tmp = out_dir + ".qcal-transformed." + staging_tag();
    std::error_code ec;
    std::filesystem::remove_all(tmp, ec);
    QCAL_RETURN_IF_ERROR(write_fp_model(tm, tmp, /*overwrite=*/true));
    // Tokenizer and generation files travel with the model (the writer copies them).
    copy_side_files(model_dir, tmp);
    src = tmp;
  }
  auto res = quantize_model(src, calib, opts, out_dir, engine_progress);
  if (!tmp.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(tmp, ec);
  }
  if (!res.is_ok()) return res.status();
  for (const auto& l : res->layers) {
    CalibLayerReport lr;
    lr.layer = l.layer;
    lr.seconds = l.seconds;
    report.layers.push_back(lr);
  }
  report.seconds = steady_seconds() - t0;
  return report;
}

}  // namespace qcal::calib

// IntactKV (methods.md §6, §11.8): FP prefix cache, its evaluation protocol, its
// calibration as trainable parameters (§6.4), and the attention-sink diagnostic.
// See intactkv.h.
//
// Letters: L layers, P prefix tokens, T tokens per sequence, S sequences, N rows
// (sequences × tokens), V vocab, H hidden, Q = n_h·d, K = n_kv·d.
#include "worker/calib/intactkv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "common/clock.h"
#include "common/log.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "worker/calib/param.h"

namespace qcal::calib {

namespace {

bool quant_off(const NativeActQuant& a) { return a.bits >= 16; }

// The shape fields both models of attach_intactkv must share.
Status check_same_shape(const ModelConfig& a, const ModelConfig& b) {
  auto field = [](const char* name, double x, double y) -> Status {
    if (x == y) return Status::ok();
    return invalid_input(std::string("IntactKV: the FP model's ") + name + " " + std::to_string(y) +
                         " differs from the quantized model's " + std::to_string(x));
  };
  QCAL_RETURN_IF_ERROR(field("hidden_size", a.hidden_size, b.hidden_size));
  QCAL_RETURN_IF_ERROR(field("intermediate_size", a.intermediate_size, b.intermediate_size));
  QCAL_RETURN_IF_ERROR(field("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers));
  QCAL_RETURN_IF_ERROR(field("num_attention_heads", a.num_attention_heads, b.num_attention_heads));
  QCAL_RETURN_IF_ERROR(field("num_key_value_heads", a.num_key_value_heads, b.num_key_value_heads));
  QCAL_RETURN_IF_ERROR(field("head_dim", a.head_dim, b.head_dim));
  QCAL_RETURN_IF_ERROR(field("vocab_size", a.vocab_size, b.vocab_size));
  QCAL_RETURN_IF_ERROR(field("rope_theta", a.rope_theta, b.rope_theta));
  return Status::ok();
}

// The members of BlockTransformsT that act online in a NativeLayer.
constexpr std::vector<float> BlockTransformsT<float>::*kOnlineMembers[] = {
    &BlockTransformsT<float>::a1, &BlockTransformsT<float>::a2, &BlockTransformsT<float>::u1,
    &BlockTransformsT<float>::u2, &BlockTransformsT<float>::d1, &BlockTransformsT<float>::d2,
    &BlockTransformsT<float>::po, &BlockTransformsT<float>::pk, &BlockTransformsT<float>::pk_it};
constexpr const char* kOnlineNames[] = {"a1", "a2", "u1", "u2", "d1", "d2", "po", "pk", "pk_it"};

Status check_fp_twin(const NativeModel& q, const NativeModel& fp) {
  QCAL_RETURN_IF_ERROR(check_same_shape(q.config, fp.config));
  const int64_t L = q.config.num_hidden_layers;
  if (static_cast<int64_t>(q.layers.size()) != L || static_cast<int64_t>(fp.layers.size()) != L)
    return invalid_input("IntactKV: a model holds a number of layers other than its config's " +
                         std::to_string(L));
  if (fp.w_bits < 16)
    return invalid_input("IntactKV: the FP model has " + std::to_string(fp.w_bits) +
                         "-bit weights; it needs float weights (w_bits 16, see fp_view)");
  if (!fp.intact_prefix.empty())
    return invalid_input("IntactKV: the FP model carries an IntactKV prefix of its own");
  for (int64_t l = 0; l < L; ++l) {
    const NativeLayer& y = fp.layers[l];
    const std::string where = "IntactKV: FP model layer " + std::to_string(l) + ": ";
    for (int p = 0; p < kNumProj; ++p)
      if (!quant_off(y.act[p]))
        return invalid_input(where + "the " + kProjNames[p] + " input quantizer is on (" +
                             std::to_string(y.act[p].bits) + " bits); every quantizer must be off");
    if (!quant_off(y.k) || !quant_off(y.v))
      return invalid_input(where + "the K/V cache quantizer is on; every quantizer must be off");
    for (size_t i = 0; i < std::size(kOnlineMembers); ++i)
      if (y.online.*kOnlineMembers[i] != q.layers[l].online.*kOnlineMembers[i])
        return invalid_input(where + "online transform " + kOnlineNames[i] +
                             " differs from the quantized model's (the prefix cache would be in "
                             "another basis)");
  }
  return Status::ok();
}

// Σ over heads, queries t = 1..T−1 and sequences of the attention probability on
// key 0, from the normalized block input xn (nb·T, H) of layer weights w.
double sink_mass(const ModelConfig& c, const LayerWeights& w, const float* xn, int64_t nb,
                 int64_t T) {
  const int64_t H = c.hidden_size, Q = c.q_dim(), K = c.kv_dim(), N = nb * T;
  const int64_t n_h = c.num_attention_heads, n_kv = c.num_key_value_heads, d = c.head_dim;
  const int64_t rep = n_h / n_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> q(static_cast<size_t>(N * Q)), k(static_cast<size_t>(N * K));
  std::vector<float> sc(static_cast<size_t>(T * T));  // (T, T) scores of one head
  linear_forward(q.data(), xn, w.q.ptr(), w.q_bias.data.empty() ? nullptr : w.q_bias.ptr(), N, H,
                 Q);
  linear_forward(k.data(), xn, w.k.ptr(), w.k_bias.data.empty() ? nullptr : w.k_bias.ptr(), N, H,
                 K);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    float* qb = q.data() + b * T * Q;
    float* kb = k.data() + b * T * K;
    rope_forward(qb, T, n_h, d, 0, c.rope_theta);
    rope_forward(kb, T, n_kv, d, 0, c.rope_theta);
    for (int64_t h = 0; h < n_h; ++h) {
      sgemm(false, true, T, T, d, scale, qb + h * d, Q, kb + (h / rep) * d, K, 0.0f, sc.data(), T);
      for (int64_t t = 1; t < T; ++t) {
        const float* row = sc.data() + t * T;
        const float mx = *std::max_element(row, row + t + 1);
        double sum = 0.0;
        for (int64_t j = 0; j <= t; ++j) sum += std::exp(static_cast<double>(row[j] - mx));
        total += std::exp(static_cast<double>(row[0] - mx)) / sum;
      }
    }
  }
  return total;
}

// ---- "+Cal" (§6.4): the QBlock chains of the quantized and the FP model.

FakeQuantSpec fake_quant_spec(const NativeActQuant& a) {
  FakeQuantSpec s;
  s.bits = a.bits;
  s.sym = a.sym;
  s.group = a.group;
  s.ste = Ste::kLsq;
  s.clip = ClipMode::kFixed;
  s.clip_ratio = a.clip;
  return s;
}

template <typename T>
std::vector<T> cast_vec(const std::vector<float>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// The online members native_block_inputs sets (the others stay empty).
template <typename T>
BlockTransformsT<T> cast_online(const BlockTransformsT<float>& t) {
  BlockTransformsT<T> o;
  o.a1 = cast_vec<T>(t.a1), o.a2 = cast_vec<T>(t.a2);
  o.u1 = cast_vec<T>(t.u1), o.u2 = cast_vec<T>(t.u2);
  o.d1 = cast_vec<T>(t.d1), o.d2 = cast_vec<T>(t.d2);
  o.po = cast_vec<T>(t.po), o.pk = cast_vec<T>(t.pk), o.pk_it = cast_vec<T>(t.pk_it);
  return o;
}

// Every layer of a NativeModel as a QBlock<T> (native_block_inputs), plus its
// embedding. Holds the blocks' inputs; not copyable (the blocks point into it).
template <typename T>
class Chain {
 public:
  explicit Chain(const NativeModel& m) : c_(m.config), embed_(m.embed) {
    const int64_t L = static_cast<int64_t>(m.layers.size());
    w_.reserve(static_cast<size_t>(L));
    t_.reserve(static_cast<size_t>(L));
    q_.reserve(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) {
      NativeBlockInputs b = native_block_inputs(m, l);
      if constexpr (std::is_same_v<T, float>) {
        w_.push_back(std::move(b.w));
        t_.push_back(std::move(b.t));
      } else {
        w_.push_back(cast_weights<T>(b.w));
        t_.push_back(cast_online<T>(b.t));
      }
      q_.push_back(b.q);
    }
    for (int64_t l = 0; l < L; ++l)
      blocks_.push_back(std::make_unique<QBlock<T>>(c_, &w_[l], &t_[l], &q_[l], &clip_));
  }
  Chain(const Chain&) = delete;
  Chain& operator=(const Chain&) = delete;

  int64_t layers() const { return static_cast<int64_t>(blocks_.size()); }
  QBlock<T>& block(int64_t l) { return *blocks_[static_cast<size_t>(l)]; }
  // x (n, H) ← the embedding rows of tokens[0..n).
  void embed(const int32_t* tokens, int64_t n, T* x) const {
    const int64_t H = c_.hidden_size;
    for (int64_t r = 0; r < n; ++r) {
      const float* e = embed_.data() + static_cast<int64_t>(tokens[r]) * H;
      std::copy(e, e + H, x + r * H);
    }
  }

 private:
  const ModelConfig c_;  // the blocks keep a reference to it
  const std::vector<float>& embed_;
  std::vector<BlockWeightsT<T>> w_;
  std::vector<BlockTransformsT<T>> t_;
  std::vector<BlockQuantSpec> q_;
  const BlockClipT<T> clip_;
  std::vector<std::unique_ptr<QBlock<T>>> blocks_;
};

// h^fp of one sequence: every layer's output on the full sequence (T tokens,
// positions 0..T−1) without its first P rows: L entries of ((T−P)·H).
template <typename T>
void fp_targets(Chain<T>& fp, const int32_t* seq, int64_t T_, int64_t P, int64_t H,
                std::vector<std::vector<T>>* out) {
  std::vector<T> a(static_cast<size_t>(T_ * H)), b(a.size());
  fp.embed(seq, T_, a.data());
  out->resize(static_cast<size_t>(fp.layers()));
  for (int64_t l = 0; l < fp.layers(); ++l) {
    fp.block(l).forward(a.data(), b.data(), 1, T_);
    (*out)[static_cast<size_t>(l)].assign(b.begin() + P * H, b.end());
    a.swap(b);
  }
}

// Buffers of seq_objective, reused across sequences.
template <typename T>
struct Work {
  std::vector<std::vector<T>> xs;  // L+1 residual streams (Tn, H)
  std::vector<T> tmp, dy;
  std::unique_ptr<BlockTape<T>> tape = make_tape<T>();
};

// The objective of one sequence (tokens after the prefix, Tn of them) through the
// quantized chain, whose blocks hold the prefix already; with `grads` (L entries)
// the prefix gradients are accumulated into grads[l].prefix_k / prefix_v. The
// backward recomputes each layer's forward from its saved input (one tape alive).
template <typename T>
double seq_objective(Chain<T>& qc, const int32_t* rest, int64_t Tn, int64_t H,
                     const std::vector<std::vector<T>>& tgt, std::vector<BlockGradsT<T>>* grads,
                     RoundTape<T>* rt, Work<T>& w) {
  const int64_t L = qc.layers(), n = Tn * H;
  const double inv = 1.0 / static_cast<double>(n);
  w.xs.resize(static_cast<size_t>(L + 1));
  for (auto& x : w.xs) x.resize(static_cast<size_t>(n));
  qc.embed(rest, Tn, w.xs[0].data());
  double loss = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    qc.block(l).forward(w.xs[l].data(), w.xs[l + 1].data(), 1, Tn, nullptr, nullptr, rt);
    const T* h = w.xs[l + 1].data();
    const T* f = tgt[static_cast<size_t>(l)].data();
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(h[i]) - static_cast<double>(f[i]);
      s += d * d;
    }
    loss += 0.5 * s * inv;
  }
  if (!grads || !std::isfinite(loss)) return loss;
  // dL/dh_l = (h_l − h_l^fp)/n from layer l's own term, plus the chain from above.
  auto add_direct = [&](int64_t l, T* dst, bool overwrite) {
    const T* h = w.xs[l + 1].data();
    const T* f = tgt[static_cast<size_t>(l)].data();
    const T sc = static_cast<T>(inv);
    for (int64_t i = 0; i < n; ++i) dst[i] = (overwrite ? T(0) : dst[i]) + (h[i] - f[i]) * sc;
  };
  w.dy.resize(static_cast<size_t>(n));
  w.tmp.resize(static_cast<size_t>(n));
  add_direct(L - 1, w.dy.data(), true);
  for (int64_t l = L - 1; l >= 0; --l) {
    QBlock<T>& b = qc.block(l);
    b.forward(w.xs[l].data(), w.tmp.data(), 1, Tn, w.tape.get());
    BackwardOptions opt;
    opt.input = l > 0;
    opt.transforms = opt.clip = opt.weights = false;
    opt.prefix = true;
    BlockGradsT<T>& g = (*grads)[static_cast<size_t>(l)];
    b.backward(*w.tape, w.dy.data(), &g, opt);
    if (l > 0) {
      std::copy(g.dx.begin(), g.dx.end(), w.dy.begin());
      add_direct(l - 1, w.dy.data(), false);
    }
  }
  return loss;
}

Status check_cal_data(const NativeModel& q, const TokenSequences& data) {
  const int64_t T = data.seqlen;
  const int64_t S = data.count(), V = q.config.vocab_size;
  if (S < 1 || T < 1) return invalid_input("intactkv-cal: the data holds no sequence");
  QCAL_RETURN_IF_ERROR(check_intactkv_prefix(q.intact_prefix, data));
  for (int64_t s = 0; s < S; ++s) {
    const int32_t* seq = data.seq(s);
    for (int64_t t = 0; t < T; ++t)
      if (seq[t] < 0 || seq[t] >= V)
        return invalid_input("intactkv-cal: sequence " + std::to_string(s) + " token " +
                             std::to_string(t) + " = " + std::to_string(seq[t]) +
                             " is outside the vocabulary [0, " + std::to_string(V) + ")");
  }
  return Status::ok();
}

}  // namespace

NativeModel fp_view(const NativeModel& m) {
  QCAL_CHECK_MSG(m.w_bits >= 16, "fp_view: the model has quantized weights (w_bits < 16)");
  NativeModel f;
  f.config = m.config;
  f.recipe = m.recipe;
  f.w_bits = 16;
  f.w_group = -1;
  f.embed = m.embed;
  f.final_norm = m.final_norm;
  f.lm_head = m.lm_head;
  f.layers.reserve(m.layers.size());
  for (const NativeLayer& y : m.layers) {
    NativeLayer z;
    z.input_norm = y.input_norm;
    z.post_norm = y.post_norm;
    for (int p = 0; p < kNumProj; ++p) {
      const std::vector<int64_t> sh = proj_shape(m.config, kProjNames[p]);
      QCAL_CHECK_MSG(static_cast<int64_t>(y.fw[p].size()) == sh[0] * sh[1],
                     "fp_view: a layer lacks its float weights");
      z.fw[p] = y.fw[p];
    }
    z.bias = y.bias;
    z.online = y.online;  // act, k, v default to bits 16 (off)
    f.layers.push_back(std::move(z));
  }
  return f;
}

Status attach_intactkv(NativeModel& quantized, const NativeModel& fp_transformed,
                       const std::vector<int32_t>& prefix) {
  const ModelConfig& c = quantized.config;
  const int64_t P = static_cast<int64_t>(prefix.size()), V = c.vocab_size;
  if (P == 0) return invalid_input("IntactKV: the prefix is empty");
  for (int64_t i = 0; i < P; ++i)
    if (prefix[i] < 0 || prefix[i] >= V)
      return invalid_input("IntactKV: prefix token " + std::to_string(i) + " = " +
                           std::to_string(prefix[i]) + " is outside the vocabulary [0, " +
                           std::to_string(V) + ")");
  QCAL_RETURN_IF_ERROR(check_fp_twin(quantized, fp_transformed));
  // FP prefix forward (no prefix cache of its own: positions 0..P−1), every
  // quantizer off, so the captured entries are the FP K (post-RoPE, post-P_k) and V.
  NativeKvCapture cap;
  std::vector<float> logits = native_logits(fp_transformed, prefix.data(), 1, P, &cap);
  for (float v : logits)
    if (!std::isfinite(v)) return invalid_input("IntactKV: the FP prefix logits are not finite");
  quantized.intact_prefix = prefix;
  quantized.intact_k = std::move(cap.k);
  quantized.intact_v = std::move(cap.v);
  quantized.intact_logits = std::move(logits);
  return Status::ok();
}

Result<EvalResult> evaluate_native(const NativeModel& m, const TokenSequences& data,
                                   const LlamaModel* fp, int64_t batch) {
  const ModelConfig& c = m.config;
  const int64_t V = c.vocab_size, T = data.seqlen;
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  if (fp && fp->config().vocab_size != V)
    return invalid_input("FP model vocab " + std::to_string(fp->config().vocab_size) +
                         " differs from the model's " + std::to_string(V));
  if (P > 0) QCAL_RETURN_IF_ERROR(check_intactkv_prefix(m.intact_prefix, data));
  BatchLogits model_fn = [&](int64_t s0, int64_t nb) -> Result<Tensor> {
    Tensor t({nb * T, V});
    if (P == 0) {
      t.data = native_logits(m, data.seq(s0), nb, T);
      return t;
    }
    // tokens[P:] of each sequence after the FP prefix cache; positions 0..P−1 take
    // the stored FP prefix logits.
    const int64_t Tr = T - P;
    std::vector<int32_t> rest(static_cast<size_t>(nb * Tr));
    for (int64_t b = 0; b < nb; ++b)
      std::copy(data.seq(s0 + b) + P, data.seq(s0 + b) + T, rest.begin() + b * Tr);
    const std::vector<float> out = native_logits(m, rest.data(), nb, Tr);  // (nb·Tr, V)
    for (int64_t b = 0; b < nb; ++b) {
      float* dst = t.ptr() + b * T * V;
      std::memcpy(dst, m.intact_logits.data(), static_cast<size_t>(P * V) * sizeof(float));
      std::memcpy(dst + P * V, out.data() + b * Tr * V,
                  static_cast<size_t>(Tr * V) * sizeof(float));
    }
    return t;
  };
  BatchLogits fp_fn = [&](int64_t s0, int64_t nb) -> Result<Tensor> {
    return model_logits(*fp, data, s0, nb);
  };
  return evaluate_logits(model_fn, fp ? &fp_fn : nullptr, data, V, batch);
}

NativeBlockInputs native_block_inputs(const NativeModel& m, int64_t l) {
  const ModelConfig& c = m.config;
  QCAL_CHECK_MSG(l >= 0 && l < static_cast<int64_t>(m.layers.size()),
                 "native_block_inputs: layer out of range");
  const NativeLayer& y = m.layers[static_cast<size_t>(l)];
  NativeBlockInputs b;
  b.w.input_norm = y.input_norm;
  b.w.post_norm = y.post_norm;
  for (int p = 0; p < kNumProj; ++p) {
    const std::vector<int64_t> sh = proj_shape(c, kProjNames[p]);
    const int64_t out = sh[0], in = sh[1];
    std::vector<float>& W = b.w.w[p];
    if (m.w_bits >= 16) {
      QCAL_CHECK_MSG(static_cast<int64_t>(y.fw[p].size()) == out * in,
                     "native_block_inputs: a layer lacks its float weights");
      W = y.fw[p];
      continue;
    }
    // The dequantized codes, as native_logits computes them: scales[o, i/group]·q.
    const PackedWeight& pw = y.qw[p];
    QCAL_CHECK_MSG(pw.out == out && pw.in == in, "native_block_inputs: packed weight shape");
    const int64_t gs = pw.group > 0 ? pw.group : in, G = pw.group > 0 ? (in + gs - 1) / gs : 1;
    W.resize(static_cast<size_t>(out * in));
    std::vector<int8_t> codes(static_cast<size_t>(in));
    for (int64_t o = 0; o < out; ++o) {
      unpack_row(pw, o, codes.data());
      for (int64_t i = 0; i < in; ++i)
        W[o * in + i] = pw.scales[o * G + i / gs] * static_cast<float>(codes[i]);
    }
  }
  b.w.bias = y.bias;
  const BlockTransformsT<float>& t = y.online;
  b.t.a1 = t.a1, b.t.a2 = t.a2, b.t.u1 = t.u1, b.t.u2 = t.u2, b.t.d1 = t.d1, b.t.d2 = t.d2;
  b.t.po = t.po, b.t.pk = t.pk, b.t.pk_it = t.pk_it;
  for (int p = 0; p < kNumProj; ++p) b.q.act[p] = fake_quant_spec(y.act[p]);
  b.q.k = fake_quant_spec(y.k);
  b.q.v = fake_quant_spec(y.v);
  return b;
}

std::vector<float> qblock_chain_logits(const NativeModel& m, const int32_t* tokens, int64_t B,
                                       int64_t T) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, N = B * T;
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  for (int64_t r = 0; r < N; ++r)
    QCAL_CHECK_MSG(tokens[r] >= 0 && tokens[r] < V,
                   "qblock_chain_logits: token id outside the vocab");
  Chain<float> qc(m);
  for (int64_t l = 0; l < qc.layers() && P > 0; ++l)
    qc.block(l).set_prefix(m.intact_k[static_cast<size_t>(l)].data(),
                           m.intact_v[static_cast<size_t>(l)].data(), P);
  std::vector<float> x(static_cast<size_t>(N * H)), y(x.size());
  qc.embed(tokens, N, x.data());
  for (int64_t l = 0; l < qc.layers(); ++l) {
    qc.block(l).forward(x.data(), y.data(), B, T);
    x.swap(y);
  }
  std::vector<float> out(static_cast<size_t>(N * V));
  rmsnorm_forward(y.data(), x.data(), m.final_norm.data(), N, H,
                  static_cast<float>(c.rms_norm_eps));
  linear_forward(out.data(), y.data(), m.lm_head.data(), nullptr, N, H, V);
  return out;
}

double intactkv_cal_objective(const NativeModel& quantized, const NativeModel& fp_transformed,
                              const int32_t* seq, int64_t T,
                              const std::vector<std::vector<double>>& k,
                              const std::vector<std::vector<double>>& v,
                              std::vector<std::vector<double>>* dk,
                              std::vector<std::vector<double>>* dv, RoundTape<double>* tape) {
  const ModelConfig& c = quantized.config;
  const int64_t P = static_cast<int64_t>(quantized.intact_prefix.size()), H = c.hidden_size;
  const int64_t L = c.num_hidden_layers, K = c.kv_dim();
  QCAL_CHECK_MSG(P > 0 && P < T, "intactkv_cal_objective: needs a prefix shorter than T");
  QCAL_CHECK(static_cast<int64_t>(k.size()) == L && static_cast<int64_t>(v.size()) == L);
  Chain<double> qc(quantized), fc(fp_transformed);
  std::vector<std::vector<double>> tgt;
  fp_targets(fc, seq, T, P, H, &tgt);
  for (int64_t l = 0; l < L; ++l) {
    QCAL_CHECK(static_cast<int64_t>(k[l].size()) == P * K &&
               static_cast<int64_t>(v[l].size()) == P * K);
    qc.block(l).set_prefix(k[l].data(), v[l].data(), P);
  }
  if (tape && tape->mode == RoundTape<double>::Mode::kReplay) tape->pos = 0;
  std::vector<BlockGradsT<double>> grads;
  const bool want = dk || dv;
  if (want) grads.resize(static_cast<size_t>(L));
  Work<double> w;
  const double loss = seq_objective(qc, seq + P, T - P, H, tgt, want ? &grads : nullptr, tape, w);
  for (int64_t l = 0; l < L && want; ++l) {
    if (dk) dk->resize(static_cast<size_t>(L)), (*dk)[l] = grads[l].prefix_k;
    if (dv) dv->resize(static_cast<size_t>(L)), (*dv)[l] = grads[l].prefix_v;
  }
  return loss;
}

Result<IntactKvCalReport> calibrate_intactkv(
    NativeModel& quantized, const NativeModel& fp_transformed, const TokenSequences& data,
    const IntactKvCalOptions& o,
    const std::function<void(int64_t step, int64_t steps, double loss)>& progress) {
  const double t0 = steady_seconds();
  const ModelConfig& c = quantized.config;
  const int64_t P = static_cast<int64_t>(quantized.intact_prefix.size());
  const int64_t L = c.num_hidden_layers, H = c.hidden_size, K = c.kv_dim();
  if (P == 0)
    return invalid_input(
        "intactkv-cal: the quantized model has no IntactKV cache (attach_intactkv first)");
  if (o.steps < 0) return invalid_input("intactkv-cal: steps must be >= 0");
  if (o.accum < 1) return invalid_input("intactkv-cal: accum must be >= 1");
  if (!(o.lr > 0) || !std::isfinite(o.lr)) return invalid_input("intactkv-cal: lr must be > 0");
  if (!(o.warmup_ratio >= 0 && o.warmup_ratio <= 1))
    return invalid_input("intactkv-cal: warmup_ratio must be in [0, 1]");
  if (!(o.max_grad_norm > 0)) return invalid_input("intactkv-cal: max_grad_norm must be > 0");
  if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay))
    return invalid_input("intactkv-cal: weight_decay must be >= 0");
  QCAL_RETURN_IF_ERROR(check_fp_twin(quantized, fp_transformed));
  if (static_cast<int64_t>(quantized.intact_k.size()) != L ||
      static_cast<int64_t>(quantized.intact_v.size()) != L)
    return invalid_input("intactkv-cal: the IntactKV cache does not hold one entry per layer");
  for (int64_t l = 0; l < L; ++l)
    if (static_cast<int64_t>(quantized.intact_k[l].size()) != P * K ||
        static_cast<int64_t>(quantized.intact_v[l].size()) != P * K)
      return invalid_input("intactkv-cal: the IntactKV cache of layer " + std::to_string(l) +
                           " is not (P, n_kv·d)");
  QCAL_RETURN_IF_ERROR(check_cal_data(quantized, data));
  IntactKvCalReport rep;
  if (o.steps == 0) {
    rep.seconds = steady_seconds() - t0;
    return rep;
  }
  const int64_t T = data.seqlen, Tn = T - P, S = data.count();

  Chain<float> qc(quantized), fc(fp_transformed);
  // Parameters: fp64 masters (AdamW) and the float copies the blocks read.
  std::vector<std::vector<double>> master(static_cast<size_t>(2 * L));
  std::vector<std::vector<float>> cache(static_cast<size_t>(2 * L));
  AdamWOptions ao;
  ao.weight_decay = o.weight_decay;
  AdamW adam(ao);
  for (int64_t l = 0; l < L; ++l) {
    const std::vector<float>* src[2] = {&quantized.intact_k[l], &quantized.intact_v[l]};
    for (int j = 0; j < 2; ++j) {
      master[2 * l + j].assign(src[j]->begin(), src[j]->end());
      cache[2 * l + j] = *src[j];
    }
  }
  for (auto& m : master) adam.add(&m);
  for (int64_t l = 0; l < L; ++l)
    qc.block(l).set_prefix(cache[2 * l].data(), cache[2 * l + 1].data(), P);

  // FP targets: cached per sequence while all of them fit in 1 GiB.
  const bool keep_targets =
      static_cast<double>(S) * L * Tn * H * sizeof(float) <= static_cast<double>(int64_t{1} << 30);
  std::vector<std::vector<std::vector<float>>> targets(keep_targets ? static_cast<size_t>(S) : 0);
  std::vector<std::vector<float>> scratch_tgt;
  auto targets_of = [&](int64_t s) -> const std::vector<std::vector<float>>& {
    if (!keep_targets) {
      fp_targets(fc, data.seq(s), T, P, H, &scratch_tgt);
      return scratch_tgt;
    }
    auto& t = targets[static_cast<size_t>(s)];
    if (t.empty()) fp_targets(fc, data.seq(s), T, P, H, &t);
    return t;
  };

  // Sequence order: a permutation of 0..S−1 per pass (Fisher-Yates, Rng(seed)).
  Rng rng(o.seed);
  std::vector<int64_t> order(static_cast<size_t>(S));
  size_t cursor = order.size();
  auto next_seq = [&]() {
    if (cursor == order.size()) {
      for (int64_t i = 0; i < S; ++i) order[static_cast<size_t>(i)] = i;
      for (int64_t i = S - 1; i > 0; --i)
        std::swap(order[static_cast<size_t>(i)],
                  order[static_cast<size_t>(rng.below(static_cast<uint64_t>(i + 1)))]);
      cursor = 0;
    }
    return order[cursor++];
  };

  const int64_t warmup =
      static_cast<int64_t>(std::ceil(o.warmup_ratio * static_cast<double>(o.steps)));
  std::vector<BlockGradsT<float>> grads(static_cast<size_t>(L));
  std::vector<std::vector<double>> g(master.size());
  Work<float> work;
  auto fail = [](int64_t step, const std::string& what) {
    return internal_error("intactkv-cal step " + std::to_string(step) + ": " + what);
  };
  for (int64_t step = 0; step < o.steps; ++step) {
    for (auto& gr : grads) {
      gr.prefix_k.assign(static_cast<size_t>(P * K), 0.0f);
      gr.prefix_v.assign(static_cast<size_t>(P * K), 0.0f);
    }
    double loss = 0.0;
    const bool parallel = o.ranks > 1 && o.sum;
    const int64_t a0 = parallel ? o.accum * o.rank / o.ranks : 0,
                  a1 = parallel ? o.accum * (o.rank + 1) / o.ranks : o.accum;
    for (int64_t a = 0; a < o.accum; ++a) {
      const int64_t s = next_seq();  // every rank draws every sequence (the same order)
      if (a < a0 || a >= a1) continue;
      const double ls =
          seq_objective<float>(qc, data.seq(s) + P, Tn, H, targets_of(s), &grads, nullptr, work);
      // (In a group every rank reaches the sum: a non-finite loss fails there, on all.)
      if (!std::isfinite(ls) && !parallel)
        return fail(step, std::string("loss is ") + (std::isnan(ls) ? "NaN" : "inf") +
                              " on sequence " + std::to_string(s));
      loss += ls;
    }
    // The mean gradient over the accumulated sequences (summed across the ranks first),
    // clipped to the global norm.
    for (int64_t l = 0; l < L; ++l) {
      const std::vector<float>* src[2] = {&grads[l].prefix_k, &grads[l].prefix_v};
      for (int j = 0; j < 2; ++j) {
        std::vector<double>& d = g[2 * l + j];
        d.resize(src[j]->size());
        for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<double>((*src[j])[i]);
      }
    }
    if (parallel) {
      std::vector<SumSpan> spans = {{&loss, 1}};
      for (auto& d : g) spans.push_back({d.data(), d.size()});
      QCAL_RETURN_IF_ERROR(sum_spans(o.sum, spans));
      if (!std::isfinite(loss)) return fail(step, "the loss summed over the ranks is not finite");
    }
    loss /= static_cast<double>(o.accum);
    double norm2 = 0.0;
    for (auto& d : g)
      for (double& e : d) {
        e /= static_cast<double>(o.accum);
        norm2 += e * e;
      }
    const double norm = std::sqrt(norm2);
    if (!std::isfinite(norm)) return fail(step, "the gradient norm is not finite");
    const double coef = o.max_grad_norm / (norm + 1e-6);
    if (coef < 1.0)
      for (auto& d : g)
        for (double& e : d) e *= coef;
    const double lr = o.lr * (step < warmup ? static_cast<double>(step) / warmup : 1.0);
    adam.step(g, lr);
    for (size_t i = 0; i < master.size(); ++i)
      std::copy(master[i].begin(), master[i].end(), cache[i].begin());
    if (step == 0) rep.loss_first = loss;
    rep.loss_last = loss;
    ++rep.steps;
    if (progress) progress(step, o.steps, loss);
  }
  for (size_t i = 0; i < cache.size(); ++i)
    for (float e : cache[i])
      if (!std::isfinite(e)) return fail(o.steps - 1, "the trained cache is not finite");
  for (int64_t l = 0; l < L; ++l) {
    quantized.intact_k[l] = std::move(cache[2 * l]);
    quantized.intact_v[l] = std::move(cache[2 * l + 1]);
  }
  rep.seconds = steady_seconds() - t0;
  LOG_INFO << "intactkv-cal: " << rep.steps << " steps, loss " << rep.loss_first << " -> "
           << rep.loss_last << " (" << rep.seconds << " s)";
  return rep;
}

Result<std::vector<double>> attention_sink_share(const LlamaModel& m, const TokenSequences& data,
                                                 int64_t max_seqs) {
  const ModelConfig& c = m.config();
  const int64_t T = data.seqlen, H = c.hidden_size, L = c.num_hidden_layers;
  const int64_t S = max_seqs > 0 ? std::min(max_seqs, data.count()) : data.count();
  if (T < 2)
    return invalid_input("attention_sink_share needs seqlen >= 2, got " + std::to_string(T));
  if (S < 1) return invalid_input("attention_sink_share: the data holds no sequence");
  QCAL_ASSIGN_OR_RETURN(Tensor x, m.embed(data, 0, S));  // (S·T, H)
  // Sequences go through block_forward in groups of >= 512 rows (its hook sees a
  // whole call's rows at once).
  const int64_t per = std::min(S, std::max<int64_t>(1, (512 + T - 1) / T));
  std::vector<double> share(static_cast<size_t>(L), 0.0);
  for (int64_t l = 0; l < L; ++l) {
    QCAL_ASSIGN_OR_RETURN(LayerWeights w, m.load_layer(l));
    double mass = 0.0;
    for (int64_t b0 = 0; b0 < S; b0 += per) {
      const int64_t nb = std::min(per, S - b0);
      LinearInputHook hook = [&](const std::string& proj, const float* xn, int64_t, int64_t) {
        if (proj == kProjNames[0]) mass += sink_mass(c, w, xn, nb, T);
      };
      block_forward(c, w, x.ptr() + b0 * T * H, nb, T, hook);
    }
    share[static_cast<size_t>(l)] = mass / static_cast<double>(S * c.num_attention_heads * (T - 1));
  }
  return share;
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

}  // namespace qcal::calib

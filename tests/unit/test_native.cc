// labels: unit
// The native qcal checkpoint and its CPU inference (worker/calib/native.h) on a
// small synthetic model: FP equivalence (no transforms, orthogonal online
// transforms, IntactKV prefix), the quantized path against a scalar fp64
// reference written here, the write → read round trip and corrupt inputs.
// Letters: B sequences, T tokens, P prefix, H hidden, I intermediate, V vocab,
// n_h / n_kv heads, d head dim, Q = n_h·d, K = n_kv·d.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "kernels/ops.h"
#include "kernels/qgemm.h"
#include "tests/unit/test_util.h"
#include "worker/calib/native.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal::calib {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using qcal::testing::TempDir;

// ---------------------------------------------------------------- helpers

ModelConfig tiny_config() { return qcal::testing::small_config(96, 97); }

// max |got − ref| / max |ref|, failing on NaN (returns +inf).
template <typename A, typename Bv>
double rel_err(const std::string& what, const A& got, const Bv& ref) {
  EXPECT_EQ(got.size(), ref.size()) << what;
  if (got.size() != ref.size()) return INFINITY;
  double md = 0, mr = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    if (!std::isfinite(g) || !std::isfinite(r)) return INFINITY;
    md = std::max(md, std::fabs(g - r));
    mr = std::max(mr, std::fabs(r));
  }
  const double e = md / std::max(mr, 1e-30);
  std::printf("  %-46s max|diff| %.3g  max|ref| %.3g  rel %.3g\n", what.c_str(), md, mr, e);
  return e;
}

struct Fixture {
  TempDir tmp{"qcal_native_"};
  std::string dir;
  std::unique_ptr<LlamaModel> model;
  ModelConfig c;
};

Fixture& fixture() {
  static Fixture* f = [] {
    auto* f = new Fixture();
    SynthOptions o;
    o.config = tiny_config();
    o.seed = 11;
    f->dir = f->tmp.sub("fp");
    Status st = synth_model(o, f->dir);
    QCAL_CHECK_MSG(st.is_ok(), st.to_string().c_str());
    auto m = LlamaModel::open(f->dir);
    QCAL_CHECK(m.is_ok());
    f->model = std::move(m).value();
    f->c = f->model->config();
    return f;
  }();
  return *f;
}

std::vector<float> read(const LlamaModel& m, const std::string& name) {
  auto t = m.dir().read_f32(name);
  QCAL_CHECK_MSG(t.is_ok(), t.status().to_string().c_str());
  return t->data;
}

// The FP model as a NativeModel: float weights, every quantizer off, no transforms.
NativeModel from_fp(const LlamaModel& m) {
  NativeModel n;
  n.config = m.config();
  n.recipe = {{"transform", "none"}};
  n.w_bits = 16;
  n.w_group = -1;
  n.embed = read(m, "model.embed_tokens.weight");
  n.final_norm = read(m, "model.norm.weight");
  n.lm_head = read(m, "lm_head.weight");
  for (int64_t l = 0; l < n.config.num_hidden_layers; ++l) {
    auto w = m.load_layer(l);
    QCAL_CHECK(w.is_ok());
    NativeLayer y;
    y.input_norm = w->input_norm.data;
    y.post_norm = w->post_norm.data;
    for (int p = 0; p < kNumProj; ++p) y.fw[p] = w->proj(kProjNames[p]).data;
    y.bias = {w->q_bias.data, w->k_bias.data, w->v_bias.data};
    n.layers.push_back(std::move(y));
  }
  return n;
}

// Row-wise y = x (L ⊗ R) ⇔ Y = Lᵀ X R on (rows, n) in double; L/R empty = identity.
void kron_d(double* x, int64_t rows, int64_t n, const std::vector<float>& L,
            const std::vector<float>& R) {
  if (L.empty() && R.empty()) return;
  const int64_t n1 =
      !L.empty() ? std::llround(std::sqrt(L.size())) : n / std::llround(std::sqrt(R.size()));
  const int64_t n2 = n / n1;
  std::vector<double> t(n), y(n);
  for (int64_t r = 0; r < rows; ++r) {
    double* X = x + r * n;
    for (int64_t i = 0; i < n1; ++i)  // t = Lᵀ X
      for (int64_t j = 0; j < n2; ++j) {
        double a = 0;
        if (L.empty()) {
          a = X[i * n2 + j];
        } else {
          for (int64_t k = 0; k < n1; ++k) a += static_cast<double>(L[k * n1 + i]) * X[k * n2 + j];
        }
        t[i * n2 + j] = a;
      }
    for (int64_t i = 0; i < n1; ++i)  // y = t R
      for (int64_t j = 0; j < n2; ++j) {
        double a = 0;
        if (R.empty()) {
          a = t[i * n2 + j];
        } else {
          for (int64_t k = 0; k < n2; ++k) a += t[i * n2 + k] * static_cast<double>(R[k * n2 + j]);
        }
        y[i * n2 + j] = a;
      }
    std::copy(y.begin(), y.end(), X);
  }
}

// Rows of W (out, in) ← w (L ⊗ R), computed in double.
void kron_rows(std::vector<float>& W, int64_t in, const std::vector<float>& L,
               const std::vector<float>& R) {
  std::vector<double> d(W.begin(), W.end());
  kron_d(d.data(), static_cast<int64_t>(W.size()) / in, in, L, R);
  for (size_t i = 0; i < W.size(); ++i) W[i] = static_cast<float>(d[i]);
}

// A random n×n orthogonal matrix (Gram-Schmidt of a Gaussian), float.
std::vector<float> rand_orth(Rng& rng, int64_t n) {
  std::vector<double> a(n * n);
  for (double& v : a) v = rng.normal();
  for (int64_t i = 0; i < n; ++i) {
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t j = 0; j < i; ++j) {
        double dot = 0;
        for (int64_t k = 0; k < n; ++k) dot += a[i * n + k] * a[j * n + k];
        for (int64_t k = 0; k < n; ++k) a[i * n + k] -= dot * a[j * n + k];
      }
    double nr = 0;
    for (int64_t k = 0; k < n; ++k) nr += a[i * n + k] * a[i * n + k];
    nr = std::sqrt(nr);
    for (int64_t k = 0; k < n; ++k) a[i * n + k] /= nr;
  }
  return {a.begin(), a.end()};
}

// Random orthogonal online transforms, with the float weights pre-transformed so
// the function is unchanged: input sides W ← W (L ⊗ R) (= W (L ⊗ R)⁻ᵀ for
// orthogonal factors), o_proj W_o ← W_o (P_o ⊗ I); P_k⁻ᵀ = P_k.
void add_orthogonal_transforms(NativeModel& n, uint64_t seed) {
  Rng rng(seed);
  const ModelConfig& c = n.config;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  for (NativeLayer& y : n.layers) {
    BlockTransformsT<float>& t = y.online;
    t.a1 = rand_orth(rng, 8);
    t.a2 = rand_orth(rng, 8);
    t.u1 = rand_orth(rng, 4);
    t.u2 = rand_orth(rng, 16);
    t.d1 = rand_orth(rng, 8);
    t.d2 = rand_orth(rng, 12);
    t.po = rand_orth(rng, c.num_attention_heads);
    t.pk = rand_orth(rng, c.head_dim);
    t.pk_it = t.pk;
    for (int p : {kQ, kK, kV}) kron_rows(y.fw[p], H, t.a1, t.a2);
    for (int p : {kGate, kUp}) kron_rows(y.fw[p], H, t.u1, t.u2);
    kron_rows(y.fw[kDown], I, t.d1, t.d2);
    kron_rows(y.fw[kO], c.q_dim(), t.po, {});
  }
}

// RTN of every float weight: symmetric, per (row, group), scale = max(absmax/maxq, 1e-5).
void quantize_weights(NativeModel& n, int bits, int64_t group) {
  const int maxq = (1 << (bits - 1)) - 1;
  n.w_bits = bits;
  n.w_group = group;
  for (NativeLayer& y : n.layers)
    for (int p = 0; p < kNumProj; ++p) {
      const std::vector<int64_t> sh = proj_shape(n.config, kProjNames[p]);
      const int64_t out = sh[0], in = sh[1], gs = group > 0 ? group : in, G = in / gs;
      std::vector<int8_t> codes(out * in);
      std::vector<float> scales(out * G);
      for (int64_t o = 0; o < out; ++o)
        for (int64_t g = 0; g < G; ++g) {
          const float* w = y.fw[p].data() + o * in + g * gs;
          float amax = 0;
          for (int64_t i = 0; i < gs; ++i) amax = std::max(amax, std::fabs(w[i]));
          const float s = std::max(amax / maxq, 1e-5f);
          scales[o * G + g] = s;
          for (int64_t i = 0; i < gs; ++i)
            codes[o * in + g * gs + i] = static_cast<int8_t>(std::clamp<float>(
                std::nearbyint(w[i] / s), -maxq - 1.0f, static_cast<float>(maxq)));
        }
      y.qw[p] = pack_weight(codes.data(), scales.data(), out, in, bits, group);
      y.fw[p].clear();
    }
}

void set_quantizers(NativeModel& n, int a_bits, float a_clip, int kv_bits, float kv_clip) {
  for (NativeLayer& y : n.layers) {
    for (auto& a : y.act) a = NativeActQuant{a_bits, true, -1, a_clip};
    y.k = y.v = NativeActQuant{kv_bits, false, n.config.head_dim, kv_clip};
  }
}

void add_biases(NativeModel& n, uint64_t seed) {
  Rng rng(seed);
  for (NativeLayer& y : n.layers)
    for (int p = 0; p < 3; ++p) {
      y.bias[p].resize(p == 0 ? n.config.q_dim() : n.config.kv_dim());
      for (float& b : y.bias[p]) b = static_cast<float>(0.2 * rng.normal());
    }
}

// ---------------------------------------------------------------- fp64 reference

void fq_ref(const NativeActQuant& a, double* x, int64_t rows, int64_t cols) {
  if (a.bits >= 16) return;
  const int64_t gs = a.group > 0 ? a.group : cols;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g0 = 0; g0 < cols; g0 += gs) {
      double* v = x + r * cols + g0;
      const int64_t n = std::min(gs, cols - g0);
      double mx = 0, mn = 0;
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, v[i]), mn = std::min(mn, v[i]);
      if (a.sym) {
        const double maxq = (1 << (a.bits - 1)) - 1;
        double s = a.clip * std::max(mx, -mn) / maxq;
        if (s == 0) s = 1;
        for (int64_t i = 0; i < n; ++i)
          v[i] = s * std::clamp(std::nearbyint(v[i] / s), -maxq - 1, maxq);
      } else {
        const double maxq = (1 << a.bits) - 1;
        const double hi = mx * a.clip, lo = mn * a.clip;
        double s = (hi - lo) / maxq;
        if (s == 0) s = 1;
        const double z = std::nearbyint(-lo / s);
        for (int64_t i = 0; i < n; ++i)
          v[i] = s * (std::clamp(std::nearbyint(v[i] / s) + z, 0.0, maxq) - z);
      }
    }
}

std::vector<double> ref_weight(const NativeModel& m, const NativeLayer& y, int p) {
  if (m.w_bits >= 16) return {y.fw[p].begin(), y.fw[p].end()};
  const PackedWeight& w = y.qw[p];
  const int64_t gs = m.w_group > 0 ? m.w_group : w.in, G = (w.in + gs - 1) / gs;
  std::vector<double> W(w.out * w.in);
  std::vector<int8_t> codes(w.in);
  for (int64_t o = 0; o < w.out; ++o) {
    unpack_row(w, o, codes.data());
    for (int64_t i = 0; i < w.in; ++i)
      W[o * w.in + i] = static_cast<double>(w.scales[o * G + i / gs]) * codes[i];
  }
  return W;
}

void linear_ref(double* out, const double* x, const std::vector<double>& W,
                const std::vector<float>& b, int64_t rows, int64_t in, int64_t nout) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < nout; ++o) {
      double a = b.empty() ? 0.0 : b[o];
      for (int64_t i = 0; i < in; ++i) a += x[r * in + i] * W[o * in + i];
      out[r * nout + o] = a;
    }
}

// Causal attention of T queries at positions P.. over S = P + T keys (double).
void attention_prefix_ref(double* out, const double* q, const double* k, const double* v, int64_t P,
                          int64_t T, int64_t n_h, int64_t n_kv, int64_t d) {
  const int64_t Q = n_h * d, K = n_kv * d, rep = n_h / n_kv;
  for (int64_t h = 0; h < n_h; ++h) {
    const int64_t g = h / rep;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t len = P + t + 1;
      std::vector<double> s(len);
      double mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        double a = 0;
        for (int64_t i = 0; i < d; ++i) a += q[t * Q + h * d + i] * k[j * K + g * d + i];
        s[j] = a / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (double& e : s) sum += (e = std::exp(e - mx));
      for (int64_t i = 0; i < d; ++i) {
        double a = 0;
        for (int64_t j = 0; j < len; ++j) a += s[j] * v[j * K + g * d + i];
        out[t * Q + h * d + i] = a / sum;
      }
    }
  }
}

// The whole native model for one sequence in fp64: dequantized weights,
// fake-quantized activations (per token) and K/V (per token and head), the
// IntactKV prefix prepended unquantized. Logits (T, V).
std::vector<double> native_ref(const NativeModel& m, const int32_t* tok, int64_t T) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  const int64_t n_h = c.num_attention_heads, n_kv = c.num_key_value_heads, d = c.head_dim;
  const int64_t V = c.vocab_size, P = static_cast<int64_t>(m.intact_prefix.size());
  std::vector<double> x(T * H);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i) x[t * H + i] = m.embed[tok[t] * H + i];
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const NativeLayer& y = m.layers[l];
    const BlockTransformsT<float>& tr = y.online;
    std::vector<double> h(T * H), q(T * Q), kk((P + T) * K), vv((P + T) * K), att(T * Q), o(T * H),
        g(T * I), u(T * I), xq;
    const std::vector<double> g1(y.input_norm.begin(), y.input_norm.end()),
        g2(y.post_norm.begin(), y.post_norm.end());
    auto lin = [&](int p, const std::vector<double>& in, int64_t nin, double* out, int64_t nout,
                   const std::vector<float>& b) {
      xq = in;
      fq_ref(y.act[p], xq.data(), T, nin);
      linear_ref(out, xq.data(), ref_weight(m, y, p), b, T, nin, nout);
    };
    rmsnorm_forward_ref(h.data(), x.data(), g1.data(), T, H, c.rms_norm_eps);
    kron_d(h.data(), T, H, tr.a1, tr.a2);
    lin(kQ, h, H, q.data(), Q, y.bias[0]);
    lin(kK, h, H, kk.data() + P * K, K, y.bias[1]);
    lin(kV, h, H, vv.data() + P * K, K, y.bias[2]);
    rope_forward_ref(q.data(), T, n_h, d, P, c.rope_theta);
    rope_forward_ref(kk.data() + P * K, T, n_kv, d, P, c.rope_theta);
    kron_d(q.data(), T * n_h, d, {}, tr.pk_it);
    kron_d(kk.data() + P * K, T * n_kv, d, {}, tr.pk);
    fq_ref(y.k, kk.data() + P * K, T, K);
    fq_ref(y.v, vv.data() + P * K, T, K);
    for (int64_t i = 0; i < P * K; ++i) kk[i] = m.intact_k[l][i], vv[i] = m.intact_v[l][i];
    attention_prefix_ref(att.data(), q.data(), kk.data(), vv.data(), P, T, n_h, n_kv, d);
    kron_d(att.data(), T, Q, tr.po, {});
    lin(kO, att, Q, o.data(), H, {});
    for (int64_t i = 0; i < T * H; ++i) x[i] += o[i];
    rmsnorm_forward_ref(h.data(), x.data(), g2.data(), T, H, c.rms_norm_eps);
    kron_d(h.data(), T, H, tr.u1, tr.u2);
    lin(kGate, h, H, g.data(), I, {});
    lin(kUp, h, H, u.data(), I, {});
    swiglu_forward_ref(g.data(), g.data(), u.data(), T * I);
    kron_d(g.data(), T, I, tr.d1, tr.d2);
    lin(kDown, g, I, o.data(), H, {});
    for (int64_t i = 0; i < T * H; ++i) x[i] += o[i];
  }
  std::vector<double> xn(T * H), out(T * V);
  const std::vector<double> gn(m.final_norm.begin(), m.final_norm.end());
  rmsnorm_forward_ref(xn.data(), x.data(), gn.data(), T, H, c.rms_norm_eps);
  const std::vector<double> head(m.lm_head.begin(), m.lm_head.end());
  linear_ref(out.data(), xn.data(), head, {}, T, H, V);
  return out;
}

// FP logits of B sequences of T tokens through worker/engine's model.
std::vector<float> fp_logits(const std::vector<int32_t>& tokens, int64_t B, int64_t T) {
  TokenSequences s;
  s.seqlen = T;
  s.tokens = tokens;
  auto r = model_logits(*fixture().model, s, 0, B);
  QCAL_CHECK(r.is_ok());
  return r->data;
}

// IntactKV from the FP model: runs the prefix through worker/engine's blocks,
// captures each layer's k/v_proj input, and forms post-RoPE K (× P_k per head
// when the native model has it) and V; plus the prefix's FP logits.
void add_intactkv(NativeModel& n, const std::vector<int32_t>& prefix) {
  const LlamaModel& m = *fixture().model;
  const ModelConfig& c = m.config();
  const int64_t P = static_cast<int64_t>(prefix.size()), H = c.hidden_size, K = c.kv_dim();
  TokenSequences s;
  s.seqlen = P;
  s.tokens = prefix;
  Tensor x = m.embed(s, 0, 1).value();
  n.intact_prefix = prefix;
  n.intact_k.assign(c.num_hidden_layers, {});
  n.intact_v.assign(c.num_hidden_layers, {});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights w = m.load_layer(l).value();
    std::vector<float>& k = n.intact_k[l];
    std::vector<float>& v = n.intact_v[l];
    k.resize(P * K);
    v.resize(P * K);
    block_forward(c, w, x.ptr(), 1, P,
                  [&](const std::string& proj, const float* in, int64_t rows, int64_t cols) {
                    if (proj != "self_attn.k_proj") return;
                    ASSERT_EQ(rows, P);
                    ASSERT_EQ(cols, H);
                    for (int64_t t = 0; t < P; ++t)
                      for (int64_t o = 0; o < K; ++o) {
                        double a = 0, b = 0;
                        for (int64_t i = 0; i < H; ++i) {
                          a += static_cast<double>(in[t * H + i]) * w.k.data[o * H + i];
                          b += static_cast<double>(in[t * H + i]) * w.v.data[o * H + i];
                        }
                        k[t * K + o] = static_cast<float>(a);
                        v[t * K + o] = static_cast<float>(b);
                      }
                  });
    rope_forward(k.data(), P, c.num_key_value_heads, c.head_dim, 0, c.rope_theta);
    const std::vector<float>& pk = n.layers[l].online.pk;
    if (!pk.empty()) {
      std::vector<double> kd(k.begin(), k.end());
      kron_d(kd.data(), P * c.num_key_value_heads, c.head_dim, {}, pk);
      for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>(kd[i]);
    }
  }
  n.intact_logits = m.logits(x).value().data;
}

std::vector<int32_t> tokens_for(int64_t n, uint64_t seed) {
  return synth_tokens(n, tiny_config().vocab_size, seed);
}

// ---------------------------------------------------------------- tests

TEST(NativeAttention, PrefixZeroMatchesAttentionForwardAndPrefixMatchesRef) {
  Rng rng(3);
  const int64_t n_h = 4, n_kv = 2, d = 16, T = 9, Q = n_h * d, K = n_kv * d;
  for (int64_t P : {0, 5}) {
    std::vector<float> q(T * Q), k((P + T) * K), v((P + T) * K), out(T * Q);
    for (float& e : q) e = static_cast<float>(2 * rng.normal());
    for (float& e : k) e = static_cast<float>(2 * rng.normal());
    for (float& e : v) e = static_cast<float>(rng.normal());
    prefix_attention(out.data(), q.data(), k.data(), v.data(), P, T, n_h, n_kv, d);
    if (P == 0) {
      std::vector<float> want(T * Q);
      attention_forward(want.data(), q.data(), k.data(), v.data(), T, n_h, n_kv, d);
      EXPECT_LT(rel_err("prefix_attention P=0 vs attention_forward", out, want), 1e-6);
    }
    std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end()),
        want(T * Q);
    attention_prefix_ref(want.data(), qd.data(), kd.data(), vd.data(), P, T, n_h, n_kv, d);
    EXPECT_LT(rel_err("prefix_attention P=" + std::to_string(P) + " vs fp64", out, want), 1e-6);
  }
}

TEST(Native, AllOffEqualsFpModel) {
  const int64_t B = 3, T = 16;
  const std::vector<int32_t> tok = tokens_for(B * T, 5);
  const NativeModel n = from_fp(*fixture().model);
  EXPECT_LT(rel_err("native all-16 vs model_logits", native_logits(n, tok.data(), B, T),
                    fp_logits(tok, B, T)),
            1e-5);
}

TEST(Native, OrthogonalOnlineTransformsPreserveTheFunction) {
  const int64_t B = 2, T = 16;
  const std::vector<int32_t> tok = tokens_for(B * T, 6);
  NativeModel n = from_fp(*fixture().model);
  add_orthogonal_transforms(n, 21);
  EXPECT_LT(rel_err("native transformed vs model_logits", native_logits(n, tok.data(), B, T),
                    fp_logits(tok, B, T)),
            1e-4);
}

struct QCase {
  const char* name;
  int w_bits;
  int64_t w_group;
  int a_bits, kv_bits;
  bool transforms, bias;
  int64_t prefix;
  std::function<void(NativeModel&)> tweak = nullptr;
};

TEST(Native, QuantizedPathMatchesScalarReference) {
  const int64_t B = 2, T = 12;
  const std::vector<int32_t> tok = tokens_for(B * T, 7);
  const QCase cases[] = {
      {"w4 per-channel a4 kv4", 4, -1, 4, 4, false, false, 0},
      {"w4 g32 a4 kv4 +transforms +bias", 4, 32, 4, 4, true, true, 0},
      {"w4 g32 a4 kv4 +transforms +IntactKV(2)", 4, 32, 4, 4, true, false, 2},
      {"w8 a8 kv8", 8, -1, 8, 8, false, false, 0},
      {"w4 a16 kv16 (float path)", 4, -1, 16, 16, true, false, 0},
      {"w16 a4 kv4 (fake-quant path)", 16, -1, 4, 4, true, false, 0},
      {"w3 g32, a6 asym / a8 g16, kv3 sym g8", 3, 32, 6, 3, true, false, 0,
       [](NativeModel& n) {
         for (NativeLayer& y : n.layers) {
           for (int p : {kQ, kK, kV, kGate}) y.act[p].sym = false;
           y.act[kO] = NativeActQuant{8, true, 16, 0.8f};
           y.act[kDown].group = 32;
           y.k = NativeActQuant{3, true, 8, 1.0f};
         }
       }},
  };
  for (const QCase& q : cases) {
    NativeModel n = from_fp(*fixture().model);
    if (q.transforms) add_orthogonal_transforms(n, 31);
    if (q.bias) add_biases(n, 32);
    if (q.prefix > 0) add_intactkv(n, tokens_for(q.prefix, 33));
    if (q.w_bits < 16) quantize_weights(n, q.w_bits, q.w_group);
    set_quantizers(n, q.a_bits, 0.9f, q.kv_bits, 0.95f);
    if (q.tweak) q.tweak(n);
    const std::vector<float> got = native_logits(n, tok.data(), B, T);
    std::vector<double> want;
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<double> r = native_ref(n, tok.data() + b * T, T);
      want.insert(want.end(), r.begin(), r.end());
    }
    EXPECT_LT(rel_err(std::string("quantized ") + q.name, got, want), 1e-4) << q.name;
    // And the quantization is really on: far from the FP logits.
    if (q.a_bits < 16 && q.prefix == 0 && !q.bias) {
      const double e = rel_err(std::string("  (vs FP) ") + q.name, got, fp_logits(tok, B, T));
      EXPECT_GT(e, q.a_bits == 8 ? 1e-4 : 1e-3) << q.name;
    }
  }
}

TEST(Native, IntactKvPrefixCacheEqualsFullSequence) {
  const int64_t T = 16;
  const std::vector<int32_t> tok = tokens_for(T, 8);
  const std::vector<float> full = fp_logits(tok, 1, T);
  const int64_t V = tiny_config().vocab_size;
  for (int64_t P : {1, 3}) {
    for (bool transforms : {false, true}) {
      NativeModel n = from_fp(*fixture().model);
      if (transforms) add_orthogonal_transforms(n, 41);
      add_intactkv(n, std::vector<int32_t>(tok.begin(), tok.begin() + P));
      const std::vector<float> got = native_logits(n, tok.data() + P, 1, T - P);
      const std::vector<float> want(full.begin() + P * V, full.end());
      EXPECT_LT(rel_err("IntactKV P=" + std::to_string(P) + (transforms ? " +transforms" : ""), got,
                        want),
                1e-4);
      EXPECT_LT(rel_err("  stored prefix logits", n.intact_logits,
                        std::vector<float>(full.begin(), full.begin() + P * V)),
                1e-5);
    }
  }
}

// ---- round trip and corrupt inputs

NativeModel rich_model() {
  NativeModel n = from_fp(*fixture().model);
  add_orthogonal_transforms(n, 51);
  n.layers[1].online.u1.clear();  // a lone factor
  n.layers[1].online.po.clear();
  add_biases(n, 52);
  add_intactkv(n, tokens_for(2, 53));
  quantize_weights(n, 4, 32);
  set_quantizers(n, 4, 0.9f, 4, 0.95f);
  n.layers[0].act[kDown].clip = 0.87310123f;  // a learned (LAC) value
  n.layers[1].act[kO] = NativeActQuant{8, true, 16, 1.0f};
  n.layers[1].v = NativeActQuant{16, false, -1, 1.0f};
  n.recipe = {{"transform", "flatquant"}, {"w_bits", 4}, {"a_bits", 4}, {"lr", 5e-3}};
  return n;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
bool same_act(const NativeActQuant& a, const NativeActQuant& b) {
  return a.bits == b.bits && a.sym == b.sym && a.group == b.group &&
         std::memcmp(&a.clip, &b.clip, sizeof(float)) == 0;
}

void expect_same(const NativeModel& a, const NativeModel& b) {
  EXPECT_EQ(a.config.to_json(), b.config.to_json());
  EXPECT_EQ(a.recipe, b.recipe);
  EXPECT_EQ(a.w_bits, b.w_bits);
  EXPECT_EQ(a.w_group, b.w_group);
  EXPECT_TRUE(same_bits(a.embed, b.embed));
  EXPECT_TRUE(same_bits(a.final_norm, b.final_norm));
  EXPECT_TRUE(same_bits(a.lm_head, b.lm_head));
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const NativeLayer &x = a.layers[l], &y = b.layers[l];
    EXPECT_TRUE(same_bits(x.input_norm, y.input_norm)) << l;
    EXPECT_TRUE(same_bits(x.post_norm, y.post_norm)) << l;
    for (int p = 0; p < kNumProj; ++p) {
      EXPECT_EQ(x.qw[p].bits, y.qw[p].bits);
      EXPECT_EQ(x.qw[p].out, y.qw[p].out);
      EXPECT_EQ(x.qw[p].in, y.qw[p].in);
      EXPECT_EQ(x.qw[p].group > 0 ? x.qw[p].group : -1, y.qw[p].group > 0 ? y.qw[p].group : -1);
      EXPECT_TRUE(same_bits(x.qw[p].data, y.qw[p].data)) << l << " " << p;
      EXPECT_TRUE(same_bits(x.qw[p].scales, y.qw[p].scales)) << l << " " << p;
      EXPECT_TRUE(same_bits(x.fw[p], y.fw[p])) << l << " " << p;
      EXPECT_TRUE(same_act(x.act[p], y.act[p])) << l << " " << p;
    }
    for (int p = 0; p < 3; ++p) EXPECT_TRUE(same_bits(x.bias[p], y.bias[p]));
    EXPECT_TRUE(same_act(x.k, y.k));
    EXPECT_TRUE(same_act(x.v, y.v));
    const BlockTransformsT<float>&s = x.online, &t = y.online;
    for (auto m :
         {&BlockTransformsT<float>::a1, &BlockTransformsT<float>::a2, &BlockTransformsT<float>::u1,
          &BlockTransformsT<float>::u2, &BlockTransformsT<float>::d1, &BlockTransformsT<float>::d2,
          &BlockTransformsT<float>::po, &BlockTransformsT<float>::pk,
          &BlockTransformsT<float>::pk_it})
      EXPECT_TRUE(same_bits(s.*m, t.*m)) << l;
  }
  EXPECT_EQ(a.intact_prefix, b.intact_prefix);
  ASSERT_EQ(a.intact_k.size(), b.intact_k.size());
  for (size_t l = 0; l < a.intact_k.size(); ++l) {
    EXPECT_TRUE(same_bits(a.intact_k[l], b.intact_k[l]));
    EXPECT_TRUE(same_bits(a.intact_v[l], b.intact_v[l]));
  }
  EXPECT_TRUE(same_bits(a.intact_logits, b.intact_logits));
}

std::vector<std::string> leftovers(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.find(".partial.") != std::string::npos || n.find(".old.") != std::string::npos ||
        n.find(".tmp") != std::string::npos)
      out.push_back(n);
  }
  return out;
}

TEST(NativeFormat, RoundTripIsBitExact) {
  TempDir tmp("qcal_native_rt_");
  const NativeModel n = rich_model();
  const std::string dir = tmp.sub("native");
  ASSERT_TRUE(write_native(n, dir, false).is_ok());
  EXPECT_TRUE(is_native_dir(dir));
  EXPECT_FALSE(is_native_dir(fixture().dir));
  EXPECT_TRUE(leftovers(tmp.path()).empty());
  auto r = read_native(dir);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  expect_same(n, *r);
  const std::vector<int32_t> tok = tokens_for(2 * 10, 9);
  const std::vector<float> a = native_logits(n, tok.data(), 2, 10);
  const std::vector<float> b = native_logits(*r, tok.data(), 2, 10);
  EXPECT_TRUE(same_bits(a, b));
  for (float v : a) ASSERT_TRUE(std::isfinite(v));

  // Existing output: refused without overwrite, replaced with it; nothing left behind.
  Status st = write_native(n, dir, false);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("exists"), std::string::npos) << st.message();
  EXPECT_TRUE(write_native(n, dir, true).is_ok());
  EXPECT_TRUE(leftovers(tmp.path()).empty());

  // The float-weight model (w_bits 16, no IntactKV) round-trips too.
  NativeModel f = from_fp(*fixture().model);
  add_orthogonal_transforms(f, 54);
  ASSERT_TRUE(write_native(f, tmp.sub("fp"), false).is_ok());
  auto rf = read_native(tmp.sub("fp"));
  ASSERT_TRUE(rf.is_ok()) << rf.status().to_string();
  expect_same(f, *rf);

  // An invalid model is refused before anything is written.
  NativeModel bad = n;
  bad.layers[0].act[kQ].bits = 5;
  st = write_native(bad, tmp.sub("bad"), false);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("layers[0].act.q_proj.bits"), std::string::npos) << st.message();
  EXPECT_FALSE(path_exists(tmp.sub("bad")));
  EXPECT_TRUE(leftovers(tmp.path()).empty());
}

// Rewrites model.safetensors: `edit` may rename / reshape / change bytes of a
// tensor, or return false to drop it; `extra` tensors are appended.
void rewrite_tensors(
    const std::string& path,
    const std::function<bool(std::string&, std::vector<int64_t>&, std::string&)>& edit) {
  struct T {
    std::string name;
    DType dt;
    std::vector<int64_t> shape;
    std::string bytes;
  };
  std::vector<T> ts;
  {
    auto f = SafetensorsFile::open(path);
    QCAL_CHECK(f.is_ok());
    for (const TensorInfo& t : (*f)->header().tensors) {
      T x{t.name, t.dtype, t.shape, std::string((*f)->raw(t))};
      if (edit(x.name, x.shape, x.bytes)) ts.push_back(std::move(x));
    }
  }
  SafetensorsWriter w(path);
  for (const T& t : ts) w.add(t.name, t.dt, t.shape);
  QCAL_CHECK(w.begin().is_ok());
  for (const T& t : ts) QCAL_CHECK(w.write(t.bytes).is_ok());
  QCAL_CHECK(w.finish().is_ok());
}

void edit_json(const std::string& path, const std::function<void(json&)>& edit) {
  json j = json::parse(read_file(path).value());
  edit(j);
  QCAL_CHECK(write_file_atomic(path, j.dump()).is_ok());
}

TEST(NativeFormat, CorruptInputsGiveClearErrors) {
  TempDir tmp("qcal_native_bad_");
  const std::string good = tmp.sub("good");
  ASSERT_TRUE(write_native(rich_model(), good, false).is_ok());
  struct Case {
    const char* name;
    std::function<void(const std::string& dir)> corrupt;
    std::vector<std::string> expect;  // substrings of the message
  };
  const std::string st = "/model.safetensors", qj = "/qcal_quant.json";
  const std::vector<Case> cases = {
      {"truncated",
       [&](const std::string& d) { fs::resize_file(d + st, fs::file_size(d + st) / 2); },
       {"model.safetensors"}},
      {"newer version",
       [&](const std::string& d) { edit_json(d + qj, [](json& j) { j["version"] = 2; }); },
       {"version", "newer qcal"}},
      {"wrong format",
       [&](const std::string& d) { edit_json(d + qj, [](json& j) { j["format"] = "gptq"; }); },
       {"not a qcal-native checkpoint"}},
      {"bad shape",
       [&](const std::string& d) {
         rewrite_tensors(d + st, [](std::string& n, std::vector<int64_t>& s, std::string& b) {
           if (n == "model.layers.1.input_layernorm.weight") s = {63}, b.resize(63 * 4);
           return true;
         });
       },
       {"model.layers.1.input_layernorm.weight", "shape [63]"}},
      {"missing tensor",
       [&](const std::string& d) {
         rewrite_tensors(d + st, [](std::string& n, std::vector<int64_t>&, std::string&) {
           return n != "model.layers.0.self_attn.k_proj.scales";
         });
       },
       {"missing tensor model.layers.0.self_attn.k_proj.scales"}},
      {"unexpected tensor",
       [&](const std::string& d) {
         // d1 stays in the file but is no longer listed as an online transform.
         edit_json(d + qj, [](json& j) {
           json& on = j["layers"][1]["online"];
           on.erase(std::find(on.begin(), on.end(), "d1"));
         });
       },
       {"unexpected tensor model.layers.1.online.d1"}},
      {"bits 5",
       [&](const std::string& d) {
         edit_json(d + qj, [](json& j) { j["layers"][1]["act"]["down_proj"]["bits"] = 5; });
       },
       {"layers[1].act.down_proj.bits", "5 is not a supported bit width"}},
      {"w_bits 5",
       [&](const std::string& d) { edit_json(d + qj, [](json& j) { j["w_bits"] = 5; }); },
       {"w_bits", "5 is not a supported bit width"}},
      {"codes outside 3-bit range",
       [&](const std::string& d) { edit_json(d + qj, [](json& j) { j["w_bits"] = 3; }); },
       {".qweight", "outside the 3-bit range"}},
      {"non-finite scale",
       [&](const std::string& d) {
         rewrite_tensors(d + st, [](std::string& n, std::vector<int64_t>&, std::string& b) {
           if (n == "model.layers.0.mlp.up_proj.scales") {
             const float nan = NAN;
             std::memcpy(b.data() + 8, &nan, 4);
           }
           return true;
         });
       },
       {"model.layers.0.mlp.up_proj.scales", "invalid scale"}},
      {"unknown key",
       [&](const std::string& d) {
         edit_json(d + qj, [](json& j) { j["layers"][0]["k"]["zp"] = 1; });
       },
       {"layers[0].k", "unknown key 'zp'"}},
      {"clip out of range",
       [&](const std::string& d) {
         edit_json(d + qj, [](json& j) { j["layers"][0]["act"]["q_proj"]["clip"] = 1.5; });
       },
       {"layers[0].act.q_proj.clip"}},
      {"prefix id outside vocab",
       [&](const std::string& d) {
         edit_json(d + qj, [](json& j) { j["intactkv"]["prefix"][0] = 97; });
       },
       {"intactkv.prefix[0]", "outside [0, 97)"}},
      {"IntactKV cache with the wrong length",
       [&](const std::string& d) {
         edit_json(d + qj, [](json& j) { j["intactkv"]["prefix"].push_back(1); });
       },
       {"model.intactkv.0.k", "shape [2, 32]", "expected [3, 32]"}},
      {"transform not factoring H",
       [&](const std::string& d) {
         rewrite_tensors(d + st, [](std::string& n, std::vector<int64_t>& s, std::string& b) {
           if (n == "model.layers.0.online.a2") s = {7, 7}, b.resize(49 * 4);
           return true;
         });
       },
       {"model.layers.0.online.a1", "model.layers.0.online.a2", "do not factor"}},
  };
  for (const Case& c : cases) {
    const std::string d = tmp.sub(std::string("case_") + std::to_string(&c - cases.data()));
    fs::copy(good, d, fs::copy_options::recursive);
    c.corrupt(d);
    auto r = read_native(d);
    ASSERT_FALSE(r.is_ok()) << c.name;
    std::printf("  %-36s -> %s\n", c.name, r.status().to_string().c_str());
    if (std::string(c.name) != "truncated") {
      EXPECT_EQ(r.status().code(), Code::kInvalidInput) << c.name;
    }
    for (const std::string& e : c.expect)
      EXPECT_NE(r.status().message().find(e), std::string::npos)
          << c.name << ": '" << e << "' not in: " << r.status().message();
  }
  EXPECT_TRUE(read_native(good).is_ok());
  EXPECT_FALSE(read_native(tmp.sub("nothing")).is_ok());
}

}  // namespace
}  // namespace qcal::calib

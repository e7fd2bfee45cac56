// labels: unit
// IntactKV (worker/calib/intactkv.h) on a small synthetic model with random
// orthogonal online transforms: the FP prefix cache reproduces the FP model,
// W4A4KV4 KL with and without it (plain model and a model with a forced
// attention sink on BOS), the evaluation protocol's errors, the checkpoint round
// trip, the attention-sink diagnostic against attention_fwd's probabilities, and
// "+Cal" (§6.4): the QBlock chain against native_logits, the objective's
// gradient against float64 finite differences, calibration lowering the
// objective and the held-out KL, and its errors.
// Letters: S sequences, T tokens, P prefix, H hidden, I intermediate, V vocab,
// n_h / n_kv heads, d head dim, Q = n_h·d, K = n_kv·d.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/model_dir.h"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/grad.h"
#include "kernels/ops.h"
#include "kernels/qgemm.h"
#include "tests/unit/test_util.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/native.h"
#include "worker/calib/param.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal::calib {
namespace {

using qcal::testing::TempDir;

constexpr int32_t kBos = 1;
constexpr int64_t kSeqs = 12, kT = 24;

ModelConfig tiny_config() { return qcal::testing::small_config(96, 97); }

// A forced attention sink on BOS (id 1): BOS's embedding is A·e_j (a massive
// activation on channel j that no block writes to: rows j of o_proj / down_proj
// are zeroed, and no other token has channel j); in every head the lowest-frequency
// RoPE dim r = d/2 − 1 of K reads only channel j (κ), and of Q only the direction
// m̂ shared by all ordinary tokens' embeddings (β), so every query scores key 0
// about 11·β·κ above the others.
void force_sink(FpModel& m) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, d = c.head_dim, r = d / 2 - 1, j = 0;
  const float A = 100.0f, beta = 0.7f, kappa = 0.7f;
  std::vector<double> mean(H, 0.0);
  for (int64_t t = 0; t < V; ++t) {
    m.embed[t * H + j] = 0.0f;
    if (t == kBos) continue;
    for (int64_t i = 0; i < H; ++i) mean[i] += m.embed[t * H + i];
  }
  double nr = 0;
  for (double v : mean) nr += v * v;
  for (double& v : mean) v /= std::sqrt(nr);
  for (int64_t i = 0; i < H; ++i) m.embed[kBos * H + i] = i == j ? A : 0.0f;
  for (BlockWeightsT<float>& w : m.layers) {
    for (int p : {kO, kDown}) {
      const int64_t in = static_cast<int64_t>(w.w[p].size()) / H;
      std::fill_n(w.w[p].begin() + j * in, in, 0.0f);
    }
    for (int64_t h = 0; h < c.num_attention_heads; ++h)
      for (int64_t i = 0; i < H; ++i)
        w.w[kQ][(h * d + r) * H + i] = static_cast<float>(beta * mean[i]);
    for (int64_t g = 0; g < c.num_key_value_heads; ++g)
      for (int64_t i = 0; i < H; ++i) w.w[kK][(g * d + r) * H + i] = i == j ? kappa : 0.0f;
  }
}

// Rows of W (rows, n1·n2) ← W (L ⊗ R) in double; L or R empty = identity.
void kron_rows(std::vector<float>& W, int64_t n1, int64_t n2, const std::vector<float>& L,
               const std::vector<float>& R) {
  const int64_t n = n1 * n2, rows = static_cast<int64_t>(W.size()) / n;
  std::vector<double> x(W.begin(), W.end()), y(W.size()), work(W.size());
  const std::vector<double> Ld(L.begin(), L.end()), Rd(R.begin(), R.end());
  kron_fwd<double>(y.data(), x.data(), Ld.empty() ? nullptr : Ld.data(),
                   Rd.empty() ? nullptr : Rd.data(), rows, n1, n2, work.data());
  for (size_t i = 0; i < W.size(); ++i) W[i] = static_cast<float>(y[i]);
}

std::vector<float> orth(Rng& rng, int64_t n) {
  const std::vector<double> q = random_orthogonal(n, rng);
  return {q.begin(), q.end()};
}

// The FP model as a NativeModel with random orthogonal online transforms and the
// matching inverse folded into the float weights (the function is unchanged):
// input sides W ← W (L ⊗ R) (= W (L ⊗ R)⁻ᵀ), o_proj W ← W (P_o ⊗ I_d), P_k⁻ᵀ = P_k.
// Every quantizer off.
NativeModel transformed_fp(const FpModel& m, uint64_t seed) {
  const ModelConfig& c = m.config;
  NativeModel n;
  n.config = c;
  n.recipe = {{"transform", "test-orthogonal"}};
  n.w_bits = 16;
  n.w_group = -1;
  n.embed = m.embed;
  n.final_norm = m.final_norm;
  n.lm_head = m.lm_head;
  Rng rng(seed);
  for (const BlockWeightsT<float>& w : m.layers) {
    NativeLayer y;
    y.input_norm = w.input_norm;
    y.post_norm = w.post_norm;
    y.fw = w.w;
    y.bias = w.bias;
    BlockTransformsT<float>& t = y.online;
    t.a1 = orth(rng, 8), t.a2 = orth(rng, 8);
    t.u1 = orth(rng, 4), t.u2 = orth(rng, 16);
    t.d1 = orth(rng, 8), t.d2 = orth(rng, 12);
    t.po = orth(rng, c.num_attention_heads);
    t.pk = orth(rng, c.head_dim);
    t.pk_it = t.pk;
    for (int p : {kQ, kK, kV}) kron_rows(y.fw[p], 8, 8, t.a1, t.a2);
    for (int p : {kGate, kUp}) kron_rows(y.fw[p], 4, 16, t.u1, t.u2);
    kron_rows(y.fw[kDown], 8, 12, t.d1, t.d2);
    kron_rows(y.fw[kO], c.num_attention_heads, c.head_dim, t.po, {});
    n.layers.push_back(std::move(y));
  }
  return n;
}

// W4A4KV4 from the transformed FP model: RTN weights (symmetric, per channel,
// s = absmax/7) packed with pack_weight; activations per token, symmetric, clip
// 0.9; K/V asymmetric per (token, head), clip 0.95 (QuaRot's settings).
NativeModel quantize_w4a4kv4(const NativeModel& f) {
  NativeModel n = f;
  const int bits = 4, maxq = 7;
  n.w_bits = bits;
  n.w_group = -1;
  for (NativeLayer& y : n.layers) {
    for (int p = 0; p < kNumProj; ++p) {
      const std::vector<int64_t> sh = proj_shape(n.config, kProjNames[p]);
      const int64_t out = sh[0], in = sh[1];
      std::vector<int8_t> codes(out * in);
      std::vector<float> scales(out);
      for (int64_t o = 0; o < out; ++o) {
        const float* w = y.fw[p].data() + o * in;
        float amax = 0;
        for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(w[i]));
        const float s = std::max(amax / maxq, 1e-8f);
        scales[o] = s;
        for (int64_t i = 0; i < in; ++i)
          codes[o * in + i] = static_cast<int8_t>(
              std::clamp(std::nearbyint(w[i] / s), -maxq - 1.0f, static_cast<float>(maxq)));
      }
      y.qw[p] = pack_weight(codes.data(), scales.data(), out, in, bits);
      y.fw[p].clear();
      y.act[p] = NativeActQuant{4, true, -1, 0.9f};
    }
    y.k = y.v = NativeActQuant{4, false, n.config.head_dim, 0.95f};
  }
  return n;
}

// S sequences of T tokens starting with `prefix`; the prefix ids appear nowhere else.
TokenSequences make_data(const std::vector<int32_t>& prefix, int64_t S, int64_t T, int64_t V,
                         uint64_t seed) {
  TokenSequences d;
  d.seqlen = T;
  d.tokens = synth_tokens(S * T, V, seed);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t < T; ++t) {
      int32_t& id = d.tokens[s * T + t];
      if (t < static_cast<int64_t>(prefix.size())) {
        id = prefix[t];
      } else {
        while (std::find(prefix.begin(), prefix.end(), id) != prefix.end()) id = (id + 7) % V;
      }
    }
  return d;
}

struct Variant {
  std::string dir;
  FpModel fp;
  std::unique_ptr<LlamaModel> llama;  // the same model through worker/engine
  NativeModel tfp;                    // transformed FP NativeModel
};

struct Fixture {
  TempDir tmp{"qcal_intactkv_"};
  Variant plain, sink;
};

void make_variant(Variant& v, const std::string& dir, const FpModel& fp) {
  v.dir = dir;
  v.fp = fp;
  Status st = write_fp_model(v.fp, dir, false);
  QCAL_CHECK_MSG(st.is_ok(), st.to_string().c_str());
  auto m = LlamaModel::open(dir);
  QCAL_CHECK_MSG(m.is_ok(), m.status().to_string().c_str());
  v.llama = std::move(m).value();
  v.tfp = transformed_fp(v.fp, 77);
}

Fixture& fixture() {
  static Fixture* f = [] {
    auto* f = new Fixture();
    SynthOptions o;
    o.config = tiny_config();
    o.seed = 11;
    const std::string src = f->tmp.sub("synth");
    Status st = synth_model(o, src);
    QCAL_CHECK_MSG(st.is_ok(), st.to_string().c_str());
    auto fp = load_fp_model(src);
    QCAL_CHECK(fp.is_ok());
    make_variant(f->plain, f->tmp.sub("plain"), *fp);
    FpModel s = *fp;
    force_sink(s);
    make_variant(f->sink, f->tmp.sub("sink"), s);
    return f;
  }();
  return *f;
}

// max |got − ref| / max |ref|; +inf on NaN or a size mismatch.
double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  if (got.size() != ref.size()) return INFINITY;
  double md = 0, mr = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) return INFINITY;
    md = std::max(md, std::fabs(static_cast<double>(got[i]) - ref[i]));
    mr = std::max(mr, std::fabs(static_cast<double>(ref[i])));
  }
  return md / std::max(mr, 1e-30);
}

// Mean KL(FP ‖ model) over positions t ≥ from of every sequence (t ≤ T − 2), from
// raw logits (S·T, V) each.
double kl_from(std::vector<float> lp, std::vector<float> lf, int64_t S, int64_t T, int64_t V,
               int64_t from) {
  log_softmax_rows(lp.data(), S * T, V);
  log_softmax_rows(lf.data(), S * T, V);
  double kl = 0;
  int64_t n = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = from; t < T - 1; ++t, ++n)
      for (int64_t v = 0; v < V; ++v) {
        const double f = lf[(s * T + t) * V + v], p = lp[(s * T + t) * V + v];
        kl += std::exp(f) * (f - p);
      }
  return kl / static_cast<double>(n);
}

// Logits (S·T, V) of the native model under the IntactKV protocol: stored prefix
// logits, then tokens[P:] after the prefix cache.
std::vector<float> intact_logits_of(const NativeModel& m, const TokenSequences& d) {
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size()), T = d.seqlen,
                V = m.config.vocab_size, S = d.count();
  std::vector<int32_t> rest;
  for (int64_t s = 0; s < S; ++s) rest.insert(rest.end(), d.seq(s) + P, d.seq(s) + T);
  const std::vector<float> tail = native_logits(m, rest.data(), S, T - P);
  std::vector<float> out;
  for (int64_t s = 0; s < S; ++s) {
    out.insert(out.end(), m.intact_logits.begin(), m.intact_logits.end());
    out.insert(out.end(), tail.begin() + s * (T - P) * V, tail.begin() + (s + 1) * (T - P) * V);
  }
  return out;
}

std::vector<float> fp_logits(const LlamaModel& m, const TokenSequences& d) {
  auto r = model_logits(m, d, 0, d.count());
  QCAL_CHECK(r.is_ok());
  return r->data;
}

// ---------------------------------------------------------------- tests

TEST(IntactKv, FpPrefixCacheReproducesTheFpModelAtEveryPosition) {
  Fixture& f = fixture();
  for (Variant* v : {&f.plain, &f.sink}) {
    for (const std::vector<int32_t>& prefix :
         {std::vector<int32_t>{kBos}, std::vector<int32_t>{kBos, 5, 9}}) {
      const TokenSequences d = make_data(prefix, 4, kT, v->fp.config.vocab_size, 3);
      const std::vector<float> ref = fp_logits(*v->llama, d);
      // The "quantized" side with every quantizer off: the same transformed model.
      NativeModel q = v->tfp;
      ASSERT_TRUE(attach_intactkv(q, fp_view(v->tfp), prefix).is_ok());
      ASSERT_EQ(q.intact_prefix, prefix);
      ASSERT_EQ(q.intact_k.size(), 2u);
      ASSERT_EQ(q.intact_k[1].size(), prefix.size() * q.config.kv_dim());
      const double e = rel_err(intact_logits_of(q, d), ref);
      std::printf("  %s P=%zu: IntactKV logits vs FP full sequence, max rel %.3g\n",
                  v == &f.plain ? "plain" : "sink", prefix.size(), e);
      EXPECT_LE(e, 1e-4);
      // Negative control: the same cache with K in the wrong basis (P_k applied twice).
      NativeModel wrong = q;
      for (size_t l = 0; l < wrong.intact_k.size(); ++l)
        kron_rows(wrong.intact_k[l], 1, q.config.head_dim, {}, q.layers[l].online.pk);
      EXPECT_GT(rel_err(intact_logits_of(wrong, d), ref), 1e-3);
      // Through the protocol: same perplexity, KL ≈ 0, full agreement.
      auto r = evaluate_native(q, d, v->llama.get(), 3);
      ASSERT_TRUE(r.is_ok()) << r.status().to_string();
      EXPECT_EQ(r->tokens, 4 * (kT - 1));
      EXPECT_NEAR(r->ppl, *r->fp_ppl, 1e-4 * *r->fp_ppl);
      EXPECT_LE(std::fabs(*r->kl), 1e-6);
      EXPECT_EQ(*r->top1_agree, 1.0);
    }
  }
}

TEST(IntactKv, W4A4Kv4KlWithAndWithout) {
  Fixture& f = fixture();
  for (Variant* v : {&f.plain, &f.sink}) {
    const bool sink = v == &f.sink;
    const TokenSequences d = make_data({kBos}, kSeqs, kT, v->fp.config.vocab_size, 5);
    const NativeModel q = quantize_w4a4kv4(v->tfp);
    NativeModel qi = q;
    ASSERT_TRUE(attach_intactkv(qi, fp_view(v->tfp), {kBos}).is_ok());
    auto without = evaluate_native(q, d, v->llama.get(), 5);
    auto with = evaluate_native(qi, d, v->llama.get(), 5);
    ASSERT_TRUE(without.is_ok() && with.is_ok());
    // KL on positions ≥ 1 only (excluding the stored FP BOS logits): the cache's effect.
    const std::vector<float> ref = fp_logits(*v->llama, d);
    const double kl1_without =
        kl_from(native_logits(q, d.tokens.data(), kSeqs, kT), ref, kSeqs, kT, 97, 1);
    const double kl1_with = kl_from(intact_logits_of(qi, d), ref, kSeqs, kT, 97, 1);
    std::printf(
        "  %s W4A4KV4: KL %.5f -> %.5f with IntactKV (positions >= 1: %.5f -> %.5f); "
        "ppl %.3f -> %.3f (fp %.3f); top1 %.3f -> %.3f\n",
        sink ? "sink " : "plain", *without->kl, *with->kl, kl1_without, kl1_with, without->ppl,
        with->ppl, *with->fp_ppl, *without->top1_agree, *with->top1_agree);
    ASSERT_TRUE(std::isfinite(*with->kl) && std::isfinite(*without->kl));
    EXPECT_GT(*without->kl, 1e-4);  // the quantization is visible at all
    EXPECT_NEAR(*with->fp_ppl, *without->fp_ppl, 1e-9);
    if (sink) {
      EXPECT_LE(*with->kl, *without->kl);
      EXPECT_LE(kl1_with, kl1_without);
    }
  }
}

TEST(IntactKv, ProtocolErrors) {
  Fixture& f = fixture();
  NativeModel q = f.plain.tfp;
  ASSERT_TRUE(attach_intactkv(q, fp_view(f.plain.tfp), {kBos}).is_ok());
  TokenSequences d = make_data({kBos}, 5, 8, 97, 9);
  d.tokens[3 * 8] = 17;
  auto r = evaluate_native(q, d, nullptr, 2);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_EQ(
      r.status().message(),
      "IntactKV needs every sequence to begin with the prefix [1]; sequence 3 begins with 17");
  // A multi-token prefix names the sequence's first P tokens.
  NativeModel q3 = f.plain.tfp;
  ASSERT_TRUE(attach_intactkv(q3, fp_view(f.plain.tfp), {kBos, 5}).is_ok());
  TokenSequences d3 = make_data({kBos, 5}, 3, 8, 97, 9);
  d3.tokens[8 + 1] = 6;
  r = evaluate_native(q3, d3, nullptr, 2);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("prefix [1, 5]; sequence 1 begins with [1, 6]"),
            std::string::npos)
      << r.status().message();
  // A prefix as long as the sequences.
  TokenSequences d1 = make_data({kBos, 5}, 2, 2, 97, 9);
  EXPECT_EQ(evaluate_native(q3, d1, nullptr, 2).status().code(), Code::kInvalidInput);
  // Without IntactKV any sequence is fine.
  EXPECT_TRUE(evaluate_native(f.plain.tfp, d, nullptr, 2).is_ok());

  // attach_intactkv refuses an FP twin with a quantizer on, other transforms, bad ids.
  NativeModel tgt = f.plain.tfp;
  NativeModel bad = fp_view(f.plain.tfp);
  bad.layers[1].v.bits = 4;
  Status st = attach_intactkv(tgt, bad, {kBos});
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("layer 1"), std::string::npos) << st.message();
  bad = fp_view(f.plain.tfp);
  bad.layers[0].online.pk[3] += 0.5f;
  st = attach_intactkv(tgt, bad, {kBos});
  EXPECT_NE(st.message().find("pk differs"), std::string::npos) << st.message();
  EXPECT_EQ(attach_intactkv(tgt, fp_view(f.plain.tfp), {}).code(), Code::kInvalidInput);
  EXPECT_EQ(attach_intactkv(tgt, fp_view(f.plain.tfp), {97}).code(), Code::kInvalidInput);
  EXPECT_TRUE(tgt.intact_prefix.empty());  // unchanged on error
}

TEST(IntactKv, WriteReadRoundTripKeepsTheCache) {
  Fixture& f = fixture();
  NativeModel q = quantize_w4a4kv4(f.sink.tfp);
  ASSERT_TRUE(attach_intactkv(q, fp_view(f.sink.tfp), {kBos, 5}).is_ok());
  const std::string dir = f.tmp.sub("native_ikv");
  ASSERT_TRUE(write_native(q, dir, false).is_ok());
  auto r = read_native(dir);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->intact_prefix, q.intact_prefix);
  EXPECT_EQ(r->intact_k, q.intact_k);
  EXPECT_EQ(r->intact_v, q.intact_v);
  EXPECT_EQ(r->intact_logits, q.intact_logits);
  const TokenSequences d = make_data({kBos, 5}, 4, 12, 97, 13);
  auto a = evaluate_native(q, d, f.sink.llama.get(), 4);
  auto b = evaluate_native(*r, d, f.sink.llama.get(), 4);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  EXPECT_EQ(a->nll, b->nll);
  EXPECT_EQ(*a->kl, *b->kl);
}

// Layer 0's share from attention_fwd's saved probabilities (an independent path).
double layer0_share_ref(const Variant& v, const TokenSequences& d) {
  const ModelConfig& c = v.fp.config;
  const int64_t H = c.hidden_size, Q = c.q_dim(), K = c.kv_dim(), T = d.seqlen;
  const int64_t n_h = c.num_attention_heads;
  const BlockWeightsT<float>& w = v.fp.layers[0];
  double sum = 0;
  for (int64_t s = 0; s < d.count(); ++s) {
    std::vector<float> x(T * H), xn(T * H), q(T * Q), k(T * K), out(T * Q), probs(n_h * T * T);
    for (int64_t t = 0; t < T; ++t)
      std::copy_n(v.fp.embed.begin() + d.seq(s)[t] * H, H, x.begin() + t * H);
    rmsnorm_forward(xn.data(), x.data(), w.input_norm.data(), T, H,
                    static_cast<float>(c.rms_norm_eps));
    linear_forward(q.data(), xn.data(), w.w[kQ].data(), nullptr, T, H, Q);
    linear_forward(k.data(), xn.data(), w.w[kK].data(), nullptr, T, H, K);
    rope_forward(q.data(), T, n_h, c.head_dim, 0, c.rope_theta);
    rope_forward(k.data(), T, c.num_key_value_heads, c.head_dim, 0, c.rope_theta);
    attention_fwd<float>(out.data(), q.data(), k.data(), k.data(), T, n_h, c.num_key_value_heads,
                         c.head_dim, probs.data());
    for (int64_t h = 0; h < n_h; ++h)
      for (int64_t t = 1; t < T; ++t) sum += probs[(h * T + t) * T];
  }
  return sum / static_cast<double>(d.count() * n_h * (T - 1));
}

TEST(IntactKv, AttentionSinkShare) {
  Fixture& f = fixture();
  const TokenSequences d = make_data({kBos}, 6, kT, 97, 21);
  // Uniform causal attention over t = 1..T−1 would give mean 1/(t+1).
  double uniform = 0;
  for (int64_t t = 1; t < kT; ++t) uniform += 1.0 / (t + 1);
  uniform /= kT - 1;
  std::vector<double> shares[2];
  for (int i = 0; i < 2; ++i) {
    const Variant& v = i ? f.sink : f.plain;
    auto r = attention_sink_share(*v.llama, d, 4);
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    ASSERT_EQ(r->size(), 2u);
    TokenSequences d4 = d;
    d4.tokens.resize(4 * kT);
    const double ref = layer0_share_ref(v, d4);
    std::printf("  %s: sink share per layer %.4f %.4f (layer 0 ref %.4f, uniform %.4f)\n",
                i ? "sink " : "plain", (*r)[0], (*r)[1], ref, uniform);
    EXPECT_NEAR((*r)[0], ref, 1e-5);
    for (double s : *r) {
      EXPECT_GE(s, 0.0);
      EXPECT_LE(s, 1.0);
    }
    shares[i] = *r;
  }
  for (int l = 0; l < 2; ++l) {
    EXPECT_GT(shares[1][l], 0.7) << "layer " << l;
    EXPECT_LT(shares[0][l], 0.5) << "layer " << l;
  }
  EXPECT_EQ(attention_sink_share(*f.plain.llama, TokenSequences{}, 0).status().code(),
            Code::kInvalidInput);
}

// ---------------------------------------------------------------- +Cal (§6.4)

// Per-element |got − ref| / max|ref|: the maximum and the q-quantile.
struct ErrStats {
  double max = INFINITY, q = INFINITY;
};
ErrStats err_stats(const std::vector<float>& got, const std::vector<float>& ref, double q) {
  if (got.size() != ref.size() || got.empty()) return {};
  double mr = 0;
  for (float v : ref) mr = std::max(mr, std::fabs(static_cast<double>(v)));
  std::vector<double> e(got.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) return {};
    e[i] = std::fabs(static_cast<double>(got[i]) - ref[i]) / mr;
  }
  std::sort(e.begin(), e.end());
  return {e.back(), e[static_cast<size_t>(q * static_cast<double>(e.size() - 1))]};
}

TEST(IntactKvCal, QBlockChainMatchesNativeLogits) {
  Fixture& f = fixture();
  for (Variant* v : {&f.plain, &f.sink}) {
    const char* name = v == &f.plain ? "plain" : "sink ";
    const TokenSequences d = make_data({kBos}, 6, kT, 97, 41);
    // Transform-only (every quantizer off, float weights): summation order only.
    const ErrStats e16 = err_stats(qblock_chain_logits(v->tfp, d.tokens.data(), 6, kT),
                                   native_logits(v->tfp, d.tokens.data(), 6, kT), 0.999);
    EXPECT_LE(e16.max, 1e-5) << name;
    // W4A4KV4 (integer GEMM vs fake quantization), without and with IntactKV.
    NativeModel q = quantize_w4a4kv4(v->tfp);
    const ErrStats e4 = err_stats(qblock_chain_logits(q, d.tokens.data(), 6, kT),
                                  native_logits(q, d.tokens.data(), 6, kT), 0.999);
    ASSERT_TRUE(attach_intactkv(q, fp_view(v->tfp), {kBos}).is_ok());
    std::vector<int32_t> rest;
    for (int64_t s = 0; s < 6; ++s) rest.insert(rest.end(), d.seq(s) + 1, d.seq(s) + kT);
    const ErrStats e4i = err_stats(qblock_chain_logits(q, rest.data(), 6, kT - 1),
                                   native_logits(q, rest.data(), 6, kT - 1), 0.999);
    std::printf(
        "  %s QBlock chain vs native_logits (rel to max|logit|): W16 max %.2e; W4A4KV4 p99.9 "
        "%.2e max %.2e; + IntactKV p99.9 %.2e max %.2e\n",
        name, e16.max, e4.q, e4.max, e4i.q, e4i.max);
    EXPECT_LE(e4.q, 1e-4) << name;
    EXPECT_LE(e4i.q, 1e-4) << name;
    // The blocks use the stored weights as they are: no weight-side transform is set,
    // so QBlock's effective (unquantized) weights are the dequantized codes, bit for bit.
    const NativeBlockInputs in = native_block_inputs(q, 1);
    EXPECT_FALSE(in.t.a1.empty() || in.t.po.empty() || in.t.pk_it.empty());
    EXPECT_TRUE(in.t.a1_it.empty() && in.t.u1_it.empty() && in.t.d1_it.empty() &&
                in.t.po_it.empty() && in.t.pv.empty() && in.t.ca.empty());
    QBlock<float> blk(q.config, &in.w, &in.t, &in.q, nullptr);
    for (int p = 0; p < kNumProj; ++p) {
      EXPECT_EQ(blk.effective_weight(p, false), in.w.w[p]) << kProjNames[p];
      EXPECT_FALSE(in.q.w[p].on());
      EXPECT_EQ(in.q.act[p].bits, 4);
      EXPECT_EQ(in.q.act[p].clip_ratio, 0.9f);
    }
    EXPECT_EQ(in.q.k.group, q.config.head_dim);
    EXPECT_FALSE(in.q.k.sym);
    // Negative control: without the prefix cache the chain is a different function.
    NativeModel no_prefix = q;
    no_prefix.intact_prefix.clear();
    no_prefix.intact_k.clear();
    no_prefix.intact_v.clear();
    EXPECT_GT(err_stats(qblock_chain_logits(no_prefix, rest.data(), 6, kT - 1),
                        native_logits(q, rest.data(), 6, kT - 1), 0.999)
                  .q,
              1e-3)
        << name;
  }
}

std::vector<std::vector<double>> to_f64(const std::vector<std::vector<float>>& a) {
  std::vector<std::vector<double>> o;
  for (const auto& v : a) o.emplace_back(v.begin(), v.end());
  return o;
}

// Central difference of the objective along entry i of layer l's K (which 0) or V
// (which 1), and the one-sided gap |D+ − D−| (a kink of the surrogate shows there).
struct Fd1 {
  double central, gap;
};
Fd1 fd_entry(const NativeModel& q, const NativeModel& fpv, const int32_t* seq, int64_t T,
             std::vector<std::vector<double>>& k, std::vector<std::vector<double>>& v, int which,
             int64_t l, int64_t i, RoundTape<double>* tape) {
  auto& par = which ? v : k;
  const double keep = par[l][i], h = 1e-5;
  auto at = [&](double x) {
    par[l][i] = x;
    return intactkv_cal_objective(q, fpv, seq, T, k, v, nullptr, nullptr, tape);
  };
  const double lp = at(keep + h), lm = at(keep - h), l0 = at(keep);
  return {(lp - lm) / (2 * h), std::fabs((lp - l0) - (l0 - lm)) / h};
}

TEST(IntactKvCal, ObjectiveGradientMatchesFiniteDifferences) {
  // The objective of one sequence through both layers in float64: its gradient
  // with respect to prefix K/V entries of both layers against central differences.
  // W4 weights (dequantized, fixed) with (a) every activation / K / V quantizer
  // off, (b) them on (QuaRot's clip ratios) through the RoundTape surrogate. As in
  // test_qblock, (b) runs on a 10-bit grid: at 4 bits dozens of elements sit with
  // their code exactly on a grid bound, where the surrogate has a kink and a central
  // difference measures the mean of two slopes (the one-sided gap is printed).
  Fixture& f = fixture();
  const std::vector<int32_t> prefix = {kBos, 5};
  const int64_t T = 12;
  const TokenSequences d = make_data(prefix, 1, T, 97, 43);
  const NativeModel fpv = fp_view(f.sink.tfp);
  {
    // Every quantizer off, float weights, the FP cache: h^q is h^fp, the objective ~0
    // (the positions after the prefix and the cache basis agree with the full run).
    NativeModel q = f.sink.tfp;
    ASSERT_TRUE(attach_intactkv(q, fpv, prefix).is_ok());
    const double l = intactkv_cal_objective(q, fpv, d.seq(0), T, to_f64(q.intact_k),
                                            to_f64(q.intact_v), nullptr, nullptr);
    std::printf("  quantizers off at the FP cache: objective %.2e\n", l);
    EXPECT_LT(l, 1e-10);
  }
  for (int bits : {16, 10}) {
    NativeModel q = quantize_w4a4kv4(f.sink.tfp);
    for (NativeLayer& y : q.layers) {
      for (NativeActQuant& a : y.act) a.bits = bits;
      y.k.bits = y.v.bits = bits;
    }
    ASSERT_TRUE(attach_intactkv(q, fpv, prefix).is_ok());
    auto k = to_f64(q.intact_k), v = to_f64(q.intact_v);
    // Move off the FP cache a little (at it the gradient of the sink's K is tiny).
    Rng rng(44);
    for (auto* a : {&k, &v})
      for (auto& e : *a)
        for (double& x : e) x += 0.05 * rng.normal();
    RoundTape<double> tape;
    RoundTape<double>* tp = bits < 16 ? &tape : nullptr;
    std::vector<std::vector<double>> dk, dv;
    const double l0 = intactkv_cal_objective(q, fpv, d.seq(0), T, k, v, &dk, &dv, tp);
    ASSERT_TRUE(std::isfinite(l0));
    if (tp) {
      ASSERT_GT(tape.offsets.size(), 0u);
      tape.mode = RoundTape<double>::Mode::kReplay;
      EXPECT_EQ(intactkv_cal_objective(q, fpv, d.seq(0), T, k, v, nullptr, nullptr, tp), l0);
    }
    ASSERT_EQ(dk.size(), 2u);
    ASSERT_EQ(dv.size(), 2u);
    const int64_t PK = 2 * q.config.kv_dim();
    double worst = 0, worst_gap = 0;
    int checked = 0;
    for (int which = 0; which < 2; ++which)
      for (int64_t l = 0; l < 2; ++l) {
        const auto& grad = which ? dv : dk;
        ASSERT_EQ(static_cast<int64_t>(grad[l].size()), PK);
        double gmax = 0;
        for (double e : grad[l]) gmax = std::max(gmax, std::fabs(e));
        ASSERT_GT(gmax, 0.0);
        for (int64_t i : {int64_t{0}, int64_t{7}, PK / 2 + 3, PK - 1}) {
          const Fd1 fd = fd_entry(q, fpv, d.seq(0), T, k, v, which, l, i, tp);
          const double err = std::fabs(fd.central - grad[l][i]) / gmax;
          EXPECT_LT(err, 1e-6) << "bits " << bits << (which ? " v" : " k") << " layer " << l
                               << " entry " << i << ": fd " << fd.central << " analytic "
                               << grad[l][i] << " one-sided gap " << fd.gap;
          worst = std::max(worst, err);
          worst_gap = std::max(worst_gap, fd.gap / gmax);
          ++checked;
        }
      }
    std::printf(
        "  bits %d: objective %.5f; %d prefix entries (K, V of both layers), max |fd − grad| / "
        "max|grad| = %.2e (one-sided gap %.1e)\n",
        bits, l0, checked, worst, worst_gap);
  }
}

// The sink model at W4A4KV4 with its FP BOS cache attached, training and held-out data.
struct CalSetup {
  NativeModel q;
  NativeModel fpv;
  TokenSequences train, test;
};
CalSetup cal_setup() {
  Fixture& f = fixture();
  CalSetup c;
  c.q = quantize_w4a4kv4(f.sink.tfp);
  c.fpv = fp_view(f.sink.tfp);
  QCAL_CHECK(attach_intactkv(c.q, c.fpv, {kBos}).is_ok());
  c.train = make_data({kBos}, 16, kT, 97, 51);
  c.test = make_data({kBos}, kSeqs, kT, 97, 5);
  return c;
}

// Mean objective (float64) over the first n sequences of d at the model's cache.
double mean_objective(const NativeModel& q, const NativeModel& fpv, const TokenSequences& d,
                      int64_t n) {
  const auto k = to_f64(q.intact_k), v = to_f64(q.intact_v);
  double s = 0;
  for (int64_t i = 0; i < n; ++i)
    s += intactkv_cal_objective(q, fpv, d.seq(i), d.seqlen, k, v, nullptr, nullptr);
  return s / static_cast<double>(n);
}

TEST(IntactKvCal, CalibrationLowersTheObjectiveAndTheKl) {
  Fixture& f = fixture();
  CalSetup c = cal_setup();
  auto before = evaluate_native(c.q, c.test, f.sink.llama.get(), 6);
  ASSERT_TRUE(before.is_ok());
  const double held_before = mean_objective(c.q, c.fpv, c.test, 6);
  IntactKvCalOptions o;
  o.steps = 40;
  o.accum = 16;  // every step sees all 16 training sequences: first/last losses compare
  o.lr = 2e-2;   // the paper's 2e-4 moves this tiny model's cache too little in 40 steps
  int64_t calls = 0;
  std::vector<double> losses;
  auto r = calibrate_intactkv(c.q, c.fpv, c.train, o, [&](int64_t step, int64_t steps, double l) {
    EXPECT_EQ(step, calls);
    EXPECT_EQ(steps, o.steps);
    ++calls;
    losses.push_back(l);
  });
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(calls, o.steps);
  EXPECT_EQ(r->steps, o.steps);
  EXPECT_EQ(r->loss_first, losses.front());
  EXPECT_EQ(r->loss_last, losses.back());
  auto after = evaluate_native(c.q, c.test, f.sink.llama.get(), 6);
  ASSERT_TRUE(after.is_ok());
  const double held_after = mean_objective(c.q, c.fpv, c.test, 6);
  std::printf(
      "  +Cal %lld steps x %lld seqs (lr %.0e, %.2f s): objective %.5f -> %.5f; held-out "
      "objective %.5f -> %.5f, KL %.5f -> %.5f, ppl %.3f -> %.3f (fp %.3f), top1 %.3f -> %.3f\n",
      static_cast<long long>(o.steps), static_cast<long long>(o.accum), o.lr, r->seconds,
      r->loss_first, r->loss_last, held_before, held_after, *before->kl, *after->kl, before->ppl,
      after->ppl, *after->fp_ppl, *before->top1_agree, *after->top1_agree);
  ASSERT_TRUE(std::isfinite(r->loss_first) && std::isfinite(r->loss_last));
  // Measured: 0.0201 -> 0.0143 (0.71x); held-out objective and KL (0.018 -> 0.012) follow.
  EXPECT_LT(r->loss_last, 0.85 * r->loss_first);
  EXPECT_LT(held_after, 0.9 * held_before);
  EXPECT_LT(*after->kl, 0.9 * *before->kl);
  // Only the cache moved: the prefix and its FP logits are kept.
  EXPECT_EQ(c.q.intact_prefix, std::vector<int32_t>{kBos});
  EXPECT_EQ(c.q.intact_logits, cal_setup().q.intact_logits);
}

TEST(IntactKvCal, ZeroStepsLeavesTheCacheAndErrorsLeaveTheModel) {
  CalSetup c = cal_setup();
  const NativeModel orig = c.q;
  auto same_cache = [&](const NativeModel& m) {
    return m.intact_k == orig.intact_k && m.intact_v == orig.intact_v &&
           m.intact_prefix == orig.intact_prefix && m.intact_logits == orig.intact_logits;
  };
  IntactKvCalOptions o;
  o.steps = 0;
  auto r = calibrate_intactkv(c.q, c.fpv, c.train, o);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->steps, 0);
  EXPECT_TRUE(same_cache(c.q));
  // A step at the default lr with warmup starts at lr 0: still the same; a second
  // step moves it.
  o.steps = 1;
  o.accum = 2;
  ASSERT_TRUE(calibrate_intactkv(c.q, c.fpv, c.train, o).is_ok());
  EXPECT_TRUE(same_cache(c.q)) << "step 0 of the linear warmup runs at lr 0";
  o.warmup_ratio = 0;
  ASSERT_TRUE(calibrate_intactkv(c.q, c.fpv, c.train, o).is_ok());
  EXPECT_FALSE(same_cache(c.q));
  c.q = orig;

  auto expect_error = [&](NativeModel& m, const NativeModel& fp, const TokenSequences& d,
                          const IntactKvCalOptions& opt, Code code, const std::string& text) {
    const NativeModel keep = m;
    auto e = calibrate_intactkv(m, fp, d, opt);
    ASSERT_FALSE(e.is_ok()) << text;
    EXPECT_EQ(e.status().code(), code) << e.status().message();
    EXPECT_NE(e.status().message().find(text), std::string::npos) << e.status().message();
    EXPECT_TRUE(m.intact_k == keep.intact_k && m.intact_v == keep.intact_v) << text;
  };
  IntactKvCalOptions ok;
  ok.steps = 2;
  ok.accum = 2;
  NativeModel bare = quantize_w4a4kv4(fixture().sink.tfp);
  expect_error(bare, c.fpv, c.train, ok, Code::kInvalidInput, "no IntactKV cache");
  TokenSequences bad = c.train;
  bad.tokens[3 * kT] = 17;
  expect_error(c.q, c.fpv, bad, ok, Code::kInvalidInput,
               "IntactKV needs every sequence to begin with the prefix [1]; sequence 3 begins "
               "with 17");
  expect_error(c.q, c.fpv, make_data({kBos}, 2, 1, 97, 3), ok, Code::kInvalidInput,
               "leaves nothing");
  expect_error(c.q, c.fpv, TokenSequences{}, ok, Code::kInvalidInput, "no sequence");
  for (auto [field, text] : {std::pair<int, const char*>{0, "steps"},
                             {1, "accum"},
                             {2, "lr"},
                             {3, "warmup_ratio"},
                             {4, "max_grad_norm"},
                             {5, "weight_decay"}}) {
    IntactKvCalOptions b = ok;
    if (field == 0) b.steps = -1;
    if (field == 1) b.accum = 0;
    if (field == 2) b.lr = 0;
    if (field == 3) b.warmup_ratio = 1.5;
    if (field == 4) b.max_grad_norm = 0;
    if (field == 5) b.weight_decay = -1;
    expect_error(c.q, c.fpv, c.train, b, Code::kInvalidInput, text);
  }
  NativeModel fp_on = c.fpv;
  fp_on.layers[1].act[kUp].bits = 4;
  expect_error(c.q, fp_on, c.train, ok, Code::kInvalidInput, "layer 1");
  // A NaN in the FP targets: the loss is NaN at the first step.
  NativeModel fp_nan = c.fpv;
  fp_nan.layers[1].post_norm[3] = NAN;
  expect_error(c.q, fp_nan, c.train, ok, Code::kInternal, "intactkv-cal step 0: loss is NaN");
  EXPECT_TRUE(same_cache(c.q));
}

}  // namespace
}  // namespace qcal::calib

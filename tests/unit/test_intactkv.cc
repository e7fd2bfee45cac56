// labels: unit
// IntactKV (worker/calib/intactkv.h) on a small synthetic model with random
// orthogonal online transforms: the FP prefix cache reproduces the FP model,
// W4A4KV4 KL with and without it (plain model and a model with a forced
// attention sink on BOS), the evaluation protocol's errors, the checkpoint round
// trip, and the attention-sink diagnostic against attention_fwd's probabilities.
// Letters: S sequences, T tokens, P prefix, H hidden, I intermediate, V vocab,
// n_h / n_kv heads, d head dim, Q = n_h·d, K = n_kv·d.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
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

ModelConfig tiny_config() {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 97;
  c.rms_norm_eps = 1e-5;
  c.torch_dtype = DType::kF32;
  return c;
}

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

}  // namespace
}  // namespace qcal::calib

// labels: unit
// The calibration methods through the pipeline (worker/local_runner.h calibrate) on a small synthetic
// LLaMA with outlier channels (H 64, I 192 = 12·16, 2 layers, 4 heads, 2 KV heads):
// transform-only equivalence (methods.md §10 item 6, §11.10a), exact folds
// (§11.10b), the W4A4KV4 quality ordering RTN ≫ QuaRot ≥ FlatQuant, FlatQuant's
// loss decreasing and its NaN guard, recipe validation and JSON, and the
// calibrate_to_dir outputs (native, and GPTQ for a fully folded recipe).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/hadamard.h"
#include "tests/unit/test_util.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/block.h"
#include "worker/calib/native.h"
#include "worker/calib/param.h"
#include "worker/local_runner.h"
#include "worker/engine/model.h"
#include "worker/engine/eval.h"
#include "worker/engine/synth.h"

namespace qcal::calib {
namespace {

using qcal::testing::mean_kl;

constexpr int64_t kT = 32;  // tokens per sequence

struct Fixture {
  testing::TempDir dir{"qcal_methods_"};
  std::string model_dir;
  FpModel fp;
  TokenSequences calib, eval;
};

Fixture& fx() {
  static Fixture* f = [] {
    auto* f = new Fixture;
    SynthOptions o;
    o.config = qcal::testing::small_config(192, 256, 2);
    const ModelConfig& c = o.config;
    o.seed = 7;
    o.outliers.norm_channels = 2;
    o.outliers.up_channels = 2;
    // No V-row outliers: a ×20 V channel whose o_proj columns are ÷20 is adversarial
    // for rotations (the Hadamard spreads the outlier's quantization noise onto normal
    // o_proj weights; measured KL: QuaRot 0.15 vs RTN 0.42 at α 20, 0.75 vs 0.48 at α 50).
    o.outliers.alpha = 20;
    f->model_dir = f->dir.sub("m");
    Status st = synth_model(o, f->model_dir);
    if (!st.is_ok()) {
      std::fprintf(stderr, "synth_model: %s\n", st.to_string().c_str());
      std::abort();
    }
    auto fp = load_fp_model(f->model_dir);
    if (!fp.is_ok()) std::abort();
    f->fp = std::move(fp).value();
    f->calib = {kT, synth_tokens(8 * kT, c.vocab_size, 11)};
    f->eval = {kT, synth_tokens(8 * kT, c.vocab_size, 12)};
    return f;
  }();
  return *f;
}

std::vector<float> fp_logits(const FpModel& m, const TokenSequences& s) {
  return fp_model_logits(m, s.tokens.data(), s.count(), s.seqlen);
}

// max |a − b| / max |b|.
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    num = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(num, d);
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return num / den;
}

// Perplexity of next-token prediction inside each sequence.
double ppl(const std::vector<float>& logits, const TokenSequences& s, int64_t V) {
  double nll = 0;
  int64_t n = 0;
  for (int64_t q = 0; q < s.count(); ++q)
    for (int64_t t = 0; t + 1 < s.seqlen; ++t) {
      const float* row = logits.data() + (q * s.seqlen + t) * V;
      const double m = *std::max_element(row, row + V);
      double z = 0;
      for (int64_t i = 0; i < V; ++i) z += std::exp(row[i] - m);
      nll += m + std::log(z) - row[s.seq(q)[t + 1]];
      ++n;
    }
  return std::exp(nll / static_cast<double>(n));
}

Recipe recipe(const std::string& t, int w, int a, int kv) {
  Recipe r;
  r.with("transform", t).with("w_bits", w).with("a_bits", a).with("kv_bits", kv);
  r.with("cali_bsz", 4).with("seed", 1);
  if (t == "flatquant") r.with("epochs", 4);
  return r;
}

NativeModel calibrate_ok(const Recipe& r, nlohmann::json* rep = nullptr) {
  const Fixture& f = fx();
  auto nm = qcal::calibrate(f.fp, f.calib, r, rep);
  EXPECT_TRUE(nm.is_ok()) << nm.status().to_string();
  if (!nm.is_ok()) return {};
  return std::move(nm).value();
}

std::vector<float> native_eval(const NativeModel& nm, const TokenSequences& s) {
  return native_logits(nm, s.tokens.data(), s.count(), s.seqlen);
}

// Every activation / K / V quantizer off: what is left are the transforms.
void quantizers_off(NativeModel& nm) {
  for (auto& y : nm.layers) {
    for (auto& a : y.act) a.bits = 16;
    y.k.bits = 16;
    y.v.bits = 16;
  }
}

// ---- 1. Transform-only equivalence.

TEST(Methods, TransformOnlyEqualsFp) {
  const Fixture& f = fx();
  const std::vector<float> ref = fp_logits(f.fp, f.eval);
  for (const char* t :
       {"none", "smoothquant", "quarot", "flatquant"}) {
    nlohmann::json rep;
    NativeModel nm = calibrate_ok(recipe(t, 16, 16, 16), &rep);
    ASSERT_EQ(nm.layers.size(), 2u) << t;
    const double e = rel_err(native_eval(nm, f.eval), ref);
    EXPECT_LE(e, 1e-4) << t;
    std::printf("transform-only %-11s w16a16kv16: rel err %.2e\n", t, e);
  }
}

// Trained (FlatQuant) or fixed (QuaRot) transforms with every online piece present
// (a/u/d Kronecker pairs, po, pk/pk_it): the model calibrated at W16A4KV4 with its
// activation and K/V quantizers switched off afterwards reproduces the FP model.
TEST(Methods, TrainedTransformsWithQuantizersOffEqualFp) {
  const Fixture& f = fx();
  const std::vector<float> ref = fp_logits(f.fp, f.eval);
  for (const char* t : {"quarot", "flatquant"}) {
    nlohmann::json rep;
    NativeModel nm = calibrate_ok(recipe(t, 16, 4, 4), &rep);
    ASSERT_EQ(nm.layers.size(), 2u);
    const auto& on = nm.layers[1].online;
    EXPECT_FALSE(on.d1.empty() || on.d2.empty() || on.po.empty() || on.pk.empty() ||
                 on.pk_it.empty())
        << t;
    if (std::string(t) == "flatquant") {
      EXPECT_FALSE(on.a1.empty() || on.a2.empty() || on.u1.empty() || on.u2.empty());
      EXPECT_LT(nm.layers[0].act[kQ].clip, 1.0f);  // LAC clip = sigmoid(β) < 1
    }
    const double quant_err = rel_err(native_eval(nm, f.eval), ref);
    quantizers_off(nm);
    const double e = rel_err(native_eval(nm, f.eval), ref);
    EXPECT_LE(e, 1e-4) << t;
    EXPECT_GT(quant_err, 100 * e) << t;  // the quantizers did act
    std::printf("transforms of %-9s W16A4KV4, quantizers off: rel err %.2e (on: %.2e)\n",
                t, e, quant_err);
  }
}

// ---- 2. Each fold preserves the FP function.

TEST(Methods, FoldsPreserveLogits) {
  const Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  const std::vector<float> ref = fp_logits(f.fp, f.eval);

  FpModel m = f.fp;
  fold_norms(m, /*embed_mean_sub=*/false);
  EXPECT_EQ(m.final_norm[0], 1.0f);
  EXPECT_EQ(m.layers[0].input_norm[3], 1.0f);
  const double e_fold = rel_err(fp_logits(m, f.eval), ref);
  EXPECT_LE(e_fold, 1e-4);

  rotate_residual(m, random_hadamard_matrix(c.hidden_size, 5));
  const double e_rot = rel_err(fp_logits(m, f.eval), ref);
  EXPECT_LE(e_rot, 1e-4);

  Rng rng(3);
  for (auto& w : m.layers) rotate_heads(w, c, random_orthogonal(c.head_dim, rng));
  const double e_heads = rel_err(fp_logits(m, f.eval), ref);
  EXPECT_LE(e_heads, 1e-4);
  std::printf("fold_norms %.2e, + rotate_residual %.2e, + rotate_heads %.2e\n", e_fold, e_rot,
              e_heads);

  // The weights did change (not a silent no-op).
  EXPECT_GT(std::fabs(m.layers[0].w[kV][0] - f.fp.layers[0].w[kV][0]), 1e-6);

  FpModel s = f.fp;
  std::vector<float> a(static_cast<size_t>(c.hidden_size)), b(a.size());
  for (size_t j = 0; j < a.size(); ++j) {
    a[j] = static_cast<float>(0.1 + rng.uniform() * 30);
    b[j] = static_cast<float>(0.1 + rng.uniform() * 30);
  }
  for (auto& w : s.layers) smooth_layer(w, a, b, 0.5);
  EXPECT_NE(s.layers[0].input_norm[0], f.fp.layers[0].input_norm[0]);
  const double e_sq = rel_err(fp_logits(s, f.eval), ref);
  EXPECT_LE(e_sq, 1e-4);

  // Embedding mean subtraction is not an identity for RMSNorm models (§10 item 1).
  FpModel e = f.fp;
  fold_norms(e, /*embed_mean_sub=*/true);
  EXPECT_GT(rel_err(fp_logits(e, f.eval), ref), 1e-4);
}

// ---- 3. Quality ordering at W4A4KV4 on the outlier model.

TEST(Methods, W4A4KV4Ordering) {
  const Fixture& f = fx();
  const int64_t V = f.fp.config.vocab_size;
  const std::vector<float> ref = fp_logits(f.fp, f.eval);
  std::printf("FP ppl %.3f\n", ppl(ref, f.eval, V));
  auto kl_of = [&](const Recipe& r, nlohmann::json* rep) {
    NativeModel nm = calibrate_ok(r, rep);
    if (nm.layers.empty()) return std::numeric_limits<double>::infinity();
    const std::vector<float> q = native_eval(nm, f.eval);
    std::printf("  %s-%s: ppl %.3f\n", r.transform().c_str(),
                r.weight_solver().c_str(), ppl(q, f.eval, V));
    return mean_kl(q, ref, V);
  };
  const double kl_rtn = kl_of(recipe("none", 4, 4, 4), nullptr);
  Recipe sq = recipe("smoothquant", 4, 4, 4);
  const double kl_sq = kl_of(sq, nullptr);
  Recipe qr = recipe("quarot", 4, 4, 4);
  qr.with("a_clip", 0.9);
  qr.with("kv_clip", 0.95);
  const double kl_quarot = kl_of(qr, nullptr);
  qr.with("weight_solver", "gptq");
  const double kl_quarot_gptq = kl_of(qr, nullptr);
  Recipe fq = recipe("flatquant", 4, 4, 4);
  fq.with("epochs", 30);
  fq.with("cali_bsz", 8);  // one full batch per step: first and last step see the same data
  nlohmann::json rep;
  const double kl_flat = kl_of(fq, &rep);
  fq.with("weight_solver", "gptq");
  const double kl_flat_gptq = kl_of(fq, nullptr);
  std::printf(
      "W4A4KV4 KL to FP: rtn %.4f  smoothquant %.4f  quarot-rtn %.4f  quarot-gptq %.4f  "
      "flatquant-rtn %.4f  flatquant-gptq %.4f\n",
      kl_rtn, kl_sq, kl_quarot, kl_quarot_gptq, kl_flat, kl_flat_gptq);
  EXPECT_GT(kl_rtn, 5 * kl_quarot);
  EXPECT_LT(kl_sq, kl_rtn);
  EXPECT_LE(kl_flat, kl_quarot);
  EXPECT_LT(kl_quarot_gptq, kl_quarot);
  EXPECT_LT(kl_flat_gptq, kl_quarot);
  ASSERT_EQ(rep["transform"].size(), 2u);
  for (const auto& l : rep["transform"]) {
    const double first = l["loss_first"].get<double>(), last = l["loss_last"].get<double>();
    std::printf("flatquant layer %lld: loss %.4g -> %.4g\n", l["layer"].get<long long>(), first,
                last);
    EXPECT_LT(last, first) << "layer " << l["layer"];
    EXPECT_GT(first, 0.0);
  }
}

TEST(Methods, FlatQuantNamesTheLayerAndStepOfANaN) {
  const Fixture& f = fx();
  const int64_t H = f.fp.config.hidden_size;
  Recipe r = recipe("flatquant", 4, 4, 4);
  r.with("epochs", 1);
  {
    FpModel m = f.fp;  // a NaN in the inputs of layer 0 (one embedding row)
    m.embed[static_cast<size_t>(f.calib.tokens[5]) * H + 3] = std::nanf("");
    auto res = qcal::calibrate(m, f.calib, r, nullptr);
    ASSERT_FALSE(res.is_ok());
    EXPECT_NE(res.status().message().find("flatquant: layer 0 step 0: loss is NaN"),
              std::string::npos)
        << res.status().to_string();
  }
  {
    FpModel m = f.fp;  // a NaN inside layer 1: refused as the weight is read, naming it
    m.layers[1].w[kUp][17] = std::nanf("");
    auto res = qcal::calibrate(m, f.calib, r, nullptr);
    ASSERT_FALSE(res.is_ok());
    EXPECT_EQ(res.status().code(), Code::kInvalidInput);
    EXPECT_NE(res.status().message().find(
                  "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value (NaN)"),
              std::string::npos)
        << res.status().to_string();
  }
}

// GPTQ with groups (act-order over static groups) packs (out, G) scales the native
// kernels read; the result stays far better than plain RTN.
TEST(Methods, GroupedGptqNative) {
  const Fixture& f = fx();
  const std::vector<float> ref = fp_logits(f.fp, f.eval);
  Recipe r = recipe("quarot", 4, 4, 4);
  r.with("weight_solver", "gptq");
  r.with("w_group", 32);
  r.with("gptq.act_order", true);
  r.with("gptq.static_groups", true);
  NativeModel nm = calibrate_ok(r);
  ASSERT_EQ(nm.layers.size(), 2u);
  EXPECT_EQ(nm.w_group, 32);
  const PackedWeight& down = nm.layers[1].qw[kDown];
  EXPECT_EQ(down.group, 32);
  EXPECT_EQ(down.scales.size(), static_cast<size_t>(64 * (192 / 32)));
  const double kl = mean_kl(native_eval(nm, f.eval), ref, f.fp.config.vocab_size);
  NativeModel rtn = calibrate_ok(recipe("none", 4, 4, 4));
  const double kl_rtn = mean_kl(native_eval(rtn, f.eval), ref, f.fp.config.vocab_size);
  std::printf("quarot-gptq g32 act-order W4A4KV4 KL %.4f (rtn %.4f)\n", kl, kl_rtn);
  EXPECT_LT(5 * kl, kl_rtn);
}

// ---- Output directories.

TEST(Methods, CalibrateToDirNativeAndFolded) {
  const Fixture& f = fx();
  const std::vector<float> ref = fp_logits(f.fp, f.eval);
  // Not foldable (A4 online): native checkpoint, identical to the in-memory model; GPTQ is
  // refused for it before any work.
  EXPECT_FALSE(calibrate_to_dir(f.model_dir, f.calib, recipe("quarot", 4, 4, 4), f.dir.sub("nat2"),
                                "gptq", false)
                   .is_ok());
  Recipe r = recipe("quarot", 4, 4, 4);
  auto rep = calibrate_to_dir(f.model_dir, f.calib, r, f.dir.sub("native"), "auto", false);
  ASSERT_TRUE(rep.is_ok()) << rep.status().to_string();
  ASSERT_TRUE(is_native_dir(f.dir.sub("native")));
  auto back = read_native(f.dir.sub("native"));
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  NativeModel mem = calibrate_ok(r);
  EXPECT_EQ(rel_err(native_eval(*back, f.eval), native_eval(mem, f.eval)), 0.0);

  // Weight-only QuaRot folds completely (R1 + per-head V/O): a GPTQ checkpoint that the
  // engine loads, equal to the native model of the same recipe (RTN is deterministic).
  Recipe w = recipe("quarot", 4, 16, 16);
  ASSERT_TRUE(w.folds_completely());
  auto rep2 = calibrate_to_dir(f.model_dir, f.calib, w, f.dir.sub("gptq"), "gptq", false);
  ASSERT_TRUE(rep2.is_ok()) << rep2.status().to_string();
  auto lm = LlamaModel::open(f.dir.sub("gptq"));
  ASSERT_TRUE(lm.is_ok()) << lm.status().to_string();
  auto logits = model_logits(**lm, f.eval, 0, f.eval.count());
  ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
  NativeModel wn = calibrate_ok(w);
  const std::vector<float> wl = native_eval(wn, f.eval);
  const double e = rel_err(logits->data, wl);
  EXPECT_LE(e, 1e-4);
  const double kl = mean_kl(logits->data, ref, f.fp.config.vocab_size);
  EXPECT_GT(kl, 0.0);
  std::printf("folded quarot W4A16 via GPTQ format: vs native %.2e, KL to FP %.4f\n", e, kl);

  // An existing output directory is refused without overwrite.
  auto again = calibrate_to_dir(f.model_dir, f.calib, w, f.dir.sub("gptq"), "gptq", false);
  EXPECT_FALSE(again.is_ok());
}

// ---- IntactKV through the pipeline (methods.md §6).

// The eval set with every sequence's first token replaced by BOS (IntactKV's
// evaluation needs sequences that begin with the prefix).
TokenSequences bos_eval() {
  TokenSequences s = fx().eval;
  for (int64_t q = 0; q < s.count(); ++q)
    s.tokens[static_cast<size_t>(q * s.seqlen)] = static_cast<int32_t>(fx().fp.config.bos_token_id);
  return s;
}

const LlamaModel& fp_llama() {
  static const LlamaModel* m = [] {
    auto r = LlamaModel::open(fx().model_dir);
    if (!r.is_ok()) std::abort();
    return std::move(r).value().release();
  }();
  return *m;
}

EvalResult eval_ok(const NativeModel& nm, const TokenSequences& data) {
  auto r = evaluate_native(nm, data, &fp_llama(), 8);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? std::move(r).value() : EvalResult{};
}

NativeModel without_intactkv(NativeModel nm) {
  nm.intact_prefix.clear();
  nm.intact_k.clear();
  nm.intact_v.clear();
  nm.intact_logits.clear();
  return nm;
}

// With every quantizer off the FP prefix cache in the transformed basis plus the
// transformed model reproduce the FP model exactly: at W16A16KV16, and at W16A4KV4
// (all online pieces present, P_k on K included) with the quantizers switched off
// after calibration.
TEST(Methods, IntactKvWithQuantizersOffReproducesFp) {
  const TokenSequences data = bos_eval();
  const int32_t bos = static_cast<int32_t>(fx().fp.config.bos_token_id);
  for (const char* t : {"quarot", "flatquant"}) {
    for (int bits : {16, 4}) {
      Recipe r = recipe(t, 16, bits, bits);
      r.with("epochs", 2);
      r.with("intactkv", true);
      NativeModel nm = calibrate_ok(r);
      ASSERT_EQ(nm.intact_prefix, std::vector<int32_t>{bos}) << t;
      ASSERT_EQ(nm.intact_k.size(), 2u);
      EXPECT_EQ(nm.recipe["intactkv"], true);
      if (bits < 16) {
        EXPECT_FALSE(nm.layers[0].online.pk.empty()) << t;
        quantizers_off(nm);
      }
      const EvalResult e = eval_ok(nm, data);
      ASSERT_TRUE(e.kl && e.fp_ppl);
      const double rel = std::fabs(e.ppl - *e.fp_ppl) / *e.fp_ppl;
      EXPECT_LE(rel, 1e-5) << t << " a/kv " << bits;
      // |KL|: the evaluator's float sums leave it at about ±1e-8 when the models agree.
      EXPECT_LE(std::fabs(*e.kl), 1e-6) << t << " a/kv " << bits;
      EXPECT_GT(e.ppl, 1.0);
      std::printf(
          "intactkv %-9s calibrated w16a%dkv%d, quantizers off: ppl %.6f fp %.6f "
          "(rel %.1e) KL %.2e\n",
          t, bits, bits, e.ppl, *e.fp_ppl, rel, *e.kl);
    }
  }
}

// The prefix cache comes from the deployed weights before GPTQ: the same as the
// W16 model's of the same transforms, and the quantized model itself is unchanged
// by IntactKV.
TEST(Methods, IntactKvUsesUnquantizedDeployedWeights) {
  Recipe r = recipe("quarot", 4, 4, 4);
  r.with("weight_solver", "gptq");
  r.with("intactkv", true);
  r.with("intactkv_prefix", nlohmann::json::array({1, 5, 9}));
  NativeModel q = calibrate_ok(r);
  Recipe r16 = r;
  r16.with("w_bits", 16);
  NativeModel w16 = calibrate_ok(r16);
  ASSERT_EQ(q.intact_prefix, (std::vector<int32_t>{1, 5, 9}));
  ASSERT_EQ(q.intact_k.size(), 2u);
  ASSERT_EQ(q.intact_k[1].size(), static_cast<size_t>(3 * 2 * 16));
  EXPECT_EQ(q.intact_k, w16.intact_k);
  EXPECT_EQ(q.intact_v, w16.intact_v);
  EXPECT_EQ(q.intact_logits, w16.intact_logits);
  Recipe plain = r;
  plain.with("intactkv", false);
  plain.with("intactkv_prefix", nlohmann::json::array());
  NativeModel p = calibrate_ok(plain);
  EXPECT_EQ(native_eval(without_intactkv(q), fx().eval), native_eval(p, fx().eval));
}

// W4A4KV4 KL to FP with and without the FP prefix cache (same quantized model).
// Reported, not ordered: the synthetic model has no attention sink on BOS.
TEST(Methods, IntactKvW4A4KV4Report) {
  const TokenSequences data = bos_eval();
  for (const char* t : {"none", "quarot", "flatquant"}) {
    Recipe r = recipe(t, 4, 4, 4);
    r.with("intactkv", true);
    if (std::string(t) == "quarot") {
      r.with("a_clip", 0.9);
      r.with("kv_clip", 0.95);
    }
    NativeModel nm = calibrate_ok(r);
    ASSERT_EQ(nm.intact_k.size(), 2u) << t;
    const EvalResult with = eval_ok(nm, data);
    const EvalResult without = eval_ok(without_intactkv(nm), data);
    ASSERT_TRUE(with.kl && without.kl);
    for (double v : {*with.kl, *without.kl, with.ppl, without.ppl})
      EXPECT_TRUE(std::isfinite(v)) << t;
    EXPECT_GT(*with.kl, 0.0);
    EXPECT_GT(*without.kl, 0.0);
    std::printf("W4A4KV4 %-9s KL to FP: intactkv %.4f  without %.4f  (ppl %.3f / %.3f, fp %.3f)\n",
                t, *with.kl, *without.kl, with.ppl, without.ppl, *with.fp_ppl);
  }
}

// ---- 4. Recipe validation (common/recipe.h; its JSON is test_job_spec's).

TEST(Recipe, ValidationNamesTheField) {
  auto err = [](const Recipe& r) { return r.validate().message(); };
  auto set_err = [](Recipe r, const std::string& k, const nlohmann::json& v) {
    return r.set(k, v).message();
  };
  const Recipe ok = recipe("flatquant", 4, 4, 4);
  EXPECT_TRUE(ok.validate().is_ok());
  Recipe r = ok;
  r.with("w_bits", 5);
  EXPECT_NE(err(r).find("w_bits"), std::string::npos);
  EXPECT_NE(set_err(ok, "a_bits", 1).find("a_bits"), std::string::npos);
  r = ok;
  r.with("kv_bits", 12);
  EXPECT_NE(err(r).find("kv_bits"), std::string::npos);
  EXPECT_NE(set_err(ok, "w_group", 0).find("w_group"), std::string::npos);
  EXPECT_NE(set_err(ok, "a_clip", 1.5).find("a_clip"), std::string::npos);
  EXPECT_NE(set_err(ok, "cali_bsz", 0).find("cali_bsz"), std::string::npos);
  EXPECT_NE(set_err(ok, "flat_lr", -1).find("flat_lr"), std::string::npos);
  r = ok;
  r.with("w_mse_clip", true);
  EXPECT_NE(err(r).find("w_mse_clip"), std::string::npos);
  for (const char* t : {"none", "quarot", "flatquant"}) {
    r = recipe(t, 16, 16, 16);
    EXPECT_NE(err(r).find("nothing"), std::string::npos) << t;
  }
  r = recipe("spinquant", 4, 16, 16);
  r.with("weight_solver", "gptq");
  EXPECT_NE(err(r).find("spinquant"), std::string::npos);
  r.with("weight_solver", "rtn");
  EXPECT_TRUE(r.validate().is_ok());
  r = recipe("quarot", 4, 4, 4);
  r.with("weight_solver", "gptq").with("w_group", 32).with("gptq.act_order", true);
  EXPECT_NE(err(r).find("gptq.act_order"), std::string::npos);
  r.with("gptq.static_groups", true);
  EXPECT_TRUE(r.validate().is_ok());

  // Model-dependent checks.
  ModelConfig c = fx().fp.config;
  r = recipe("quarot", 4, 4, 4);
  r.with("w_group", 48);
  EXPECT_NE(r.validate_for(c).message().find("w_group: 48 does not divide"), std::string::npos)
      << r.validate_for(c).message();
  EXPECT_TRUE(r.validate_for(c, /*allow_partial_groups=*/true).is_ok());
  r.with("w_group", 32);
  EXPECT_TRUE(r.validate_for(c).is_ok());
  r.with("w_group", -1);
  ModelConfig odd = c;
  odd.intermediate_size = 88;  // 8·11 = 44·2: Paley I over GF(43)
  EXPECT_TRUE(r.validate_for(odd).is_ok()) << r.validate_for(odd).message();
  odd.intermediate_size = 2 * 4099;  // odd part prime and beyond the fallback's reach
  EXPECT_NE(r.validate_for(odd).message().find("intermediate_size 8198"), std::string::npos)
      << r.validate_for(odd).message();
  r.with("a_bits", 16).with("kv_bits", 16);  // folds completely: no R4, so I needs no Hadamard
  EXPECT_TRUE(r.validate_for(odd).is_ok()) << r.validate_for(odd).message();
  odd.intermediate_size = 90;  // 2 mod 4: no Kronecker pair for FlatQuant
  EXPECT_NE(recipe("flatquant", 4, 4, 4).validate_for(odd).message().find("flatquant"),
            std::string::npos);

  // IntactKV.
  r = recipe("quarot", 4, 4, 4);
  r.with("intactkv_prefix", nlohmann::json::array({1}));
  EXPECT_NE(err(r).find("intactkv_prefix: set without intactkv"), std::string::npos) << err(r);
  r.with("intactkv", true);
  EXPECT_TRUE(r.validate().is_ok());
  EXPECT_NE(set_err(r, "intactkv_prefix", nlohmann::json::array({1, -2}))
                .find("intactkv_prefix[1]: must be a token id"),
            std::string::npos);
  r.with("intactkv_prefix", nlohmann::json::array({1, 256}));
  EXPECT_TRUE(r.validate().is_ok());  // the vocabulary is validate_for's
  EXPECT_NE(r.validate_for(c).message().find("intactkv_prefix: token 1 = 256 is outside"),
            std::string::npos)
      << r.validate_for(c).message();
  r.with("intactkv_prefix", nlohmann::json::array());
  EXPECT_TRUE(r.validate_for(c).is_ok());
  EXPECT_EQ(r.intactkv_prefix_for(c), std::vector<int32_t>{static_cast<int32_t>(c.bos_token_id)});
  ModelConfig nobos = c;
  nobos.bos_token_id = -1;
  EXPECT_NE(r.validate_for(nobos).message().find("bos_token_id -1"), std::string::npos);
  r.with("intactkv_prefix", nlohmann::json::array({3, 4}));
  EXPECT_TRUE(r.validate_for(nobos).is_ok());
  EXPECT_EQ(r.intactkv_prefix_for(nobos), (std::vector<int32_t>{3, 4}));
  // Weight-only QuaRot with IntactKV: the transforms still fold, but the prefix cache
  // needs the native format.
  r = recipe("quarot", 4, 16, 16);
  r.with("intactkv", true);
  EXPECT_TRUE(r.transforms_fold());
  EXPECT_FALSE(r.folds_completely());
  r.with("weight_solver", "gptq").with("w_group", 32).with("gptq.act_order", true);
  EXPECT_NE(err(r).find("gptq.act_order"), std::string::npos);

  // What folds.
  EXPECT_TRUE(recipe("none", 4, 16, 16).folds_completely());
  EXPECT_TRUE(recipe("smoothquant", 4, 16, 16).folds_completely());
  EXPECT_FALSE(recipe("quarot", 4, 16, 4).folds_completely());
  EXPECT_FALSE(recipe("flatquant", 4, 16, 16).folds_completely());
}

}  // namespace
}  // namespace qcal::calib

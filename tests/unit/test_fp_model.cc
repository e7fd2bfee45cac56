// labels: unit
// Tests of the whole-model FP path (worker/calib/fp_model.h): logits against the
// engine's model_logits, the loss against the cross-entropy of those logits, the
// gradients of every weight against finite differences (float: directional
// derivatives), the checkpoint round trip; the grammar corpus (grammar.h); the
// outlier injection into an existing checkpoint (synth.h inject_outliers); and
// the committed trained fixtures (tests/fixtures/).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "tests/unit/test_util.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/grammar.h"
#include "worker/calib/intactkv.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal::calib {
namespace {

using ::qcal::testing::TempDir;

ModelConfig tiny_config(const std::string& type = "llama", bool tie = false) {
  ModelConfig c;
  c.model_type = type;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 257;
  c.attention_bias = type == "qwen2";
  c.tie_word_embeddings = tie;
  c.torch_dtype = DType::kF32;
  return c;
}

std::string synth_dir(const TempDir& tmp, const std::string& name, const ModelConfig& c,
                      uint64_t seed = 3, OutlierOptions out = {}) {
  SynthOptions o;
  o.config = c;
  o.seed = seed;
  o.outliers = out;
  const std::string dir = tmp.sub(name);
  Status s = synth_model(o, dir);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  return dir;
}

FpModel load_or_die(const std::string& dir) {
  auto m = load_fp_model(dir);
  EXPECT_TRUE(m.is_ok()) << m.status().to_string();
  return m.is_ok() ? std::move(*m) : FpModel{};
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  return t;
}

// Mean next-token NLL of logits (B·T, V), in double.
double ce_of_logits(const std::vector<float>& logits, const std::vector<int32_t>& tokens, int64_t B,
                    int64_t T, int64_t V) {
  double nll = 0;
  for (int64_t s = 0; s < B; ++s)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const float* z = logits.data() + (s * T + t) * V;
      double mx = *std::max_element(z, z + V), se = 0;
      for (int64_t v = 0; v < V; ++v) se += std::exp(double(z[v]) - mx);
      nll += mx + std::log(se) - z[tokens[static_cast<size_t>(s * T + t + 1)]];
    }
  return nll / static_cast<double>(B * (T - 1));
}

// ---------------------------------------------------------------- forward

class FpModelTypes : public ::testing::TestWithParam<const char*> {};

TEST_P(FpModelTypes, LogitsMatchTheEngine) {
  TempDir tmp("qcal_fpm_");
  const std::string type = GetParam();
  const ModelConfig c =
      tiny_config(type == std::string("tied") ? "llama" : type, type == std::string("tied"));
  const std::string dir = synth_dir(tmp, "m", c);
  FpModel m = load_or_die(dir);
  const int64_t B = 3, T = 24;
  TokenSequences seqs;
  seqs.seqlen = T;
  seqs.tokens = random_tokens(B * T, c.vocab_size, 5);
  auto lm = LlamaModel::open(dir);
  ASSERT_TRUE(lm.is_ok());
  auto ref = model_logits(**lm, seqs, 0, B);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  const std::vector<float> got = fp_model_logits(m, seqs.tokens.data(), B, T);
  ASSERT_EQ(got.size(), ref->data.size());
  double max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << i;
    max_abs = std::max(max_abs, std::fabs(double(ref->data[i])));
    max_diff = std::max(max_diff, std::fabs(double(got[i]) - ref->data[i]));
  }
  const double rtol = 1e-5;
  std::printf("[%s] logits max|Δ| %.3g, max|logit| %.3g (%.1f%% of budget)\n", GetParam(), max_diff,
              max_abs, 100 * max_diff / (rtol * max_abs));
  EXPECT_GT(max_abs, 1.0);
  EXPECT_LE(max_diff, rtol * max_abs);

  // The loss is the cross-entropy of these logits, with or without a backward.
  const double want = ce_of_logits(got, seqs.tokens, B, T, c.vocab_size);
  const double l0 = fp_model_loss(m, seqs.tokens.data(), B, T, nullptr);
  FpModelGrads g;
  const double l1 = fp_model_loss(m, seqs.tokens.data(), B, T, &g);
  EXPECT_NEAR(l0, want, 1e-6 * want);
  EXPECT_EQ(l0, l1);
}

INSTANTIATE_TEST_SUITE_P(Types, FpModelTypes, ::testing::Values("llama", "qwen2", "tied"));

// ---------------------------------------------------------------- gradients

// Every parameter tensor of a model paired with its gradient, by name.
struct Slot {
  std::string name;
  std::vector<float>* p;
  const std::vector<float>* g;
};
std::vector<Slot> slots(FpModel& m, const FpModelGrads& g) {
  std::vector<Slot> s;
  s.push_back({"embed", &m.embed, &g.embed});
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    s.push_back({p + "input_norm", &m.layers[l].input_norm, &g.layers[l].w.input_norm});
    s.push_back({p + "post_norm", &m.layers[l].post_norm, &g.layers[l].w.post_norm});
    for (int j = 0; j < kNumProj; ++j)
      s.push_back({p + kProjNames[j], &m.layers[l].w[j], &g.layers[l].w.w[j]});
    for (int j = 0; j < 3; ++j)
      if (!m.layers[l].bias[j].empty())
        s.push_back({p + "bias" + std::to_string(j), &m.layers[l].bias[j], &g.layers[l].w.bias[j]});
  }
  s.push_back({"final_norm", &m.final_norm, &g.final_norm});
  s.push_back({"lm_head", &m.lm_head, &g.lm_head});
  return s;
}

// Directional derivative along a random direction u (per tensor: N(0,1) ·
// rms of the tensor) by central differences with steps h and h/2, against Σ g·u.
// In float a loss of O(5) resolves to ~1e-6, so h = 1e-2 (relative) keeps the
// differences well above the noise.
void check_directional(FpModel& m, const std::vector<int32_t>& tokens, int64_t B, int64_t T,
                       const std::string& only, double rtol, uint64_t seed) {
  FpModelGrads g;
  fp_model_loss(m, tokens.data(), B, T, &g);
  std::vector<Slot> ss = slots(m, g);
  const bool tied = m.config.tie_word_embeddings;
  Rng rng(seed);
  double analytic = 0;
  std::vector<std::vector<float>> dirs;
  for (Slot& s : ss) {
    std::vector<float> u(s.p->size(), 0.0f);
    const bool chosen = (only.empty() || s.name.find(only) != std::string::npos) &&
                        !(tied && s.name == "lm_head");  // one matrix: perturbed through embed
    if (chosen) {
      double rms = 0;
      for (float x : *s.p) rms += double(x) * x;
      rms = std::sqrt(rms / static_cast<double>(s.p->size()));
      for (float& x : u) x = static_cast<float>(rng.normal() * rms);
      EXPECT_EQ(s.g->size(), s.p->size()) << s.name;
      for (size_t i = 0; i < u.size(); ++i) analytic += double((*s.g)[i]) * u[i];
    }
    dirs.push_back(std::move(u));
  }
  auto loss_at = [&](double a) {
    FpModel q = m;
    std::vector<Slot> qs = slots(q, g);
    for (size_t k = 0; k < qs.size(); ++k)
      for (size_t i = 0; i < dirs[k].size(); ++i)
        (*qs[k].p)[i] += static_cast<float>(a * dirs[k][i]);
    if (tied) q.lm_head = q.embed;
    return fp_model_loss(q, tokens.data(), B, T, nullptr);
  };
  // Richardson extrapolation of two central differences cancels the O(h²) term
  // (which reaches ~2% for the tied embedding, quadratic in the logits).
  const double h = 1e-2;
  const double d1 = (loss_at(h) - loss_at(-h)) / (2 * h);
  const double d2 = (loss_at(h / 2) - loss_at(-h / 2)) / h;
  const double numeric = (4 * d2 - d1) / 3;
  const double err = std::fabs(numeric - analytic);
  const double atol = 5e-5;  // float noise of the difference quotients (loss noise ~1e-7 / h)
  const double budget = atol + rtol * std::fabs(numeric);
  std::printf(
      "[%-22s] directional derivative: analytic %+.6g, central difference %+.6g "
      "(h %g: %+.6g), rel. error %.2e (%.0f%% of budget)\n",
      only.empty() ? "all" : only.c_str(), analytic, numeric, h, d1, err / std::fabs(numeric),
      100 * err / budget);
  EXPECT_TRUE(std::isfinite(analytic));
  EXPECT_GT(std::fabs(numeric), 1e-3) << only;  // the direction moves the loss
  EXPECT_LE(err, budget) << only;
}

TEST(FpModelGrad, DirectionalDerivativesMatchFiniteDifferences) {
  TempDir tmp("qcal_fpm_");
  for (const char* type : {"llama", "qwen2", "tied"}) {
    const bool tied = type == std::string("tied");
    const ModelConfig c = tiny_config(tied ? "llama" : type, tied);
    FpModel m = load_or_die(synth_dir(tmp, type, c, 7));
    const int64_t B = 2, T = 16;
    const std::vector<int32_t> tokens = random_tokens(B * T, c.vocab_size, 11);
    std::printf("model %s\n", type);
    // Each group alone (a wrong group cannot hide behind the others), then all.
    for (const char* only :
         {"embed", "lm_head", "final_norm", "layer0.input_norm", "layer1.post_norm", "q_proj",
          "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "bias", ""}) {
      if (std::string(only) == "bias" && !c.attention_bias) continue;
      if (std::string(only) == "lm_head" && tied) continue;
      check_directional(m, tokens, B, T, only, 0.01, 100 + std::hash<std::string>{}(only) % 97);
    }
  }
}

TEST(FpModelGrad, GradientsAccumulateAcrossCalls) {
  TempDir tmp("qcal_fpm_");
  const ModelConfig c = tiny_config();
  FpModel m = load_or_die(synth_dir(tmp, "m", c));
  const std::vector<int32_t> tokens = random_tokens(2 * 8, c.vocab_size, 2);
  FpModelGrads once, twice;
  fp_model_loss(m, tokens.data(), 2, 8, &once);
  fp_model_loss(m, tokens.data(), 2, 8, &twice);
  fp_model_loss(m, tokens.data(), 2, 8, &twice);
  auto a = slots(m, once), b = slots(m, twice);
  for (size_t k = 0; k < a.size(); ++k) {
    ASSERT_EQ(a[k].g->size(), b[k].g->size()) << a[k].name;
    for (size_t i = 0; i < a[k].g->size(); ++i)
      ASSERT_NEAR((*b[k].g)[i], 2 * (*a[k].g)[i], 1e-5 * (1 + std::fabs((*a[k].g)[i])))
          << a[k].name << " " << i;
  }
}

// ---------------------------------------------------------------- I/O

bool same_model(const FpModel& a, const FpModel& b) {
  if (a.embed != b.embed || a.final_norm != b.final_norm || a.lm_head != b.lm_head) return false;
  if (a.layers.size() != b.layers.size()) return false;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const auto &x = a.layers[l], &y = b.layers[l];
    if (x.input_norm != y.input_norm || x.post_norm != y.post_norm || x.w != y.w ||
        x.bias != y.bias)
      return false;
  }
  return a.config.to_json() == b.config.to_json();
}

TEST(FpModelIo, LoadWriteLoadIsExact) {
  TempDir tmp("qcal_fpm_");
  for (const char* type : {"llama", "qwen2", "tied"}) {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      const bool tied = type == std::string("tied");
      ModelConfig c = tiny_config(tied ? "llama" : type, tied);
      c.torch_dtype = dt;
      const std::string name = std::string(type) + "_" + dtype_name(dt);
      FpModel a = load_or_die(synth_dir(tmp, name, c));
      ASSERT_EQ(a.layers.size(), 2u);
      Status s = write_fp_model(a, tmp.sub(name + "_out"), false);
      ASSERT_TRUE(s.is_ok()) << s.to_string();
      FpModel b = load_or_die(tmp.sub(name + "_out"));
      EXPECT_TRUE(same_model(a, b)) << name;
      // The written checkpoint is a valid FP model in the storage dtype, with the
      // same tensor set as the synthetic one (tied: no lm_head).
      auto md = ModelDir::open(tmp.sub(name + "_out"));
      auto ref = ModelDir::open(tmp.sub(name));
      ASSERT_TRUE(md.is_ok() && ref.is_ok());
      EXPECT_TRUE((*md)->validate_fp_model().is_ok());
      EXPECT_EQ((*md)->tensor_names(), (*ref)->tensor_names()) << name;
      for (const std::string& t : (*md)->tensor_names()) EXPECT_EQ((*md)->find(t)->dtype, dt);
      // Refuses to replace an existing directory unless asked.
      s = write_fp_model(a, tmp.sub(name + "_out"), false);
      EXPECT_EQ(s.code(), Code::kInvalidInput);
      EXPECT_TRUE(write_fp_model(a, tmp.sub(name + "_out"), true).is_ok());
    }
  }
}

TEST(FpModelIo, WriteRejectsInconsistentModels) {
  TempDir tmp("qcal_fpm_");
  FpModel m = load_or_die(synth_dir(tmp, "m", tiny_config()));
  FpModel bad = m;
  bad.layers[1].w[kUp].pop_back();
  Status s = write_fp_model(bad, tmp.sub("bad"), false);
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_NE(s.message().find("mlp.up_proj"), std::string::npos) << s.message();
  bad = m;
  bad.layers.pop_back();
  EXPECT_EQ(write_fp_model(bad, tmp.sub("bad"), false).code(), Code::kInvalidInput);
  EXPECT_FALSE(path_exists(tmp.sub("bad")));
}

// ---------------------------------------------------------------- grammar

TEST(Grammar, DeterministicSequencesStartWithBos) {
  GrammarStats st;
  const int64_t n = 200, T = 128;
  const std::vector<int32_t> a = grammar_sequences(n, T, 4, &st);
  ASSERT_EQ(a.size(), static_cast<size_t>(n * T));
  EXPECT_EQ(a, grammar_sequences(n, T, 4));
  EXPECT_NE(a, grammar_sequences(n, T, 5));
  // Sequence i depends only on (seed, i).
  const std::vector<int32_t> prefix = grammar_sequences(3, T, 4);
  EXPECT_TRUE(std::equal(prefix.begin(), prefix.end(), a.begin()));
  std::map<int32_t, int64_t> freq;
  for (int64_t s = 0; s < n; ++s) {
    EXPECT_EQ(a[static_cast<size_t>(s * T)], kGrammarBos);
    for (int64_t t = 1; t < T; ++t) {
      const int32_t x = a[static_cast<size_t>(s * T + t)];
      ASSERT_GT(x, kGrammarEos);  // no PAD / BOS / EOS inside
      ASSERT_LT(x, kGrammarVocab);
      freq[x]++;
    }
  }
  // A broad vocabulary but a low entropy: the language is predictable.
  EXPECT_GT(freq.size(), 200u);
  std::printf("grammar: %zu distinct tokens, generator NLL %.4f nats (ppl %.3f)\n", freq.size(),
              st.optimal_nll, st.optimal_ppl);
  EXPECT_EQ(st.predicted, n * (T - 1));
  EXPECT_GT(st.optimal_ppl, 2.0);
  EXPECT_LT(st.optimal_ppl, 10.0);
  double unigram = 0;  // the unigram entropy is far above the generator's
  int64_t total = 0;
  for (auto& [tok, k] : freq) total += k;
  for (auto& [tok, k] : freq) unigram -= double(k) / total * std::log(double(k) / total);
  EXPECT_GT(unigram, st.optimal_nll + 1.5);
  EXPECT_TRUE(grammar_sequences(0, T, 1).empty());
  EXPECT_TRUE(grammar_sequences(4, 1, 1).empty());
}

TEST(Grammar, U32FileLoadsBack) {
  TempDir tmp("qcal_fpm_");
  const std::vector<int32_t> a = grammar_sequences(5, 64, 9);
  ASSERT_TRUE(write_tokens_u32(tmp.sub("g.u32"), a).is_ok());
  auto seqs = load_token_sequences(tmp.sub("g.u32"), 64, kGrammarVocab);
  ASSERT_TRUE(seqs.is_ok()) << seqs.status().to_string();
  EXPECT_EQ(seqs->count(), 5);
  EXPECT_EQ(seqs->tokens, a);
  EXPECT_EQ(write_tokens_u32(tmp.sub("bad.u32"), {1, -3}).code(), Code::kInvalidInput);
}

// ---------------------------------------------------------------- outlier injection

TEST(InjectOutliers, ReproducesSynthInjectionOnAnExistingModel) {
  TempDir tmp("qcal_fpm_");
  for (const char* type : {"llama", "qwen2"}) {
    const ModelConfig c = tiny_config(type);
    const OutlierOptions o{3, 4, 2, 20.0};
    const std::string plain = synth_dir(tmp, std::string(type) + "_plain", c, 5);
    const std::string synth_inj = synth_dir(tmp, std::string(type) + "_synth", c, 5, o);
    const std::string inj = tmp.sub(std::string(type) + "_inj");
    Status s = inject_outliers(plain, o, 5, inj);
    ASSERT_TRUE(s.is_ok()) << s.to_string();
    auto a = ModelDir::open(inj);
    auto b = ModelDir::open(synth_inj);
    auto p = ModelDir::open(plain);
    ASSERT_TRUE(a.is_ok() && b.is_ok() && p.is_ok());
    ASSERT_EQ((*a)->tensor_names(), (*b)->tensor_names());
    for (const std::string& name : (*a)->tensor_names()) {
      auto x = (*a)->read_f32(name);
      auto y = (*b)->read_f32(name);
      ASSERT_TRUE(x.is_ok() && y.is_ok());
      // Equal to synth's up to the one extra float rounding of the input.
      for (size_t i = 0; i < x->data.size(); ++i)
        ASSERT_NEAR(x->data[i], y->data[i], 2.5e-7 * std::fabs(y->data[i])) << name << " " << i;
      // Untouched tensors are the input's bytes.
      const SafetensorsFile *fa = nullptr, *fp = nullptr;
      const TensorInfo* ta = (*a)->find(name, &fa);
      const TensorInfo* tp = (*p)->find(name, &fp);
      const bool touched = fa->raw(*ta) != fp->raw(*tp);
      bool expect_touched = name.find("proj.weight") != std::string::npos;
      if (name.find("layernorm.weight") != std::string::npos) expect_touched = true;
      if (name.find("v_proj.bias") != std::string::npos) expect_touched = true;
      EXPECT_EQ(touched, expect_touched) << name;
    }
    // The channels are synth's, recorded in the metadata.
    auto ch = outlier_channels((*a)->config(), o, 5);
    ASSERT_TRUE(ch.is_ok());
    auto f = SafetensorsFile::open(inj + "/model.safetensors");
    ASSERT_TRUE(f.is_ok());
    auto info = nlohmann::json::parse((*f)->header().metadata.at("qcal.outliers"));
    EXPECT_EQ(info["outliers"]["up_channels"].get<std::vector<int64_t>>(), ch->up);
    EXPECT_EQ(info["seed"].get<uint64_t>(), 5u);
    EXPECT_TRUE(path_exists(inj + "/generation_config.json"));
    // The function is unchanged.
    FpModel m0 = load_or_die(plain), m1 = load_or_die(inj);
    const std::vector<int32_t> tokens = random_tokens(2 * 16, c.vocab_size, 1);
    const auto z0 = fp_model_logits(m0, tokens.data(), 2, 16);
    const auto z1 = fp_model_logits(m1, tokens.data(), 2, 16);
    double max_abs = 0, max_diff = 0;
    for (size_t i = 0; i < z0.size(); ++i) {
      max_abs = std::max(max_abs, std::fabs(double(z0[i])));
      max_diff = std::max(max_diff, std::fabs(double(z0[i]) - z1[i]));
    }
    EXPECT_LE(max_diff, 1e-4 * max_abs) << type;
  }
}

TEST(InjectOutliers, RejectsBadRequests) {
  TempDir tmp("qcal_fpm_");
  const std::string plain = synth_dir(tmp, "plain", tiny_config());
  EXPECT_EQ(inject_outliers(plain, OutlierOptions{0, 0, 0, 20}, 1, tmp.sub("o")).code(),
            Code::kInvalidInput);
  Status s = inject_outliers(plain, OutlierOptions{65, 0, 0, 20}, 1, tmp.sub("o"));
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_NE(s.message().find("norm_channels"), std::string::npos) << s.message();
  EXPECT_EQ(inject_outliers(plain, OutlierOptions{1, 0, 0, -1}, 1, tmp.sub("o")).code(),
            Code::kInvalidInput);
  EXPECT_FALSE(path_exists(tmp.sub("o")));
  EXPECT_EQ(inject_outliers(plain, OutlierOptions{1, 1, 1, 20}, 1, plain).code(),
            Code::kInvalidInput);  // exists
  EXPECT_NE(
      inject_outliers(tmp.sub("missing"), OutlierOptions{1, 1, 1, 20}, 1, tmp.sub("o")).code(),
      Code::kOk);
}

// ---------------------------------------------------------------- committed fixtures

std::string fixture(const std::string& rel) {
  return std::string(QCAL_SOURCE_DIR) + "/tests/fixtures/" + rel;
}

// Per-channel max |x| at the input of each projection, over all layers.
std::map<std::string, std::vector<std::vector<double>>> input_absmax(const LlamaModel& m,
                                                                     const TokenSequences& s) {
  std::map<std::string, std::vector<std::vector<double>>> out;
  auto x = m.embed(s, 0, s.count());
  EXPECT_TRUE(x.is_ok());
  if (!x.is_ok()) return out;
  for (int64_t l = 0; l < m.config().num_hidden_layers; ++l) {
    auto w = m.load_layer(l);
    EXPECT_TRUE(w.is_ok());
    if (!w.is_ok()) return out;
    block_forward(m.config(), *w, x->ptr(), s.count(), s.seqlen,
                  [&](const std::string& proj, const float* a, int64_t rows, int64_t in) {
                    std::vector<double> mx(static_cast<size_t>(in), 0.0);
                    for (int64_t r = 0; r < rows; ++r)
                      for (int64_t j = 0; j < in; ++j)
                        mx[j] = std::max(mx[j], std::fabs(double(a[r * in + j])));
                    out[proj].push_back(mx);
                  });
  }
  return out;
}

double max_over_median(std::vector<double> v) {
  const double mx = *std::max_element(v.begin(), v.end());
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return mx / v[v.size() / 2];
}

TEST(Fixtures, GrammarTinyModelsArePredictiveAndOutlierHeavy) {
  const std::string plain = fixture("grammar-tiny"), heavy = fixture("grammar-tiny-outlier");
  ASSERT_TRUE(path_exists(plain + "/config.json"))
      << "missing fixture " << plain << " (tools/make_fixtures.sh)";
  ASSERT_TRUE(path_exists(heavy + "/config.json")) << "missing fixture " << heavy;
  auto a = LlamaModel::open(plain);
  auto b = LlamaModel::open(heavy);
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  const ModelConfig& c = (*a)->config();
  EXPECT_LE(c.num_parameters(), 2'000'000);
  EXPECT_EQ(c.vocab_size, kGrammarVocab);
  EXPECT_EQ(c.intermediate_size % 32, 0);
  // Both load as FpModels too.
  FpModel fa = load_or_die(plain);
  EXPECT_EQ(static_cast<int64_t>(fa.layers.size()), c.num_hidden_layers);

  auto eval = load_token_sequences(fixture("grammar-data/eval.u32"), 128, c.vocab_size, 16);
  ASSERT_TRUE(eval.is_ok()) << eval.status().to_string();
  auto calib = load_token_sequences(fixture("grammar-data/calib.u32"), 128, c.vocab_size);
  ASSERT_TRUE(calib.is_ok()) << calib.status().to_string();
  EXPECT_GE(calib->count(), 64);
  for (int64_t s = 0; s < eval->count(); ++s) EXPECT_EQ(eval->seq(s)[0], kGrammarBos);

  auto ra = evaluate(**a, *eval);
  auto rb = evaluate(**b, *eval);
  ASSERT_TRUE(ra.is_ok() && rb.is_ok());
  std::printf("fixture ppl on %lld eval sequences: plain %.4f, outlier %.4f (V = %lld)\n",
              static_cast<long long>(eval->count()), ra->ppl, rb->ppl,
              static_cast<long long>(c.vocab_size));
  EXPECT_LT(ra->ppl, 0.1 * static_cast<double>(c.vocab_size));
  EXPECT_LT(ra->ppl, 10.0);
  EXPECT_NEAR(rb->ppl, ra->ppl, 0.01 * ra->ppl);  // the injection preserves the function

  // The outlier variant: at the inputs the injection targets, in every layer, its
  // channels (recorded in the checkpoint's metadata) carry α times the plain
  // model's activations and stand at ≥ 10x the median channel; the plain model's
  // are flat there, except at the down_proj inputs, already spiky (SwiGLU).
  auto f = SafetensorsFile::open(heavy + "/model.safetensors");
  ASSERT_TRUE(f.is_ok());
  const auto info = nlohmann::json::parse((*f)->header().metadata.at("qcal.outliers"));
  const double alpha = info["outliers"]["alpha"].get<double>();
  const auto norm_ch = info["outliers"]["norm_channels"].get<std::vector<int64_t>>();
  const auto up_ch = info["outliers"]["up_channels"].get<std::vector<int64_t>>();
  std::vector<int64_t> o_ch;  // o_proj inputs fed by the v channels (every query head of the group)
  const int64_t d = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  for (int64_t j : info["outliers"]["v_channels"].get<std::vector<int64_t>>())
    for (int64_t h = (j / d) * group; h < (j / d + 1) * group; ++h) o_ch.push_back(h * d + j % d);
  EXPECT_GE(alpha, 10.0);
  TokenSequences few = *eval;
  few.tokens.resize(static_cast<size_t>(4 * 128));
  auto ma = input_absmax(**a, few);
  auto mb = input_absmax(**b, few);
  struct Site {
    const char* proj;
    const std::vector<int64_t>* channels;
  };
  for (const Site& site : {Site{"self_attn.q_proj", &norm_ch}, Site{"mlp.up_proj", &norm_ch},
                           Site{"mlp.down_proj", &up_ch}, Site{"self_attn.o_proj", &o_ch}}) {
    const char* proj = site.proj;
    ASSERT_FALSE(site.channels->empty()) << proj;
    ASSERT_EQ(mb[proj].size(), static_cast<size_t>(c.num_hidden_layers)) << proj;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const std::vector<double>&pa = ma[proj][l], &pb = mb[proj][l];
      std::vector<double> sorted = pb;
      std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
      const double median = sorted[sorted.size() / 2];
      std::vector<double> ratios;
      for (int64_t j : *site.channels) {
        ratios.push_back(pb[j] / median);
        EXPECT_NEAR(pb[j] / pa[j], alpha, 0.05 * alpha) << proj << " layer " << l << " ch " << j;
      }
      std::sort(ratios.begin(), ratios.end());
      std::printf(
          "  layer %lld %-17s max/median channel: plain %5.1f, outlier %6.1f; injected "
          "channels / median %.1f .. %.1f\n",
          static_cast<long long>(l), proj, max_over_median(pa), max_over_median(pb), ratios.front(),
          ratios.back());
      EXPECT_GE(max_over_median(pb), 10.0) << proj << " layer " << l;
      if (std::string(proj) != "mlp.down_proj") {
        EXPECT_LT(max_over_median(pa), 8.0) << proj << " layer " << l;
      }
      // down_proj: some up channels of the trained model are nearly dead (their
      // α-fold activation stays small), so only the largest one must stand out.
      const bool down = std::string(proj) == "mlp.down_proj";
      EXPECT_GE(down ? ratios.back() : ratios[ratios.size() / 2], 10.0) << proj << " layer " << l;
    }
  }
}

}  // namespace
// The sink fixture (train-lm --sink-init): as predictive as the plain one, and
// most of its attention lands on BOS (layers 0 and 1 above all), where the plain
// fixture's stays at the uniform level (~0.03) in every layer.
TEST(Fixtures, GrammarSinkModelHasAttentionSinks) {
  const std::string sink = fixture("grammar-sink"), plain = fixture("grammar-tiny");
  ASSERT_TRUE(path_exists(sink + "/config.json"))
      << "missing fixture " << sink << " (tools/make_fixtures.sh)";
  auto m = LlamaModel::open(sink);
  auto p = LlamaModel::open(plain);
  ASSERT_TRUE(m.is_ok() && p.is_ok());
  const ModelConfig& c = (*m)->config();
  EXPECT_LE(c.num_parameters(), 2'000'000);
  auto eval = load_token_sequences(fixture("grammar-data/eval.u32"), 128, c.vocab_size, 16);
  ASSERT_TRUE(eval.is_ok()) << eval.status().to_string();
  auto r = evaluate(**m, *eval);
  ASSERT_TRUE(r.is_ok());
  EXPECT_LT(r->ppl, 10.0);
  auto share = attention_sink_share(**m, *eval, 8);
  auto base = attention_sink_share(**p, *eval, 8);
  ASSERT_TRUE(share.is_ok() && base.is_ok());
  ASSERT_EQ(share->size(), static_cast<size_t>(c.num_hidden_layers));
  std::printf("grammar-sink: ppl %.4f; sink share per layer:", r->ppl);
  double mean = 0;
  for (size_t l = 0; l < share->size(); ++l) {
    std::printf(" %.3f (plain %.3f)", (*share)[l], (*base)[l]);
    EXPECT_GE((*share)[l], 0.05) << "layer " << l;  // uniform attention: 0.035
    EXPECT_LT((*base)[l], 0.1) << "layer " << l;
    mean += (*share)[l] / static_cast<double>(share->size());
  }
  std::printf("\n");
  EXPECT_GE((*share)[0], 0.8);
  EXPECT_GE((*share)[1], 0.4);
  EXPECT_GE(mean, 0.3);
}

}  // namespace qcal::calib

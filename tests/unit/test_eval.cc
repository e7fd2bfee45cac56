// Evaluation on tiny models written to a temporary directory, against values
// derivable by hand: a model against itself has KL 0 and top-1 agreement 1
// exactly; all-equal logits give ppl == V; KL and NLL recomputed here in double
// from model_logits. Letters: S sequences, T seqlen, H hidden, V vocab.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "kernels/ops.h"
#include "tests/unit/test_util.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"

namespace qcal {
namespace {

ModelConfig tiny_config() { return qcal::testing::small_config(128, 97); }

// Writes a random FP checkpoint of `c`; weights ~ N(0, 1/in) times `scale`
// for layer `perturb_layer` (so two seeds-equal models differ only there), and
// an all-zero lm_head when `zero_head`.
Status write_model(const std::string& dir, const ModelConfig& c, uint64_t seed,
                   int64_t perturb_layer = -1, bool zero_head = false) {
  Rng rng(seed);
  const int64_t H = c.hidden_size, V = c.vocab_size;
  std::vector<std::pair<std::string, Tensor>> ts;
  auto randn = [&](std::vector<int64_t> shape, double sd, double mean) {
    Tensor t(std::move(shape));
    for (float& x : t.data) x = static_cast<float>(mean + sd * rng.normal());
    return t;
  };
  ts.emplace_back("model.embed_tokens.weight", randn({V, H}, 1.0, 0.0));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    const double k = l == perturb_layer ? 1.5 : 1.0;
    ts.emplace_back(p + "input_layernorm.weight", randn({H}, 0.1, 1.0));
    ts.emplace_back(p + "post_attention_layernorm.weight", randn({H}, 0.1, 1.0));
    for (const char* name : kProjNames) {
      const std::vector<int64_t> s = proj_shape(c, name);
      ts.emplace_back(p + name + ".weight", randn(s, k / std::sqrt(double(s[1])), 0.0));
    }
  }
  ts.emplace_back("model.norm.weight", randn({H}, 0.1, 1.0));
  ts.emplace_back("lm_head.weight", randn({V, H}, zero_head ? 0.0 : 1.0 / std::sqrt(H), 0.0));

  std::filesystem::create_directories(dir);
  QCAL_RETURN_IF_ERROR(write_file_atomic(join_path(dir, "config.json"), c.to_json().dump(2)));
  SafetensorsWriter w(join_path(dir, "model.safetensors"));
  for (const auto& [name, t] : ts) w.add(name, DType::kF32, t.shape);
  QCAL_RETURN_IF_ERROR(w.begin());
  for (const auto& [name, t] : ts) QCAL_RETURN_IF_ERROR(w.write_f32(t.ptr(), t.data.size()));
  return w.finish();
}

TokenSequences random_tokens(int64_t count, int64_t T, int64_t V, uint64_t seed) {
  Rng rng(seed);
  TokenSequences s;
  s.seqlen = T;
  for (int64_t i = 0; i < count * T; ++i) s.tokens.push_back(static_cast<int32_t>(rng.below(V)));
  return s;
}

class Eval : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qcal_test_eval_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  std::unique_ptr<LlamaModel> make(const std::string& name, uint64_t seed,
                                   int64_t perturb_layer = -1, bool zero_head = false,
                                   ModelConfig c = tiny_config()) {
    const std::string dir = join_path(root_, name);
    Status s = write_model(dir, c, seed, perturb_layer, zero_head);
    EXPECT_TRUE(s.is_ok()) << s.to_string();
    auto m = LlamaModel::open(dir);
    EXPECT_TRUE(m.is_ok()) << m.status().to_string();
    return m.is_ok() ? std::move(m).value() : nullptr;
  }
  std::string root_;
};

TEST_F(Eval, ModelAgainstItselfIsExact) {
  auto a = make("a", 1);
  auto a2 = LlamaModel::open(join_path(root_, "a"));  // a second instance of the same files
  ASSERT_TRUE(a && a2.is_ok());
  const TokenSequences data = random_tokens(5, 12, 97, 3);
  for (const LlamaModel* fp : {a.get(), a2->get()}) {
    auto r = evaluate(*a, data, fp, /*batch=*/2);
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    EXPECT_EQ(r->sequences, 5);
    EXPECT_EQ(r->tokens, 5 * 11);
    EXPECT_EQ(r->ppl, std::exp(r->nll));
    ASSERT_TRUE(r->kl && r->top1_agree && r->fp_ppl);
    EXPECT_EQ(*r->kl, 0.0);
    EXPECT_EQ(*r->top1_agree, 1.0);
    EXPECT_EQ(*r->fp_ppl, r->ppl);
    EXPECT_GT(r->ppl, 1.0);
  }
}

TEST_F(Eval, AllEqualLogitsGivePplV) {
  auto m = make("uniform", 2, -1, /*zero_head=*/true);
  ASSERT_TRUE(m);
  auto r = evaluate(*m, random_tokens(3, 9, 97, 4), nullptr, 8);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  std::printf("  uniform: ppl %.9g (V = 97), nll %.9g (log V = %.9g)\n", r->ppl, r->nll,
              std::log(97.0));
  EXPECT_NEAR(r->nll, std::log(97.0), 1e-6);
  EXPECT_NEAR(r->ppl, 97.0, 97.0 * 1e-6);
  EXPECT_FALSE(r->kl || r->top1_agree || r->fp_ppl);
}

TEST_F(Eval, PerturbedModelMatchesHandComputedKlAndNll) {
  auto fp = make("fp", 7);
  auto q = make("q", 7, /*perturb_layer=*/1);
  ASSERT_TRUE(fp && q);
  const int64_t S = 4, T = 10, V = 97;
  const TokenSequences data = random_tokens(S, T, V, 5);
  auto r = evaluate(*q, data, fp.get(), 3);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  ASSERT_TRUE(r->kl && r->top1_agree && r->fp_ppl);

  // By hand: fp32 logits of both, log-softmax and KL in double, target t+1.
  auto lq = model_logits(*q, data, 0, S);
  auto lf = model_logits(*fp, data, 0, S);
  ASSERT_TRUE(lq.is_ok() && lf.is_ok());
  std::vector<double> pq(lq->data.begin(), lq->data.end()), pf(lf->data.begin(), lf->data.end());
  log_softmax_rows_ref(pq.data(), S * T, V);
  log_softmax_rows_ref(pf.data(), S * T, V);
  double nll = 0, fp_nll = 0, kl = 0;
  int64_t agree = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t row = (s * T + t) * V;
      const int32_t next = data.seq(s)[t + 1];
      nll -= pq[row + next];
      fp_nll -= pf[row + next];
      int64_t aq = 0, af = 0;
      for (int64_t v = 0; v < V; ++v) {
        kl += std::exp(pf[row + v]) * (pf[row + v] - pq[row + v]);
        if (pq[row + v] > pq[row + aq]) aq = v;
        if (pf[row + v] > pf[row + af]) af = v;
      }
      agree += aq == af;
    }
  const double n = static_cast<double>(S * (T - 1));
  std::printf(
      "  perturbed: kl %.6g (hand %.6g), top1 %.4f (hand %.4f), ppl %.6g (hand %.6g), "
      "fp_ppl %.6g (hand %.6g)\n",
      *r->kl, kl / n, *r->top1_agree, agree / n, r->ppl, std::exp(nll / n), *r->fp_ppl,
      std::exp(fp_nll / n));
  EXPECT_GT(*r->kl, 1e-3);
  EXPECT_NEAR(*r->kl, kl / n, 1e-5 + 1e-4 * kl / n);
  EXPECT_NEAR(r->nll, nll / n, 1e-5);
  EXPECT_NEAR(std::log(*r->fp_ppl), fp_nll / n, 1e-5);
  EXPECT_NEAR(*r->top1_agree, agree / n, 1e-12);
  EXPECT_LE(*r->top1_agree, 1.0);
  EXPECT_NE(r->ppl, *r->fp_ppl);
}

TEST_F(Eval, BatchSizeDoesNotChangeTheResult) {
  auto fp = make("fp", 8);
  auto q = make("q", 8, 0);
  ASSERT_TRUE(fp && q);
  const TokenSequences data = random_tokens(5, 7, 97, 6);
  auto r1 = evaluate(*q, data, fp.get(), 1);
  ASSERT_TRUE(r1.is_ok());
  for (int64_t b : {2, 5, 64}) {
    auto r = evaluate(*q, data, fp.get(), b);
    ASSERT_TRUE(r.is_ok());
    EXPECT_NEAR(r->nll, r1->nll, 1e-6) << "batch " << b;
    EXPECT_NEAR(*r->kl, *r1->kl, 1e-6) << "batch " << b;
    EXPECT_EQ(r->tokens, r1->tokens);
  }
}

TEST_F(Eval, RejectsBadInputs) {
  auto m = make("m", 9);
  ModelConfig other = tiny_config();
  other.vocab_size = 101;
  auto o = make("other_vocab", 9, -1, false, other);
  ASSERT_TRUE(m && o);
  EXPECT_EQ(evaluate(*m, random_tokens(2, 1, 97, 1)).status().code(), Code::kInvalidInput);
  EXPECT_EQ(evaluate(*m, TokenSequences{}).status().code(), Code::kInvalidInput);
  EXPECT_EQ(evaluate(*m, random_tokens(2, 4, 97, 1), nullptr, 0).status().code(),
            Code::kInvalidInput);
  EXPECT_EQ(evaluate(*m, random_tokens(2, 4, 97, 1), o.get()).status().code(), Code::kInvalidInput);
  TokenSequences out_of_vocab = random_tokens(2, 4, 97, 1);
  out_of_vocab.tokens[6] = 97;
  EXPECT_EQ(evaluate(*m, out_of_vocab).status().code(), Code::kInvalidInput);
}

TEST(EvalResult, JsonKeys) {
  EvalResult r;
  r.nll = std::log(2.0);
  r.ppl = 2.0;
  r.tokens = 30;
  r.sequences = 3;
  auto keys = [](const nlohmann::json& j) {
    std::set<std::string> k;
    for (auto it = j.begin(); it != j.end(); ++it) k.insert(it.key());
    return k;
  };
  EXPECT_EQ(keys(r.to_json()), (std::set<std::string>{"ppl", "nll", "tokens", "sequences"}));
  r.kl = 0.5;
  r.top1_agree = 0.75;
  r.fp_ppl = 1.5;
  nlohmann::json j = r.to_json();
  EXPECT_EQ(keys(j), (std::set<std::string>{"ppl", "nll", "tokens", "sequences", "kl", "top1_agree",
                                            "fp_ppl"}));
  EXPECT_EQ(j["tokens"], 30);
  EXPECT_EQ(j["kl"], 0.5);
  EXPECT_EQ(j["top1_agree"], 0.75);
}

}  // namespace
}  // namespace qcal

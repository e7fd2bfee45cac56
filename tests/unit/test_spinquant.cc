// labels: unit
// SpinQuant (worker/calib/methods/spinquant.cc, methods.md §4) on a small synthetic
// LLaMA with outlier channels (H 64, I 192, 2 layers, 4 heads of 16, 2 KV heads):
// with 0 steps it deploys QuaRot's rotations bit for bit (the same checkpoint bytes,
// RTN and GPTQ weights, online and folded); the learned R1/R2 stay orthogonal in
// fp64 and move away from the initialization; the held-out selection keeps the
// best-scoring rotations, reports them, and falls back to the initial (QuaRot) ones
// when learning does not help on the held-out sequences, again bit for bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kernels/hadamard.h"
#include "tests/unit/test_util.h"
#include "worker/calib/block.h"
#include "worker/calib/method.h"
#include "worker/engine/synth.h"
#include "worker/local_runner.h"

namespace qcal::calib {
namespace {

constexpr int64_t kT = 32;  // tokens per sequence

struct Fixture {
  testing::TempDir dir{"qcal_spin_"};
  std::string model_dir;
  ModelConfig config;
  TokenSequences calib;
};

Fixture& fx() {
  static Fixture* f = [] {
    auto* f = new Fixture;
    SynthOptions o;
    o.config = qcal::testing::small_config(192, 256, 2);
    o.seed = 7;
    o.outliers.norm_channels = 2;
    o.outliers.up_channels = 2;
    o.outliers.alpha = 20;
    f->config = o.config;
    f->model_dir = f->dir.sub("m");
    Status st = synth_model(o, f->model_dir);
    if (!st.is_ok()) {
      std::fprintf(stderr, "synth_model: %s\n", st.to_string().c_str());
      std::abort();
    }
    f->calib = {kT, synth_tokens(12 * kT, o.config.vocab_size, 11)};
    return f;
  }();
  return *f;
}

Recipe recipe(const std::string& t, int w, int a, int kv, const std::string& solver = "rtn") {
  Recipe r;
  r.with("transform", t).with("w_bits", w).with("a_bits", a).with("kv_bits", kv);
  r.with("weight_solver", solver).with("seed", 3);
  return r;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The checkpoint (model.safetensors: every weight, scale and online transform) of
// `r` calibrated on `calib`, as bytes.
std::string checkpoint(const Recipe& r, const TokenSequences& calib, const std::string& name) {
  const Fixture& f = fx();
  const std::string out = f.dir.sub(name);
  auto rep = qcal::calibrate_to_dir(f.model_dir, calib, r, out, "native", true);
  EXPECT_TRUE(rep.is_ok()) << name << ": " << rep.status().to_string();
  return read_bytes(out + "/model.safetensors");
}

// max |R·Rᵀ − I| in fp64 for R (n×n).
double orthogonality_error(const std::vector<double>& R, int64_t n) {
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < n; ++k) s += R[i * n + k] * R[j * n + k];
      worst = std::max(worst, std::fabs(s - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

TEST(SpinQuant, ZeroStepsDeployQuaRotBitForBit) {
  const Fixture& f = fx();
  struct Case {
    int w, a, kv;
    std::string solver;
  };
  for (const Case& c : {Case{4, 4, 4, "rtn"}, Case{4, 4, 4, "gptq"}, Case{4, 16, 4, "gptq"},
                        Case{4, 16, 16, "rtn"}}) {
    const std::string tag = "w" + std::to_string(c.w) + "a" + std::to_string(c.a) + "kv" +
                            std::to_string(c.kv) + "-" + c.solver;
    SCOPED_TRACE(tag);
    Recipe spin = recipe("spinquant", c.w, c.a, c.kv, c.solver);
    spin.with("spin_steps", 0);
    const std::string q =
        checkpoint(recipe("quarot", c.w, c.a, c.kv, c.solver), f.calib, "quarot-" + tag);
    const std::string s = checkpoint(spin, f.calib, "spin0-" + tag);
    ASSERT_GT(q.size(), 1000u);
    EXPECT_TRUE(q == s) << "spinquant with 0 steps differs from quarot (" << q.size() << " vs "
                        << s.size() << " bytes)";
  }
}

TEST(SpinQuant, LearnedRotationsStayOrthogonalAndMove) {
  const Fixture& f = fx();
  const TransformMethod* m = transform_method("spinquant");
  ASSERT_NE(m, nullptr);
  Recipe r = recipe("spinquant", 4, 4, 4);
  r.with("spin_steps", 12).with("spin_holdout", 0).with("spin_bsz", 2);
  WholeModelInputs in;
  in.model_dir = f.model_dir;
  in.calib = &f.calib;
  in.r = &r;
  nlohmann::json rep;
  auto fitted = m->learn(in, &rep);
  ASSERT_TRUE(fitted.is_ok()) << fitted.status().to_string();
  const int64_t H = f.config.hidden_size, d = f.config.head_dim;
  const Fitted& ft = fitted.value();
  ASSERT_TRUE(ft.has("R1"));
  ASSERT_EQ(ft.at("R1").size(), static_cast<size_t>(H * H));
  const double e1 = orthogonality_error(ft.at("R1"), H);
  const double moved1 = max_abs_diff(ft.at("R1"), random_hadamard_matrix(H, r.seed()));
  std::printf("R1: |R Rᵀ − I| %.3g, moved %.3g from the random Hadamard\n", e1, moved1);
  EXPECT_LT(e1, 1e-10);
  EXPECT_GT(moved1, 1e-3);  // learning happened: the check is not on the initial matrix
  for (int64_t l = 0; l < f.config.num_hidden_layers; ++l) {
    const std::string k = "R2." + std::to_string(l);
    ASSERT_TRUE(ft.has(k));
    ASSERT_EQ(ft.at(k).size(), static_cast<size_t>(d * d));
    const double e2 = orthogonality_error(ft.at(k), d);
    const double moved2 = max_abs_diff(ft.at(k), hadamard_matrix(d));
    std::printf("%s: |R Rᵀ − I| %.3g, moved %.3g\n", k.c_str(), e2, moved2);
    EXPECT_LT(e2, 1e-10);
    EXPECT_GT(moved2, 1e-4);
  }
  ASSERT_EQ(rep["spin_loss"].size(), 12u);
  for (const auto& x : rep["spin_loss"]) EXPECT_TRUE(std::isfinite(x.get<double>()));
  EXPECT_FALSE(rep.contains("spin_heldout"));  // holdout 0: nothing scored, the last kept
}

// The held-out rule: scored before the first step, every tenth of the run and after
// the last; a step is "significant" only below the initial loss; the kept step is
// the arg-min of the significant ones, else 0; the report says whether it fell back.
void check_selection(const nlohmann::json& rep, int64_t steps) {
  ASSERT_TRUE(rep.contains("spin_heldout"));
  const auto& h = rep["spin_heldout"];
  ASSERT_EQ(h.size(), 11u);
  const double init = h[0]["loss"].get<double>();
  EXPECT_FALSE(h[0]["significant"].get<bool>());
  int64_t arg = 0;
  double best = init;
  for (size_t i = 0; i < h.size(); ++i) {
    const int64_t step = h[i]["step"].get<int64_t>();
    const double loss = h[i]["loss"].get<double>();
    EXPECT_EQ(step, static_cast<int64_t>(i) * (steps / 10));
    EXPECT_TRUE(std::isfinite(loss));
    if (!h[i]["significant"].get<bool>()) continue;
    EXPECT_LT(loss, init) << "step " << step;
    if (loss < best) best = loss, arg = step;
  }
  EXPECT_EQ(rep["spin_kept_step"].get<int64_t>(), arg);
  EXPECT_EQ(rep["spin_fallback"].get<bool>(), arg == 0);
}

TEST(SpinQuant, HeldOutSelectionKeepsTheBestAndReportsIt) {
  const Fixture& f = fx();
  Recipe r = recipe("spinquant", 4, 4, 4);
  r.with("spin_steps", 10).with("spin_holdout", 4).with("spin_bsz", 2);
  WholeModelInputs in;
  in.model_dir = f.model_dir;
  in.calib = &f.calib;
  in.r = &r;
  nlohmann::json rep;
  auto fitted = transform_method("spinquant")->learn(in, &rep);
  ASSERT_TRUE(fitted.is_ok()) << fitted.status().to_string();
  std::printf("held-out: %s, kept step %lld\n", rep["spin_heldout"].dump().c_str(),
              static_cast<long long>(rep.value("spin_kept_step", -1)));
  check_selection(rep, 10);
}

// With every quantizer off the model is invariant under the rotations: learning
// cannot lower the held-out loss, the rule keeps the initialization and says so, and
// the checkpoint is QuaRot's, byte for byte.
TEST(SpinQuant, FallbackToTheInitialRotationsFiresAndIsQuaRot) {
  const Fixture& f = fx();
  Recipe r = recipe("spinquant", 16, 16, 16);
  r.with("spin_steps", 10).with("spin_holdout", 4).with("spin_bsz", 2);
  const std::string out = f.dir.sub("spin-fallback");
  auto res = qcal::calibrate_to_dir(f.model_dir, f.calib, r, out, "native", true);
  ASSERT_TRUE(res.is_ok()) << res.status().to_string();
  const nlohmann::json& rep = res.value();
  ASSERT_TRUE(rep.contains("learn")) << rep.dump();
  ASSERT_EQ(rep["learn"].size(), 1u) << rep["learn"].dump();
  const nlohmann::json& learn = rep["learn"].begin().value();
  std::printf("held-out: %s\n", learn["spin_heldout"].dump().c_str());
  check_selection(learn, 10);
  EXPECT_TRUE(learn["spin_fallback"].get<bool>());
  EXPECT_EQ(learn["spin_kept_step"].get<int64_t>(), 0);
  EXPECT_TRUE(read_bytes(out + "/model.safetensors") ==
              checkpoint(recipe("quarot", 16, 16, 16), f.calib, "quarot-fallback"))
      << "the fallback did not deploy QuaRot's rotations";
}

}  // namespace
}  // namespace qcal::calib

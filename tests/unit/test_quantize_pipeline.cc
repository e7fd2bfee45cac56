// The in-process quantization job end to end (worker/local_runner.h, the same
// tasks as the service): a synthetic model with outliers, RTN vs GPTQ, both
// formats, and the failure paths (nothing half-written).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "common/fsutil.h"
#include "worker/calib/native_eval.h"
#include "worker/engine/eval.h"
#include "worker/engine/qformats.h"
#include "worker/engine/synth.h"
#include "worker/local_runner.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;

class QuantizePipeline : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(fs::temp_directory_path() / ("qcal_pipe_" + std::to_string(::getpid())));
    fs::create_directories(*dir_);
    SynthOptions o;
    ModelConfig& c = o.config;
    c.hidden_size = 128;
    c.intermediate_size = 256;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 32;
    c.vocab_size = 256;
    o.seed = 3;
    o.outliers.norm_channels = 2;
    o.outliers.alpha = 10;
    ASSERT_TRUE(synth_model(o, model()).is_ok());
    TokenSequences all;
    all.seqlen = 64;
    all.tokens = synth_tokens(64 * 48, c.vocab_size, 11);
    calib_ = new TokenSequences{64, {all.tokens.begin(), all.tokens.begin() + 64 * 32}};
    eval_ = new TokenSequences{64, {all.tokens.begin() + 64 * 32, all.tokens.end()}};
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
    delete calib_;
    delete eval_;
  }
  static std::string model() { return *dir_ + "/m"; }
  static std::string out(const std::string& name) { return *dir_ + "/" + name; }

  static Recipe opts(const char* solver, int bits, int64_t group) {
    Recipe r;
    r.with("weight_solver", solver).with("w_bits", bits).with("w_group", group);
    return r;
  }
  static Result<nlohmann::json> quantize(const std::string& model, const Recipe& r,
                                         const std::string& out,
                                         const std::string& format = "gptq") {
    return calibrate_to_dir(model, *calib_, r, out, format, false);
  }
  static EvalResult eval(const std::string& dir) {
    auto fp = LlamaModel::open(model());
    auto q = LlamaModel::open(dir);
    EXPECT_TRUE(fp.is_ok() && q.is_ok());
    auto r = evaluate(**q, *eval_, fp->get());
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    return *r;
  }

  static std::string* dir_;
  static TokenSequences* calib_;
  static TokenSequences* eval_;
};
std::string* QuantizePipeline::dir_ = nullptr;
TokenSequences* QuantizePipeline::calib_ = nullptr;
TokenSequences* QuantizePipeline::eval_ = nullptr;

TEST_F(QuantizePipeline, GptqBeatsRtnPerLayerAndInKl) {
  auto rtn = quantize(model(), opts("rtn", 4, 64), out("rtn"));
  ASSERT_TRUE(rtn.is_ok()) << rtn.status().to_string();
  auto gptq = quantize(model(), opts("gptq", 4, 64), out("gptq"));
  ASSERT_TRUE(gptq.is_ok()) << gptq.status().to_string();
  // GPTQ reports each block's output error on the quantized path (the last block's
  // output feeds nothing, so it has none).
  ASSERT_EQ((*gptq)["layers"].size(), 2u);
  const double g = (*gptq)["layers"][0]["rel_output_error"].get<double>();
  std::printf("layer 0: rel output error gptq %.4g\n", g);
  EXPECT_TRUE(std::isfinite(g));
  EXPECT_GT(g, 0.0);
  EXPECT_LT(g, 0.05);
  EvalResult er = eval(out("rtn")), eg = eval(out("gptq"));
  std::printf("KL rtn %.5f gptq %.5f; ppl fp %.3f rtn %.3f gptq %.3f\n", *er.kl, *eg.kl, *er.fp_ppl,
              er.ppl, eg.ppl);
  EXPECT_LT(*eg.kl, *er.kl);
  EXPECT_GT(*er.kl, 0.0);
}

TEST_F(QuantizePipeline, EightBitRtnIsNearLossless) {
  auto r = quantize(model(), opts("rtn", 8, -1), out("rtn8"));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EvalResult e = eval(out("rtn8"));
  std::printf("8-bit RTN: kl %.3g top1 %.4f ppl %.4f fp %.4f\n", *e.kl, *e.top1_agree, e.ppl,
              *e.fp_ppl);
  EXPECT_LT(*e.kl, 1e-3);
  EXPECT_GT(*e.top1_agree, 0.98);
  EXPECT_NEAR(e.ppl / *e.fp_ppl, 1.0, 0.01);
}

TEST_F(QuantizePipeline, CompressedTensorsHoldsTheSameWeightsAsGptq) {
  ASSERT_TRUE(quantize(model(), opts("gptq", 4, 64), out("g2")).is_ok());
  ASSERT_TRUE(quantize(model(), opts("gptq", 4, 64), out("ct2"), "compressed-tensors").is_ok());
  auto a = ModelDir::open(out("g2"));
  auto b = ModelDir::open(out("ct2"));
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  for (const char* proj : kProjNames) {
    std::string p = layer_prefix(1) + proj;
    auto wa = read_linear_weight(**a, p);
    auto wb = read_linear_weight(**b, p);
    ASSERT_TRUE(wa.is_ok() && wb.is_ok()) << p;
    ASSERT_EQ(wa->data, wb->data) << p;
  }
}

// Weight-only FlatQuant with flat_fold learns only what folds (the diagonals, V's
// per-head transform): its GPTQ checkpoint is a plain LLaMA (changed norms, nothing
// online) that evaluates as its native form does, and it beats GPTQ alone.
TEST_F(QuantizePipeline, FoldedFlatQuantIsAPlainGptqCheckpoint) {
  Recipe r = opts("gptq", 4, 64);
  r.with("transform", "flatquant").with("flat_fold", true).with("epochs", 4);
  auto g = quantize(model(), r, out("ffold"));
  ASSERT_TRUE(g.is_ok()) << g.status().to_string();
  ASSERT_TRUE(quantize(model(), r, out("ffold-native"), "native").is_ok());
  ASSERT_TRUE(quantize(model(), opts("gptq", 4, 64), out("ffold-gptq")).is_ok());
  auto fp = ModelDir::open(model());
  auto q = ModelDir::open(out("ffold"));
  ASSERT_TRUE(fp.is_ok() && q.is_ok());
  // The diagonal ca went into the input norm.
  const std::string norm = layer_prefix(0) + "input_layernorm.weight";
  auto n0 = (*fp)->read_f32(norm);
  auto n1 = (*q)->read_f32(norm);
  ASSERT_TRUE(n0.is_ok() && n1.is_ok());
  double moved = 0;
  for (size_t j = 0; j < n0->data.size(); ++j)
    moved = std::max(moved, std::fabs(static_cast<double>(n1->data[j]) - n0->data[j]) /
                                std::fabs(static_cast<double>(n0->data[j])));
  EXPECT_GT(moved, 0.01);
  EvalResult eg = eval(out("ffold")), ep = eval(out("ffold-gptq"));
  auto native = calib::open_eval_model(out("ffold-native"));
  auto fpm = LlamaModel::open(model());
  ASSERT_TRUE(native.is_ok() && fpm.is_ok()) << native.status().to_string();
  const LlamaEvalModel fpe(**fpm);
  auto enr = evaluate_stream(**native, &fpe, *eval_);
  ASSERT_TRUE(enr.is_ok()) << enr.status().to_string();
  const EvalResult& en = *enr;
  std::printf("KL folded flatquant + gptq: gptq format %.6f native %.6f; gptq alone %.6f\n", *eg.kl,
              *en.kl, *ep.kl);
  EXPECT_TRUE(std::isfinite(*eg.kl));
  EXPECT_NEAR(*eg.kl, *en.kl, 1e-3 * *en.kl);
  EXPECT_LT(*eg.kl, *ep.kl);
}

TEST_F(QuantizePipeline, RefusalsLeaveNothingBehind) {
  // compressed-tensors cannot hold 3-bit weights: refused before any work.
  auto r = quantize(model(), opts("rtn", 3, 64), out("bad3"), "compressed-tensors");
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_FALSE(path_exists(out("bad3")));
  // Quantizing an already-quantized checkpoint is refused with the reason.
  ASSERT_TRUE(quantize(model(), opts("rtn", 4, 64), out("q4")).is_ok());
  auto again = quantize(out("q4"), opts("rtn", 4, 64), out("qq"));
  ASSERT_FALSE(again.is_ok());
  EXPECT_NE(again.status().message().find("already quantized"), std::string::npos);
  EXPECT_FALSE(path_exists(out("qq")));
  for (const auto& e : fs::directory_iterator(*dir_)) {
    EXPECT_EQ(e.path().string().find(".partial."), std::string::npos) << e.path();
    EXPECT_EQ(e.path().string().find(".qcal-store."), std::string::npos) << e.path();
  }
}

}  // namespace
}  // namespace qcal

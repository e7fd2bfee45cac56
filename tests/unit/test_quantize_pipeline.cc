// The in-process quantization job end to end through the library: a
// synthetic model with outliers, RTN vs GPTQ, both formats, and the failure
// paths (nothing half-written).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "common/fsutil.h"
#include "worker/engine/eval.h"
#include "worker/engine/quantize.h"
#include "worker/engine/synth.h"

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

  static QuantizeOptions opts(WeightMethod m, int bits, int64_t group) {
    QuantizeOptions o;
    o.method = m;
    o.spec.bits = bits;
    o.spec.group_size = group;
    return o;
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
  auto rtn = quantize_model(model(), *calib_, opts(WeightMethod::kRtn, 4, 64), out("rtn"));
  ASSERT_TRUE(rtn.is_ok()) << rtn.status().to_string();
  auto gptq = quantize_model(model(), *calib_, opts(WeightMethod::kGptq, 4, 64), out("gptq"));
  ASSERT_TRUE(gptq.is_ok()) << gptq.status().to_string();
  ASSERT_EQ(rtn->layers.size(), 2u);
  for (size_t l = 0; l < rtn->layers.size(); ++l) {
    double r = rtn->layers[l].rel_output_error, g = gptq->layers[l].rel_output_error;
    std::printf("layer %zu: rel output error rtn %.4g gptq %.4g (ratio %.3f)\n", l, r, g, g / r);
    EXPECT_TRUE(std::isfinite(r) && std::isfinite(g));
    EXPECT_GT(r, 0.0);
    EXPECT_LT(g, 0.9 * r) << "GPTQ should clearly beat RTN at layer " << l;
  }
  EvalResult er = eval(out("rtn")), eg = eval(out("gptq"));
  std::printf("KL rtn %.5f gptq %.5f; ppl fp %.3f rtn %.3f gptq %.3f\n", *er.kl, *eg.kl,
              *er.fp_ppl, er.ppl, eg.ppl);
  EXPECT_LT(*eg.kl, *er.kl);
  EXPECT_GT(*er.kl, 0.0);
}

TEST_F(QuantizePipeline, EightBitRtnIsNearLossless) {
  auto r = quantize_model(model(), *calib_, opts(WeightMethod::kRtn, 8, -1), out("rtn8"));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EvalResult e = eval(out("rtn8"));
  std::printf("8-bit RTN: kl %.3g top1 %.4f ppl %.4f fp %.4f\n", *e.kl, *e.top1_agree, e.ppl,
              *e.fp_ppl);
  EXPECT_LT(*e.kl, 1e-3);
  EXPECT_GT(*e.top1_agree, 0.98);
  EXPECT_NEAR(e.ppl / *e.fp_ppl, 1.0, 0.01);
}

TEST_F(QuantizePipeline, CompressedTensorsHoldsTheSameWeightsAsGptq) {
  QuantizeOptions o = opts(WeightMethod::kGptq, 4, 64);
  ASSERT_TRUE(quantize_model(model(), *calib_, o, out("g2")).is_ok());
  o.write.format = CheckpointFormat::kCompressedTensors;
  ASSERT_TRUE(quantize_model(model(), *calib_, o, out("ct2")).is_ok());
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

TEST_F(QuantizePipeline, RefusalsLeaveNothingBehind) {
  // compressed-tensors cannot hold 3-bit weights: refused before any work.
  QuantizeOptions o = opts(WeightMethod::kRtn, 3, 64);
  o.write.format = CheckpointFormat::kCompressedTensors;
  auto r = quantize_model(model(), *calib_, o, out("bad3"));
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_FALSE(path_exists(out("bad3")));
  // Quantizing an already-quantized checkpoint is refused with the reason.
  ASSERT_TRUE(quantize_model(model(), *calib_, opts(WeightMethod::kRtn, 4, 64), out("q4")).is_ok());
  auto again = quantize_model(out("q4"), *calib_, opts(WeightMethod::kRtn, 4, 64), out("qq"));
  ASSERT_FALSE(again.is_ok());
  EXPECT_NE(again.status().message().find("already quantized"), std::string::npos);
  EXPECT_FALSE(path_exists(out("qq")));
  for (const auto& e : fs::directory_iterator(*dir_))
    EXPECT_EQ(e.path().string().find(".partial."), std::string::npos) << e.path();
}

}  // namespace
}  // namespace qcal

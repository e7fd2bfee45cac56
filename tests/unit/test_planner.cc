// The planner: DAG shapes (window, sequential vs parallel), the memory
// estimate and its refusal message, and every input check, on a tiny
// synthetic model written to a temporary directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/plan.h"
#include "coordinator/planner.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;

// H 64, I 128, L 4, 4 heads of 16 (2 KV heads), V 256.
constexpr int64_t kH = 64, kI = 128, kL = 4, kV = 256;

class Planner : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string tmpl = (fs::temp_directory_path() / "qcal_planner_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = new std::string(tmpl);
    SynthOptions o;
    o.config.hidden_size = kH;
    o.config.intermediate_size = kI;
    o.config.num_hidden_layers = kL;
    o.config.num_attention_heads = 4;
    o.config.num_key_value_heads = 2;
    o.config.head_dim = 16;
    o.config.vocab_size = kV;
    ASSERT_TRUE(synth_model(o, path("model")).is_ok());
    auto tokens = synth_tokens(64 * 40, kV, 5);
    ASSERT_TRUE(write_tokens_jsonl(path("calib.jsonl"), tokens, 64).is_ok());
    ASSERT_TRUE(write_tokens_jsonl(path("eval.jsonl"), tokens, 64).is_ok());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string path(const std::string& name) { return *dir_ + "/" + name; }

  // A calibration recipe (job_spec.h), output format auto.
  static JobSpec calib_spec(const nlohmann::json& recipe) {
    JobSpec s = spec();
    s.recipe.calib = recipe;
    s.output.format = "auto";
    return s;
  }
  static JobSpec spec() {
    JobSpec s;
    s.model = path("model");
    s.calib.path = path("calib.jsonl");
    s.calib.nsamples = 16;
    s.calib.seqlen = 64;
    s.output.path = path("out/w4");
    return s;
  }
  static Plan plan_ok(const JobSpec& s, PlannerLimits limits = {}) {
    auto p = plan_job(s, limits);
    EXPECT_TRUE(p.is_ok()) << p.status().to_string();
    return p.is_ok() ? std::move(p).value() : Plan{};
  }
  static Status plan_err(const JobSpec& s, PlannerLimits limits = {}) {
    auto p = plan_job(s, limits);
    EXPECT_FALSE(p.is_ok());
    return p.status();
  }

  static std::string* dir_;
};
std::string* Planner::dir_ = nullptr;

std::vector<std::string> ids(const Plan& p) {
  std::vector<std::string> out;
  for (const auto& t : p.tasks) out.push_back(t.id);
  return out;
}

TEST_F(Planner, SequentialWindowOneIsAChain) {
  Plan p = plan_ok(spec());
  ASSERT_EQ(ids(p),
            (std::vector<std::string>{"capture", "calibrate-0000", "calibrate-0001",
                                      "calibrate-0002", "calibrate-0003", "assemble", "validate"}));
  EXPECT_EQ(p.tasks[0].type, plan::kCapture);
  EXPECT_TRUE(p.tasks[0].deps.empty());
  for (int w = 0; w < kL; ++w) {
    const TaskDef& t = p.tasks[1 + w];
    EXPECT_EQ(t.type, plan::kCalibrate);
    EXPECT_EQ(t.params["layer_begin"], w);
    EXPECT_EQ(t.params["layer_end"], w + 1);
    EXPECT_FALSE(t.params.contains("fp_inputs"));
    EXPECT_EQ(t.deps, std::vector<std::string>{p.tasks[w].id});  // the previous task
  }
  EXPECT_EQ(p.tasks[5].type, plan::kAssemble);
  EXPECT_EQ(p.tasks[5].deps, (std::vector<std::string>{"calibrate-0000", "calibrate-0001",
                                                       "calibrate-0002", "calibrate-0003"}));
  EXPECT_EQ(p.tasks[6].type, plan::kValidate);
  EXPECT_EQ(p.tasks[6].deps, std::vector<std::string>{"assemble"});
  for (const auto& t : p.tasks) EXPECT_GT(t.mem_bytes, 0u) << t.id;
  EXPECT_EQ(p.summary["tasks"], 7);
  EXPECT_EQ(p.summary["layers"], kL);
  EXPECT_TRUE(p.summary["estimates"].contains("calibrate-0002"));
}

TEST_F(Planner, WindowTwoAndARaggedLastWindow) {
  JobSpec s = spec();
  s.recipe.window = 2;
  Plan p = plan_ok(s);
  ASSERT_EQ(ids(p), (std::vector<std::string>{"capture", "calibrate-0000", "calibrate-0001",
                                              "assemble", "validate"}));
  EXPECT_EQ(p.tasks[1].params["layer_begin"], 0);
  EXPECT_EQ(p.tasks[1].params["layer_end"], 2);
  EXPECT_EQ(p.tasks[2].params["layer_begin"], 2);
  EXPECT_EQ(p.tasks[2].params["layer_end"], 4);
  EXPECT_EQ(p.tasks[2].deps, std::vector<std::string>{"calibrate-0000"});

  s.recipe.window = 3;  // [0, 3) and [3, 4)
  p = plan_ok(s);
  ASSERT_EQ(p.tasks.size(), 5u);
  EXPECT_EQ(p.tasks[2].params["layer_begin"], 3);
  EXPECT_EQ(p.tasks[2].params["layer_end"], 4);
  // Three layers' weights in the first window, one in the second.
  EXPECT_GT(p.tasks[1].mem_bytes, p.tasks[2].mem_bytes);
}

TEST_F(Planner, ParallelCalibratesDependOnCaptureOnly) {
  JobSpec s = spec();
  s.recipe.mode = "parallel";
  Plan p = plan_ok(s);
  ASSERT_EQ(p.tasks.size(), 7u);
  EXPECT_EQ(p.tasks[0].params["fp_inputs"], true);
  for (int w = 0; w < kL; ++w) {
    const TaskDef& t = p.tasks[1 + w];
    EXPECT_EQ(t.deps, std::vector<std::string>{"capture"}) << t.id;
    EXPECT_EQ(t.params["fp_inputs"], true);
    EXPECT_EQ(t.params["layer_begin"], w);
  }
  EXPECT_EQ(p.tasks[5].deps.size(), 4u);
}

TEST_F(Planner, MemoryEstimateFollowsTheModel) {
  JobSpec s = spec();
  Plan p = plan_ok(s);
  const uint64_t N = 16, T = 64;
  const uint64_t x = N * T * kH * 4;
  const auto& est = p.summary["estimates"]["calibrate-0000"];
  EXPECT_EQ(est["activations"].get<uint64_t>(), 4 * x);
  // Block params: q 64x64, k/v 32x64 each, o 64x64, gate/up/down 128x64; norms 2x64.
  const uint64_t params = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64;
  EXPECT_EQ(est["weights"].get<uint64_t>(), params * 4 * 2);
  EXPECT_EQ(est["Hessian"].get<uint64_t>(), uint64_t{kI} * kI * 4);  // down_proj input
  EXPECT_EQ(p.tasks[1].mem_bytes, est["total"].get<uint64_t>());

  s.recipe.method = "rtn";  // no Hessian
  p = plan_ok(s);
  EXPECT_FALSE(p.summary["estimates"]["calibrate-0000"].contains("Hessian"));
}

TEST_F(Planner, RefusesAPlanThatDoesNotFitWithTheNumbers) {
  JobSpec s = spec();
  s.calib.nsamples = 4096;  // 4096·64·64·4 = 64 MiB per activation tensor
  PlannerLimits limits;
  limits.worker_memory_bytes = 100ull << 20;
  Status st = plan_err(s, limits);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  const std::string& m = st.message();
  EXPECT_NE(m.find("calibrate-0000 needs "), std::string::npos) << m;
  EXPECT_NE(m.find("activations 256.0 MiB"), std::string::npos) << m;
  EXPECT_NE(m.find("weights "), std::string::npos) << m;
  EXPECT_NE(m.find("Hessian 64.0 KiB"), std::string::npos) << m;
  EXPECT_NE(m.find("but workers have 100.0 MiB"), std::string::npos) << m;
  EXPECT_NE(m.find("lower calib.nsamples or calib.seqlen"), std::string::npos) << m;

  limits.worker_memory_bytes = 1ull << 30;  // fits
  EXPECT_TRUE(plan_job(s, limits).is_ok());
}

TEST_F(Planner, FormatBytes) {
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(3ull << 20), "3.0 MiB");
  EXPECT_EQ(format_bytes(uint64_t(41.2 * (1ull << 30))), "41.2 GiB");
}

TEST_F(Planner, MissingFiles) {
  JobSpec s = spec();
  s.model = path("nope");
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kNotFound) << st.to_string();
  EXPECT_EQ(st.message().rfind("model: ", 0), 0u) << st.message();

  s = spec();
  s.calib.path = path("missing.jsonl");
  st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kNotFound);
  EXPECT_NE(st.message().find("calib.path: " + path("missing.jsonl") + " does not exist"),
            std::string::npos)
      << st.message();

  s = spec();
  s.eval = DataSpec{path("missing-eval.u32"), 0, 64};
  st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kNotFound);
  EXPECT_NE(st.message().find("eval.path"), std::string::npos) << st.message();

  s = spec();
  s.calib.path = path("model/config.json");  // exists, wrong kind
  st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find(".jsonl or .u32"), std::string::npos) << st.message();

  s = spec();
  s.eval = DataSpec{path("eval.jsonl"), 0, 64};
  Plan p = plan_ok(s);
  EXPECT_TRUE(p.summary["estimates"]["validate"].contains("activations"));
}

TEST_F(Planner, OutputPathChecks) {
  JobSpec s = spec();
  s.output.path = path("model");  // exists (and is the model)
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("is the model directory"), std::string::npos) << st.message();

  fs::create_directories(path("existing"));
  s.output.path = path("existing");
  st = plan_err(s);
  EXPECT_NE(st.message().find("exists (set output.overwrite"), std::string::npos) << st.message();
  s.output.overwrite = true;
  EXPECT_TRUE(plan_job(s, {}).is_ok());

  s.output.path = path("calib.jsonl/under-a-file");
  st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("is not a directory"), std::string::npos) << st.message();

  s = spec();
  s.output.path = path("deep/er/out");  // parents that can be created
  EXPECT_TRUE(plan_job(s, {}).is_ok());
}

TEST_F(Planner, QuantizedInputModelIsRefused) {
  const std::string q = path("quantized");
  fs::create_directories(q);
  for (const auto& e : fs::directory_iterator(path("model")))
    fs::copy(e.path(), q / e.path().filename());
  auto cfg = nlohmann::json::parse(std::ifstream(q + "/config.json"));
  cfg["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
  std::ofstream(q + "/config.json") << cfg.dump();
  JobSpec s = spec();
  s.model = q;
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("already quantized"), std::string::npos) << st.message();
}

TEST_F(Planner, CompressedTensorsWithThreeBitsIsRefused) {
  JobSpec s = spec();
  s.output.format = "compressed-tensors";
  s.recipe.w_bits = 3;
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("output.format compressed-tensors"), std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("4 or 8 bits"), std::string::npos) << st.message();

  s.recipe.w_bits = 4;
  EXPECT_TRUE(plan_job(s, {}).is_ok());
}

TEST_F(Planner, GptqPackingOfAnOddShapeIsRefused) {
  // 3-bit GPTQ needs dimensions that are multiples of 32: 64/128 are, so take
  // a model whose KV width (2 heads of 8 = 16) is not.
  SynthOptions o;
  o.config.hidden_size = 32;
  o.config.intermediate_size = 64;
  o.config.num_hidden_layers = 1;
  o.config.num_attention_heads = 4;
  o.config.num_key_value_heads = 2;
  o.config.head_dim = 8;
  o.config.vocab_size = kV;
  ASSERT_TRUE(synth_model(o, path("odd")).is_ok());
  JobSpec s = spec();
  s.model = path("odd");
  s.recipe.w_bits = 3;
  s.recipe.group_size = -1;
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("self_attn.k_proj"), std::string::npos) << st.message();
}

TEST_F(Planner, UnsupportedMethodNamesTheTable) {
  JobSpec s = spec();
  s.recipe.method = "awq";
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_EQ(st.message(),
            "recipe.method: method awq is not supported by this server (supported: rtn, gptq)");
  ASSERT_NE(find_method("gptq"), nullptr);
  EXPECT_TRUE(find_method("gptq")->uses_hessian);
  EXPECT_EQ(find_method("spinquant"), nullptr);
}

TEST_F(Planner, OverlapNeedsACrossBlockMethod) {
  JobSpec s = spec();
  s.recipe.window = 2;
  s.recipe.overlap = 1;
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("recipe.overlap"), std::string::npos) << st.message();
}

// ---- Calibration recipes (common/plan.h: calib → validate; capture → cbq-window-… →
// assemble → validate).

std::vector<std::string> deps_of(const Plan& p, const std::string& id) {
  for (const auto& t : p.tasks)
    if (t.id == id) return t.deps;
  ADD_FAILURE() << "no task " << id;
  return {};
}

TEST_F(Planner, CbqWindowsTwoOverlapOneAreAChain) {
  // L 4, window 2, overlap 1: blocks (0, 1), (1, 2), (2, 3); window w finalizes block w
  // (the last one all of them).
  JobSpec s = calib_spec({{"weight_solver", "lora-rounding"},
                          {"w_bits", 2},
                          {"w_group", 32},
                          {"reconstruction", "cbq"},
                          {"cbq_window", 2},
                          {"cbq_overlap", 1}});
  Plan p = plan_ok(s);
  ASSERT_EQ(ids(p), (std::vector<std::string>{"capture", "cbq-window-0000", "cbq-window-0001",
                                              "cbq-window-0002", "assemble", "validate"}));
  EXPECT_EQ(p.tasks[0].type, plan::kCapture);
  EXPECT_TRUE(p.tasks[0].deps.empty());
  EXPECT_EQ(p.tasks[0].params["cbq"], true);
  const int64_t first[] = {0, 1, 2}, last[] = {1, 2, 3}, fin[] = {0, 1, 3};
  for (int w = 0; w < 3; ++w) {
    const TaskDef& t = p.tasks[1 + w];
    SCOPED_TRACE(t.id);
    EXPECT_EQ(t.type, plan::kCbqWindow);
    EXPECT_EQ(t.params["window"], w);
    EXPECT_EQ(t.params["first"], first[w]);
    EXPECT_EQ(t.params["last"], last[w]);
    EXPECT_EQ(t.params["finalize_last"], fin[w]);
    // The setup, and (after window 0) the previous window's state.
    if (w == 0) {
      EXPECT_EQ(t.deps, std::vector<std::string>{"capture"});
    } else {
      EXPECT_EQ(t.deps, (std::vector<std::string>{"capture", p.tasks[w].id}));
    }
  }
  EXPECT_EQ(p.tasks[4].type, plan::kAssemble);
  EXPECT_EQ(deps_of(p, "assemble"),
            (std::vector<std::string>{"capture", "cbq-window-0000", "cbq-window-0001",
                                      "cbq-window-0002"}));
  EXPECT_EQ(deps_of(p, "validate"), std::vector<std::string>{"assemble"});
  for (const auto& t : p.tasks) EXPECT_GT(t.mem_bytes, 0u) << t.id;
  EXPECT_EQ(p.summary["windows"], 3);
  EXPECT_EQ(p.summary["window"], 2);
  EXPECT_EQ(p.summary["overlap"], 1);
  EXPECT_EQ(p.summary["format"], "native");
  EXPECT_EQ(p.summary["reconstruction"], "cbq");
  EXPECT_EQ(p.summary["recipe"]["w_group"], 32);
  EXPECT_EQ(p.summary["tasks"], 6);
  // A window holds more than the whole FP model (the setup) plus its blocks.
  EXPECT_GT(p.summary["estimates"]["cbq-window-0001"]["weights"].get<uint64_t>(),
            p.summary["estimates"]["validate"]["weights"].get<uint64_t>() / 2);
}

TEST_F(Planner, PerBlockReconstructionIsOneWindowPerBlock) {
  JobSpec s = calib_spec({{"w_bits", 4}, {"a_bits", 4}, {"reconstruction", "block"}});
  Plan p = plan_ok(s);
  ASSERT_EQ(ids(p), (std::vector<std::string>{"capture", "cbq-window-0000", "cbq-window-0001",
                                              "cbq-window-0002", "cbq-window-0003", "assemble",
                                              "validate"}));
  for (int w = 0; w < kL; ++w) {
    const TaskDef& t = p.tasks[1 + w];
    EXPECT_EQ(t.params["first"], w) << t.id;
    EXPECT_EQ(t.params["last"], w) << t.id;
    EXPECT_EQ(t.params["finalize_last"], w) << t.id;
    EXPECT_EQ(t.deps.back(), p.tasks[w].id) << t.id;
  }
  EXPECT_EQ(deps_of(p, "assemble").size(), 5u);
  EXPECT_EQ(p.summary["windows"], 4);
}

TEST_F(Planner, CalibrationWithoutReconstructionIsOneTask) {
  // W4A8 QuaRot leaves online Hadamards: native.
  Plan p = plan_ok(calib_spec({{"transform", "quarot"}, {"w_bits", 4}, {"a_bits", 8}}));
  ASSERT_EQ(ids(p), (std::vector<std::string>{"calib", "validate"}));
  EXPECT_EQ(p.tasks[0].type, plan::kCalib);
  EXPECT_TRUE(p.tasks[0].deps.empty());
  EXPECT_EQ(p.tasks[0].params["format"], "native");
  EXPECT_EQ(p.tasks[1].deps, std::vector<std::string>{"calib"});
  EXPECT_EQ(p.summary["format"], "native");
  EXPECT_FALSE(p.summary.contains("windows"));
  // W4A16 QuaRot folds completely: auto writes GPTQ.
  p = plan_ok(calib_spec({{"transform", "quarot"}, {"w_bits", 4}, {"w_group", 32}}));
  EXPECT_EQ(p.tasks[0].params["format"], "gptq");
}

TEST_F(Planner, CalibrationRecipeErrorsNameTheField) {
  Status st = plan_err(calib_spec({{"a_bits", 5}}));
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_EQ(st.message().rfind("recipe.a_bits: ", 0), 0u) << st.message();

  // Needs the model: 48 does not divide hidden 64.
  st = plan_err(calib_spec({{"w_group", 48}, {"a_bits", 8}}));
  EXPECT_EQ(st.message().rfind("recipe.w_group: ", 0), 0u) << st.message();

  // Formats the recipe cannot be written as.
  JobSpec s = calib_spec({{"w_bits", 4}, {"a_bits", 4}});
  s.output.format = "gptq";
  st = plan_err(s);
  EXPECT_EQ(st.message().rfind("output.format: gptq", 0), 0u) << st.message();
  s = calib_spec({{"w_bits", 2}, {"w_group", 32}, {"reconstruction", "cbq"}});
  s.output.format = "compressed-tensors";
  st = plan_err(s);
  EXPECT_NE(st.message().find("reconstruction recipe writes the native format"), std::string::npos)
      << st.message();
  s.output.format = "native";
  EXPECT_TRUE(plan_job(s, {}).is_ok());

  // The shared checks still run.
  s = calib_spec({{"a_bits", 8}});
  s.calib.path = path("missing.jsonl");
  EXPECT_EQ(plan_err(s).code(), Code::kNotFound);
}

TEST_F(Planner, CbqWindowThatDoesNotFitIsRefusedWithTheNumbers) {
  JobSpec s = calib_spec({{"w_bits", 2}, {"w_group", 32}, {"reconstruction", "cbq"}});
  s.calib.nsamples = 4096;  // 64 MiB per activation tensor
  PlannerLimits limits;
  limits.worker_memory_bytes = 200ull << 20;
  Status st = plan_err(s, limits);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_EQ(st.message().rfind("cbq-window-", 0), 0u) << st.message();
  EXPECT_NE(st.message().find("activations 448.0 MiB"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("lower calib.nsamples or calib.seqlen"), std::string::npos)
      << st.message();
}

}  // namespace
}  // namespace qcal

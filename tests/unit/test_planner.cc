// The planner: DAG shapes (window, sequential vs parallel), the memory
// estimate and its refusal message, and every input check, on a tiny
// synthetic model written to a temporary directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/plan.h"
#include "common/planner.h"
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

  // A recipe (common/recipe.h), output format auto.
  static JobSpec calib_spec(const nlohmann::json& recipe) {
    JobSpec s = spec();
    auto r = recipe_from_json(recipe);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (r.is_ok()) s.recipe = *r;
    EXPECT_TRUE(s.recipe.validate().is_ok()) << s.recipe.validate().to_string();
    return s;
  }
  // The default job: GPTQ W4 g128 (the weight-only form's defaults).
  static JobSpec spec() {
    JobSpec s;
    s.recipe = *recipe_from_json(nlohmann::json::object());
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

std::vector<std::string> deps_of(const Plan& p, const std::string& id) {
  for (const auto& t : p.tasks)
    if (t.id == id) return t.deps;
  ADD_FAILURE() << "no task " << id;
  return {};
}
const TaskDef& task(const Plan& p, const std::string& id) {
  for (const auto& t : p.tasks)
    if (t.id == id) return t;
  ADD_FAILURE() << "no task " << id;
  static TaskDef none;
  return none;
}

TEST_F(Planner, SequentialGptqIsAChainOfBlocks) {
  Plan p = plan_ok(spec());
  ASSERT_EQ(ids(p),
            (std::vector<std::string>{"embed", "quantize-0000", "quantize-0001", "quantize-0002",
                                      "quantize-0003", "assemble", "validate"}));
  EXPECT_EQ(p.tasks[0].type, plan::kEmbed);
  EXPECT_TRUE(p.tasks[0].deps.empty());
  for (int l = 0; l < kL; ++l) {
    const TaskDef& t = p.tasks[1 + l];
    EXPECT_EQ(t.type, plan::kQuantize);
    EXPECT_EQ(t.params["layers"], nlohmann::json({l, l + 1}));
    EXPECT_EQ(t.params["input"], "quantized");
    EXPECT_EQ(t.deps, std::vector<std::string>{p.tasks[l].id});  // the previous task
  }
  EXPECT_EQ(deps_of(p, "assemble"), (std::vector<std::string>{"quantize-0000", "quantize-0001",
                                                              "quantize-0002", "quantize-0003"}));
  EXPECT_EQ(deps_of(p, "validate"), std::vector<std::string>{"assemble"});
  for (const auto& t : p.tasks) EXPECT_GT(t.mem_bytes, 0u) << t.id;
  EXPECT_EQ(p.summary["tasks"], 7);
  EXPECT_EQ(p.summary["critical_path"], 7);
  EXPECT_EQ(p.summary["layers"], kL);
  EXPECT_EQ(p.summary["format"], "gptq");
  EXPECT_GT(p.summary["store_bytes"].get<uint64_t>(), 0u);
  EXPECT_TRUE(p.summary["estimates"].contains("quantize-0002"));
}

TEST_F(Planner, BlocksPerTaskAndARaggedLastTask) {
  JobSpec s = spec();
  s.recipe.with("blocks_per_task", 3);  // [0, 3) and [3, 4)
  Plan p = plan_ok(s);
  ASSERT_EQ(ids(p), (std::vector<std::string>{"embed", "quantize-0000", "quantize-0003", "assemble",
                                              "validate"}));
  EXPECT_EQ(p.tasks[1].params["layers"], nlohmann::json({0, 3}));
  EXPECT_EQ(p.tasks[2].params["layers"], nlohmann::json({3, 4}));
  EXPECT_EQ(p.tasks[2].deps, std::vector<std::string>{"quantize-0000"});
}

TEST_F(Planner, ParallelGptqReadsFpInputsFromTheCapture) {
  JobSpec s = spec();
  s.recipe.with("mode", "parallel");
  Plan p = plan_ok(s);
  ASSERT_EQ(ids(p),
            (std::vector<std::string>{"embed", "capture-0000", "capture-0001", "capture-0002",
                                      "capture-0003", "quantize-0000", "quantize-0001",
                                      "quantize-0002", "quantize-0003", "assemble", "validate"}));
  EXPECT_EQ(deps_of(p, "capture-0000"), std::vector<std::string>{"embed"});
  EXPECT_EQ(deps_of(p, "capture-0002"), std::vector<std::string>{"capture-0001"});
  EXPECT_EQ(deps_of(p, "quantize-0000"), std::vector<std::string>{"embed"});
  EXPECT_EQ(deps_of(p, "quantize-0002"), std::vector<std::string>{"capture-0001"});
  EXPECT_EQ(task(p, "quantize-0002").params["input"], "fp");
}

TEST_F(Planner, RtnNeedsNoDataAndEveryBlockIsIndependent) {
  JobSpec s = spec();
  s.recipe.with("weight_solver", "rtn");
  Plan p = plan_ok(s);
  for (int l = 0; l < kL; ++l) {
    const TaskDef& t = task(p, plan::numbered("quantize", l));
    EXPECT_TRUE(t.deps.empty()) << t.id;
    EXPECT_EQ(t.params["input"], "none");
  }
  EXPECT_EQ(p.summary["critical_path"], 3);  // quantize → assemble → validate
}

TEST_F(Planner, FlatQuantFitsEveryBlockInParallelThenQuantizesInAChain) {
  Plan p = plan_ok(calib_spec(
      {{"transform", "flatquant"}, {"weight_solver", "gptq"}, {"a_bits", 4}, {"kv_bits", 4}}));
  EXPECT_EQ(p.summary["format"], "native");
  for (int l = 0; l < kL; ++l) {
    const std::string f = plan::numbered("flatquant", l);
    EXPECT_EQ(task(p, f).type, plan::kTransform);
    // FP inputs X_l and targets X_{l+1} (and the statistics) from the capture.
    std::vector<std::string> want = {
        l == 0 ? std::string("embed") : plan::numbered("capture", l - 1),
        plan::numbered("capture", l)};
    EXPECT_EQ(deps_of(p, f), want) << f;
    const auto q = deps_of(p, plan::numbered("quantize", l));
    EXPECT_NE(std::find(q.begin(), q.end(), f), q.end());
    EXPECT_GE(task(p, f).params["micro"].get<int64_t>(), 1);
  }
  // Block l's fit starts when the capture reaches it, and its quantize task when both the
  // fit and the previous block's quantize are done: the critical path is the capture
  // chain, the last fit, the last quantize, assemble and validate.
  EXPECT_EQ(p.summary["critical_path"].get<int64_t>(), 1 + kL + 1 + 1 + 2);
}

TEST_F(Planner, MemoryEstimatesDoNotGrowWithTheCalibrationSet) {
  JobSpec s = calib_spec({{"transform", "flatquant"}, {"a_bits", 4}, {"kv_bits", 4}});
  Plan small = plan_ok(s);
  s.calib.nsamples = 40;  // every sequence of the file
  Plan big = plan_ok(s);
  for (const char* id : {"capture-0001", "flatquant-0001", "quantize-0001", "assemble"})
    EXPECT_EQ(task(small, id).mem_bytes, task(big, id).mem_bytes) << id;
  // The embedding task holds the token ids.
  EXPECT_LT(task(small, "embed").mem_bytes, task(big, "embed").mem_bytes);
  const auto& est = big.summary["estimates"]["quantize-0001"];
  EXPECT_TRUE(est.contains("weights"));
  EXPECT_TRUE(est.contains("deploy/reparameterization"));
  EXPECT_FALSE(est.contains("stream/forward"));  // RTN reads no activations
  EXPECT_EQ(task(big, "quantize-0001").mem_bytes, est["total"].get<uint64_t>());
  // GPTQ adds its phases to the quantize tasks: streaming for the Hessians, solving.
  s.recipe.with("weight_solver", "gptq");
  Plan g = plan_ok(s);
  const auto& ge = g.summary["estimates"]["quantize-0001"];
  EXPECT_TRUE(ge.contains("stream/hessian"));
  EXPECT_TRUE(ge.contains("solve/solver"));
  EXPECT_FALSE(est.contains("stream/hessian"));
  // The peak: the parts held throughout plus the largest phase, not the sum of all.
  uint64_t held = 0, all = 0;
  std::map<std::string, uint64_t> phases;
  for (auto it = ge.begin(); it != ge.end(); ++it) {
    if (it.key() == "total") continue;
    const uint64_t b = it.value().get<uint64_t>();
    all += b;
    const size_t slash = it.key().find('/');
    if (slash == std::string::npos) {
      held += b;
    } else {
      phases[it.key().substr(0, slash)] += b;
    }
  }
  uint64_t most = 0;
  for (const auto& [ph, b] : phases) most = std::max(most, b);
  EXPECT_EQ(ge["total"].get<uint64_t>(), held + most);
  EXPECT_LT(ge["total"].get<uint64_t>(), all);
  EXPECT_EQ(phases.size(), 5u) << ge.dump();  // deploy, round, stream, solve, check
}

TEST_F(Planner, RefusesAPlanThatDoesNotFitWithTheNumbers) {
  PlannerLimits limits;
  limits.worker_memory_bytes = 40ull << 20;  // less than the process itself
  Status st = plan_err(spec(), limits);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  const std::string& m = st.message();
  EXPECT_NE(m.find(" needs "), std::string::npos) << m;
  EXPECT_NE(m.find("process 48.0 MiB"), std::string::npos) << m;
  EXPECT_NE(m.find("but workers have 40.0 MiB"), std::string::npos) << m;
  limits.worker_memory_bytes = 1ull << 30;  // fits
  EXPECT_TRUE(plan_job(spec(), limits).is_ok());
}

TEST_F(Planner, RefusesAHoldoutThatLeavesNothingToTrain) {
  // 16 calibration sequences: cbq_holdout 15 trains on one, 16 on none.
  nlohmann::json recipe = {
      {"reconstruction", "cbq"}, {"weight_solver", "gptq"}, {"cbq_holdout", 15}};
  EXPECT_TRUE(plan_job(calib_spec(recipe), {}).is_ok());
  recipe["cbq_holdout"] = 16;
  Status st = plan_err(calib_spec(recipe));
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("recipe.cbq_holdout: 16 held-out sequences leave none of the 16"),
            std::string::npos)
      << st.message();
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
  EXPECT_NE(st.message().find("output exists (set output.overwrite"), std::string::npos)
      << st.message();
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
  s.recipe.with("w_bits", 3);
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("4 or 8"), std::string::npos) << st.message();
  s.recipe.with("w_bits", 4);
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
  s.recipe.with("w_bits", 3).with("w_group", -1);
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("self_attn.k_proj"), std::string::npos) << st.message();
  // The native format holds it.
  s.output.format = "native";
  EXPECT_TRUE(plan_job(s, {}).is_ok());
}

// Issue #14 part 2: a group size that does not divide a linear's input is refused before
// any compute, naming the linear, the sizes and the group sizes that work.
TEST_F(Planner, PartialGroupsAreRefusedWithTheSizesThatWork) {
  JobSpec s = spec();
  s.recipe.with("w_group", 48);  // 64 and 128 are not multiples of 48
  Status st = plan_err(s);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_EQ(st.message().rfind("recipe.w_group: 48 does not divide", 0), 0u) << st.message();
  EXPECT_NE(st.message().find("32 or 64"), std::string::npos) << st.message();
  // The native format holds partial groups.
  s.output.format = "native";
  EXPECT_TRUE(plan_job(s, {}).is_ok());
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
  const int64_t first[] = {0, 1, 2}, last[] = {1, 2, 3}, fin[] = {0, 1, 3};
  for (int w = 0; w < 3; ++w) {
    const TaskDef& t = task(p, plan::numbered("cbq-window", w));
    SCOPED_TRACE(t.id);
    EXPECT_EQ(t.type, plan::kCbqWindow);
    EXPECT_EQ(t.params["window"], w);
    EXPECT_EQ(t.params["first"], first[w]);
    EXPECT_EQ(t.params["last"], last[w]);
    EXPECT_EQ(t.params["finalize_last"], fin[w]);
    // FP inputs of its first block; the previous window's quantized output and state.
    const auto& d = t.deps;
    const std::string fp = first[w] == 0 ? "embed" : plan::numbered("capture", first[w] - 1);
    EXPECT_NE(std::find(d.begin(), d.end(), fp), d.end());
    if (w > 0) {
      EXPECT_NE(std::find(d.begin(), d.end(), plan::numbered("cbq-window", w - 1)), d.end());
    }
  }
  EXPECT_EQ(deps_of(p, "assemble"),
            (std::vector<std::string>{"cbq-window-0000", "cbq-window-0001", "cbq-window-0002"}));
  EXPECT_EQ(p.summary["windows"], 3);
  EXPECT_EQ(p.summary["format"], "gptq");  // a weight-only reconstruction folds
  EXPECT_EQ(p.summary["reconstruction"], "cbq");
  for (const auto& t : p.tasks) EXPECT_GT(t.mem_bytes, 0u) << t.id;
}

TEST_F(Planner, PerBlockReconstructionIsOneWindowPerBlock) {
  JobSpec s = calib_spec({{"w_bits", 4}, {"a_bits", 4}, {"reconstruction", "block"}});
  Plan p = plan_ok(s);
  for (int w = 0; w < kL; ++w) {
    const TaskDef& t = task(p, plan::numbered("cbq-window", w));
    EXPECT_EQ(t.params["first"], w) << t.id;
    EXPECT_EQ(t.params["last"], w) << t.id;
  }
  EXPECT_EQ(p.summary["windows"], 4);
  EXPECT_EQ(p.summary["format"], "native");
}

TEST_F(Planner, WholeModelTasks) {
  Plan p = plan_ok(calib_spec({{"transform", "spinquant"}, {"a_bits", 4}, {"spin_steps", 2}}));
  EXPECT_EQ(task(p, "spinquant").type, plan::kLearn);
  EXPECT_NE(std::find(task(p, "quantize-0000").deps.begin(), task(p, "quantize-0000").deps.end(),
                      "spinquant"),
            task(p, "quantize-0000").deps.end());
  p = plan_ok(calib_spec(
      {{"transform", "quarot"}, {"a_bits", 4}, {"intactkv", true}, {"intactkv_cal", true}}));
  EXPECT_EQ(task(p, "intactkv-cal").type, plan::kLearn);
  const auto ad = deps_of(p, "assemble");
  EXPECT_NE(std::find(ad.begin(), ad.end(), "intactkv-cal"), ad.end());
  // The prefix's states come from the capture (fp inputs off).
  EXPECT_EQ(task(p, "capture-0001").params["fp"], false);
  EXPECT_EQ(task(p, "capture-0001").params["prefix"], true);
}

TEST_F(Planner, RecipeErrorsNameTheField) {
  // Needs the model: FlatQuant cannot split 64 + 2 (hidden 66 would be 2 mod 4); a CBQ
  // window longer than the model.
  Status st = plan_err(calib_spec({{"reconstruction", "cbq"}, {"cbq_window", 9}}));
  EXPECT_EQ(st.message().rfind("recipe.cbq_window: ", 0), 0u) << st.message();
  JobSpec s = calib_spec({{"w_bits", 4}, {"a_bits", 4}});
  s.output.format = "gptq";
  st = plan_err(s);
  EXPECT_EQ(st.message().rfind("output.format: gptq", 0), 0u) << st.message();
  s = calib_spec({{"a_bits", 8}});
  s.calib.path = path("missing.jsonl");
  EXPECT_EQ(plan_err(s).code(), Code::kNotFound);
}

}  // namespace
}  // namespace qcal

// The task runners without Redis: a hand-built sequential DAG (common/plan.h)
// run through run_task must write a checkpoint byte-identical to
// quantize_model with the same recipe; validate applies the gate; the cancel
// flag stops a calibrate task between layers; corrupt inputs name their
// producer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/output_manifest.h"
#include "common/job_spec.h"
#include "common/plan.h"
#include "coordinator/planner.h"
#include "worker/calib/methods.h"
#include "worker/engine/quantize.h"
#include "worker/engine/recipe.h"
#include "worker/engine/synth.h"
#include "worker/tasks.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;

constexpr int64_t kLayers = 3;
constexpr int64_t kSeqlen = 16;
constexpr int64_t kNSamples = 10;

std::string* g_dir = nullptr;

std::string dir() { return *g_dir; }
std::string model_dir() { return dir() + "/model"; }
std::string calib_path() { return dir() + "/calib.jsonl"; }
std::string eval_path() { return dir() + "/eval.jsonl"; }

class TasksEnv : public ::testing::Environment {
 public:
  void SetUp() override {
    g_dir =
        new std::string(fs::temp_directory_path() / ("qcal_tasks_" + std::to_string(::getpid())));
    fs::remove_all(*g_dir);
    fs::create_directories(*g_dir);
    SynthOptions o;
    ModelConfig& c = o.config;
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.num_hidden_layers = kLayers;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 128;
    o.seed = 5;
    o.outliers.norm_channels = 2;
    o.outliers.alpha = 8;
    ASSERT_TRUE(synth_model(o, model_dir()).is_ok());
    ASSERT_TRUE(
        write_tokens_jsonl(calib_path(), synth_tokens(kSeqlen * kNSamples, 128, 21), 37).is_ok());
    ASSERT_TRUE(write_tokens_jsonl(eval_path(), synth_tokens(kSeqlen * 6, 128, 22), 40).is_ok());
  }
  void TearDown() override {
    fs::remove_all(*g_dir);
    delete g_dir;
  }
};
const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new TasksEnv);

nlohmann::json spec_json(const std::string& method, const std::string& out, int64_t window) {
  return {{"model", model_dir()},
          {"recipe", {{"method", method}, {"w_bits", 4}, {"group_size", 32}, {"window", window}}},
          {"calib", {{"path", calib_path()}, {"nsamples", kNSamples}, {"seqlen", kSeqlen}}},
          {"eval", {{"path", eval_path()}, {"seqlen", kSeqlen}}},
          {"output", {{"path", out}}}};
}

JobSpec parse(const nlohmann::json& j) {
  auto s = parse_job_spec(j);
  EXPECT_TRUE(s.is_ok()) << s.status().to_string();
  return *s;
}

// capture → calibrate-… (windows of `window` layers) → assemble → validate.
std::vector<TaskDef> sequential_dag(int64_t window) {
  std::vector<TaskDef> t;
  t.push_back({"capture", plan::kCapture, {}, nlohmann::json::object(), 0});
  std::vector<std::string> cal;
  std::string prev = "capture";
  for (int64_t l = 0; l < kLayers; l += window) {
    char id[32];
    std::snprintf(id, sizeof(id), "calibrate-%04lld", static_cast<long long>(l));
    t.push_back({id,
                 plan::kCalibrate,
                 {prev},
                 {{"layer_begin", l}, {"layer_end", std::min(l + window, kLayers)}},
                 0});
    cal.push_back(id);
    prev = id;
  }
  t.push_back({"assemble", plan::kAssemble, cal, nlohmann::json::object(), 0});
  t.push_back({"validate", plan::kValidate, {"assemble"}, nlohmann::json::object(), 0});
  return t;
}

// Runs every task in order; results by task id.
std::map<std::string, nlohmann::json> run_dag(const JobSpec& spec, const std::vector<TaskDef>& dag,
                                              ArtifactStore* store, const std::string& job) {
  std::map<std::string, nlohmann::json> results;
  for (const TaskDef& t : dag) {
    TaskContext ctx;
    ctx.job_id = job;
    ctx.spec = spec;
    ctx.task = t;
    ctx.store = store;
    for (const auto& d : t.deps) ctx.deps[d] = results.at(d);
    auto r = run_task(ctx);
    EXPECT_TRUE(r.is_ok()) << t.id << ": " << r.status().to_string();
    if (!r.is_ok()) break;
    results[t.id] = *r;
  }
  return results;
}

// Every file of `a` equals the same file of `b`, and the sets are equal.
void expect_same_tree(const std::string& a, const std::string& b) {
  std::vector<std::string> fa, fb;
  // The output manifest names who published (job, attempt): not part of the checkpoint.
  for (const auto& e : fs::recursive_directory_iterator(a))
    if (e.is_regular_file() && e.path().filename() != kOutputManifestName)
      fa.push_back(fs::relative(e.path(), a).string());
  for (const auto& e : fs::recursive_directory_iterator(b))
    if (e.is_regular_file() && e.path().filename() != kOutputManifestName)
      fb.push_back(fs::relative(e.path(), b).string());
  std::sort(fa.begin(), fa.end());
  std::sort(fb.begin(), fb.end());
  ASSERT_EQ(fa, fb);
  ASSERT_FALSE(fa.empty());
  for (const auto& f : fa) {
    auto x = read_file(a + "/" + f), y = read_file(b + "/" + f);
    ASSERT_TRUE(x.is_ok() && y.is_ok());
    EXPECT_TRUE(*x == *y) << f << " differs (" << x->size() << " vs " << y->size() << " bytes)";
  }
}

std::string reference(const JobSpec& spec, const std::string& name) {
  auto opts = quantize_options_from_spec(spec);
  EXPECT_TRUE(opts.is_ok()) << opts.status().to_string();
  auto calib = load_token_sequences(spec.calib.path, spec.calib.seqlen, 128, spec.calib.nsamples);
  EXPECT_TRUE(calib.is_ok());
  const std::string out = dir() + "/" + name;
  auto rep = quantize_model(spec.model, *calib, *opts, out);
  EXPECT_TRUE(rep.is_ok()) << rep.status().to_string();
  return out;
}

struct Case {
  std::string method;
  int64_t window;
};

class TaskChain : public ::testing::TestWithParam<Case> {};

TEST_P(TaskChain, ByteIdenticalToQuantizeModel) {
  const Case c = GetParam();
  const std::string tag = c.method + "_w" + std::to_string(c.window);
  const std::string out = dir() + "/out_" + tag;
  JobSpec spec = parse(spec_json(c.method, out, c.window));
  ArtifactStore store(dir() + "/store_" + tag);
  auto results = run_dag(spec, sequential_dag(c.window), &store, "j-" + tag);
  ASSERT_TRUE(results.count("validate"));

  // Result shapes of common/plan.h.
  EXPECT_TRUE(results["capture"]["artifacts"].contains("x"));
  EXPECT_EQ(results["capture"]["sequences"], kNSamples);
  EXPECT_TRUE(results["calibrate-0000"]["artifacts"].contains("qlinears"));
  EXPECT_TRUE(results["calibrate-0000"]["artifacts"].contains("x"));
  EXPECT_EQ(results["calibrate-0000"]["layers"].size(), static_cast<size_t>(c.window));
  EXPECT_EQ(results["assemble"]["output"], out);
  EXPECT_GT(results["assemble"]["bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(results["assemble"]["modules"], 7 * kLayers);

  expect_same_tree(out, reference(spec, "ref_" + tag));

  const nlohmann::json& v = results["validate"];
  EXPECT_TRUE(v["gate_passed"].get<bool>());  // no gate
  EXPECT_GT(v["report"]["ppl"].get<double>(), 1.0);
  EXPECT_GE(v["report"]["kl"].get<double>(), 0.0);
  EXPECT_TRUE(v["report"].contains("fp_ppl"));
}

INSTANTIATE_TEST_SUITE_P(Recipes, TaskChain,
                         ::testing::Values(Case{"rtn", 1}, Case{"gptq", 1}, Case{"gptq", 2}),
                         [](const auto& info) {
                           return info.param.method + "_window" + std::to_string(info.param.window);
                         });

TEST(Tasks, ValidateGate) {
  const std::string out = dir() + "/out_gate";
  nlohmann::json j = spec_json("rtn", out, 3);
  j["recipe"]["w_bits"] = 2;  // coarse enough to move the KL
  j["gate"] = {{"max_kl", 1e-9}, {"max_ppl_increase", 10.0}};
  JobSpec spec = parse(j);
  ArtifactStore store(dir() + "/store_gate");
  auto results = run_dag(spec, sequential_dag(3), &store, "j-gate");
  ASSERT_TRUE(results.count("validate"));
  const nlohmann::json& v = results["validate"];
  EXPECT_FALSE(v["gate_passed"].get<bool>()) << v.dump();
  const nlohmann::json& g = v["report"]["gate"];
  EXPECT_FALSE(g["passed"].get<bool>());
  EXPECT_EQ(g["max_kl"], 1e-9);
  ASSERT_EQ(g["violations"].size(), 1u) << g.dump();  // kl only; ppl within 10x
  EXPECT_NE(g["violations"][0].get<std::string>().find("kl"), std::string::npos);
  EXPECT_GT(v["report"]["kl"].get<double>(), 1e-9);

  // Without eval data the gate is skipped and passes.
  j.erase("eval");
  JobSpec no_eval = parse(j);
  TaskContext ctx;
  ctx.job_id = "j-gate";
  ctx.spec = no_eval;
  ctx.task = sequential_dag(3).back();
  ctx.store = &store;
  ctx.deps["assemble"] = results["assemble"];
  auto r = run_task(ctx);
  ASSERT_TRUE(r.is_ok());
  EXPECT_TRUE((*r)["gate_passed"].get<bool>());
  EXPECT_TRUE((*r)["report"].contains("skipped"));
}

TEST(Tasks, CancelStopsCalibrateBetweenLayers) {
  JobSpec spec = parse(spec_json("gptq", dir() + "/out_cancel", 3));
  ArtifactStore store(dir() + "/store_cancel");
  auto dag = sequential_dag(3);  // capture, calibrate-0000 [0, 3), ...
  auto results = run_dag(spec, {dag[0]}, &store, "j-cancel");
  ASSERT_TRUE(results.count("capture"));

  TaskContext ctx;
  ctx.job_id = "j-cancel";
  ctx.spec = spec;
  ctx.task = dag[1];
  ctx.store = &store;
  ctx.deps["capture"] = results["capture"];
  std::atomic<bool> cancel{true};
  ctx.cancel = &cancel;
  auto r = run_task(ctx);
  ASSERT_FALSE(r.is_ok());
  EXPECT_TRUE(is_cancelled(r.status())) << r.status().to_string();

  // Set while the first layer runs: the task stops before the second one.
  cancel = false;
  int layers_done = 0;
  ctx.log = [&](const std::string& line) {
    if (line.rfind("layer ", 0) == 0) {
      ++layers_done;
      cancel = true;
    }
  };
  r = run_task(ctx);
  ASSERT_FALSE(r.is_ok());
  EXPECT_TRUE(is_cancelled(r.status())) << r.status().to_string();
  EXPECT_NE(r.status().message().find("before layer 1"), std::string::npos) << r.status().message();
  EXPECT_EQ(layers_done, 1);
  // Nothing was published for the cancelled run.
  EXPECT_FALSE(path_exists(
      store.absolute(task_artifact_path("j-cancel", dag[1].id, 1, "qlinears.safetensors"))));
}

TEST(Tasks, CorruptInputNamesItsProducer) {
  JobSpec spec = parse(spec_json("rtn", dir() + "/out_corrupt", 1));
  ArtifactStore store(dir() + "/store_corrupt");
  auto dag = sequential_dag(1);
  auto results = run_dag(spec, {dag[0]}, &store, "j-corrupt");
  ArtifactRef x = *ArtifactRef::from_json(results["capture"]["artifacts"]["x"]);
  {
    std::fstream f(store.absolute(x.path), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(x.bytes - 1));
    f.put('\x7f');
  }
  TaskContext ctx;
  ctx.job_id = "j-corrupt";
  ctx.spec = spec;
  ctx.task = dag[1];
  ctx.store = &store;
  ctx.deps["capture"] = results["capture"];
  std::string producer;
  Status v = find_corrupt_input(ctx, &producer);
  EXPECT_EQ(v.code(), Code::kCorrupt);
  EXPECT_EQ(producer, "capture");
  auto r = run_task(ctx);
  EXPECT_EQ(r.status().code(), Code::kCorrupt) << r.status().to_string();

  // A dep result without the artifact is a DAG error, not corruption.
  ctx.deps["capture"] = {{"artifacts", nlohmann::json::object()}};
  EXPECT_EQ(run_task(ctx).status().code(), Code::kInvalidInput);
  // A bad recipe is refused before any work, naming the field.
  nlohmann::json j = spec_json("rtn", dir() + "/out_corrupt", 1);
  j["recipe"]["overlap"] = 1;
  auto bad = parse_job_spec(j);
  if (bad.is_ok()) {
    auto o = quantize_options_from_spec(*bad);
    EXPECT_EQ(o.status().code(), Code::kInvalidInput);
    EXPECT_NE(o.status().message().find("recipe.overlap"), std::string::npos);
  }
}

TEST(Tasks, ParallelModeCalibratesFromFpInputs) {
  const std::string out = dir() + "/out_parallel";
  nlohmann::json j = spec_json("gptq", out, 1);
  j["recipe"]["mode"] = "parallel";
  JobSpec spec = parse(j);
  ArtifactStore store(dir() + "/store_parallel");
  std::vector<TaskDef> dag;
  dag.push_back({"capture", plan::kCapture, {}, nlohmann::json::object(), 0});
  std::vector<std::string> cal;
  for (int64_t l = 0; l < kLayers; ++l) {
    std::string id = "calibrate-000" + std::to_string(l);
    dag.push_back(
        {id, plan::kCalibrate, {"capture"}, {{"layer_begin", l}, {"layer_end", l + 1}}, 0});
    cal.push_back(id);
  }
  dag.push_back({"assemble", plan::kAssemble, cal, nlohmann::json::object(), 0});
  auto results = run_dag(spec, dag, &store, "j-par");
  ASSERT_TRUE(results.count("assemble"));
  for (int64_t l = 1; l < kLayers; ++l)
    EXPECT_TRUE(results["capture"]["artifacts"].contains("x." + std::to_string(l)));
  EXPECT_FALSE(results["calibrate-0001"]["artifacts"].contains("x"));

  // Layer 0 sees the same input in both modes, so its linears are identical.
  JobSpec seq = parse(spec_json("gptq", dir() + "/out_parallel_seq", 1));
  ArtifactStore store2(dir() + "/store_parallel_seq");
  auto sres = run_dag(seq, sequential_dag(1), &store2, "j-seq");
  auto a = store.read_qlinears(
      *ArtifactRef::from_json(results["calibrate-0000"]["artifacts"]["qlinears"]));
  auto b = store2.read_qlinears(
      *ArtifactRef::from_json(sres["calibrate-0000"]["artifacts"]["qlinears"]));
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  for (const auto& [name, q] : *a) EXPECT_EQ(q.q, b->at(name).q) << name;
  auto m = LlamaModel::open(out);
  EXPECT_TRUE(m.is_ok()) << m.status().to_string();
}

// ---- Calibration recipes: the DAGs the planner emits, run through run_task.

nlohmann::json calib_spec_json(const nlohmann::json& recipe, const std::string& out) {
  return {{"model", model_dir()},
          {"recipe", recipe},
          {"calib", {{"path", calib_path()}, {"nsamples", kNSamples}, {"seqlen", kSeqlen}}},
          {"eval", {{"path", eval_path()}, {"seqlen", kSeqlen}}},
          {"output", {{"path", out}}}};
}

std::vector<TaskDef> planned(const JobSpec& spec) {
  auto p = plan_job(spec, {});
  EXPECT_TRUE(p.is_ok()) << p.status().to_string();
  return p.is_ok() ? p->tasks : std::vector<TaskDef>{};
}

TaskContext context(const JobSpec& spec, const TaskDef& t, ArtifactStore* store,
                    const std::string& job, const std::map<std::string, nlohmann::json>& results,
                    int64_t attempt = 1) {
  TaskContext ctx;
  ctx.job_id = job;
  ctx.spec = spec;
  ctx.task = t;
  ctx.attempt = attempt;
  ctx.store = store;
  for (const auto& d : t.deps) ctx.deps[d] = results.at(d);
  return ctx;
}

// The in-process pipeline with the same recipe (what `qcal quantize` runs).
std::string calib_reference(const JobSpec& spec, const std::string& name, const std::string& fmt) {
  auto r = calib_recipe_from_spec(spec);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  auto calib = load_token_sequences(spec.calib.path, spec.calib.seqlen, 128, spec.calib.nsamples);
  EXPECT_TRUE(calib.is_ok());
  const std::string out = dir() + "/" + name;
  auto rep = calib::calibrate_to_dir(spec.model, *calib, *r, out, fmt, false);
  EXPECT_TRUE(rep.is_ok()) << rep.status().to_string();
  return out;
}

TEST(CalibTasks, OneTaskCalibrationMatchesTheCli) {
  const std::string out = dir() + "/out_quarot";
  JobSpec spec =
      parse(calib_spec_json({{"transform", "quarot"}, {"w_bits", 4}, {"a_bits", 8}}, out));
  ASSERT_TRUE(spec.recipe.calibration());
  std::vector<TaskDef> dag = planned(spec);
  ASSERT_EQ(dag.size(), 2u);
  ArtifactStore store(dir() + "/store_quarot");
  auto results = run_dag(spec, dag, &store, "j-quarot");
  ASSERT_TRUE(results.count("validate"));
  EXPECT_EQ(results["calib"]["format"], "native");
  EXPECT_EQ(results["calib"]["output"], out);
  EXPECT_TRUE(calib::is_native_dir(out));
  const nlohmann::json& v = results["validate"];
  EXPECT_TRUE(v["gate_passed"].get<bool>());
  EXPECT_GT(v["report"]["ppl"].get<double>(), 1.0);
  EXPECT_GE(v["report"]["kl"].get<double>(), 0.0);
  expect_same_tree(out, calib_reference(spec, "ref_quarot", "native"));
}

// CBQ: capture → cbq-window-0000 → cbq-window-0001 → assemble → validate (3 layers,
// window 2, overlap 1). A second job stops in window 1 (a worker dying after it
// wrote its state but before reporting), re-runs it as attempt 2 and finishes:
// byte-identical to the uninterrupted job and to the in-process pipeline.
TEST(CalibTasks, CbqWindowsResumeByteIdentical) {
  const nlohmann::json recipe = {{"weight_solver", "lora-rounding"},
                                 {"w_bits", 2},
                                 {"w_group", 32},
                                 {"reconstruction", "cbq"},
                                 {"cbq_window", 2},
                                 {"cbq_overlap", 1},
                                 {"cbq_epochs", 2},
                                 {"lora_rank", 4}};
  const std::string out_a = dir() + "/out_cbq_a", out_b = dir() + "/out_cbq_b";
  JobSpec a = parse(calib_spec_json(recipe, out_a));
  std::vector<TaskDef> dag = planned(a);
  ASSERT_EQ(dag.size(), 5u);
  EXPECT_EQ(dag[1].id, "cbq-window-0000");
  EXPECT_EQ(dag[2].id, "cbq-window-0001");
  ArtifactStore store(dir() + "/store_cbq");
  auto ra = run_dag(a, dag, &store, "j-cbq-a");
  ASSERT_TRUE(ra.count("validate"));

  // Results of common/plan.h.
  int setup_files = 0;
  for (auto it = ra["capture"]["artifacts"].begin(); it != ra["capture"]["artifacts"].end(); ++it) {
    EXPECT_EQ(it.key().rfind("setup/", 0), 0u) << it.key();
    ++setup_files;
  }
  EXPECT_GT(setup_files, 0);
  EXPECT_EQ(ra["capture"]["windows"], 2);
  for (int w = 0; w < 2; ++w) {
    const nlohmann::json& r = ra[dag[1 + w].id];
    const nlohmann::json& rep = r["window"];
    SCOPED_TRACE(r.dump());
    EXPECT_EQ(rep["window"], w);
    EXPECT_EQ(rep["first"], w);
    EXPECT_EQ(rep["last"], w + 1);
    for (const char* k : {"loss_first", "loss_last", "loss_hard_init", "loss_hard"}) {
      ASSERT_TRUE(rep[k].is_number()) << k;  // NaN would be null
      EXPECT_TRUE(std::isfinite(rep[k].get<double>())) << k;
      EXPECT_GE(rep[k].get<double>(), 0.0) << k;
    }
    EXPECT_GT(rep["steps"].get<int64_t>(), 0);
    bool has_state = false;
    for (auto it = r["artifacts"].begin(); it != r["artifacts"].end(); ++it)
      has_state = has_state || it.key() == "state" || it.key().rfind("state/", 0) == 0;
    EXPECT_TRUE(has_state);
  }
  EXPECT_EQ(ra["cbq-window-0000"]["finalized"], nlohmann::json::array({0}));
  EXPECT_EQ(ra["cbq-window-0001"]["finalized"], nlohmann::json::array({1, 2}));
  EXPECT_EQ(ra["assemble"]["format"], "native");
  EXPECT_TRUE(calib::is_native_dir(out_a));
  EXPECT_GT(ra["validate"]["report"]["ppl"].get<double>(), 1.0);

  // Job B: capture and window 0, then window 1 twice (attempt 1's result is lost).
  JobSpec b = parse(calib_spec_json(recipe, out_b));
  const std::string job = "j-cbq-b";
  auto rb = run_dag(b, {dag[0], dag[1]}, &store, job);
  ASSERT_TRUE(rb.count("cbq-window-0000"));
  {
    TaskContext ctx = context(b, dag[2], &store, job, rb);
    std::atomic<bool> cancel{true};
    ctx.cancel = &cancel;
    auto r = run_task(ctx);
    ASSERT_FALSE(r.is_ok());
    EXPECT_TRUE(is_cancelled(r.status())) << r.status().to_string();
  }
  auto lost = run_task(context(b, dag[2], &store, job, rb, /*attempt=*/1));
  ASSERT_TRUE(lost.is_ok()) << lost.status().to_string();
  auto again = run_task(context(b, dag[2], &store, job, rb, /*attempt=*/2));
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  // Same bytes from the same state, under another attempt's path.
  ASSERT_EQ((*lost)["artifacts"].size(), (*again)["artifacts"].size());
  for (auto it = (*lost)["artifacts"].begin(); it != (*lost)["artifacts"].end(); ++it) {
    EXPECT_EQ(it.value()["sha256"], (*again)["artifacts"][it.key()]["sha256"]) << it.key();
    EXPECT_NE(it.value()["path"], (*again)["artifacts"][it.key()]["path"]) << it.key();
  }
  EXPECT_EQ((*again)["window"]["loss_hard"], ra["cbq-window-0001"]["window"]["loss_hard"]);
  rb["cbq-window-0001"] = *again;
  for (size_t i = 3; i < dag.size(); ++i) {
    auto r = run_task(context(b, dag[i], &store, job, rb));
    ASSERT_TRUE(r.is_ok()) << dag[i].id << ": " << r.status().to_string();
    rb[dag[i].id] = *r;
  }
  expect_same_tree(out_a, out_b);
  // The service's windows are the in-process pipeline's.
  expect_same_tree(out_a, calib_reference(a, "ref_cbq", "native"));

  // A corrupt state names the window that wrote it.
  ArtifactRef st;
  for (auto it = rb["cbq-window-0000"]["artifacts"].begin();
       it != rb["cbq-window-0000"]["artifacts"].end(); ++it)
    st = *ArtifactRef::from_json(it.value());
  {
    std::fstream f(store.absolute(st.path), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    const char c = static_cast<char>(f.get());
    f.seekp(0);
    f.put(static_cast<char>(c ^ 1));
  }
  std::string producer;
  Status v = find_corrupt_input(context(b, dag[2], &store, job, rb), &producer);
  EXPECT_EQ(v.code(), Code::kCorrupt) << v.to_string();
  EXPECT_EQ(producer, "cbq-window-0000");
  EXPECT_EQ(run_task(context(b, dag[2], &store, job, rb, 3)).status().code(), Code::kCorrupt);
  producer.clear();
  v = find_corrupt_input(context(b, dag[3], &store, job, rb), &producer);  // assemble
  EXPECT_EQ(producer, "cbq-window-0000");
}

}  // namespace
}  // namespace qcal

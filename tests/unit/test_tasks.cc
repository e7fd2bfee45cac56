// The task runners without Redis: the planned DAG (common/plan.h) run task by
// task through run_task writes a checkpoint byte-identical to `qcal quantize`'s
// in-process run (worker/local_runner.h); a task re-run (another attempt) writes
// the same bytes; validate applies the gate; the cancel flag stops a quantize
// task between layers; corrupt inputs name their producer.
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
#include "common/planner.h"
#include "worker/calib/block.h"
#include "worker/calib/native.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"
#include "worker/local_runner.h"
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

nlohmann::json spec_json(const nlohmann::json& recipe, const std::string& out) {
  return {{"model", model_dir()},
          {"recipe", recipe},
          {"calib", {{"path", calib_path()}, {"nsamples", kNSamples}, {"seqlen", kSeqlen}}},
          {"eval", {{"path", eval_path()}, {"seqlen", kSeqlen}}},
          {"output", {{"path", out}}}};
}

JobSpec parse(const nlohmann::json& j) {
  auto s = parse_job_spec(j);
  EXPECT_TRUE(s.is_ok()) << s.status().to_string();
  return *s;
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

// Runs every task in order; results by task id.
std::map<std::string, nlohmann::json> run_dag(const JobSpec& spec, const std::vector<TaskDef>& dag,
                                              ArtifactStore* store, const std::string& job) {
  std::map<std::string, nlohmann::json> results;
  for (const TaskDef& t : dag) {
    auto r = run_task(context(spec, t, store, job, results));
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

// What `qcal quantize` writes for the same spec, in one process.
std::string reference(const JobSpec& spec, const std::string& name) {
  JobSpec s = spec;
  s.output.path = dir() + "/" + name;
  auto r = run_job_locally(s);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return s.output.path;
}

struct Case {
  std::string name;
  nlohmann::json recipe;
};

class TaskChain : public ::testing::TestWithParam<Case> {};

TEST_P(TaskChain, ByteIdenticalToTheInProcessRun) {
  const Case c = GetParam();
  const std::string out = dir() + "/out_" + c.name;
  JobSpec spec = parse(spec_json(c.recipe, out));
  const std::vector<TaskDef> dag = planned(spec);
  ArtifactStore store(dir() + "/store_" + c.name);
  auto results = run_dag(spec, dag, &store, "j-" + c.name);
  ASSERT_TRUE(results.count("validate"));
  EXPECT_TRUE(results["embed"]["artifacts"].contains("x"));
  EXPECT_EQ(results["embed"]["sequences"], kNSamples);
  EXPECT_EQ(results["assemble"]["output"], out);
  EXPECT_GT(results["assemble"]["bytes"].get<uint64_t>(), 0u);
  expect_same_tree(out, reference(spec, "ref_" + c.name));
  const nlohmann::json& v = results["validate"];
  EXPECT_TRUE(v["gate_passed"].get<bool>());  // no gate
  EXPECT_GT(v["report"]["ppl"].get<double>(), 1.0);
  EXPECT_GE(v["report"]["kl"].get<double>(), 0.0);
  EXPECT_TRUE(v["report"].contains("fp_ppl"));
}

INSTANTIATE_TEST_SUITE_P(
    Recipes, TaskChain,
    ::testing::Values(
        Case{"rtn", {{"method", "rtn"}, {"w_bits", 4}, {"group_size", 32}}},
        Case{"gptq", {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}}},
        Case{"gptq_w2", {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}, {"window", 2}}},
        Case{"quarot_a8",
             {{"transform", "quarot"}, {"weight_solver", "gptq"}, {"w_bits", 4}, {"a_bits", 8}}},
        Case{"flatquant",
             {{"transform", "flatquant"}, {"w_bits", 4}, {"a_bits", 4}, {"kv_bits", 4},
              {"epochs", 1}}},
        Case{"smoothquant", {{"transform", "smoothquant"}, {"w_bits", 8}, {"a_bits", 8}}}),
    [](const auto& info) { return info.param.name; });

TEST(Tasks, ValidateGate) {
  const std::string out = dir() + "/out_gate";
  nlohmann::json j = spec_json({{"method", "rtn"}, {"w_bits", 2}, {"group_size", 32}}, out);
  j["gate"] = {{"max_kl", 1e-9}, {"max_ppl_increase", 10.0}};
  JobSpec spec = parse(j);
  ArtifactStore store(dir() + "/store_gate");
  const auto dag = planned(spec);
  auto results = run_dag(spec, dag, &store, "j-gate");
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
  auto r = run_task(context(no_eval, dag.back(), &store, "j-gate", results));
  ASSERT_TRUE(r.is_ok());
  EXPECT_TRUE((*r)["gate_passed"].get<bool>());
  EXPECT_TRUE((*r)["report"].contains("skipped"));
}

TEST(Tasks, CancelStopsAQuantizeTaskBetweenLayers) {
  JobSpec spec = parse(spec_json(
      {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}, {"window", 3}}, dir() + "/out_cancel"));
  ArtifactStore store(dir() + "/store_cancel");
  const auto dag = planned(spec);  // embed, quantize-0000 [0, 3), assemble, validate
  ASSERT_EQ(dag[1].id, "quantize-0000");
  auto results = run_dag(spec, {dag[0]}, &store, "j-cancel");
  ASSERT_TRUE(results.count("embed"));
  TaskContext ctx = context(spec, dag[1], &store, "j-cancel", results);
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
      store.absolute(task_artifact_path("j-cancel", dag[1].id, 1, "x.safetensors"))));
}

TEST(Tasks, CorruptInputNamesItsProducer) {
  JobSpec spec =
      parse(spec_json({{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}}, dir() + "/out_corrupt"));
  ArtifactStore store(dir() + "/store_corrupt");
  const auto dag = planned(spec);
  auto results = run_dag(spec, {dag[0]}, &store, "j-corrupt");
  ArtifactRef x = *ArtifactRef::from_json(results["embed"]["artifacts"]["x"]);
  {
    std::fstream f(store.absolute(x.path), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(x.bytes - 1));
    f.put('\x7f');
  }
  TaskContext ctx = context(spec, dag[1], &store, "j-corrupt", results);
  std::string producer;
  Status v = find_corrupt_input(ctx, &producer);
  EXPECT_EQ(v.code(), Code::kCorrupt);
  EXPECT_EQ(producer, "embed");
  // A dep result without the artifact is a DAG error, not corruption.
  ctx.deps["embed"] = {{"artifacts", nlohmann::json::object()}};
  EXPECT_EQ(run_task(ctx).status().code(), Code::kInvalidInput);
}

TEST(Tasks, ParallelModeQuantizesFromFpInputs) {
  const std::string out = dir() + "/out_parallel";
  JobSpec spec = parse(spec_json(
      {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}, {"mode", "parallel"}}, out));
  ArtifactStore store(dir() + "/store_parallel");
  auto results = run_dag(spec, planned(spec), &store, "j-par");
  ASSERT_TRUE(results.count("assemble"));
  EXPECT_TRUE(results["capture-0001"]["artifacts"].contains("x"));
  EXPECT_FALSE(results["quantize-0001"]["artifacts"].contains("x"));
  // Layer 0 sees the same input in both modes, so its block is identical.
  JobSpec seq =
      parse(spec_json({{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}}, dir() + "/out_seq"));
  ArtifactStore store2(dir() + "/store_parallel_seq");
  auto sres = run_dag(seq, planned(seq), &store2, "j-seq");
  auto codes = [&](ArtifactStore& st, const nlohmann::json& r, int64_t l) {
    const ArtifactRef ref =
        *ArtifactRef::from_json(r["artifacts"][plan::block_artifact(l)]);
    auto c = LlamaModel::open(model_dir());
    auto b = calib::load_block_result(st.absolute(ref.path), (*c)->config());
    EXPECT_TRUE(b.is_ok()) << b.status().to_string();
    return b.is_ok() ? b->q[calib::kDown].q : std::vector<uint8_t>{};
  };
  EXPECT_EQ(codes(store, results["quantize-0000"], 0), codes(store2, sres["quantize-0000"], 0));
  EXPECT_NE(codes(store, results["quantize-0001"], 1), codes(store2, sres["quantize-0001"], 1));
  auto m = LlamaModel::open(out);
  EXPECT_TRUE(m.is_ok()) << m.status().to_string();
}

// CBQ: embed → cbq-window-0000 → cbq-window-0001 → assemble → validate (3 layers,
// window 2, overlap 1). A second job stops in window 1 (a worker dying after it wrote
// its state but before reporting), re-runs it as attempt 2 and finishes: byte-identical
// to the uninterrupted job and to the in-process run.
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
  JobSpec a = parse(spec_json(recipe, out_a));
  const std::vector<TaskDef> dag = planned(a);
  std::map<std::string, size_t> at;
  for (size_t i = 0; i < dag.size(); ++i) at[dag[i].id] = i;
  ASSERT_TRUE(at.count("cbq-window-0000") && at.count("cbq-window-0001"));
  ArtifactStore store(dir() + "/store_cbq");
  auto ra = run_dag(a, dag, &store, "j-cbq-a");
  ASSERT_TRUE(ra.count("validate"));
  for (int w = 0; w < 2; ++w) {
    const nlohmann::json& r = ra[plan::numbered("cbq-window", w)];
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
  }
  EXPECT_TRUE(ra["cbq-window-0000"]["artifacts"].contains("state"));
  EXPECT_TRUE(ra["cbq-window-0000"]["artifacts"].contains("x"));
  EXPECT_EQ(ra["cbq-window-0000"]["finalized"], nlohmann::json::array({0}));
  EXPECT_EQ(ra["cbq-window-0001"]["finalized"], nlohmann::json::array({1, 2}));
  EXPECT_EQ(ra["assemble"]["format"], "gptq");  // weight-only: it folds
  EXPECT_GT(ra["validate"]["report"]["ppl"].get<double>(), 1.0);

  // Job B: everything up to window 1, then window 1 twice (attempt 1's result is lost).
  JobSpec b = parse(spec_json(recipe, out_b));
  const std::string job = "j-cbq-b";
  const size_t w1 = at["cbq-window-0001"];
  std::vector<TaskDef> before(dag.begin(), dag.begin() + static_cast<std::ptrdiff_t>(w1));
  auto rb = run_dag(b, before, &store, job);
  ASSERT_TRUE(rb.count("cbq-window-0000"));
  {
    TaskContext ctx = context(b, dag[w1], &store, job, rb);
    std::atomic<bool> cancel{true};
    ctx.cancel = &cancel;
    auto r = run_task(ctx);
    ASSERT_FALSE(r.is_ok());
    EXPECT_TRUE(is_cancelled(r.status())) << r.status().to_string();
  }
  auto lost = run_task(context(b, dag[w1], &store, job, rb, /*attempt=*/1));
  ASSERT_TRUE(lost.is_ok()) << lost.status().to_string();
  auto again = run_task(context(b, dag[w1], &store, job, rb, /*attempt=*/2));
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  // Same bytes from the same state, under another attempt's path.
  ASSERT_EQ((*lost)["artifacts"].size(), (*again)["artifacts"].size());
  for (auto it = (*lost)["artifacts"].begin(); it != (*lost)["artifacts"].end(); ++it) {
    EXPECT_EQ(it.value()["sha256"], (*again)["artifacts"][it.key()]["sha256"]) << it.key();
    EXPECT_NE(it.value()["path"], (*again)["artifacts"][it.key()]["path"]) << it.key();
  }
  EXPECT_EQ((*again)["window"]["loss_hard"], ra["cbq-window-0001"]["window"]["loss_hard"]);
  rb["cbq-window-0001"] = *again;
  for (size_t i = w1 + 1; i < dag.size(); ++i) {
    auto r = run_task(context(b, dag[i], &store, job, rb));
    ASSERT_TRUE(r.is_ok()) << dag[i].id << ": " << r.status().to_string();
    rb[dag[i].id] = *r;
  }
  expect_same_tree(out_a, out_b);
  expect_same_tree(out_a, reference(a, "ref_cbq"));

  // A corrupt state names the window that wrote it.
  ArtifactRef st = *ArtifactRef::from_json(rb["cbq-window-0000"]["artifacts"]["state"]);
  {
    std::fstream f(store.absolute(st.path), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    const char c = static_cast<char>(f.get());
    f.seekp(0);
    f.put(static_cast<char>(c ^ 1));
  }
  std::string producer;
  Status v = find_corrupt_input(context(b, dag[w1], &store, job, rb), &producer);
  EXPECT_EQ(v.code(), Code::kCorrupt) << v.to_string();
  EXPECT_EQ(producer, "cbq-window-0000");
}

// A parallel FlatQuant block task re-run after its worker died (attempt 2) writes the same
// bytes: losing a worker inside a block costs that block only.
TEST(CalibTasks, FlatQuantBlockTaskRerunIsIdentical) {
  JobSpec spec = parse(spec_json({{"transform", "flatquant"}, {"w_bits", 4}, {"a_bits", 4},
                                  {"epochs", 1}},
                                 dir() + "/out_fq_rerun"));
  const auto dag = planned(spec);
  ArtifactStore store(dir() + "/store_fq_rerun");
  std::map<std::string, nlohmann::json> res;
  for (const TaskDef& t : dag) {
    if (t.type == plan::kTransform) break;
    auto r = run_task(context(spec, t, &store, "j-fq", res));
    ASSERT_TRUE(r.is_ok()) << t.id << ": " << r.status().to_string();
    res[t.id] = *r;
  }
  const TaskDef* fit = nullptr;
  for (const TaskDef& t : dag)
    if (t.id == "flatquant-0001") fit = &t;
  ASSERT_NE(fit, nullptr);
  auto a = run_task(context(spec, *fit, &store, "j-fq", res, 1));
  auto b = run_task(context(spec, *fit, &store, "j-fq", res, 2));
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  EXPECT_EQ((*a)["artifacts"]["params"]["sha256"], (*b)["artifacts"]["params"]["sha256"]);
  EXPECT_NE((*a)["artifacts"]["params"]["path"], (*b)["artifacts"]["params"]["path"]);
}

}  // namespace
}  // namespace qcal

// labels: mpi
// The rank group: sharding arithmetic, and the data-parallel block tasks (GPTQ,
// FlatQuant, CBQ with LoRA-Rounding) run by two MPI ranks against the same task
// on one rank. Run plainly, the MPI test re-executes this binary under
// `QCAL_MPIRUN --allow-run-as-root --oversubscribe -np 2` (skipped when the build
// found no mpirun); as ranks, it runs the task with the rank group and the root
// writes its result for the parent to compare.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/plan.h"
#include "common/planner.h"
#include "tests/unit/redis_fixture.h"
#include "worker/calib/block.h"
#include "worker/calib/native.h"
#include "worker/calib/native_eval.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/engine/qformats.h"
#include "worker/engine/synth.h"
#include "worker/local_runner.h"
#include "worker/rank_group.h"
#include "worker/tasks.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;

constexpr const char* kDirEnv = "QCAL_TEST_RANK_GROUP_DIR";
constexpr int64_t kSeqlen = 32;
constexpr int64_t kNSamples = 15;  // odd: the two ranks get 7 and 8 sequences

TEST(RankGroupShard, ContiguousCover) {
  for (int64_t n : {0, 1, 5, 7, 128, 1001})
    for (int size = 1; size <= 9; ++size) {
      int64_t next = 0;
      for (int r = 0; r < size; ++r) {
        auto s = RankGroup::shard_of(n, r, size);
        EXPECT_EQ(s.begin, next);
        EXPECT_GE(s.count(), n / size);
        EXPECT_LE(s.count(), n / size + 1);
        next = s.end;
      }
      EXPECT_EQ(next, n);
    }
}

TEST(RankGroupSingle, CollectivesAreIdentity) {
  auto g = RankGroup::single();
  EXPECT_EQ(g->size(), 1);
  EXPECT_TRUE(g->is_root());
  EXPECT_EQ(g->hessian_reduce(), nullptr);
  std::string s = "x";
  EXPECT_TRUE(g->broadcast(&s).is_ok());
  EXPECT_EQ(s, "x");
  EXPECT_EQ(*g->agree(2), 2);
  Tensor t({2 * 3, 4}, 1.5f), local, full;
  EXPECT_TRUE(g->scatter_sequences(t, 2, 3, 4, &local).is_ok());
  EXPECT_EQ(local.data, t.data);
  EXPECT_TRUE(g->gather_sequences(local, 2, 3, 4, &full).is_ok());
  EXPECT_EQ(full.data, t.data);
}

nlohmann::json spec_json(const std::string& dir, const nlohmann::json& recipe) {
  return {{"model", dir + "/model"},
          {"recipe", recipe},
          {"calib", {{"path", dir + "/calib.jsonl"}, {"nsamples", kNSamples}, {"seqlen", kSeqlen}}},
          {"output", {{"path", dir + "/out"}}}};
}

// A 3-layer model and calibration tokens in `dir` (fresh).
void make_inputs(const std::string& dir) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  SynthOptions o;
  ModelConfig& c = o.config;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 128;
  o.seed = 7;
  o.outliers.norm_channels = 2;
  o.outliers.alpha = 8;
  ASSERT_TRUE(synth_model(o, dir + "/model").is_ok());
  ASSERT_TRUE(
      write_tokens_jsonl(dir + "/calib.jsonl", synth_tokens(kSeqlen * kNSamples, 128, 3), 50)
          .is_ok());
}

// The task `dir`/task.json names with the dep results of `dir`/deps.json.
TaskContext task_ctx(const std::string& dir, ArtifactStore* store) {
  auto spec = read_file(dir + "/spec.json");
  auto task = read_file(dir + "/task.json");
  auto deps = read_file(dir + "/deps.json");
  EXPECT_TRUE(spec.is_ok() && task.is_ok() && deps.is_ok());
  TaskContext ctx;
  ctx.job_id = "j-mpi";
  ctx.spec = *parse_job_spec(nlohmann::json::parse(*spec));
  const nlohmann::json t = nlohmann::json::parse(*task);
  ctx.task = {t["id"], t["type"], t["deps"].get<std::vector<std::string>>(), t["params"], 0};
  ctx.store = store;
  const nlohmann::json d = nlohmann::json::parse(*deps);
  for (auto it = d.begin(); it != d.end(); ++it) ctx.deps[it.key()] = it.value();
  return ctx;
}

// As a rank under mpirun: the task with the group; the root saves the result.
void run_as_rank(const std::string& dir) {
  auto g = RankGroup::create(nullptr, nullptr);
  ASSERT_EQ(g->size(), 2) << "expected 2 ranks";
  ArtifactStore store(dir + "/store");
  TaskContext ctx = task_ctx(dir, &store);
  ctx.job_id = "j-mpi";
  ctx.group = g.get();
  auto r = run_task(ctx);
  ASSERT_TRUE(r.is_ok()) << "rank " << g->rank() << ": " << r.status().to_string();
  if (g->is_root()) {
    ASSERT_TRUE(write_file_atomic(dir + "/mpi.json", r->dump()).is_ok());
  }
}

struct MaxDiff {
  double abs = 0, rel = 0;  // rel: max |a − b| / max |b|
  void add(const double* a, const double* b, size_t n) {
    double ref = 0, d_max = 0;
    for (size_t i = 0; i < n; ++i) {
      ref = std::max(ref, std::fabs(b[i]));
      double d = std::fabs(a[i] - b[i]);
      if (!(d == d)) d = INFINITY;  // NaN never passes
      d_max = std::max(d_max, d);
    }
    abs = std::max(abs, d_max);
    rel = std::max(rel, ref > 0 ? d_max / ref : d_max);
  }
};

struct Case {
  const char* name;
  nlohmann::json recipe;
  const char* task;  // the task run on 1 and on 2 ranks
};

class RankGroupMpi : public ::testing::TestWithParam<Case> {};

// Data parallel inside a task, for every method (issue #10 part 3): the task on two MPI
// ranks (each minibatch split over them, gradients / Hessians summed) against the same
// task on one rank. Only the order of the sums differs, so:
//  - GPTQ (Hessians): the dequantized weights differ by at most one quantization step
//    where a weight sits on a rounding boundary, and ≤ 0.1% of the codes flip; the
//    output activations agree to 1e-3 relative;
//  - FlatQuant (gradients, fp64 AdamW masters): the fitted parameters agree to 1e-3 of
//    their largest magnitude after a full epoch (float gradients summed in another
//    order, amplified at most linearly by a few Adam steps);
//  - CBQ with LoRA-Rounding (gradients): ≤ 1% of the hardened codes flip (a flip needs
//    a rounding variable within the reordering noise of 0.5) and the hardened window
//    loss agrees to 1e-2 relative;
//  - SpinQuant (whole model: each step's sequences and the held-out ones split, ∂R1 and
//    ∂R2 weighted by each rank's share and summed) and IntactKV+Cal (each step's
//    accumulated sequences split, the prefix gradients summed): the learned R1 / R2 and
//    prefix K/V agree to 1e-4 of their largest magnitude after 3 steps, the step losses
//    to 1e-5 relative (fp32 sums over a rank's rows, in another grouping), and SpinQuant
//    keeps the same held-out step.
TEST_P(RankGroupMpi, TwoRanksMatchOneRank) {
  if (const char* d = std::getenv(kDirEnv); d && std::getenv("OMPI_COMM_WORLD_SIZE")) {
    if (std::string(d).find(std::string("/") + GetParam().name) == std::string::npos)
      GTEST_SKIP() << "another case";
    run_as_rank(d);
    return;
  }
  const std::string mpirun = QCAL_MPIRUN;
  if (mpirun.empty()) GTEST_SKIP() << "built without mpirun (QCAL_MPIRUN is empty)";
  const Case c = GetParam();
  const std::string dir =
      fs::temp_directory_path() / ("qcal_rank_" + std::to_string(getpid())) / c.name;
  make_inputs(dir);
  const nlohmann::json sj = spec_json(dir, c.recipe);
  ASSERT_TRUE(write_file_atomic(dir + "/spec.json", sj.dump()).is_ok());
  JobSpec spec = *parse_job_spec(sj);
  auto plan = plan_job(spec, {});
  ASSERT_TRUE(plan.is_ok()) << plan.status().to_string();

  // Everything before the task on one rank; then the task itself as the reference.
  ArtifactStore store(dir + "/store");
  std::map<std::string, nlohmann::json> results;
  const TaskDef* target = nullptr;
  for (const TaskDef& t : plan->tasks) {
    if (t.id == c.task) {
      target = &t;
      break;
    }
    TaskContext ctx;
    ctx.job_id = "j-1";
    ctx.spec = spec;
    ctx.task = t;
    ctx.store = &store;
    for (const auto& dep : t.deps) ctx.deps[dep] = results.at(dep);
    auto r = run_task(ctx);
    ASSERT_TRUE(r.is_ok()) << t.id << ": " << r.status().to_string();
    results[t.id] = *r;
  }
  ASSERT_NE(target, nullptr) << c.task;
  nlohmann::json deps = nlohmann::json::object();
  for (const auto& dep : target->deps) deps[dep] = results.at(dep);
  ASSERT_TRUE(write_file_atomic(dir + "/deps.json", deps.dump()).is_ok());
  ASSERT_TRUE(write_file_atomic(dir + "/task.json", nlohmann::json{{"id", target->id},
                                                                   {"type", target->type},
                                                                   {"deps", target->deps},
                                                                   {"params", target->params}}
                                                        .dump())
                  .is_ok());
  TaskContext one_ctx = task_ctx(dir, &store);
  one_ctx.job_id = "j-1";
  auto one = run_task(one_ctx);
  ASSERT_TRUE(one.is_ok()) << one.status().to_string();

  const std::string self = fs::read_symlink("/proc/self/exe").string();
  const std::string cmd = std::string(kDirEnv) + "=" + dir + " QCAL_THREADS=1 " + mpirun +
                          " --allow-run-as-root --oversubscribe -np 2 " + self +
                          " --gtest_filter='*RankGroupMpi.TwoRanksMatchOneRank/" + c.name +
                          "' 2>&1";
  int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd << " → " << rc;
  auto two_s = read_file(dir + "/mpi.json");
  ASSERT_TRUE(two_s.is_ok()) << "the root rank wrote no result";
  const nlohmann::json two = nlohmann::json::parse(*two_s);
  const ModelConfig cfg = (*LlamaModel::open(spec.model))->config();

  auto block = [&](const nlohmann::json& r, const std::string& key) {
    auto b = calib::load_block_result(
        store.absolute(ArtifactRef::from_json(r["artifacts"][key])->path), cfg);
    EXPECT_TRUE(b.is_ok()) << b.status().to_string();
    return *b;
  };
  auto compare_blocks = [&](double max_flip_share, double* worst_step) {
    int64_t codes = 0, flips = 0;
    for (auto it = (*one)["artifacts"].begin(); it != (*one)["artifacts"].end(); ++it) {
      if (it.key().rfind("block-", 0) != 0) continue;
      const calib::BlockResult a = block(*one, it.key()), b = block(two, it.key());
      for (int p = 0; p < calib::kNumProj; ++p) {
        const QuantizedLinear& qa = a.q[p];
        const QuantizedLinear& qb = b.q[p];
        const Tensor da = qa.dequantize(), db = qb.dequantize();
        for (size_t i = 0; i < qa.q.size(); ++i) {
          ++codes;
          flips += qa.q[i] != qb.q[i];
          const int64_t o2 = static_cast<int64_t>(i) / qa.in_features,
                        col = static_cast<int64_t>(i) % qa.in_features;
          const double s = qa.scales[static_cast<size_t>(qa.g_idx[col] * qa.out_features + o2)];
          *worst_step = std::max(*worst_step, std::fabs(double(da.data[i]) - db.data[i]) / s);
        }
      }
    }
    std::printf("%s: %lld of %lld codes differ, worst |Δŵ| %.3g steps\n", c.name,
                static_cast<long long>(flips), static_cast<long long>(codes), *worst_step);
    EXPECT_GT(codes, 0);
    EXPECT_LE(static_cast<double>(flips), max_flip_share * static_cast<double>(codes));
  };
  // The fitted artifact `key` of both runs: every array present in both, same sizes,
  // their largest difference into *d.
  auto compare_fitted = [&](const char* key, MaxDiff* d) {
    auto fa =
        calib::load_fitted(store.absolute(ArtifactRef::from_json((*one)["artifacts"][key])->path));
    auto fb =
        calib::load_fitted(store.absolute(ArtifactRef::from_json(two["artifacts"][key])->path));
    ASSERT_TRUE(fa.is_ok() && fb.is_ok());
    ASSERT_EQ(fa->arrays.size(), fb->arrays.size());
    for (const auto& [name, v] : fa->arrays) {
      ASSERT_TRUE(fb->has(name)) << name;
      ASSERT_EQ(v.size(), fb->at(name).size()) << name;
      d->add(fb->at(name).data(), v.data(), v.size());
    }
  };
  if (std::string(c.task).rfind("quantize", 0) == 0) {
    double worst = 0;
    compare_blocks(1e-3, &worst);
    EXPECT_LE(worst, 1.0 + 1e-3);
    auto xa = store.read_activations(*ArtifactRef::from_json((*one)["artifacts"]["x"]));
    auto xb = store.read_activations(*ArtifactRef::from_json(two["artifacts"]["x"]));
    ASSERT_TRUE(xa.is_ok() && xb.is_ok());
    std::vector<double> a(xa->x.data.begin(), xa->x.data.end()),
        b(xb->x.data.begin(), xb->x.data.end());
    MaxDiff x;
    x.add(b.data(), a.data(), a.size());
    std::printf("%s: output activations max |Δ| %.3g (rel %.3g)\n", c.name, x.abs, x.rel);
    EXPECT_LE(x.rel, 1e-3);
  } else if (std::string(c.task).rfind("flatquant", 0) == 0) {
    MaxDiff d;
    compare_fitted("params", &d);
    if (::testing::Test::HasFatalFailure()) return;
    std::printf("%s: fitted parameters max |Δ| %.3g (rel %.3g); loss %.6g vs %.6g\n", c.name, d.abs,
                d.rel, (*one)["report"]["loss_last"].get<double>(),
                two["report"]["loss_last"].get<double>());
    EXPECT_LE(d.rel, 1e-3);
  } else if (std::string(c.task) == "spinquant" || std::string(c.task) == "intactkv-cal") {
    const char* key = std::string(c.task) == "spinquant" ? "rotations" : "prefix_kv";
    MaxDiff d;
    compare_fitted(key, &d);
    if (::testing::Test::HasFatalFailure()) return;
    std::printf("%s: learned %s max |Δ| %.3g (rel %.3g)\n", c.name, key, d.abs, d.rel);
    EXPECT_LE(d.rel, 1e-4);
    if (std::string(c.task) == "spinquant") {
      // The held-out choice (shared over the ranks) is the same, and training moved R1.
      EXPECT_EQ((*one)["report"]["spin_kept_step"], two["report"]["spin_kept_step"]);
      const auto& l1 = (*one)["report"]["spin_loss"];
      const auto& l2 = two["report"]["spin_loss"];
      ASSERT_EQ(l1.size(), l2.size());
      for (size_t i = 0; i < l1.size(); ++i)
        EXPECT_NEAR(l1[i].get<double>(), l2[i].get<double>(), 1e-5 * l1[i].get<double>()) << i;
    } else {
      const double la = (*one)["report"]["intactkv_cal"]["loss_last"].get<double>(),
                   lb = two["report"]["intactkv_cal"]["loss_last"].get<double>();
      std::printf("%s: last step's loss %.8g vs %.8g\n", c.name, lb, la);
      EXPECT_NEAR(la, lb, 1e-5 * la);
    }
  } else {
    double worst = 0;
    compare_blocks(1e-2, &worst);
    const double la = (*one)["window"]["loss_hard"].get<double>(),
                 lb = two["window"]["loss_hard"].get<double>();
    std::printf("%s: hardened window loss %.6g vs %.6g\n", c.name, lb, la);
    EXPECT_LE(std::fabs(la - lb), 1e-2 * la);
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Methods, RankGroupMpi,
    ::testing::Values(Case{"gptq",
                           {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}, {"window", 2}},
                           "quantize-0000"},
                      Case{"flatquant",
                           {{"transform", "flatquant"},
                            {"w_bits", 4},
                            {"a_bits", 4},
                            {"kv_bits", 4},
                            {"epochs", 1},
                            {"cali_bsz", 4}},
                           "flatquant-0001"},
                      Case{"cbq",
                           {{"weight_solver", "lora-rounding"},
                            {"w_bits", 2},
                            {"w_group", 32},
                            {"reconstruction", "cbq"},
                            {"cbq_epochs", 2},
                            {"lora_rank", 4},
                            {"cali_bsz", 4}},
                           "cbq-window-0000"},
                      Case{"spinquant",
                           {{"transform", "spinquant"},
                            {"a_bits", 4},
                            {"spin_steps", 3},
                            {"spin_bsz", 4},
                            {"spin_holdout", 3}},
                           "spinquant"},
                      Case{"intactkv_cal",
                           {{"transform", "quarot"},
                            {"a_bits", 4},
                            {"kv_bits", 4},
                            {"intactkv", true},
                            {"intactkv_cal", true},
                            {"intactkv_cal_steps", 3}},
                           "intactkv-cal"}),
    [](const auto& info) { return std::string(info.param.name); });

// The qcal-worker binary as a 2-rank group under mpirun, against a real
// redis-server: rank 0 claims, every block task (transform, quantize,
// cbq-window) runs on both ranks, the job succeeds with the DAG the planner
// made (each task once), and SIGTERM (forwarded by mpirun) stops the group.
// The checkpoint is compared with `qcal quantize` in one process: the codes
// that flip (at most `max_flip_share` of them; only the order of the sums
// differs) and what they cost, the KL to the FP model on the calibration
// tokens (within 25%). `want_types` are task types the DAG must hold.
void run_worker_group(const std::string& name, const nlohmann::json& recipe,
                      const std::vector<std::string>& want_types, double max_flip_share) {
  const std::string mpirun = QCAL_MPIRUN;
  if (mpirun.empty()) GTEST_SKIP() << "built without mpirun (QCAL_MPIRUN is empty)";
  const std::string bin = std::string(QCAL_BINARY_DIR) + "/worker/qcal-worker";
  if (!fs::exists(bin)) GTEST_SKIP() << bin << " not built";
  qcal::testing::RedisServer server;
  QCAL_REQUIRE_REDIS(server);

  const std::string dir =
      fs::temp_directory_path() / ("qcal_rank_worker_" + name + "_" + std::to_string(getpid()));
  make_inputs(dir);
  nlohmann::json sj = spec_json(dir, recipe);
  JobSpec spec = *parse_job_spec(sj);
  auto planned = plan_job(spec, {});
  ASSERT_TRUE(planned.is_ok()) << planned.status().to_string();
  std::vector<TaskDef> dag = planned->tasks;
  dag.pop_back();  // no validate: no eval data
  for (const std::string& type : want_types)
    ASSERT_TRUE(
        std::any_of(dag.begin(), dag.end(), [&](const TaskDef& t) { return t.type == type; }))
        << name << ": the DAG holds no " << type << " task";
  RedisClient client(server.options());
  JobStore store(client);
  ASSERT_TRUE(store.init().is_ok());
  auto job = store.create_job(spec, dag);
  ASSERT_TRUE(job.is_ok()) << job.status().to_string();

  const std::vector<std::string> args = {mpirun,
                                         "--allow-run-as-root",
                                         "--oversubscribe",
                                         "-np",
                                         "2",
                                         "-x",
                                         "QCAL_THREADS=1",
                                         bin,
                                         "--redis",
                                         "127.0.0.1:" + std::to_string(server.port()),
                                         "--store",
                                         dir + "/store",
                                         "--worker-id",
                                         "mpi-group",
                                         "--block-ms",
                                         "100",
                                         "--allow-read",  // the model, data and output
                                         dir,
                                         "--allow-write",
                                         dir};
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  ASSERT_GT(pid, 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  JobState state = JobState::kQueued;
  while (std::chrono::steady_clock::now() < deadline) {
    auto j = store.get_job(*job);
    ASSERT_TRUE(j.is_ok());
    state = j->state;
    if (is_terminal(state)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid, SIGTERM);
  int status = 0, waited = 0;
  while (waitpid(pid, &status, WNOHANG) == 0 && waited++ < 600)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (waited > 600) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    ADD_FAILURE() << "mpirun did not exit within 30 s of SIGTERM";
  }
  // mpirun answers SIGTERM by terminating the job (the ranks get SIGTERM,
  // then SIGKILL after odls_base_sigkill_timeout) and exits non-zero; the
  // ranks, idle here, stop cleanly. What matters is that nothing hangs.
  std::printf("mpirun exit after SIGTERM: %s %d\n", WIFEXITED(status) ? "code" : "signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));

  auto info = store.get_job(*job);
  ASSERT_TRUE(info.is_ok());
  ASSERT_EQ(info->state, JobState::kSucceeded) << info->error;
  auto log = store.get_log(*job);
  ASSERT_TRUE(log.is_ok());
  // Every task of the DAG ran once, on the group.
  auto tasks = store.get_tasks(*job);
  ASSERT_TRUE(tasks.is_ok()) << tasks.status().to_string();
  ASSERT_EQ(tasks->size(), dag.size());
  for (const auto& t : *tasks) {
    EXPECT_EQ(t.state, TaskState::kDone) << t.def.id;
    EXPECT_EQ(t.attempts, 1) << t.def.id;
    EXPECT_EQ(t.worker, "mpi-group") << t.def.id;
  }
  // Against `qcal quantize` in one process: the same codes (the sums' order aside).
  auto calib = load_token_sequences(spec.calib.path, kSeqlen, 128, kNSamples);
  ASSERT_TRUE(calib.is_ok());
  JobSpec ref = spec;
  ref.output.path = dir + "/reference";
  ASSERT_TRUE(run_job_locally(ref).is_ok());
  // GPTQ amplifies the reordered Hessian sums into code flips where a
  // Hessian is poorly conditioned (this model's layer-2 down_proj flips ~15%
  // of its codes between two single-process runs that only batch the
  // calibration sequences differently), so compare what the flips cost: the
  // KL to the FP model on the calibration tokens, and count the flips.
  int64_t codes = 0, flips = 0;
  if (calib::is_native_dir(dir + "/out")) {  // W4A4KV4 recipes: the native checkpoint
    auto a = calib::read_native(dir + "/out");
    auto b = calib::read_native(dir + "/reference");
    ASSERT_TRUE(a.is_ok() && b.is_ok());
    ASSERT_EQ(a->layers.size(), b->layers.size());
    for (size_t l = 0; l < a->layers.size(); ++l)
      for (int p = 0; p < calib::kNumProj; ++p) {
        const PackedWeight& wa = a->layers[l].qw[static_cast<size_t>(p)];
        const PackedWeight& wb = b->layers[l].qw[static_cast<size_t>(p)];
        ASSERT_TRUE(wa.out == wb.out && wa.in == wb.in && wa.in > 0) << l << " " << p;
        std::vector<int8_t> ra(static_cast<size_t>(wa.in)), rb(ra.size());
        for (int64_t o = 0; o < wa.out; ++o) {
          unpack_row(wa, o, ra.data());
          unpack_row(wb, o, rb.data());
          for (size_t i = 0; i < ra.size(); ++i) flips += ra[i] != rb[i];
          codes += wa.in;
        }
      }
  } else {
    auto a = ModelDir::open(dir + "/out");
    auto b = ModelDir::open(dir + "/reference");
    ASSERT_TRUE(a.is_ok() && b.is_ok());
    for (int64_t l = 0; l < 3; ++l)
      for (const char* proj : kProjNames) {
        auto qa = read_quantized_linear(**a, layer_prefix(l) + proj);
        auto qb = read_quantized_linear(**b, layer_prefix(l) + proj);
        ASSERT_TRUE(qa.is_ok() && qb.is_ok());
        for (size_t i = 0; i < qa->q.size(); ++i) flips += qa->q[i] != qb->q[i];
        codes += static_cast<int64_t>(qa->q.size());
      }
  }
  auto fp = calib::open_eval_model(spec.model);
  auto m2 = calib::open_eval_model(dir + "/out");
  auto m1 = calib::open_eval_model(dir + "/reference");
  ASSERT_TRUE(fp.is_ok() && m1.is_ok() && m2.is_ok());
  auto e1 = evaluate_stream(**m1, fp->get(), *calib);
  auto e2 = evaluate_stream(**m2, fp->get(), *calib);
  ASSERT_TRUE(e1.is_ok() && e2.is_ok());
  std::printf(
      "%s: 2-rank service checkpoint vs qcal quantize: %lld of %lld codes differ; "
      "KL to FP %.5g vs %.5g, ppl %.4f vs %.4f\n",
      name.c_str(), static_cast<long long>(flips), static_cast<long long>(codes), *e2->kl, *e1->kl,
      e2->ppl, e1->ppl);
  EXPECT_LE(std::fabs(*e2->kl - *e1->kl), 0.25 * *e1->kl);
  EXPECT_LE(static_cast<double>(flips), max_flip_share * static_cast<double>(codes));
  fs::remove_all(dir);
}

TEST(RankGroupMpi, WorkerBinaryUnderMpirun) {
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) GTEST_SKIP() << "parent-side test";
  run_worker_group("gptq", {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}},
                   {plan::kQuantize}, 0.05);
}

// FlatQuant transform tasks and CBQ windows (LoRA-Rounding) through the worker
// binary: the fitted transforms agree to 1e-3 of their magnitude
// (TwoRanksMatchOneRank) and each window flips ≤ 1% of its codes on the same
// inputs; here the windows also see the slightly different transforms, so the
// bound is 2% of all codes (measured: 1.2%, 1305 of 110592, KL 0.0156 vs 0.0169).
TEST(RankGroupMpi, WorkerBinaryUnderMpirunFlatQuantCbq) {
  if (std::getenv("OMPI_COMM_WORLD_SIZE")) GTEST_SKIP() << "parent-side test";
  run_worker_group("flatquant_cbq",
                   {{"transform", "flatquant"},
                    {"w_bits", 4},
                    {"a_bits", 4},
                    {"kv_bits", 4},
                    {"epochs", 1},
                    {"cali_bsz", 4},
                    {"weight_solver", "lora-rounding"},
                    {"reconstruction", "cbq"},
                    {"cbq_window", 2},
                    {"cbq_overlap", 1},
                    {"cbq_epochs", 1},
                    {"lora_rank", 4}},
                   {plan::kTransform, plan::kCbqWindow}, 0.02);
}

}  // namespace
}  // namespace qcal

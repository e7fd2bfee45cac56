// labels: integration
// The worker loop against a real redis-server: a job runs to success with
// output byte-identical to `qcal quantize`'s; a corrupted artifact sends its
// producer back to work and the job still succeeds byte-identically; a stop
// request finishes the current task; a cancelled job's task is abandoned
// unreported; and the qcal-worker binary's --once and SIGTERM paths.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/output_manifest.h"
#include "common/plan.h"
#include "tests/unit/redis_fixture.h"
#include "common/planner.h"
#include "worker/local_runner.h"
#include "worker/engine/synth.h"
#include "worker/worker.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int64_t kLayers = 2;
constexpr int64_t kSeqlen = 16;
constexpr int64_t kNSamples = 8;

std::string* g_dir = nullptr;
std::string dir() { return *g_dir; }
std::string model_dir() { return dir() + "/model"; }
std::string calib_path() { return dir() + "/calib.jsonl"; }

class WorkerEnv : public ::testing::Environment {
 public:
  void SetUp() override {
    g_dir =
        new std::string(fs::temp_directory_path() / ("qcal_worker_" + std::to_string(::getpid())));
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
    o.seed = 9;
    ASSERT_TRUE(synth_model(o, model_dir()).is_ok());
    ASSERT_TRUE(
        write_tokens_jsonl(calib_path(), synth_tokens(kSeqlen * kNSamples, 128, 5), 33).is_ok());
  }
  void TearDown() override {
    fs::remove_all(*g_dir);
    delete g_dir;
  }
};
const auto* const kEnv = ::testing::AddGlobalTestEnvironment(new WorkerEnv);

JobSpec make_spec(const std::string& out) {
  nlohmann::json j = {
      {"model", model_dir()},
      {"recipe", {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}}},
      {"calib", {{"path", calib_path()}, {"nsamples", kNSamples}, {"seqlen", kSeqlen}}},
      {"eval", {{"path", calib_path()}, {"seqlen", kSeqlen}}},
      {"output", {{"path", out}}},
      {"gate", {{"max_kl", 1.0}}}};
  auto s = parse_job_spec(j);
  EXPECT_TRUE(s.is_ok()) << s.status().to_string();
  return *s;
}

// The planned DAG: embed → quantize-0000 → quantize-0001 → assemble → validate.
std::vector<TaskDef> dag() {
  auto p = plan_job(make_spec(dir() + "/unused"), {});
  EXPECT_TRUE(p.is_ok()) << p.status().to_string();
  return p.is_ok() ? p->tasks : std::vector<TaskDef>{};
}

// `qcal quantize` with the same spec (in process), once.
std::string reference_output() {
  static std::string out;
  if (!out.empty()) return out;
  JobSpec spec = make_spec(dir() + "/reference");
  auto r = run_job_locally(spec);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  out = spec.output.path;
  return out;
}

void expect_same_tree(const std::string& a, const std::string& b) {
  std::vector<std::string> fa, fb;
  for (const auto& e : fs::recursive_directory_iterator(a))
    if (e.is_regular_file() && e.path().filename() != kOutputManifestName)
      fa.push_back(fs::relative(e.path(), a).string());
  // The manifest names who published (job, attempt): not part of the checkpoint.
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
    EXPECT_TRUE(*x == *y) << f << " differs";
  }
}

class WorkerTest : public qcal::testing::RedisTest {
 protected:
  void SetUp() override {
    RedisTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    client_ = std::make_unique<RedisClient>(redis().options());
    store_ = std::make_unique<JobStore>(*client_);
    ASSERT_TRUE(store_->init().is_ok());
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    out_ = dir() + "/out_" + name;
    artifacts_ = std::make_unique<ArtifactStore>(dir() + "/store_" + name);
    group_ = RankGroup::single();
  }
  void TearDown() override {
    store_.reset();
    client_.reset();
    RedisTest::TearDown();
  }
  WorkerOptions worker_opts(const std::string& id) {
    WorkerOptions o;
    o.worker_id = id;
    o.lease_ms = 5000;
    o.block_ms = 100;
    return o;
  }
  std::string create_job() {
    auto id = store_->create_job(make_spec(out_), dag());
    EXPECT_TRUE(id.is_ok()) << id.status().to_string();
    return *id;
  }
  JobState job_state(const std::string& id) {
    auto j = store_->get_job(id);
    EXPECT_TRUE(j.is_ok());
    return j.is_ok() ? j->state : JobState::kFailed;
  }
  TaskInfo task(const std::string& job, const std::string& id) {
    auto ts = store_->get_tasks(job);
    EXPECT_TRUE(ts.is_ok());
    for (const auto& t : *ts)
      if (t.def.id == id) return t;
    ADD_FAILURE() << "no task " << id;
    return {};
  }
  // Drives run_once until the job is terminal (or `max_steps` claims).
  void drive(Worker& w, const std::string& job, int max_steps = 50) {
    for (int i = 0; i < max_steps && !is_terminal(job_state(job)); ++i) {
      auto r = w.run_once();
      ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    }
  }

  std::unique_ptr<RedisClient> client_;
  std::unique_ptr<JobStore> store_;
  std::unique_ptr<ArtifactStore> artifacts_;
  std::unique_ptr<RankGroup> group_;
  std::string out_;
};

TEST_F(WorkerTest, JobSucceedsByteIdentical) {
  const std::string job = create_job();
  Worker w(worker_opts("w-threads"), redis().options(), artifacts_.get(), group_.get());
  Status run_status;
  std::thread t([&] { run_status = w.run(); });
  const auto deadline = Clock::now() + std::chrono::seconds(120);
  while (!is_terminal(job_state(job)) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  w.request_stop();
  t.join();
  EXPECT_TRUE(run_status.is_ok()) << run_status.to_string();

  auto info = store_->get_job(job);
  ASSERT_TRUE(info.is_ok());
  ASSERT_EQ(info->state, JobState::kSucceeded) << info->error;
  EXPECT_EQ(w.stats().completed, 5);
  EXPECT_EQ(w.stats().failed, 0);
  EXPECT_TRUE(info->report.contains("kl")) << info->report.dump();
  expect_same_tree(out_, reference_output());

  auto log = store_->get_log(job);
  ASSERT_TRUE(log.is_ok());
  bool claimed = false, done = false;
  for (const auto& l : *log) {
    claimed = claimed || l.find("claimed quantize-0001") != std::string::npos;
    done = done || l.find("validate done") != std::string::npos;
  }
  EXPECT_TRUE(claimed && done) << "job log has " << log->size() << " lines";
}

TEST_F(WorkerTest, CorruptArtifactRerunsProducer) {
  const std::string job = create_job();
  Worker w(worker_opts("w-once"), redis().options(), artifacts_.get(), group_.get());
  // One task per call, as `qcal-worker --once` would: embed first.
  auto r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  TaskInfo cap = task(job, "embed");
  ASSERT_EQ(cap.state, TaskState::kDone);
  ArtifactRef x = *ArtifactRef::from_json(cap.result["artifacts"]["x"]);
  {
    std::fstream f(artifacts_->absolute(x.path), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(x.bytes / 2));
    f.put('\x55');
    f.seekp(static_cast<std::streamoff>(x.bytes / 2 + 1));
    f.put('\x2a');
  }
  ASSERT_EQ(artifacts_->verify(x).code(), Code::kCorrupt);

  // quantize-0000 finds the corruption: embed goes back to the queue.
  r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  EXPECT_EQ(w.stats().reruns, 1);
  EXPECT_NE(task(job, "embed").state, TaskState::kDone);
  EXPECT_NE(task(job, "quantize-0000").state, TaskState::kDone);

  drive(w, job);
  auto info = store_->get_job(job);
  ASSERT_TRUE(info.is_ok());
  ASSERT_EQ(info->state, JobState::kSucceeded) << info->error;
  EXPECT_EQ(task(job, "embed").attempts, 2);
  EXPECT_EQ(w.stats().reruns, 1);
  expect_same_tree(out_, reference_output());
  bool logged = false;
  auto log = store_->get_log(job);
  ASSERT_TRUE(log.is_ok());
  for (const auto& l : *log)
    logged = logged || (l.find("corrupt") != std::string::npos &&
                        l.find("re-running embed") != std::string::npos);
  EXPECT_TRUE(logged);
}

TEST_F(WorkerTest, StopRequestFinishesCurrentTask) {
  const std::string job = create_job();
  Worker w(worker_opts("w-stop"), redis().options(), artifacts_.get(), group_.get());
  // The stop arrives in the middle of the first task (while it writes its
  // artifact), as a SIGTERM would.
  int hook_calls = 0;
  artifacts_->set_fault_hook([&](const std::string&) {
    if (hook_calls++ == 0) w.request_stop();
    return Status::ok();
  });
  Status s = w.run();
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(w.stats().completed, 1);
  EXPECT_EQ(task(job, "embed").state, TaskState::kDone);
  EXPECT_EQ(task(job, "quantize-0000").state, TaskState::kReady);
  EXPECT_EQ(job_state(job), JobState::kRunning);

  // Another worker picks the job up where it stopped.
  artifacts_->set_fault_hook(nullptr);
  Worker w2(worker_opts("w-next"), redis().options(), artifacts_.get(), group_.get());
  drive(w2, job);
  ASSERT_EQ(job_state(job), JobState::kSucceeded);
  EXPECT_EQ(w2.stats().completed, 4);
  expect_same_tree(out_, reference_output());
}

TEST_F(WorkerTest, CancelledJobIsAbandonedUnreported) {
  const std::string job = create_job();
  WorkerOptions o = worker_opts("w-cancel");
  o.lease_ms = 300;  // heartbeat every 100 ms
  Worker w(o, redis().options(), artifacts_.get(), group_.get());
  artifacts_->set_fault_hook([&](const std::string&) {
    RedisClient c(redis().options());
    JobStore js(c);
    EXPECT_TRUE(js.cancel_job(job).is_ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(400));  // > one heartbeat
    return Status::ok();
  });
  auto r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  EXPECT_EQ(w.stats().abandoned, 1);
  EXPECT_EQ(w.stats().completed, 0);
  EXPECT_EQ(job_state(job), JobState::kCancelled);
  EXPECT_NE(task(job, "embed").state, TaskState::kDone);
}

TEST_F(WorkerTest, InvalidJobFailsWithoutRetry) {
  JobSpec spec = make_spec(out_);
  spec.calib.path = dir() + "/missing.jsonl";
  auto job = store_->create_job(spec, dag());
  ASSERT_TRUE(job.is_ok());
  Worker w(worker_opts("w-bad"), redis().options(), artifacts_.get(), group_.get());
  drive(w, *job, 5);
  auto info = store_->get_job(*job);
  ASSERT_TRUE(info.is_ok());
  EXPECT_EQ(info->state, JobState::kFailed);
  EXPECT_NE(info->error.find("missing.jsonl"), std::string::npos) << info->error;
  EXPECT_EQ(w.stats().failed, 1);  // not retried
}

// ---- issue #11: a worker survives what a task throws, times out, fills the disk

TEST_F(WorkerTest, AnExceptionInATaskIsAFailedAttemptAndTheWorkerStaysUp) {
  const std::string job = create_job();
  Worker w(worker_opts("w-throw"), redis().options(), artifacts_.get(), group_.get());
  // std::bad_alloc out of the middle of the capture task (its artifact write).
  artifacts_->set_fault_hook([](const std::string&) -> Status { throw std::bad_alloc(); });
  auto r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  auto info = store_->get_job(job);
  ASSERT_TRUE(info.is_ok());
  EXPECT_EQ(info->state, JobState::kFailed);
  EXPECT_NE(info->error.find("out of memory (std::bad_alloc)"), std::string::npos) << info->error;
  EXPECT_NE(info->error.find(calib_path()), std::string::npos) << info->error;  // names the file
  EXPECT_EQ(w.stats().failed, 1);
  // The same worker takes the next job.
  artifacts_->set_fault_hook(nullptr);
  out_ += "_2";
  const std::string next = create_job();
  drive(w, next);
  EXPECT_EQ(job_state(next), JobState::kSucceeded);
}

TEST_F(WorkerTest, ATaskPastItsTimeoutIsStoppedAndFails) {
  const std::string job = create_job();
  WorkerOptions o = worker_opts("w-slow");
  o.task_timeout_s = 0.3;
  Worker w(o, redis().options(), artifacts_.get(), group_.get());
  artifacts_->set_fault_hook([](const std::string&) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    return Status::ok();
  });
  auto r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  auto info = store_->get_job(job);
  ASSERT_TRUE(info.is_ok());
  EXPECT_EQ(info->state, JobState::kFailed);
  EXPECT_NE(info->error.find("task timeout"), std::string::npos) << info->error;
}

TEST_F(WorkerTest, ADiskFullAttemptIsCleanedAndTheRetrySucceeds) {
  const std::string job = create_job();
  Worker w(worker_opts("w-full"), redis().options(), artifacts_.get(), group_.get());
  // The first embed attempt finds the disk full after writing its artifact.
  int calls = 0;
  artifacts_->set_fault_hook([&](const std::string& path) {
    if (calls++ > 0) return Status::ok();
    return io_error(path + ".tmp: write: No space left on device (disk full)");
  });
  auto r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  EXPECT_EQ(task(job, "embed").state, TaskState::kReady);  // retried, not failed
  const std::string a1 = artifacts_->absolute("jobs/" + job + "/embed/a1");
  EXPECT_FALSE(fs::exists(a1)) << "attempt 1's artifacts were not cleaned";
  drive(w, job);
  auto info = store_->get_job(job);
  ASSERT_TRUE(info.is_ok());
  ASSERT_EQ(info->state, JobState::kSucceeded) << info->error;
  EXPECT_EQ(task(job, "embed").attempts, 2);
  expect_same_tree(out_, reference_output());
}

TEST_F(WorkerTest, APathThatLeftTheRootsFailsTheTask) {
  // Submitted when the model was inside the roots; the worker's roots do not
  // hold it (a changed symlink, another mount): 403's message, not retried.
  const std::string job = create_job();
  WorkerOptions o = worker_opts("w-confined");
  fs::create_directories(dir() + "/elsewhere");
  auto policy = PathPolicy::make({dir() + "/elsewhere"}, {dir() + "/elsewhere"}, "");
  ASSERT_TRUE(policy.is_ok()) << policy.status().to_string();
  o.paths = std::make_shared<const PathPolicy>(*policy);
  Worker w(o, redis().options(), artifacts_.get(), group_.get());
  auto r = w.run_once();
  ASSERT_TRUE(r.is_ok() && *r);
  auto info = store_->get_job(job);
  ASSERT_TRUE(info.is_ok());
  EXPECT_EQ(info->state, JobState::kFailed);
  EXPECT_NE(info->error.find("PERMISSION_DENIED: model: "), std::string::npos) << info->error;
  EXPECT_EQ(w.stats().failed, 1);
}

// ---- the binary

std::string worker_binary() { return std::string(QCAL_BINARY_DIR) + "/worker/qcal-worker"; }

pid_t spawn(const std::vector<std::string>& args) {
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid, int timeout_s) {
  const auto deadline = Clock::now() + std::chrono::seconds(timeout_s);
  int status = 0;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (Clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST_F(WorkerTest, BinaryOnceAndSigterm) {
  if (!fs::exists(worker_binary())) GTEST_SKIP() << worker_binary() << " not built";
  const std::string job = create_job();
  const std::string url = "127.0.0.1:" + std::to_string(redis().port());
  const std::string store = artifacts_->root();
  pid_t p = spawn({worker_binary(), "--redis", url, "--store", store, "--worker-id", "bin-1",
                   "--block-ms", "100", "--threads", "1", "--once", "--allow-read", dir(),
                   "--allow-write", dir()});
  EXPECT_EQ(wait_exit(p, 60), 0);
  EXPECT_EQ(task(job, "embed").state, TaskState::kDone);
  EXPECT_EQ(task(job, "embed").worker, "bin-1");
  EXPECT_NE(task(job, "quantize-0000").state, TaskState::kDone);

  // SIGTERM while running: finish (here: the whole remaining job, or the
  // current task) and exit 0.
  p = spawn({worker_binary(), "--redis", url, "--store", store, "--worker-id", "bin-2",
             "--block-ms", "100", "--threads", "1", "--allow-read", dir(), "--allow-write", dir()});
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (!is_terminal(job_state(job)) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(job_state(job), JobState::kSucceeded);
  kill(p, SIGTERM);
  EXPECT_EQ(wait_exit(p, 30), 0);
  expect_same_tree(out_, reference_output());

  // Bad flags: usage error, exit 2.
  p = spawn({worker_binary(), "--store", store});
  EXPECT_EQ(wait_exit(p, 30), 2);
}

}  // namespace
}  // namespace qcal

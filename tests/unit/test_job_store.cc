// labels: integration
// JobStore against a real redis-server (tests/unit/redis_fixture.h).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/job_store.h"
#include "tests/unit/redis_fixture.h"

namespace qcal {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

JobSpec make_spec(const std::string& priority = "normal",
                  const std::map<std::string, std::string>& labels = {}) {
  // One live job per output path (job_store.h): each job writes its own.
  static int outputs = 0;
  json j = {{"model", "/m"},
            {"calib", {{"path", "/c.jsonl"}}},
            {"output", {{"path", "/out/" + std::to_string(outputs++)}}},
            {"priority", priority}};
  j["labels"] = json::object();
  for (const auto& [k, v] : labels) j["labels"][k] = v;
  auto s = parse_job_spec(j);
  QCAL_CHECK(s.is_ok());
  return *s;
}

TaskDef task(const std::string& id, const std::string& type, std::vector<std::string> deps = {}) {
  TaskDef t;
  t.id = id;
  t.type = type;
  t.deps = std::move(deps);
  t.params = {{"id", id}};
  t.mem_bytes = 1 << 20;
  return t;
}

// capture → calibrate-0000 → calibrate-0001 → validate
std::vector<TaskDef> chain() {
  return {task("capture", "capture"), task("calibrate-0000", "calibrate", {"capture"}),
          task("calibrate-0001", "calibrate", {"calibrate-0000"}),
          task("validate", "validate", {"calibrate-0001"})};
}

class JobStoreTest : public qcal::testing::RedisTest {
 protected:
  void SetUp() override {
    qcal::testing::RedisTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    client_ = std::make_unique<RedisClient>(redis().options());
    store_ = std::make_unique<JobStore>(*client_, opts_);
    ASSERT_TRUE(store_->init().is_ok());
  }
  void TearDown() override {
    store_.reset();
    client_.reset();
    qcal::testing::RedisTest::TearDown();
  }
  JobStore& store() { return *store_; }

  Claim must_claim(const std::string& worker, int64_t lease_ms = 60000) {
    auto c = store().claim_task(worker, lease_ms, 0);
    EXPECT_TRUE(c.is_ok()) << c.status().to_string();
    if (!c.is_ok() || !c->has_value()) {
      ADD_FAILURE() << "nothing to claim for " << worker;
      return Claim{};
    }
    return **c;
  }
  bool nothing_to_claim(const std::string& worker, int64_t lease_ms = 60000) {
    auto c = store().claim_task(worker, lease_ms, 0);
    EXPECT_TRUE(c.is_ok()) << c.status().to_string();
    return c.is_ok() && !c->has_value();
  }
  JobInfo job(const std::string& id) {
    auto j = store().get_job(id);
    EXPECT_TRUE(j.is_ok()) << j.status().to_string();
    return j.is_ok() ? *j : JobInfo{};
  }
  TaskInfo task_info(const std::string& job_id, const std::string& task_id) {
    auto ts = store().get_tasks(job_id);
    EXPECT_TRUE(ts.is_ok());
    for (auto& t : *ts) {
      if (t.def.id == task_id) return t;
    }
    ADD_FAILURE() << "no task " << task_id;
    return TaskInfo{};
  }

  JobStoreOptions opts_;
  std::unique_ptr<RedisClient> client_;
  std::unique_ptr<JobStore> store_;
};

TEST_F(JobStoreTest, ChainWalksToSucceededInOrder) {
  auto id = store().create_job(make_spec(), chain(), "sched-1");
  ASSERT_TRUE(id.is_ok()) << id.status().to_string();
  EXPECT_EQ(id->rfind("j-", 0), 0u);
  EXPECT_EQ(id->size(), 2 + 13 + 1 + 8u) << *id;
  EXPECT_TRUE(is_job_id(*id)) << *id;

  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kQueued);
  EXPECT_EQ(j.tasks_total, 4);
  EXPECT_EQ(j.tasks_done, 0);
  EXPECT_EQ(j.schedule_id, "sched-1");
  EXPECT_EQ(j.spec["model"], "/m");
  EXPECT_GT(j.created_at, 1.6e9);

  auto tasks = store().get_tasks(*id);
  ASSERT_TRUE(tasks.is_ok());
  ASSERT_EQ(tasks->size(), 4u);
  EXPECT_EQ((*tasks)[0].state, TaskState::kReady);
  EXPECT_EQ((*tasks)[1].state, TaskState::kWaiting);
  EXPECT_EQ((*tasks)[1].def.deps, std::vector<std::string>{"capture"});
  EXPECT_EQ((*tasks)[1].def.params["id"], "calibrate-0000");
  EXPECT_EQ((*tasks)[1].def.mem_bytes, 1u << 20);
  EXPECT_EQ(*store().queue_depth(), 1);

  const std::vector<std::string> expected = {"capture", "calibrate-0000", "calibrate-0001",
                                             "validate"};
  for (size_t i = 0; i < expected.size(); ++i) {
    Claim c = must_claim("w1");
    ASSERT_EQ(c.task_id, expected[i]);
    EXPECT_EQ(c.job_id, *id);
    EXPECT_EQ(c.attempt, 1);
    EXPECT_EQ(c.task.state, TaskState::kRunning);
    EXPECT_EQ(c.task.worker, "w1");
    EXPECT_EQ(c.task.def.type, i == 0 ? "capture" : i == 3 ? "validate" : "calibrate");
    EXPECT_EQ(c.job.state, i == 3 ? JobState::kValidating : JobState::kRunning);
    // The next task is not ready until this one is done.
    EXPECT_TRUE(nothing_to_claim("w2"));
    auto hb = store().heartbeat(c, "w1");
    ASSERT_TRUE(hb.is_ok());
    EXPECT_TRUE(*hb);
    json result = {{"artifacts", {{"x", {{"path", c.task_id}}}}}};
    if (i == 3) result = {{"gate_passed", true}, {"report", {{"ppl", 5.5}}}};
    ASSERT_TRUE(store().complete_task(c, result).is_ok());
    EXPECT_EQ(job(*id).tasks_done, static_cast<int64_t>(i + 1));
  }
  j = job(*id);
  EXPECT_EQ(j.state, JobState::kSucceeded);
  EXPECT_EQ(j.report["ppl"], 5.5);
  EXPECT_EQ(task_info(*id, "calibrate-0001").result["artifacts"]["x"]["path"], "calibrate-0001");
  EXPECT_GE(task_info(*id, "capture").finished_at, task_info(*id, "capture").started_at);
  EXPECT_EQ(*store().queue_depth(), 0);
  EXPECT_TRUE(nothing_to_claim("w1"));
  auto counts = store().job_counts();
  ASSERT_TRUE(counts.is_ok());
  EXPECT_EQ((*counts)["succeeded"], 1);
  EXPECT_EQ((*counts)["queued"], 0);
}

TEST_F(JobStoreTest, ParallelFanOutAndFanIn) {
  std::vector<TaskDef> tasks = {task("capture", "capture")};
  std::vector<std::string> cals;
  for (int i = 0; i < 3; ++i) {
    cals.push_back("calibrate-000" + std::to_string(i));
    tasks.push_back(task(cals.back(), "calibrate", {"capture"}));
  }
  tasks.push_back(task("assemble", "assemble", cals));
  auto id = store().create_job(make_spec(), tasks);
  ASSERT_TRUE(id.is_ok());
  Claim cap = must_claim("w");
  ASSERT_TRUE(store().complete_task(cap, json::object()).is_ok());
  EXPECT_EQ(*store().queue_depth(), 3);
  std::vector<Claim> running;
  for (int i = 0; i < 3; ++i) running.push_back(must_claim("w" + std::to_string(i)));
  std::set<std::string> got;
  for (auto& c : running) got.insert(c.task_id);
  EXPECT_EQ(got, std::set<std::string>(cals.begin(), cals.end()));
  EXPECT_TRUE(nothing_to_claim("w9"));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(task_info(*id, "assemble").state, TaskState::kWaiting);
    ASSERT_TRUE(store().complete_task(running[i], json::object()).is_ok());
  }
  Claim as = must_claim("w");
  EXPECT_EQ(as.task_id, "assemble");
  ASSERT_TRUE(store().complete_task(as, json::object()).is_ok());
  EXPECT_EQ(job(*id).state, JobState::kSucceeded);
}

TEST_F(JobStoreTest, InvalidGraphsAreRejected) {
  EXPECT_EQ(store().create_job(make_spec(), {}).status().code(), Code::kInvalidInput);
  EXPECT_EQ(store().create_job(make_spec(), {task("a", "capture", {"nope"})}).status().code(),
            Code::kInvalidInput);
  EXPECT_EQ(store()
                .create_job(make_spec(), {task("a", "capture", {"b"}), task("b", "capture", {"a"})})
                .status()
                .code(),
            Code::kInvalidInput);
  EXPECT_EQ(store().create_job(make_spec(), {task("a", "x"), task("a", "y")}).status().code(),
            Code::kInvalidInput);
  // Tasks given out of order are stored in DAG order.
  auto id = store().create_job(make_spec(), {task("b", "calibrate", {"a"}), task("a", "capture")});
  ASSERT_TRUE(id.is_ok());
  auto tasks = store().get_tasks(*id);
  ASSERT_TRUE(tasks.is_ok());
  EXPECT_EQ((*tasks)[0].def.id, "a");
  EXPECT_EQ(store().get_job("j-0-deadbeef").status().code(), Code::kNotFound);
  EXPECT_EQ(store().get_tasks("j-0-deadbeef").status().code(), Code::kNotFound);
}

TEST_F(JobStoreTest, HigherPriorityIsClaimedFirst) {
  auto low = store().create_job(make_spec("low"), {task("t", "capture")});
  auto normal = store().create_job(make_spec("normal"), {task("t", "capture")});
  auto high = store().create_job(make_spec("high"), {task("t", "capture")});
  ASSERT_TRUE(low.is_ok() && normal.is_ok() && high.is_ok());
  EXPECT_EQ(job(*high).priority, Priority::kHigh);
  EXPECT_EQ(must_claim("w").job_id, *high);
  EXPECT_EQ(must_claim("w").job_id, *normal);
  EXPECT_EQ(must_claim("w").job_id, *low);
}

TEST_F(JobStoreTest, CancelSkipsQueuedEntriesAndStopsHeartbeats) {
  auto id = store().create_job(
      make_spec(), {task("a", "calibrate"), task("b", "calibrate"), task("c", "assemble", {"a"})});
  ASSERT_TRUE(id.is_ok());
  Claim a = must_claim("w1");
  ASSERT_TRUE(store().cancel_job(*id).is_ok());
  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kCancelled);
  auto tasks = store().get_tasks(*id);
  ASSERT_TRUE(tasks.is_ok());
  for (const auto& t : *tasks) EXPECT_EQ(t.state, TaskState::kCancelled);
  auto hb = store().heartbeat(a, "w1");
  ASSERT_TRUE(hb.is_ok());
  EXPECT_FALSE(*hb);
  EXPECT_TRUE(nothing_to_claim("w2"));
  // A late report of the cancelled task changes nothing.
  ASSERT_TRUE(store().complete_task(a, json::object()).is_ok());
  EXPECT_EQ(job(*id).state, JobState::kCancelled);
  EXPECT_EQ(job(*id).tasks_done, 0);
  EXPECT_EQ(*store().queue_depth(), 0);
  EXPECT_EQ(store().cancel_job(*id).code(), Code::kInvalidInput);
  EXPECT_EQ(store().cancel_job("j-1-00000000").code(), Code::kNotFound);
  EXPECT_EQ(store().job_counts()->at("cancelled"), 1);
}

TEST_F(JobStoreTest, CancelledEntriesAreSkippedEvenIfStillQueued) {
  // An entry that is still in the stream when its job ends (e.g. written by a
  // racing re-enqueue) is acknowledged and skipped at claim time.
  auto id = store().create_job(make_spec(), {task("a", "calibrate")});
  auto other = store().create_job(make_spec(), {task("z", "calibrate")});
  ASSERT_TRUE(id.is_ok() && other.is_ok());
  ASSERT_TRUE(store().cancel_job(*id).is_ok());
  ASSERT_TRUE(
      client_->command({"XADD", "qcal:queue:normal", "*", "job", *id, "task", "a"}).is_ok());
  Claim c = must_claim("w");
  EXPECT_EQ(c.job_id, *other);
  EXPECT_TRUE(nothing_to_claim("w"));
  EXPECT_EQ(*store().queue_depth(), 1);  // only c's pending entry
}

TEST_F(JobStoreTest, ExpiredLeaseIsReclaimedAndTheLateReportIgnored) {
  auto id = store().create_job(make_spec(), {task("a", "calibrate"), task("b", "assemble", {"a"})});
  ASSERT_TRUE(id.is_ok());
  Claim a = must_claim("wA", 100);
  EXPECT_EQ(a.attempt, 1);
  // Within the lease nobody else gets it.
  EXPECT_TRUE(nothing_to_claim("wB", 100000));
  std::this_thread::sleep_for(std::chrono::milliseconds(250));
  Claim b = must_claim("wB", 100);
  EXPECT_EQ(b.task_id, "a");
  EXPECT_EQ(b.entry_id, a.entry_id);
  EXPECT_EQ(b.attempt, 2);
  EXPECT_NE(b.task.error.find("wA stopped heartbeating"), std::string::npos) << b.task.error;

  auto hb_a = store().heartbeat(a, "wA");
  ASSERT_TRUE(hb_a.is_ok());
  EXPECT_FALSE(*hb_a);
  ASSERT_TRUE(store().complete_task(a, {{"from", "A"}}).is_ok());  // ignored
  TaskInfo t = task_info(*id, "a");
  EXPECT_EQ(t.state, TaskState::kRunning);
  EXPECT_EQ(t.worker, "wB");
  EXPECT_EQ(job(*id).tasks_done, 0);
  ASSERT_TRUE(store().fail_task(a, "late failure", false).is_ok());  // ignored too
  EXPECT_EQ(job(*id).state, JobState::kRunning);

  // B's heartbeats keep it B's, past several lease lengths.
  for (int i = 0; i < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto hb = store().heartbeat(b, "wB");
    ASSERT_TRUE(hb.is_ok());
    EXPECT_TRUE(*hb);
    EXPECT_TRUE(nothing_to_claim("wC", 100));
  }
  ASSERT_TRUE(store().complete_task(b, {{"from", "B"}}).is_ok());
  EXPECT_EQ(task_info(*id, "a").result["from"], "B");
  Claim next = must_claim("wC", 100);
  EXPECT_EQ(next.task_id, "b");
  ASSERT_TRUE(store().complete_task(next, json::object()).is_ok());
  EXPECT_EQ(job(*id).state, JobState::kSucceeded);
  EXPECT_EQ(store().metrics()->at("tasks_reclaimed"), 1);
  auto log = store().get_log(*id);
  ASSERT_TRUE(log.is_ok());
  bool seen = false;
  for (const auto& l : *log) seen = seen || l.find("lease expired") != std::string::npos;
  EXPECT_TRUE(seen);
}

TEST_F(JobStoreTest, CompleteIsIdempotent) {
  auto id = store().create_job(make_spec(), {task("a", "calibrate"), task("b", "assemble", {"a"})});
  ASSERT_TRUE(id.is_ok());
  Claim a = must_claim("w");
  ASSERT_TRUE(store().complete_task(a, {{"n", 1}}).is_ok());
  ASSERT_TRUE(store().complete_task(a, {{"n", 2}}).is_ok());
  EXPECT_EQ(job(*id).tasks_done, 1);
  EXPECT_EQ(task_info(*id, "a").result["n"], 1);
  EXPECT_EQ(*store().queue_depth(), 1);  // b enqueued once
  Claim b = must_claim("w");
  EXPECT_EQ(b.task_id, "b");
  EXPECT_TRUE(nothing_to_claim("w"));
}

TEST_F(JobStoreTest, RetryableFailureReenqueuesThenDeadLetters) {
  auto id = store().create_job(make_spec(), {task("a", "calibrate"), task("b", "calibrate")});
  ASSERT_TRUE(id.is_ok());
  Claim other = must_claim("w0");  // "a" or "b": keep it running
  for (int attempt = 1; attempt <= 3; ++attempt) {
    Claim c = must_claim("w1");
    EXPECT_NE(c.task_id, other.task_id);
    EXPECT_EQ(c.attempt, attempt);
    ASSERT_TRUE(store().fail_task(c, "boom " + std::to_string(attempt), true).is_ok());
    if (attempt < 3) {
      TaskInfo t = task_info(*id, c.task_id);
      EXPECT_EQ(t.state, TaskState::kReady);
      EXPECT_EQ(t.attempts, attempt);
      EXPECT_EQ(t.error, "boom " + std::to_string(attempt));
      EXPECT_EQ(job(*id).state, JobState::kRunning);
    }
  }
  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kFailed);
  EXPECT_NE(j.error.find("failed 3 times: boom 3"), std::string::npos) << j.error;
  EXPECT_EQ(task_info(*id, other.task_id).state, TaskState::kCancelled);
  auto hb = store().heartbeat(other, "w0");
  ASSERT_TRUE(hb.is_ok());
  EXPECT_FALSE(*hb);
  EXPECT_TRUE(nothing_to_claim("w1"));
  EXPECT_EQ(*store().queue_depth(), 0);
  EXPECT_EQ(store().metrics()->at("tasks_failed"), 3);
  EXPECT_EQ(store().metrics()->at("jobs_failed"), 1);
}

TEST_F(JobStoreTest, EntryDeliveredTooOftenIsDeadLettered) {
  opts_.max_attempts = 2;
  store_ = std::make_unique<JobStore>(*client_, opts_);
  auto id = store().create_job(make_spec(), {task("a", "calibrate")});
  ASSERT_TRUE(id.is_ok());
  EXPECT_EQ(must_claim("w1", 50).attempt, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(120));
  EXPECT_EQ(must_claim("w2", 50).attempt, 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(120));
  EXPECT_TRUE(nothing_to_claim("w3", 50));  // third delivery: dead letter
  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kFailed);
  EXPECT_NE(j.error.find("task a failed 2 times: worker w2 stopped heartbeating"),
            std::string::npos)
      << j.error;
  EXPECT_EQ(task_info(*id, "a").state, TaskState::kFailed);
  EXPECT_EQ(*store().queue_depth(), 0);
}

TEST_F(JobStoreTest, NonRetryableFailureFailsTheJob) {
  auto id = store().create_job(make_spec(), chain());
  ASSERT_TRUE(id.is_ok());
  Claim c = must_claim("w");
  ASSERT_TRUE(store().fail_task(c, "model.safetensors: header truncated", false).is_ok());
  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kFailed);
  EXPECT_EQ(j.error, "task capture: model.safetensors: header truncated");
  EXPECT_EQ(task_info(*id, "capture").state, TaskState::kFailed);
  EXPECT_EQ(task_info(*id, "validate").state, TaskState::kCancelled);
  EXPECT_EQ(store().cancel_job(*id).code(), Code::kInvalidInput);
}

TEST_F(JobStoreTest, RerunProducerResetsTheProducerAndTheChainFinishes) {
  auto id = store().create_job(make_spec(), chain());
  ASSERT_TRUE(id.is_ok());
  Claim cap = must_claim("w");
  ASSERT_TRUE(store().complete_task(cap, {{"v", 1}}).is_ok());
  Claim c0 = must_claim("w");
  ASSERT_TRUE(store().complete_task(c0, {{"v", 1}}).is_ok());
  Claim c1 = must_claim("w");
  ASSERT_EQ(c1.task_id, "calibrate-0001");
  EXPECT_EQ(job(*id).tasks_done, 2);

  EXPECT_EQ(store().rerun_producer(c1, "capture", "not a dep").code(), Code::kInvalidInput);
  ASSERT_TRUE(store().rerun_producer(c1, "calibrate-0000", "x: sha256 mismatch").is_ok());
  TaskInfo p = task_info(*id, "calibrate-0000");
  EXPECT_EQ(p.state, TaskState::kReady);
  EXPECT_TRUE(p.result.is_null());
  EXPECT_NE(p.error.find("sha256 mismatch"), std::string::npos);
  EXPECT_EQ(task_info(*id, "calibrate-0001").state, TaskState::kWaiting);
  EXPECT_EQ(job(*id).tasks_done, 1);
  // The consumer's report after giving up its claim is ignored.
  ASSERT_TRUE(store().complete_task(c1, json::object()).is_ok());
  EXPECT_EQ(task_info(*id, "calibrate-0001").state, TaskState::kWaiting);

  Claim again = must_claim("w");
  EXPECT_EQ(again.task_id, "calibrate-0000");
  EXPECT_EQ(again.attempt, 2);
  EXPECT_TRUE(nothing_to_claim("w"));
  ASSERT_TRUE(store().complete_task(again, {{"v", 2}}).is_ok());
  Claim c1b = must_claim("w");
  EXPECT_EQ(c1b.task_id, "calibrate-0001");
  ASSERT_TRUE(store().complete_task(c1b, json::object()).is_ok());
  Claim v = must_claim("w");
  EXPECT_EQ(v.task_id, "validate");
  ASSERT_TRUE(store().complete_task(v, {{"gate_passed", true}}).is_ok());
  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kSucceeded);
  EXPECT_EQ(j.tasks_done, 4);
  EXPECT_EQ(task_info(*id, "calibrate-0000").result["v"], 2);
  EXPECT_EQ(store().metrics()->at("tasks_rerun"), 1);
}

TEST_F(JobStoreTest, RerunFromValidationReturnsTheJobToRunning) {
  auto id = store().create_job(
      make_spec(), {task("assemble", "assemble"), task("validate", "validate", {"assemble"})});
  ASSERT_TRUE(id.is_ok());
  ASSERT_TRUE(store().complete_task(must_claim("w"), json::object()).is_ok());
  Claim v = must_claim("w");
  EXPECT_EQ(job(*id).state, JobState::kValidating);
  ASSERT_TRUE(store().rerun_producer(v, "assemble", "bad shard").is_ok());
  EXPECT_EQ(job(*id).state, JobState::kRunning);
}

TEST_F(JobStoreTest, FailedGateFailsTheJobWithItsReport) {
  auto id = store().create_job(make_spec(), {task("validate", "validate")});
  ASSERT_TRUE(id.is_ok());
  Claim v = must_claim("w");
  json report = {{"ppl_fp", 5.0}, {"ppl_q", 6.0}, {"gate", {{"max_ppl_increase", 0.05}}}};
  ASSERT_TRUE(store().complete_task(v, {{"gate_passed", false}, {"report", report}}).is_ok());
  JobInfo j = job(*id);
  EXPECT_EQ(j.state, JobState::kFailed);
  EXPECT_EQ(j.report, report);
  EXPECT_NE(j.error.find("gate"), std::string::npos) << j.error;
  EXPECT_EQ(task_info(*id, "validate").state, TaskState::kDone);
}

TEST_F(JobStoreTest, ListJobsFiltersByStateAndLabel) {
  std::vector<std::string> ids;
  for (int i = 0; i < 5; ++i) {
    auto id = store().create_job(
        make_spec("normal", {{"team", i % 2 ? "infra" : "research"}, {"n", std::to_string(i)}}),
        {task("t", "capture")});
    ASSERT_TRUE(id.is_ok());
    ids.push_back(*id);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_TRUE(store().cancel_job(ids[1]).is_ok());
  auto all = store().list_jobs(std::nullopt, {});
  ASSERT_TRUE(all.is_ok());
  ASSERT_EQ(all->size(), 5u);
  EXPECT_EQ((*all)[0].id, ids[4]);  // newest first
  EXPECT_EQ((*all)[4].id, ids[0]);
  auto two = store().list_jobs(std::nullopt, {}, 2);
  ASSERT_EQ(two->size(), 2u);
  EXPECT_EQ((*two)[1].id, ids[3]);
  auto infra = store().list_jobs(std::nullopt, {{"team", "infra"}});
  ASSERT_EQ(infra->size(), 2u);
  EXPECT_EQ((*infra)[0].id, ids[3]);
  EXPECT_EQ((*infra)[0].labels.at("team"), "infra");
  auto queued_infra = store().list_jobs(JobState::kQueued, {{"team", "infra"}});
  ASSERT_EQ(queued_infra->size(), 1u);
  EXPECT_EQ((*queued_infra)[0].id, ids[3]);
  auto cancelled = store().list_jobs(JobState::kCancelled, {});
  ASSERT_EQ(cancelled->size(), 1u);
  EXPECT_EQ((*cancelled)[0].id, ids[1]);
  EXPECT_TRUE(store().list_jobs(std::nullopt, {{"team", "nobody"}})->empty());
  EXPECT_TRUE(store().list_jobs(std::nullopt, {{"team", "infra"}, {"n", "3"}})->size() == 1);
  auto counts = *store().job_counts();
  EXPECT_EQ(counts["queued"], 4);
  EXPECT_EQ(counts["cancelled"], 1);
  EXPECT_EQ(counts.size(), 6u);
}

TEST_F(JobStoreTest, LogAppendReadAndCap) {
  opts_.log_lines = 5;
  store_ = std::make_unique<JobStore>(*client_, opts_);
  auto id = store().create_job(make_spec(), {task("t", "capture")});
  ASSERT_TRUE(id.is_ok());
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(store().append_log(*id, "line " + std::to_string(i)).is_ok());
  auto all = store().get_log(*id);
  ASSERT_TRUE(all.is_ok());
  EXPECT_EQ(*all, (std::vector<std::string>{"line 0", "line 1", "line 2"}));
  EXPECT_EQ(*store().get_log(*id, 2), std::vector<std::string>{"line 2"});
  EXPECT_TRUE(store().get_log(*id, 3)->empty());
  // `from` counts every line ever appended, so a follower keeps its place
  // while old lines fall off the cap.
  for (int i = 3; i < 9; ++i)
    ASSERT_TRUE(store().append_log(*id, "line " + std::to_string(i)).is_ok());
  EXPECT_EQ(*store().get_log(*id),
            (std::vector<std::string>{"line 4", "line 5", "line 6", "line 7", "line 8"}));
  EXPECT_EQ(*store().get_log(*id, 7), (std::vector<std::string>{"line 7", "line 8"}));
  EXPECT_EQ(*store().get_log(*id, 1), store().get_log(*id, 0).value());
  EXPECT_EQ(store().append_log("j-1-00000000", "x").code(), Code::kNotFound);
  EXPECT_EQ(store().get_log("j-1-00000000").status().code(), Code::kNotFound);
}

TEST_F(JobStoreTest, MetricsCountAndBucketDurations) {
  auto m0 = store().metrics();
  ASSERT_TRUE(m0.is_ok());
  EXPECT_EQ((*m0)["tasks_completed"], 0);
  EXPECT_EQ(m0->count("task_seconds_bucket_+Inf"), 1u);
  auto id = store().create_job(make_spec(), {task("a", "capture"), task("b", "capture")});
  ASSERT_TRUE(id.is_ok());
  Claim a = must_claim("w");
  Claim b = must_claim("w");
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  ASSERT_TRUE(store().complete_task(a, json::object()).is_ok());
  ASSERT_TRUE(store().fail_task(b, "oops", false).is_ok());
  auto m = *store().metrics();
  EXPECT_EQ(m["tasks_completed"], 1);
  EXPECT_EQ(m["tasks_failed"], 1);
  EXPECT_EQ(m["task_seconds_count"], 1);
  EXPECT_GE(m["task_seconds_sum"], 1.0);
  EXPECT_LT(m["task_seconds_sum"], 5.0);
  EXPECT_EQ(m["task_seconds_bucket_1"], 0);
  EXPECT_EQ(m["task_seconds_bucket_10"], 1);
  EXPECT_EQ(m["task_seconds_bucket_3600"], 1);
  EXPECT_EQ(m["task_seconds_bucket_+Inf"], 1);
  EXPECT_EQ(m["jobs_created"], 1);
  EXPECT_EQ(m["jobs_failed"], 1);
}

TEST_F(JobStoreTest, WorkerRegistry) {
  ASSERT_TRUE(store().worker_seen("a").is_ok());
  ASSERT_TRUE(store().worker_seen("b").is_ok());
  EXPECT_EQ(*store().live_workers(60), 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_TRUE(store().worker_seen("b").is_ok());
  EXPECT_EQ(*store().live_workers(0.2), 1);
}

TEST_F(JobStoreTest, BlockingClaimWakesOnNewWork) {
  std::optional<Claim> got;
  double waited = 0;
  std::thread t([&] {
    RedisClient c(redis().options());
    JobStore s(c);
    auto t0 = Clock::now();
    auto r = s.claim_task("waiter", 60000, 5000);
    waited = std::chrono::duration<double>(Clock::now() - t0).count();
    if (r.is_ok()) got = *r;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto id = store().create_job(make_spec("low"), {task("t", "capture")});
  ASSERT_TRUE(id.is_ok());
  t.join();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->job_id, *id);
  EXPECT_GE(waited, 0.25);
  EXPECT_LT(waited, 2.0);
  // With nothing to do, a blocking claim returns empty after its block time.
  auto t0 = Clock::now();
  auto none = store().claim_task("waiter", 60000, 300);
  ASSERT_TRUE(none.is_ok());
  EXPECT_FALSE(none->has_value());
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_GE(s, 0.28);
  EXPECT_LT(s, 1.5);
}

TEST_F(JobStoreTest, ConcurrentWorkersClaimEachTaskOnce) {
  const int kJobs = 10, kTasks = 20;
  std::vector<std::string> ids;
  for (int j = 0; j < kJobs; ++j) {
    std::vector<TaskDef> tasks;
    for (int i = 0; i < kTasks; ++i) tasks.push_back(task("t" + std::to_string(i), "calibrate"));
    auto id = store().create_job(make_spec(), tasks);
    ASSERT_TRUE(id.is_ok());
    ids.push_back(*id);
  }
  std::atomic<int> done{0}, errors{0};
  std::mutex mu;
  std::multiset<std::string> seen;
  std::vector<std::thread> threads;
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      RedisClient c(redis().options());
      JobStore s(c);
      while (true) {
        auto r = s.claim_task("w" + std::to_string(w), 60000, 0);
        if (!r.is_ok()) {
          ++errors;
          return;
        }
        if (!r->has_value()) return;
        {
          std::lock_guard<std::mutex> l(mu);
          seen.insert((*r)->job_id + "/" + (*r)->task_id);
        }
        if (!s.complete_task(**r, json::object()).is_ok()) ++errors;
        ++done;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors, 0);
  EXPECT_EQ(done, kJobs * kTasks);
  std::set<std::string> unique(seen.begin(), seen.end());
  EXPECT_EQ(unique.size(), seen.size());
  for (const auto& id : ids) EXPECT_EQ(job(id).state, JobState::kSucceeded);
}

TEST_F(JobStoreTest, StateSurvivesARedisRestart) {
  auto id = store().create_job(make_spec(), chain());
  ASSERT_TRUE(id.is_ok());
  Claim c = must_claim("w");
  ASSERT_TRUE(redis().restart()) << redis().error();
  ASSERT_TRUE(store().complete_task(c, json::object()).is_ok());
  Claim next = must_claim("w");
  EXPECT_EQ(next.task_id, "calibrate-0000");
  EXPECT_EQ(job(*id).tasks_done, 1);
}

TEST_F(JobStoreTest, LostGroupIsRecreated) {
  ASSERT_TRUE(client_->command({"FLUSHALL"}).is_ok());
  auto r = store().claim_task("w", 1000, 0);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_FALSE(r->has_value());
}

// The form the coordinator checks URL ids against before building keys.
TEST(JobIds, OnlyTheIssuedFormPasses) {
  EXPECT_TRUE(is_job_id("j-1706659200000-3f9a1c2b"));
  for (const char* bad : {"", "j-", "j-1706659200000-3f9a1c2", "j-1706659200000-3f9a1c2b0",
                          "j-1706659200000-3F9A1C2B", "j-1706659200000-3f9a1c2b:tasks",
                          "j--3f9a1c2b", "j-17x6659200000-3f9a1c2b", "x-1706659200000-3f9a1c2b",
                          "j-1706659200000_3f9a1c2b", "../j-1706659200000-3f9a1c2b"})
    EXPECT_FALSE(is_job_id(bad)) << bad;
}

}  // namespace
}  // namespace qcal

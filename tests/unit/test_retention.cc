// labels: integration
// coordinator/retention.h against a real redis-server: the artifacts of
// finished jobs go after their retention (failed ones kept longer), live
// jobs' stay, unknown jobs' go after the longer retention, stale staging
// entries are removed, and the store's usage is measured.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/fsutil.h"
#include "coordinator/retention.h"
#include "tests/unit/redis_fixture.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class RetentionTest : public qcal::testing::RedisTest {
 protected:
  void SetUp() override {
    qcal::testing::RedisTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    client_ = std::make_unique<RedisClient>(redis().options());
    store_ = std::make_unique<JobStore>(*client_);
    ASSERT_TRUE(store_->init().is_ok());
    root_ = (fs::temp_directory_path() / ("qcal_retention_" + std::to_string(::getpid()))).string();
    fs::remove_all(root_);
    fs::create_directories(root_ + "/jobs");
  }
  void TearDown() override {
    fs::remove_all(root_);
    RedisTest::TearDown();
  }
  // A job with `bytes` of artifacts, ended as `state` (or left queued).
  std::string job_with_artifacts(const std::string& out, size_t bytes, const char* state) {
    auto s = parse_job_spec(
        {{"model", "/m"}, {"calib", {{"path", "/c.jsonl"}}}, {"output", {{"path", out}}}});
    TaskDef t;
    t.id = "capture";
    t.type = "capture";
    auto id = store_->create_job(*s, {t});
    EXPECT_TRUE(id.is_ok());
    fs::create_directories(root_ + "/jobs/" + *id + "/capture/a1");
    std::ofstream(root_ + "/jobs/" + *id + "/capture/a1/x.safetensors") << std::string(bytes, 'x');
    const std::string st = state;
    if (st == "cancelled") {
      EXPECT_TRUE(store_->cancel_job(*id).is_ok());
    } else if (st == "failed" || st == "succeeded") {
      auto c = store_->claim_task("w", 30000, 0);
      EXPECT_TRUE(c.is_ok() && c->has_value());
      if (st == "failed") {
        EXPECT_TRUE(store_->fail_task(**c, "boom", false).is_ok());
      } else {
        EXPECT_TRUE(store_->complete_task(**c, json::object()).is_ok());
      }
    }
    return *id;
  }
  bool has(const std::string& id) const { return fs::exists(root_ + "/jobs/" + id); }

  std::unique_ptr<RedisClient> client_;
  std::unique_ptr<JobStore> store_;
  std::string root_;
};

TEST_F(RetentionTest, FinishedJobsGoAfterTheirRetentionLiveOnesStay) {
  const std::string ok = job_with_artifacts("/o/1", 1000, "succeeded");
  const std::string bad = job_with_artifacts("/o/2", 2000, "failed");
  const std::string gone = job_with_artifacts("/o/3", 3000, "cancelled");
  const std::string live = job_with_artifacts("/o/4", 4000, "queued");
  fs::create_directories(root_ + "/jobs/j-0-unknown");  // not in Redis
  RetentionOptions o;
  o.retain_succeeded_h = 1;
  o.retain_failed_h = 10;
  const double now = static_cast<double>(std::time(nullptr));

  // Right away: everything is within its retention.
  auto r = sweep_store(*store_, root_, o, now);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->jobs_removed, 0);
  EXPECT_EQ(r->job_dirs, 5);
  EXPECT_GE(r->store_bytes, 10000u);
  EXPECT_GT(r->free_bytes, 0u);

  // Two hours on: the succeeded job's artifacts go, the failed / cancelled stay.
  r = sweep_store(*store_, root_, o, now + 2 * 3600);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->jobs_removed, 1);
  EXPECT_EQ(r->bytes_removed, 1000u);
  EXPECT_FALSE(has(ok));
  EXPECT_TRUE(has(bad) && has(gone) && has(live));

  // A day on: the failed, cancelled and unknown ones go too; the live one never.
  r = sweep_store(*store_, root_, o, now + 24 * 3600);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->jobs_removed, 3);
  EXPECT_EQ(r->bytes_removed, 5000u);
  EXPECT_FALSE(has(bad) || has(gone) || has("j-0-unknown"));
  EXPECT_TRUE(has(live));
  EXPECT_EQ(r->job_dirs, 1);
  EXPECT_EQ(r->store_bytes, 4000u);
  // The job records stay in Redis.
  EXPECT_TRUE(store_->get_job(ok).is_ok());

  StoreStats stats;
  stats.record(*r);
  EXPECT_EQ(stats.snapshot().removed_jobs_total, 3);
  EXPECT_EQ(stats.snapshot().store_bytes, 4000u);
}

TEST_F(RetentionTest, StaleStagingIsRemovedByAge) {
  // A partial file of a process on another host, two days old.
  const std::string stale = root_ + "/jobs/x.tmp.otherhost-12345.0";
  std::ofstream(stale) << "partial";
  const auto old = fs::file_time_type::clock::now() - std::chrono::hours(48);
  fs::last_write_time(stale, old);
  const std::string fresh = root_ + "/jobs/y.tmp.otherhost-12345.1";
  std::ofstream(fresh) << "partial";
  RetentionOptions o;
  auto r = sweep_store(*store_, root_, o, static_cast<double>(std::time(nullptr)));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->staging_removed, 1);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(fresh));
}

}  // namespace
}  // namespace qcal

// labels: integration
// JobStore against a real redis-server (issue #11): one live job per output
// path (409 for a second, released when the job ends, robust to a holder that
// vanished), the publishing fence, and text that can never poison a read.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/job_store.h"
#include "common/sanitize.h"
#include "tests/unit/redis_fixture.h"

namespace qcal {
namespace {

using nlohmann::json;

JobSpec spec_for(const std::string& out, const std::map<std::string, std::string>& labels = {}) {
  json j = {{"model", "/m"}, {"calib", {{"path", "/c.jsonl"}}}, {"output", {{"path", out}}}};
  j["labels"] = json::object();
  for (const auto& [k, v] : labels) j["labels"][k] = v;
  auto s = parse_job_spec(j);
  QCAL_CHECK(s.is_ok());
  return *s;
}

std::vector<TaskDef> one_task() {
  TaskDef t;
  t.id = "assemble";
  t.type = "assemble";
  return {t};
}

class OwnershipTest : public qcal::testing::RedisTest {
 protected:
  void SetUp() override {
    qcal::testing::RedisTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    client_ = std::make_unique<RedisClient>(redis().options());
    store_ = std::make_unique<JobStore>(*client_);
    ASSERT_TRUE(store_->init().is_ok());
  }
  Claim claim(const std::string& worker = "w1") {
    auto c = store_->claim_task(worker, 30000, 0);
    EXPECT_TRUE(c.is_ok() && c->has_value());
    return c.is_ok() && c->has_value() ? **c : Claim();
  }
  std::unique_ptr<RedisClient> client_;
  std::unique_ptr<JobStore> store_;
};

TEST_F(OwnershipTest, ASecondLiveJobOnTheSamePathIs409UntilTheFirstEnds) {
  auto a = store_->create_job(spec_for("/out/x"), one_task());
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  // The same path, also written with a trailing slash or a dot segment.
  for (const char* same : {"/out/x", "/out/x/", "/out/./x"}) {
    auto b = store_->create_job(spec_for(same), one_task());
    EXPECT_EQ(b.status().code(), Code::kConflict) << same << ": " << b.status().to_string();
    EXPECT_NE(b.status().message().find(*a), std::string::npos) << b.status().message();
  }
  // Another path is fine.
  EXPECT_TRUE(store_->create_job(spec_for("/out/y"), one_task()).is_ok());
  // Nothing of the refused jobs was stored.
  auto all = store_->list_jobs(std::nullopt, {}, 100);
  ASSERT_TRUE(all.is_ok());
  EXPECT_EQ(all->size(), 2u);
  // Cancelling the owner frees the path.
  ASSERT_TRUE(store_->cancel_job(*a).is_ok());
  auto c = store_->create_job(spec_for("/out/x"), one_task());
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  auto ci = store_->get_job(*c);
  ASSERT_TRUE(ci.is_ok());
  EXPECT_EQ(ci->output_key, "/out/x");
  EXPECT_GT(ci->output_generation, store_->get_job(*a)->output_generation);
}

TEST_F(OwnershipTest, AKeyWhoseHolderEndedOrVanishedIsFree) {
  auto a = store_->create_job(spec_for("/out/z"), one_task());
  ASSERT_TRUE(a.is_ok());
  // A holder whose job hash is gone (deleted keys, an old AOF).
  ASSERT_TRUE(client_->command({"DEL", "qcal:job:" + *a}).is_ok());
  EXPECT_TRUE(store_->create_job(spec_for("/out/z"), one_task()).is_ok());
  // A holder marked terminal without the release (a script from before).
  auto b = store_->create_job(spec_for("/out/w"), one_task());
  ASSERT_TRUE(b.is_ok());
  ASSERT_TRUE(client_->command({"HSET", "qcal:job:" + *b, "state", "failed"}).is_ok());
  EXPECT_TRUE(store_->create_job(spec_for("/out/w"), one_task()).is_ok());
}

TEST_F(OwnershipTest, SuccessReleasesThePath) {
  auto a = store_->create_job(spec_for("/out/s"), one_task());
  ASSERT_TRUE(a.is_ok());
  Claim c = claim();
  ASSERT_TRUE(store_->complete_task(c, json{{"output", "/out/s"}}).is_ok());
  EXPECT_EQ(store_->get_job(*a)->state, JobState::kSucceeded);
  auto owner = client_->command({"GET", "qcal:output:/out/s"});
  ASSERT_TRUE(owner.is_ok());
  EXPECT_TRUE(owner->is_nil());
  EXPECT_TRUE(store_->create_job(spec_for("/out/s"), one_task()).is_ok());
}

TEST_F(OwnershipTest, ThePublishFence) {
  auto a = store_->create_job(spec_for("/out/f"), one_task());
  ASSERT_TRUE(a.is_ok());
  Claim c = claim();
  auto gen = store_->begin_publish(c);
  ASSERT_TRUE(gen.is_ok()) << gen.status().to_string();
  EXPECT_EQ(*gen, store_->get_job(*a)->output_generation);
  EXPECT_TRUE(store_->finish_publish(c).is_ok());
  // finish without begin (another attempt's mark) is refused.
  EXPECT_EQ(store_->finish_publish(c).code(), Code::kConflict);

  // A claim whose job was cancelled may neither begin nor finish.
  ASSERT_TRUE(store_->begin_publish(c).is_ok());
  ASSERT_TRUE(store_->cancel_job(*a).is_ok());
  EXPECT_EQ(store_->finish_publish(c).code(), Code::kConflict);
  EXPECT_EQ(store_->begin_publish(c).status().code(), Code::kConflict);

  // A claim that lost its task to a later attempt (a reclaimed lease).
  auto b = store_->create_job(spec_for("/out/g"), one_task());
  ASSERT_TRUE(b.is_ok());
  Claim first = claim("w1");
  ASSERT_TRUE(
      client_->command({"HSET", "qcal:task:" + *b + ":assemble", "attempts", "2", "worker", "w2"})
          .is_ok());
  auto st = store_->begin_publish(first);
  EXPECT_EQ(st.status().code(), Code::kConflict);
  EXPECT_NE(st.status().message().find("publish fenced"), std::string::npos);
}

TEST_F(OwnershipTest, InvalidUtf8NeverPoisonsReads) {
  auto a = store_->create_job(spec_for("/out/u", {{"team", "infra"}}), one_task());
  ASSERT_TRUE(a.is_ok());
  Claim c = claim();
  // The error: a safetensors header of 0xFF quoted raw.
  const std::string bad = "model.safetensors: bad JSON header: " + std::string(40, '\xFF');
  ASSERT_TRUE(store_->append_log(*a, "line " + bad).is_ok());
  ASSERT_TRUE(store_->fail_task(c, bad, /*retryable=*/false).is_ok());
  auto j = store_->get_job(*a);
  ASSERT_TRUE(j.is_ok());
  EXPECT_EQ(j->state, JobState::kFailed);
  EXPECT_TRUE(is_clean_utf8(j->error));
  EXPECT_NE(j->error.find("\\xFF"), std::string::npos) << j->error;
  // Data stored raw by something else: reads still succeed and are clean.
  ASSERT_TRUE(
      client_
          ->command({"HSET", "qcal:job:" + *a, "labels", std::string("{\"team\": \"\xFF\xFE\"}"),
                     "report", std::string("{\"x\": \"\xC0\"}")})
          .is_ok());
  ASSERT_TRUE(
      client_->command({"RPUSH", "qcal:job:" + *a + ":log", std::string("raw \xFF")}).is_ok());
  auto list = store_->list_jobs(JobState::kFailed, {}, 10);
  ASSERT_TRUE(list.is_ok()) << list.status().to_string();
  ASSERT_EQ(list->size(), 1u);
  json summary = {
      {"error", (*list)[0].error}, {"labels", (*list)[0].labels}, {"report", (*list)[0].report}};
  EXPECT_NO_THROW((void)summary.dump());
  auto log = store_->get_log(*a);
  ASSERT_TRUE(log.is_ok());
  for (const auto& l : *log) EXPECT_TRUE(is_clean_utf8(l)) << l;
  auto tasks = store_->get_tasks(*a);
  ASSERT_TRUE(tasks.is_ok());
  EXPECT_TRUE(is_clean_utf8((*tasks)[0].error));
  // And bounded.
  const std::string huge(1 << 20, 'e');
  ASSERT_TRUE(store_->append_log(*a, huge).is_ok());
  log = store_->get_log(*a);
  ASSERT_TRUE(log.is_ok());
  EXPECT_LE(log->back().size(), kMaxLogLineBytes);
}

}  // namespace
}  // namespace qcal

// worker/publish.h: the filesystem half of the fenced publish, with a fake
// fence (the Redis half is in test_job_store's fence tests and the security
// e2e suite). A fenced-out publisher publishes nothing or undoes what it
// published; a stale one never replaces a newer owner's output; only qcal
// outputs are replaced.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "common/fsutil.h"
#include "common/output_manifest.h"
#include "worker/publish.h"
#include "worker/tasks.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;

class FakeFence : public PublishFence {
 public:
  int64_t generation = 5;
  bool refuse_begin = false, refuse_finish = false;
  std::function<void()> during;  // runs between begin and finish (a concurrent event)
  int begins = 0, finishes = 0;
  Result<int64_t> begin() override {
    ++begins;
    if (refuse_begin) return conflict("publish fenced: job cancelled");
    return generation;
  }
  Status finish() override {
    ++finishes;
    if (during) during();
    if (refuse_finish) return conflict("publish fenced: lease lost");
    return Status::ok();
  }
};

class PublishTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / ("qcal_publish_" + std::to_string(::getpid()))).string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    out_ = dir_ + "/out";
  }
  void TearDown() override { fs::remove_all(dir_); }

  TaskContext ctx(const std::string& job, int64_t attempt, bool overwrite) {
    TaskContext c;
    c.job_id = job;
    c.task.id = "assemble";
    c.attempt = attempt;
    c.spec.output.path = out_;
    c.spec.output.overwrite = overwrite;
    c.fence = &fence_;
    return c;
  }
  // What a writer does: a complete directory at `path`, via publish_dir.
  static void write_checkpoint(const std::string& path, const std::string& content) {
    auto staging = make_staging_dir(path);
    ASSERT_TRUE(staging.is_ok());
    std::ofstream(*staging + "/model.safetensors") << content;
    ASSERT_TRUE(publish_dir(*staging, path, false).is_ok());
  }
  static std::string content(const std::string& dir) {
    std::ifstream in(dir + "/model.safetensors");
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  // Entries in dir_ other than the output: leftovers.
  std::vector<std::string> leftovers() const {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename() != "out") v.push_back(e.path().filename().string());
    return v;
  }
  Status publish(const TaskContext& c, const std::string& what) {
    auto pub = OutputPublication::begin(c);
    if (!pub.is_ok()) return pub.status();
    write_checkpoint(pub->staging(), what);
    return pub->commit();
  }

  std::string dir_, out_;
  FakeFence fence_;
};

TEST_F(PublishTest, PublishesWithAManifestNamingTheOwner) {
  ASSERT_TRUE(publish(ctx("j-1", 1, false), "one").is_ok());
  EXPECT_EQ(content(out_), "one");
  auto m = read_output_manifest(out_);
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->job, "j-1");
  EXPECT_EQ(m->task, "assemble");
  EXPECT_EQ(m->attempt, 1);
  EXPECT_EQ(m->generation, 5);
  EXPECT_EQ(fence_.begins, 1);
  EXPECT_EQ(fence_.finishes, 1);
  EXPECT_TRUE(leftovers().empty());
}

TEST_F(PublishTest, ARerunReplacesItsOwnOutputAndOverwriteAnOlderOne) {
  ASSERT_TRUE(publish(ctx("j-1", 1, false), "one").is_ok());
  // Attempt 2 of the same job (a crash between publishing and reporting).
  ASSERT_TRUE(publish(ctx("j-1", 2, false), "two").is_ok());
  EXPECT_EQ(content(out_), "two");
  // Another job needs overwrite...
  fence_.generation = 6;
  Status st = publish(ctx("j-2", 1, false), "three");
  EXPECT_EQ(st.code(), Code::kInvalidInput) << st.to_string();
  EXPECT_EQ(content(out_), "two");
  // ...and with it replaces the older generation.
  ASSERT_TRUE(publish(ctx("j-2", 1, true), "three").is_ok());
  EXPECT_EQ(content(out_), "three");
  EXPECT_TRUE(leftovers().empty());
}

TEST_F(PublishTest, AStalePublisherNeverReplacesANewerOwner) {
  fence_.generation = 9;
  ASSERT_TRUE(publish(ctx("j-new", 1, true), "new").is_ok());
  // A paused worker of an older job (generation 4) whose fence check passed
  // before its job was cancelled comes back and publishes with overwrite.
  fence_.generation = 4;
  Status st = publish(ctx("j-old", 1, true), "old");
  EXPECT_EQ(st.code(), Code::kConflict) << st.to_string();
  EXPECT_NE(st.message().find("newer owner"), std::string::npos) << st.message();
  EXPECT_EQ(content(out_), "new");
  EXPECT_EQ(read_output_manifest(out_)->job, "j-new");
  EXPECT_TRUE(leftovers().empty());
  // Same job, later attempt in place: the earlier attempt is stale too.
  fence_.generation = 9;
  ASSERT_TRUE(publish(ctx("j-new", 3, false), "attempt 3").is_ok());
  st = publish(ctx("j-new", 2, false), "attempt 2");
  EXPECT_EQ(st.code(), Code::kConflict);
  EXPECT_EQ(content(out_), "attempt 3");
}

TEST_F(PublishTest, FencedOutBeforeTheRenamePublishesNothing) {
  fence_.refuse_begin = true;
  Status st = publish(ctx("j-1", 1, false), "stale");
  EXPECT_TRUE(is_cancelled(st)) << st.to_string();
  EXPECT_FALSE(fs::exists(out_));
  EXPECT_TRUE(leftovers().empty());
}

TEST_F(PublishTest, FencedOutAfterTheRenameIsUndone) {
  ASSERT_TRUE(publish(ctx("j-1", 1, false), "good").is_ok());
  // The job is cancelled between the rename and the fence's second check.
  fence_.refuse_finish = true;
  fence_.generation = 6;
  Status st = publish(ctx("j-2", 1, true), "stale");
  EXPECT_TRUE(is_cancelled(st)) << st.to_string();
  EXPECT_EQ(content(out_), "good");  // the displaced output is back
  EXPECT_EQ(read_output_manifest(out_)->job, "j-1");
  EXPECT_TRUE(leftovers().empty());
  // Nothing there before: the stale output is moved away again.
  fs::remove_all(out_);
  st = publish(ctx("j-3", 1, false), "stale");
  EXPECT_TRUE(is_cancelled(st));
  EXPECT_FALSE(fs::exists(out_));
  EXPECT_TRUE(leftovers().empty());
}

TEST_F(PublishTest, OnlyQcalOutputsAreReplaced) {
  fs::create_directories(out_);
  std::ofstream(out_ + "/precious.txt") << "not qcal's";
  Status st = publish(ctx("j-1", 1, true), "x");
  EXPECT_EQ(st.code(), Code::kPermissionDenied) << st.to_string();
  EXPECT_TRUE(fs::exists(out_ + "/precious.txt"));
  EXPECT_TRUE(leftovers().empty());
}

TEST_F(PublishTest, StaleStagingOfDeadProcessesIsSwept) {
  // What a kill during publish leaves: a partial directory of a dead pid.
  const std::string tag = staging_tag();
  const std::string host = tag.substr(0, tag.rfind('-'));
  const std::string dead = dir_ + "/.out.qcal-stage." + host + "-999999999.a1";
  const std::string dead_partial = out_ + ".partial." + host + "-999999998";
  fs::create_directories(dead);
  fs::create_directories(dead_partial);
  std::ofstream(dead_partial + "/x") << "junk";
  ASSERT_TRUE(publish(ctx("j-1", 1, false), "one").is_ok());
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_FALSE(fs::exists(dead_partial));
  EXPECT_TRUE(leftovers().empty());
}

}  // namespace
}  // namespace qcal

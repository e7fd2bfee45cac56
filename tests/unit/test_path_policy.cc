// common/path_policy.h: confinement of a job's paths to the allowed roots,
// the input-type rules, the replace-only-qcal-outputs rule, and the process
// policy's descriptor checks (FIFOs never block, symlinks out are refused).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/output_manifest.h"
#include "common/path_policy.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;

void write(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << text;
}

class PathPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = fs::temp_directory_path() / ("qcal_paths_" + std::to_string(::getpid()));
    fs::remove_all(base_);
    // read/ holds a model and data; write/ is the output area; store/ the
    // artifact store; secret/ is outside every root.
    for (const char* d : {"read/m", "write", "store", "secret"}) fs::create_directories(base_ / d);
    write(p("read/m/config.json"), "{}");
    write(p("read/m/model.safetensors"), "x");
    write(p("read/calib.jsonl"), "{\"input_ids\": [1, 2, 3]}\n");
    write(p("secret/private.u32"), "abcd");
    write(p("secret/m/config.json"), "{}");
    auto pol = PathPolicy::make({p("read")}, {p("write")}, p("store"));
    ASSERT_TRUE(pol.is_ok()) << pol.status().to_string();
    policy_ = std::make_unique<PathPolicy>(std::move(pol).value());
  }
  void TearDown() override {
    set_process_path_policy(nullptr);
    fs::remove_all(base_);
  }
  std::string p(const std::string& rel) const { return (base_ / rel).string(); }

  JobSpec spec(const std::string& out) const {
    JobSpec s;
    s.model = p("read/m");
    s.calib.path = p("read/calib.jsonl");
    s.output.path = out;
    return s;
  }
  // Expects `st` to be code `c` with `needle` in its message.
  static void expect(const Status& st, Code c, const std::string& needle) {
    EXPECT_EQ(st.code(), c) << st.to_string();
    EXPECT_NE(st.message().find(needle), std::string::npos) << st.to_string();
  }

  fs::path base_;
  std::unique_ptr<PathPolicy> policy_;
};

TEST_F(PathPolicyTest, ResolvePathFollowsSymlinksAndKeepsAMissingTail) {
  fs::create_symlink(p("secret"), p("read/link"));
  auto r = resolve_path(p("read/link/new/../x"));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->path, p("secret/x"));
  EXPECT_FALSE(r->exists);
  // A dangling symlink is followed to where its target would be.
  fs::create_symlink(p("secret/nothing-here"), p("read/dangling"));
  r = resolve_path(p("read/dangling"));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->path, p("secret/nothing-here"));
  EXPECT_FALSE(r->exists);
  r = resolve_path(p("read/./m/../m/config.json"));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->path, p("read/m/config.json"));
  EXPECT_TRUE(r->exists);
  // Loops end with an error, not a hang.
  fs::create_symlink(p("read/loop2"), p("read/loop1"));
  fs::create_symlink(p("read/loop1"), p("read/loop2"));
  expect(resolve_path(p("read/loop1")).status(), Code::kInvalidInput, "symbolic links");
  expect(resolve_path("relative/x").status(), Code::kInvalidInput, "not an absolute path");
}

TEST_F(PathPolicyTest, AGoodSpecIsConfinedAndResolved) {
  fs::create_symlink(p("read/m"), p("read/m-link"));
  JobSpec s = spec(p("write/sub/../out"));
  s.model = p("read/m-link");
  auto c = policy_->confine(s);
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->model, p("read/m"));
  EXPECT_EQ(c->output.path, p("write/out"));
}

TEST_F(PathPolicyTest, OutsideTheRootsIs403AndRevealsNothing) {
  // An existing and a missing path outside get the same message shape: the
  // answer does not tell which exists.
  for (const std::string& model : {p("secret/m"), p("secret/absent"), std::string("/etc")}) {
    JobSpec s = spec(p("write/out"));
    s.model = model;
    Status st = policy_->confine(s).status();
    expect(st, Code::kPermissionDenied, "model: " + model + " is outside the directories");
    EXPECT_EQ(st.message().find("exist"), std::string::npos) << st.message();
    EXPECT_EQ(st.message().find("a directory"), std::string::npos) << st.message();
    EXPECT_EQ(st.message().find("cannot"), std::string::npos) << st.message();
  }
  JobSpec s = spec(p("write/out"));
  s.calib.path = p("secret/private.u32");
  expect(policy_->confine(s).status(), Code::kPermissionDenied, "calib.path: ");
  s = spec("/etc/qcal-out");
  expect(policy_->confine(s).status(), Code::kPermissionDenied, "--allow-write");
  // Reading is not writing: the read root is no output area.
  s = spec(p("read/out"));
  expect(policy_->confine(s).status(), Code::kPermissionDenied, "output.path");
}

TEST_F(PathPolicyTest, SymlinksOutOfTheRootsAreRefused) {
  // The x.u32 pointing at a private file.
  fs::create_symlink(p("secret/private.u32"), p("read/x.u32"));
  JobSpec s = spec(p("write/out"));
  s.calib.path = p("read/x.u32");
  expect(policy_->confine(s).status(), Code::kPermissionDenied, "calib.path: " + p("read/x.u32"));
  // A model directory with one weight file linked out.
  fs::create_directories(p("read/m2"));
  write(p("read/m2/config.json"), "{}");
  fs::create_symlink(p("secret/private.u32"), p("read/m2/model.safetensors"));
  s = spec(p("write/out"));
  s.model = p("read/m2");
  expect(policy_->confine(s).status(), Code::kPermissionDenied, "links outside");
  // A symlinked output parent that leads out.
  fs::create_symlink(p("secret"), p("write/escape"));
  expect(policy_->confine(spec(p("write/escape/out"))).status(), Code::kPermissionDenied,
         "output.path");
}

TEST_F(PathPolicyTest, InputsMustBeRegularFiles) {
  ASSERT_EQ(::mkfifo(p("read/fifo.jsonl").c_str(), 0600), 0);
  JobSpec s = spec(p("write/out"));
  s.calib.path = p("read/fifo.jsonl");
  expect(policy_->confine(s).status(), Code::kInvalidInput, "is a FIFO, not a regular file");
  s = spec(p("write/out"));
  s.calib.path = p("read/m");
  expect(policy_->confine(s).status(), Code::kInvalidInput, "is a directory");
  s = spec(p("write/out"));
  s.calib.path = p("read/missing.jsonl");
  expect(policy_->confine(s).status(), Code::kNotFound, "does not exist");
  ASSERT_EQ(::mkfifo(p("read/m/tokenizer.json").c_str(), 0600), 0);
  expect(policy_->confine(spec(p("write/out"))).status(), Code::kInvalidInput,
         "tokenizer.json is a FIFO");
}

TEST_F(PathPolicyTest, RelativePathsAndTheStoreAreRefused) {
  JobSpec s = spec(p("write/out"));
  s.model = "read/m";
  expect(policy_->confine(s).status(), Code::kInvalidInput, "model: must be an absolute path");
  expect(policy_->confine(spec("out")).status(), Code::kInvalidInput, "absolute");
  // The store, inside it, or anything containing it; a root itself.
  expect(policy_->confine(spec(p("store"))).status(), Code::kPermissionDenied, "artifact store");
  expect(policy_->confine(spec(p("store/jobs/j-1"))).status(), Code::kPermissionDenied,
         "artifact store");
  expect(policy_->confine(spec(p("write"))).status(), Code::kPermissionDenied,
         "is or contains the allowed root");
  expect(policy_->confine(spec(p(""))).status(), Code::kPermissionDenied, "");
  expect(policy_->confine(spec("/")).status(), Code::kPermissionDenied, "");
}

TEST_F(PathPolicyTest, OnlyQcalOutputsAreReplacedAndOnlyWithOverwrite) {
  // A directory qcal did not publish: never, overwrite or not.
  write(p("write/theirs/data.bin"), "precious");
  JobSpec s = spec(p("write/theirs"));
  s.output.overwrite = true;
  expect(policy_->confine(s).status(), Code::kPermissionDenied, "not a directory qcal published");
  // A qcal output: with overwrite only.
  fs::create_directories(p("write/ours"));
  OutputManifest m;
  m.writer = "qcal-worker";
  m.job = "j-1";
  m.task = "assemble";
  m.attempt = 1;
  m.generation = 3;
  ASSERT_TRUE(write_output_manifest(p("write/ours"), m).is_ok());
  s = spec(p("write/ours"));
  expect(policy_->confine(s).status(), Code::kInvalidInput, "set output.overwrite");
  s.output.overwrite = true;
  EXPECT_TRUE(policy_->confine(s).is_ok());
  // The job that wrote it may replace it without overwrite (a re-run).
  s.output.overwrite = false;
  EXPECT_TRUE(policy_->confine(s, "j-1").is_ok());
  // Overlapping the inputs.
  auto pol = PathPolicy::make({p("read")}, {p("read")}, p("store"));
  ASSERT_TRUE(pol.is_ok());
  s = spec(p("read/m/sub"));
  expect(pol->confine(s).status(), Code::kInvalidInput, "overlaps the job's input");
}

TEST_F(PathPolicyTest, NoRootsMeansNothingAndSaysWhichFlag) {
  auto none = PathPolicy::make({}, {}, p("store"));
  ASSERT_TRUE(none.is_ok());
  Status st = none->confine(spec(p("write/out"))).status();
  expect(st, Code::kPermissionDenied, "none are configured");
  expect(st, Code::kPermissionDenied, "--allow-read");
  expect(PathPolicy::make({p("nope")}, {}, "").status(), Code::kInvalidInput, "--allow-read");
}

TEST_F(PathPolicyTest, ProcessPolicyChecksTheDescriptor) {
  set_process_path_policy(std::make_shared<const PathPolicy>(*policy_));
  // Inside: fine.
  auto fd = open_input_file(p("read/calib.jsonl"));
  ASSERT_TRUE(fd.is_ok()) << fd.status().to_string();
  ::close(*fd);
  // Outside, directly or through a symlink: refused, existing or not.
  expect(open_input_file(p("secret/private.u32")).status(), Code::kPermissionDenied, "outside");
  expect(open_input_file(p("secret/absent")).status(), Code::kPermissionDenied, "outside");
  fs::create_symlink(p("secret/private.u32"), p("read/y.u32"));
  expect(open_input_file(p("read/y.u32")).status(), Code::kPermissionDenied, "outside");
  // The loaders go through it too: a .u32 symlink out never shows its bytes.
  Status st = load_token_sequences(p("read/y.u32"), 1, 1 << 30).status();
  expect(st, Code::kPermissionDenied, "outside");
  EXPECT_EQ(st.message().find("abcd"), std::string::npos);
  // Writes outside the write roots and the store are refused.
  expect(write_file_atomic(p("secret/new.txt"), "x"), Code::kPermissionDenied, "--allow-write");
  EXPECT_TRUE(write_file_atomic(p("write/new.txt"), "x").is_ok());
  EXPECT_TRUE(write_file_atomic(p("store/new.txt"), "x").is_ok());
}

TEST_F(PathPolicyTest, AFifoNeverBlocksAnOpen) {
  // A FIFO with no writer would block open(2) forever without O_NONBLOCK.
  ASSERT_EQ(::mkfifo(p("read/calib.u32").c_str(), 0600), 0);
  const auto t0 = std::chrono::steady_clock::now();
  expect(open_input_file(p("read/calib.u32")).status(), Code::kInvalidInput, "FIFO");
  expect(load_token_sequences(p("read/calib.u32"), 4, 100).status(), Code::kInvalidInput, "FIFO");
  expect(read_file(p("read/calib.u32")).status(), Code::kInvalidInput, "FIFO");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(s, 5.0);
}

TEST_F(PathPolicyTest, SubmitTimeTokenFileChecks) {
  write(p("read/bad.u32"), "abcde");  // 5 bytes
  expect(check_token_file(p("read/bad.u32"), 2, 1 << 30, 0, 1 << 20).status(), Code::kInvalidInput,
         "not a multiple of 4");
  write(p("read/bad.jsonl"), "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, \n");
  expect(check_token_file(p("read/bad.jsonl"), 2, 100, 0, 1 << 20).status(), Code::kInvalidInput,
         "bad.jsonl:2: malformed JSON");
  write(p("read/big.jsonl"), "{\"input_ids\": [1, 2]}\n{\"input_ids\": [999]}\n");
  expect(check_token_file(p("read/big.jsonl"), 2, 100, 0, 1 << 20).status(), Code::kInvalidInput,
         "out of range");
  auto ok = check_token_file(p("read/calib.jsonl"), 2, 100, 0, 1 << 20);
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(ok->tokens, 3);
  EXPECT_TRUE(ok->complete);
}

}  // namespace
}  // namespace qcal

#include "worker/publish.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "common/fsutil.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "common/redis.h"
#include "worker/tasks.h"

namespace qcal {

namespace fs = std::filesystem;

namespace {

double now_s() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

// The parent directory, opened and locked for the critical section.
class LockedDir {
 public:
  ~LockedDir() {
    if (fd_ >= 0) ::close(fd_);  // closing drops the flock
  }
  Status open_and_lock(const std::string& dir, double timeout_s) {
    fd_ = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
    if (fd_ < 0) return io_error(dir + ": open: " + std::strerror(errno));
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    for (;;) {
      if (::flock(fd_, LOCK_EX | LOCK_NB) == 0) return Status::ok();
      if (errno != EWOULDBLOCK && errno != EINTR)
        return io_error(dir + ": flock: " + std::strerror(errno));
      if (std::chrono::steady_clock::now() > deadline)
        return unavailable(dir + ": another publisher held the directory lock for " +
                           std::to_string(static_cast<int64_t>(timeout_s)) + " s");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

int renameat2_in(int dirfd, const std::string& from, const std::string& to, unsigned flags) {
  return ::renameat2(dirfd, from.c_str(), dirfd, to.c_str(), flags) == 0 ? 0 : errno;
}

std::string describe(const OutputManifest& m) {
  return "job " + m.job + " attempt " + std::to_string(m.attempt) + ", generation " +
         std::to_string(m.generation);
}

}  // namespace

// ------------------------------------------------------------------ JobStoreFence

Result<int64_t> JobStoreFence::begin() {
  Result<int64_t> r = unavailable("not tried");
  Status s = retry_unavailable(
      [&] {
        r = store_->begin_publish(*claim_);
        return r.status();
      },
      retry_s_);
  if (!s.is_ok()) return s;
  return r;
}

Status JobStoreFence::finish() {
  return retry_unavailable([&] { return store_->finish_publish(*claim_); }, retry_s_);
}

// ------------------------------------------------------------------ OutputPublication

Result<OutputPublication> OutputPublication::begin(const TaskContext& ctx) {
  OutputPublication p;
  std::string out = ctx.spec.output.path;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  if (out.empty() || out == "/")
    return invalid_input("output.path: '" + out + "' cannot be published");
  QCAL_RETURN_IF_ERROR(check_process_write(out).with_context("output.path"));
  const fs::path fp(out);
  p.out_ = out;
  p.parent_ = fp.parent_path().string();
  if (p.parent_.empty()) p.parent_ = ".";
  p.name_ = fp.filename().string();
  std::error_code ec;
  fs::create_directories(p.parent_, ec);
  if (ec) return io_error("output.path: " + p.parent_ + ": cannot create: " + ec.message());
  // Leftovers of dead publishers next to this output.
  const SweepReport swept = sweep_stale_staging(p.parent_, 0, 24 * 3600.0);
  if (swept.entries > 0)
    LOG_INFO << p.parent_ << ": removed " << swept.entries << " stale staging entries ("
             << swept.bytes << " bytes)";
  p.stage_name_ =
      "." + p.name_ + ".qcal-stage." + staging_tag() + ".a" + std::to_string(ctx.attempt);
  p.staging_ = p.parent_ + "/" + p.stage_name_;
  fs::remove_all(p.staging_, ec);
  p.overwrite_ = ctx.spec.output.overwrite;
  p.manifest_.writer = "qcal-worker";
  p.manifest_.job = ctx.job_id;
  p.manifest_.task = ctx.task.id;
  p.manifest_.attempt = ctx.attempt;
  p.fence_ = ctx.fence;
  return p;
}

OutputPublication::OutputPublication(OutputPublication&& o) noexcept
    : out_(std::move(o.out_)),
      parent_(std::move(o.parent_)),
      name_(std::move(o.name_)),
      staging_(std::move(o.staging_)),
      stage_name_(std::move(o.stage_name_)),
      overwrite_(o.overwrite_),
      manifest_(std::move(o.manifest_)),
      fence_(o.fence_),
      committed_(o.committed_) {
  o.committed_ = true;  // the moved-from object owns nothing
  o.staging_.clear();
}

OutputPublication::~OutputPublication() {
  if (committed_ || staging_.empty()) return;
  std::error_code ec;
  fs::remove_all(staging_, ec);
}

Status OutputPublication::commit() {
  if (committed_) return internal_error(out_ + ": published twice");
  struct stat st {};
  if (::lstat(staging_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return internal_error(staging_ + ": the writer left no staged directory");

  // 1. The fence: still ours, job live, output still owned.
  if (fence_) {
    auto gen = fence_->begin();
    if (!gen.is_ok()) {
      if (gen.status().code() == Code::kConflict) return cancelled(gen.status().message());
      return gen.status();
    }
    manifest_.generation = *gen;
  }
  // 2. The manifest, last.
  manifest_.published_at = now_s();
  QCAL_RETURN_IF_ERROR(write_output_manifest(staging_, manifest_));
  QCAL_RETURN_IF_ERROR(fsync_path(staging_));

  // 3. The rename, under the parent's lock.
  QCAL_RETURN_IF_ERROR(check_process_write(out_).with_context("output.path"));
  LockedDir dir;
  QCAL_RETURN_IF_ERROR(dir.open_and_lock(parent_, kPublishLockTimeoutS));
  bool exchanged = false;
  int err = renameat2_in(dir.fd(), stage_name_, name_, RENAME_NOREPLACE);
  if (err == EEXIST || err == ENOTEMPTY) {
    struct stat os {};
    if (::fstatat(dir.fd(), name_.c_str(), &os, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(os.st_mode))
      return invalid_input("output.path: " + out_ + " exists and is not a directory");
    auto old = read_output_manifest(out_);
    if (!old.is_ok())
      return permission_denied("output.path: " + out_ +
                               " exists and is not a directory qcal published; qcal replaces "
                               "only its own outputs");
    const bool own = old->job == manifest_.job;
    if (!own && !overwrite_)
      return invalid_input("output.path: " + out_ + " exists (set output.overwrite to replace it)");
    err = renameat2_in(dir.fd(), stage_name_, name_, RENAME_EXCHANGE);
    if (err == EINVAL || err == ENOSYS)
      return io_error("output.path: " + out_ +
                      ": the filesystem cannot exchange directories atomically "
                      "(renameat2 RENAME_EXCHANGE); remove the old output first");
    if (err != 0) return io_error("output.path: " + out_ + ": exchange: " + std::strerror(err));
    exchanged = true;
    // What we displaced must not be a newer owner's.
    auto displaced = read_output_manifest(staging_);
    if (displaced.is_ok() && displaced->newer_than(manifest_)) {
      const int back = renameat2_in(dir.fd(), stage_name_, name_, RENAME_EXCHANGE);
      if (back != 0)
        LOG_ERROR << out_ << ": could not swap back the newer output: " << std::strerror(back);
      return conflict("output.path: " + out_ + " holds a newer owner's output (" +
                      describe(*displaced) + "); this publish (" + describe(manifest_) +
                      ") is stale");
    }
  } else if (err == EINVAL || err == ENOSYS) {
    // No renameat2 here: a plain rename refuses to replace a non-empty directory.
    if (::renameat(dir.fd(), stage_name_.c_str(), dir.fd(), name_.c_str()) != 0)
      return io_error("output.path: " + out_ + ": rename: " + std::strerror(errno));
  } else if (err != 0) {
    return io_error("output.path: " + out_ + ": rename: " + std::strerror(err));
  }

  // 4. The fence again: undo when the claim lost its right meanwhile.
  if (fence_) {
    Status f = fence_->finish();
    if (!f.is_ok()) {
      auto now = read_output_manifest(out_);
      const bool ours = now.is_ok() && now->job == manifest_.job &&
                        now->attempt == manifest_.attempt && now->task == manifest_.task;
      if (ours) {
        const int undo = exchanged ? renameat2_in(dir.fd(), stage_name_, name_, RENAME_EXCHANGE)
                                   : renameat2_in(dir.fd(), name_, stage_name_, RENAME_NOREPLACE);
        if (undo != 0)
          LOG_ERROR << out_ << ": could not undo a fenced publish: " << std::strerror(undo);
      }
      if (f.code() == Code::kConflict) return cancelled(f.message());
      return f;
    }
  }

  // 5. Durable, then the displaced directory goes.
  QCAL_RETURN_IF_ERROR(fsync_path(parent_));
  committed_ = true;
  if (exchanged) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
  return Status::ok();
}

}  // namespace qcal

#include "coordinator/retention.h"

#include <dirent.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <filesystem>
#include <vector>

#include "common/fsutil.h"
#include "common/log.h"

namespace qcal {

namespace fs = std::filesystem;

namespace {

bool valid_job_id(const std::string& id) {
  if (id.empty() || id.size() > 128 || id[0] == '.') return false;
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
          c == '_'))
      return false;
  return true;
}

}  // namespace

Result<SweepResult> sweep_store(JobStore& jobs, const std::string& store_root,
                                const RetentionOptions& opts, double now) {
  struct stat st {};
  if (::stat(store_root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return not_found("store " + store_root + " is not a directory");
  SweepResult res;
  const std::string jobs_dir = join_path(store_root, "jobs");
  std::vector<std::string> ids;
  if (DIR* d = ::opendir(jobs_dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (valid_job_id(name)) ids.push_back(name);
    }
    ::closedir(d);
  }
  for (const std::string& id : ids) {
    const std::string dir = join_path(jobs_dir, id);
    struct stat ds {};
    if (::lstat(dir.c_str(), &ds) != 0 || !S_ISDIR(ds.st_mode)) continue;
    double ended_at = 0, keep_h = 0;
    auto job = jobs.get_job(id);
    if (job.is_ok()) {
      if (!is_terminal(job->state)) {
        ++res.job_dirs;
        continue;
      }
      ended_at = job->updated_at;
      keep_h = job->state == JobState::kSucceeded ? opts.retain_succeeded_h : opts.retain_failed_h;
    } else if (job.status().code() == Code::kNotFound) {
      ended_at = static_cast<double>(ds.st_mtime);
      keep_h = opts.retain_failed_h;
    } else {
      return job.status();  // Redis gone: remove nothing we cannot account for
    }
    if (now - ended_at < keep_h * 3600.0) {
      ++res.job_dirs;
      continue;
    }
    const uint64_t bytes = tree_bytes(dir);
    std::error_code ec;
    fs::remove_all(dir, ec);
    if (ec) {
      LOG_WARN << "retention: cannot remove " << dir << ": " << ec.message();
      ++res.job_dirs;
      continue;
    }
    ++res.jobs_removed;
    res.bytes_removed += bytes;
    LOG_INFO << "retention: removed the artifacts of job " << id << " ("
             << (job.is_ok() ? job_state_name(job->state) : "unknown to Redis") << ", " << bytes
             << " bytes)";
  }
  const SweepReport staged = sweep_stale_staging(store_root, 6, opts.stale_staging_h * 3600.0);
  res.staging_removed = static_cast<int64_t>(staged.entries);
  res.bytes_removed += staged.bytes;
  res.store_bytes = tree_bytes(store_root);
  struct statvfs vfs {};
  if (::statvfs(store_root.c_str(), &vfs) == 0)
    res.free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  return res;
}

void StoreStats::record(const SweepResult& r) {
  std::lock_guard<std::mutex> l(mu_);
  s_.measured = true;
  s_.store_bytes = r.store_bytes;
  s_.free_bytes = r.free_bytes;
  s_.job_dirs = r.job_dirs;
  s_.reclaimed_bytes_total += r.bytes_removed;
  s_.removed_jobs_total += r.jobs_removed;
  ++s_.sweeps_total;
}

StoreStats::Snapshot StoreStats::snapshot() const {
  std::lock_guard<std::mutex> l(mu_);
  return s_;
}

}  // namespace qcal

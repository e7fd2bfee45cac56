// Fenced publishing of a job's output directory (issue #11: "a stale worker
// can overwrite a later job's output").
//
// A task that writes output.path (assemble, calib) stages the checkpoint in a
// fresh sibling directory and publishes it under the fence:
//
//   QCAL_ASSIGN_OR_RETURN(OutputPublication pub, OutputPublication::begin(ctx));
//   QCAL_RETURN_IF_ERROR(write_native(model, pub.staging(), /*overwrite=*/false));
//   QCAL_RETURN_IF_ERROR(pub.commit());
//
// begin(): output.path (already resolved and confined by the worker) is
// checked again against the process policy, its parent created, stale
// staging entries of dead processes in the parent swept, and the staging
// path chosen: `<parent>/.<name>.qcal-stage.<host>-<pid>.a<attempt>` (not
// created: the writer's own publish_dir creates it, complete, with a plain
// manifest).
//
// commit(), the protocol:
//   1. fence begin (JobStore::begin_publish, one Lua script): the claim still
//      owns the running task, the job is live and still owns output.path →
//      the task is marked "publishing by attempt A"; it returns the job's
//      output generation G. Otherwise nothing is published and commit returns
//      cancelled("publish fenced: ...") — the worker abandons the task
//      unreported, as for a cancel.
//   2. the manifest (job, task, attempt A, generation G) is written into the
//      staging directory, last.
//   3. under an exclusive flock(2) of the parent directory (qcal publishers
//      of the same parent serialize; waits at most kPublishLockTimeoutS, then
//      kUnavailable, retried by the queue):
//      renameat2(staging, output, RENAME_NOREPLACE) relative to the parent's
//      descriptor; if the output exists: it must be a qcal output (manifest)
//      and ours (same job) or output.overwrite, then RENAME_EXCHANGE. The
//      displaced directory's manifest is read: if it names a newer owner
//      (higher generation, or our job and a later attempt) it is swapped back
//      and commit fails (kConflict).
//   4. fence finish (JobStore::finish_publish): the same checks plus the mark.
//      If it fails (the job was cancelled or the lease lost between 1 and 4),
//      the rename is undone — the displaced directory swapped back, or ours
//      moved away — and commit returns cancelled(...).
//   5. the parent is fsynced, the displaced directory removed, the lock freed.
// Without a fence (tests, embedded use) steps 1 and 4 are skipped.
//
// Remaining races (stated, not solved):
//   - A cancel (or lease loss) that lands after step 4 and before the task is
//     reported leaves a published output whose manifest names the cancelled
//     job. It is a complete qcal output; a later owner replaces it with
//     output.overwrite.
//   - The lock is advisory and per filesystem: on a filesystem where flock is
//     not shared between hosts (NFSv3 without lockd, Lustre without -o
//     flock), two hosts' publishers of the same parent are serialized only by
//     the fence and the manifest check after the exchange; a stale worker
//     paused exactly between its exchange and its swap-back can then briefly
//     expose its output, or swap back over a publish that landed in between.
//     Both need a cancel, a new owner's whole job, and a pause of a few
//     instructions to line up.
//   - A publisher stopped (SIGSTOP) while holding the lock blocks other
//     publishes into the same parent until it resumes or dies (they fail
//     after the lock timeout and are retried); it never publishes stale data,
//     since step 4 fails when it resumes.
//   - Non-qcal processes writing into the output's parent are not fenced.
//
// Thread safety: an OutputPublication belongs to the task's thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/job_store.h"
#include "common/output_manifest.h"
#include "common/status.h"

namespace qcal {

struct TaskContext;  // worker/tasks.h

// The Redis half of the protocol (steps 1 and 4), so tests can inject one.
class PublishFence {
 public:
  virtual ~PublishFence() = default;
  // Check-and-mark; returns the output generation. kConflict when fenced out.
  virtual Result<int64_t> begin() = 0;
  // Check the mark; kConflict when fenced out.
  virtual Status finish() = 0;
};

// The fence of one claim through JobStore::begin_publish / finish_publish,
// retrying while Redis is briefly unreachable (up to `retry_s`).
class JobStoreFence : public PublishFence {
 public:
  JobStoreFence(JobStore* store, const Claim* claim, double retry_s)
      : store_(store), claim_(claim), retry_s_(retry_s) {}
  Result<int64_t> begin() override;
  Status finish() override;

 private:
  JobStore* store_;
  const Claim* claim_;
  double retry_s_;
};

inline constexpr double kPublishLockTimeoutS = 120;

class OutputPublication {
 public:
  // See the top of this file. kPermissionDenied when output.path is not
  // writable under the process policy; kIoError from the filesystem.
  static Result<OutputPublication> begin(const TaskContext& ctx);
  OutputPublication(OutputPublication&& o) noexcept;
  OutputPublication& operator=(OutputPublication&&) = delete;
  OutputPublication(const OutputPublication&) = delete;
  ~OutputPublication();  // removes the staging directory unless committed

  // Where the writer must put the complete directory (it must not exist yet).
  const std::string& staging() const { return staging_; }
  // Publishes staging() as output.path (see the top of this file). Errors:
  // cancelled("publish fenced: ...") (tasks.h) when the fence refuses;
  // kConflict when a newer owner's output was found in place; kInvalidInput /
  // kPermissionDenied when the existing output may not be replaced;
  // kUnavailable when the parent stayed locked; kIoError from the filesystem.
  Status commit();

 private:
  OutputPublication() = default;

  std::string out_;      // output.path (resolved)
  std::string parent_;   // its parent directory
  std::string name_;     // its last component
  std::string staging_;  // parent_/stage_name_
  std::string stage_name_;
  bool overwrite_ = false;
  OutputManifest manifest_;
  PublishFence* fence_ = nullptr;
  bool committed_ = false;
};

}  // namespace qcal

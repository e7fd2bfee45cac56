// The worker loop: claims tasks from the JobStore, runs them (worker/tasks.h)
// and reports, while a heartbeat thread keeps the task's lease.
//
// Per claimed task (on the root rank):
//   1. parse the job spec (invalid → fail_task, not retryable);
//   2. read the deps' results (JobStore::get_tasks) and verify the checksum
//      of every artifact the task reads; a corrupt or missing one →
//      rerun_producer(that dep), and the task waits for it again (the task's
//      readers verify once more as they read: inputs are hashed twice, a few
//      seconds per GB, small next to calibration);
//   3. run the task (calibrate on every rank of the group: the claim is
//      broadcast as JSON), with a cancel flag that the heartbeat sets;
//   4. report: complete_task(result), or rerun_producer when an input went
//      bad while it was read, or fail_task(error, retryable) where
//      retryable = the code is not kInvalidInput, kNotFound, kPermissionDenied,
//      kConflict or kResourceExhausted (a bad job fails at once; I/O — a full
//      disk included — and Redis trouble are retried by the queue up to its
//      attempt cap).
//   Before 2, the spec's paths are confined again (opts.paths): a path that
//   left the roots since submission fails the task (403's message).
//   Any exception out of a task (std::bad_alloc included) is a failed
//   attempt with its message and the task's inputs named; the worker stays
//   up. A task past opts.task_timeout_s is stopped and fails. After a failed
//   or abandoned attempt its artifacts (jobs/<job>/<task>/a<attempt>/) are
//   removed; after a success, those of the task's earlier attempts.
//   A heartbeat every lease/3 renews the lease; when it answers false (job
//   cancelled, or the lease was lost to another worker), or Redis stays
//   unreachable for a whole lease, the cancel flag is set, the task stops at
//   its next layer boundary and nothing is reported.
// Each step logs one line to stderr and to the job's log (append_log).
//
// Publishing output.path goes through the claim's fence (worker/publish.h,
// TaskContext::fence): a cancelled, reclaimed or paused worker never publishes.
// At start, run() sweeps staging entries of dead processes of this host from
// the store (sweep_stale_staging).
//
// Stopping: request_stop() lets the current task finish and report, then
// run() returns OK. (A second signal should end the process at once — see
// worker/main.cc; the unreported task is reclaimed after its lease.)
//
// Non-root ranks never touch Redis: run() on them waits for the root's
// broadcasts and joins each calibrate task until the root says stop.
//
// Thread safety: run()/run_once() from one thread (the one that created the
// RankGroup); request_stop() and stats() from any thread or a signal handler
// (request_stop only).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "common/job_store.h"
#include "common/path_policy.h"
#include "common/redis.h"
#include "common/status.h"
#include "worker/artifacts.h"
#include "worker/rank_group.h"

namespace qcal {

struct WorkerOptions {
  std::string worker_id;     // required; default in main: "<host>-<pid>"
  int64_t lease_ms = 30000;  // claim lease; heartbeat every lease/3
  int64_t block_ms = 2000;   // longest wait for a task per claim call
  bool once = false;         // run() returns after one task was handled
  JobStoreOptions store;     // prefix, attempt cap
  // Confinement (common/path_policy.h): every task's spec is checked again
  // (PathPolicy::confine) before it runs; nullptr = unconfined (tests).
  std::shared_ptr<const PathPolicy> paths;
  // A task running longer is stopped (the cancel flag) and fails, not
  // retried: "exceeded the worker's task timeout". <= 0: no limit.
  double task_timeout_s = 86400;
  // A task that does not stop within this long after it was asked to (a
  // cancel, a lost lease, the timeout) is wedged: the worker reports the
  // failure and exits (status 3), so its supervisor restarts it. <= 0: never.
  double stop_grace_s = 600;
};

class Worker {
 public:
  // `redis`: how to reach Redis; the worker opens one connection for its loop
  // and one for the heartbeat thread. `artifacts` and `group` must outlive it.
  Worker(WorkerOptions opts, RedisOptions redis, ArtifactStore* artifacts, RankGroup* group);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // The loop. Root: registers, then claims and handles tasks until
  // request_stop() (or one task with opts.once); Redis outages are waited out
  // with backoff. Returns OK on a requested stop.
  Status run();
  // Root only: one claim (waiting up to block_ms) and, if a task came, its
  // handling. true when a task was handled (whatever its outcome).
  Result<bool> run_once();

  // Finish the current task, then stop. Async-signal-safe.
  void request_stop() { stop_.store(true); }
  bool stop_requested() const { return stop_.load(); }

  struct Stats {
    int64_t completed = 0;  // complete_task
    int64_t failed = 0;     // fail_task
    int64_t reruns = 0;     // rerun_producer (corrupt input)
    int64_t abandoned = 0;  // cancelled / lease lost: nothing reported
  };
  Stats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::atomic<bool> stop_{false};
};

}  // namespace qcal

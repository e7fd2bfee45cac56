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
//      retryable = the code is not kInvalidInput, kNotFound or
//      kResourceExhausted (a bad job fails at once; I/O and Redis trouble are
//      retried by the queue up to its attempt cap).
//   A heartbeat every lease/3 renews the lease; when it answers false (job
//   cancelled, or the lease was lost to another worker), or Redis stays
//   unreachable for a whole lease, the cancel flag is set, the task stops at
//   its next layer boundary and nothing is reported.
// Each step logs one line to stderr and to the job's log (append_log).
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

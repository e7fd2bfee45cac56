// Storage lifecycle of the artifact store (issue #11 "storage is never
// reclaimed"): every job leaves several times its model's size of
// intermediate artifacts (activations, quantized linears, CBQ setups and
// states) under <store>/jobs/<job id>/. The coordinator sweeps them.
//
// Who sweeps: qcal-coordinator, when started with --store (it needs the same
// shared store path as the workers: docker-compose and k8s mount it), on its
// Boost.Asio background thread every --sweep-interval-s (default 300). Several
// coordinators may sweep the same store: every step is idempotent.
// Workers clean only what is theirs: the artifacts of an attempt that failed
// or was abandoned (worker/worker.cc), and, at start, staging entries that
// dead processes of their host left in the store (sweep_stale_staging).
//
// One sweep (sweep_store):
//   - <store>/jobs/<id> of a job that ended is removed once it ended more than
//     the retention ago: --retain-succeeded-h (default 24) for succeeded jobs,
//     --retain-failed-h (default 168) for failed and cancelled ones (kept
//     longer: their artifacts help explain the failure). 0 = at the next sweep.
//   - a directory of a job Redis does not know (deleted keys, another
//     prefix's leftovers) is removed when older than --retain-failed-h.
//   - live jobs are never touched.
//   - staging entries (".partial.", ".tmp.", ...) older than stale_staging_h
//     anywhere in the store are removed (their owner may be on another host,
//     so age is the only test the coordinator can make).
//   - then the store's usage is measured: bytes of every file, free bytes of
//     its filesystem, job directories present. /metrics reports them
//     (qcal_store_bytes, qcal_store_free_bytes, qcal_store_job_dirs) with the
//     totals reclaimed (qcal_store_reclaimed_bytes_total,
//     qcal_store_removed_jobs_total).
// Job records stay in Redis (listing, reports, schedule baselines); only
// artifacts go. User outputs (output.path) are never touched.
//
// Thread safety: sweep_store is a function of its arguments (one JobStore per
// thread); StoreStats is updated and read under its own mutex.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>

#include "common/job_store.h"
#include "common/status.h"

namespace qcal {

struct RetentionOptions {
  double retain_succeeded_h = 24;
  double retain_failed_h = 168;  // failed, cancelled, and unknown jobs
  double stale_staging_h = 24;
  double sweep_interval_s = 300;  // <= 0: no automatic sweeps
};

struct SweepResult {
  int64_t jobs_removed = 0;
  uint64_t bytes_removed = 0;
  int64_t staging_removed = 0;
  // Usage after the sweep.
  uint64_t store_bytes = 0;
  uint64_t free_bytes = 0;
  int64_t job_dirs = 0;
};

// One sweep at wall time `now` (unix seconds). Errors: Redis failures
// (kUnavailable) stop the sweep before anything is removed for that job; a
// missing store directory is kNotFound.
Result<SweepResult> sweep_store(JobStore& jobs, const std::string& store_root,
                                const RetentionOptions& opts, double now);

// What /metrics reports: the last sweep's usage and the running totals.
class StoreStats {
 public:
  void record(const SweepResult& r);
  struct Snapshot {
    bool measured = false;
    uint64_t store_bytes = 0, free_bytes = 0;
    int64_t job_dirs = 0;
    uint64_t reclaimed_bytes_total = 0;
    int64_t removed_jobs_total = 0, sweeps_total = 0;
  };
  Snapshot snapshot() const;

 private:
  mutable std::mutex mu_;
  Snapshot s_;  // guarded by mu_
};

}  // namespace qcal

// Jobs, tasks and the ready-task queue, with Redis as the system of record.
// The coordinator and the workers talk to Redis only through this class.
//
// Redis layout (prefix P, default "qcal"):
//   P:job:<id>              hash: spec (JSON), state, priority, labels (JSON),
//                           created_at, updated_at, error, report (JSON),
//                           schedule_id, tasks_total, tasks_done, log_total
//                           (lines ever appended to the log), output_key
//                           (the output path it owns), output_gen (the
//                           generation of that ownership)
//   P:output:<path>         string: the job id that owns output path <path>
//                           (see "Output ownership" below)
//   P:output_generation     counter: one per ownership ever taken
//   P:jobs                  zset: job id by created_at (listing)
//   P:jobs:state:<state>    zset: job id by created_at, one per job state
//                           (list_jobs by state, job_counts), kept in step by
//                           the scripts that change a job's state
//   P:job:<id>:tasks        list: task ids in DAG order
//   P:task:<id>:<task>      hash: type, deps (JSON), params (JSON), mem_bytes,
//                           state, remaining (unfinished deps), attempts,
//                           worker, started_at, finished_at, result (JSON),
//                           error, dependents (JSON), stream + entry (its
//                           current queue entry, "" when none), publishing /
//                           published (+ _started / _at): the attempt that
//                           began / finished publishing the output
//   P:job:<id>:log          list: log lines (capped)
//   P:queue:<priority>      stream of ready tasks {job, task}; consumer group
//                           "workers". A worker's heartbeat XCLAIMs its entry,
//                           which resets the entry's idle time: an entry idle
//                           longer than the lease belongs to a dead worker and
//                           is reclaimed (XAUTOCLAIM) by the next claim.
//                           Entries are acknowledged and deleted together, so
//                           a stream's length = entries not yet delivered +
//                           pending ones.
//   P:workers               zset: worker id by last-seen time
//   P:metrics               hash: counters (tasks_completed, task_seconds_sum,
//                           task_seconds_bucket_<le>, ...)
// State changes that touch several keys run as Lua scripts, so a crash of
// any process between two keys never leaves them inconsistent. Scripts take
// time from the server's clock (TIME), so durations never mix two machines'
// clocks. Scripts build key names from the prefix: one Redis instance, not
// Redis Cluster.
//
// Output ownership (issue #11): one live job owns an output path at a time.
// create_job takes P:output:<output path> in the same script that stores the
// job, unless a live job holds it: then kConflict (HTTP 409) naming that job.
// The key is released when the job reaches a terminal state (set_job_state, in
// every script that ends a job); a key whose holder is terminal or gone (a
// restart between two scripts, an old AOF) counts as free, so neither a
// coordinator nor a Redis restart can leave a path locked. Each taking bumps
// P:output_generation; the job keeps its generation (JobInfo), and the
// worker's output manifest carries it, so a later owner's output is told
// from an earlier one's on disk (worker/publish.h).
//
// Text in the store (issue #11 "nothing poisoned"): every string written —
// specs, labels, log lines, errors, results, reports — passes common/sanitize.h
// (valid UTF-8, bounded: errors kMaxErrorBytes, log lines kMaxLogLineBytes,
// results kMaxResultBytes, reports kMaxReportBytes); every read sanitizes
// again, so data stored before (or by another tool) never fails a read.
//
// Attempts: a task's `attempts` counts every delivery of the task (a new
// entry after a retryable failure or a re-run, or a reclaimed entry), so it
// is the delivery count across entries; a claim is identified by (attempt,
// worker), and attempt grows with every claim, so a stale claim can never
// match a later one. The worker of a claim is `Claim::task.worker`.
//
// Job states: queued → running → validating → succeeded | failed | cancelled.
// Task states: waiting (deps unfinished) → ready (enqueued) → running → done,
// or failed / cancelled.
//
// Thread safety: not thread safe (holds a RedisClient); one per thread.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/job_spec.h"
#include "common/redis.h"
#include "common/status.h"

namespace qcal {

enum class JobState { kQueued, kRunning, kValidating, kSucceeded, kFailed, kCancelled };
enum class TaskState { kWaiting, kReady, kRunning, kDone, kFailed, kCancelled };
const char* job_state_name(JobState s);
const char* task_state_name(TaskState s);
std::optional<JobState> parse_job_state(const std::string& s);
bool is_terminal(JobState s);
// Whether `id` has the form create_job gives ("j-<unix ms>-<8 hex digits>").
// The coordinator checks ids from URLs with it before building a Redis key.
bool is_job_id(std::string_view id);

// One node of a job's DAG, as planned by the coordinator.
struct TaskDef {
  std::string id;                 // unique within the job, e.g. "quantize-0003"
  std::string type;               // capture | calibrate | assemble | validate
  std::vector<std::string> deps;  // ids of tasks whose results this one reads
  nlohmann::json params = nlohmann::json::object();
  uint64_t mem_bytes = 0;  // planner's estimate of peak memory
};

struct TaskInfo {
  std::string job_id;
  TaskDef def;
  TaskState state = TaskState::kWaiting;
  int64_t attempts = 0;
  std::string worker;
  double started_at = 0, finished_at = 0;  // unix seconds, 0 = not yet
  nlohmann::json result;                   // null until done
  std::string error;
};

struct JobInfo {
  std::string id;
  JobState state = JobState::kQueued;
  nlohmann::json spec;  // the validated JobSpec as JSON
  Priority priority = Priority::kNormal;
  std::map<std::string, std::string> labels;
  double created_at = 0, updated_at = 0;
  std::string error;        // why it failed, when it did
  nlohmann::json report;    // validation report, null until validated
  std::string schedule_id;  // set for runs started by a schedule
  int64_t tasks_total = 0, tasks_done = 0;
  std::string output_key;         // the output path it owns ("" when none)
  int64_t output_generation = 0;  // the generation of that ownership
};

// The key under which a job owns `path`: lexically normalized, no trailing '/'.
// The coordinator stores resolved paths (common/path_policy.h), so one
// directory has one key.
std::string output_owner_key(const std::string& path);

// A task handed to a worker by claim_task.
struct Claim {
  std::string job_id, task_id;
  std::string stream, entry_id;  // the queue entry (for heartbeat / ack)
  int64_t attempt = 0;           // 1 for the first run
  TaskInfo task;
  JobInfo job;
};

struct JobStoreOptions {
  std::string prefix = "qcal";
  int64_t max_attempts = 3;  // a task delivered more often fails its job ("dead letter")
  int64_t log_lines = 1000;  // per-job log cap
};

class JobStore {
 public:
  JobStore(RedisClient& redis, JobStoreOptions opts = {});

  // Creates the consumer group / streams if absent (idempotent).
  Status init();

  // ---- coordinator side
  // Stores the job and its tasks and enqueues tasks without deps, atomically,
  // taking ownership of spec.output.path (kConflict while a live job owns it).
  // Returns the new job id (time-ordered, unique: "j-<unix ms>-<random hex>").
  Result<std::string> create_job(const JobSpec& spec, const std::vector<TaskDef>& tasks,
                                 const std::string& schedule_id = "");
  Result<JobInfo> get_job(const std::string& job_id);  // kNotFound if absent
  Result<std::vector<TaskInfo>> get_tasks(const std::string& job_id);
  // Newest first; filters are optional; at most `limit`.
  Result<std::vector<JobInfo>> list_jobs(std::optional<JobState> state,
                                         const std::map<std::string, std::string>& labels,
                                         int64_t limit = 100);
  // Cancels a job that is not terminal: job and its unfinished tasks become
  // cancelled; their queue entries are deleted (any left behind are dropped
  // when claimed). kInvalidInput (the caller answers 409) if already
  // terminal; kNotFound if absent.
  Status cancel_job(const std::string& job_id);
  // Appends one line (kept as given; the store itself logs claims, reclaims,
  // failures, re-runs and the job's end). kNotFound if the job is absent.
  Status append_log(const std::string& job_id, const std::string& line);
  // Lines from `from` on, where `from` numbers every line ever appended
  // (0 = the first): a follower passes the count it has seen so far and keeps
  // its place while old lines fall off the cap (those are skipped).
  Result<std::vector<std::string>> get_log(const std::string& job_id, int64_t from = 0);

  // ---- worker side
  // Takes the next task: first an entry whose worker stopped heartbeating for
  // longer than `lease_ms` (XAUTOCLAIM), else a new entry, waiting up to
  // `block_ms`, highest priority first. Entries of cancelled/failed jobs are
  // acknowledged and skipped. An entry delivered more than max_attempts times
  // fails its job with "task <id> failed <n> times: <last error>" (dead
  // letter). Marks the task running (attempt+1, worker, started_at) and its job
  // running (or validating for a validate task). nullopt when nothing came.
  // Claiming is one Lua script (reclaim, read, skip, dead-letter, mark
  // running); waiting is an XREAD BLOCK on the queues, so no entry is ever
  // delivered to a worker that does not mark it running. Also refreshes
  // P:workers.
  Result<std::optional<Claim>> claim_task(const std::string& worker_id, int64_t lease_ms,
                                          int64_t block_ms);
  // Renews the lease. Returns false when the job was cancelled (or has ended
  // otherwise, e.g. failed by another task) or the task was taken over by
  // another worker (the caller must stop and not report).
  Result<bool> heartbeat(const Claim& c, const std::string& worker_id);
  // The publishing fence (worker/publish.h), each one Lua script. begin: the
  // claim still owns the running task, the job is live and still owns its
  // output path → marks the task "publishing by this attempt" and returns the
  // job's output generation. finish: the same checks plus the mark → records
  // "published". kConflict ("publish fenced: <why>") otherwise: the caller
  // must not publish (begin) or must undo what it published (finish).
  Result<int64_t> begin_publish(const Claim& c);
  Status finish_publish(const Claim& c);
  // Records success: task done with `result`; dependents whose deps are now all
  // done are enqueued; the job's progress advances; when the last task
  // finishes the job becomes succeeded, or failed when result has
  // "gate_passed": false (the report is result["report"] when present). Acks
  // the entry. Ignored (returns OK, does nothing) if this claim no longer owns
  // the task (reclaimed by another worker after a lost lease). A result
  // larger than kMaxResultBytes fails the task instead (not retryable).
  Status complete_task(const Claim& c, const nlohmann::json& result);
  // Records a failure. retryable: the entry is re-enqueued (until
  // max_attempts; then the job fails with "task <id> failed <n> times:
  // <error>"); otherwise the job fails at once with "task <id>: <error>".
  // Ignored like complete_task for a claim that no longer owns the task.
  Status fail_task(const Claim& c, const std::string& error, bool retryable);
  // The consumer `c` found that the output of task `producer` is corrupt
  // (checksum mismatch): the producer is reset to ready and re-enqueued, and
  // the consumer goes back to waiting on it. Acks the consumer's entry.
  // The producer's other queued dependents go back to waiting too; its
  // attempts are kept (a producer re-run too often dead-letters the job). If
  // the producer is already being re-run, only the consumer waits.
  // kInvalidInput if `producer` is not one of the consumer's deps.
  Status rerun_producer(const Claim& c, const std::string& producer, const std::string& why);

  // ---- registry and metrics
  Status worker_seen(const std::string& worker_id);
  Result<int64_t> live_workers(double within_s);
  Result<std::map<std::string, int64_t>> job_counts();  // by state name
  Result<int64_t> queue_depth();                        // entries not yet delivered + pending
  // Counters in P:metrics (tasks_completed, tasks_failed, task_seconds_sum,
  // task_seconds_count, task_seconds_bucket_<le> for le in 1, 10, 60, 600, 3600, +Inf).
  // Buckets are cumulative (Prometheus `le`). Also tasks_reclaimed (lease
  // expiries), tasks_rerun (rerun_producer), jobs_created, jobs_succeeded,
  // jobs_failed, jobs_cancelled. tasks_failed counts accepted fail_task calls.
  // Every counter named here is present (0 until counted).
  Result<std::map<std::string, double>> metrics();

  RedisClient& redis() { return redis_; }
  const JobStoreOptions& options() const { return opts_; }

 private:
  RedisClient& redis_;
  JobStoreOptions opts_;
};

}  // namespace qcal

#include "worker/worker.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "common/fsutil.h"
#include "common/job_spec.h"
#include "common/log.h"
#include "common/plan.h"
#include "worker/pipeline.h"
#include "worker/publish.h"
#include "worker/tasks.h"

namespace qcal {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

bool retryable(Code c) {
  return c != Code::kInvalidInput && c != Code::kNotFound && c != Code::kResourceExhausted &&
         c != Code::kPermissionDenied && c != Code::kConflict;
}

// "model /m, calib.path /c.jsonl": what a task reads, for messages about it.
std::string task_inputs_text(const TaskContext& ctx) {
  std::string s = "model " + ctx.spec.model + ", calib.path " + ctx.spec.calib.path;
  if (ctx.spec.eval) s += ", eval.path " + ctx.spec.eval->path;
  return s;
}

// Runs the task; an exception becomes a failed attempt (issue #11: a
// std::bad_alloc used to end the process, and the job only learned that the
// worker "stopped heartbeating").
Result<nlohmann::json> run_task_guarded(const TaskContext& ctx) {
  try {
    return run_task(ctx);
  } catch (const std::bad_alloc&) {
    return resource_exhausted("task " + ctx.task.id + " (" + ctx.task.type +
                              ") ran out of memory (std::bad_alloc) reading " +
                              task_inputs_text(ctx) +
                              "; lower calib/eval nsamples or seqlen, or use workers with more "
                              "memory");
  } catch (const std::exception& e) {
    return internal_error("task " + ctx.task.id + " (" + ctx.task.type + ") failed with an " +
                          "exception: " + e.what() + " (inputs: " + task_inputs_text(ctx) + ")");
  } catch (...) {
    return internal_error("task " + ctx.task.id + " (" + ctx.task.type +
                          ") failed with an unknown exception (inputs: " + task_inputs_text(ctx) +
                          ")");
  }
}

// The claim's parts that the other ranks need to run a task with the root.
nlohmann::json task_message(const TaskContext& ctx, const nlohmann::json& spec) {
  return {{"op", "run"},
          {"job_id", ctx.job_id},
          {"attempt", ctx.attempt},
          {"spec", spec},
          {"task",
           {{"id", ctx.task.id},
            {"type", ctx.task.type},
            {"deps", ctx.task.deps},
            {"params", ctx.task.params}}},
          {"deps", ctx.deps}};
}

// Renews one claim's lease every lease/3 on its own connection until stopped.
// Sets `cancel` (and lost()) when the store says the task is no longer ours,
// or when Redis stayed unreachable for a whole lease; sets it (and
// timed_out()) when the task ran past `timeout_s`. A task still running
// `grace_s` after it was asked to stop is wedged: the failure is reported
// (timeout) and the process exits with status 3.
class Heartbeat {
 public:
  Heartbeat(const RedisOptions& redis, const JobStoreOptions& jso, const Claim& claim,
            std::string worker_id, int64_t lease_ms, std::atomic<bool>* cancel,
            double timeout_s = 0, double grace_s = 0)
      : redis_(redis),
        store_(redis_, jso),
        claim_(claim),
        worker_id_(std::move(worker_id)),
        lease_ms_(lease_ms),
        cancel_(cancel),
        timeout_s_(timeout_s),
        grace_s_(grace_s) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Heartbeat() { stop(); }
  void stop() {
    {
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  bool lost() const { return lost_.load(); }
  bool timed_out() const { return timed_out_.load(); }

 private:
  void loop() {
    // Heartbeats every lease/3; the timeout and grace watch ticks at least every second.
    const auto period = std::chrono::milliseconds(std::max<int64_t>(lease_ms_ / 3, 1));
    const auto tick =
        timeout_s_ > 0 || grace_s_ > 0 ? std::min(period, std::chrono::milliseconds(1000)) : period;
    const auto started = Clock::now();
    auto last_ok = Clock::now();
    auto last_beat = Clock::now();
    std::optional<Clock::time_point> stop_asked;
    std::unique_lock<std::mutex> l(mu_);
    while (!done_) {
      if (cv_.wait_for(l, tick, [this] { return done_; })) break;
      if (!stop_asked && cancel_->load()) stop_asked = Clock::now();
      if (stop_asked) {
        // Asked to stop: the task should return soon; past the grace it is wedged.
        if (grace_s_ > 0 && seconds_since(*stop_asked) > grace_s_) wedged();
        continue;
      }
      if (timeout_s_ > 0 && seconds_since(started) > timeout_s_) {
        LOG_WARN << claim_.job_id << "/" << claim_.task_id << ": ran past the task timeout ("
                 << timeout_s_ << " s): stopping";
        timed_out_.store(true);
        cancel_->store(true);
        stop_asked = Clock::now();
        continue;
      }
      if (Clock::now() - last_beat < period) continue;
      last_beat = Clock::now();
      l.unlock();
      auto r = store_.heartbeat(claim_, worker_id_);
      l.lock();
      if (r.is_ok()) {
        if (!*r) {
          LOG_WARN << claim_.job_id << "/" << claim_.task_id
                   << ": heartbeat refused (job cancelled or lease lost): stopping";
          lose();
          stop_asked = Clock::now();
          continue;
        }
        last_ok = Clock::now();
      } else if (seconds_since(last_ok) * 1000.0 > static_cast<double>(lease_ms_)) {
        LOG_WARN << claim_.job_id << "/" << claim_.task_id << ": no heartbeat for a whole lease ("
                 << r.status().to_string() << "): stopping";
        lose();
        stop_asked = Clock::now();
      } else {
        LOG_WARN << claim_.job_id << "/" << claim_.task_id
                 << ": heartbeat failed: " << r.status().to_string();
      }
    }
  }
  void lose() {
    lost_.store(true);
    cancel_->store(true);
  }
  // The task ignored the stop for the whole grace (blocked in a system call,
  // or a loop that never checks the flag): only a new process frees the worker.
  [[noreturn]] void wedged() {
    const std::string why = "task " + claim_.task_id + " did not stop within " +
                            std::to_string(static_cast<int64_t>(grace_s_)) + " s of being " +
                            (timed_out() ? "timed out" : "cancelled") + "; worker " + worker_id_ +
                            " exits to free itself";
    LOG_ERROR << claim_.job_id << "/" << claim_.task_id << ": " << why;
    if (timed_out() && !lost()) {
      Claim c = claim_;
      c.task.worker = worker_id_;
      Status s = store_.fail_task(c, why, /*retryable=*/false);
      if (!s.is_ok()) LOG_ERROR << "fail_task: " << s.to_string();
    }
    std::_Exit(3);
  }

  RedisClient redis_;
  JobStore store_;
  Claim claim_;
  std::string worker_id_;
  int64_t lease_ms_;
  std::atomic<bool>* cancel_;
  double timeout_s_, grace_s_;
  std::atomic<bool> lost_{false};
  std::atomic<bool> timed_out_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace

struct Worker::Impl {
  WorkerOptions opts;
  RedisOptions redis_opts;
  ArtifactStore* artifacts;
  RankGroup* group;
  std::unique_ptr<RedisClient> redis;  // root only
  std::unique_ptr<JobStore> store;     // root only
  bool initialized = false;
  mutable std::mutex stats_mu;
  Stats stats;  // guarded by stats_mu

  void log(const std::string& job, const std::string& line) {
    LOG_INFO << "[" << opts.worker_id << "] " << job << ": " << line;
    Status s = store->append_log(job, "[" + opts.worker_id + "] " + line);
    if (!s.is_ok()) LOG_WARN << "append_log " << job << ": " << s.to_string();
  }
  void count(int64_t Stats::*field) {
    std::lock_guard<std::mutex> l(stats_mu);
    ++(stats.*field);
  }
  // Runs a store call, retrying while Redis is briefly gone (up to a lease).
  Status with_retry(const std::function<Status()>& fn) {
    return retry_unavailable(fn, static_cast<double>(opts.lease_ms) / 1000.0);
  }

  Status init() {
    if (initialized) return Status::ok();
    QCAL_RETURN_IF_ERROR(with_retry([&] { return store->init(); }));
    initialized = true;
    return Status::ok();
  }

  void handle(const Claim& claim);
  void follow();  // non-root ranks

  // The store directory of one attempt: jobs/<job>/<task>/a<attempt>.
  std::string attempt_dir(const Claim& c, int64_t attempt) const {
    const std::string rel = task_artifact_path(c.job_id, c.task_id, attempt, "x");
    return artifacts->absolute(rel.substr(0, rel.size() - 2));
  }
  // Removes the artifacts of a failed or abandoned attempt: nothing will read
  // them, and a full disk must not stay full (issue #11).
  void clean_attempt(const Claim& c, int64_t attempt) {
    std::error_code ec;
    const auto n = std::filesystem::remove_all(attempt_dir(c, attempt), ec);
    if (n > 0)
      LOG_INFO << c.job_id << "/" << c.task_id << ": removed attempt " << attempt << "'s artifacts";
  }
  // After a success: the attempts before it (lost leases, failures) left files
  // nobody references.
  void clean_earlier_attempts(const Claim& c) {
    for (int64_t a = 1; a < c.attempt; ++a) clean_attempt(c, a);
  }
};

Worker::Worker(WorkerOptions opts, RedisOptions redis, ArtifactStore* artifacts, RankGroup* group)
    : impl_(std::make_unique<Impl>()) {
  impl_->opts = std::move(opts);
  impl_->redis_opts = std::move(redis);
  impl_->artifacts = artifacts;
  impl_->group = group;
  if (group->is_root()) {
    impl_->redis = std::make_unique<RedisClient>(impl_->redis_opts);
    impl_->store = std::make_unique<JobStore>(*impl_->redis, impl_->opts.store);
  }
}

Worker::~Worker() = default;

Worker::Stats Worker::stats() const {
  std::lock_guard<std::mutex> l(impl_->stats_mu);
  return impl_->stats;
}

void Worker::Impl::handle(const Claim& claim) {
  const auto t0 = Clock::now();
  const std::string& job = claim.job_id;
  const std::string& task = claim.task_id;
  log(job, "claimed " + task + " (" + claim.task.def.type + ", attempt " +
               std::to_string(claim.attempt) + ")");

  auto report_fail = [&](const Status& s, bool retry) {
    count(&Stats::failed);
    log(job, task + " failed" + (retry ? " (will retry)" : "") + ": " + s.to_string());
    Status r = with_retry([&] { return store->fail_task(claim, s.to_string(), retry); });
    if (!r.is_ok()) LOG_ERROR << job << "/" << task << ": fail_task: " << r.to_string();
  };

  auto spec = parse_job_spec(claim.job.spec);
  if (!spec.is_ok()) return report_fail(spec.status().with_context("job spec"), false);
  // The paths again, here: the coordinator checked them at submit, but what
  // they lead to may have changed since (common/path_policy.h).
  if (opts.paths) {
    auto confined = opts.paths->confine(*spec, job);
    if (!confined.is_ok()) {
      clean_attempt(claim, claim.attempt);
      return report_fail(confined.status(), retryable(confined.status().code()));
    }
    spec = std::move(confined);
  }

  TaskContext ctx;
  ctx.job_id = job;
  ctx.spec = *spec;
  ctx.task = claim.task.def;
  ctx.attempt = claim.attempt;
  ctx.store = artifacts;
  ctx.group = group;
  ctx.log = [&](const std::string& line) { log(job, task + ": " + line); };
  JobStoreFence fence(store.get(), &claim, static_cast<double>(opts.lease_ms) / 1000.0);
  ctx.fence = &fence;

  std::atomic<bool> cancel{false};
  ctx.cancel = &cancel;
  Heartbeat hb(redis_opts, opts.store, claim, opts.worker_id, opts.lease_ms, &cancel,
               opts.task_timeout_s, opts.stop_grace_s);

  if (!ctx.task.deps.empty()) {
    Result<std::vector<TaskInfo>> tasks = unavailable("not read");
    Status s = with_retry([&] {
      tasks = store->get_tasks(job);
      return tasks.status();
    });
    if (!s.is_ok()) return report_fail(s.with_context("reading dep results"), retryable(s.code()));
    for (const TaskInfo& t : *tasks)
      for (const auto& d : ctx.task.deps)
        if (t.def.id == d) ctx.deps[d] = t.result;
  }

  auto rerun = [&](const std::string& producer, const Status& why) {
    hb.stop();
    clean_attempt(claim, claim.attempt);
    if (hb.lost()) {
      count(&Stats::abandoned);
      return;
    }
    count(&Stats::reruns);
    log(job, task + ": input from " + producer + " is corrupt (" + why.message() +
                 "): re-running " + producer);
    Status r = with_retry([&] { return store->rerun_producer(claim, producer, why.to_string()); });
    if (!r.is_ok()) LOG_ERROR << job << "/" << task << ": rerun_producer: " << r.to_string();
  };

  // Inputs first: a corrupt artifact sends its producer back to work before
  // this task spends anything on it.
  std::string producer;
  Status v = find_corrupt_input(ctx, &producer);
  if (!producer.empty()) return rerun(producer, v);
  if (!v.is_ok()) {
    hb.stop();
    clean_attempt(claim, claim.attempt);
    return report_fail(v, retryable(v.code()));
  }

  if (group->multi() && runs_on_all_ranks(ctx.task.type)) {
    std::string msg = task_message(ctx, claim.job.spec).dump();
    Status b = group->broadcast(&msg);
    if (!b.is_ok()) {
      LOG_ERROR << "broadcast to the rank group failed: " << b.to_string();
      group->abort(3);
    }
  }
  Result<nlohmann::json> result = run_task_guarded(ctx);
  hb.stop();

  if (hb.timed_out() && !hb.lost()) {
    clean_attempt(claim, claim.attempt);
    return report_fail(
        resource_exhausted("task " + task + " ran longer than the worker's " + "task timeout (" +
                           std::to_string(static_cast<int64_t>(opts.task_timeout_s)) +
                           " s, qcal-worker --task-timeout-s) and was stopped"),
        /*retry=*/false);
  }
  if (hb.lost() || (!result.is_ok() && is_cancelled(result.status()))) {
    count(&Stats::abandoned);
    clean_attempt(claim, claim.attempt);
    LOG_WARN << "[" << opts.worker_id << "] " << job << "/" << task
             << ": stopped without reporting (job cancelled or lease lost"
             << (result.is_ok() ? "" : ": " + result.status().message()) << ")";
    return;
  }
  if (result.is_ok()) {
    std::ostringstream line;
    line << task << " done in " << seconds_since(t0) << " s";
    Status r = with_retry([&] { return store->complete_task(claim, *result); });
    if (!r.is_ok()) {
      LOG_ERROR << job << "/" << task << ": complete_task: " << r.to_string();
      return;  // the lease runs out and the task is re-run (idempotent)
    }
    count(&Stats::completed);
    log(job, line.str());
    clean_earlier_attempts(claim);
    return;
  }
  const Status& err = result.status();
  clean_attempt(claim, claim.attempt);
  if (err.code() == Code::kCorrupt) {
    // An input may have gone bad while it was read: find which.
    std::string p;
    Status again = find_corrupt_input(ctx, &p);
    if (!p.empty()) return rerun(p, again);
  }
  report_fail(err, retryable(err.code()));
}

Result<bool> Worker::run_once() {
  Impl& m = *impl_;
  if (!m.group->is_root()) return internal_error("run_once: only the root rank claims tasks");
  QCAL_RETURN_IF_ERROR(m.init());
  Status seen = m.store->worker_seen(m.opts.worker_id);
  if (!seen.is_ok()) LOG_WARN << "worker_seen: " << seen.to_string();
  QCAL_ASSIGN_OR_RETURN(std::optional<Claim> claim,
                        m.store->claim_task(m.opts.worker_id, m.opts.lease_ms, m.opts.block_ms));
  if (!claim) return false;
  m.handle(*claim);
  return true;
}

void Worker::Impl::follow() {
  for (;;) {
    std::string msg;
    Status s = group->broadcast(&msg);
    if (!s.is_ok()) {
      LOG_ERROR << "rank " << group->rank() << ": broadcast: " << s.to_string();
      group->abort(3);
    }
    nlohmann::json j = nlohmann::json::parse(msg, nullptr, false);
    if (j.is_discarded() || !j.is_object() || j.value("op", "") == "stop") return;
    TaskContext ctx;
    ctx.job_id = j["job_id"].get<std::string>();
    ctx.attempt = j["attempt"].get<int64_t>();
    auto spec = parse_job_spec(j["spec"]);
    ctx.task.id = j["task"]["id"].get<std::string>();
    ctx.task.type = j["task"]["type"].get<std::string>();
    ctx.task.deps = j["task"]["deps"].get<std::vector<std::string>>();
    ctx.task.params = j["task"]["params"];
    for (auto it = j["deps"].begin(); it != j["deps"].end(); ++it) ctx.deps[it.key()] = it.value();
    ctx.store = artifacts;
    ctx.group = group;
    if (!spec.is_ok()) {
      // The root parsed the same spec; a difference here is a bug.
      LOG_ERROR << "rank " << group->rank() << ": " << spec.status().to_string();
      group->abort(3);
    }
    ctx.spec = *spec;
    auto r = run_task_guarded(ctx);
    if (!r.is_ok())
      LOG_WARN << "rank " << group->rank() << ": " << ctx.task.id << ": " << r.status().to_string();
  }
}

Status Worker::run() {
  Impl& m = *impl_;
  if (!m.group->is_root()) {
    m.follow();
    return Status::ok();
  }
  LOG_INFO << "[" << m.opts.worker_id << "] worker up: " << m.group->size() << " rank(s), lease "
           << m.opts.lease_ms << " ms, store " << m.artifacts->root() << ", paths "
           << (m.opts.paths ? m.opts.paths->describe() : std::string("unconfined"));
  {
    // What dead processes of this host left in the store (a kill mid-write).
    const SweepReport swept = sweep_stale_staging(m.artifacts->root(), 6, 24 * 3600.0);
    if (swept.entries > 0)
      LOG_INFO << "[" << m.opts.worker_id << "] removed " << swept.entries
               << " stale staging entries from the store (" << swept.bytes << " bytes)";
  }
  double backoff_s = 0.1;
  Status result;
  while (!stop_requested()) {
    auto r = run_once();
    if (!r.is_ok()) {
      LOG_WARN << "[" << m.opts.worker_id << "] " << r.status().to_string() << "; retrying in "
               << backoff_s << " s";
      std::this_thread::sleep_for(std::chrono::duration<double>(backoff_s));
      backoff_s = std::min(backoff_s * 2, 5.0);
      continue;
    }
    backoff_s = 0.1;
    if (*r && m.opts.once) break;
  }
  if (m.group->multi()) {
    std::string stop = nlohmann::json{{"op", "stop"}}.dump();
    QCAL_RETURN_IF_ERROR(m.group->broadcast(&stop));
  }
  LOG_INFO << "[" << m.opts.worker_id << "] worker stopped";
  return result;
}

}  // namespace qcal

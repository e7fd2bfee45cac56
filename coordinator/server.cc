#include "coordinator/server.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/json_util.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "common/plan.h"
#include "common/planner.h"
#include "coordinator/admission.h"
#include "coordinator/auth.h"
#include "coordinator/http_front.h"
#include "coordinator/quota.h"
#include "coordinator/retention.h"
#include "coordinator/schedules.h"

namespace qcal {

namespace {

using json = nlohmann::json;

double now_s() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

// ------------------------------------------------------------ the adapter

// What a handler answers: a status and a JSON body (or text for /metrics).
struct Reply {
  int status = 200;
  json body;
  std::string text;  // when non-empty, sent as-is with `content_type`
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;
};

// The one place failures become HTTP: {"error": {"code", "message"}}.
Reply error_reply(int http, const std::string& code, const std::string& message) {
  Reply r;
  r.status = http;
  r.body = {{"error", {{"code", code}, {"message", message}}}};
  return r;
}

int http_status_for(Code c) {
  switch (c) {
    case Code::kInvalidInput: return 400;
    case Code::kNotFound: return 404;
    case Code::kResourceExhausted: return 422;
    case Code::kUnavailable: return 503;
    case Code::kPermissionDenied: return 403;
    case Code::kConflict: return 409;
    default: return 500;
  }
}

Reply error_reply(const Status& s) {
  return error_reply(http_status_for(s.code()), code_name(s.code()), s.message());
}

// A Reply as the HTTP front writes it. Invalid UTF-8 in a body (a label or
// an error message quoting the request) is replaced, never a throw.
HttpResponse to_http(const Reply& r) {
  HttpResponse h;
  h.status = r.status;
  h.headers = r.headers;
  if (!r.text.empty()) {
    h.body = r.text;
    h.content_type = r.content_type;
  } else {
    h.body = r.body.dump(-1, ' ', false, json::error_handler_t::replace);
  }
  return h;
}

// What a handler sees: the transport-neutral request plus what routing and
// authentication found.
struct ApiRequest {
  const HttpRequest& http;
  std::vector<std::string> ids;  // path parameters, already checked ({job}, {schedule})
  // Who is asking: TokenAuth::identify ("anonymous" with auth off); "" on an
  // open route without a valid token.
  std::string owner;
  bool authenticated = false;
  const std::string& id() const { return ids.at(0); }
};

// ------------------------------------------------------------ request parsing

// Deeper nesting than any job spec needs. Checked before parsing: nlohmann
// builds (and destroys, recursively) arbitrarily deep values, so a 1 MiB body
// of '[' could otherwise exhaust a request thread's stack.
constexpr int kMaxJsonDepth = 32;

Result<json> parse_body(const HttpRequest& req) {
  if (req.body.empty()) return invalid_input("request body is empty (expected a JSON object)");
  if (size_t at = json_nesting_exceeds(req.body, kMaxJsonDepth); at != std::string::npos)
    return invalid_input("malformed JSON (byte " + std::to_string(at) + "): nested deeper than " +
                         std::to_string(kMaxJsonDepth) + " levels");
  try {
    return json::parse(req.body);
  } catch (const json::parse_error& e) {
    // e.what() is "[json.exception.parse_error.101] parse error at line 1, column 9: ...".
    std::string what = e.what();
    size_t p = what.find("] ");
    if (p != std::string::npos) what = what.substr(p + 2);
    return invalid_input("malformed JSON (byte " + std::to_string(e.byte) + "): " + what);
  }
}

Result<int64_t> int_param(const HttpRequest& req, const std::string& name, int64_t def, int64_t lo,
                          int64_t hi) {
  const auto p = req.param(name);
  if (!p) return def;
  const std::string& v = *p;
  try {
    size_t used = 0;
    int64_t x = std::stoll(v, &used);
    if (used == v.size() && x >= lo && x <= hi) return x;
  } catch (...) {
  }
  return invalid_input(name + ": must be an integer in [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "] (got '" + v.substr(0, 64) + "')");
}

// Labels are shown in every listing: bounded in count and size.

// A string from the request, shortened for an error message.
std::string clip_quote(const std::string& s) {
  return "'" + (s.size() <= 64 ? s : s.substr(0, 64) + "...") + "'";
}

// ------------------------------------------------------------ JSON views

json job_summary(const JobInfo& j) {
  return {{"id", j.id},
          {"state", job_state_name(j.state)},
          {"priority", priority_name(j.priority)},
          {"labels", j.labels},
          {"created_at", j.created_at},
          {"updated_at", j.updated_at},
          {"error", j.error},
          {"schedule_id", j.schedule_id},
          {"tasks_total", j.tasks_total},
          {"tasks_done", j.tasks_done}};
}

double task_seconds(const TaskInfo& t, double now) {
  if (t.started_at <= 0) return 0;
  return std::max(0.0, (t.finished_at > 0 ? t.finished_at : now) - t.started_at);
}

json job_detail(const JobInfo& j, const std::vector<TaskInfo>& tasks, double now) {
  json d = job_summary(j);
  d["spec"] = j.spec;
  d["report"] = j.report;
  json tj = json::array();
  json blocks = json::array();
  json windows = json::array();  // CBQ: one report per finished window task
  double cal_sum = 0;
  int64_t cal_done = 0, cal_left = 0, cal_running = 0, done = 0;
  for (const TaskInfo& t : tasks) {
    tj.push_back({{"id", t.def.id},
                  {"type", t.def.type},
                  {"state", task_state_name(t.state)},
                  {"attempts", t.attempts},
                  {"worker", t.worker},
                  {"seconds", task_seconds(t, now)},
                  {"deps", t.def.deps},
                  {"params", t.def.params},
                  {"mem_bytes", t.def.mem_bytes},
                  {"error", t.error}});
    if (t.state == TaskState::kDone) ++done;
    // The block tasks (quantize, transform, CBQ windows) give the ETA and the reports.
    if (t.def.type != plan::kQuantize && t.def.type != plan::kCbqWindow &&
        t.def.type != plan::kTransform)
      continue;
    if (t.state == TaskState::kDone) {
      cal_sum += task_seconds(t, now);
      ++cal_done;
      if (t.result.is_object() && t.result.contains("layers") && t.result["layers"].is_array())
        for (const auto& l : t.result["layers"]) blocks.push_back(l);
      if (t.result.is_object() && t.result.contains("window") && t.result["window"].is_object())
        windows.push_back(t.result["window"]);
    } else if (t.state != TaskState::kCancelled && t.state != TaskState::kFailed) {
      ++cal_left;
      if (t.state == TaskState::kRunning) ++cal_running;
    }
  }
  auto layer_of = [](const json& b) {
    return b.is_object() && b.contains("layer") && b["layer"].is_number_integer()
               ? b["layer"].get<int64_t>()
               : int64_t{0};
  };
  std::stable_sort(blocks.begin(), blocks.end(),
                   [&](const json& a, const json& b) { return layer_of(a) < layer_of(b); });
  d["progress"] = {
      {"tasks_total", static_cast<int64_t>(tasks.size())}, {"tasks_done", done}, {"tasks", tj}};
  d["blocks"] = blocks;
  auto window_of = [](const json& w) {
    return w.contains("window") && w["window"].is_number_integer() ? w["window"].get<int64_t>()
                                                                   : int64_t{0};
  };
  std::stable_sort(windows.begin(), windows.end(),
                   [&](const json& a, const json& b) { return window_of(a) < window_of(b); });
  d["windows"] = windows;
  // ETA: mean block-task duration × the block tasks left, over the ones running at
  // once (the workers busy with this job's block tasks now; at least 1).
  json eta;
  if (is_terminal(j.state)) {
    eta = 0.0;
  } else if (cal_done > 0) {
    const int64_t width = std::max<int64_t>(1, cal_running);
    eta = cal_sum / static_cast<double>(cal_done) *
          std::ceil(static_cast<double>(cal_left) / static_cast<double>(width));
  }
  d["eta_seconds"] = eta;
  return d;
}

// ------------------------------------------------------------ Redis pool

// Idle RedisClients for request threads (a RedisClient is single-threaded).
class RedisPool {
 public:
  explicit RedisPool(RedisOptions o) : opts_(std::move(o)) {}

  class Lease {
   public:
    Lease(RedisPool* pool, std::unique_ptr<RedisClient> c) : pool_(pool), c_(std::move(c)) {}
    Lease(Lease&&) = default;
    ~Lease() {
      if (c_) pool_->put(std::move(c_));
    }
    RedisClient& operator*() { return *c_; }

   private:
    RedisPool* pool_;
    std::unique_ptr<RedisClient> c_;
  };

  Lease get() {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.empty()) return Lease(this, std::make_unique<RedisClient>(opts_));
    auto c = std::move(idle_.back());
    idle_.pop_back();
    return Lease(this, std::move(c));
  }

 private:
  void put(std::unique_ptr<RedisClient> c) {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.size() < 32) idle_.push_back(std::move(c));
  }
  const RedisOptions opts_;
  std::mutex mu_;
  std::vector<std::unique_ptr<RedisClient>> idle_;  // guarded by mu_
};

RedisOptions capped(RedisOptions o, double timeout_s) {
  o.reconnect_timeout_s = std::min(o.reconnect_timeout_s, timeout_s);
  o.connect_timeout_s = std::min(o.connect_timeout_s, timeout_s);
  return o;
}

std::string prom_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\\' || c == '"') o += '\\';
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o += c;
  }
  return o;
}

std::string prom_number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

// ================================================================== Impl

struct CoordinatorServer::Impl {
  explicit Impl(CoordinatorOptions o)
      : opts(std::move(o)),
        auth(opts.token_file),
        pool(capped(opts.redis, opts.request_redis_timeout_s)),
        ready_pool(capped(opts.redis, 0.5)) {
    limits.worker_memory_bytes = opts.worker_memory_bytes;
    add_routes();
  }

  const CoordinatorOptions opts;
  PlannerLimits limits;
  std::unique_ptr<PathPolicy> paths;  // set by start(); limits.paths points at it
  StoreStats store_stats;
  TokenAuth auth;
  RedisPool pool;                    // request threads
  RedisPool ready_pool;              // /readyz and /metrics: fail fast when Redis is gone
  std::unique_ptr<HttpFront> front;  // set by start()
  std::thread bg_thread;
  boost::asio::io_context io;
  std::unique_ptr<boost::asio::steady_timer> tick_timer, log_timer,
      sweep_timer;                       // used on bg_thread only
  std::atomic<bool> store_ready{false};  // JobStore::init done against this Redis
  int bound_port = 0;

  std::mutex stop_mu;
  bool started = false;  // guarded by stop_mu
  bool stopped = false;  // guarded by stop_mu

  bool tick_failing = false;  // bg_thread only

  // ---- routing (immutable after construction)
  using Fn = Result<Reply> (Impl::*)(const ApiRequest&);
  struct Route {
    std::string method;
    std::vector<std::string> segments;  // "{job}" / "{schedule}": a checked id
    Fn fn;
    bool open = false;  // no token needed
  };
  std::vector<Route> routes;
  struct Match {
    const Route* route = nullptr;
    std::vector<std::string> ids;
    std::optional<Reply> error;  // no route, or a malformed id (404)
  };
  void add_routes();
  Match route_of(const HttpRequest& req) const;
  // The HTTP front's two callbacks (see HttpHandlers).
  std::optional<HttpResponse> on_head(const HttpRequest& req);
  HttpResponse on_request(const HttpRequest& req);
  HttpFrontOptions front_options() const;

  JobStoreOptions store_opts() const {
    JobStoreOptions o;
    o.prefix = opts.prefix;
    return o;
  }

  Status ensure_store(RedisClient& r) {
    if (store_ready.load()) return Status::ok();
    JobStore store(r, store_opts());
    QCAL_RETURN_IF_ERROR(store.init());
    store_ready.store(true);
    return Status::ok();
  }

  void background();
  void schedule_tick();
  void schedule_log();
  void schedule_sweep();
  Result<SweepResult> sweep_now(double now);

  // Handlers.
  Result<Reply> post_job(const ApiRequest& req);
  Result<Reply> list_jobs(const ApiRequest& req);
  Result<Reply> get_job(const ApiRequest& req);
  Result<Reply> cancel_job(const ApiRequest& req);
  Result<Reply> get_report(const ApiRequest& req);
  Result<Reply> get_logs(const ApiRequest& req);
  Result<Reply> post_schedule(const ApiRequest& req);
  Result<Reply> list_schedules(const ApiRequest& req);
  Result<Reply> get_schedule(const ApiRequest& req);
  Result<Reply> delete_schedule(const ApiRequest& req);
  Result<Reply> readyz(const ApiRequest& req);
  Result<Reply> metrics(const ApiRequest& req);
};

Result<Reply> CoordinatorServer::Impl::post_job(const ApiRequest& req) {
  QCAL_ASSIGN_OR_RETURN(json body, parse_body(req.http));
  QCAL_ASSIGN_OR_RETURN(JobSpec parsed, parse_job_spec(body));
  // Confinement (403), plan, data headers: coordinator/admission.h.
  QCAL_ASSIGN_OR_RETURN(Admission admitted, admit_job(parsed, limits));
  const Plan* plan = &admitted.plan;
  auto lease = pool.get();
  QCAL_RETURN_IF_ERROR(ensure_store(*lease));
  JobStore store(*lease, store_opts());
  // Per-token quota: reserve a slot first, so concurrent submits (through any
  // coordinator) cannot pass the limit together.
  QuotaReservation slot;
  if (opts.max_jobs_per_token > 0) {
    QCAL_ASSIGN_OR_RETURN(
        slot, reserve_job_slot(*lease, opts.prefix, req.owner, opts.max_jobs_per_token));
    if (!slot.granted)
      return error_reply(429, "TOO_MANY_JOBS",
                         "this token has " + std::to_string(slot.live) +
                             " live jobs (queued, running or validating); the limit is " +
                             std::to_string(opts.max_jobs_per_token) +
                             " per token: wait for one to finish or cancel one");
  }
  // 409 while a live job owns the output path.
  auto created = store.create_job(admitted.spec, plan->tasks);
  if (!slot.reservation.empty()) {
    Status s = created.is_ok()
                   ? commit_job_slot(*lease, opts.prefix, req.owner, slot.reservation, *created)
                   : release_job_slot(*lease, opts.prefix, req.owner, slot.reservation);
    if (!s.is_ok()) LOG_WARN << "quota of " << req.owner << ": " << s.to_string();
  }
  QCAL_ASSIGN_OR_RETURN(std::string id, std::move(created));
  json tasks = json::array();
  for (const auto& t : plan->tasks) tasks.push_back(t.id);
  Reply r;
  r.status = 202;
  r.body = {{"id", id}, {"state", "queued"}, {"tasks", tasks}, {"plan", plan->summary}};
  r.headers.push_back({"Location", "/v1/jobs/" + id});
  return r;
}

Result<Reply> CoordinatorServer::Impl::list_jobs(const ApiRequest& req) {
  std::optional<JobState> state;
  if (auto s = req.http.param("state")) {
    state = parse_job_state(*s);
    if (!state)
      return invalid_input("state: unknown job state " + clip_quote(*s) +
                           " (queued, running, validating, succeeded, failed, cancelled)");
  }
  std::map<std::string, std::string> labels;
  for (const std::string& kv : req.http.params("label")) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0)
      return invalid_input("label: expected key=value (got " + clip_quote(kv) + ")");
    labels[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  QCAL_ASSIGN_OR_RETURN(int64_t limit, int_param(req.http, "limit", 100, 1, 1000));
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(auto jobs, store.list_jobs(state, labels, limit));
  json arr = json::array();
  for (const auto& j : jobs) arr.push_back(job_summary(j));
  Reply r;
  r.body = {{"jobs", arr}};
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_job(const ApiRequest& req) {
  const std::string& id = req.id();
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(JobInfo job, store.get_job(id));
  QCAL_ASSIGN_OR_RETURN(auto tasks, store.get_tasks(id));
  Reply r;
  r.body = job_detail(job, tasks, now_s());
  return r;
}

Result<Reply> CoordinatorServer::Impl::cancel_job(const ApiRequest& req) {
  const std::string& id = req.id();
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(JobInfo job, store.get_job(id));
  auto conflict = [&](JobState s) {
    return error_reply(
        409, "CONFLICT",
        "job " + id + " is already " + job_state_name(s) + " and cannot be cancelled");
  };
  if (is_terminal(job.state)) return conflict(job.state);
  Status s = store.cancel_job(id);
  if (s.code() == Code::kInvalidInput) {  // became terminal meanwhile
    QCAL_ASSIGN_OR_RETURN(JobInfo now, store.get_job(id));
    return conflict(now.state);
  }
  QCAL_RETURN_IF_ERROR(s);
  QCAL_ASSIGN_OR_RETURN(JobInfo after, store.get_job(id));
  QCAL_ASSIGN_OR_RETURN(auto tasks, store.get_tasks(id));
  Reply r;
  r.body = job_detail(after, tasks, now_s());
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_report(const ApiRequest& req) {
  const std::string& id = req.id();
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(JobInfo job, store.get_job(id));
  if (job.report.is_null())
    return not_found("job " + id + " has no report yet (state " + job_state_name(job.state) + ")");
  Reply r;
  r.body = job.report;
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_logs(const ApiRequest& req) {
  const std::string& id = req.id();
  QCAL_ASSIGN_OR_RETURN(int64_t from, int_param(req.http, "from", 0, 0, INT64_MAX));
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(JobInfo job, store.get_job(id));
  QCAL_ASSIGN_OR_RETURN(auto lines, store.get_log(id, from));
  Reply r;
  r.body = {{"id", id},
            {"state", job_state_name(job.state)},
            {"lines", lines},
            {"next", from + static_cast<int64_t>(lines.size())}};
  return r;
}

Result<Reply> CoordinatorServer::Impl::post_schedule(const ApiRequest& req) {
  QCAL_ASSIGN_OR_RETURN(json body, parse_body(req.http));
  QCAL_ASSIGN_OR_RETURN(ScheduleRequest sr, parse_schedule_request(body));
  const std::time_t now = static_cast<std::time_t>(now_s());
  auto next = sr.cron.next_after(now);
  if (!next) return invalid_input("cron: '" + sr.cron.text + "' never fires");
  if (const int64_t every = sr.cron.min_interval_s(); every < opts.min_schedule_interval_s)
    return invalid_input("cron: '" + sr.cron.text + "' can fire " + std::to_string(every) +
                         " s apart; runs must be at least " +
                         std::to_string(opts.min_schedule_interval_s) +
                         " s apart (--min-schedule-interval-s)");
  Schedule s;
  s.id = new_schedule_id();
  s.cron = sr.cron.text;
  s.job_template = sr.job_template;
  s.thresholds = sr.thresholds;
  s.next_run_at = *next;
  s.created_at = now;
  // Validate the template as its first run will see it.
  auto spec = parse_job_spec(instantiate_template(sr.job_template, s.id, *next));
  if (!spec.is_ok()) return spec.status().with_context("template");
  auto plan = admit_job(*spec, limits);  // confinement too (coordinator/admission.h)
  if (!plan.is_ok()) return Status(plan.status().code(), "template." + plan.status().message());
  const std::string out = sr.job_template["output"].value("path", "");
  if (out.find("{time}") == std::string::npos && !spec->output.overwrite)
    return invalid_input("template.output.path: every run would write " + out +
                         "; put {time} in the path or set output.overwrite");
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_RETURN_IF_ERROR(store.create(s));
  Reply r;
  r.status = 201;
  r.body = s.to_json();
  r.headers.push_back({"Location", "/v1/schedules/" + s.id});
  return r;
}

Result<Reply> CoordinatorServer::Impl::list_schedules(const ApiRequest&) {
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_ASSIGN_OR_RETURN(auto all, store.list());
  json arr = json::array();
  for (const auto& s : all) arr.push_back(s.to_json());
  Reply r;
  r.body = {{"schedules", arr}};
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_schedule(const ApiRequest& req) {
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_ASSIGN_OR_RETURN(Schedule s, store.get(req.id()));
  Reply r;
  r.body = s.to_json();
  return r;
}

Result<Reply> CoordinatorServer::Impl::delete_schedule(const ApiRequest& req) {
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_ASSIGN_OR_RETURN(Schedule s, store.get(req.id()));
  QCAL_RETURN_IF_ERROR(store.remove(s.id));
  Reply r;
  r.body = s.to_json();
  r.body["deleted"] = true;
  return r;
}

// Without a valid token only the verdict: where Redis and the store live is
// for operators.
Result<Reply> CoordinatorServer::Impl::readyz(const ApiRequest& req) {
  auto lease = ready_pool.get();
  auto pong = (*lease).command({"PING"});
  const std::string where = opts.redis.host + ":" + std::to_string(opts.redis.port);
  if (!pong.is_ok())
    return unavailable(req.authenticated
                           ? "redis " + where + " unreachable: " + pong.status().message()
                           : std::string("redis unreachable"));
  Reply r;
  r.body = {{"status", "ready"}};
  if (!req.authenticated) return r;
  struct stat st {};
  const bool store_ok =
      !opts.store_root.empty() && ::stat(opts.store_root.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  r.body.update({{"redis", where},
                 {"store", opts.store_root},
                 {"store_exists", store_ok},
                 {"auth", auth.enabled()}});
  return r;
}

Result<Reply> CoordinatorServer::Impl::metrics(const ApiRequest&) {
  std::string m;
  auto gauge = [&m](const std::string& name, const std::string& help, const std::string& type) {
    m += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  };
  auto lease = ready_pool.get();
  JobStore store(*lease, store_opts());
  ScheduleStore sched(*lease, opts.prefix);
  auto counts = store.job_counts();
  const bool up = counts.is_ok();
  gauge("qcal_redis_up", "1 when Redis answered this scrape.", "gauge");
  m += std::string("qcal_redis_up ") + (up ? "1" : "0") + "\n";
  if (up) {
    gauge("qcal_jobs", "Jobs by state.", "gauge");
    for (JobState s : {JobState::kQueued, JobState::kRunning, JobState::kValidating,
                       JobState::kSucceeded, JobState::kFailed, JobState::kCancelled}) {
      auto it = counts->find(job_state_name(s));
      m += std::string("qcal_jobs{state=\"") + job_state_name(s) + "\"} " +
           std::to_string(it == counts->end() ? 0 : it->second) + "\n";
    }
    auto depth = store.queue_depth();
    if (depth.is_ok()) {
      gauge("qcal_queue_depth", "Task queue entries not yet acknowledged.", "gauge");
      m += "qcal_queue_depth " + std::to_string(*depth) + "\n";
    }
    auto workers = store.live_workers(opts.worker_live_s);
    if (workers.is_ok()) {
      gauge("qcal_workers", "Workers seen within the liveness window.", "gauge");
      m += "qcal_workers " + std::to_string(*workers) + "\n";
    }
    auto mc = store.metrics();
    if (mc.is_ok()) {
      const auto& c = *mc;
      auto get = [&c](const std::string& k) {
        auto it = c.find(k);
        return it == c.end() ? 0.0 : it->second;
      };
      gauge("qcal_task_seconds", "Task run time.", "histogram");
      for (const char* le : {"1", "10", "60", "600", "3600", "+Inf"})
        m += std::string("qcal_task_seconds_bucket{le=\"") + le + "\"} " +
             prom_number(get(std::string("task_seconds_bucket_") + le)) + "\n";
      m += "qcal_task_seconds_sum " + prom_number(get("task_seconds_sum")) + "\n";
      m += "qcal_task_seconds_count " + prom_number(get("task_seconds_count")) + "\n";
      gauge("qcal_tasks_completed_total", "Tasks completed.", "counter");
      m += "qcal_tasks_completed_total " + prom_number(get("tasks_completed")) + "\n";
      gauge("qcal_tasks_failed_total", "Task attempts that failed.", "counter");
      m += "qcal_tasks_failed_total " + prom_number(get("tasks_failed")) + "\n";
    }
    // The artifact store (coordinator/retention.h), as of the last sweep.
    const StoreStats::Snapshot ss = store_stats.snapshot();
    if (ss.measured) {
      gauge("qcal_store_bytes", "Bytes of files in the artifact store (last sweep).", "gauge");
      m += "qcal_store_bytes " + std::to_string(ss.store_bytes) + "\n";
      gauge("qcal_store_free_bytes", "Free bytes on the store's filesystem (last sweep).", "gauge");
      m += "qcal_store_free_bytes " + std::to_string(ss.free_bytes) + "\n";
      gauge("qcal_store_job_dirs", "Job artifact directories kept in the store.", "gauge");
      m += "qcal_store_job_dirs " + std::to_string(ss.job_dirs) + "\n";
      gauge("qcal_store_reclaimed_bytes_total", "Bytes of artifacts removed by retention.",
            "counter");
      m += "qcal_store_reclaimed_bytes_total " + std::to_string(ss.reclaimed_bytes_total) + "\n";
      gauge("qcal_store_removed_jobs_total", "Job artifact directories removed by retention.",
            "counter");
      m += "qcal_store_removed_jobs_total " + std::to_string(ss.removed_jobs_total) + "\n";
    }
    auto reg = sched.regressions_total();
    if (reg.is_ok()) {
      gauge("qcal_schedule_regressions_total", "Scheduled runs marked regressed.", "counter");
      m += "qcal_schedule_regressions_total " + std::to_string(*reg) + "\n";
    }
  }
  const HttpFrontStats hs = front ? front->stats() : HttpFrontStats{};
  gauge("qcal_http_requests_total", "HTTP responses written by this process, by status.",
        "counter");
  for (const auto& [code, n] : hs.responses)
    m += "qcal_http_requests_total{code=\"" + prom_escape(std::to_string(code)) + "\"} " +
         std::to_string(n) + "\n";
  gauge("qcal_http_connections", "Client connections open now.", "gauge");
  m += "qcal_http_connections " + std::to_string(hs.open_connections) + "\n";
  gauge("qcal_http_connections_rejected_total",
        "Connections answered 503 over --max-connections / --max-connections-per-ip.", "counter");
  m += "qcal_http_connections_rejected_total " + std::to_string(hs.rejected_total) + "\n";
  gauge("qcal_http_timeouts_total", "Connections closed by the head, body or write deadline.",
        "counter");
  m += "qcal_http_timeouts_total " + std::to_string(hs.timeouts_total) + "\n";
  Reply r;
  r.text = m;
  r.content_type = "text/plain; version=0.0.4";
  return r;
}

// ------------------------------------------------------------ routing

void CoordinatorServer::Impl::add_routes() {
  auto add = [this](const char* method, const char* path, Fn fn, bool open = false) {
    Route r{method, {}, fn, open};
    std::string p = path;
    for (size_t s = 1; s <= p.size();) {
      size_t e = p.find('/', s);
      if (e == std::string::npos) e = p.size();
      r.segments.push_back(p.substr(s, e - s));
      s = e + 1;
    }
    routes.push_back(std::move(r));
  };
  add("POST", "/v1/jobs", &Impl::post_job);
  add("GET", "/v1/jobs", &Impl::list_jobs);
  add("GET", "/v1/jobs/{job}", &Impl::get_job);
  add("DELETE", "/v1/jobs/{job}", &Impl::cancel_job);
  add("GET", "/v1/jobs/{job}/report", &Impl::get_report);
  add("GET", "/v1/jobs/{job}/logs", &Impl::get_logs);
  add("POST", "/v1/schedules", &Impl::post_schedule);
  add("GET", "/v1/schedules", &Impl::list_schedules);
  add("GET", "/v1/schedules/{schedule}", &Impl::get_schedule);
  add("DELETE", "/v1/schedules/{schedule}", &Impl::delete_schedule);
  add("GET", "/readyz", &Impl::readyz, true);
  add("GET", "/metrics", &Impl::metrics, true);
  // GET /healthz is answered in on_head, without the worker pool.
}

CoordinatorServer::Impl::Match CoordinatorServer::Impl::route_of(const HttpRequest& req) const {
  std::vector<std::string> segs;
  for (size_t s = 1; s <= req.path.size();) {
    size_t e = req.path.find('/', s);
    if (e == std::string::npos) e = req.path.size();
    segs.push_back(req.path.substr(s, e - s));
    s = e + 1;
  }
  Match m;
  for (const Route& r : routes) {
    if (r.method != req.method || r.segments.size() != segs.size()) continue;
    std::vector<std::string> ids;
    std::optional<Reply> bad;
    bool same = true;
    for (size_t i = 0; i < segs.size() && same; ++i) {
      const std::string& want = r.segments[i];
      if (want == "{job}" || want == "{schedule}") {
        // An id the store never issues names nothing: 404 before any Redis
        // key is built from it (".../j-1:tasks" would name another key).
        const bool job = want == "{job}";
        if (!bad && !(job ? is_job_id(segs[i]) : is_schedule_id(segs[i])))
          bad = error_reply(404, "NOT_FOUND",
                            std::string(job ? "job " : "schedule ") + clip_quote(segs[i]) +
                                " not found (not a " + (job ? "job" : "schedule") + " id)");
        ids.push_back(segs[i]);
      } else {
        same = want == segs[i];
      }
    }
    if (!same) continue;
    m.route = &r;
    m.ids = std::move(ids);
    m.error = std::move(bad);
    return m;
  }
  m.error =
      error_reply(404, "NOT_FOUND", "no route for " + req.method + " " + req.path.substr(0, 256));
  return m;
}

std::optional<HttpResponse> CoordinatorServer::Impl::on_head(const HttpRequest& req) {
  if (req.method == "GET" && req.path == "/healthz") {
    Reply r;
    r.body = {{"status", "ok"}};
    return to_http(r);
  }
  const Match m = route_of(req);
  // Authentication before routing: without a token, /v1 reveals nothing.
  if (!(m.route && m.route->open) && !auth.identify(req.header("Authorization"))) {
    Reply r = error_reply(401, "UNAUTHENTICATED",
                          req.has_header("Authorization")
                              ? "invalid bearer token"
                              : "missing bearer token (Authorization: Bearer <token>)");
    r.headers.push_back({"WWW-Authenticate", "Bearer"});
    return to_http(r);
  }
  if (m.error) return to_http(*m.error);
  return std::nullopt;
}

HttpResponse CoordinatorServer::Impl::on_request(const HttpRequest& req) {
  // on_head again: handle() comes here directly, and the token file may have
  // changed while the body was read.
  if (auto early = on_head(req)) return *early;
  const Match m = route_of(req);
  const auto who = auth.identify(req.header("Authorization"));
  ApiRequest a{req, m.ids, who.value_or(""), who.has_value()};
  try {
    Result<Reply> r = (this->*(m.route->fn))(a);
    const HttpResponse h = to_http(r.is_ok() ? r.value() : error_reply(r.status()));
    LOG_DEBUG << req.method << " " << req.path << " " << h.status;
    return h;
  } catch (const std::exception& e) {
    return to_http(error_reply(500, "INTERNAL", std::string("internal error: ") + e.what()));
  }
}

HttpFrontOptions CoordinatorServer::Impl::front_options() const {
  HttpFrontOptions f;
  f.host = opts.host;
  f.port = opts.port;
  f.max_connections = opts.max_connections;
  f.max_connections_per_ip = opts.max_connections_per_ip;
  f.header_timeout_s = opts.header_timeout_s;
  f.body_timeout_s = opts.body_timeout_s;
  f.write_timeout_s = opts.write_timeout_s;
  f.worker_threads = opts.http_threads;
  f.limits.max_header_bytes = opts.max_header_bytes;
  f.limits.max_body_bytes = opts.max_body_bytes;
  return f;
}

// ------------------------------------------------------------ background

void CoordinatorServer::Impl::schedule_tick() {
  tick_timer->expires_after(
      std::chrono::milliseconds(static_cast<int64_t>(opts.tick_interval_s * 1000)));
  tick_timer->async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    auto lease = pool.get();
    Status s = ensure_store(*lease);
    if (s.is_ok()) {
      JobStore store(*lease, store_opts());
      auto rep = scheduler_tick(store, limits, std::time(nullptr));
      s = rep.status();
    }
    if (!s.is_ok() && !tick_failing) LOG_WARN << "scheduler tick failed: " << s.to_string();
    if (s.is_ok() && tick_failing) LOG_INFO << "scheduler tick recovered";
    tick_failing = !s.is_ok();
    schedule_tick();
  });
}

void CoordinatorServer::Impl::schedule_log() {
  log_timer->expires_after(
      std::chrono::milliseconds(static_cast<int64_t>(opts.status_log_interval_s * 1000)));
  log_timer->async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    auto lease = ready_pool.get();
    JobStore store(*lease, store_opts());
    auto counts = store.job_counts();
    if (counts.is_ok()) {
      std::string line;
      for (const auto& [state, n] : *counts) line += " " + state + "=" + std::to_string(n);
      auto depth = store.queue_depth();
      auto workers = store.live_workers(opts.worker_live_s);
      LOG_INFO << "coordinator: jobs" << (line.empty() ? " none" : line) << "; queue depth "
               << (depth.is_ok() ? std::to_string(*depth) : "?") << "; workers "
               << (workers.is_ok() ? std::to_string(*workers) : "?");
    } else {
      LOG_WARN << "coordinator: Redis unreachable: " << counts.status().message();
    }
    schedule_log();
  });
}

Result<SweepResult> CoordinatorServer::Impl::sweep_now(double now) {
  if (opts.store_root.empty()) return invalid_input("no artifact store (--store) to sweep");
  auto lease = ready_pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(SweepResult r, sweep_store(store, opts.store_root, opts.retention, now));
  store_stats.record(r);
  return r;
}

void CoordinatorServer::Impl::schedule_sweep() {
  sweep_timer->expires_after(
      std::chrono::milliseconds(static_cast<int64_t>(opts.retention.sweep_interval_s * 1000)));
  sweep_timer->async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    auto r = sweep_now(now_s());
    if (!r.is_ok()) {
      LOG_WARN << "retention sweep failed: " << r.status().to_string();
    } else if (r->jobs_removed > 0 || r->staging_removed > 0) {
      LOG_INFO << "retention: removed " << r->jobs_removed << " job(s) and " << r->staging_removed
               << " stale staging entries, " << r->bytes_removed << " bytes; store holds "
               << r->store_bytes << " bytes";
    }
    schedule_sweep();
  });
}

void CoordinatorServer::Impl::background() {
  tick_timer = std::make_unique<boost::asio::steady_timer>(io);
  log_timer = std::make_unique<boost::asio::steady_timer>(io);
  sweep_timer = std::make_unique<boost::asio::steady_timer>(io);
  if (opts.tick_interval_s > 0) schedule_tick();
  if (opts.status_log_interval_s > 0) schedule_log();
  if (!opts.store_root.empty() && opts.retention.sweep_interval_s > 0) {
    // A first sweep soon after start measures the store for /metrics.
    boost::asio::post(io, [this] {
      auto r = sweep_now(now_s());
      if (!r.is_ok()) LOG_WARN << "retention sweep failed: " << r.status().to_string();
    });
    schedule_sweep();
  }
  auto guard = boost::asio::make_work_guard(io);
  io.run();
  tick_timer.reset();
  log_timer.reset();
  sweep_timer.reset();
}

// ================================================================== server

CoordinatorServer::CoordinatorServer(CoordinatorOptions opts)
    : impl_(std::make_unique<Impl>(std::move(opts))) {}

CoordinatorServer::~CoordinatorServer() {
  stop();
  wait();
}

Status CoordinatorServer::start() {
  Impl& d = *impl_;
  {
    std::lock_guard<std::mutex> lock(d.stop_mu);
    if (d.started) return internal_error("coordinator already started");
  }
  {
    auto p = PathPolicy::make(d.opts.allow_read, d.opts.allow_write, d.opts.store_root);
    if (!p.is_ok()) return p.status();
    d.paths = std::make_unique<PathPolicy>(std::move(p).value());
    d.limits.paths = d.paths.get();
    if (d.opts.allow_read.empty() && d.opts.allow_write.empty())
      LOG_WARN << "paths: no --allow-read / --allow-write roots: every job will be refused (403)";
    else
      LOG_INFO << "paths: " << d.paths->describe();
  }
  if (d.auth.enabled()) {
    QCAL_RETURN_IF_ERROR(d.auth.load());
    LOG_INFO << "auth: " << d.auth.size() << " token(s) from " << d.opts.token_file;
  } else {
    LOG_WARN << "auth: no token file configured (--tokens): the API is open to anyone who can "
                "reach it";
  }
  d.front = std::make_unique<HttpFront>(
      d.front_options(), HttpHandlers{[&d](const HttpRequest& r) { return d.on_head(r); },
                                      [&d](const HttpRequest& r) { return d.on_request(r); }});
  QCAL_RETURN_IF_ERROR(d.front->start());
  d.bound_port = d.front->port();
  {
    auto lease = d.pool.get();
    Status s = d.ensure_store(*lease);
    if (!s.is_ok()) LOG_WARN << "Redis not ready at start (" << s.message() << "); will retry";
  }
  {
    std::lock_guard<std::mutex> lock(d.stop_mu);
    d.started = true;
  }
  d.bg_thread = std::thread([&d] { d.background(); });
  LOG_INFO << "coordinator listening on " << d.opts.host << ":" << d.bound_port << " (redis "
           << d.opts.redis.host << ":" << d.opts.redis.port << ", prefix " << d.opts.prefix
           << ", store " << (d.opts.store_root.empty() ? "-" : d.opts.store_root)
           << ", worker memory " << format_bytes(d.opts.worker_memory_bytes) << ")";
  LOG_INFO << "http: at most " << d.front->max_connections() << " connections"
           << (d.opts.max_connections_per_ip > 0
                   ? " (" + std::to_string(d.opts.max_connections_per_ip) + " per address)"
                   : std::string())
           << ", head within " << d.opts.header_timeout_s << " s, body within "
           << d.opts.body_timeout_s << " s, bodies up to " << format_bytes(d.opts.max_body_bytes)
           << ", " << d.opts.http_threads << " handler threads"
           << (d.opts.max_jobs_per_token > 0
                   ? ", " + std::to_string(d.opts.max_jobs_per_token) + " live jobs per token"
                   : std::string());
  return Status::ok();
}

int CoordinatorServer::port() const { return impl_->bound_port; }

void CoordinatorServer::stop() {
  Impl& d = *impl_;
  std::lock_guard<std::mutex> lock(d.stop_mu);
  if (!d.started || d.stopped) return;
  d.stopped = true;
  if (d.front) d.front->stop();
  d.io.stop();
}

void CoordinatorServer::wait() {
  Impl& d = *impl_;
  if (d.front) d.front->wait();
  if (d.bg_thread.joinable()) d.bg_thread.join();
}

HttpResponse CoordinatorServer::handle(const HttpRequest& req) { return impl_->on_request(req); }

Result<SweepResult> CoordinatorServer::sweep(double now) { return impl_->sweep_now(now); }

Result<TickReport> CoordinatorServer::tick(int64_t now) {
  auto lease = impl_->pool.get();
  QCAL_RETURN_IF_ERROR(impl_->ensure_store(*lease));
  JobStore store(*lease, impl_->store_opts());
  return scheduler_tick(store, impl_->limits, static_cast<std::time_t>(now));
}

}  // namespace qcal

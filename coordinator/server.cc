#include "coordinator/server.h"

#include <httplib.h>
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
#include <random>
#include <thread>
#include <vector>

#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/json_util.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "common/plan.h"
#include "coordinator/admission.h"
#include "coordinator/auth.h"
#include "coordinator/planner.h"
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

void send(httplib::Response& res, const Reply& r) {
  res.status = r.status;
  for (const auto& [k, v] : r.headers) res.set_header(k, v);
  if (!r.text.empty()) {
    res.set_content(r.text, r.content_type.c_str());
  } else {
    res.set_content(r.body.dump(), "application/json");
  }
}

using Handler = std::function<Result<Reply>(const httplib::Request&)>;

// Wraps a handler: a non-OK Result goes through the adapter; exceptions too.
httplib::Server::Handler wrap(Handler h) {
  return [h = std::move(h)](const httplib::Request& req, httplib::Response& res) {
    try {
      Result<Reply> r = h(req);
      send(res, r.is_ok() ? r.value() : error_reply(r.status()));
    } catch (const std::exception& e) {
      send(res, error_reply(500, "INTERNAL", std::string("internal error: ") + e.what()));
    }
  };
}

// ------------------------------------------------------------ request parsing

// Deeper nesting than any job spec needs. Checked before parsing: nlohmann
// builds (and destroys, recursively) arbitrarily deep values, so a 1 MiB body
// of '[' could otherwise exhaust a request thread's stack.
constexpr int kMaxJsonDepth = 32;

Result<json> parse_body(const httplib::Request& req) {
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

Result<int64_t> int_param(const httplib::Request& req, const std::string& name, int64_t def,
                          int64_t lo, int64_t hi) {
  if (!req.has_param(name)) return def;
  const std::string v = req.get_param_value(name);
  try {
    size_t used = 0;
    int64_t x = std::stoll(v, &used);
    if (used == v.size() && x >= lo && x <= hi) return x;
  } catch (...) {
  }
  return invalid_input(name + ": must be an integer in [" + std::to_string(lo) + ", " +
                       std::to_string(hi) + "] (got '" + v + "')");
}

// Every value of query parameter `name`, read from the raw target: httplib's
// parsed params split "label=team=a" at each '=', losing the "team=" part.
std::vector<std::string> raw_params(const httplib::Request& req, const std::string& name) {
  std::vector<std::string> out;
  const size_t q = req.target.find('?');
  if (q == std::string::npos) return out;
  const std::string query = req.target.substr(q + 1);
  size_t start = 0;
  while (start <= query.size()) {
    size_t end = query.find('&', start);
    if (end == std::string::npos) end = query.size();
    const std::string item = query.substr(start, end - start);
    if (item.compare(0, name.size() + 1, name + "=") == 0)
      out.push_back(httplib::detail::decode_url(item.substr(name.size() + 1), true));
    start = end + 1;
  }
  return out;
}

std::string random_hex(int n) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s += kHex[rng() & 15];
  return s;
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
    if (t.def.type != plan::kCalibrate && t.def.type != plan::kCbqWindow &&
        t.def.type != plan::kCalib)
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
  // ETA: mean calibrate duration × the calibrate tasks left, over the windows
  // running at once (1 in sequential mode).
  json eta;
  if (is_terminal(j.state)) {
    eta = 0.0;
  } else if (cal_done > 0) {
    const bool parallel = j.spec.is_object() && j.spec.contains("recipe") &&
                          j.spec["recipe"].value("mode", "") == "parallel";
    const int64_t width = parallel ? std::max<int64_t>(1, cal_running) : 1;
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
  }

  const CoordinatorOptions opts;
  PlannerLimits limits;
  std::unique_ptr<PathPolicy> paths;  // set by start(); limits.paths points at it
  StoreStats store_stats;
  TokenAuth auth;
  RedisPool pool;        // request threads
  RedisPool ready_pool;  // /readyz and /metrics: fail fast when Redis is gone
  httplib::Server http;
  std::thread http_thread, bg_thread;
  boost::asio::io_context io;
  std::unique_ptr<boost::asio::steady_timer> tick_timer, log_timer,
      sweep_timer;                       // used on bg_thread only
  std::atomic<bool> store_ready{false};  // JobStore::init done against this Redis
  int bound_port = 0;

  std::mutex stop_mu;
  bool started = false;  // guarded by stop_mu
  bool stopped = false;  // guarded by stop_mu

  std::mutex metrics_mu;
  std::map<int, uint64_t> http_requests;  // by status code; guarded by metrics_mu

  bool tick_failing = false;  // bg_thread only

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

  void routes();
  void background();
  void schedule_tick();
  void schedule_log();
  void schedule_sweep();
  Result<SweepResult> sweep_now(double now);

  // Handlers.
  Result<Reply> post_job(const httplib::Request& req);
  Result<Reply> list_jobs(const httplib::Request& req);
  Result<Reply> get_job(const httplib::Request& req);
  Result<Reply> cancel_job(const httplib::Request& req);
  Result<Reply> get_report(const httplib::Request& req);
  Result<Reply> get_logs(const httplib::Request& req);
  Result<Reply> post_schedule(const httplib::Request& req);
  Result<Reply> list_schedules(const httplib::Request& req);
  Result<Reply> get_schedule(const httplib::Request& req);
  Result<Reply> delete_schedule(const httplib::Request& req);
  Result<Reply> readyz(const httplib::Request& req);
  Result<Reply> metrics(const httplib::Request& req);
};

Result<Reply> CoordinatorServer::Impl::post_job(const httplib::Request& req) {
  QCAL_ASSIGN_OR_RETURN(json body, parse_body(req));
  QCAL_ASSIGN_OR_RETURN(JobSpec parsed, parse_job_spec(body));
  // Confinement (403), plan, data headers: coordinator/admission.h.
  QCAL_ASSIGN_OR_RETURN(Admission admitted, admit_job(parsed, limits));
  const Plan* plan = &admitted.plan;
  auto lease = pool.get();
  QCAL_RETURN_IF_ERROR(ensure_store(*lease));
  JobStore store(*lease, store_opts());
  // 409 while a live job owns the output path.
  QCAL_ASSIGN_OR_RETURN(std::string id, store.create_job(admitted.spec, plan->tasks));
  json tasks = json::array();
  for (const auto& t : plan->tasks) tasks.push_back(t.id);
  Reply r;
  r.status = 202;
  r.body = {{"id", id}, {"state", "queued"}, {"tasks", tasks}, {"plan", plan->summary}};
  r.headers.push_back({"Location", "/v1/jobs/" + id});
  return r;
}

Result<Reply> CoordinatorServer::Impl::list_jobs(const httplib::Request& req) {
  std::optional<JobState> state;
  if (req.has_param("state")) {
    state = parse_job_state(req.get_param_value("state"));
    if (!state)
      return invalid_input("state: unknown job state '" + req.get_param_value("state") +
                           "' (queued, running, validating, succeeded, failed, cancelled)");
  }
  std::map<std::string, std::string> labels;
  for (const std::string& kv : raw_params(req, "label")) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0)
      return invalid_input("label: expected key=value (got '" + kv + "')");
    labels[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  QCAL_ASSIGN_OR_RETURN(int64_t limit, int_param(req, "limit", 100, 1, 1000));
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(auto jobs, store.list_jobs(state, labels, limit));
  json arr = json::array();
  for (const auto& j : jobs) arr.push_back(job_summary(j));
  Reply r;
  r.body = {{"jobs", arr}};
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_job(const httplib::Request& req) {
  const std::string id = req.matches[1];
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(JobInfo job, store.get_job(id));
  QCAL_ASSIGN_OR_RETURN(auto tasks, store.get_tasks(id));
  Reply r;
  r.body = job_detail(job, tasks, now_s());
  return r;
}

Result<Reply> CoordinatorServer::Impl::cancel_job(const httplib::Request& req) {
  const std::string id = req.matches[1];
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

Result<Reply> CoordinatorServer::Impl::get_report(const httplib::Request& req) {
  const std::string id = req.matches[1];
  auto lease = pool.get();
  JobStore store(*lease, store_opts());
  QCAL_ASSIGN_OR_RETURN(JobInfo job, store.get_job(id));
  if (job.report.is_null())
    return not_found("job " + id + " has no report yet (state " + job_state_name(job.state) + ")");
  Reply r;
  r.body = job.report;
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_logs(const httplib::Request& req) {
  const std::string id = req.matches[1];
  QCAL_ASSIGN_OR_RETURN(int64_t from, int_param(req, "from", 0, 0, INT64_MAX));
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

Result<Reply> CoordinatorServer::Impl::post_schedule(const httplib::Request& req) {
  QCAL_ASSIGN_OR_RETURN(json body, parse_body(req));
  QCAL_ASSIGN_OR_RETURN(ScheduleRequest sr, parse_schedule_request(body));
  const std::time_t now = static_cast<std::time_t>(now_s());
  auto next = sr.cron.next_after(now);
  if (!next) return invalid_input("cron: '" + sr.cron.text + "' never fires");
  Schedule s;
  s.id = "s-" + std::to_string(static_cast<int64_t>(now_s() * 1000)) + "-" + random_hex(6);
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

Result<Reply> CoordinatorServer::Impl::list_schedules(const httplib::Request&) {
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_ASSIGN_OR_RETURN(auto all, store.list());
  json arr = json::array();
  for (const auto& s : all) arr.push_back(s.to_json());
  Reply r;
  r.body = {{"schedules", arr}};
  return r;
}

Result<Reply> CoordinatorServer::Impl::get_schedule(const httplib::Request& req) {
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_ASSIGN_OR_RETURN(Schedule s, store.get(req.matches[1]));
  Reply r;
  r.body = s.to_json();
  return r;
}

Result<Reply> CoordinatorServer::Impl::delete_schedule(const httplib::Request& req) {
  auto lease = pool.get();
  ScheduleStore store(*lease, opts.prefix);
  QCAL_ASSIGN_OR_RETURN(Schedule s, store.get(req.matches[1]));
  QCAL_RETURN_IF_ERROR(store.remove(s.id));
  Reply r;
  r.body = s.to_json();
  r.body["deleted"] = true;
  return r;
}

Result<Reply> CoordinatorServer::Impl::readyz(const httplib::Request&) {
  auto lease = ready_pool.get();
  auto pong = (*lease).command({"PING"});
  const std::string where = opts.redis.host + ":" + std::to_string(opts.redis.port);
  if (!pong.is_ok())
    return unavailable("redis " + where + " unreachable: " + pong.status().message());
  struct stat st {};
  const bool store_ok =
      !opts.store_root.empty() && ::stat(opts.store_root.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  Reply r;
  r.body = {{"status", "ready"},
            {"redis", where},
            {"store", opts.store_root},
            {"store_exists", store_ok},
            {"auth", auth.enabled()}};
  return r;
}

Result<Reply> CoordinatorServer::Impl::metrics(const httplib::Request&) {
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
  gauge("qcal_http_requests_total", "HTTP requests served by this process, by status.", "counter");
  {
    std::lock_guard<std::mutex> lock(metrics_mu);
    for (const auto& [code, n] : http_requests)
      m += "qcal_http_requests_total{code=\"" + prom_escape(std::to_string(code)) + "\"} " +
           std::to_string(n) + "\n";
  }
  Reply r;
  r.text = m;
  r.content_type = "text/plain; version=0.0.4";
  return r;
}

void CoordinatorServer::Impl::routes() {
  auto bind = [this](Result<Reply> (Impl::*fn)(const httplib::Request&)) {
    return wrap([this, fn](const httplib::Request& req) { return (this->*fn)(req); });
  };
  const std::string job = R"(/v1/jobs/([^/]+))";
  const std::string sched = R"(/v1/schedules/([^/]+))";
  http.Post("/v1/jobs", bind(&Impl::post_job));
  http.Get("/v1/jobs", bind(&Impl::list_jobs));
  http.Get(job, bind(&Impl::get_job));
  http.Delete(job, bind(&Impl::cancel_job));
  http.Get(job + "/report", bind(&Impl::get_report));
  http.Get(job + "/logs", bind(&Impl::get_logs));
  http.Post("/v1/schedules", bind(&Impl::post_schedule));
  http.Get("/v1/schedules", bind(&Impl::list_schedules));
  http.Get(sched, bind(&Impl::get_schedule));
  http.Delete(sched, bind(&Impl::delete_schedule));
  http.Get("/healthz", wrap([](const httplib::Request&) -> Result<Reply> {
             Reply r;
             r.body = {{"status", "ok"}};
             return r;
           }));
  http.Get("/readyz", bind(&Impl::readyz));
  http.Get("/metrics", bind(&Impl::metrics));

  http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (req.path == "/healthz" || req.path == "/readyz" || req.path == "/metrics")
      return httplib::Server::HandlerResponse::Unhandled;
    if (auth.check_header(req.get_header_value("Authorization")))
      return httplib::Server::HandlerResponse::Unhandled;
    Reply r = error_reply(401, "UNAUTHENTICATED",
                          req.has_header("Authorization") ? "invalid bearer token"
                                                          : "missing bearer token "
                                                            "(Authorization: Bearer <token>)");
    r.headers.push_back({"WWW-Authenticate", "Bearer"});
    send(res, r);
    return httplib::Server::HandlerResponse::Handled;
  });
  // Responses httplib produces itself (unknown route, oversized body, bad
  // request line) get the same JSON error body; handler errors pass through.
  http.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req,
                                                                     httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    Reply r;
    if (res.status == 404) {
      r = error_reply(404, "NOT_FOUND", "no route for " + req.method + " " + req.path);
    } else if (res.status == 413) {
      r = error_reply(
          413, "PAYLOAD_TOO_LARGE",
          "request body exceeds the limit of " + std::to_string(opts.max_body_bytes) + " bytes");
    } else if (res.status == 400) {
      r = error_reply(400, "BAD_REQUEST", "malformed HTTP request");
    } else {
      r = error_reply(res.status, "HTTP_" + std::to_string(res.status),
                      "HTTP error " + std::to_string(res.status));
    }
    send(res, r);
    return httplib::Server::HandlerResponse::Handled;
  }));
  http.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown exception";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        send(res, error_reply(500, "INTERNAL", "internal error: " + what));
      });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    {
      std::lock_guard<std::mutex> lock(metrics_mu);
      ++http_requests[res.status];
    }
    LOG_DEBUG << req.method << " " << req.path << " " << res.status;
  });
  http.set_payload_max_length(opts.max_body_bytes);
  // Headers and body go out in separate writes: without TCP_NODELAY every
  // response waits ~40 ms for the peer's delayed ACK (Nagle).
  http.set_tcp_nodelay(true);
  http.new_task_queue = [n = std::max(1, opts.http_threads)] { return new httplib::ThreadPool(n); };
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
  d.routes();
  if (d.opts.port == 0) {
    d.bound_port = d.http.bind_to_any_port(d.opts.host);
    if (d.bound_port <= 0) return unavailable("cannot bind " + d.opts.host + " (any port)");
  } else {
    if (!d.http.bind_to_port(d.opts.host, d.opts.port))
      return unavailable("cannot bind " + d.opts.host + ":" + std::to_string(d.opts.port));
    d.bound_port = d.opts.port;
  }
  {
    auto lease = d.pool.get();
    Status s = d.ensure_store(*lease);
    if (!s.is_ok()) LOG_WARN << "Redis not ready at start (" << s.message() << "); will retry";
  }
  {
    std::lock_guard<std::mutex> lock(d.stop_mu);
    d.started = true;
  }
  d.http_thread = std::thread([&d] { d.http.listen_after_bind(); });
  d.bg_thread = std::thread([&d] { d.background(); });
  for (int i = 0; i < 500 && !d.http.is_running(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  LOG_INFO << "coordinator listening on " << d.opts.host << ":" << d.bound_port << " (redis "
           << d.opts.redis.host << ":" << d.opts.redis.port << ", prefix " << d.opts.prefix
           << ", store " << (d.opts.store_root.empty() ? "-" : d.opts.store_root)
           << ", worker memory " << format_bytes(d.opts.worker_memory_bytes) << ")";
  return Status::ok();
}

int CoordinatorServer::port() const { return impl_->bound_port; }

void CoordinatorServer::stop() {
  Impl& d = *impl_;
  std::lock_guard<std::mutex> lock(d.stop_mu);
  if (!d.started || d.stopped) return;
  d.stopped = true;
  d.http.stop();
  d.io.stop();
}

void CoordinatorServer::wait() {
  Impl& d = *impl_;
  if (d.http_thread.joinable()) d.http_thread.join();
  if (d.bg_thread.joinable()) d.bg_thread.join();
}

Result<SweepResult> CoordinatorServer::sweep(double now) { return impl_->sweep_now(now); }

Result<TickReport> CoordinatorServer::tick(int64_t now) {
  auto lease = impl_->pool.get();
  QCAL_RETURN_IF_ERROR(impl_->ensure_store(*lease));
  JobStore store(*lease, impl_->store_opts());
  return scheduler_tick(store, impl_->limits, static_cast<std::time_t>(now));
}

}  // namespace qcal

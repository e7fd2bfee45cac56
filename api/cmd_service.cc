// The service commands of `qcal` (see cmd_service.h): thin wrappers that
// build a request, send it through ApiClient, and print the answer for a
// person (tables, a progress bar) or, with --json, for a program.
//
// The job object is read tolerantly (json_find): a field the coordinator
// does not send is shown as "-" or left out, never an error, so an older or
// newer coordinator still gets a useful display.
#include "api/cmd_service.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "api/cli_util.h"
#include "api/client.h"
#include "api/commands.h"
#include "api/spec_flags.h"
#include "common/flags.h"
#include "common/fsutil.h"
#include "common/sanitize.h"

namespace qcal {
namespace {

using nlohmann::json;

// A service command's flag table: its own rows, then --server and --token.
std::vector<FlagSpec> service_flags(std::vector<FlagSpec> own) {
  return concat_flags(std::move(own), client_flags());
}

FlagSpec json_flag(const std::string& what, const std::string& group = "") {
  return {"json", "", "", "print " + what + " as JSON", group};
}

Result<std::unique_ptr<ApiClient>> make_client(const Flags& f) {
  return ApiClient::create(client_options_from(f));
}

// The single positional a command like `status ID` takes.
Result<std::string> one_id(const Flags& f, const std::string& usage) {
  if (f.positionals().size() != 1) return invalid_input("usage: " + usage);
  const std::string& id = f.positionals()[0];
  if (id.empty() || id.find_first_of("/?#% ") != std::string::npos)
    return invalid_input("'" + id + "' is not a job or schedule id");
  return id;
}

// ---------------------------------------------------------------- reading a job

struct TaskView {
  std::string id, type, state, worker;
  int64_t attempts = 0;
};

struct BlockLoss {
  int64_t layer = -1;
  double loss = NAN;
};

struct JobView {
  std::string id, state, error, priority;
  int64_t done = 0, total = 0;
  std::vector<TaskView> tasks;
  BlockLoss last_loss;  // the deepest calibrated block so far (its rel. output error)
  std::optional<double> eta_s;
};

// Reads GET /v1/jobs/{id} (job_detail in coordinator/server.cc; the list
// route sends the same top-level fields without progress/blocks):
//   {"id", "state", "priority", "labels", "created_at", "updated_at", "error",
//    "tasks_total", "tasks_done", "spec", "report",
//    "progress": {"tasks_total", "tasks_done", "tasks": [{"id", "type", "state",
//                 "attempts", "worker", ...}]},
//    "blocks": [{"layer", "rel_output_error", "seconds", "proj_losses"}],
//    "eta_seconds": s | null}
// Every string shown comes from the server (and some, like labels and
// errors, from other users or their files): terminal_safe (common/sanitize.h)
// escapes control characters so none can drive the terminal.
JobView view_of(const json& j) {
  JobView v;
  v.id = terminal_safe(json_string(j, {"id"}));
  v.state = terminal_safe(json_string(j, {"state"}, "?"));
  v.error = terminal_safe(json_string(j, {"error"}));
  v.priority = terminal_safe(json_string(j, {"priority"}, "-"));
  if (const json* tasks = json_find(j, "progress.tasks"); tasks && tasks->is_array()) {
    for (const auto& t : *tasks) {
      if (!t.is_object()) continue;
      v.tasks.push_back(
          {terminal_safe(json_string(t, {"id"})), terminal_safe(json_string(t, {"type"})),
           terminal_safe(json_string(t, {"state"})), terminal_safe(json_string(t, {"worker"})),
           static_cast<int64_t>(json_number(t, {"attempts"}, 0))});
    }
  }
  if (const json* blocks = json_find(j, "blocks"); blocks && blocks->is_array()) {
    for (const auto& b : *blocks) {
      auto layer = static_cast<int64_t>(json_number(b, {"layer"}, -1));
      double loss = json_number(b, {"rel_output_error"}, NAN);
      if (std::isfinite(loss) && layer >= v.last_loss.layer) v.last_loss = {layer, loss};
    }
  }
  v.done = static_cast<int64_t>(json_number(j, {"progress.tasks_done", "tasks_done"}, 0));
  v.total = static_cast<int64_t>(json_number(j, {"progress.tasks_total", "tasks_total"}, 0));
  double eta = json_number(j, {"eta_seconds"}, NAN);
  if (std::isfinite(eta) && eta >= 0) v.eta_s = eta;
  return v;
}

bool is_terminal_state(const std::string& s) {
  return s == "succeeded" || s == "failed" || s == "cancelled";
}

std::string fmt_duration(double s) {
  char buf[32];
  long t = std::lround(s);
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", t / 60, t % 60);
  return buf;
}

std::string fmt_loss(const BlockLoss& l) {
  if (l.layer < 0) return "";
  char buf[64];
  std::snprintf(buf, sizeof buf, "block %lld loss %.3g", static_cast<long long>(l.layer), l.loss);
  return buf;
}

std::string running_tasks(const JobView& v) {
  std::string s;
  for (const auto& t : v.tasks) {
    if (t.state != "running") continue;
    if (!s.empty()) s += ", ";
    s += t.id.empty() ? t.type : t.id;
    if (!t.worker.empty()) s += "@" + t.worker;
  }
  return s;
}

// "created_at" as unix seconds or an already formatted string.
std::string fmt_time(const json& j, const char* key, bool utc = false) {
  const auto* v = json_find(j, key);
  if (!v) return "-";
  if (v->is_string()) return terminal_safe(v->get<std::string>());
  if (!v->is_number()) return "-";
  std::time_t t = static_cast<std::time_t>(v->get<double>());
  std::tm tm{};
  if (utc)
    gmtime_r(&t, &tm);
  else
    localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string fmt_labels(const json& j) {
  const json* l = json_find(j, "labels");
  if (!l) l = json_find(j, "spec.labels");
  if (!l || !l->is_object() || l->empty()) return "-";
  std::string s;
  for (auto it = l->begin(); it != l->end(); ++it)
    s += (s.empty() ? "" : ",") + it.key() + "=" +
         (it.value().is_string() ? it.value().get<std::string>() : it.value().dump());
  return terminal_safe(s);
}

// One line summing up a validation report: the numbers a person checks.
std::string fmt_report(const json& report) {
  if (!report.is_object() || report.empty()) return "";
  if (report.contains("skipped"))
    return "validation skipped: " + terminal_safe(json_string(report, {"skipped"}));
  std::string s;
  char buf[64];
  for (const char* k : {"ppl", "fp_ppl", "ppl_increase", "kl", "top1_agree"}) {
    const auto* v = json_find(report, k);
    if (!v || !v->is_number()) continue;
    std::snprintf(buf, sizeof buf, "%s%s %.5g", s.empty() ? "" : "  ", k, v->get<double>());
    s += buf;
  }
  if (const auto* g = json_find(report, "gate.passed"); g && g->is_boolean())
    s += std::string(s.empty() ? "" : "  ") + (g->get<bool>() ? "gate passed" : "GATE FAILED");
  return s;
}

const json* report_of(const json& job) {
  const json* r = json_find(job, "report");
  return r && r->is_object() ? r : nullptr;
}

// ---------------------------------------------------------------- progress display

int terminal_columns() {
  winsize ws{};
  if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40) return ws.ws_col;
  return 80;
}

// The bar redrawn in place on a terminal:
//   "[####------]  5/12 running  eta 0:42  quantize-0003@w1  block 3 loss 1.2e-3"
// The bar's width depends only on the terminal's (10 to 30 cells, leaving
// about 70 for the text), so it does not jump as the text changes; the line
// is cut to fit, never wrapped (a wrapped line cannot be redrawn with \r).
std::string progress_line(const JobView& v, int columns) {
  std::string text = std::to_string(v.done) + "/" + std::to_string(v.total) + " " + v.state;
  if (v.eta_s && !is_terminal_state(v.state)) text += "  eta " + fmt_duration(*v.eta_s);
  if (std::string r = running_tasks(v); !r.empty()) text += "  " + r;
  if (std::string l = fmt_loss(v.last_loss); !l.empty()) text += "  " + l;
  const int width = std::clamp(columns - 70, 10, 30);
  int filled =
      v.total > 0 ? static_cast<int>(width * std::min<int64_t>(v.done, v.total) / v.total) : 0;
  std::string line =
      "[" + std::string(filled, '#') + std::string(width - filled, '-') + "] " + text;
  if (static_cast<int>(line.size()) >= columns) line = line.substr(0, columns - 1);
  return line;
}

// The line printed (once per change) when stderr is not a terminal.
std::string plain_line(const JobView& v) {
  char ts[16];
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  std::strftime(ts, sizeof ts, "%H:%M:%S", &tm);
  std::string line = std::string(ts) + " " + v.id + " " + v.state + " " + std::to_string(v.done) +
                     "/" + std::to_string(v.total) + " tasks";
  if (std::string r = running_tasks(v); !r.empty()) line += "; running " + r;
  if (std::string l = fmt_loss(v.last_loss); !l.empty()) line += "; " + l;
  if (v.eta_s && !is_terminal_state(v.state)) line += "; eta " + fmt_duration(*v.eta_s);
  return line;
}

struct WaitOptions {
  double interval_s = 1.0;
  double timeout_s = 0;  // 0 = wait forever
  // How long a coordinator that answered before may be gone (restart, Redis
  // outage: 5xx) before giving up. A first request that fails fails at once.
  double unreachable_s = 300;
  bool json_out = false;
  bool quiet = false;
};

// Follows a job until it is terminal. Returns the exit code: 0 succeeded, 1
// failed / cancelled / timed out / coordinator gone, 2 unknown job.
int follow_job(const std::string& cmd, ApiClient& client, const std::string& id,
               const WaitOptions& o) {
  using Clock = std::chrono::steady_clock;
  const bool tty = isatty(STDERR_FILENO) && !o.quiet;
  const auto start = Clock::now();
  double unreachable_at = -1;  // seconds since start when the coordinator went away; -1 = reachable
  std::string last_plain;
  bool drew = false;
  json job;
  auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  for (;;) {
    auto r = client.get_json("/v1/jobs/" + url_encode(id));
    if (!r.is_ok()) {
      const Status& s = r.status();
      // A wrong URL or token fails at once; a coordinator that answered
      // before and is now gone (restart, failover) is waited for a while.
      if (!job.is_object() || (s.code() != Code::kUnavailable && s.code() != Code::kInternal)) {
        if (drew) std::fputc('\n', stderr);
        return cli_fail(cmd, s);
      }
      if (unreachable_at < 0) {
        unreachable_at = seconds_since(start);
        if (!o.quiet) {
          if (drew) std::fputc('\n', stderr);
          drew = false;
          std::fprintf(stderr, "qcal %s: %s; retrying for up to %.0f s\n", cmd.c_str(),
                       s.message().c_str(), o.unreachable_s);
        }
      } else if (seconds_since(start) - unreachable_at > o.unreachable_s) {
        return cli_fail(cmd, s);
      }
    } else {
      if (unreachable_at >= 0 && !o.quiet) {
        if (drew) std::fputc('\n', stderr);
        drew = false;
        std::fprintf(stderr, "qcal %s: coordinator back after %.0f s\n", cmd.c_str(),
                     seconds_since(start) - unreachable_at);
      }
      unreachable_at = -1;
      job = std::move(r).value();
      JobView v = view_of(job);
      if (v.id.empty()) v.id = id;
      if (tty) {
        std::fprintf(stderr, "\r\033[K%s", progress_line(v, terminal_columns()).c_str());
        std::fflush(stderr);
        drew = true;
      } else if (!o.quiet) {
        // One line per change of state, progress, running set or loss.
        std::string key = v.state + "|" + std::to_string(v.done) + "|" + running_tasks(v) + "|" +
                          fmt_loss(v.last_loss);
        if (key != last_plain) {
          std::fprintf(stderr, "%s\n", plain_line(v).c_str());
          last_plain = key;
        }
      }
      if (is_terminal_state(v.state)) {
        if (drew) std::fputc('\n', stderr);
        if (o.json_out) {
          std::cout << job.dump(2) << std::endl;
        } else {
          std::printf("job %s %s (%lld/%lld tasks, %s)\n", v.id.c_str(), v.state.c_str(),
                      static_cast<long long>(v.done), static_cast<long long>(v.total),
                      fmt_duration(seconds_since(start)).c_str());
          if (const json* rep = report_of(job))
            if (std::string s = fmt_report(*rep); !s.empty())
              std::printf("report: %s\n", s.c_str());
        }
        if (v.state == "succeeded") return 0;
        std::fprintf(stderr, "qcal %s: job %s %s%s%s\n", cmd.c_str(), v.id.c_str(), v.state.c_str(),
                     v.error.empty() ? "" : ": ", v.error.c_str());
        return 1;
      }
    }
    if (o.timeout_s > 0 && seconds_since(start) > o.timeout_s) {
      if (drew) std::fputc('\n', stderr);
      std::fprintf(stderr, "qcal %s: error: gave up after %.0f s; job %s is still %s\n",
                   cmd.c_str(), o.timeout_s, id.c_str(),
                   job.is_object() ? json_string(job, {"state"}, "?").c_str() : "unknown");
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(o.interval_s));
  }
}

Result<WaitOptions> wait_options(const Flags& f) {
  WaitOptions o;
  QCAL_ASSIGN_OR_RETURN(o.interval_s, f.number("interval", 1.0));
  QCAL_ASSIGN_OR_RETURN(o.timeout_s, f.number("timeout", 0.0));
  QCAL_ASSIGN_OR_RETURN(o.unreachable_s, f.number("unreachable-timeout", 300.0));
  if (o.interval_s <= 0 || o.timeout_s < 0 || o.unreachable_s < 0)
    return invalid_input("--interval must be > 0, --timeout and --unreachable-timeout ≥ 0");
  o.json_out = f.flag("json");
  o.quiet = f.flag("quiet");
  return o;
}

// The rows wait_options reads.
std::vector<FlagSpec> wait_flags(const std::string& group) {
  return {
      {"interval", "S", "1", "seconds between two looks at the job", group},
      {"timeout", "S", "0 = none", "give up after S seconds (exit 1; the job goes on)", group},
      {"unreachable-timeout", "S", "300",
       "how long a coordinator that answered before may be unreachable (a restart, a Redis "
       "outage) before giving up",
       group},
      {"quiet", "", "", "no progress display", group},
  };
}

// ---------------------------------------------------------------- submit

// Paths in a flag-built spec are relative to where the user typed them; the
// coordinator and workers run elsewhere, so send them absolute.
void absolutize(json& spec, const char* dotted) {
  std::string parent = dotted, key = dotted;
  json* obj = &spec;
  if (size_t dot = parent.find('.'); dot != std::string::npos) {
    key = parent.substr(dot + 1);
    parent = parent.substr(0, dot);
    if (!spec.contains(parent) || !spec[parent].is_object()) return;
    obj = &spec[parent];
  }
  if (!obj->contains(key) || !(*obj)[key].is_string()) return;
  std::string p = (*obj)[key].get<std::string>();
  if (p.empty() || p[0] == '/') return;
  std::error_code ec;
  auto abs = std::filesystem::absolute(p, ec);
  if (!ec) (*obj)[key] = abs.lexically_normal().string();
}

int cmd_submit(const Flags& f) {
  const std::string cmd = "submit";
  if (!f.positionals().empty())
    return cli_fail(cmd, invalid_input("unexpected argument '" + f.positionals()[0] + "'"));

  json spec;
  if (f.has("spec")) {
    for (const auto& name : spec_valued_flags())
      if (f.has(name))
        return cli_fail(cmd, invalid_input("--spec and --" + name +
                                           " are exclusive: "
                                           "put the field in the spec file"));
    for (const auto& name : spec_boolean_flags())
      if (f.has(name))
        return cli_fail(cmd, invalid_input("--spec and --" + name +
                                           " are exclusive: "
                                           "put the field in the spec file"));
    CLI_ASSIGN(cmd, std::string text, read_file(f.str("spec")));
    try {
      spec = json::parse(text);
    } catch (const json::exception& e) {
      return cli_fail(cmd, invalid_input(f.str("spec") + ": not valid JSON: " + e.what()));
    }
    if (!spec.is_object())
      return cli_fail(cmd, invalid_input(f.str("spec") + ": not a JSON object"));
  } else {
    CLI_ASSIGN(cmd, spec, job_spec_json_from_flags(f));
    for (const char* p : {"model", "calib.path", "eval.path", "output.path"}) absolutize(spec, p);
  }
  if (f.flag("dry-run")) {
    std::cout << spec.dump(2) << std::endl;
    return 0;
  }
  CLI_ASSIGN(cmd, WaitOptions wo, wait_options(f));
  CLI_ASSIGN(cmd, auto client, make_client(f));
  CLI_ASSIGN(cmd, json created, client->post_json("/v1/jobs", spec));
  std::string id = json_string(created, {"id"});
  if (id.empty())
    return cli_fail(
        cmd, internal_error("the coordinator accepted the job but sent no id: " + created.dump()));
  if (f.flag("wait")) {
    if (!wo.quiet) std::fprintf(stderr, "submitted %s\n", id.c_str());
    return follow_job(cmd, *client, id, wo);
  }
  if (f.flag("json"))
    std::cout << created.dump(2) << std::endl;
  else
    std::printf("%s\n", id.c_str());
  return 0;
}

int cmd_wait(const Flags& f) {
  const std::string cmd = "wait";
  CLI_ASSIGN(cmd, std::string id, one_id(f, "qcal wait ID [--json --interval S --timeout S]"));
  CLI_ASSIGN(cmd, WaitOptions wo, wait_options(f));
  CLI_ASSIGN(cmd, auto client, make_client(f));
  return follow_job(cmd, *client, id, wo);
}

int cmd_status(const Flags& f) {
  const std::string cmd = "status";
  CLI_ASSIGN(cmd, std::string id, one_id(f, "qcal status ID [--json]"));
  CLI_ASSIGN(cmd, auto client, make_client(f));
  CLI_ASSIGN(cmd, json job, client->get_json("/v1/jobs/" + url_encode(id)));
  if (f.flag("json")) {
    std::cout << job.dump(2) << std::endl;
    return 0;
  }
  JobView v = view_of(job);
  if (v.id.empty()) v.id = id;
  std::printf("job       %s\n", v.id.c_str());
  std::printf(
      "state     %s (%lld/%lld tasks%s)\n", v.state.c_str(), static_cast<long long>(v.done),
      static_cast<long long>(v.total),
      v.eta_s && !is_terminal_state(v.state) ? (", eta " + fmt_duration(*v.eta_s)).c_str() : "");
  std::printf("priority  %s\n", v.priority.c_str());
  std::printf("labels    %s\n", fmt_labels(job).c_str());
  std::printf("created   %s\n", fmt_time(job, "created_at").c_str());
  std::printf("updated   %s\n", fmt_time(job, "updated_at").c_str());
  if (std::string r = running_tasks(v); !r.empty()) std::printf("running   %s\n", r.c_str());
  if (std::string l = fmt_loss(v.last_loss); !l.empty()) std::printf("last      %s\n", l.c_str());
  if (!v.error.empty()) std::printf("error     %s\n", v.error.c_str());
  if (const json* rep = report_of(job))
    if (std::string s = fmt_report(*rep); !s.empty()) std::printf("report    %s\n", s.c_str());
  if (!v.tasks.empty()) {
    std::printf("\n%-20s %-10s %-10s %-8s %s\n", "TASK", "TYPE", "STATE", "ATTEMPTS", "WORKER");
    for (const auto& t : v.tasks)
      std::printf("%-20s %-10s %-10s %-8lld %s\n", t.id.c_str(), t.type.c_str(), t.state.c_str(),
                  static_cast<long long>(t.attempts), t.worker.empty() ? "-" : t.worker.c_str());
  }
  return 0;
}

int cmd_jobs(const Flags& f) {
  const std::string cmd = "jobs";
  if (!f.positionals().empty())
    return cli_fail(cmd, invalid_input("unexpected argument '" + f.positionals()[0] + "'"));
  std::vector<std::pair<std::string, std::string>> q;
  if (f.has("state")) q.emplace_back("state", f.str("state"));
  for (const char* flag : {"label", "labels"}) {
    if (!f.has(flag)) continue;
    CLI_ASSIGN(cmd, auto labels, parse_labels(f.str(flag), std::string("--") + flag));
    for (const auto& [k, v] : labels) q.emplace_back("label", k + "=" + v);
  }
  if (f.has("limit")) {
    CLI_ASSIGN(cmd, int64_t limit, f.integer("limit", 100));
    if (limit <= 0) return cli_fail(cmd, invalid_input("--limit must be positive"));
    q.emplace_back("limit", std::to_string(limit));
  }
  CLI_ASSIGN(cmd, auto client, make_client(f));
  CLI_ASSIGN(cmd, json answer, client->get_json("/v1/jobs" + query_string(q)));
  if (f.flag("json")) {
    std::cout << answer.dump(2) << std::endl;
    return 0;
  }
  const json* list = answer.is_array() ? &answer : json_find(answer, "jobs");
  if (!list || !list->is_array())
    return cli_fail(cmd, internal_error("GET /v1/jobs: expected a list of jobs, got " +
                                        answer.dump().substr(0, 200)));
  std::printf("%-28s %-11s %-9s %-8s %-19s %s\n", "ID", "STATE", "TASKS", "PRIORITY", "CREATED",
              "LABELS");
  for (const auto& j : *list) {
    JobView v = view_of(j);
    std::string tasks = std::to_string(v.done) + "/" + std::to_string(v.total);
    std::printf("%-28s %-11s %-9s %-8s %-19s %s\n", v.id.c_str(), v.state.c_str(), tasks.c_str(),
                v.priority.c_str(), fmt_time(j, "created_at").c_str(), fmt_labels(j).c_str());
  }
  return 0;
}

int cmd_cancel(const Flags& f) {
  const std::string cmd = "cancel";
  CLI_ASSIGN(cmd, std::string id, one_id(f, "qcal cancel ID"));
  CLI_ASSIGN(cmd, auto client, make_client(f));
  CLI_ASSIGN(cmd, json answer, client->delete_json("/v1/jobs/" + url_encode(id)));
  if (f.flag("json"))
    std::cout << answer.dump(2) << std::endl;
  else
    std::printf("job %s %s\n", id.c_str(), json_string(answer, {"state"}, "cancelled").c_str());
  return 0;
}

int cmd_logs(const Flags& f) {
  const std::string cmd = "logs";
  CLI_ASSIGN(cmd, std::string id,
             one_id(f, "qcal logs ID [--from N] [--follow [--interval S]] [--json]"));
  CLI_ASSIGN(cmd, int64_t from, f.integer("from", 0));
  CLI_ASSIGN(cmd, double interval, f.number("interval", 1.0));
  if (from < 0 || interval <= 0)
    return cli_fail(cmd, invalid_input("--from must be ≥ 0 and --interval > 0"));
  if (f.flag("json") && f.flag("follow"))
    return cli_fail(cmd, invalid_input("--json and --follow are exclusive"));
  CLI_ASSIGN(cmd, auto client, make_client(f));
  const std::string path = "/v1/jobs/" + url_encode(id) + "/logs";
  // {"id", "state", "lines": [...], "next": index after the last line}
  for (;;) {
    CLI_ASSIGN(cmd, json j,
               client->get_json(path + query_string({{"from", std::to_string(from)}})));
    if (f.flag("json")) {
      std::cout << j.dump(2) << std::endl;
      return 0;
    }
    const json* lines = json_find(j, "lines");
    if (!lines || !lines->is_array())
      return cli_fail(cmd, internal_error("GET " + path + ": expected {\"lines\": [...]}, got " +
                                          j.dump().substr(0, 200)));
    for (const auto& l : *lines)
      std::printf("%s\n", terminal_safe(l.is_string() ? l.get<std::string>() : l.dump()).c_str());
    std::fflush(stdout);
    from = static_cast<int64_t>(
        json_number(j, {"next"}, static_cast<double>(from + static_cast<int64_t>(lines->size()))));
    // A terminal job writes no more lines: one last read above caught them.
    if (!f.flag("follow") || is_terminal_state(json_string(j, {"state"}))) return 0;
    std::this_thread::sleep_for(std::chrono::duration<double>(interval));
  }
}

int cmd_report(const Flags& f) {
  const std::string cmd = "report";
  CLI_ASSIGN(cmd, std::string id, one_id(f, "qcal report ID [--json]"));
  CLI_ASSIGN(cmd, auto client, make_client(f));
  CLI_ASSIGN(cmd, json rep, client->get_json("/v1/jobs/" + url_encode(id) + "/report"));
  if (f.flag("json")) {
    std::cout << rep.dump(2) << std::endl;
    return 0;
  }
  const json* r = rep.contains("report") && rep["report"].is_object() ? &rep["report"] : &rep;
  if (std::string s = fmt_report(*r); !s.empty()) std::printf("%s\n", s.c_str());
  // ensure_ascii: every control or non-ASCII character as a \u escape.
  std::cout << r->dump(2, ' ', /*ensure_ascii=*/true, json::error_handler_t::replace) << std::endl;
  return 0;
}

int cmd_schedules(const Flags& f) {
  const std::string cmd = "schedules";
  const char* usage =
      "qcal schedules list | get ID | create --cron EXPR --spec FILE "
      "[--max-ppl-regression X --max-kl-regression X] | delete ID";
  const auto& pos = f.positionals();
  if (pos.empty()) return cli_fail(cmd, invalid_input(std::string("usage: ") + usage));
  const std::string sub = pos[0];
  auto need_args = [&](size_t n) -> Status {
    if (pos.size() != n) return invalid_input(std::string("usage: ") + usage);
    return Status::ok();
  };
  if (sub != "create")
    for (const char* flag : {"cron", "spec", "max-ppl-regression", "max-kl-regression"})
      if (f.has(flag))
        return cli_fail(cmd,
                        invalid_input(std::string("--") + flag + " is for 'schedules create'"));
  CLI_ASSIGN(cmd, auto client, make_client(f));

  if (sub == "list") {
    CLI_TRY(cmd, need_args(1));
    CLI_ASSIGN(cmd, json answer, client->get_json("/v1/schedules"));
    if (f.flag("json")) {
      std::cout << answer.dump(2) << std::endl;
      return 0;
    }
    const json* list = answer.is_array() ? &answer : json_find(answer, "schedules");
    if (!list || !list->is_array())
      return cli_fail(cmd, internal_error("GET /v1/schedules: expected a list, got " +
                                          answer.dump().substr(0, 200)));
    std::printf("%-28s %-20s %-19s %-28s %s\n", "ID", "CRON", "NEXT RUN (UTC)", "LAST JOB",
                "REGRESSIONS");
    for (const auto& s : *list) {
      std::string last = "-";
      // runs: [{"job", "evaluated", "state", "ppl", "kl", "regressed", ...}], oldest first
      if (const auto* runs = json_find(s, "runs"); runs && runs->is_array() && !runs->empty()) {
        const json& run = runs->back();
        const auto* regressed = json_find(run, "regressed");
        last =
            json_string(run, {"job"}, "-") + " (" + json_string(run, {"state"}, "in progress") +
            (regressed && regressed->is_boolean() && regressed->get<bool>() ? ", REGRESSED" : "") +
            ")";
      }
      std::printf("%-28s %-20s %-19s %-28s %lld\n", terminal_safe(json_string(s, {"id"})).c_str(),
                  terminal_safe(json_string(s, {"cron"})).c_str(),
                  fmt_time(s, "next_run_at", true).c_str(), terminal_safe(last).c_str(),
                  static_cast<long long>(json_number(s, {"regressions"}, 0)));
      if (std::string e = json_string(s, {"last_error"}); !e.empty())
        std::printf("  last error: %s\n", terminal_safe(e).c_str());
    }
    return 0;
  }
  if (sub == "get" || sub == "delete") {
    CLI_TRY(cmd, need_args(2));
    const std::string& id = pos[1];
    if (id.empty() || id.find_first_of("/?#% ") != std::string::npos)
      return cli_fail(cmd, invalid_input("'" + id + "' is not a schedule id"));
    const std::string path = "/v1/schedules/" + url_encode(id);
    CLI_ASSIGN(cmd, json answer, sub == "get" ? client->get_json(path) : client->delete_json(path));
    if (sub == "get" || f.flag("json"))
      std::cout << answer.dump(2) << std::endl;
    else
      std::printf("schedule %s deleted\n", id.c_str());
    return 0;
  }
  if (sub == "create") {
    CLI_TRY(cmd, need_args(1));
    CLI_ASSIGN(cmd, std::string cron, f.required("cron"));
    CLI_ASSIGN(cmd, std::string spec_path, f.required("spec"));
    CLI_ASSIGN(cmd, std::string text, read_file(spec_path));
    json body;
    try {
      body = {{"cron", cron}, {"template", json::parse(text)}};
    } catch (const json::exception& e) {
      return cli_fail(cmd, invalid_input(spec_path + ": not valid JSON: " + e.what()));
    }
    if (f.has("max-ppl-regression")) {
      CLI_ASSIGN(cmd, double x, f.number("max-ppl-regression", 0));
      body["thresholds"]["max_ppl_regression"] = x;
    }
    if (f.has("max-kl-regression")) {
      CLI_ASSIGN(cmd, double x, f.number("max-kl-regression", 0));
      body["thresholds"]["max_kl_regression"] = x;
    }
    CLI_ASSIGN(cmd, json answer, client->post_json("/v1/schedules", body));
    if (f.flag("json"))
      std::cout << answer.dump(2) << std::endl;
    else
      std::printf("%s\n", json_string(answer, {"id"}).c_str());
    return 0;
  }
  return cli_fail(cmd, invalid_input("unknown subcommand '" + sub + "'; usage: " + usage));
}

}  // namespace

std::vector<Command> service_commands() {
  const std::string section =
      "Service commands (talk to a coordinator: --server URL --token T, or $QCAL_SERVER, "
      "$QCAL_TOKEN)";
  const std::string submit_group = "Submitting";
  std::vector<FlagSpec> submit = {
      {"spec", "FILE", "",
       "the whole job as JSON (common/job_spec.h, api/openapi.yaml); excludes every job and "
       "recipe flag",
       submit_group},
      {"dry-run", "", "", "print the job spec the flags make and send nothing", submit_group},
      {"wait", "", "", "then follow the job until it ends, like qcal wait", submit_group},
      json_flag("the coordinator's answer (with --wait: the finished job)", submit_group),
  };
  submit = concat_flags(concat_flags(std::move(submit), spec_flags()),
                        wait_flags("Waiting (with --wait)"));
  const std::string schedule_group = "schedules create";
  return {
      {"submit", section, "(--spec JOB.json | --model DIR --calib FILE --out DIR) [flags]",
       "submit a quantization job; prints its id",
       "The recipe flags are qcal quantize's, with the same meaning; the spec is checked in\n"
       "full before it is sent. The coordinator plans it into block tasks: one quantize task\n"
       "per --window blocks (a transform with a block task, flatquant, adds one per block; a\n"
       "reconstruction runs one task per CBQ window, --cbq-window N --cbq-overlap N), each on\n"
       "the quantized outputs of the one before (--mode sequential) or on FP inputs (parallel).\n"
       "Relative paths are sent absolute. Exit 0 submitted (with --wait: succeeded), 1 failed,\n"
       "cancelled or unreachable, 2 bad input or a 4xx answer.",
       service_flags(std::move(submit)), cmd_submit},
      {"status", section, "ID [flags]", "a job's state, tasks and report", "",
       service_flags({json_flag("the job")}), cmd_status},
      {"wait", section, "ID [flags]",
       "follow a job until it ends: exit 0 succeeded, 1 failed or cancelled", "",
       service_flags(concat_flags(wait_flags(""), {json_flag("the finished job")})), cmd_wait},
      {"jobs", section, "[flags]", "list jobs, newest first", "",
       service_flags({
           {"state", "S", "", "only jobs in state S (queued, running, succeeded, ...)", ""},
           {"label", "K=V,...", "", "only jobs with all these labels", ""},
           {"labels", "K=V,...", "", "the same as --label", ""},
           {"limit", "N", "100", "at most N jobs", ""},
           json_flag("the list"),
       }),
       cmd_jobs},
      {"cancel", section, "ID [flags]", "cancel a job", "",
       service_flags({json_flag("the coordinator's answer")}), cmd_cancel},
      {"logs", section, "ID [flags]", "a job's log lines", "",
       service_flags({
           {"from", "N", "0", "start at line N", ""},
           {"follow", "", "", "keep printing new lines until the job ends", ""},
           {"interval", "S", "1", "seconds between two reads with --follow", ""},
           json_flag("one read (exclusive with --follow)"),
       }),
       cmd_logs},
      {"report", section, "ID [flags]", "a job's validation report", "",
       service_flags({json_flag("the report")}), cmd_report},
      {"schedules", section, "list | get ID | delete ID | create --cron EXPR --spec FILE [flags]",
       "recurring jobs: list, show, delete, or create from a job spec", "",
       service_flags({
           json_flag("the coordinator's answer"),
           {"cron", "EXPR", "", "when to run: a five-field cron expression (UTC)", schedule_group},
           {"spec", "FILE", "", "the job template (a job spec as JSON)", schedule_group},
           {"max-ppl-regression", "X", "",
            "a run regresses when its ppl exceeds the last successful run's by more than the "
            "ratio X (0.02: 2 % worse)",
            schedule_group},
           {"max-kl-regression", "X", "",
            "... or when its KL exceeds the last successful run's by more than X nats per token",
            schedule_group},
       }),
       cmd_schedules},
  };
}

}  // namespace qcal

// qcal-coordinator: the REST API and scheduler over Redis (see server.h).
//
//   qcal-coordinator [flags]     (the table in coordinator_flags(); qcal-coordinator --help)
//
// --allow-read / --allow-write (repeatable): the only directories a job's
// paths may lead into (common/path_policy.h); without any, every job is
// refused with 403. The retention flags apply to the artifact store given by
// --store (coordinator/retention.h).
//
// SIGTERM / SIGINT stop it gracefully (in-flight requests finish). All state
// is in Redis, so a restarted coordinator carries on where this one stopped.
// At start the open-file limit is raised to its hard limit: every client
// connection holds a descriptor.
#include <pthread.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/flags.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "coordinator/server.h"

namespace {

// The one table that parses the command line and prints --help.
const std::vector<qcal::FlagSpec>& coordinator_flags() {
  const std::string lim = "HTTP limits (what a client that never finishes its request can hold)",
                    pol = "Request policy", conf = "Confinement (common/path_policy.h)",
                    ret = "Artifact store retention (coordinator/retention.h)";
  static const std::vector<qcal::FlagSpec> kRows = {
      {"host", "ADDR", "127.0.0.1", "address to listen on", ""},
      {"port", "N", "8080", "port to listen on; 0 = any free port", ""},
      {"redis", "URL", "redis://127.0.0.1:6379", "the job store", ""},
      {"prefix", "P", "qcal", "prefix of every Redis key (one per deployment)", ""},
      {"tokens", "FILE", "",
       "bearer tokens, one per line, reloaded on change; deleting or emptying the file revokes "
       "them all; without it authentication is off (warned at start)",
       ""},
      {"store", "DIR", "", "the artifact store the workers write (shown by /readyz to token "
       "holders)", ""},
      {"worker-mem-gb", "X", "24", "memory of one worker: the planner sizes tasks to fit", ""},
      {"max-body-mb", "X", "1",
       "request bodies above this → 413 (checked while reading, chunked bodies too)", lim},
      {"max-header-kb", "N", "16", "request line + headers above this → 431", lim},
      {"max-connections", "N", "512", "open connections; more are answered 503 at once", lim},
      {"max-connections-per-ip", "N", "0",
       "open connections from one address; 0 = no cap (keep 0 behind a proxy: every client then "
       "has its address)",
       lim},
      {"header-timeout-s", "X", "10",
       "the request head must arrive within this (also the keep-alive idle limit) → 408", lim},
      {"body-timeout-s", "X", "30", "the body must arrive within this after the head → 408", lim},
      {"http-threads", "N", "16", "threads running requests (Redis calls)", lim},
      {"max-jobs-per-token", "N", "0",
       "live (queued, running, validating) jobs per token; more → 429; 0 = no quota", pol},
      {"min-schedule-interval-s", "N", "300", "schedules whose cron fires more often → 400", pol},
      {"allow-read", "DIR", "",
       "a root job paths may read from (models, data); repeatable. Without any --allow-read / "
       "--allow-write every job is refused (403)",
       conf},
      {"allow-write", "DIR", "", "a root job outputs may be published into; repeatable", conf},
      {"retain-succeeded-h", "H", "24", "keep a succeeded job's artifacts this long", ret},
      {"retain-failed-h", "H", "168", "keep a failed or cancelled job's artifacts this long", ret},
      {"sweep-interval-s", "S", "300", "how often the store is swept", ret},
  };
  return kRows;
}

std::string usage() {
  return "usage: qcal-coordinator [flags]\n\n"
         "The REST API and scheduler of the qcal service, over Redis. SIGTERM / SIGINT stop it\n"
         "gracefully; all state is in Redis.\n\n" +
         qcal::format_flag_table(coordinator_flags());
}

qcal::Result<qcal::CoordinatorOptions> options_from(const qcal::Flags& f) {
  qcal::CoordinatorOptions o;
  o.host = f.str("host", "127.0.0.1");
  QCAL_ASSIGN_OR_RETURN(int64_t port, f.integer("port", 8080));
  if (port < 0 || port > 65535) return qcal::invalid_input("--port: must be in [0, 65535]");
  o.port = static_cast<int>(port);
  QCAL_ASSIGN_OR_RETURN(o.redis, qcal::parse_redis_url(f.str("redis", "redis://127.0.0.1:6379")));
  o.token_file = f.str("tokens");
  o.store_root = f.str("store");
  QCAL_ASSIGN_OR_RETURN(double mem_gb, f.number("worker-mem-gb", 24));
  if (!(mem_gb > 0)) return qcal::invalid_input("--worker-mem-gb: must be positive");
  o.worker_memory_bytes = static_cast<uint64_t>(mem_gb * double(1ull << 30));
  QCAL_ASSIGN_OR_RETURN(double body_mb, f.number("max-body-mb", 1));
  if (!(body_mb > 0) || body_mb > 4096)
    return qcal::invalid_input("--max-body-mb: must be in (0, 4096]");
  o.max_body_bytes = static_cast<uint64_t>(body_mb * double(1ull << 20));
  QCAL_ASSIGN_OR_RETURN(double header_kb, f.number("max-header-kb", 16));
  if (!(header_kb >= 1) || header_kb > 1024)
    return qcal::invalid_input("--max-header-kb: must be in [1, 1024]");
  o.max_header_bytes = static_cast<size_t>(header_kb * 1024);
  auto int_in = [&f](const char* name, int64_t def, int64_t lo,
                     int64_t hi) -> qcal::Result<int64_t> {
    QCAL_ASSIGN_OR_RETURN(int64_t v, f.integer(name, def));
    if (v < lo || v > hi)
      return qcal::invalid_input(std::string("--") + name + ": must be in [" + std::to_string(lo) +
                                 ", " + std::to_string(hi) + "]");
    return v;
  };
  auto seconds = [&f](const char* name, double def) -> qcal::Result<double> {
    QCAL_ASSIGN_OR_RETURN(double v, f.number(name, def));
    if (!(v > 0) || v > 86400)
      return qcal::invalid_input(std::string("--") + name + ": must be in (0, 86400]");
    return v;
  };
  QCAL_ASSIGN_OR_RETURN(int64_t conns, int_in("max-connections", 512, 1, 1000000));
  o.max_connections = static_cast<int>(conns);
  QCAL_ASSIGN_OR_RETURN(int64_t per_ip, int_in("max-connections-per-ip", 0, 0, 1000000));
  o.max_connections_per_ip = static_cast<int>(per_ip);
  QCAL_ASSIGN_OR_RETURN(o.header_timeout_s, seconds("header-timeout-s", 10));
  QCAL_ASSIGN_OR_RETURN(o.body_timeout_s, seconds("body-timeout-s", 30));
  QCAL_ASSIGN_OR_RETURN(int64_t threads, int_in("http-threads", 16, 1, 1024));
  o.http_threads = static_cast<int>(threads);
  QCAL_ASSIGN_OR_RETURN(o.max_jobs_per_token, int_in("max-jobs-per-token", 0, 0, 1000000));
  QCAL_ASSIGN_OR_RETURN(o.min_schedule_interval_s,
                        int_in("min-schedule-interval-s", 300, 0, 366 * 86400));
  o.prefix = f.str("prefix", "qcal");
  if (o.prefix.empty()) return qcal::invalid_input("--prefix: must not be empty");
  o.allow_read = f.all("allow-read");
  o.allow_write = f.all("allow-write");
  for (auto [flag, out] : {std::pair{"retain-succeeded-h", &o.retention.retain_succeeded_h},
                           std::pair{"retain-failed-h", &o.retention.retain_failed_h},
                           std::pair{"sweep-interval-s", &o.retention.sweep_interval_s}}) {
    QCAL_ASSIGN_OR_RETURN(*out, f.number(flag, *out));
    if (!(*out >= 0) || !(*out <= 1e7))
      return qcal::invalid_input(std::string("--") + flag + ": must be in [0, 1e7]");
  }
  return o;
}

// Every connection holds a descriptor: use what the hard limit allows.
void raise_open_file_limit() {
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return;
  rl.rlim_cur = rl.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &rl) != 0)
    LOG_WARN << "cannot raise the open-file limit to " << rl.rlim_max;
}

}  // namespace

int main(int argc, char** argv) {
  qcal::Flags flags(coordinator_flags());
  qcal::Status st = flags.parse(argc, argv, 1);
  if (st.is_ok() && flags.help()) {
    std::fputs(usage().c_str(), stdout);
    return 0;
  }
  if (st.is_ok() && !flags.positionals().empty())
    st = qcal::invalid_input("unexpected argument '" + flags.positionals()[0] + "'");
  auto opts = st.is_ok() ? options_from(flags) : qcal::Result<qcal::CoordinatorOptions>(st);
  if (!opts.is_ok()) {
    std::fprintf(stderr, "qcal-coordinator: %s (try qcal-coordinator --help)\n",
                 opts.status().message().c_str());
    return 2;
  }

  // Block the stop signals in every thread (threads inherit the mask), and
  // wait for them here: no async-signal-safety concerns.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  raise_open_file_limit();

  // Every file this process opens for reading (config.json, safetensors
  // headers, token files) is confined to the roots (common/path_policy.h).
  {
    const auto& o = opts.value();
    auto policy = qcal::PathPolicy::make(o.allow_read, o.allow_write, o.store_root);
    if (!policy.is_ok()) {
      std::fprintf(stderr, "qcal-coordinator: %s (try qcal-coordinator --help)\n",
                   policy.status().message().c_str());
      return 2;
    }
    qcal::set_process_path_policy(
        std::make_shared<const qcal::PathPolicy>(std::move(policy).value()));
  }
  qcal::CoordinatorServer server(std::move(opts).value());
  st = server.start();
  if (!st.is_ok()) {
    LOG_ERROR << "qcal-coordinator: " << st.to_string();
    return 1;
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  LOG_INFO << "qcal-coordinator: " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", stopping";
  server.stop();
  server.wait();
  LOG_INFO << "qcal-coordinator: stopped";
  return 0;
}

// qcal-coordinator: the REST API and scheduler over Redis (see server.h).
//
//   qcal-coordinator [--host 127.0.0.1] [--port 8080] [--redis redis://127.0.0.1:6379]
//                    [--tokens FILE] [--store DIR] [--worker-mem-gb 24] [--prefix qcal]
//                    [HTTP limits and request policy: see kUsage]
//
// SIGTERM / SIGINT stop it gracefully (in-flight requests finish). All state
// is in Redis, so a restarted coordinator carries on where this one stopped.
// At start the open-file limit is raised to its hard limit: every client
// connection holds a descriptor.
#include <pthread.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdio>

#include "common/flags.h"
#include "common/log.h"
#include "coordinator/server.h"

namespace {

const char* kUsage =
    "usage: qcal-coordinator [flags]\n"
    "  --host 127.0.0.1            listen address\n"
    "  --port 8080                 listen port (0: any free port)\n"
    "  --redis redis://127.0.0.1:6379\n"
    "  --tokens FILE               bearer tokens, one a line (reloaded on change; deleting or\n"
    "                              emptying the file revokes them all); none: no authentication\n"
    "  --store DIR                 the artifact store (shown by /readyz to token holders)\n"
    "  --worker-mem-gb 24          memory of one worker, for planning\n"
    "  --prefix qcal               Redis key prefix\n"
    "HTTP limits (what a client that never finishes its request can hold):\n"
    "  --max-body-mb 1             request bodies above this → 413 (checked while reading,\n"
    "                              chunked bodies too)\n"
    "  --max-header-kb 16          request line + headers above this → 431\n"
    "  --max-connections 512       open connections; more are answered 503 at once\n"
    "  --max-connections-per-ip 0  open connections from one address; 0 = no cap (keep 0\n"
    "                              behind a proxy: every client then has its address)\n"
    "  --header-timeout-s 10       the request head must arrive within this (also the\n"
    "                              keep-alive idle limit) → 408\n"
    "  --body-timeout-s 30         the body must arrive within this after the head → 408\n"
    "  --http-threads 16           threads running requests (Redis calls)\n"
    "Request policy:\n"
    "  --max-jobs-per-token 0      live (queued, running, validating) jobs per token; more\n"
    "                              → 429; 0 = no quota\n"
    "  --min-schedule-interval-s 300\n"
    "                              schedules whose cron fires more often → 400\n";

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
  qcal::Flags flags(
      {"host", "port", "redis", "tokens", "store", "worker-mem-gb", "max-body-mb", "prefix",
       "max-header-kb", "max-connections", "max-connections-per-ip", "header-timeout-s",
       "body-timeout-s", "http-threads", "max-jobs-per-token", "min-schedule-interval-s"},
      {"help"});
  qcal::Status st = flags.parse(argc, argv, 1);
  if (st.is_ok() && flags.flag("help")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (st.is_ok() && !flags.positionals().empty())
    st = qcal::invalid_input("unexpected argument '" + flags.positionals()[0] + "'");
  auto opts = st.is_ok() ? options_from(flags) : qcal::Result<qcal::CoordinatorOptions>(st);
  if (!opts.is_ok()) {
    std::fprintf(stderr, "qcal-coordinator: %s\n%s", opts.status().message().c_str(), kUsage);
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

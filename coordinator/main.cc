// qcal-coordinator: the REST API and scheduler over Redis (see server.h).
//
//   qcal-coordinator [--host 127.0.0.1] [--port 8080] [--redis redis://127.0.0.1:6379]
//                    [--tokens FILE] [--store DIR] [--worker-mem-gb 24]
//                    [--max-body-mb 1] [--prefix qcal]
//
// SIGTERM / SIGINT stop it gracefully (in-flight requests finish). All state
// is in Redis, so a restarted coordinator carries on where this one stopped.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "common/flags.h"
#include "common/log.h"
#include "coordinator/server.h"

namespace {

// The one table that parses the command line and prints --help.
const std::vector<qcal::FlagSpec>& coordinator_flags() {
  static const std::vector<qcal::FlagSpec> kRows = {
      {"host", "ADDR", "127.0.0.1", "address to listen on", ""},
      {"port", "N", "8080", "port to listen on; 0 = any free port", ""},
      {"redis", "URL", "redis://127.0.0.1:6379", "the job store", ""},
      {"prefix", "P", "qcal", "prefix of every Redis key (one per deployment)", ""},
      {"tokens", "FILE", "",
       "bearer tokens, one per line; without it authentication is off (warned at start)", ""},
      {"store", "DIR", "", "the artifact store the workers write, reported by /readyz", ""},
      {"worker-mem-gb", "X", "24", "memory of one worker: the planner sizes tasks to fit", ""},
      {"max-body-mb", "X", "1", "larger request bodies are refused (HTTP 413)", ""},
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
  if (!(body_mb > 0)) return qcal::invalid_input("--max-body-mb: must be positive");
  o.max_body_bytes = static_cast<uint64_t>(body_mb * double(1ull << 20));
  o.prefix = f.str("prefix", "qcal");
  if (o.prefix.empty()) return qcal::invalid_input("--prefix: must not be empty");
  return o;
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

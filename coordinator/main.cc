// qcal-coordinator: the REST API and scheduler over Redis (see server.h).
//
//   qcal-coordinator [--host 127.0.0.1] [--port 8080] [--redis redis://127.0.0.1:6379]
//                    [--tokens FILE] [--store DIR] [--worker-mem-gb 24]
//                    [--max-body-mb 1] [--prefix qcal]
//                    [--allow-read DIR]... [--allow-write DIR]...
//                    [--retain-succeeded-h 24] [--retain-failed-h 168]
//                    [--sweep-interval-s 300]
//
// --allow-read / --allow-write (repeatable): the only directories a job's
// paths may lead into (common/path_policy.h); without any, every job is
// refused with 403. The retention flags apply to the artifact store given by
// --store (coordinator/retention.h).
//
// SIGTERM / SIGINT stop it gracefully (in-flight requests finish). All state
// is in Redis, so a restarted coordinator carries on where this one stopped.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <memory>
#include <utility>

#include "common/flags.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "coordinator/server.h"

namespace {

const char* kUsage =
    "usage: qcal-coordinator [--host 127.0.0.1] [--port 8080] [--redis redis://127.0.0.1:6379]\n"
    "                        [--tokens FILE] [--store DIR] [--worker-mem-gb 24]\n"
    "                        [--max-body-mb 1] [--prefix qcal]\n"
    "                        [--allow-read DIR]... [--allow-write DIR]...\n"
    "                        [--retain-succeeded-h 24] [--retain-failed-h 168]\n"
    "                        [--sweep-interval-s 300]\n";

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

}  // namespace

int main(int argc, char** argv) {
  qcal::Flags flags(
      {"host", "port", "redis", "tokens", "store", "worker-mem-gb", "max-body-mb", "prefix",
       "allow-read", "allow-write", "retain-succeeded-h", "retain-failed-h", "sweep-interval-s"},
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

  // Every file this process opens for reading (config.json, safetensors
  // headers, token files) is confined to the roots (common/path_policy.h).
  {
    const auto& o = opts.value();
    auto policy = qcal::PathPolicy::make(o.allow_read, o.allow_write, o.store_root);
    if (!policy.is_ok()) {
      std::fprintf(stderr, "qcal-coordinator: %s\n%s", policy.status().message().c_str(), kUsage);
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

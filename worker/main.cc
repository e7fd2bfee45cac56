// qcal-worker: claims calibration tasks from Redis and runs them.
//
//   qcal-worker --redis redis://host:6379 --store /shared/qcal-store
//               [--allow-read DIR]... [--allow-write DIR]...
//               [--worker-id ID] [--lease-ms 30000] [--block-ms 2000]
//               [--threads N] [--prefix qcal] [--once]
//               [--task-timeout-s 86400] [--stop-grace-s 600]
//   mpirun -np 4 qcal-worker ...   one worker, four data-parallel ranks
//
// --allow-read / --allow-write (repeatable) confine what tasks may read and
// write, as on the coordinator (common/path_policy.h): every task's paths are
// checked again, and every file the worker opens is checked by descriptor.
// Without them the worker refuses every task (403's message). A task running
// past --task-timeout-s is stopped and fails; one that does not stop within
// --stop-grace-s of a stop request makes the worker exit (status 3).
//
// SIGTERM / SIGINT: finish the current task, report it, exit 0. A second
// signal exits at once (the task is reclaimed by another worker after its lease).
// Under mpirun, signal rank 0's process: mpirun itself answers SIGTERM by
// terminating the job (SIGTERM to every rank, SIGKILL after
// `--mca odls_base_sigkill_timeout` seconds) and exits non-zero, so a long
// task only finishes if that timeout covers it.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/flags.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "common/redis.h"
#include "worker/artifacts.h"
#include "worker/rank_group.h"
#include "worker/worker.h"

namespace {

qcal::Worker* g_worker = nullptr;
std::atomic<int> g_signals{0};

void on_signal(int sig) {
  if (g_signals.fetch_add(1) > 0) _exit(128 + sig);
  if (g_worker) g_worker->request_stop();
}

// The one table that parses the command line and prints --help.
const std::vector<qcal::FlagSpec>& worker_flags() {
  static const std::vector<qcal::FlagSpec> kRows = {
      {"redis", "URL", "", "the job store (required)", ""},
      {"store", "DIR", "", "the artifact store shared with the other workers (required)", ""},
      {"prefix", "P", "qcal", "prefix of every Redis key (the coordinator's --prefix)", ""},
      {"worker-id", "ID", "HOST-PID", "this worker's name in the job store", ""},
      {"lease-ms", "N", "30000", "claim lease; the worker heartbeats every third of it", ""},
      {"block-ms", "N", "2000", "longest wait for a task per claim call", ""},
      {"threads", "N", "QCAL_THREADS, else all cores", "compute threads", ""},
      {"once", "", "", "exit after one task", ""},
      {"allow-read", "DIR", "",
       "a root tasks may read (models, data); repeatable. Without any --allow-read / "
       "--allow-write every task is refused",
       "Confinement (common/path_policy.h)"},
      {"allow-write", "DIR", "", "a root tasks may publish outputs into; repeatable",
       "Confinement (common/path_policy.h)"},
      {"task-timeout-s", "S", "86400", "a task running longer is stopped and fails", "Limits"},
      {"stop-grace-s", "S", "600",
       "a task not stopping within this of a stop request makes the worker exit (status 3)",
       "Limits"},
  };
  return kRows;
}

int usage_error(const qcal::Status& s) {
  std::fprintf(stderr, "qcal-worker: %s (try qcal-worker --help)\n", s.to_string().c_str());
  return 2;
}

std::string default_worker_id() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "host");
  return std::string(host) + "-" + std::to_string(getpid());
}

}  // namespace

int main(int argc, char** argv) {
  using namespace qcal;
  // MPI first: it may rewrite argv and must own the main thread.
  std::unique_ptr<RankGroup> group = RankGroup::create(&argc, &argv);

  Flags f(worker_flags());
  Status ps = f.parse(argc, argv, 1);
  if (!ps.is_ok()) return usage_error(ps);
  if (f.help()) {
    std::printf(
        "usage: qcal-worker --redis URL --store DIR [flags]\n"
        "       mpirun -np N qcal-worker ...   (one worker, N data-parallel ranks)\n\n"
        "Claims calibration tasks from Redis and runs them. SIGTERM / SIGINT: finish the\n"
        "current task, report it, exit 0; a second signal exits at once.\n\n%s",
        format_flag_table(worker_flags()).c_str());
    return 0;
  }
  auto redis_url = f.required("redis");
  if (!redis_url.is_ok()) return usage_error(redis_url.status());
  auto store_dir = f.required("store");
  if (!store_dir.is_ok()) return usage_error(store_dir.status());
  auto redis = parse_redis_url(*redis_url);
  if (!redis.is_ok()) return usage_error(redis.status().with_context("--redis"));

  WorkerOptions o;
  o.worker_id = f.str("worker-id", default_worker_id());
  auto lease = f.integer("lease-ms", 30000);
  auto block = f.integer("block-ms", 2000);
  auto threads = f.integer("threads", 0);
  if (!lease.is_ok()) return usage_error(lease.status());
  if (!block.is_ok()) return usage_error(block.status());
  if (!threads.is_ok()) return usage_error(threads.status());
  if (*lease < 100 || *block < 0 || *threads < 0)
    return usage_error(invalid_input("--lease-ms must be ≥ 100, --block-ms and --threads ≥ 0"));
  o.lease_ms = *lease;
  o.block_ms = *block;
  o.once = f.flag("once");
  o.store.prefix = f.str("prefix", "qcal");
  auto timeout = f.number("task-timeout-s", o.task_timeout_s);
  auto grace = f.number("stop-grace-s", o.stop_grace_s);
  if (!timeout.is_ok()) return usage_error(timeout.status());
  if (!grace.is_ok()) return usage_error(grace.status());
  if (!(*timeout >= 0) || !(*grace >= 0))
    return usage_error(invalid_input("--task-timeout-s and --stop-grace-s must be >= 0"));
  o.task_timeout_s = *timeout;
  o.stop_grace_s = *grace;
  // Confinement: every task's paths, and every file this process opens.
  auto policy = PathPolicy::make(f.all("allow-read"), f.all("allow-write"), *store_dir);
  if (!policy.is_ok()) return usage_error(policy.status());
  o.paths = std::make_shared<const PathPolicy>(std::move(policy).value());
  set_process_path_policy(o.paths);
  if (f.all("allow-read").empty() && f.all("allow-write").empty())
    LOG_WARN << "qcal-worker: no --allow-read / --allow-write roots: every task will be refused";
  // The BLAS reads its thread count once, on first use.
  if (*threads > 0) setenv("QCAL_THREADS", std::to_string(*threads).c_str(), 1);

  ArtifactStore artifacts(*store_dir);
  Worker worker(o, *redis, &artifacts, group.get());
  g_worker = &worker;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  Status s = worker.run();
  g_worker = nullptr;
  if (!s.is_ok()) {
    LOG_ERROR << "qcal-worker: " << s.to_string();
    return 1;
  }
  return 0;
}

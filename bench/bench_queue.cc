// Task state transitions per second through JobStore (the Redis queue).
// One task = claim_task + complete_task (two store round trips, each a Lua
// script). Jobs have the parallel-mode shape: capture → N calibrates →
// assemble → validate, so dependents are enqueued as tasks finish.
//
// Usage: bench_queue [--jobs J] [--tasks N] [--threads 1,2,4]
//   QCAL_REDIS_URL=redis://host:port  use that server (keys under a unique
//   prefix, removed afterwards); otherwise a private redis-server is started
//   on a free loopback port (AOF on, as in production).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/job_store.h"
#include "common/redis.h"

#define QCAL_REDIS_FIXTURE_NO_GTEST
#include "tests/unit/redis_fixture.h"

namespace {

using Clock = std::chrono::steady_clock;
using qcal::Claim;
using qcal::JobStore;
using qcal::RedisClient;
using qcal::RedisOptions;

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

std::vector<qcal::TaskDef> job_tasks(int n) {
  std::vector<qcal::TaskDef> t;
  auto add = [&](std::string id, std::string type, std::vector<std::string> deps) {
    qcal::TaskDef d;
    d.id = std::move(id);
    d.type = std::move(type);
    d.deps = std::move(deps);
    d.params = {{"layer_begin", 0}, {"layer_end", 1}};
    d.mem_bytes = 1 << 30;
    t.push_back(std::move(d));
  };
  add("capture", "capture", {});
  std::vector<std::string> cals;
  for (int i = 0; i < std::max(1, n - 3); ++i) {
    char id[32];
    std::snprintf(id, sizeof(id), "calibrate-%04d", i);
    cals.push_back(id);
    add(id, "calibrate", {"capture"});
  }
  add("assemble", "assemble", cals);
  add("validate", "validate", {"assemble"});
  return t;
}

struct Row {
  int threads = 0;
  int64_t tasks = 0;
  double create_s = 0, run_s = 0;
  std::vector<double> claim_ms, complete_ms, create_ms;
  int64_t errors = 0;
};

Row run(const RedisOptions& ropts, const std::string& prefix, int jobs, int tasks_per_job,
        int threads) {
  Row row;
  row.threads = threads;
  RedisClient client(ropts);
  qcal::JobStoreOptions sopts;
  sopts.prefix = prefix;
  JobStore store(client, sopts);
  if (!store.init().is_ok()) {
    std::fprintf(stderr, "init failed\n");
    std::exit(1);
  }
  auto spec = qcal::parse_job_spec(
      {{"model", "/m"}, {"calib", {{"path", "/c"}}}, {"output", {{"path", "/o"}}}});
  const auto tasks = job_tasks(tasks_per_job);
  auto t0 = Clock::now();
  for (int j = 0; j < jobs; ++j) {
    auto c0 = Clock::now();
    auto id = store.create_job(*spec, tasks);
    row.create_ms.push_back(since(c0) * 1e3);
    if (!id.is_ok()) {
      std::fprintf(stderr, "create_job: %s\n", id.status().to_string().c_str());
      std::exit(1);
    }
  }
  row.create_s = since(t0);
  const int64_t total = static_cast<int64_t>(jobs) * static_cast<int64_t>(tasks.size());
  row.tasks = total;

  std::atomic<int64_t> done{0}, errors{0};
  std::vector<std::vector<double>> claim_ms(threads), complete_ms(threads);
  std::vector<std::thread> pool;
  t0 = Clock::now();
  for (int w = 0; w < threads; ++w) {
    pool.emplace_back([&, w] {
      RedisClient c(ropts);
      JobStore s(c, sopts);
      const std::string worker = "bench-" + std::to_string(w);
      const nlohmann::json result = {{"artifacts", {{"x", {{"path", "a"}, {"sha256", "0"}}}}},
                                     {"gate_passed", true}};
      while (done.load() < total) {
        auto c0 = Clock::now();
        auto r = s.claim_task(worker, 60000, 20);
        double ms = since(c0) * 1e3;
        if (!r.is_ok()) {
          ++errors;
          continue;
        }
        if (!r->has_value()) continue;  // waiting on dependencies held by other threads
        claim_ms[w].push_back(ms);
        c0 = Clock::now();
        if (!s.complete_task(**r, result).is_ok()) ++errors;
        complete_ms[w].push_back(since(c0) * 1e3);
        ++done;
      }
    });
  }
  for (auto& t : pool) t.join();
  row.run_s = since(t0);
  for (int w = 0; w < threads; ++w) {
    row.claim_ms.insert(row.claim_ms.end(), claim_ms[w].begin(), claim_ms[w].end());
    row.complete_ms.insert(row.complete_ms.end(), complete_ms[w].begin(), complete_ms[w].end());
  }
  row.errors = errors.load();
  auto counts = store.job_counts();
  if (!counts.is_ok() || counts->at("succeeded") != jobs) {
    std::fprintf(stderr, "not every job succeeded\n");
    row.errors++;
  }
  return row;
}

void cleanup(const RedisOptions& ropts, const std::string& prefix) {
  RedisClient c(ropts);
  std::string cursor = "0";
  do {
    auto r = c.command({"SCAN", cursor, "MATCH", prefix + ":*", "COUNT", "1000"});
    if (!r.is_ok() || r->array.size() != 2) return;
    cursor = r->array[0].str;
    std::vector<std::string> del = {"UNLINK"};
    for (const auto& k : r->array[1].array) del.push_back(k.str);
    if (del.size() > 1) (void)c.command(del);
  } while (cursor != "0");
}

}  // namespace

int main(int argc, char** argv) {
  int jobs = 20, tasks = 100;
  std::vector<int> thread_counts = {1, 2, 4};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--jobs") {
      jobs = std::atoi(next().c_str());
    } else if (a == "--tasks") {
      tasks = std::atoi(next().c_str());
    } else if (a == "--threads") {
      thread_counts.clear();
      std::stringstream ss(next());
      std::string t;
      while (std::getline(ss, t, ',')) thread_counts.push_back(std::atoi(t.c_str()));
    } else {
      std::fprintf(stderr, "usage: bench_queue [--jobs J] [--tasks N] [--threads 1,2,4]\n");
      return 2;
    }
  }
  if (jobs < 1 || tasks < 4 || thread_counts.empty()) {
    std::fprintf(stderr, "need --jobs >= 1, --tasks >= 4, at least one thread count\n");
    return 2;
  }

  std::unique_ptr<qcal::testing::RedisServer> server;
  RedisOptions ropts;
  std::string where;
  if (const char* url = std::getenv("QCAL_REDIS_URL"); url && *url) {
    auto o = qcal::parse_redis_url(url);
    if (!o.is_ok()) {
      std::fprintf(stderr, "QCAL_REDIS_URL: %s\n", o.status().to_string().c_str());
      return 2;
    }
    ropts = *o;
    where = url;
  } else {
    server = std::make_unique<qcal::testing::RedisServer>();
    if (!server->started()) {
      std::fprintf(stderr, "cannot start redis-server: %s (set QCAL_REDIS_URL)\n",
                   server->error().c_str());
      return 1;
    }
    ropts = server->options(10.0);
    where = "private redis-server on 127.0.0.1:" + std::to_string(server->port()) +
            " (appendonly yes, appendfsync everysec)";
  }
  std::printf("bench_queue: %s\n", where.c_str());
  std::printf(
      "%d jobs x %d tasks (capture -> %d calibrate -> assemble -> validate); "
      "one task = claim + complete; %u hardware threads\n\n",
      jobs, tasks, std::max(1, tasks - 3), std::thread::hardware_concurrency());
  std::printf("%8s %8s %10s %12s %11s %11s %11s %11s %11s\n", "threads", "tasks", "create/s",
              "tasks/s", "claim p50", "claim p99", "compl p50", "compl p99", "errors");
  int rc = 0;
  for (int t : thread_counts) {
    const std::string prefix = "qcal-bench-" + std::to_string(getpid()) + "-" + std::to_string(t);
    Row r = run(ropts, prefix, jobs, tasks, t);
    cleanup(ropts, prefix);
    std::printf("%8d %8lld %10.0f %12.0f %9.3fms %9.3fms %9.3fms %9.3fms %11lld\n", r.threads,
                static_cast<long long>(r.tasks), jobs / r.create_s, r.tasks / r.run_s,
                percentile(r.claim_ms, 0.5), percentile(r.claim_ms, 0.99),
                percentile(r.complete_ms, 0.5), percentile(r.complete_ms, 0.99),
                static_cast<long long>(r.errors));
    if (r.errors) rc = 1;
  }
  std::printf(
      "\ntasks/s counts finished tasks (each one claim_task + complete_task); "
      "create/s is create_job calls of %d tasks each.\n",
      tasks);
  return rc;
}

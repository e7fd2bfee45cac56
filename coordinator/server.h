// The coordinator's REST server (api/openapi.yaml is the contract).
//
// Routes (all JSON; every /v1 route needs `Authorization: Bearer <token>`
// when a token file is configured):
//   POST   /v1/jobs                 job spec → parse_job_spec → labels check →
//                                   plan_job → quota → JobStore::create_job →
//                                   202 {"id", "state", "tasks", "plan"}
//   GET    /v1/jobs?state=&label=k=v&limit=   newest first
//   GET    /v1/jobs/{id}            state, progress (per task), blocks, ETA
//   DELETE /v1/jobs/{id}            cancel → 200 with the job; 409 when terminal
//   GET    /v1/jobs/{id}/report     404 until validated
//   GET    /v1/jobs/{id}/logs?from=
//   POST   /v1/schedules, GET /v1/schedules, GET|DELETE /v1/schedules/{id}
//   GET    /healthz   process up (no Redis, answered on the I/O thread) — no token
//   GET    /readyz    Redis reachable → 200 else 503 — no token; the Redis
//                     address and store path only with a valid token
//   GET    /metrics   Prometheus text               — no token
// An {id} that is not of the form the store issues (is_job_id,
// is_schedule_id) is 404 without touching Redis.
//
// Errors: one adapter turns every failure into
//   {"error": {"code": "INVALID_INPUT", "message": "..."}}
// with the HTTP status from the Status code: kInvalidInput 400, kNotFound 404,
// kPermissionDenied 403, kConflict 409, kResourceExhausted 422, kUnavailable
// 503, everything else 500; plus the HTTP-only cases 401 UNAUTHENTICATED,
// 409 CONFLICT (cancel a finished job), 429 TOO_MANY_JOBS (the per-token
// quota), 404 for an unknown route, 400 for malformed JSON (naming the
// position), and the HTTP front's own (coordinator/http_front.h): 400
// BAD_REQUEST, 408 REQUEST_TIMEOUT, 413 PAYLOAD_TOO_LARGE, 431
// HEADERS_TOO_LARGE, 503 OVERLOADED. A rejected request writes nothing to
// Redis: requests are validated and planned completely before the store
// calls that commit them.
//
// Admission (POST /v1/jobs, POST /v1/schedules and every scheduled run) goes
// through admit_job (coordinator/admission.h): paths confined to the
// --allow-read / --allow-write roots (403 PERMISSION_DENIED naming the field),
// the plan, the data files' headers; create_job then takes the output path
// (409 CONFLICT while a live job owns it).
//
// State lives only in Redis (jobs, tasks, schedules, quota sets), so a
// restarted coordinator carries on. In-process only: the HTTP counters of
// /metrics (per process, reset on restart, as Prometheus counters may be).
//
// Threads: the HTTP front (one I/O thread for every connection) parses
// requests and answers authentication failures, unknown routes, malformed
// ids and /healthz itself; the other requests run on `http_threads` handler
// threads, each borrowing a RedisClient from a small pool (a RedisClient is
// single-threaded). One background thread runs a Boost.Asio io_context with
// three timers: the scheduler tick (scheduler_tick every `tick_interval_s`), a
// periodic status log line, and, with a store, the retention sweep
// (coordinator/retention.h, every retention.sweep_interval_s).
//
// Thread safety: start/stop/wait/handle may be called from any thread; stop()
// is idempotent and safe from a signal-waiting thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/redis.h"
#include "common/status.h"
#include "coordinator/http_front.h"
#include "coordinator/retention.h"
#include "coordinator/schedules.h"

namespace qcal {

struct CoordinatorOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0 = any free port (see CoordinatorServer::port())
  RedisOptions redis;
  std::string prefix = "qcal";  // Redis key prefix
  std::string token_file;       // empty = authentication off (warned at start)
  std::string store_root;       // artifact store: /readyz, retention sweeps, /metrics usage
  // Confinement (common/path_policy.h): the directories jobs may read from and
  // write outputs to. Empty: nothing is allowed (every job is refused with 403).
  std::vector<std::string> allow_read, allow_write;
  RetentionOptions retention;                  // sweeps run only with a store_root
  uint64_t worker_memory_bytes = 24ull << 30;  // PlannerLimits::worker_memory_bytes
  // ---- the HTTP front (coordinator/http_front.h)
  uint64_t max_body_bytes = 1ull << 20;  // larger bodies → 413, while reading (chunked too)
  size_t max_header_bytes = 16 << 10;    // request line + headers; larger → 431
  int max_connections = 512;             // open at once; more → 503 at once
  int max_connections_per_ip = 0;        // from one client address; 0 = no cap
  double header_timeout_s = 10;          // request head (and keep-alive idle) → 408
  double body_timeout_s = 30;            // body, from the end of the head → 408
  double write_timeout_s = 30;           // writing a response; then the connection is dropped
  int http_threads = 16;                 // handler threads (Redis calls run here)
  // ---- request policy
  // Live (queued, running, validating) jobs one token may have; more → 429.
  // 0 = no quota. With auth off, every client shares one quota.
  int64_t max_jobs_per_token = 0;
  // A schedule whose cron can fire more often than this is refused (400).
  int64_t min_schedule_interval_s = 300;
  // A request waits at most this long for Redis to come back before 503
  // (caps RedisOptions::reconnect_timeout_s for request clients).
  double request_redis_timeout_s = 2.0;
  double tick_interval_s = 5.0;         // scheduler tick; <= 0: no automatic ticks
  double status_log_interval_s = 60.0;  // periodic log line; <= 0: none
  double worker_live_s = 30.0;          // a worker seen within this long is live
};

class CoordinatorServer {
 public:
  explicit CoordinatorServer(CoordinatorOptions opts);
  ~CoordinatorServer();  // stop() + wait()
  CoordinatorServer(const CoordinatorServer&) = delete;
  CoordinatorServer& operator=(const CoordinatorServer&) = delete;

  // Loads the token file, binds the port, and starts the HTTP front and the
  // background thread; returns once connections are being accepted. Redis need not be up
  // (requests answer 503 and /readyz fails until it is). Errors: the token
  // file cannot be read, the port cannot be bound.
  Status start();
  // The bound port (after start()).
  int port() const;
  // Stops accepting, finishes in-flight requests, stops the background thread.
  void stop();
  // Blocks until stop() has completed.
  void wait();

  // The whole API for one request, without a socket: authentication,
  // routing, id checks and the handler (what the HTTP front calls; tests use
  // it directly). Needs no start(); Redis is reached as in a request.
  HttpResponse handle(const HttpRequest& req);

  // Runs one scheduler tick at wall time `now` (unix seconds; tests pass a
  // time past a schedule's next_run_at), as the background thread does.
  Result<TickReport> tick(int64_t now);
  // Runs one retention sweep at wall time `now` (tests pass a time past the
  // retention), as the background thread does. kInvalidInput without a store.
  Result<SweepResult> sweep(double now);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal

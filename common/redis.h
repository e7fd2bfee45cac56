// A small synchronous Redis client over hiredis.
//
// Failure policy (style.md): after any connection-level error the connection
// is dropped and never reused; the next call reconnects with exponential
// backoff (100 ms doubling to 5 s) until `reconnect_timeout_s` has passed,
// then returns kUnavailable. Commands are NOT retried automatically (a
// retried XADD could enqueue twice); callers retry idempotent operations with
// `retry_unavailable`. Redis error replies (-ERR ...) become kInternal with
// the server's message, except NOSCRIPT which `eval` handles itself, and the
// server's transient refusals (LOADING, BUSY, MASTERDOWN, TRYAGAIN,
// CLUSTERDOWN), which are kUnavailable like a lost connection. In a pipeline
// every reply is read; the first error reply becomes the call's error.
// A connection the server closed while idle (restart, idle timeout) is noticed
// before the next command is sent and silently replaced, so that command is
// not lost. The first client in the process sets SIGPIPE to SIG_IGN when it
// is still SIG_DFL (hiredis writes with write(2)).
//
// Thread safety: one RedisClient per thread. It is cheap; make one per thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

struct RedisReply {
  enum class Type { kNil, kString, kInteger, kArray, kStatus };
  Type type = Type::kNil;
  std::string str;                // kString / kStatus
  int64_t integer = 0;            // kInteger
  std::vector<RedisReply> array;  // kArray
  bool is_nil() const { return type == Type::kNil; }
};

struct RedisOptions {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::string password;  // AUTH when non-empty
  double connect_timeout_s = 2.0;
  double command_timeout_s = 10.0;    // blocking commands add their own block time
  double reconnect_timeout_s = 30.0;  // total backoff budget per call
};

// "redis://[:password@]host:port" or "host:port" → options.
Result<RedisOptions> parse_redis_url(const std::string& url);

class RedisClient {
 public:
  explicit RedisClient(RedisOptions opts);
  ~RedisClient();
  RedisClient(const RedisClient&) = delete;
  RedisClient& operator=(const RedisClient&) = delete;

  // Runs one command (binary-safe arguments).
  Result<RedisReply> command(const std::vector<std::string>& args);
  // Runs several commands in one round trip (pipelined); replies in order.
  Result<std::vector<RedisReply>> pipeline(const std::vector<std::vector<std::string>>& cmds);
  // EVALSHA of `script` (loaded on first use and after NOSCRIPT).
  Result<RedisReply> eval(const std::string& script, const std::vector<std::string>& keys,
                          const std::vector<std::string>& args);
  const RedisOptions& options() const { return opts_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  RedisOptions opts_;
};

// Retries `fn` while it returns kUnavailable, for up to `budget_s` seconds.
Status retry_unavailable(const std::function<Status()>& fn, double budget_s);

}  // namespace qcal

#include "common/redis.h"

#include <hiredis/hiredis.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace qcal {
namespace {

using Clock = std::chrono::steady_clock;

timeval to_timeval(double s) {
  if (s < 0) s = 0;
  timeval tv;
  tv.tv_sec = static_cast<time_t>(s);
  tv.tv_usec = static_cast<suseconds_t>((s - static_cast<double>(tv.tv_sec)) * 1e6);
  return tv;
}

std::string upper(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

// Seconds a blocking command may legitimately wait on the server, added to the
// socket timeout so the wait is not mistaken for a dead connection.
double block_seconds(const std::vector<std::string>& args) {
  if (args.empty()) return 0;
  const std::string cmd = upper(args[0]);
  if (cmd == "XREAD" || cmd == "XREADGROUP") {
    for (size_t i = 1; i + 1 < args.size(); ++i) {
      if (upper(args[i]) == "BLOCK") {
        double ms = std::strtod(args[i + 1].c_str(), nullptr);
        // BLOCK 0 waits forever: the socket timeout cannot express that.
        return ms > 0 ? ms / 1000.0 : 1e9;
      }
    }
    return 0;
  }
  static const char* kLastArgSeconds[] = {"BLPOP",    "BRPOP",    "BRPOPLPUSH", "BLMOVE",
                                          "BZPOPMIN", "BZPOPMAX", "BLMPOP",     "BZMPOP"};
  for (const char* c : kLastArgSeconds) {
    if (cmd == c) {
      const std::string& last = (cmd == "BLMPOP" || cmd == "BZMPOP") ? args[1] : args.back();
      double s = std::strtod(last.c_str(), nullptr);
      return s > 0 ? s : 1e9;
    }
  }
  return 0;
}

// Server replies that mean "briefly unable", not "your command is wrong".
bool is_transient_error(const std::string& msg) {
  for (const char* p : {"LOADING", "BUSY ", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"}) {
    if (msg.rfind(p, 0) == 0) return true;
  }
  return false;
}

// Converts a hiredis reply. Error replies (at any depth) set *error.
RedisReply convert(const redisReply* r, std::string* error) {
  RedisReply out;
  switch (r->type) {
    case REDIS_REPLY_STRING:
      out.type = RedisReply::Type::kString;
      out.str.assign(r->str, static_cast<size_t>(r->len));
      break;
    case REDIS_REPLY_STATUS:
      out.type = RedisReply::Type::kStatus;
      out.str.assign(r->str, static_cast<size_t>(r->len));
      break;
    case REDIS_REPLY_INTEGER:
      out.type = RedisReply::Type::kInteger;
      out.integer = r->integer;
      break;
    case REDIS_REPLY_ARRAY:
      out.type = RedisReply::Type::kArray;
      out.array.reserve(r->elements);
      for (size_t i = 0; i < r->elements; ++i) out.array.push_back(convert(r->element[i], error));
      break;
    case REDIS_REPLY_ERROR:
      if (error->empty()) error->assign(r->str, static_cast<size_t>(r->len));
      out.type = RedisReply::Type::kNil;
      break;
    default:  // REDIS_REPLY_NIL
      out.type = RedisReply::Type::kNil;
      break;
  }
  return out;
}

Status error_reply_status(const std::string& msg) {
  if (is_transient_error(msg)) return unavailable("redis: " + msg);
  return internal_error("redis: " + msg);
}

// hiredis writes with write(2): a peer that closed the socket would raise
// SIGPIPE and kill the process. Ignore it once, unless the program installed
// its own handler.
void ignore_sigpipe_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction old {};
    if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
      signal(SIGPIPE, SIG_IGN);
    }
  });
}

}  // namespace

struct RedisClient::Impl {
  explicit Impl(const RedisOptions& o) : opts(o) {}
  ~Impl() { drop(); }

  RedisOptions opts;
  redisContext* ctx = nullptr;
  double timeout_s = -1;                              // socket timeout now set on ctx
  std::unordered_map<std::string, std::string> shas;  // script text → SHA1

  void drop() {
    if (ctx) redisFree(ctx);
    ctx = nullptr;
    timeout_s = -1;
  }

  std::string where() const { return opts.host + ":" + std::to_string(opts.port); }

  // A connection the server closed while we were idle (restart, idle
  // timeout) is detected before anything is sent, so a command is never lost
  // to a stale socket.
  bool peer_closed() const {
    pollfd p{ctx->fd, POLLIN, 0};
    if (poll(&p, 1, 0) <= 0) return false;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) return true;
    char b;
    ssize_t n = recv(ctx->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }

  Status connect_once(std::string* why) {
    ctx = redisConnectWithTimeout(opts.host.c_str(), opts.port, to_timeval(opts.connect_timeout_s));
    if (!ctx || ctx->err) {
      *why = ctx ? ctx->errstr : "cannot allocate redis context";
      drop();
      return unavailable(*why);
    }
    redisEnableKeepAlive(ctx);
    if (!set_timeout(opts.command_timeout_s)) {
      *why = ctx->errstr;
      drop();
      return unavailable(*why);
    }
    if (!opts.password.empty()) {
      const char* argv[] = {"AUTH", opts.password.data()};
      size_t lens[] = {4, opts.password.size()};
      auto* r = static_cast<redisReply*>(redisCommandArgv(ctx, 2, argv, lens));
      if (!r) {
        *why = ctx->errstr;
        drop();
        return unavailable(*why);
      }
      std::string err;
      convert(r, &err);
      freeReplyObject(r);
      if (!err.empty()) {
        drop();
        // A wrong password does not heal with time.
        return is_transient_error(err) ? unavailable(err) : invalid_input("redis AUTH: " + err);
      }
    }
    return Status::ok();
  }

  // Makes sure there is a live connection, reconnecting with backoff.
  Status ensure_connected() {
    if (ctx && peer_closed()) drop();
    if (ctx) return Status::ok();
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(std::max(0.0, opts.reconnect_timeout_s)));
    auto backoff = std::chrono::milliseconds(100);
    std::string why;
    int tries = 0;
    while (true) {
      ++tries;
      Status s = connect_once(&why);
      if (s.is_ok()) return s;
      if (s.code() != Code::kUnavailable) return s;
      auto now = Clock::now();
      if (now >= deadline) break;
      std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
      backoff = std::min(backoff * 2, std::chrono::milliseconds(5000));
    }
    return unavailable("redis " + where() + " unreachable after " + std::to_string(tries) +
                       " attempt(s): " + why);
  }

  bool set_timeout(double s) {
    if (s == timeout_s) return true;
    if (redisSetTimeout(ctx, to_timeval(s)) != REDIS_OK) return false;
    timeout_s = s;
    return true;
  }

  // The connection is broken in an unknown state: drop it, report Unavailable.
  Status io_failure(const std::string& what) {
    std::string msg = "redis " + where() + ": " + what + ": " +
                      (ctx && ctx->errstr[0] ? ctx->errstr : "connection lost");
    drop();
    return unavailable(msg);
  }

  Result<std::vector<RedisReply>> run(const std::vector<std::vector<std::string>>& cmds) {
    ignore_sigpipe_once();
    QCAL_RETURN_IF_ERROR(ensure_connected());
    double block = 0;
    for (const auto& c : cmds) block += block_seconds(c);
    if (!set_timeout(opts.command_timeout_s + block)) return io_failure("set timeout");
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const auto& c : cmds) {
      if (c.empty()) return invalid_input("redis: empty command");
      argv.clear();
      lens.clear();
      for (const auto& a : c) {
        argv.push_back(a.data());
        lens.push_back(a.size());
      }
      if (redisAppendCommandArgv(ctx, static_cast<int>(argv.size()), argv.data(), lens.data()) !=
          REDIS_OK) {
        return io_failure("append " + c[0]);
      }
    }
    std::vector<RedisReply> out;
    out.reserve(cmds.size());
    std::string first_error;
    for (size_t i = 0; i < cmds.size(); ++i) {
      void* raw = nullptr;
      if (redisGetReply(ctx, &raw) != REDIS_OK || !raw) return io_failure(cmds[i][0]);
      auto* r = static_cast<redisReply*>(raw);
      std::string err;
      out.push_back(convert(r, &err));
      freeReplyObject(r);
      // Keep reading the remaining replies so the connection stays in step.
      if (!err.empty() && first_error.empty()) first_error = err;
    }
    if (!first_error.empty()) return error_reply_status(first_error);
    return out;
  }
};

RedisClient::RedisClient(RedisOptions opts)
    : impl_(std::make_unique<Impl>(opts)), opts_(std::move(opts)) {}

RedisClient::~RedisClient() = default;

Result<RedisReply> RedisClient::command(const std::vector<std::string>& args) {
  QCAL_ASSIGN_OR_RETURN(auto replies, impl_->run({args}));
  return std::move(replies[0]);
}

Result<std::vector<RedisReply>> RedisClient::pipeline(
    const std::vector<std::vector<std::string>>& cmds) {
  if (cmds.empty()) return std::vector<RedisReply>{};
  return impl_->run(cmds);
}

Result<RedisReply> RedisClient::eval(const std::string& script,
                                     const std::vector<std::string>& keys,
                                     const std::vector<std::string>& args) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto it = impl_->shas.find(script);
    if (it == impl_->shas.end()) {
      QCAL_ASSIGN_OR_RETURN(auto r, command({"SCRIPT", "LOAD", script}));
      if (r.type != RedisReply::Type::kString) return internal_error("redis: SCRIPT LOAD: no sha");
      it = impl_->shas.emplace(script, r.str).first;
    }
    std::vector<std::string> cmd;
    cmd.reserve(3 + keys.size() + args.size());
    cmd.push_back("EVALSHA");
    cmd.push_back(it->second);
    cmd.push_back(std::to_string(keys.size()));
    cmd.insert(cmd.end(), keys.begin(), keys.end());
    cmd.insert(cmd.end(), args.begin(), args.end());
    auto r = command(cmd);
    // After SCRIPT FLUSH or a server restart the cache is gone: load again.
    if (!r.is_ok() && r.status().message().find("NOSCRIPT") != std::string::npos) {
      impl_->shas.erase(script);
      continue;
    }
    return r;
  }
  return internal_error("redis: script still unknown to the server after SCRIPT LOAD");
}

Result<RedisOptions> parse_redis_url(const std::string& url) {
  RedisOptions o;
  std::string rest = url;
  const std::string scheme = "redis://";
  bool has_scheme = false;
  if (rest.rfind(scheme, 0) == 0) {
    rest = rest.substr(scheme.size());
    has_scheme = true;
  } else if (rest.find("://") != std::string::npos) {
    return invalid_input("redis url '" + url + "': only redis:// is supported");
  }
  // Optional "/<db>": only db 0 is used by qcal.
  if (size_t slash = rest.find('/'); slash != std::string::npos) {
    std::string db = rest.substr(slash + 1);
    if (!db.empty() && db != "0") {
      return invalid_input("redis url '" + url + "': only database 0 is supported");
    }
    rest = rest.substr(0, slash);
  }
  if (size_t at = rest.rfind('@'); at != std::string::npos) {
    if (!has_scheme) return invalid_input("redis url '" + url + "': credentials need redis://");
    std::string cred = rest.substr(0, at);
    rest = rest.substr(at + 1);
    size_t colon = cred.find(':');
    std::string user = colon == std::string::npos ? "" : cred.substr(0, colon);
    o.password = colon == std::string::npos ? cred : cred.substr(colon + 1);
    if (!user.empty() && user != "default") {
      return invalid_input("redis url '" + url + "': ACL user '" + user + "' is not supported");
    }
  }
  std::string host = rest, port;
  if (!rest.empty() && rest[0] == '[') {  // [ipv6]:port
    size_t close = rest.find(']');
    if (close == std::string::npos) return invalid_input("redis url '" + url + "': bad IPv6 host");
    host = rest.substr(1, close - 1);
    std::string tail = rest.substr(close + 1);
    if (!tail.empty()) {
      if (tail[0] != ':') return invalid_input("redis url '" + url + "': bad IPv6 host");
      port = tail.substr(1);
    }
  } else if (size_t colon = rest.rfind(':'); colon != std::string::npos) {
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
  }
  if (host.empty()) return invalid_input("redis url '" + url + "': missing host");
  o.host = host;
  if (!port.empty()) {
    char* end = nullptr;
    long p = std::strtol(port.c_str(), &end, 10);
    if (*end != '\0' || p <= 0 || p > 65535) {
      return invalid_input("redis url '" + url + "': bad port '" + port + "'");
    }
    o.port = static_cast<int>(p);
  } else if (rest.back() == ':') {
    return invalid_input("redis url '" + url + "': empty port");
  }
  return o;
}

Status retry_unavailable(const std::function<Status()>& fn, double budget_s) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(std::max(0.0, budget_s)));
  auto backoff = std::chrono::milliseconds(50);
  while (true) {
    Status s = fn();
    if (s.code() != Code::kUnavailable) return s;
    auto now = Clock::now();
    if (now >= deadline) return s;
    std::this_thread::sleep_for(std::min<Clock::duration>(backoff, deadline - now));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(1000));
  }
}

}  // namespace qcal

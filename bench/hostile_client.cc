// Hostile clients against a running coordinator, while measuring what honest
// clients see. Opens N attack connections and keeps them open for the run
// (re-opening any the server closes, as an attacker would), and meanwhile
// probes GET /healthz (no token) and an authenticated GET /v1/jobs, one new
// connection per request, back to back; prints p50/p99/max latency and the
// probes that failed (no answer within --probe-timeout-s, or a non-200).
//
//   hostile_client --port P --token T [--host 127.0.0.1] [--conns 200]
//                  [--mode idle|slowloris|slowbody|authbody|mix] [--seconds 10]
//                  [--trickle-ms 1000] [--probe-timeout-s 5] [--probe-from ADDR]
//   hostile_client --port P --token T --mode chunked [--chunked-mb 200]
//
// Modes:
//   idle       connect and send nothing
//   slowloris  a request line, then header bytes trickled one byte per
//              connection every --trickle-ms (never finishing the head)
//   slowbody   a complete head of an unauthenticated POST /v1/jobs with
//              Content-Length: 1000000, then one body byte every --trickle-ms
//   authbody   the same with the token (an insider, or a stolen token)
//   mix        a third each of idle, slowloris and slowbody
//   chunked    one authenticated POST /v1/jobs with a chunked body of
//              --chunked-mb MiB sent as fast as the server reads it; reports
//              how much the server read before it answered or closed
//
// --probe-from binds the probes to another local address (e.g. 127.0.0.2:
// the attack comes from 127.0.0.1), to see a per-address connection cap
// (--max-connections-per-ip) at work on one machine.
//
// Exit status: 0 when every probe answered 200, 1 otherwise (2 on bad usage).
// The attack connections, the probes and the server share the machine.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/flags.h"

namespace {

using Clock = std::chrono::steady_clock;

double since_ms(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

struct Target {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string token;
};

// A non-blocking TCP socket connecting to the target (from `from` when not
// empty); -1 on failure.
int open_socket(const Target& t, const std::string& from = "") {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (!from.empty()) {
    sockaddr_in b{};
    b.sin_family = AF_INET;
    if (::inet_pton(AF_INET, from.c_str(), &b.sin_addr) != 1 ||
        ::bind(fd, reinterpret_cast<sockaddr*>(&b), sizeof b) != 0) {
      ::close(fd);
      return -1;
    }
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(t.port));
  if (::inet_pton(AF_INET, t.host.c_str(), &a.sin_addr) != 1 ||
      (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS)) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// One request on a fresh connection, waiting at most `timeout_ms` in all.
// Returns the HTTP status (0 when no complete status line came in time).
int probe(const Target& t, const std::string& path, bool auth, double timeout_ms,
          const std::string& from) {
  const auto t0 = Clock::now();
  int fd = open_socket(t, from);
  if (fd < 0) return 0;
  std::string req = "GET " + path + " HTTP/1.1\r\nHost: " + t.host + "\r\nConnection: close\r\n";
  if (auth) req += "Authorization: Bearer " + t.token + "\r\n";
  req += "\r\n";
  size_t sent = 0;
  std::string in;
  int status = 0;
  for (;;) {
    const double left = timeout_ms - since_ms(t0);
    if (left <= 0) break;
    pollfd p{fd, static_cast<short>(sent < req.size() ? POLLOUT : POLLIN), 0};
    if (::poll(&p, 1, static_cast<int>(left) + 1) <= 0) continue;
    if (sent < req.size()) {
      ssize_t n = ::send(fd, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN) break;
      if (n > 0) sent += static_cast<size_t>(n);
      continue;
    }
    char buf[4096];
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EAGAIN) continue;
    if (n <= 0) break;
    in.append(buf, static_cast<size_t>(n));
    // The answer is complete once the head is in and Content-Length bytes follow it.
    const size_t head = in.find("\r\n\r\n");
    if (head == std::string::npos) continue;
    if (status == 0 && in.size() > 12) status = std::atoi(in.c_str() + 9);
    size_t cl = 0;
    for (const char* name : {"Content-Length: ", "content-length: "}) {
      size_t at = in.find(name);
      if (at != std::string::npos && at < head)
        cl = std::strtoul(in.c_str() + at + 16, nullptr, 10);
    }
    if (in.size() >= head + 4 + cl) {
      ::close(fd);
      return status;
    }
  }
  ::close(fd);
  return 0;
}

struct Series {
  std::vector<double> ms;
  int failed = 0;
  int last_bad = 0;  // the last non-200 status (0 = timed out)
  double pct(double q) const {
    if (ms.empty()) return 0;
    std::vector<double> s = ms;
    std::sort(s.begin(), s.end());
    return s[std::min(s.size() - 1, static_cast<size_t>(q * static_cast<double>(s.size())))];
  }
};

// ------------------------------------------------------------ attackers

enum class Mode { kIdle, kSlowloris, kSlowbody, kAuthbody };

struct Attacker {
  int fd = -1;
  Mode mode = Mode::kIdle;
  std::string pending;  // bytes still to trickle
  size_t sent = 0;
};

std::string attack_head(Mode m, const Target& t) {
  switch (m) {
    case Mode::kIdle: return "";
    case Mode::kSlowloris:
      // The head never ends: after the first lines, endless header bytes.
      return "GET /healthz HTTP/1.1\r\nHost: " + t.host +
             "\r\nX-Slow: " + std::string(1 << 20, 'a');
    case Mode::kSlowbody:
    case Mode::kAuthbody:
      return "POST /v1/jobs HTTP/1.1\r\nHost: " + t.host +
             (m == Mode::kAuthbody ? "\r\nAuthorization: Bearer " + t.token : std::string()) +
             "\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n" +
             std::string(1000000, ' ');
  }
  return "";
}

struct AttackStats {
  int opened = 0, open_failed = 0, closed_by_server = 0;
};

// Keeps `n` attack connections open until `stop`, trickling one byte per
// connection every `trickle_ms`; reopens any the server closes.
void attack(const Target& t, const std::vector<Mode>& modes, int trickle_ms,
            const std::atomic<bool>& stop, AttackStats* st) {
  std::vector<Attacker> a(modes.size());
  auto reopen = [&](Attacker& x, Mode m) {
    if (x.fd >= 0) ::close(x.fd);
    x = Attacker{};
    x.mode = m;
    x.fd = open_socket(t);
    x.pending = attack_head(m, t);
    if (x.fd >= 0) {
      ++st->opened;
    } else {
      ++st->open_failed;
    }
  };
  for (size_t i = 0; i < a.size(); ++i) reopen(a[i], modes[i]);
  auto next_trickle = Clock::now();
  while (!stop.load()) {
    std::vector<pollfd> p;
    for (auto& x : a) p.push_back({x.fd, POLLIN, 0});
    ::poll(p.data(), p.size(), 50);
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i].fd < 0) {
        reopen(a[i], modes[i]);
        continue;
      }
      if (p[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        char buf[4096];
        ssize_t n = ::recv(a[i].fd, buf, sizeof buf, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
          ++st->closed_by_server;
          reopen(a[i], modes[i]);
        }
      }
    }
    if (Clock::now() < next_trickle) continue;
    next_trickle = Clock::now() + std::chrono::milliseconds(trickle_ms);
    for (auto& x : a) {
      if (x.fd < 0 || x.sent >= x.pending.size()) continue;
      // The first trickle sends the head whole for a slow body, else the
      // request line (a slow client still gets its first packet out); later
      // ones one byte.
      const size_t head = x.mode == Mode::kSlowbody || x.mode == Mode::kAuthbody
                              ? x.pending.find("\r\n\r\n") + 4
                              : x.pending.find('\n') + 1;
      const size_t len = x.sent == 0 ? head : 1;
      ssize_t n = ::send(x.fd, x.pending.data() + x.sent, len, MSG_NOSIGNAL);
      if (n > 0) x.sent += static_cast<size_t>(n);
    }
  }
  for (auto& x : a)
    if (x.fd >= 0) ::close(x.fd);
}

// One authenticated POST with a chunked body of `mb` MiB, written as fast as
// the server takes it. Prints how much went in before the server answered.
int chunked(const Target& t, int mb) {
  int fd = open_socket(t);
  if (fd < 0) return 1;
  const std::string head =
      "POST /v1/jobs HTTP/1.1\r\nHost: " + t.host + "\r\nAuthorization: Bearer " + t.token +
      "\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
  std::string chunk = "10000\r\n" + std::string(0x10000, ' ') + "\r\n";
  const int64_t total = static_cast<int64_t>(mb) << 20;
  int64_t body = 0;
  size_t off = 0;
  std::string out = head, in;
  const auto t0 = Clock::now();
  while (since_ms(t0) < 120000) {
    pollfd p{fd, POLLIN | POLLOUT, 0};
    if (::poll(&p, 1, 1000) <= 0) continue;
    if (p.revents & POLLIN) {
      char buf[4096];
      ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n > 0) in.append(buf, static_cast<size_t>(n));
      if (n == 0 || (n < 0 && errno != EAGAIN) || in.find("\r\n\r\n") != std::string::npos) break;
    }
    if ((p.revents & POLLOUT) && body < total) {
      if (off == out.size()) {
        out = chunk;
        off = 0;
        body += 0x10000;
        if (body >= total) out += "0\r\n\r\n";
      }
      ssize_t n = ::send(fd, out.data() + off, out.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN) break;
      if (n > 0) off += static_cast<size_t>(n);
    }
    if (p.revents & (POLLHUP | POLLERR)) break;
  }
  ::close(fd);
  const std::string first = in.substr(0, in.find("\r\n"));
  std::printf("chunked body of %d MiB: %.1f MiB sent before the server answered '%s' (%.0f ms)\n",
              mb, static_cast<double>(body) / (1 << 20),
              first.empty() ? "(closed, no answer)" : first.c_str(), since_ms(t0));
  return first.find(" 413 ") != std::string::npos ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  qcal::Flags f({"host", "port", "token", "conns", "mode", "seconds", "trickle-ms",
                 "probe-timeout-s", "chunked-mb", "probe-from"},
                {"help"});
  qcal::Status st = f.parse(argc, argv, 1);
  auto usage = [] {
    std::fputs(
        "usage: hostile_client --port P --token T [--host 127.0.0.1] [--conns 200]\n"
        "         [--mode idle|slowloris|slowbody|authbody|mix|chunked] [--seconds 10]\n"
        "         [--trickle-ms 1000] [--probe-timeout-s 5] [--probe-from ADDR] [--chunked-mb "
        "200]\n",
        stderr);
    return 2;
  };
  if (!st.is_ok() || f.flag("help")) {
    if (!st.is_ok()) std::fprintf(stderr, "hostile_client: %s\n", st.message().c_str());
    return usage();
  }
  Target t;
  t.host = f.str("host", "127.0.0.1");
  auto port = f.integer("port", 0);
  auto conns = f.integer("conns", 200);
  auto seconds = f.number("seconds", 10);
  auto trickle = f.integer("trickle-ms", 1000);
  auto ptimeout = f.number("probe-timeout-s", 5);
  auto mb = f.integer("chunked-mb", 200);
  if (!port.is_ok() || !conns.is_ok() || !seconds.is_ok() || !trickle.is_ok() ||
      !ptimeout.is_ok() || !mb.is_ok() || *port <= 0 || *conns < 0 || *trickle < 1)
    return usage();
  t.port = static_cast<int>(*port);
  t.token = f.str("token");
  const std::string mode = f.str("mode", "mix");
  const std::string from = f.str("probe-from");
  if (mode == "chunked") return chunked(t, static_cast<int>(*mb));

  std::vector<Mode> modes;
  for (int64_t i = 0; i < *conns; ++i) {
    if (mode == "idle") {
      modes.push_back(Mode::kIdle);
    } else if (mode == "slowloris") {
      modes.push_back(Mode::kSlowloris);
    } else if (mode == "slowbody") {
      modes.push_back(Mode::kSlowbody);
    } else if (mode == "authbody") {
      modes.push_back(Mode::kAuthbody);
    } else if (mode == "mix") {
      modes.push_back(static_cast<Mode>(i % 3));
    } else {
      std::fprintf(stderr, "hostile_client: unknown --mode %s\n", mode.c_str());
      return usage();
    }
  }
  std::atomic<bool> stop{false};
  AttackStats as;
  std::thread attacker([&] { attack(t, modes, static_cast<int>(*trickle), stop, &as); });
  // Let the attack connections land before probing.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));

  Series health, jobs;
  const auto t0 = Clock::now();
  const double timeout_ms = *ptimeout * 1000;
  while (since_ms(t0) < *seconds * 1000) {
    for (auto [s, path, auth] :
         {std::tuple{&health, "/healthz", false}, std::tuple{&jobs, "/v1/jobs?limit=10", true}}) {
      const auto p0 = Clock::now();
      const int code = probe(t, path, auth, timeout_ms, from);
      const double ms = since_ms(p0);
      s->ms.push_back(ms);  // a timed-out probe counts with its full wait
      if (code != 200) {
        ++s->failed;
        s->last_bad = code;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  stop.store(true);
  attacker.join();

  std::printf(
      "mode %s, %lld attack connections (opened %d, failed to open %d, closed by server %d)\n",
      mode.c_str(), static_cast<long long>(*conns), as.opened, as.open_failed, as.closed_by_server);
  std::printf(
      "| probe | requests | failed | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n");
  for (auto [name, s] : {std::pair{"GET /healthz", &health}, std::pair{"GET /v1/jobs", &jobs}}) {
    const std::string why = !s->failed    ? ""
                            : s->last_bad ? " (HTTP " + std::to_string(s->last_bad) + ")"
                                          : " (timed out)";
    std::printf("| %s | %zu | %d%s | %.1f | %.1f | %.1f |\n", name, s->ms.size(), s->failed,
                why.c_str(), s->pct(0.5), s->pct(0.99), s->pct(1.0));
  }
  return health.failed + jobs.failed == 0 ? 0 : 1;
}

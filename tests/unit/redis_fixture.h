// A real redis-server for integration tests: one private server per
// RedisServer object, on a free loopback port, in a fresh temporary
// directory, with AOF on (so restart() brings the data back).
//
//   class MyTest : public qcal::testing::RedisTest {};   // skips without redis-server
//   TEST_F(MyTest, X) { qcal::RedisClient c(redis().options()); ... }
//
// or by hand:
//
//   qcal::testing::RedisServer server;
//   QCAL_REQUIRE_REDIS(server);   // GTEST_SKIP if not on PATH, FAIL if it did not start
//
// Lifetime: the destructor stops the server (SIGTERM, then SIGKILL after 5 s)
// and removes its directory. The server is also started with
// PR_SET_PDEATHSIG=SIGKILL, so a test process that crashes does not leave it
// running. Note: PDEATHSIG fires when the *thread* that called start() exits,
// so start (and restart) servers from the test's main thread.
//
// Programs without GoogleTest (benchmarks) define QCAL_REDIS_FIXTURE_NO_GTEST
// before including this header to get RedisServer alone.
//
// Thread safety: none; drive one RedisServer from one thread.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/redis.h"

namespace qcal::testing {

class RedisServer {
 public:
  // Starts a server at once; check available() and started() (or use
  // QCAL_REQUIRE_REDIS) before using it.
  RedisServer() {
    binary_ = find_binary();
    if (binary_.empty()) {
      error_ = "redis-server not found on PATH";
      return;
    }
    std::string tmpl = temp_root() + "/qcal-redis-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) {
      error_ = "mkdtemp " + tmpl + ": " + std::strerror(errno);
      return;
    }
    dir_ = buf.data();
    // A port found free can be taken by someone else before the server binds
    // it: try a few.
    for (int i = 0; i < 5 && pid_ <= 0; ++i) {
      port_ = free_port();
      if (port_ <= 0) continue;
      start();
    }
  }
  ~RedisServer() {
    stop();
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  bool available() const { return !binary_.empty(); }  // redis-server on PATH
  bool started() const { return pid_ > 0; }            // running and answering PING
  const std::string& error() const { return error_; }  // why it is not started
  int port() const { return port_; }
  const std::string& dir() const { return dir_; }
  pid_t pid() const { return pid_; }

  // Client options for this server. A short reconnect budget keeps tests that
  // provoke outages fast; raise it where a test restarts the server under load.
  RedisOptions options(double reconnect_timeout_s = 5.0) const {
    RedisOptions o;
    o.host = "127.0.0.1";
    o.port = port_;
    o.connect_timeout_s = 1.0;
    o.command_timeout_s = 10.0;
    o.reconnect_timeout_s = reconnect_timeout_s;
    return o;
  }

  // Starts the server on port() in dir() (no-op when running). Waits until
  // PING answers PONG (the AOF is loaded by then). Returns started().
  bool start() {
    if (pid_ > 0) return true;
    if (binary_.empty() || dir_.empty() || port_ <= 0) return false;
    error_.clear();
    const std::string log = dir_ + "/redis.log";
    const std::string port = std::to_string(port_);
    std::vector<std::string> args = {
        binary_, "--port",       port,  "--bind",           "127.0.0.1", "--dir",
        dir_,    "--appendonly", "yes", "--save",           "",          "--daemonize",
        "no",    "--logfile",    "",    "--protected-mode", "no"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
      error_ = std::string("fork: ") + std::strerror(errno);
      return false;
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);  // the parent died before prctl
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
      int devnull = open("/dev/null", O_RDONLY);
      if (devnull >= 0) dup2(devnull, 0);
      execv(argv[0], argv.data());
      _exit(127);
    }
    pid_ = pid;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        error_ = "redis-server exited at start-up: " + log_tail();
        return false;
      }
      if (ping()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    error_ = "redis-server did not answer PING within 20 s: " + log_tail();
    kill9();
    return false;
  }

  // SIGTERM (Redis flushes the AOF on shutdown) and waits for the exit;
  // SIGKILL after 5 s. No-op when not running.
  void stop() { signal_and_wait(SIGTERM, std::chrono::seconds(5)); }
  // SIGKILL, as a crash: no shutdown work. The AOF still holds every write
  // that was acknowledged (they sit in the OS page cache).
  void kill9() { signal_and_wait(SIGKILL, std::chrono::seconds(5)); }
  // stop() then start() on the same port and directory.
  bool restart() {
    stop();
    return start();
  }

  // The last lines of the server's log, for failure messages.
  std::string log_tail(size_t max_chars = 2000) const {
    std::ifstream f(dir_ + "/redis.log");
    std::stringstream ss;
    ss << f.rdbuf();
    std::string s = ss.str();
    return s.size() > max_chars ? s.substr(s.size() - max_chars) : s;
  }

 private:
  static std::string temp_root() {
    const char* t = std::getenv("TMPDIR");
    return (t && *t) ? t : "/tmp";
  }
  static std::string find_binary() {
    const char* path = std::getenv("PATH");
    std::stringstream ss(path ? path : "/usr/local/bin:/usr/bin:/bin");
    std::string d;
    while (std::getline(ss, d, ':')) {
      if (d.empty()) continue;
      std::string p = d + "/redis-server";
      if (access(p.c_str(), X_OK) == 0) return p;
    }
    return "";
  }
  static int free_port() {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    socklen_t len = sizeof(a);
    int port = -1;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
      port = ntohs(a.sin_port);
    }
    close(fd);
    return port;
  }
  bool ping() const {
    timeval tv{0, 200 * 1000};
    redisContext* c = redisConnectWithTimeout("127.0.0.1", port_, tv);
    bool ok = false;
    if (c && !c->err) {
      redisSetTimeout(c, tv);
      auto* r = static_cast<redisReply*>(redisCommand(c, "PING"));
      ok = r && r->type == REDIS_REPLY_STATUS && std::string(r->str, r->len) == "PONG";
      if (r) freeReplyObject(r);
    }
    if (c) redisFree(c);
    return ok;
  }
  void signal_and_wait(int sig, std::chrono::seconds grace) {
    if (pid_ <= 0) return;
    kill(pid_, sig);
    const auto deadline = std::chrono::steady_clock::now() + grace;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
  }

  std::string binary_, dir_, error_;
  int port_ = -1;
  pid_t pid_ = -1;
};

#ifndef QCAL_REDIS_FIXTURE_NO_GTEST
// Skips the test when redis-server is missing (CI installs it) and fails it
// when the server would not start.
#define QCAL_REQUIRE_REDIS(server)                                           \
  do {                                                                       \
    if (!(server).available()) GTEST_SKIP() << (server).error();             \
    if (!(server).started()) FAIL() << "redis-server: " << (server).error(); \
  } while (0)

// A test fixture with one fresh server per test.
class RedisTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = std::make_unique<RedisServer>();
    QCAL_REQUIRE_REDIS(*server_);
  }
  void TearDown() override { server_.reset(); }
  RedisServer& redis() { return *server_; }

 private:
  std::unique_ptr<RedisServer> server_;
};
#endif  // QCAL_REDIS_FIXTURE_NO_GTEST

}  // namespace qcal::testing

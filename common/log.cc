#include "common/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace qcal {
namespace {
LogLevel initial_level() {
  const char* e = std::getenv("QCAL_LOG_LEVEL");
  if (!e) return LogLevel::kInfo;
  if (!std::strcmp(e, "debug")) return LogLevel::kDebug;
  if (!std::strcmp(e, "warn")) return LogLevel::kWarn;
  if (!std::strcmp(e, "error")) return LogLevel::kError;
  return LogLevel::kInfo;
}
std::atomic<int> g_level{static_cast<int>(initial_level())};
std::mutex g_mu;
}  // namespace

LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }
void set_log_level(LogLevel level) { g_level.store(static_cast<int>(level)); }

void log_line(LogLevel level, const std::string& msg) {
  static const char* kNames[] = {"debug", "info", "warn", "error"};
  using namespace std::chrono;
  double t = duration<double>(steady_clock::now().time_since_epoch()).count();
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "[qcal %s %.3f] %s\n", kNames[static_cast<int>(level)], t, msg.c_str());
}

}  // namespace qcal

// Minimal leveled logging to stderr. Thread safe (one line per call).
// Level from QCAL_LOG_LEVEL=debug|info|warn|error (default info).
#pragma once

#include <sstream>
#include <string>

namespace qcal {

enum class LogLevel { kDebug = 0, kInfo, kWarn, kError };

LogLevel log_level();
void set_log_level(LogLevel level);
void log_line(LogLevel level, const std::string& msg);

namespace detail {
class LogStream {
 public:
  explicit LogStream(LogLevel l) : level_(l) {}
  ~LogStream() { log_line(level_, os_.str()); }
  template <typename T>
  LogStream& operator<<(const T& v) {
    os_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  std::ostringstream os_;
};
}  // namespace detail

}  // namespace qcal

// A `for` rather than `if/else`, so `if (x) LOG_WARN << ...;` nests safely.
#define QCAL_LOG(level)                                                            \
  for (bool _qcal_log_on = ::qcal::LogLevel::level >= ::qcal::log_level(); _qcal_log_on; \
       _qcal_log_on = false)                                                       \
  ::qcal::detail::LogStream(::qcal::LogLevel::level)
#define LOG_DEBUG QCAL_LOG(kDebug)
#define LOG_INFO QCAL_LOG(kInfo)
#define LOG_WARN QCAL_LOG(kWarn)
#define LOG_ERROR QCAL_LOG(kError)

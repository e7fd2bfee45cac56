// Error reporting shared by every `qcal` command: "qcal <command>: error: <what
// went wrong>" on stderr, exit code 2 for bad input (invalid, missing or corrupt
// input) and 1 for everything else.
#pragma once

#include <cstdio>
#include <string>

#include "common/sanitize.h"
#include "common/status.h"

namespace qcal {

// The message may come from the server (and from other users' files through
// it): control characters are escaped (common/sanitize.h terminal_safe).
inline int cli_fail(const std::string& cmd, const Status& s) {
  std::fprintf(stderr, "qcal %s: error: %s\n", cmd.c_str(), terminal_safe(s.message()).c_str());
  switch (s.code()) {
    case Code::kInvalidInput:
    case Code::kNotFound:
    case Code::kCorrupt:
    case Code::kPermissionDenied:
    case Code::kConflict: return 2;
    default: return 1;
  }
}

}  // namespace qcal

// In a command returning int: run `expr` (a Status) and return cli_fail on error.
#define CLI_TRY(cmd, expr)                               \
  do {                                                   \
    ::qcal::Status _s = (expr);                          \
    if (!_s.is_ok()) return ::qcal::cli_fail((cmd), _s); \
  } while (0)
// `lhs = value of expr` (a Result<T>), or return cli_fail on error.
#define CLI_ASSIGN(cmd, lhs, expr)                                       \
  auto QCAL_CONCAT(_r_, __LINE__) = (expr);                              \
  if (!QCAL_CONCAT(_r_, __LINE__).is_ok())                               \
    return ::qcal::cli_fail((cmd), QCAL_CONCAT(_r_, __LINE__).status()); \
  lhs = std::move(QCAL_CONCAT(_r_, __LINE__)).value()

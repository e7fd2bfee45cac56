// Seconds on the monotonic clock, for measuring durations (not a wall time).
#pragma once

#include <chrono>

namespace qcal {

inline double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace qcal

// fn(begin, end) over [0, n) on a small pool of blocking worker threads (not
// OpenMP: the BLAS is OpenBLAS's pthread build, whose threads run between our
// loops, and workers sleeping on a condition variable never spin against it).
// Items cost `cost` work units each; the range is split so that a chunk is at
// least ~32k units, and runs inline when the whole job is below that. Chunks
// are disjoint, so a loop that never reduces across chunks gives the same
// result for every thread count. One job at a time: a call made while another
// is in flight (another thread, or nested inside fn) runs inline on its caller.
// Issue GEMMs from the calling thread only, never inside fn.
#pragma once

#include <cstdint>
#include <functional>

namespace qcal {

void parallel_for(int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qcal

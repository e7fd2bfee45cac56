// fn(begin, end) over [0, n) on a small pool of blocking worker threads: the
// one place qcal runs threads for compute (the BLAS is single-threaded and its
// GEMMs are cut into panels on this pool, kernels/gemm.h). Workers and the
// caller sleep on condition variables, never spin, and chunks are claimed
// dynamically, so on a busy machine (issue #14) a thread that gets no CPU
// delays nobody: the caller runs the chunks no worker claimed, and never waits
// for a worker that has not started. The pool has blas_threads() − 1 workers.
// Items cost `cost` work units each; the range is split so that a chunk is at
// least ~32k units, and runs inline when the whole job is below that. Chunks
// are disjoint, so a loop that never reduces across chunks gives the same
// result for every thread count. One job at a time: a call made while another
// is in flight (another thread, or nested inside fn) runs inline on its caller,
// GEMMs inside fn included.
#pragma once

#include <cstdint>
#include <functional>

namespace qcal {

void parallel_for(int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qcal

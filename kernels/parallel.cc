// The one pool of blocking worker threads behind parallel_for (see parallel.h).
#include "kernels/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/gemm.h"

namespace qcal {

namespace {

thread_local bool t_in_pool = false;  // this thread is running a pool job

// Runs fn(begin, end) over [0, n) split in chunks, claimed dynamically.
//
// Thread safety / invariants: callers are serialized by call_mu_; a call made
// while another is in flight (from another thread, or nested inside fn) runs
// inline on the caller. Nobody ever spins: idle workers sleep on start_cv_,
// the caller sleeps on done_cv_.
//
// Fair to neighbours (issue #14): the caller never waits for a worker that has
// not started. A worker joins a job only while it is open (under mu_, counted
// in joined_); the caller, once it finds no chunk left, closes the job and
// waits only for the joined workers still inside a chunk. On a busy machine a
// woken worker may get no CPU for a whole time slice; the caller then runs
// every chunk itself instead of waiting for it, and the late worker, finding
// the job closed, goes back to sleep.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  int size() const { return static_cast<int>(threads_.size()) + 1; }

  void run(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
    if (t_in_pool || threads_.empty()) {
      fn(0, n);
      return;
    }
    std::unique_lock<std::mutex> call(call_mu_, std::try_to_lock);
    if (!call.owns_lock()) {
      fn(0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      fn_ = &fn;
      n_ = n;
      chunk_ = chunk;
      next_.store(0);
      open_ = true;
      ++generation_;
    }
    start_cv_.notify_all();
    drain();
    std::unique_lock<std::mutex> g(mu_);
    open_ = false;  // workers not yet in stay out
    done_cv_.wait(g, [this] { return joined_ == 0; });
    fn_ = nullptr;
  }

 private:
  void drain() {
    t_in_pool = true;
    for (;;) {
      int64_t b = next_.fetch_add(chunk_);
      if (b >= n_) break;
      (*fn_)(b, std::min(n_, b + chunk_));
    }
    t_in_pool = false;
  }
  void work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> g(mu_);
        start_cv_.wait(g, [&] { return generation_ != seen; });
        seen = generation_;
        if (!open_) continue;  // woke after the caller finished alone
        ++joined_;
      }
      drain();
      std::lock_guard<std::mutex> g(mu_);
      if (--joined_ == 0 && !open_) done_cv_.notify_one();
    }
  }

  std::mutex call_mu_;  // held for the duration of one run()
  std::mutex mu_;       // guards generation_, open_, joined_, and publishing fn_/n_/chunk_
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  bool open_ = false;  // workers may join the current job
  int joined_ = 0;     // workers inside drain() for the current job
  uint64_t generation_ = 0;
  std::vector<std::thread> threads_;
};

Pool& pool() {
  // Intentionally leaked: workers block forever and die with the process.
  static Pool* p = new Pool(std::max(0, blas_threads() - 1));
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
  constexpr int64_t kMinWork = 1 << 15;
  if (n <= 0) return;
  const int64_t total = n * std::max<int64_t>(cost, 1);
  Pool& p = pool();
  if (total < 2 * kMinWork || p.size() == 1 || n == 1) {
    fn(0, n);
    return;
  }
  int64_t chunks = std::min<int64_t>(total / kMinWork, 4 * p.size());
  chunks = std::max<int64_t>(1, std::min(chunks, n));
  p.run(n, (n + chunks - 1) / chunks, fn);
}

}  // namespace qcal

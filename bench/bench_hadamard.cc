// The online Hadamard transform (kernels/hadamard.h) against the dense multiply
// it replaces, on X (T, n) fp32 with T = 512 tokens: hadamard_transform in place
// vs sgemm X·Hn with the dense n×n matrix. For n > 8192 the dense matrix would
// not fit comfortably (28672² fp32 = 3.3 GB), so the dense time is measured on
// a 4096-column slice of Hn and scaled by n/4096 (GEMM time is linear in the
// output width); those rows say "scaled". Times are the best wall time and the
// least process CPU time over repeated runs; the speedup is the ratio of the
// CPU times (steadier than wall time on a shared machine). Threads: QCAL_THREADS /
// OPENBLAS_NUM_THREADS or all cores.
//
// Usage: bench_hadamard [min_seconds_per_row = 0.5] [n ...]
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/hadamard.h"

namespace {

constexpr int64_t kT = 512, kSlice = 4096, kMaxDense = 8192;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Timing {
  double best, cpu;  // seconds: best wall, least CPU
};

// Over at least 2 runs and min_seconds, after a warm-up.
Timing time_it(const std::function<void()>& fn, double min_seconds) {
  fn();
  Timing t{1e30, 1e30};
  double total = 0.0;
  int reps = 0;
  while (reps < 2 || total < min_seconds) {
    const double t0 = now(), c0 = cpu_now();
    fn();
    const double dt = now() - t0;
    t.cpu = std::min(t.cpu, cpu_now() - c0);
    t.best = std::min(t.best, dt);
    total += dt;
    ++reps;
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const double min_seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
  std::vector<int64_t> sizes = {14, 352, 4864, 14336, 18944, 28672, 29568};
  if (argc > 2) {
    sizes.clear();
    for (int i = 2; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  }
  std::printf("T = %lld tokens, fp32, %d BLAS threads\n", static_cast<long long>(kT),
              qcal::blas_threads());
  std::printf("%-6s %-5s %-5s %-34s %10s %9s %10s %9s %8s  %s\n", "n", "K", "P", "construction",
              "fast ms", "fast cpu", "dense ms", "dense cpu", "speedup", "max|dense-fast|");
  for (int64_t n : sizes) {
    qcal::Result<qcal::HadamardPlan> plan = qcal::hadamard_plan(n);
    if (!plan.is_ok()) {
      std::printf("%-6lld %s\n", static_cast<long long>(n), plan.status().message().c_str());
      continue;
    }
    qcal::Rng rng(1);
    std::vector<float> x(static_cast<size_t>(kT * n));
    for (float& v : x) v = static_cast<float>(rng.normal());
    std::vector<float> work = x;
    const Timing fast = time_it(
        [&] {
          std::copy(x.begin(), x.end(), work.begin());
          qcal::hadamard_transform(work.data(), kT, n);
        },
        min_seconds);

    // Dense: Y (T, cols) = X (T, n) · Hn[:, :cols].
    const int64_t cols = n > kMaxDense ? kSlice : n;
    // The true Hn where it fits; for the slice the values do not matter to the
    // timing, so it is random (building 4096 true columns costs more than the run).
    std::vector<float> h(static_cast<size_t>(n * cols));
    if (n <= kMaxDense) {
      const std::vector<double> full = qcal::hadamard_matrix(n);
      std::copy(full.begin(), full.end(), h.begin());
    } else {
      for (float& v : h) v = static_cast<float>(rng.normal());
    }
    std::vector<float> y(static_cast<size_t>(kT * cols));
    Timing dense = time_it(
        [&] {
          qcal::sgemm(false, false, kT, cols, n, 1.0f, x.data(), n, h.data(), cols, 0.0f, y.data(),
                      cols);
        },
        min_seconds);
    // Where Hn is the true matrix, the two must agree (fp32).
    double err = 0.0;
    if (cols == n) {
      for (size_t i = 0; i < y.size(); ++i)
        err = std::max(err, static_cast<double>(std::fabs(y[i] - work[i])));
    }
    char note[64];
    if (cols == n)
      std::snprintf(note, sizeof note, "%.1e", err);
    else
      std::snprintf(note, sizeof note, "(dense scaled from %lld columns)",
                    static_cast<long long>(cols));
    const double scale = static_cast<double>(n) / static_cast<double>(cols);
    dense.best *= scale;
    dense.cpu *= scale;
    std::printf("%-6lld %-5lld %-5lld %-34s %10.3f %9.3f %10.2f %9.2f %7.1fx  %s\n",
                static_cast<long long>(n), static_cast<long long>(plan->K),
                static_cast<long long>(plan->P), plan->construction.c_str(), fast.best * 1e3,
                fast.cpu * 1e3, dense.best * 1e3, dense.cpu * 1e3, dense.cpu / fast.cpu, note);
  }
  return 0;
}

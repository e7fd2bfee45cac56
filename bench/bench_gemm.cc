// OpenBLAS sgemm throughput on the shapes that dominate calibration: the
// square 4096³ ceiling and the Linear forms Y(T,O) = X(T,I)·W(O,I)ᵀ of a
// 7B-class block at T = 256 tokens. Prints one table row per shape; the
// thread count is QCAL_THREADS / OPENBLAS_NUM_THREADS or all cores.
//
// Usage: bench_gemm [min_seconds_per_shape = 1.0]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"

namespace {

struct Shape {
  const char* name;
  bool trans_b;
  int64_t M, N, K;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  const double min_seconds = argc > 1 ? std::atof(argv[1]) : 1.0;
  const Shape shapes[] = {
      {"square 4096^3 (NN)", false, 4096, 4096, 4096},
      {"linear T=256 4096->4096 (q/o)", true, 256, 4096, 4096},
      {"linear T=256 4096->11008 (gate/up)", true, 256, 11008, 4096},
      {"linear T=256 11008->4096 (down)", true, 256, 4096, 11008},
  };
  std::printf("OpenBLAS sgemm, %d thread(s), >= %.1f s per shape\n", qcal::blas_threads(),
              min_seconds);
  std::printf("%-36s %6s %6s %6s %6s %10s %10s\n", "shape", "M", "N", "K", "reps", "best GF/s",
              "mean GF/s");
  qcal::Rng rng(1);
  for (const Shape& s : shapes) {
    std::vector<float> A(static_cast<size_t>(s.M * s.K)), B(static_cast<size_t>(s.K * s.N)),
        C(static_cast<size_t>(s.M * s.N));
    for (float& x : A) x = static_cast<float>(rng.uniform() - 0.5);
    for (float& x : B) x = static_cast<float>(rng.uniform() - 0.5);
    const int64_t ldb = s.trans_b ? s.K : s.N;
    auto run = [&] {
      qcal::sgemm(false, s.trans_b, s.M, s.N, s.K, 1.0f, A.data(), s.K, B.data(), ldb, 0.0f,
                  C.data(), s.N);
    };
    run();  // warm-up: thread pool start, page faults
    const double flop = 2.0 * static_cast<double>(s.M) * s.N * s.K;
    double best = 1e30, total = 0.0;
    int reps = 0;
    while (reps < 2 || total < min_seconds) {
      const double t0 = now();
      run();
      const double dt = now() - t0;
      best = std::min(best, dt);
      total += dt;
      ++reps;
    }
    std::printf("%-36s %6lld %6lld %6lld %6d %10.1f %10.1f\n", s.name, static_cast<long long>(s.M),
                static_cast<long long>(s.N), static_cast<long long>(s.K), reps, flop / best * 1e-9,
                flop * reps / total * 1e-9);
  }
  return 0;
}

// Integer GEMM (kernels/qgemm.h) against OpenBLAS sgemm on the Linear shape
// Y(T,O) = X(T,I)·W(O,I)ᵀ with T = 512, I = O = 4096: one row per kernel
// (every integer kernel this CPU runs, int4 and int8 weights, per channel and
// group 128), plus the steps that precede qgemm at inference: per-token
// activation quantization and (for down_proj) the online Hadamard transform.
// GOP/s counts 2·T·I·O operations: "GOP/s" over the best wall time, "cpu" over
// the least process CPU time (steadier on a shared machine; with N threads it
// is per core-second). Threads: QCAL_THREADS / OPENBLAS_NUM_THREADS or all cores.
//
// Usage: bench_qgemm [min_seconds_per_row = 0.5]
#include <stdlib.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/hadamard.h"
#include "kernels/qgemm.h"

namespace {

constexpr int64_t kT = 512, kI = 4096, kO = 4096;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Timing {
  double best, mean, cpu;  // seconds: best wall, mean wall, least CPU
};

// Over at least 2 runs and min_seconds, after a warm-up.
Timing time_it(const std::function<void()>& fn, double min_seconds) {
  fn();
  Timing t{1e30, 0.0, 1e30};
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
  t.mean = total / reps;
  return t;
}

void row(const char* name, const std::string& isa, const Timing& t, const Timing& sgemm) {
  const double ops = 2.0 * kT * kI * kO;
  std::printf("%-30s %-11s %8.2f %8.1f %8.1f %8.1f %7.2fx %7.2fx\n", name, isa.c_str(),
              t.best * 1e3, ops / t.best * 1e-9, ops / t.mean * 1e-9, ops / t.cpu * 1e-9,
              sgemm.best / t.best, sgemm.cpu / t.cpu);
}

}  // namespace

int main(int argc, char** argv) {
  const double min_seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
  qcal::Rng rng(1);
  std::vector<float> x(static_cast<size_t>(kT * kI)), w(static_cast<size_t>(kO * kI)),
      y(static_cast<size_t>(kT * kO));
  for (float& v : x) v = static_cast<float>(rng.normal());
  for (float& v : w) v = static_cast<float>(rng.normal());

  std::printf("Linear T=%lld I=%lld O=%lld, %d thread(s), >= %.1f s per row\n",
              static_cast<long long>(kT), static_cast<long long>(kI), static_cast<long long>(kO),
              qcal::blas_threads(), min_seconds);
  std::printf("%-30s %-11s %8s %8s %8s %8s %8s %8s\n", "kernel", "isa", "best ms", "GOP/s", "mean",
              "cpu", "x sgemm", "x (cpu)");

  const auto ts =
      time_it([&] { qcal::linear_forward(y.data(), x.data(), w.data(), nullptr, kT, kI, kO); },
              min_seconds);
  row("sgemm fp32 (OpenBLAS)", "blas", ts, ts);

  std::vector<int8_t> xq(x.size());
  std::vector<float> sx(static_cast<size_t>(kT));
  const auto tq =
      time_it([&] { qcal::quantize_act_sym(x.data(), kT, kI, 4, 1.0f, -1, xq.data(), sx.data()); },
              min_seconds);
  std::printf("%-30s %-11s %8.2f\n", "quantize_act_sym W4 per token", "-", tq.best * 1e3);

  // The online Hadamard that precedes down_proj's qgemm (LLaMA-2-7B, n = 11008 = 172·64).
  {
    std::vector<float> h(static_cast<size_t>(kT * 11008));
    for (float& v : h) v = static_cast<float>(rng.normal());
    const Timing th = time_it([&] { qcal::hadamard_transform(h.data(), kT, 11008); }, min_seconds);
    std::printf("%-30s %-11s %8.2f\n", "hadamard_transform n=11008", "-", th.best * 1e3);
  }

  for (int bits : {4, 8}) {
    qcal::quantize_act_sym(x.data(), kT, kI, bits, 1.0f, -1, xq.data(), sx.data());
    for (int64_t group : {int64_t{-1}, int64_t{128}}) {
      const int64_t G = group > 0 ? kI / group : 1;
      std::vector<int8_t> wq(w.size());
      std::vector<float> sw(static_cast<size_t>(kO * G));
      qcal::quantize_act_sym(w.data(), kO, kI, bits, 1.0f, group, wq.data(), sw.data());
      const qcal::PackedWeight pw = qcal::pack_weight(wq.data(), sw.data(), kO, kI, bits, group);
      for (const char* isa : {"avx512vnni", "avx2", "sse2"}) {
        ::setenv("QCAL_QGEMM_ISA", isa, 1);
        if (std::string(qcal::qgemm_isa()) != isa) continue;  // not on this CPU
        const auto t = time_it(
            [&] { qcal::qgemm(xq.data(), sx.data(), kT, pw, nullptr, y.data()); }, min_seconds);
        const std::string name = "qgemm W" + std::to_string(bits) + "A" + std::to_string(bits) +
                                 (group > 0 ? " g128" : " per-channel");
        row(name.c_str(), isa, t, ts);
      }
      ::unsetenv("QCAL_QGEMM_ISA");
    }
  }
  return 0;
}

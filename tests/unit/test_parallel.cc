// labels: unit
// The pool (kernels/parallel.h) and the paneled BLAS calls on it
// (kernels/gemm.h), at two threads whatever QCAL_THREADS says: every index
// runs exactly once, from concurrent and nested callers; sgemm / dgemm /
// ssyrk_lower_tn against fp64 references, |got − ref| ≤ atol + rtol·|ref|
// (NaN fails), padding and the upper triangle untouched; OpenBLAS itself
// single-threaded. (That results do not depend on the thread count is checked
// end to end: tests/e2e/cli.sh quantizes at 1 and 2 threads and compares.)
#include <cblas.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

namespace qcal {
namespace {

// Before the first blas_threads() call (a function-local static): two threads.
const bool kTwoThreads = [] { return setenv("QCAL_THREADS", "2", 1) == 0; }();

template <typename T>
std::vector<T> random_vec(size_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<T> v(n);
  for (T& x : v) x = static_cast<T>(rng.normal());
  return v;
}

// max |got − ref| / (atol + rtol·|ref|) over all entries; NaN gives +inf.
template <typename G>
double budget_share(const std::vector<G>& got, const std::vector<double>& ref, double atol,
                    double rtol) {
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (std::isnan(g) || std::isnan(ref[i])) return INFINITY;
    worst = std::max(worst, std::fabs(g - ref[i]) / (atol + rtol * std::fabs(ref[i])));
  }
  return worst;
}

TEST(Pool, TwoThreads) {
  ASSERT_TRUE(kTwoThreads);
  EXPECT_EQ(blas_threads(), 2);
  EXPECT_EQ(openblas_get_num_threads(), 1) << "OpenBLAS must run single-threaded (gemm.h)";
}

TEST(Pool, EveryIndexOnce) {
  for (int64_t n : {1, 2, 7, 100, 1000, 100000}) {
    for (int64_t cost : {1, 100, 1 << 20}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      for (auto& h : hits) h = 0;
      parallel_for(n, cost, [&](int64_t b, int64_t e) {
        ASSERT_LE(0, b);
        ASSERT_LT(b, e);
        ASSERT_LE(e, n);
        for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
      });
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1)
            << "n=" << n << " cost=" << cost << " i=" << i;
    }
  }
  parallel_for(0, 1, [](int64_t, int64_t) { FAIL() << "called for an empty range"; });
}

// Concurrent callers (one gets the pool, the others run inline) and nested
// calls (inline), many small jobs in a row: each index once per job.
TEST(Pool, ConcurrentAndNestedCallers) {
  constexpr int kCallers = 4, kJobs = 200;
  constexpr int64_t kN = 4096;
  std::vector<std::thread> callers;
  std::atomic<int64_t> bad{0};
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&] {
      std::vector<std::atomic<int>> hits(kN);
      for (int j = 0; j < kJobs; ++j) {
        for (auto& h : hits) h = 0;
        parallel_for(64, kN, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i)
            parallel_for(kN / 64, 1 << 16, [&](int64_t b2, int64_t e2) {
              for (int64_t k = b2; k < e2; ++k) hits[static_cast<size_t>(i * (kN / 64) + k)]++;
            });
        });
        for (auto& h : hits) bad += h.load() != 1;
      }
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(bad.load(), 0);
}

struct GemmCase {
  bool ta, tb;
  int64_t M, N, K;
};

// Shapes cut by rows (M ≥ N) and by columns, not multiples of the panel size.
const std::vector<GemmCase> kCases = {
    {false, true, 1000, 300, 200}, {false, false, 300, 1000, 200}, {true, false, 777, 130, 150},
    {true, true, 130, 777, 150},   {false, true, 4096, 512, 64},   {false, false, 64, 64, 4000},
};

template <typename T>
void check_gemm(const GemmCase& c, double atol, double rtol) {
  const int64_t lda = (c.ta ? c.M : c.K) + 3, ldb = (c.tb ? c.K : c.N) + 5, ldc = c.N + 7;
  const auto A = random_vec<T>(static_cast<size_t>((c.ta ? c.K : c.M) * lda), 1);
  const auto B = random_vec<T>(static_cast<size_t>((c.tb ? c.N : c.K) * ldb), 2);
  const auto C0 = random_vec<T>(static_cast<size_t>(c.M * ldc), 3);
  const T alpha = static_cast<T>(0.75), beta = static_cast<T>(-0.5);
  std::vector<T> got = C0;
  if constexpr (std::is_same_v<T, float>) {
    sgemm(c.ta, c.tb, c.M, c.N, c.K, alpha, A.data(), lda, B.data(), ldb, beta, got.data(), ldc);
  } else {
    dgemm(c.ta, c.tb, c.M, c.N, c.K, alpha, A.data(), lda, B.data(), ldb, beta, got.data(), ldc);
  }
  std::vector<double> ref(C0.size());
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < ldc; ++n) {
      const size_t at = static_cast<size_t>(m * ldc + n);
      if (n >= c.N) {  // padding: untouched
        ref[at] = static_cast<double>(C0[at]);
        continue;
      }
      double acc = 0;
      for (int64_t k = 0; k < c.K; ++k)
        acc += static_cast<double>(c.ta ? A[k * lda + m] : A[m * lda + k]) *
               static_cast<double>(c.tb ? B[n * ldb + k] : B[k * ldb + n]);
      ref[at] = alpha * acc + beta * static_cast<double>(C0[at]);
    }
  const std::string what = std::string(sizeof(T) == 4 ? "sgemm " : "dgemm ") + (c.ta ? "T" : "N") +
                           (c.tb ? "T " : "N ") + std::to_string(c.M) + "x" + std::to_string(c.N) +
                           "x" + std::to_string(c.K);
  const double share = budget_share(got, ref, atol, rtol);
  EXPECT_LE(share, 1.0) << what << ": " << share << " of the tolerance budget";
}

TEST(PanelGemm, SgemmMatchesRef) {
  for (const auto& c : kCases) check_gemm<float>(c, 1e-4, 1e-4);
}

TEST(PanelGemm, DgemmMatchesRef) {
  for (const auto& c : kCases) check_gemm<double>(c, 1e-11, 1e-11);
}

TEST(PanelGemm, SsyrkLowerMatchesRefUpperUntouched) {
  for (int64_t n : {1, 50, 300, 1000}) {
    const int64_t k = 257, ldx = n + 3, ldc = n + 2;
    const auto X = random_vec<float>(static_cast<size_t>(k * ldx), 4);
    auto C = random_vec<float>(static_cast<size_t>(n * ldc), 5);
    const std::vector<float> C0 = C;
    const float alpha = 2.0f, beta = 0.5f;
    ssyrk_lower_tn(n, k, alpha, X.data(), ldx, beta, C.data(), ldc);
    std::vector<double> ref(C.size());
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < ldc; ++c) {
        const size_t at = static_cast<size_t>(r * ldc + c);
        if (c > r) {  // strict upper and padding: untouched
          ref[at] = C0[at];
          continue;
        }
        double acc = 0;
        for (int64_t t = 0; t < k; ++t)
          acc += static_cast<double>(X[t * ldx + r]) * static_cast<double>(X[t * ldx + c]);
        ref[at] = alpha * acc + beta * static_cast<double>(C0[at]);
      }
    const double share = budget_share(C, ref, 1e-3, 1e-4);
    EXPECT_LE(share, 1.0) << "n=" << n << ": " << share << " of the tolerance budget";
    int64_t touched = 0;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = r + 1; c < ldc; ++c)
        touched += C[static_cast<size_t>(r * ldc + c)] != C0[static_cast<size_t>(r * ldc + c)];
    EXPECT_EQ(touched, 0) << "n=" << n << ": entries above the diagonal changed";
  }
}

}  // namespace
}  // namespace qcal

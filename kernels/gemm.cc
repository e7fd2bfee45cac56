#include "kernels/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <vector>

#include "kernels/parallel.h"

namespace qcal {

namespace {

int init_threads() {
  int n = 0;
  if (const char* e = std::getenv("QCAL_THREADS")) n = std::atoi(e);
  if (n <= 0) {
    if (const char* e = std::getenv("OPENBLAS_NUM_THREADS")) n = std::atoi(e);
  }
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  // Our pool runs the threads; every BLAS call is single-threaded (gemm.h).
  openblas_set_num_threads(1);
  return n;
}

// A panel is at least this many rows (or columns) of C and this many flops:
// ~0.1 ms of one core, long enough to amortize handing it to a pool thread.
constexpr int64_t kMinPanel = 64;
constexpr double kMinPanelFlops = 4e6;
constexpr int64_t kMaxPanels = 64;

// How many panels `dim` rows (or columns) of a `flops` product are cut into.
int64_t panel_count(int64_t dim, double flops) {
  const double by_flops = flops / kMinPanelFlops;
  int64_t p = std::min<int64_t>(dim / kMinPanel,
                                by_flops < 1e9 ? static_cast<int64_t>(by_flops) : kMaxPanels);
  return std::clamp<int64_t>(p, 1, kMaxPanels);
}

// Where panel i of p over [0, dim) begins: a multiple of kMinPanel (p ≤ dim /
// kMinPanel keeps the panels non-empty), so that panels start on a multiple
// of every unroll width and rows and columns meet the micro-kernel they would
// meet in one call over all of C (for sgemm that keeps the results bitwise the
// same; dgemm's small-matrix kernels may round differently).
int64_t panel_begin(int64_t i, int64_t p, int64_t dim) {
  return i == p ? dim : dim * i / p / kMinPanel * kMinPanel;
}

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
              static_cast<blasint>(ldc));
}

void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
               int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
              static_cast<blasint>(ldc));
}

// C = alpha op(A) op(B) + beta C as panels of C's longer side on the pool.
template <typename T>
void gemm_panels(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                 int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  (void)blas_threads();
  const double flops =
      2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const bool by_rows = M >= N;
  const int64_t dim = by_rows ? M : N;
  const int64_t p = panel_count(dim, flops);
  if (p == 1) {
    blas_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const int64_t panel_flops = static_cast<int64_t>(flops / static_cast<double>(p));
  parallel_for(p, panel_flops, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = panel_begin(i, p, dim), e = panel_begin(i + 1, p, dim);
      if (by_rows) {  // rows b..e of op(A) and C
        const T* a = ta ? A + b : A + b * lda;
        blas_gemm(ta, tb, e - b, N, K, alpha, a, lda, B, ldb, beta, C + b * ldc, ldc);
      } else {  // columns b..e of op(B) and C
        const T* bp = tb ? B + b * ldb : B + b;
        blas_gemm(ta, tb, M, e - b, K, alpha, A, lda, bp, ldb, beta, C + b, ldc);
      }
    }
  });
}

}  // namespace

int blas_threads() {
  static const int n = init_threads();
  return n;
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_panels(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
           const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
           int64_t ldc) {
  gemm_panels(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void ssyrk_lower_tn(int64_t n, int64_t k, float alpha, const float* X, int64_t ldx, float beta,
                    float* C, int64_t ldc) {
  if (n <= 0) return;
  (void)blas_threads();
  const double flops = static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(k);
  const int64_t p = panel_count(n, flops);
  // Rows b..e of C: C[b:e, 0:b] by sgemm, the diagonal block C[b:e, b:e] by ssyrk.
  // Later panels hold more of the triangle; the pool balances them.
  parallel_for(
      p, static_cast<int64_t>(flops / static_cast<double>(p)), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = panel_begin(i, p, n), e = panel_begin(i + 1, p, n);
          if (b > 0)
            blas_gemm(true, false, e - b, b, k, alpha, X + b, ldx, X, ldx, beta, C + b * ldc, ldc);
          cblas_ssyrk(CblasRowMajor, CblasLower, CblasTrans, static_cast<blasint>(e - b),
                      static_cast<blasint>(k), alpha, X + b, static_cast<blasint>(ldx), beta,
                      C + b * ldc + b, static_cast<blasint>(ldc));
        }
      });
}

void sgemm_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
               int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        double a = trans_a ? A[k * lda + m] : A[m * lda + k];
        double b = trans_b ? B[n * ldb + k] : B[k * ldb + n];
        acc += a * b;
      }
      double c = beta == 0.0f ? 0.0 : static_cast<double>(beta) * C[m * ldc + n];
      C[m * ldc + n] = static_cast<float>(alpha * acc + c);
    }
  }
}

void linear_forward(float* Y, const float* X, const float* W, const float* bias, int64_t T,
                    int64_t I, int64_t O) {
  if (bias) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < O; ++o) Y[t * O + o] = bias[o];
  }
  sgemm(false, true, T, O, I, 1.0f, X, I, W, I, bias ? 1.0f : 0.0f, Y, O);
}

}  // namespace qcal

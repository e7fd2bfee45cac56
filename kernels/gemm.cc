#include "kernels/gemm.h"

#include <cblas.h>

#include <cstdlib>
#include <thread>
#include <vector>

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
  openblas_set_num_threads(n);
  return n;
}
}  // namespace

int blas_threads() {
  static const int n = init_threads();
  return n;
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc) {
  if (M == 0 || N == 0) return;
  (void)blas_threads();
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(M),
              static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
              static_cast<blasint>(ldc));
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

// Single-precision GEMM, row-major:  C(M,N) = alpha * op(A) op(B) + beta * C
// with op(A) (M,K) = A or Aᵀ, op(B) (K,N) = B or Bᵀ. `lda/ldb/ldc` are the row
// strides of the stored matrices. The fast path is OpenBLAS (multithreaded,
// no TF32-like shortcuts); `sgemm_ref` is the scalar reference it is tested
// against (fp64 accumulation).
#pragma once

#include <cstdint>

namespace qcal {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc);
void sgemm_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
               int64_t ldc);

// The Linear layer form: Y(T,O) = X(T,I) · W(O,I)ᵀ (+ bias(O) if non-null).
void linear_forward(float* Y, const float* X, const float* W, const float* bias, int64_t T,
                    int64_t I, int64_t O);

// Number of threads the BLAS uses (QCAL_THREADS or OPENBLAS_NUM_THREADS, else all cores).
int blas_threads();

}  // namespace qcal

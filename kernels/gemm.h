// Single-precision GEMM, row-major:  C(M,N) = alpha * op(A) op(B) + beta * C
// with op(A) (M,K) = A or Aᵀ, op(B) (K,N) = B or Bᵀ. `lda/ldb/ldc` are the row
// strides of the stored matrices. The fast path is OpenBLAS (no TF32-like
// shortcuts); `sgemm_ref` is the scalar reference it is tested against (fp64
// accumulation).
//
// Threads (issue #14, "fair to neighbours"): OpenBLAS runs single-threaded
// (its pthread workers spin-wait between calls and split each call statically,
// which on a busy machine turns every call into a wait for the slowest
// thread). The parallel GEMMs here cut C into panels along its longer side and
// run one single-threaded BLAS call per panel on the blocking pool of
// kernels/parallel.h, which hands out panels dynamically. The panels depend
// on the shape only, so the result does not depend on the thread count (but
// may differ in the last bits from one BLAS call over all of C, where OpenBLAS
// picks a kernel by size).
// Call from any thread; inside a parallel_for body the panels run inline.
#pragma once

#include <cstdint>

namespace qcal {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void sgemm_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
               int64_t ldc);
// The same in fp64 (cblas_dgemm per panel).
void dgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
           const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
           int64_t ldc);

// The lower triangle (diagonal included) of C(n,n) = alpha * Xᵀ X + beta * C for
// X (k, n) with row stride ldx; the strict upper triangle of C is not touched.
// Panels of rows of C: an sgemm left of the diagonal block, an ssyrk on it.
void ssyrk_lower_tn(int64_t n, int64_t k, float alpha, const float* X, int64_t ldx, float beta,
                    float* C, int64_t ldc);

// The Linear layer form: Y(T,O) = X(T,I) · W(O,I)ᵀ (+ bias(O) if non-null).
void linear_forward(float* Y, const float* X, const float* W, const float* bias, int64_t T,
                    int64_t I, int64_t O);

// Number of compute threads: QCAL_THREADS, else OPENBLAS_NUM_THREADS, else all
// cores. The first call also sets OpenBLAS to one thread (see the top); call it
// before any direct BLAS or LAPACK call.
int blas_threads();

}  // namespace qcal

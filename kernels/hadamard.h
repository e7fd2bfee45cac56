// Walsh–Hadamard transforms for every size of real models (methods.md §3.4):
// n = K·2^m with K from the ordered list 172, 156, 140, 108, 60, 52, 36, 28, 40,
// 20, 12 (first K with n % K == 0 and n/K a power of two), else K = 1.
//
// The operator on a row x of length n (QuaRot's matmul_hadU):
//   view x as M (K, 2^m) row-major; FWHT every row of M (unnormalized Sylvester);
//   M ← hadK · M; multiply by 1/sqrt(n).
// i.e. y = x (hadK ⊗ H_{2^m})ᵀ / sqrt(n), an orthogonal map, so the same operator
// on weight rows (W ← W (hadK ⊗ H)ᵀ/√n) keeps x Wᵀ invariant.
// The K×K ±1 matrices are constructed (Paley I/II, Sylvester doubling) or read from
// the published tables (Williamson orders 156 and 172); each satisfies
// hadK·hadKᵀ = K·I, which the tests check.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"

namespace qcal {

// The K of n's decomposition (1 for powers of two). kInvalidInput if none fits.
Result<int64_t> hadamard_k(int64_t n);
// The K×K ±1 matrix (row-major) used for K (K = 1: [1]). Aborts on an unsupported K.
const std::vector<int8_t>& hadamard_table(int64_t K);

// In place on x (rows, n): x ← x (hadK ⊗ H)ᵀ/√n. n must have a decomposition
// (check with hadamard_k first; aborts otherwise). Multithreaded over rows.
void hadamard_transform(float* x, int64_t rows, int64_t n);
void hadamard_transform(double* x, int64_t rows, int64_t n);
// Scalar reference: explicit dense matrix product with the same matrix, fp64.
void hadamard_transform_ref(double* x, int64_t rows, int64_t n);
// The dense orthogonal matrix Hn (n×n, fp64) with hadamard_transform(x) == x·Hn.
std::vector<double> hadamard_matrix(int64_t n);
// QuaRot's random Hadamard: D·Hn with D a random ±1 diagonal (so x·(D Hn)), seeded.
std::vector<double> random_hadamard_matrix(int64_t n, uint64_t seed);

// The same operator as a Kronecker pair for kron_fwd (kernels/grad.h):
// x·Hn == kron(x; L, R) with L = hadKᵀ/√K (K×K), R = H_{2^m}ᵀ/√2^m.
void hadamard_kron_factors(int64_t n, std::vector<double>* L, std::vector<double>* R);

}  // namespace qcal

// Walsh–Hadamard transforms for every size of real models (methods.md §3.4),
// and an orthogonal fallback as cheap online where no Hadamard matrix of the
// size is known to the code.
//
// The operator on a row x of length n. Every n > 0 gets a plan n = K·P with
// P = 2^p and a K×K real "mixing" matrix G with G·Gᵀ = K·I; then
//   view x as M (K, P) row-major; FWHT every row of M (unnormalized Sylvester);
//   M ← G · M; multiply by 1/sqrt(n),
// i.e. y = x (G ⊗ H_P)ᵀ / sqrt(n), an orthogonal map, so the same operator on
// weight rows (W ← W (G ⊗ H_P)ᵀ/√n) keeps x Wᵀ invariant. All functions below
// (fast, reference, dense, random, Kronecker pair) use this one operator.
//
// Which G (the plan), in order:
//  1. QuaRot's choice (methods.md §3.4): the first K of 172, 156, 140, 108, 60,
//     52, 36, 28, 40, 20, 12 dividing n, if n/K is a power of two; else K = 1 if
//     n is one. G = hadK, the ±1 table. Every size that worked before this
//     search existed keeps its matrix bit for bit (5120 keeps K = 40).
//  2. Otherwise the smallest constructible Hadamard order K = o·2^a (o the odd
//     part of n, a ≥ 2; so P = n/K is the largest power of two possible).
//     Constructions, in order: Paley I (order q+1, q ≡ 3 mod 4 a prime power),
//     Paley II (order 2(q+1), q ≡ 1 mod 4 a prime power), Williamson arrays from
//     published first rows (orders 92, 116, 156, 172), Kronecker products of
//     constructible orders. G = hadK.
//  3. Otherwise (no Hadamard matrix of order o·2^a, a ≤ log2(n/o), is known to
//     the code; always the case for n ≢ 0 mod 4 with o > 1) the fallback: split
//     o = m·o1 with m > 1 as small as possible such that h = o1·2^e (2^e the
//     power of two in n) has a Hadamard plan (K_h, P_h) by 1–2 and
//     K = m·K_h ≤ kHadamardMaxK; then G = C_m ⊗ hadK_h, P = P_h, with C_m the
//     unnormalized Hartley matrix (C_m)_ab = cos(2πab/m) + sin(2πab/m),
//     symmetric, C_m·C_m = m·I, entries in [−√2, √2]. So the operator is
//     x·(C_m/√m ⊗ Ĥ_h) with Ĥ_h the normalized Hadamard operator of order h:
//     the largest Hadamard factor the size allows times a small deterministic
//     orthogonal matrix whose entries are at most √2 times the Hadamard's
//     1/√m (so outliers stay spread). Online it costs the same as a Hadamard of
//     that K (FWHT + one K×K mix). Example: 14 = 7·2 (Qwen2-0.5B's 14 heads):
//     G = C_7, P = 2.
//  Sizes whose fallback would need K > kHadamardMaxK (odd parts beyond it with
//  no construction) have no plan: kInvalidInput.
//
// Thread safety: every function may be called from any thread. The ±1 tables
// are built once per order on first use and kept for the process's lifetime;
// each size's G is built once and kept in a small cache (64 sizes, then
// cleared); both guarded internally.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/hadamard_plan.h"
#include "common/status.h"

namespace qcal {

// The K×K ±1 Hadamard matrix (row-major) the code builds for order K (K = 1:
// [1]; K = 2: Sylvester). Aborts on an order it cannot construct (check with
// hadamard_plan, common/hadamard_plan.h, first). The reference stays valid for the process's lifetime.
const std::vector<int8_t>& hadamard_table(int64_t K);
// The Paley matrices themselves over GF(q), q = p^k a prime power (exposed for
// tests and tools): kind 1 needs q ≡ 3 mod 4 (order q+1, H = I + S with S the
// skew Jacobsthal core), kind 2 needs q ≡ 1 mod 4 (order 2(q+1)). kInvalidInput
// if q does not qualify or the order exceeds kHadamardMaxK.
Result<std::vector<int8_t>> paley_hadamard(int kind, int64_t q);

// In place on x (rows, n): x ← x (G ⊗ H_P)ᵀ/√n. n must have a plan (check with
// hadamard_plan first; aborts otherwise). Multithreaded over rows.
void hadamard_transform(float* x, int64_t rows, int64_t n);
void hadamard_transform(double* x, int64_t rows, int64_t n);
// Scalar reference: explicit dense matrix product with the same matrix, fp64.
void hadamard_transform_ref(double* x, int64_t rows, int64_t n);
// The dense orthogonal matrix Hn (n×n, fp64) with hadamard_transform(x) == x·Hn.
std::vector<double> hadamard_matrix(int64_t n);
// QuaRot's random Hadamard: D·Hn with D a random ±1 diagonal (so x·(D Hn)),
// seeded (the same seed gives the same matrix). Orthogonal for every plan.
std::vector<double> random_hadamard_matrix(int64_t n, uint64_t seed);

// The same operator as a Kronecker pair for kron_fwd (kernels/grad.h) and the
// native format's online transforms: x·Hn == kron(x; L, R) with L = Gᵀ/√K
// (K×K) and R = H_P/√P (P×P; H_P is symmetric). Both orthogonal; ±1/√K
// entries only when the plan is a Hadamard.
void hadamard_kron_factors(int64_t n, std::vector<double>* L, std::vector<double>* R);

}  // namespace qcal

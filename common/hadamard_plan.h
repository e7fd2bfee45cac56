// Which orthogonal transform of size n the rotations use (kernels/hadamard.h has
// the matrices and the transforms): the plan n = K·P and how its K×K Hadamard
// factor is constructed. Pure integer arithmetic, so the recipe checks (and
// the coordinator, which links no numerics) refuse exactly the sizes the
// workers cannot transform. The rule is described at the top of
// kernels/hadamard.h.
//
// Thread safety: every function may be called from any thread (the
// constructions found are memoized behind a mutex).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/status.h"

namespace qcal {

// The largest mixing factor K a plan may use (K² multiply-adds per K·P block).
inline constexpr int64_t kHadamardMaxK = 2048;

// How the operator of size n is built (see the top of this file).
struct HadamardPlan {
  int64_t n = 0;
  int64_t K = 1;   // side of G
  int64_t P = 1;   // Sylvester part, a power of two; n = K·P
  int64_t m = 1;   // Hartley order: 1 for a true Hadamard, > 1 for the fallback
  int64_t kh = 1;  // the Hadamard order inside G: K = m·kh (G = C_m ⊗ hadK_h)
  // How hadK_h was built, e.g. "sylvester", "paley1(q=43)", "paley2(q=5^2)",
  // "williamson(t=39)", "kron(2, paley1(q=19))"; the fallback prefixes
  // "hartley(m) ⊗ ".
  std::string construction;
  bool hadamard() const { return m == 1; }
};

// The plan for n. kInvalidInput for n ≤ 0 and for sizes with no plan (above).
Result<HadamardPlan> hadamard_plan(int64_t n);
// The K of n's plan (1 for powers of two); the same errors as hadamard_plan.
Result<int64_t> hadamard_k(int64_t n);
// How the code builds a ±1 Hadamard matrix of order K: Sylvester (K ≤ 2), Paley I
// over GF(a) (order a+1), Paley II over GF(a) (order 2(a+1)), a Williamson array of
// circulants of order a (order 4a), or the Kronecker product of orders a and b.
struct HadamardConstruction {
  enum Kind { kSylvester, kPaley1, kPaley2, kWilliamson, kKron } kind = kSylvester;
  int64_t a = 0, b = 0;
};
// The construction of order K, or nullopt when the code knows none (K > kHadamardMaxK,
// K > 2 not a multiple of 4, or no construction below applies).
std::optional<HadamardConstruction> hadamard_construction(int64_t K);
// Its name: "sylvester", "paley1(q=43)", "paley2(q=5^2)", "williamson(t=39)",
// "kron(2, paley1(q=19))"; "none" without one.
std::string hadamard_construction_name(int64_t K);
// The Williamson orders t with published first rows in kernels/hadamard.cc.
inline constexpr int64_t kWilliamsonOrders[] = {23, 29, 39, 43};

// q = p^k with p prime, k ≥ 1 (*p, *k set); false otherwise.
bool prime_power(int64_t q, int64_t* p, int* k);
// Whether Paley I (kind 1: q ≡ 3 mod 4) or II (kind 2: q ≡ 1 mod 4) applies to q.
bool paley_q_ok(int kind, int64_t q);

}  // namespace qcal

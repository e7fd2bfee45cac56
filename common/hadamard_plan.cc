// The size rule of the rotations' orthogonal transforms (common/hadamard_plan.h;
// the rule itself is described at the top of kernels/hadamard.h).
#include "common/hadamard_plan.h"

#include <bit>
#include <map>
#include <mutex>

namespace qcal {
namespace {

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

std::string q_name(int64_t q) {
  int64_t p;
  int k;
  if (prime_power(q, &p, &k) && k > 1) return std::to_string(p) + "^" + std::to_string(k);
  return std::to_string(q);
}

using C = HadamardConstruction;

// QuaRot's orders with the constructions they have always had here.
std::optional<C> legacy_construction(int64_t K) {
  switch (K) {
    case 12: return C{C::kPaley1, 11};
    case 20: return C{C::kPaley1, 19};
    case 28: return C{C::kPaley2, 13};
    case 36: return C{C::kPaley2, 17};
    case 40: return C{C::kKron, 2, 20};
    case 52: return C{C::kPaley2, 25};
    case 60: return C{C::kPaley1, 59};
    case 108: return C{C::kPaley1, 107};
    case 140: return C{C::kPaley1, 139};
    case 156: return C{C::kWilliamson, 39};
    case 172: return C{C::kWilliamson, 43};
    default: return std::nullopt;
  }
}

bool williamson_order(int64_t K) {
  for (int64_t t : kWilliamsonOrders)
    if (4 * t == K) return true;
  return false;
}

// The constructions found so far, by order (never erased).
struct Memo {
  std::mutex mu;
  std::map<int64_t, std::optional<C>> found;  // GUARDED_BY(mu)
};
Memo& memo() {
  static Memo* m = new Memo;  // never destroyed: used from any thread until exit
  return *m;
}

std::optional<C> find_locked(Memo& m, int64_t K) {
  if (K < 1 || K > kHadamardMaxK) return std::nullopt;
  if (auto it = m.found.find(K); it != m.found.end()) return it->second;
  std::optional<C> r;
  if (K <= 2) {
    r = C{C::kSylvester};
  } else if (K % 4 != 0) {
    r = std::nullopt;  // Hadamard orders above 2 are multiples of 4
  } else if (auto l = legacy_construction(K)) {
    r = l;
  } else if (paley_q_ok(1, K - 1)) {
    r = C{C::kPaley1, K - 1};
  } else if (K % 8 == 4 && paley_q_ok(2, K / 2 - 1)) {
    r = C{C::kPaley2, K / 2 - 1};
  } else if (williamson_order(K)) {
    r = C{C::kWilliamson, K / 4};
  } else {
    for (int64_t a = 2; a * a <= K && !r; ++a) {
      if (K % a == 0 && find_locked(m, a) && find_locked(m, K / a)) r = C{C::kKron, a, K / a};
    }
  }
  m.found[K] = r;
  return r;
}

std::string name_locked(Memo& m, int64_t K) {
  const std::optional<C> r = find_locked(m, K);
  if (!r) return "none";
  switch (r->kind) {
    case C::kSylvester: return K == 1 ? "sylvester" : "sylvester(2)";
    case C::kPaley1: return "paley1(q=" + q_name(r->a) + ")";
    case C::kPaley2: return "paley2(q=" + q_name(r->a) + ")";
    case C::kWilliamson: return "williamson(t=" + std::to_string(r->a) + ")";
    case C::kKron: return "kron(" + name_locked(m, r->a) + ", " + name_locked(m, r->b) + ")";
  }
  return "";
}

constexpr int64_t kLegacyOrders[] = {172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12};

// Steps 1–2 of the rule: a plan whose G is a Hadamard table, if any.
std::optional<HadamardPlan> hadamard_only_plan(int64_t n) {
  auto make = [&](int64_t K) {
    HadamardPlan p;
    p.n = n;
    p.K = p.kh = K;
    p.P = n / K;
    return p;
  };
  for (int64_t K : kLegacyOrders) {
    if (n % K == 0) {
      if (is_pow2(n / K)) return make(K);
      break;
    }
  }
  if (is_pow2(n)) return make(1);
  const int e = std::countr_zero(static_cast<uint64_t>(n));
  const int64_t o = n >> e;
  for (int a = 2; a <= e && (o << a) <= kHadamardMaxK; ++a)
    if (hadamard_construction(o << a)) return make(o << a);
  return std::nullopt;
}

}  // namespace

bool prime_power(int64_t q, int64_t* p, int* k) {
  if (q < 2) return false;
  int64_t f = 2;
  while (f * f <= q && q % f != 0) ++f;
  if (q % f != 0) f = q;
  int e = 0;
  for (int64_t v = q; v > 1; v /= f) {
    if (v % f != 0) return false;
    ++e;
  }
  *p = f;
  *k = e;
  return true;
}

bool paley_q_ok(int kind, int64_t q) {
  int64_t p;
  int k;
  return prime_power(q, &p, &k) && q % 4 == (kind == 1 ? 3 : 1);
}

std::optional<HadamardConstruction> hadamard_construction(int64_t K) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  return find_locked(m, K);
}

std::string hadamard_construction_name(int64_t K) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  return name_locked(m, K);
}

Result<HadamardPlan> hadamard_plan(int64_t n) {
  if (n <= 0) return invalid_input("hadamard: size must be positive, got " + std::to_string(n));
  std::optional<HadamardPlan> plan = hadamard_only_plan(n);
  if (!plan) {
    // Step 3: the smallest m > 1 dividing the odd part whose cofactor has a
    // Hadamard plan.
    const int e = std::countr_zero(static_cast<uint64_t>(n));
    const int64_t o = n >> e;
    for (int64_t m = 3; m <= o && m <= kHadamardMaxK && !plan; m += 2) {
      if (o % m != 0) continue;
      std::optional<HadamardPlan> h = hadamard_only_plan(n / m);
      if (!h || m * h->K > kHadamardMaxK) continue;
      plan = h;
      plan->n = n;
      plan->m = m;
      plan->K = m * h->K;
    }
    if (!plan) {
      return invalid_input("hadamard: size " + std::to_string(n) + " = " + std::to_string(o) +
                           "·2^" + std::to_string(e) +
                           " has no orthogonal transform: no Hadamard order divides it with a "
                           "cofactor small enough for the fallback (mixing factor ≤ " +
                           std::to_string(kHadamardMaxK) + ")");
    }
  }
  plan->construction = hadamard_construction_name(plan->kh);
  if (!plan->hadamard())
    plan->construction = "hartley(" + std::to_string(plan->m) + ") ⊗ " + plan->construction;
  return *plan;
}

Result<int64_t> hadamard_k(int64_t n) {
  QCAL_ASSIGN_OR_RETURN(HadamardPlan p, hadamard_plan(n));
  return p.K;
}

}  // namespace qcal

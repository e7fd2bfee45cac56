// Walsh–Hadamard transforms and their fallback (kernels/hadamard.h, methods.md
// §3.4). Letters: n = K·P the row length, P = 2^p the Sylvester part, K the side
// of the mixing matrix G, o the odd part of n, q = p^k a prime power.
//
// The ±1 tables are built here, not stored, wherever a classical construction
// exists:
//   Paley I  (q ≡ 3 mod 4, order q+1), e.g. 12 (q=11), 20 (19), 44 (43), 60 (59);
//   Paley II (q ≡ 1 mod 4, order 2(q+1)), e.g. 28 (q=13), 36 (17), 52 (GF(5²)),
//     76 (37), 148 (73), 924 (461);
//   Kronecker products, e.g. 40 = 2×20;
//   Williamson arrays of four symmetric circulants A, B, C, D of order t from
//   published first rows: t = 23, 29, 43 from M. Hall, Combinatorial Theory
//   (1983), t = 39 from S. London, PhD thesis (2013); all as listed in SageMath's
//   williamson_type_quadruples_smallcases. Only the ±1 patterns are
//   data; the tests check every table is Hadamard.
// QuaRot's orders (12 … 172) keep the constructions they always had (28 is
// Paley II over GF(13) although Paley I over GF(27) also exists).
//
// The fast transform runs the unnormalized FWHT on every length-P segment
// (threads over rows), then the G mix: an add/subtract loop for small ±1
// tables, one BLAS GEMM per block of rows for K ≥ 28 and for every fallback.
#include "kernels/hadamard.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numbers>
#include <optional>
#include <string>

#include "common/hadamard_plan.h"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

namespace qcal {
namespace {

// GF(q), q = p^k: GF(p)[x]/(f) with f monic irreducible of degree k. Element
// index e = Σ c_i p^i for the residue Σ c_i x^i. f is the first irreducible in
// the order x^k − 1, x^k − 2, …, x^k − p (= x^k), then with c_1 = 1, … (c_i the
// base-p digits of the candidate's number), so GF(p²) is GF(p)[√r] with r the
// smallest non-residue. Only subtraction and the quadratic character are needed.
class Field {
 public:
  Field(int64_t p, int k) : p_(static_cast<int>(p)), k_(k) {
    q_ = 1;
    for (int i = 0; i < k; ++i) q_ *= p_;
    f_ = first_irreducible();
    square_.assign(static_cast<size_t>(q_), false);
    for (int e = 1; e < q_; ++e) square_[static_cast<size_t>(mul(e, e))] = true;
  }
  int q() const { return q_; }
  int sub(int x, int y) const {
    int r = 0;
    for (int i = 0, w = 1; i < k_; ++i, w *= p_) {
      const int a = (x / w) % p_, b = (y / w) % p_;
      r += ((a - b + p_) % p_) * w;
    }
    return r;
  }
  // Quadratic character χ: 0 at 0, +1 on nonzero squares, −1 elsewhere.
  int chi(int x) const { return x == 0 ? 0 : (square_[static_cast<size_t>(x)] ? 1 : -1); }

 private:
  using Poly = std::vector<int>;  // coefficients, lowest degree first

  Poly digits(int e) const {
    Poly c(static_cast<size_t>(k_));
    for (int i = 0; i < k_; ++i, e /= p_) c[static_cast<size_t>(i)] = e % p_;
    return c;
  }
  // a mod g (g monic), in place; returns a's remainder (degree < deg g).
  Poly mod(Poly a, const Poly& g) const {
    const size_t dg = g.size() - 1;
    for (size_t i = a.size(); i-- > dg;) {
      const int c = a[i];
      if (c == 0) continue;
      for (size_t j = 0; j <= dg; ++j) a[i - dg + j] = ((a[i - dg + j] - c * g[j]) % p_ + p_) % p_;
    }
    a.resize(std::min(a.size(), dg));
    return a;
  }
  bool irreducible(const Poly& f) const {
    // No monic factor of degree 1 … k/2 (brute force; q stays small here).
    for (int d = 1; 2 * d <= k_; ++d) {
      int count = 1;
      for (int i = 0; i < d; ++i) count *= p_;
      for (int e = 0; e < count; ++e) {
        Poly g(static_cast<size_t>(d + 1));
        for (int i = 0, v = e; i < d; ++i, v /= p_) g[static_cast<size_t>(i)] = v % p_;
        g[static_cast<size_t>(d)] = 1;
        const Poly r = mod(f, g);
        if (std::all_of(r.begin(), r.end(), [](int c) { return c == 0; })) return false;
      }
    }
    return true;
  }
  Poly first_irreducible() const {
    for (int idx = 0; idx < q_; ++idx) {
      Poly f = digits(idx);
      f[0] = p_ - 1 - idx % p_;  // x^k − 1, x^k − 2, …
      f.push_back(1);
      if (irreducible(f)) return f;
    }
    QCAL_CHECK_MSG(false, "GF(q): no irreducible polynomial");
    return {};
  }
  int mul(int x, int y) const {
    const Poly a = digits(x), b = digits(y);
    Poly c(static_cast<size_t>(2 * k_ - 1), 0);
    for (int i = 0; i < k_; ++i)
      for (int j = 0; j < k_; ++j)
        c[static_cast<size_t>(i + j)] = (c[static_cast<size_t>(i + j)] +
                                         a[static_cast<size_t>(i)] * b[static_cast<size_t>(j)]) %
                                        p_;
    const Poly r = mod(c, f_);
    int e = 0;
    for (int i = k_; i-- > 0;)
      e = e * p_ + (static_cast<size_t>(i) < r.size() ? r[static_cast<size_t>(i)] : 0);
    return e;
  }

  int p_, k_, q_ = 1;
  Poly f_;
  std::vector<bool> square_;
};

using Table = std::vector<int8_t>;

// Paley I: H = I + S, S = [[0, 1ᵀ], [−1, Q]], Q_ij = χ(i − j) (skew for q ≡ 3 mod 4).
Table paley1(const Field& f) {
  const int q = f.q(), K = q + 1;
  Table h(static_cast<size_t>(K) * K);
  auto at = [&](int i, int j) -> int8_t& { return h[static_cast<size_t>(i) * K + j]; };
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) {
      int s;
      if (i == 0)
        s = j == 0 ? 0 : 1;
      else if (j == 0)
        s = -1;
      else
        s = f.chi(f.sub(i - 1, j - 1));
      at(i, j) = static_cast<int8_t>(s + (i == j ? 1 : 0));
    }
  }
  return h;
}

// Paley II: C = [[0, 1ᵀ], [1, Q]] (symmetric conference matrix for q ≡ 1 mod 4),
// H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]].
Table paley2(const Field& f) {
  const int q = f.q(), c = q + 1, K = 2 * c;
  Table h(static_cast<size_t>(K) * K);
  for (int i = 0; i < c; ++i) {
    for (int j = 0; j < c; ++j) {
      int cij;
      if (i == 0)
        cij = j == 0 ? 0 : 1;
      else if (j == 0)
        cij = 1;
      else
        cij = f.chi(f.sub(i - 1, j - 1));
      for (int a = 0; a < 2; ++a) {
        for (int b = 0; b < 2; ++b) {
          const int s2 = (a == 1 && b == 1) ? -1 : 1;
          int v = cij * s2;
          if (i == j) v += (a == 0 && b == 0) ? 1 : -1;
          h[static_cast<size_t>(2 * i + a) * K + (2 * j + b)] = static_cast<int8_t>(v);
        }
      }
    }
  }
  return h;
}

// A ⊗ B: block (i, j) of side nb is A_ij·B. kron(H_2, h) is Sylvester doubling.
Table kron(const Table& a, int64_t na, const Table& b, int64_t nb) {
  const int64_t n = na * nb;
  Table h(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      h[static_cast<size_t>(i * n + j)] =
          static_cast<int8_t>(a[static_cast<size_t>((i / nb) * na + j / nb)] *
                              b[static_cast<size_t>((i % nb) * nb + j % nb)]);
  return h;
}

// First rows ('+' = 1, '-' = −1) of four symmetric circulants A, B, C, D of order
// t with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4t·I (Williamson quadruples; published data,
// sources at the top of this file).
struct Williamson {
  int t;
  const char* rows[4];
};
constexpr Williamson kWilliamson[] = {
    {23,
     {"++---+---+-++-+---+---+", "+-++-++--++++++--++-++-", "+++---++-+-++-+-++---++",
      "+++-+++-+------+-+++-++"}},
    {29,
     {"+++---++--+-+----+-+--++---++", "+-+---++--+-++++++-+--++---+-",
      "++++-++-+---++++++---+-++-+++", "++--+--+-+++-++++-+++-+--+--+"}},
    {39,
     {"+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
      "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"}},
    {43,
     {"++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
      "++-++++++----+-+--++-++-++--+-+----++++++-+",
      "+---++--++++-+-+++-++--++-+++-+-++++--++---"}},
};

const Williamson* williamson_for(int64_t K) {
  for (const Williamson& w : kWilliamson)
    if (4 * w.t == K) return &w;
  return nullptr;
}

// The Williamson array [[A, B, C, D], [−B, A, −D, C], [−C, D, A, −B], [−D, −C, B, A]].
Table williamson(const Williamson& w) {
  const int t = w.t, K = 4 * t;
  static constexpr int kBlock[4][4] = {{0, 1, 2, 3}, {1, 0, 3, 2}, {2, 3, 0, 1}, {3, 2, 1, 0}};
  static constexpr int kSign[4][4] = {{1, 1, 1, 1}, {-1, 1, -1, 1}, {-1, 1, 1, -1}, {-1, -1, 1, 1}};
  Table h(static_cast<size_t>(K) * K);
  for (int bi = 0; bi < 4; ++bi)
    for (int bj = 0; bj < 4; ++bj) {
      const char* row = w.rows[kBlock[bi][bj]];
      for (int i = 0; i < t; ++i)
        for (int j = 0; j < t; ++j) {
          const int v = row[((j - i) % t + t) % t] == '+' ? 1 : -1;  // circulant
          h[static_cast<size_t>(bi * t + i) * K + (bj * t + j)] =
              static_cast<int8_t>(kSign[bi][bj] * v);
        }
    }
  return h;
}

Field field_for(int64_t q) {
  int64_t p;
  int k;
  QCAL_CHECK(prime_power(q, &p, &k));
  return Field(p, k);
}

// The ±1 tables built so far, by order (never erased, so references handed out stay
// valid), guarded by one mutex.
struct Tables {
  std::mutex mu;
  std::map<int64_t, Table> by_order;  // GUARDED_BY(mu)
};
Tables& tables() {
  static Tables* t = new Tables;  // never destroyed: used from any thread until exit
  return *t;
}

Table build_table_locked(Tables& t, int64_t K) {
  using C = HadamardConstruction;
  const std::optional<C> r = hadamard_construction(K);
  QCAL_CHECK_MSG(r.has_value(), "hadamard_table: no construction for this order");
  switch (r->kind) {
    case C::kSylvester: return K == 1 ? Table{1} : Table{1, 1, 1, -1};
    case C::kPaley1: return paley1(field_for(r->a));
    case C::kPaley2: return paley2(field_for(r->a));
    case C::kWilliamson: {
      const Williamson* w = williamson_for(K);
      QCAL_CHECK_MSG(w != nullptr, "hadamard_table: kWilliamsonOrders lists a t without rows");
      return williamson(*w);
    }
    case C::kKron:
      return kron(build_table_locked(t, r->a), r->a, build_table_locked(t, r->b), r->b);
  }
  return {};
}

// G (K×K, row-major) of a plan: hadK, or C_m ⊗ hadK_h for the fallback.
std::vector<double> mix_matrix(const HadamardPlan& p) {
  const Table& hk = hadamard_table(p.kh);
  const int64_t K = p.K, kh = p.kh, m = p.m;
  std::vector<double> g(static_cast<size_t>(K * K));
  std::vector<double> cm(static_cast<size_t>(m * m));
  for (int64_t a = 0; a < m; ++a)
    for (int64_t b = 0; b < m; ++b) {
      const double t =
          2.0 * std::numbers::pi * static_cast<double>((a * b) % m) / static_cast<double>(m);
      cm[static_cast<size_t>(a * m + b)] = m == 1 ? 1.0 : std::cos(t) + std::sin(t);
    }
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j)
      g[static_cast<size_t>(i * K + j)] = cm[static_cast<size_t>((i / kh) * m + j / kh)] *
                                          hk[static_cast<size_t>((i % kh) * kh + j % kh)];
  return g;
}

// A plan with its G in fp64 and fp32, built once per size: the transforms run
// per layer and per batch, G is up to K² = 2048² entries.
struct Mix {
  HadamardPlan plan;
  std::vector<double> g;  // (K, K)
  std::vector<float> gf;  // (K, K), g rounded
  // G in the transform's precision: data(static_cast<T*>(nullptr)).
  const double* data(double*) const { return g.data(); }
  const float* data(float*) const { return gf.data(); }
};

std::shared_ptr<const Mix> mix_for(int64_t n) {
  static std::mutex mu;
  static auto* mixes = new std::map<int64_t, std::shared_ptr<const Mix>>;  // GUARDED_BY(mu)
  {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = mixes->find(n); it != mixes->end()) return it->second;
  }
  Result<HadamardPlan> p = hadamard_plan(n);
  QCAL_CHECK_MSG(p.is_ok(), "hadamard: size has no plan (check hadamard_plan first)");
  auto mix = std::make_shared<Mix>();
  mix->plan = *p;
  mix->g = mix_matrix(mix->plan);
  mix->gf.assign(mix->g.begin(), mix->g.end());
  std::lock_guard<std::mutex> lock(mu);
  if (mixes->size() >= 64) mixes->clear();  // a bound; users hold their shared_ptr
  mixes->emplace(n, mix);
  return mix;
}

// Loops in blocks of 8 through a local array: at -O2 GCC vectorizes only
// straight-line code (SLP) or loops with a known trip count, and the local copy
// rules out aliasing between the block's loads and stores.
template <typename T>
inline void butterfly(T* a, T* b, int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    T s[8], d[8];
    for (int u = 0; u < 8; ++u) {
      s[u] = a[j + u] + b[j + u];
      d[u] = a[j + u] - b[j + u];
    }
    for (int u = 0; u < 8; ++u) {
      a[j + u] = s[u];
      b[j + u] = d[u];
    }
  }
  for (; j < len; ++j) {
    const T x = a[j], y = b[j];
    a[j] = x + y;
    b[j] = x - y;
  }
}

// out ± = in over len elements.
template <typename T>
inline void accumulate(T* out, const T* in, int64_t len, bool add) {
  int64_t r = 0;
  for (; r + 8 <= len; r += 8) {
    T t[8];
    if (add) {
      for (int u = 0; u < 8; ++u) t[u] = out[r + u] + in[r + u];
    } else {
      for (int u = 0; u < 8; ++u) t[u] = out[r + u] - in[r + u];
    }
    for (int u = 0; u < 8; ++u) out[r + u] = t[u];
  }
  for (; r < len; ++r) out[r] = add ? out[r] + in[r] : out[r] - in[r];
}

// Unnormalized Sylvester FWHT of v (len a power of two), in place.
template <typename T>
void fwht(T* v, int64_t len) {
  for (int64_t h = 1; h < len; h *= 2)
    for (int64_t i = 0; i < len; i += 2 * h) butterfly(v + i, v + i + h, h);
}

// One row: FWHT every length-P row of M (K, P), then unless `fwht_only`
// M ← hadK·M (hk a ±1 table) and scale by 1/√n. `tmp` holds n elements.
template <typename T>
void transform_row(T* x, int64_t K, int64_t P, const int8_t* hk, T scale, bool fwht_only, T* tmp) {
  for (int64_t k = 0; k < K; ++k) fwht(x + k * P, P);
  if (fwht_only) return;
  const int64_t n = K * P;
  if (K == 1) {
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    T* out = tmp + k * P;
    const int8_t* hrow = hk + k * K;
    for (int64_t r = 0; r < P; ++r) out[r] = hrow[0] > 0 ? x[r] : -x[r];
    for (int64_t j = 1; j < K; ++j) accumulate(out, x + j * P, P, hrow[j] > 0);
  }
  for (int64_t j = 0; j < n; ++j) x[j] = tmp[j] * scale;
}

void gemm_nn(int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B,
             float* C) {
  sgemm(false, false, M, N, K, alpha, A, K, B, N, 0.0f, C, N);
}
void gemm_nn(int64_t M, int64_t N, int64_t K, double alpha, const double* A, const double* B,
             double* C) {
  dgemm(false, false, M, N, K, alpha, A, K, B, N, 0.0, C, N);
}

// The G mix of many rows as one BLAS GEMM per block of R rows: gather the
// (K, P) views side by side into B (K, R·P), C = scale·G·B, scatter back.
// For ±1 tables with K ≥ kGemmMinK this beats the add/subtract loop several
// times over; the fallback's real G always goes this way.
constexpr int64_t kGemmMinK = 28;

template <typename T>
void mix_gemm(T* x, int64_t rows, int64_t K, int64_t P, const T* g, T scale) {
  const int64_t n = K * P;
  const int64_t R = std::clamp<int64_t>((int64_t{1} << 18) / n, 1, rows);
  std::vector<T> b(static_cast<size_t>(R * n)), c(b.size());
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const int64_t nr = std::min(R, rows - r0), ld = nr * P;
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(b.data() + k * ld + r * P, x + (r0 + r) * n + k * P,
                    static_cast<size_t>(P) * sizeof(T));
    gemm_nn(K, ld, K, scale, g, b.data(), c.data());
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(x + (r0 + r) * n + k * P, c.data() + k * ld + r * P,
                    static_cast<size_t>(P) * sizeof(T));
  }
}

template <typename T>
void transform(T* x, int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return;
  const std::shared_ptr<const Mix> mix = mix_for(n);
  const HadamardPlan& p = mix->plan;
  const int64_t K = p.K, P = p.P;
  const int8_t* hk = hadamard_table(p.kh).data();
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n)));
  const bool use_gemm = !p.hadamard() || K >= kGemmMinK;
  auto run = [&](int64_t r0, int64_t r1) {
    std::vector<T> tmp(static_cast<size_t>(K > 1 && !use_gemm ? n : 0));
    for (int64_t r = r0; r < r1; ++r)
      transform_row(x + r * n, K, P, hk, scale, use_gemm, tmp.data());
  };
  parallel_for(rows, n * (use_gemm ? 8 : K + 8), run);
  // Its GEMMs use the pool themselves.
  if (use_gemm) mix_gemm(x, rows, K, P, mix->data(static_cast<T*>(nullptr)), scale);
}

}  // namespace

const std::vector<int8_t>& hadamard_table(int64_t K) {
  Tables& t = tables();
  std::lock_guard<std::mutex> lock(t.mu);
  auto it = t.by_order.find(K);
  if (it == t.by_order.end()) it = t.by_order.emplace(K, build_table_locked(t, K)).first;
  return it->second;
}

Result<std::vector<int8_t>> paley_hadamard(int kind, int64_t q) {
  if (kind != 1 && kind != 2)
    return invalid_input("paley_hadamard: kind must be 1 or 2, got " + std::to_string(kind));
  if (q > kHadamardMaxK) {
    return invalid_input("paley_hadamard: q = " + std::to_string(q) + " gives an order above " +
                         std::to_string(kHadamardMaxK));
  }
  if (!paley_q_ok(kind, q)) {
    return invalid_input("paley_hadamard: Paley " + std::string(kind == 1 ? "I" : "II") +
                         " needs a prime power q ≡ " + (kind == 1 ? "3" : "1") + " mod 4, got " +
                         std::to_string(q));
  }
  const int64_t order = kind == 1 ? q + 1 : 2 * (q + 1);
  if (order > kHadamardMaxK) {
    return invalid_input("paley_hadamard: order " + std::to_string(order) + " exceeds " +
                         std::to_string(kHadamardMaxK));
  }
  const Field f = field_for(q);
  return kind == 1 ? paley1(f) : paley2(f);
}

void hadamard_transform(float* x, int64_t rows, int64_t n) { transform(x, rows, n); }
void hadamard_transform(double* x, int64_t rows, int64_t n) { transform(x, rows, n); }

void hadamard_transform_ref(double* x, int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return;
  const std::shared_ptr<const Mix> mix = mix_for(n);
  const int64_t K = mix->plan.K, P = mix->plan.P;
  const std::vector<double>& g = mix->g;
  const double scale = 1.0 / std::sqrt(static_cast<double>(n));
  std::vector<double> y(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    double* xr = x + r * n;
    // y_i = Σ_j x_j (G ⊗ H)_ij / √n, the matrix entries generated on the fly.
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ki = i / P, ri = i % P;
      double acc = 0.0;
      for (int64_t kj = 0; kj < K; ++kj) {
        const double h = g[static_cast<size_t>(ki * K + kj)];
        const double* xs = xr + kj * P;
        for (int64_t rj = 0; rj < P; ++rj) {
          const bool neg = std::popcount(static_cast<uint64_t>(ri & rj)) & 1;
          acc += (neg ? -h : h) * xs[rj];
        }
      }
      y[static_cast<size_t>(i)] = acc * scale;
    }
    std::copy(y.begin(), y.end(), xr);
  }
}

std::vector<double> hadamard_matrix(int64_t n) {
  const std::shared_ptr<const Mix> mix = mix_for(n);
  const int64_t K = mix->plan.K, P = mix->plan.P;
  const std::vector<double>& g = mix->g;
  const double scale = 1.0 / std::sqrt(static_cast<double>(n));
  // Hn[j][i] = (G ⊗ H)_ij / √n, so that (x·Hn)_i = y_i.
  std::vector<double> h(static_cast<size_t>(n * n));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ki = i / P, ri = i % P, kj = j / P, rj = j % P;
      const double s = (std::popcount(static_cast<uint64_t>(ri & rj)) & 1) ? -1.0 : 1.0;
      h[static_cast<size_t>(j * n + i)] = s * g[static_cast<size_t>(ki * K + kj)] * scale;
    }
  return h;
}

std::vector<double> random_hadamard_matrix(int64_t n, uint64_t seed) {
  std::vector<double> h = hadamard_matrix(n);
  Rng rng(seed);
  for (int64_t j = 0; j < n; ++j) {
    if (rng.next_u64() >> 63) {
      for (int64_t i = 0; i < n; ++i)
        h[static_cast<size_t>(j * n + i)] = -h[static_cast<size_t>(j * n + i)];
    }
  }
  return h;
}

void hadamard_kron_factors(int64_t n, std::vector<double>* L, std::vector<double>* R) {
  const std::shared_ptr<const Mix> mix = mix_for(n);
  const int64_t K = mix->plan.K, P = mix->plan.P;
  const std::vector<double>& g = mix->g;
  const double sk = 1.0 / std::sqrt(static_cast<double>(K));
  const double sp = 1.0 / std::sqrt(static_cast<double>(P));
  L->assign(static_cast<size_t>(K * K), 0.0);
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = 0; b < K; ++b)
      (*L)[static_cast<size_t>(a * K + b)] = g[static_cast<size_t>(b * K + a)] * sk;
  R->assign(static_cast<size_t>(P * P), 0.0);
  for (int64_t a = 0; a < P; ++a)
    for (int64_t b = 0; b < P; ++b) {
      const int s = (std::popcount(static_cast<uint64_t>(a & b)) & 1) ? -1 : 1;
      (*R)[static_cast<size_t>(a * P + b)] = s * sp;  // H_P is symmetric: Hᵀ = H
    }
}

}  // namespace qcal

// Walsh–Hadamard transforms (methods.md §3.4). Letters: n = K·2^m the row
// length, K the non-power-of-two factor, P = 2^m.
//
// The K×K tables are built here, not stored, wherever a classical construction
// exists:
//   Paley I  (q ≡ 3 mod 4, order q+1): 12 (q=11), 20 (19), 60 (59), 108 (107), 140 (139);
//   Paley II (q ≡ 1 mod 4, order 2(q+1)): 28 (q=13), 36 (17), 52 (GF(25));
//   Sylvester doubling: 40 = 2×20;
//   Williamson array of four symmetric circulants: 156 = 4·39 and 172 = 4·43,
//   from published first rows (t = 43: M. Hall, Combinatorial Theory, 1983;
//   t = 39: S. London, PhD thesis, 2013; both as listed in SageMath's
//   williamson_type_quadruples_smallcases). Only the ±1 patterns are stored.
//
// The fast transform runs the unnormalized FWHT on every length-P segment
// (threads over rows), then the hadK mix: an add/subtract loop for small K, one
// BLAS GEMM per block of rows for K ≥ 28 (several times faster at K = 108, 172).
#include "kernels/hadamard.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

namespace qcal {
namespace {

constexpr int64_t kOrders[] = {172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12};

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// GF(q) for q = p (prime) or q = p² (elements a + b·t with t² = r, r a
// non-residue mod p); element index e = a + p·b. Only subtraction and the
// quadratic character are needed.
class Field {
 public:
  Field(int p, int degree) : p_(p), q_(degree == 1 ? p : p * p), deg_(degree) {
    if (degree == 2) {
      r_ = 2;
      while (is_square_mod_p(r_)) ++r_;
    }
    square_.assign(static_cast<size_t>(q_), false);
    for (int e = 1; e < q_; ++e) square_[static_cast<size_t>(mul(e, e))] = true;
  }
  int q() const { return q_; }
  int sub(int x, int y) const {
    if (deg_ == 1) return ((x - y) % p_ + p_) % p_;
    const int a = ((x % p_ - y % p_) % p_ + p_) % p_;
    const int b = ((x / p_ - y / p_) % p_ + p_) % p_;
    return a + p_ * b;
  }
  // Quadratic character χ: 0 at 0, +1 on nonzero squares, −1 elsewhere.
  int chi(int x) const { return x == 0 ? 0 : (square_[static_cast<size_t>(x)] ? 1 : -1); }

 private:
  bool is_square_mod_p(int v) const {
    for (int x = 1; x < p_; ++x)
      if (x * x % p_ == v % p_) return true;
    return false;
  }
  int mul(int x, int y) const {
    if (deg_ == 1) return x * y % p_;
    const int a = x % p_, b = x / p_, c = y % p_, d = y / p_;
    return (a * c + r_ * b * d) % p_ + p_ * ((a * d + b * c) % p_);
  }
  int p_, q_, deg_, r_ = 0;
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

Table sylvester_double(const Table& h, int K) {
  const int K2 = 2 * K;
  Table d(static_cast<size_t>(K2) * K2);
  for (int i = 0; i < K2; ++i)
    for (int j = 0; j < K2; ++j) {
      const int s = (i >= K && j >= K) ? -1 : 1;
      d[static_cast<size_t>(i) * K2 + j] =
          static_cast<int8_t>(s * h[static_cast<size_t>(i % K) * K + (j % K)]);
    }
  return d;
}

// First rows ('+' = 1, '-' = −1) of four symmetric circulants A, B, C, D of order
// t with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4t·I (Williamson quadruples; published data).
struct Williamson {
  int t;
  const char* rows[4];
};
constexpr Williamson kWilliamson39 = {
    39,
    {"+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
     "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"}};
constexpr Williamson kWilliamson43 = {
    43,
    {"++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
     "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"}};

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

const std::map<int64_t, Table>& tables() {
  static const std::map<int64_t, Table> t = [] {
    std::map<int64_t, Table> m;
    m[1] = Table{1};
    m[12] = paley1(Field(11, 1));
    m[20] = paley1(Field(19, 1));
    m[60] = paley1(Field(59, 1));
    m[108] = paley1(Field(107, 1));
    m[140] = paley1(Field(139, 1));
    m[28] = paley2(Field(13, 1));
    m[36] = paley2(Field(17, 1));
    m[52] = paley2(Field(5, 2));
    m[40] = sylvester_double(m[20], 20);
    m[156] = williamson(kWilliamson39);
    m[172] = williamson(kWilliamson43);
    return m;
  }();
  return t;
}

int64_t k_or_die(int64_t n) {
  Result<int64_t> k = hadamard_k(n);
  QCAL_CHECK_MSG(k.is_ok(), "hadamard: size has no K·2^m decomposition");
  return *k;
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

// out (K, P) = scale · hadK · M for P a multiple of 4 vectors, register-blocked:
// 2 output rows × 4 vectors of accumulators, hf the table as ±1 in T (multiplying
// by ±1 is exact, so this equals the add/subtract form). GCC vector extensions
// give SSE2 code at -O2 without intrinsics.
// One row: FWHT every length-P row of M (K, P), then unless `fwht_only`
// M ← hadK·M and scale by 1/√n. `tmp` holds n elements.
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

// The hadK mix of many rows as one BLAS GEMM per block of R rows: gather the
// (K, P) views side by side into B (K, R·P), C = (hadK/√n)·B, scatter back.
// For K ≥ kGemmMinK this beats the add/subtract loop several times over.
constexpr int64_t kGemmMinK = 28;

template <typename T>
void mix_gemm(T* x, int64_t rows, int64_t K, int64_t P, const int8_t* hk, T scale) {
  const int64_t n = K * P;
  const int64_t R = std::clamp<int64_t>((int64_t{1} << 18) / n, 1, rows);
  const std::vector<T> hf(hk, hk + K * K);
  std::vector<T> b(static_cast<size_t>(R * n)), c(b.size());
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const int64_t nr = std::min(R, rows - r0), ld = nr * P;
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(b.data() + k * ld + r * P, x + (r0 + r) * n + k * P,
                    static_cast<size_t>(P) * sizeof(T));
    gemm_nn(K, ld, K, scale, hf.data(), b.data(), c.data());
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(x + (r0 + r) * n + k * P, c.data() + k * ld + r * P,
                    static_cast<size_t>(P) * sizeof(T));
  }
}

template <typename T>
void transform(T* x, int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return;
  const int64_t K = k_or_die(n), P = n / K;
  const int8_t* hk = hadamard_table(K).data();
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(n)));
  const bool use_gemm = K >= kGemmMinK;
  auto run = [&](int64_t r0, int64_t r1) {
    std::vector<T> tmp(static_cast<size_t>(K > 1 && !use_gemm ? n : 0));
    for (int64_t r = r0; r < r1; ++r)
      transform_row(x + r * n, K, P, hk, scale, use_gemm, tmp.data());
  };
  parallel_for(rows, n * (use_gemm ? 8 : K + 8), run);
  if (use_gemm) mix_gemm(x, rows, K, P, hk, scale);  // its GEMMs use the pool themselves
}

// Entry (i, j) of hadK ⊗ H_P (±1).
inline int kron_entry(const int8_t* hk, int64_t K, int64_t P, int64_t i, int64_t j) {
  const int64_t ki = i / P, ri = i % P, kj = j / P, rj = j % P;
  const int s = (std::popcount(static_cast<uint64_t>(ri & rj)) & 1) ? -1 : 1;
  return s * hk[ki * K + kj];
}

}  // namespace

Result<int64_t> hadamard_k(int64_t n) {
  if (n <= 0) return invalid_input("hadamard: size must be positive, got " + std::to_string(n));
  for (int64_t K : kOrders) {
    if (n % K == 0) {
      if (is_pow2(n / K)) return K;
      break;
    }
  }
  if (is_pow2(n)) return int64_t{1};
  return invalid_input("hadamard: size " + std::to_string(n) +
                       " is not K·2^m for K in {1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, "
                       "172}");
}

const std::vector<int8_t>& hadamard_table(int64_t K) {
  const auto& t = tables();
  auto it = t.find(K);
  QCAL_CHECK_MSG(it != t.end(), "hadamard_table: unsupported K");
  return it->second;
}

void hadamard_transform(float* x, int64_t rows, int64_t n) { transform(x, rows, n); }
void hadamard_transform(double* x, int64_t rows, int64_t n) { transform(x, rows, n); }

void hadamard_transform_ref(double* x, int64_t rows, int64_t n) {
  if (rows <= 0 || n <= 0) return;
  const int64_t K = k_or_die(n), P = n / K;
  const int8_t* hk = hadamard_table(K).data();
  const double scale = 1.0 / std::sqrt(static_cast<double>(n));
  std::vector<double> y(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    double* xr = x + r * n;
    // y_i = Σ_j x_j (hadK ⊗ H)_ij / √n, the matrix entries generated on the fly.
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ki = i / P, ri = i % P;
      double acc = 0.0;
      for (int64_t kj = 0; kj < K; ++kj) {
        const double h = hk[ki * K + kj];
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
  const int64_t K = k_or_die(n), P = n / K;
  const int8_t* hk = hadamard_table(K).data();
  const double scale = 1.0 / std::sqrt(static_cast<double>(n));
  // Hn[j][i] = (hadK ⊗ H)_ij / √n, so that (x·Hn)_i = y_i.
  std::vector<double> h(static_cast<size_t>(n * n));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < n; ++i)
      h[static_cast<size_t>(j * n + i)] = kron_entry(hk, K, P, i, j) * scale;
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
  const int64_t K = k_or_die(n), P = n / K;
  const int8_t* hk = hadamard_table(K).data();
  const double sk = 1.0 / std::sqrt(static_cast<double>(K));
  const double sp = 1.0 / std::sqrt(static_cast<double>(P));
  L->assign(static_cast<size_t>(K * K), 0.0);
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = 0; b < K; ++b) (*L)[static_cast<size_t>(a * K + b)] = hk[b * K + a] * sk;
  R->assign(static_cast<size_t>(P * P), 0.0);
  for (int64_t a = 0; a < P; ++a)
    for (int64_t b = 0; b < P; ++b) {
      const int s = (std::popcount(static_cast<uint64_t>(a & b)) & 1) ? -1 : 1;
      (*R)[static_cast<size_t>(a * P + b)] = s * sp;  // H_P is symmetric: Hᵀ = H
    }
}

}  // namespace qcal

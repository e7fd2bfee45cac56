// labels: unit
// Walsh–Hadamard transforms (kernels/hadamard.h): every K×K table is a Hadamard
// matrix (exact integer check), every width of LLaMA-2/3, Mistral, Qwen2 and the
// shared real model has a plan, the fast transform matches the dense fp64
// reference on random rows of each width, the fallback is orthogonal, the sizes
// that worked before the search keep their matrices bit for bit, and the
// operator is orthogonal in all its forms (dense matrix, Kronecker factors,
// weight folding).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <numbers>
#include <set>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/hadamard.h"

namespace qcal {
namespace {

std::vector<double> random_rows(int64_t rows, int64_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> x(static_cast<size_t>(rows * n));
  for (double& v : x) v = rng.normal();
  return x;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

// C (n, n) = A (n, n) · Bᵀ.
std::vector<double> mul_bt(const std::vector<double>& a, const std::vector<double>& b, int64_t n) {
  std::vector<double> c(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t k = 0; k < n; ++k) s += a[i * n + k] * b[j * n + k];
      c[i * n + j] = s;
    }
  return c;
}

double max_dev_from_identity(const std::vector<double>& c, int64_t n, double diag) {
  double m = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double d = std::fabs(c[i * n + j] - (i == j ? diag : 0.0));
      m = std::isnan(d) ? INFINITY : std::max(m, d);
    }
  return m;
}

// max |H·Hᵀ − K·I| over a K×K ±1 matrix, in exact integer arithmetic; -1 if an
// entry is not ±1.
int64_t hadamard_defect(const std::vector<int8_t>& h, int64_t K) {
  if (static_cast<int64_t>(h.size()) != K * K) return -1;
  for (int8_t v : h)
    if (v != 1 && v != -1) return -1;
  int64_t worst = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i; j < K; ++j) {
      int64_t dot = 0;
      const int8_t* a = h.data() + i * K;
      const int8_t* b = h.data() + j * K;
      for (int64_t k = 0; k < K; ++k) dot += a[k] * b[k];
      worst = std::max<int64_t>(worst, std::llabs(dot - (i == j ? K : 0)));
    }
  return worst;
}

// y (rows, n) = x (rows, n) · M (n, n).
std::vector<double> right_mul(const std::vector<double>& x, const std::vector<double>& m,
                              int64_t rows, int64_t n) {
  std::vector<double> y(static_cast<size_t>(rows * n), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const double xv = x[r * n + j];
      for (int64_t i = 0; i < n; ++i) y[r * n + i] += xv * m[j * n + i];
    }
  return y;
}

uint64_t fnv1a(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < bytes; ++i) {
    h ^= b[i];
    h *= 1099511628211ull;
  }
  return h;
}

// Every width of the model families the issue names (#12), with the plan each
// gets. kind: 'S' Sylvester (K = 1), 'H' a K×K Hadamard table, 'F' the fallback.
struct Width {
  const char* model;
  const char* what;
  int64_t n, K;
  char kind;
  const char* construction;
};
constexpr Width kWidths[] = {
    {"LLaMA-2 7B", "hidden", 4096, 1, 'S', "sylvester"},
    {"LLaMA-2 13B", "hidden", 5120, 40, 'H', "kron(sylvester(2), paley1(q=19))"},
    {"LLaMA-2 70B", "hidden", 8192, 1, 'S', "sylvester"},
    {"LLaMA-2 7B", "intermediate", 11008, 172, 'H', "williamson(t=43)"},
    {"LLaMA-2 13B", "intermediate", 13824, 108, 'H', "paley1(q=107)"},
    {"LLaMA-2 70B", "intermediate", 28672, 28, 'H', "paley2(q=13)"},
    {"LLaMA-2 7B", "heads", 32, 1, 'S', "sylvester"},
    {"LLaMA-2 13B", "heads", 40, 40, 'H', "kron(sylvester(2), paley1(q=19))"},
    {"LLaMA-2 70B", "heads", 64, 1, 'S', "sylvester"},
    {"LLaMA-2", "head_dim", 128, 1, 'S', "sylvester"},
    {"LLaMA-3 405B", "hidden", 16384, 1, 'S', "sylvester"},
    {"LLaMA-3 8B", "intermediate", 14336, 28, 'H', "paley2(q=13)"},
    {"LLaMA-3 405B", "intermediate", 53248, 52, 'H', "paley2(q=5^2)"},
    {"LLaMA-3 405B", "heads", 128, 1, 'S', "sylvester"},
    {"Qwen2 0.5B", "hidden", 896, 28, 'H', "paley2(q=13)"},
    {"Qwen2 0.5B", "intermediate", 4864, 76, 'H', "paley2(q=37)"},
    {"Qwen2 0.5B", "heads", 14, 7, 'F', "hartley(7) ⊗ sylvester"},
    {"Qwen2 0.5B", "head_dim", 64, 1, 'S', "sylvester"},
    {"Qwen2 1.5B", "hidden", 1536, 12, 'H', "paley1(q=11)"},
    {"Qwen2 1.5B", "intermediate", 8960, 140, 'H', "paley1(q=139)"},
    {"Qwen2 1.5B", "heads", 12, 12, 'H', "paley1(q=11)"},
    {"Qwen2 7B", "hidden", 3584, 28, 'H', "paley2(q=13)"},
    {"Qwen2 7B", "intermediate", 18944, 148, 'H', "paley2(q=73)"},
    {"Qwen2 7B", "heads", 28, 28, 'H', "paley2(q=13)"},
    {"Qwen2 72B", "intermediate", 29568, 924, 'H', "paley2(q=461)"},
    {"babyllama-tok361", "hidden", 128, 1, 'S', "sylvester"},
    {"babyllama-tok361", "intermediate", 352, 44, 'H', "paley1(q=43)"},
    {"babyllama-tok361", "heads", 8, 1, 'S', "sylvester"},
    {"babyllama-tok361", "head_dim", 16, 1, 'S', "sylvester"},
};
// (Mistral 7B: 4096 / 14336 / 32 heads / 128, Qwen2 72B: 8192 / 64 heads / 128 and
// LLaMA-3's other widths repeat sizes above.)

TEST(Hadamard, EveryModelWidthHasAPlan) {
  std::printf("%-18s %-13s %6s %5s %5s  %s\n", "model", "width", "n", "K", "P", "construction");
  for (const Width& w : kWidths) {
    Result<HadamardPlan> p = hadamard_plan(w.n);
    ASSERT_TRUE(p.is_ok()) << w.model << " " << w.what << " " << w.n << ": "
                           << p.status().message();
    std::printf("%-18s %-13s %6lld %5lld %5lld  %s\n", w.model, w.what, static_cast<long long>(w.n),
                static_cast<long long>(p->K), static_cast<long long>(p->P),
                p->construction.c_str());
    EXPECT_EQ(p->n, w.n);
    EXPECT_EQ(p->K, w.K) << w.n;
    EXPECT_EQ(p->K * p->P, w.n);
    EXPECT_TRUE(p->P > 0 && (p->P & (p->P - 1)) == 0) << w.n;
    EXPECT_EQ(p->hadamard(), w.kind != 'F') << w.n;
    EXPECT_EQ(p->m * p->kh, p->K) << w.n;
    EXPECT_EQ(p->construction, w.construction) << w.n;
    EXPECT_EQ(*hadamard_k(w.n), w.K) << w.n;
  }
}

// H·Hᵀ = K·I exactly for every table a model width uses, QuaRot's orders, and
// the Williamson orders.
TEST(Hadamard, EveryTableIsHadamardExactly) {
  std::set<int64_t> orders = {1, 2, 12, 20, 28, 36, 40, 52, 60, 92, 108, 116, 140, 156, 172};
  for (const Width& w : kWidths) orders.insert(hadamard_plan(w.n)->kh);
  for (int64_t K : orders) EXPECT_EQ(hadamard_defect(hadamard_table(K), K), 0) << "K=" << K;
}

// The whole ±1 matrix of the shared real model's intermediate size, 352 = 44·8.
TEST(Hadamard, FullMatrixOfTheRealModelIsHadamard) {
  const int64_t n = 352;
  const std::vector<double> h = hadamard_matrix(n);
  std::vector<int8_t> pm(h.size());
  const double s = std::sqrt(static_cast<double>(n));
  for (size_t i = 0; i < h.size(); ++i) pm[i] = static_cast<int8_t>(std::lround(h[i] * s));
  for (size_t i = 0; i < h.size(); ++i) ASSERT_NEAR(h[i] * s, pm[i], 1e-12) << i;  // ±1/√n
  EXPECT_EQ(hadamard_defect(pm, n), 0);
}

TEST(Hadamard, PaleyOverPrimePowers) {
  // Paley I: q ≡ 3 mod 4; Paley II: q ≡ 1 mod 4 (primes and proper powers).
  const std::pair<int, int64_t> cases[] = {{1, 3},  {1, 7},   {1, 27},  {1, 243}, {1, 343},
                                           {1, 43}, {2, 5},   {2, 9},   {2, 25},  {2, 49},
                                           {2, 81}, {2, 121}, {2, 125}, {2, 169}, {2, 461}};
  for (auto [kind, q] : cases) {
    Result<std::vector<int8_t>> h = paley_hadamard(kind, q);
    ASSERT_TRUE(h.is_ok()) << kind << " " << q << ": " << h.status().message();
    const int64_t K = kind == 1 ? q + 1 : 2 * (q + 1);
    EXPECT_EQ(hadamard_defect(*h, K), 0) << "paley" << kind << " q=" << q;
  }
  // The GF(p^k) tables are the ones the plans use: 28 stays Paley II (q = 13),
  // 52 is Paley II over GF(25).
  EXPECT_EQ(*paley_hadamard(2, 25), hadamard_table(52));
  EXPECT_EQ(*paley_hadamard(2, 13), hadamard_table(28));
  EXPECT_NE(*paley_hadamard(1, 27), hadamard_table(28));  // also Hadamard, not chosen

  const std::pair<int, int64_t> bad[] = {{1, 15}, {1, 5},  {2, 7}, {2, 45},   {1, 1},
                                         {1, 0},  {2, -3}, {3, 7}, {1, 4099}, {2, 1ll << 40}};
  for (auto [kind, q] : bad) {
    Result<std::vector<int8_t>> h = paley_hadamard(kind, q);
    ASSERT_FALSE(h.is_ok()) << kind << " " << q;
    EXPECT_EQ(h.status().code(), Code::kInvalidInput);
    EXPECT_NE(h.status().message().find("paley_hadamard"), std::string::npos);
  }
}

// QuaRot's rule (methods.md §3.4), written out independently: wherever it gave a
// K, the plan keeps that K.
TEST(Hadamard, KeepsQuaRotsChoiceWhereverItApplied) {
  const int64_t legacy[] = {172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12};
  auto pow2 = [](int64_t v) { return v > 0 && (v & (v - 1)) == 0; };
  int checked = 0;
  for (int64_t n = 1; n <= 70000; ++n) {
    int64_t K = -1;
    for (int64_t k : legacy) {
      if (n % k == 0) {
        if (pow2(n / k)) K = k;
        break;
      }
    }
    if (K < 0 && pow2(n)) K = 1;
    if (K < 0) continue;
    ++checked;
    Result<HadamardPlan> p = hadamard_plan(n);
    ASSERT_TRUE(p.is_ok()) << n;
    ASSERT_EQ(p->K, K) << n;
    ASSERT_TRUE(p->hadamard()) << n;
  }
  EXPECT_GT(checked, 60);
}

// Hashes of the tables and matrices as they were before the search replaced the
// fixed list (computed with that code): committed results depend on them.
TEST(Hadamard, QuaRotSizesAreBitIdenticalToBefore) {
  const std::pair<int64_t, uint64_t> tables[] = {
      {12, 0x4cbbad09cedd1463ull},  {20, 0x6c7d06df3ed433f3ull},  {28, 0xd09aa861d4848363ull},
      {36, 0xa15f31a0dad293a3ull},  {40, 0xe68794a9d0de6363ull},  {52, 0xe0cb2d7264903423ull},
      {60, 0x69297d542696cfa3ull},  {108, 0x1c2be062d9dd0a93ull}, {140, 0x4cdb7f906cbfefb3ull},
      {156, 0x2425e7b8727da6e3ull}, {172, 0x4e521c80cc9a18e3ull},
  };
  for (auto [K, h] : tables) {
    const std::vector<int8_t>& t = hadamard_table(K);
    EXPECT_EQ(fnv1a(t.data(), t.size()), h) << "table K=" << K;
  }
  const std::pair<int64_t, uint64_t> matrices[] = {
      {40, 0x83973797c0998083ull},   {96, 0x57dc476da3c77383ull},  {112, 0xd02f2484c18a8383ull},
      {128, 0x41c3ab807fe94383ull},  {344, 0x0220d087cd327f83ull}, {384, 0xfc2a37259c228383ull},
      {432, 0xc19db47e16cc3f83ull},  {560, 0x58e31b01c8df6583ull}, {640, 0x664544d973bf0383ull},
      {1248, 0x6305eaade1834383ull},
  };
  for (auto [n, h] : matrices) {
    const std::vector<double> m = hadamard_matrix(n);
    EXPECT_EQ(fnv1a(m.data(), m.size() * sizeof(double)), h) << "hadamard_matrix n=" << n;
  }
  // random_hadamard_matrix(n, seed 7).
  const std::pair<int64_t, uint64_t> randoms[] = {
      {40, 0xaec1a3f7d6ae2383ull},   {96, 0xb448a4f3fb203183ull},  {112, 0x1858fa5b4c152283ull},
      {128, 0x122ca5debbd87f83ull},  {344, 0x2219a32c9d30de83ull}, {384, 0x784fd05755af2383ull},
      {432, 0x584284d5e945ec83ull},  {560, 0xcd28a36271f43983ull}, {640, 0x781cf4cfed892f83ull},
      {1248, 0x2029e30dd41eb283ull},
  };
  for (auto [n, h] : randoms) {
    const std::vector<double> m = random_hadamard_matrix(n, 7);
    EXPECT_EQ(fnv1a(m.data(), m.size() * sizeof(double)), h) << "random_hadamard_matrix n=" << n;
  }
}

TEST(Hadamard, ChoosesK) {
  const std::pair<int64_t, int64_t> cases[] = {
      {11008, 172}, {13824, 108}, {14336, 28}, {28672, 28}, {5120, 40},   {40, 40},
      {4096, 1},    {8192, 1},    {128, 1},    {1, 1},      {384, 12},    {172, 172},
      {312, 156},   {560, 140},   {120, 60},   {416, 52},   {36, 36},     {20, 20},
      {12, 12},     {44, 44},     {352, 44},   {100, 100},  {1000, 500},  {516, 516},
      {92, 92},     {184, 92},    {116, 116},  {2944, 92},  {18944, 148}, {29568, 924}};
  for (auto [n, K] : cases) {
    Result<int64_t> k = hadamard_k(n);
    ASSERT_TRUE(k.is_ok()) << n << ": " << k.status().message();
    EXPECT_EQ(*k, K) << "n=" << n;
  }
  for (int64_t bad : {0, -4}) {
    Result<int64_t> k = hadamard_k(bad);
    ASSERT_FALSE(k.is_ok()) << bad;
    EXPECT_EQ(k.status().code(), Code::kInvalidInput) << bad;
    EXPECT_NE(k.status().message().find("positive"), std::string::npos);
  }
  // An odd part beyond the largest mixing factor, with no Hadamard order: refused,
  // naming the size.
  for (int64_t bad : {4099 * 2, 4099 * 4, 2053 * 3 * 2}) {
    Result<HadamardPlan> p = hadamard_plan(bad);
    ASSERT_FALSE(p.is_ok()) << bad;
    EXPECT_EQ(p.status().code(), Code::kInvalidInput) << bad;
    EXPECT_NE(p.status().message().find("size " + std::to_string(bad)), std::string::npos)
        << p.status().message();
  }
}

// The fallback: which sizes get it and how, and its orthogonality (fp64).
TEST(Hadamard, FallbackIsOrthogonal) {
  struct Case {
    int64_t n, m, K, P;
    const char* construction;
  };
  const Case cases[] = {
      {14, 7, 7, 2, "hartley(7) ⊗ sylvester"},  // Qwen2-0.5B heads
      {3, 3, 3, 1, "hartley(3) ⊗ sylvester"},
      {6, 3, 3, 2, "hartley(3) ⊗ sylvester"},
      {90, 45, 45, 2, "hartley(45) ⊗ sylvester"},
      {188, 47, 47, 4, "hartley(47) ⊗ sylvester"},  // no Hadamard of order 188 here
      {940, 47, 940, 1, "hartley(47) ⊗ paley1(q=19)"},
  };
  for (const Case& c : cases) {
    Result<HadamardPlan> p = hadamard_plan(c.n);
    ASSERT_TRUE(p.is_ok()) << c.n << ": " << p.status().message();
    EXPECT_FALSE(p->hadamard()) << c.n;
    EXPECT_EQ(p->m, c.m) << c.n;
    EXPECT_EQ(p->K, c.K) << c.n;
    EXPECT_EQ(p->P, c.P) << c.n;
    EXPECT_EQ(p->construction, c.construction) << c.n;

    const std::vector<double> h = hadamard_matrix(c.n);
    const double dev = max_dev_from_identity(mul_bt(h, h, c.n), c.n, 1.0);
    std::printf("fallback n=%-5lld %-28s |Q·Qᵀ − I| %.2e\n", static_cast<long long>(c.n),
                p->construction.c_str(), dev);
    EXPECT_LE(dev, 1e-12) << "n=" << c.n;
    // The Hartley factor keeps the entries near 1/√n (at most √2 of it).
    double amax = 0.0;
    for (double v : h) amax = std::max(amax, std::fabs(v));
    EXPECT_LE(amax * std::sqrt(static_cast<double>(c.n)), std::sqrt(2.0) + 1e-12) << c.n;

    std::vector<double> L, R;
    hadamard_kron_factors(c.n, &L, &R);
    EXPECT_LE(max_dev_from_identity(mul_bt(L, L, p->K), p->K, 1.0), 1e-12) << c.n;
    EXPECT_LE(max_dev_from_identity(mul_bt(R, R, p->P), p->P, 1.0), 1e-12) << c.n;
  }
  // The Hartley matrix entry by entry (C_7 ⊗ H_2 / √14 for 14 heads).
  const std::vector<double> h14 = hadamard_matrix(14);
  for (int64_t j = 0; j < 14; ++j)
    for (int64_t i = 0; i < 14; ++i) {
      const double t = 2.0 * std::numbers::pi * static_cast<double>((i / 2) * (j / 2)) / 7.0;
      const double s = ((i % 2) & (j % 2)) ? -1.0 : 1.0;
      EXPECT_NEAR(h14[j * 14 + i], s * (std::cos(t) + std::sin(t)) / std::sqrt(14.0), 1e-14);
    }
}

// The fast transform (fp64 and fp32) against the dense reference on fresh random
// rows for every model width (one row for the large ones) and the fallbacks.
TEST(Hadamard, FastMatchesReferenceOnEveryWidth) {
  std::set<int64_t> sizes = {14, 90, 188, 940, 384, 2944};
  for (const Width& w : kWidths) sizes.insert(w.n);
  uint64_t seed = 100;
  for (int64_t n : sizes) {
    const int64_t rows = n <= 1024 ? 5 : n <= 8192 ? 2 : 1;
    const std::vector<double> x = random_rows(rows, n, ++seed);
    std::vector<double> ref = x;
    hadamard_transform_ref(ref.data(), rows, n);

    std::vector<double> xd = x;
    hadamard_transform(xd.data(), rows, n);
    std::vector<float> xf(x.begin(), x.end());
    hadamard_transform(xf.data(), rows, n);
    const double err_d = max_abs_diff(xd, ref);
    const double err_f = max_abs_diff(std::vector<double>(xf.begin(), xf.end()), ref);
    std::printf("n=%-6lld K=%-4lld rows=%lld  max|fp64−ref| %.2e  max|fp32−ref| %.2e\n",
                static_cast<long long>(n), static_cast<long long>(*hadamard_k(n)),
                static_cast<long long>(rows), err_d, err_f);
    EXPECT_LE(err_d, 1e-12) << "n=" << n;
    EXPECT_LE(err_f, 1e-5) << "n=" << n;
    // An orthogonal map keeps the norm; catches a reference and a fast path that
    // agree on a wrong operator.
    double n0 = 0.0, n1 = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
      n0 += x[i] * x[i];
      n1 += ref[i] * ref[i];
    }
    EXPECT_NEAR(n1 / n0, 1.0, 1e-12) << "n=" << n;
  }
}

TEST(Hadamard, ManyRowsMatchReference) {
  for (int64_t n : {384, 14}) {
    const int64_t rows = 96;
    const std::vector<double> x = random_rows(rows, n, 7);
    std::vector<double> ref = x, got = x;
    hadamard_transform_ref(ref.data(), rows, n);
    hadamard_transform(got.data(), rows, n);
    EXPECT_LE(max_abs_diff(got, ref), 1e-12) << n;
  }
}

// Enough work for the multithreaded path (when QCAL_THREADS > 1): rows are
// independent, so the batch must equal row-by-row calls bit for bit.
TEST(Hadamard, BatchEqualsRowByRow) {
  const int64_t rows = 24, n = 11008;
  const std::vector<double> x = random_rows(rows, n, 9);
  std::vector<float> batch(x.begin(), x.end()), single = batch;
  hadamard_transform(batch.data(), rows, n);
  for (int64_t r = 0; r < rows; ++r) hadamard_transform(single.data() + r * n, 1, n);
  EXPECT_EQ(batch, single);
}

TEST(Hadamard, DenseMatrixIsOrthogonalAndIsTheTransform) {
  for (int64_t n : {12 * 8,  20 * 2, 40, 28 * 4, 36 * 2, 52 * 4, 60 * 2,  108 * 2, 140, 156 * 2,
                    172 * 2, 128,    44, 352,    76 * 2, 92,     116 * 2, 14,      6,   90}) {
    const std::vector<double> h = hadamard_matrix(n);
    ASSERT_EQ(static_cast<int64_t>(h.size()), n * n);
    EXPECT_LE(max_dev_from_identity(mul_bt(h, h, n), n, 1.0), 1e-12) << "n=" << n;

    const int64_t rows = 3;
    const std::vector<double> x = random_rows(rows, n, 11 + n);
    std::vector<double> fast = x;
    hadamard_transform(fast.data(), rows, n);
    EXPECT_LE(max_abs_diff(fast, right_mul(x, h, rows, n)), 1e-12) << "n=" << n;
  }
}

TEST(Hadamard, RandomHadamardIsSeededSignedRowsOfHn) {
  for (int64_t n : {156 * 2, 352, 14}) {
    const std::vector<double> h = hadamard_matrix(n);
    const std::vector<double> r1 = random_hadamard_matrix(n, 5);
    const std::vector<double> r1b = random_hadamard_matrix(n, 5);
    const std::vector<double> r2 = random_hadamard_matrix(n, 6);
    EXPECT_EQ(r1, r1b) << n;
    EXPECT_NE(r1, r2) << n;
    EXPECT_LE(max_dev_from_identity(mul_bt(r1, r1, n), n, 1.0), 1e-12) << n;
    int flipped = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double d = r1[j * n] / h[j * n];
      ASSERT_TRUE(d == 1.0 || d == -1.0);
      flipped += d < 0;
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(r1[j * n + i], d * h[j * n + i]);
    }
    EXPECT_GT(flipped, n / 5) << n;
    EXPECT_LT(flipped, 4 * n / 5) << n;
  }
}

TEST(Hadamard, FoldingIntoWeightRowsKeepsLinearOutput) {
  for (int64_t n : {5120, 352, 14}) {
    const int64_t T = 4, O = 6;
    const std::vector<double> x = random_rows(T, n, 21), w = random_rows(O, n, 22);
    auto linear = [&](const std::vector<double>& a, const std::vector<double>& b) {
      std::vector<double> y(static_cast<size_t>(T * O));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t o = 0; o < O; ++o) {
          double s = 0.0;
          for (int64_t i = 0; i < n; ++i) s += a[t * n + i] * b[o * n + i];
          y[t * O + o] = s;
        }
      return y;
    };
    const std::vector<double> y = linear(x, w);
    std::vector<double> xr = x, wr = w;
    hadamard_transform(xr.data(), T, n);
    hadamard_transform(wr.data(), O, n);
    const double err = max_abs_diff(linear(xr, wr), y);
    std::printf("x·Wᵀ invariance, n=%lld: max err %.2e\n", static_cast<long long>(n), err);
    EXPECT_LE(err, 1e-9) << n;
    EXPECT_GT(max_abs_diff(xr, x), 0.1) << n;  // the transform did something
  }
}

TEST(Hadamard, KroneckerFactorsReproduceTheOperator) {
  for (int64_t n : {11008, 5120, 384, 4096, 14336, 352, 29568, 14, 940}) {
    std::vector<double> L, R;
    hadamard_kron_factors(n, &L, &R);
    const int64_t K = *hadamard_k(n), P = n / K;
    ASSERT_EQ(static_cast<int64_t>(L.size()), K * K);
    ASSERT_EQ(static_cast<int64_t>(R.size()), P * P);
    EXPECT_LE(max_dev_from_identity(mul_bt(L, L, K), K, 1.0), 1e-12) << n;
    if (P <= 512) {
      EXPECT_LE(max_dev_from_identity(mul_bt(R, R, P), P, 1.0), 1e-12) << n;
    }

    // y = x (L ⊗ R) ⇔ Y = Lᵀ X R with X the row viewed as (K, P).
    const std::vector<double> x = random_rows(1, n, 31 + n);
    std::vector<double> xr(static_cast<size_t>(n), 0.0), y(static_cast<size_t>(n), 0.0);
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < P; ++b) {
        const double xv = x[a * P + b];
        if (xv == 0.0) continue;
        for (int64_t c = 0; c < P; ++c) xr[a * P + c] += xv * R[b * P + c];
      }
    for (int64_t a = 0; a < K; ++a)
      for (int64_t d = 0; d < K; ++d) {
        const double l = L[a * K + d];
        for (int64_t c = 0; c < P; ++c) y[d * P + c] += l * xr[a * P + c];
      }
    std::vector<double> fast = x;
    hadamard_transform(fast.data(), 1, n);
    EXPECT_LE(max_abs_diff(fast, y), 1e-12) << "n=" << n;
  }
}

}  // namespace
}  // namespace qcal

// labels: unit
// Walsh–Hadamard transforms (kernels/hadamard.h): every K×K table is a Hadamard
// matrix, the fast transform matches the dense fp64 reference on random rows of
// real model sizes, and the operator is orthogonal in all its forms (dense matrix,
// Kronecker factors, weight folding).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "common/rng.h"
#include "kernels/hadamard.h"

namespace qcal {
namespace {

constexpr int64_t kOrders[] = {1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172};

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

TEST(Hadamard, EveryTableIsHadamard) {
  for (int64_t K : kOrders) {
    const std::vector<int8_t>& h = hadamard_table(K);
    ASSERT_EQ(static_cast<int64_t>(h.size()), K * K) << "K=" << K;
    for (int8_t v : h) ASSERT_TRUE(v == 1 || v == -1) << "K=" << K;
    int64_t worst = 0;
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) {
        int64_t dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += h[i * K + k] * h[j * K + k];
        worst = std::max<int64_t>(worst, std::llabs(dot - (i == j ? K : 0)));
      }
    EXPECT_EQ(worst, 0) << "H·Hᵀ != K·I for K=" << K;
  }
}

TEST(Hadamard, ChoosesKLikeQuaRot) {
  const std::pair<int64_t, int64_t> cases[] = {
      {11008, 172}, {13824, 108}, {14336, 28}, {28672, 28}, {5120, 40}, {40, 40},   {4096, 1},
      {8192, 1},    {128, 1},     {1, 1},      {384, 12},   {172, 172}, {312, 156}, {140 * 4, 140},
      {60 * 2, 60}, {52 * 8, 52}, {36, 36},    {20, 20},    {12, 12}};
  for (auto [n, K] : cases) {
    Result<int64_t> k = hadamard_k(n);
    ASSERT_TRUE(k.is_ok()) << n;
    EXPECT_EQ(*k, K) << "n=" << n;
  }
  for (int64_t bad : {11, 1000, 0, -4, 44, 100, 172 * 3}) {
    Result<int64_t> k = hadamard_k(bad);
    ASSERT_FALSE(k.is_ok()) << bad;
    EXPECT_EQ(k.status().code(), Code::kInvalidInput) << bad;
  }
}

TEST(Hadamard, FastMatchesReferenceOnModelSizes) {
  struct Case {
    int64_t n, rows;
  };
  const Case cases[] = {{128, 3}, {384, 3}, {5120, 2}, {11008, 2}, {13824, 1}, {14336, 1}};
  uint64_t seed = 100;
  for (const Case& c : cases) {
    const std::vector<double> x = random_rows(c.rows, c.n, ++seed);
    std::vector<double> ref = x;
    hadamard_transform_ref(ref.data(), c.rows, c.n);

    std::vector<double> xd = x;
    hadamard_transform(xd.data(), c.rows, c.n);
    std::vector<float> xf(x.begin(), x.end());
    hadamard_transform(xf.data(), c.rows, c.n);
    const double err_d = max_abs_diff(xd, ref);
    const double err_f = max_abs_diff(std::vector<double>(xf.begin(), xf.end()), ref);
    std::printf("n=%-6lld K=%-4lld rows=%lld  max|fp64−ref| %.2e  max|fp32−ref| %.2e\n",
                static_cast<long long>(c.n), static_cast<long long>(*hadamard_k(c.n)),
                static_cast<long long>(c.rows), err_d, err_f);
    EXPECT_LE(err_d, 1e-12) << "n=" << c.n;
    EXPECT_LE(err_f, 1e-5) << "n=" << c.n;
    // An orthogonal map keeps the norm; catches a reference and a fast path that
    // agree on a wrong operator.
    double n0 = 0.0, n1 = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
      n0 += x[i] * x[i];
      n1 += ref[i] * ref[i];
    }
    EXPECT_NEAR(n1 / n0, 1.0, 1e-12) << "n=" << c.n;
  }
}

TEST(Hadamard, ManyRowsMatchReference) {
  const int64_t rows = 96, n = 384;
  const std::vector<double> x = random_rows(rows, n, 7);
  std::vector<double> ref = x, got = x;
  hadamard_transform_ref(ref.data(), rows, n);
  hadamard_transform(got.data(), rows, n);
  EXPECT_LE(max_abs_diff(got, ref), 1e-12);
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
  for (int64_t n :
       {12 * 8, 20 * 2, 40, 28 * 4, 36 * 2, 52 * 4, 60 * 2, 108 * 2, 140, 156 * 2, 172 * 2, 128}) {
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

TEST(Hadamard, RandomHadamardIsSignedRowsOfHn) {
  const int64_t n = 156 * 2;
  const std::vector<double> h = hadamard_matrix(n);
  const std::vector<double> r1 = random_hadamard_matrix(n, 5);
  const std::vector<double> r1b = random_hadamard_matrix(n, 5);
  const std::vector<double> r2 = random_hadamard_matrix(n, 6);
  EXPECT_EQ(r1, r1b);
  EXPECT_NE(r1, r2);
  EXPECT_LE(max_dev_from_identity(mul_bt(r1, r1, n), n, 1.0), 1e-12);
  int flipped = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = r1[j * n] / h[j * n];
    ASSERT_TRUE(d == 1.0 || d == -1.0);
    flipped += d < 0;
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(r1[j * n + i], d * h[j * n + i]);
  }
  EXPECT_GT(flipped, n / 4);
  EXPECT_LT(flipped, 3 * n / 4);
}

TEST(Hadamard, FoldingIntoWeightRowsKeepsLinearOutput) {
  const int64_t T = 4, O = 6, n = 5120;
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
  EXPECT_LE(err, 1e-9);
  EXPECT_GT(max_abs_diff(xr, x), 0.1);  // the transform did something
}

TEST(Hadamard, KroneckerFactorsReproduceTheOperator) {
  for (int64_t n : {11008, 5120, 384, 4096, 14336}) {
    std::vector<double> L, R;
    hadamard_kron_factors(n, &L, &R);
    const int64_t K = *hadamard_k(n), P = n / K;
    ASSERT_EQ(static_cast<int64_t>(L.size()), K * K);
    ASSERT_EQ(static_cast<int64_t>(R.size()), P * P);
    EXPECT_LE(max_dev_from_identity(mul_bt(L, L, K), K, 1.0), 1e-12);
    if (P <= 512) {
      EXPECT_LE(max_dev_from_identity(mul_bt(R, R, P), P, 1.0), 1e-12);
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

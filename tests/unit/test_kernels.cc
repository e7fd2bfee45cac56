// Every fast kernel against its scalar fp64 reference on fresh random inputs.
// Tolerance, once per op: |got − ref| ≤ atol + rtol·|ref|; a NaN in either
// fails. Failures (and passes) print the max difference and the share of the
// budget used. Letters: T tokens, C channels, n_h / n_kv heads, d head dim.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"

namespace qcal {
namespace {

struct Tol {
  double atol, rtol;
};

// Compares got (float) with ref (double); returns a failure message or "".
template <typename G>
::testing::AssertionResult close(const char* what, const G* got, const double* ref, size_t n,
                                 Tol tol) {
  double max_diff = 0.0, max_share = 0.0;
  size_t worst = 0, nan_at = n;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(got[i]);
    if (std::isnan(g) || std::isnan(ref[i])) {
      nan_at = i;
      break;
    }
    const double diff = std::fabs(g - ref[i]);
    const double share = diff / (tol.atol + tol.rtol * std::fabs(ref[i]));
    if (diff > max_diff) max_diff = diff;
    if (share > max_share) {
      max_share = share;
      worst = i;
    }
  }
  if (nan_at < n)
    return ::testing::AssertionFailure() << what << ": NaN at " << nan_at << " (got " << got[nan_at]
                                         << ", ref " << ref[nan_at] << ")";
  std::printf("  %-40s n=%-8zu max|diff|=%.3g  budget used %.1f%%\n", what, n, max_diff,
              100.0 * max_share);
  if (max_share > 1.0)
    return ::testing::AssertionFailure()
           << what << ": max |diff| " << max_diff << ", worst at " << worst << " got " << got[worst]
           << " ref " << ref[worst] << " uses " << 100.0 * max_share << "% of atol " << tol.atol
           << " + rtol " << tol.rtol << "·|ref|";
  return ::testing::AssertionSuccess();
}

std::vector<float> randn(Rng& rng, size_t n, double scale = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(scale * rng.normal());
  return v;
}
std::vector<double> f64(const std::vector<float>& v) { return {v.begin(), v.end()}; }

TEST(Tolerance, NanNeverPasses) {
  const float got[3] = {1.0f, std::numeric_limits<float>::quiet_NaN(), 3.0f};
  const double ref[3] = {1.0, 2.0, 3.0};
  EXPECT_FALSE(close("nan in got", got, ref, 3, {1e9, 1e9}));
  const float got2[3] = {1.0f, 2.0f, 3.0f};
  const double ref2[3] = {1.0, std::numeric_limits<double>::quiet_NaN(), 3.0};
  EXPECT_FALSE(close("nan in ref", got2, ref2, 3, {1e9, 1e9}));
  const double off[3] = {1.0, 2.1, 3.0};
  EXPECT_FALSE(close("off by 0.1", got2, off, 3, {1e-3, 1e-3}));
}

TEST(Kernels, RmsNormMatchesRef) {
  const Tol tol{1e-6, 1e-5};
  Rng rng(1);
  struct Shape {
    int64_t rows, C;
  };
  for (Shape s : {Shape{1, 64}, Shape{7, 100}, Shape{33, 4096}, Shape{300, 2048}}) {
    auto x = randn(rng, s.rows * s.C, 3.0), g = randn(rng, s.C);
    const double eps = 1e-5;
    std::vector<float> out(x.size());
    rmsnorm_forward(out.data(), x.data(), g.data(), s.rows, s.C, static_cast<float>(eps));
    std::vector<double> ref(x.size());
    auto xd = f64(x), gd = f64(g);
    rmsnorm_forward_ref(ref.data(), xd.data(), gd.data(), s.rows, s.C, eps);
    const std::string what = "rmsnorm " + std::to_string(s.rows) + "x" + std::to_string(s.C);
    EXPECT_TRUE(close(what.c_str(), out.data(), ref.data(), out.size(), tol));
    // In place (out aliases x) gives the same bits.
    std::vector<float> inplace = x;
    rmsnorm_forward(inplace.data(), inplace.data(), g.data(), s.rows, s.C, static_cast<float>(eps));
    EXPECT_EQ(inplace, out);
  }
}

TEST(Kernels, RopeMatchesRef) {
  const Tol tol{1e-5, 1e-5};
  Rng rng(2);
  struct Case {
    int64_t T, heads, d, pos0;
    double theta;
  };
  for (Case c : {Case{1, 1, 64, 0, 1e4}, Case{17, 8, 64, 0, 1e4}, Case{33, 2, 128, 5, 5e5},
                 Case{257, 4, 64, 1791, 1e4}, Case{2048, 1, 128, 0, 5e5}}) {
    auto x = randn(rng, c.T * c.heads * c.d);
    auto ref = f64(x);
    rope_forward(x.data(), c.T, c.heads, c.d, c.pos0, c.theta);
    rope_forward_ref(ref.data(), c.T, c.heads, c.d, c.pos0, c.theta);
    const std::string what = "rope T=" + std::to_string(c.T) + " heads=" + std::to_string(c.heads) +
                             " d=" + std::to_string(c.d) + " pos0=" + std::to_string(c.pos0);
    EXPECT_TRUE(close(what.c_str(), x.data(), ref.data(), x.size(), tol));
  }
}

TEST(Kernels, RopeRotatesHalves) {
  // Hand-derived: d = 4, position 1, theta = 100: pair 0 turns by 1 rad, pair 1
  // by 1/10 rad; x = (1, 0, 0, 0) → (cos 1, 0, sin 1, 0).
  float x[8] = {0, 0, 0, 0, 1, 0, 0, 0};  // tokens 0 and 1, one head
  rope_forward(x, 2, 1, 4, 0, 100.0);
  EXPECT_FLOAT_EQ(x[4], std::cos(1.0f));
  EXPECT_FLOAT_EQ(x[6], std::sin(1.0f));
  EXPECT_EQ(x[5], 0.0f);
  EXPECT_EQ(x[7], 0.0f);
}

TEST(Kernels, AttentionMatchesRef) {
  const Tol tol{2e-6, 2e-5};
  Rng rng(3);
  struct Case {
    int64_t T, n_h, n_kv, d;
  };
  for (Case c : {Case{1, 8, 2, 64}, Case{17, 8, 2, 64}, Case{33, 4, 4, 128}, Case{31, 8, 1, 64},
                 Case{300, 8, 2, 64}, Case{513, 2, 2, 128}, Case{2048, 2, 1, 64}}) {
    auto q = randn(rng, c.T * c.n_h * c.d, 0.5), k = randn(rng, c.T * c.n_kv * c.d, 0.5),
         v = randn(rng, c.T * c.n_kv * c.d);
    std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
    attention_forward(out.data(), q.data(), k.data(), v.data(), c.T, c.n_h, c.n_kv, c.d);
    std::vector<double> ref(q.size());
    auto qd = f64(q), kd = f64(k), vd = f64(v);
    attention_forward_ref(ref.data(), qd.data(), kd.data(), vd.data(), c.T, c.n_h, c.n_kv, c.d);
    const std::string what = "attention T=" + std::to_string(c.T) +
                             " n_h=" + std::to_string(c.n_h) + " n_kv=" + std::to_string(c.n_kv) +
                             " d=" + std::to_string(c.d);
    EXPECT_TRUE(close(what.c_str(), out.data(), ref.data(), out.size(), tol));
  }
}

TEST(Kernels, AttentionFirstTokenCopiesV) {
  // Hand-derived: token 0 sees only itself, so its output is v[0] of its KV head.
  Rng rng(4);
  const int64_t T = 5, n_h = 4, n_kv = 2, d = 8;
  auto q = randn(rng, T * n_h * d), k = randn(rng, T * n_kv * d), v = randn(rng, T * n_kv * d);
  std::vector<float> out(q.size());
  attention_forward(out.data(), q.data(), k.data(), v.data(), T, n_h, n_kv, d);
  for (int64_t h = 0; h < n_h; ++h)
    for (int64_t e = 0; e < d; ++e) EXPECT_FLOAT_EQ(out[h * d + e], v[(h / 2) * d + e]);
}

TEST(Kernels, SwigluMatchesRef) {
  const Tol tol{1e-6, 1e-5};
  Rng rng(5);
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{300000}}) {
    auto g = randn(rng, n, 4.0), u = randn(rng, n);
    if (n > 4) {  // saturating ends: exp overflows to inf, silu → -0 and x
      g[0] = -200.0f;
      g[1] = 200.0f;
      g[2] = -90.0f;
    }
    std::vector<float> out(n);
    swiglu_forward(out.data(), g.data(), u.data(), n);
    std::vector<double> ref(n);
    auto gd = f64(g), ud = f64(u);
    swiglu_forward_ref(ref.data(), gd.data(), ud.data(), n);
    const std::string what = "swiglu n=" + std::to_string(n);
    EXPECT_TRUE(close(what.c_str(), out.data(), ref.data(), out.size(), tol));
  }
}

TEST(Kernels, LogSoftmaxMatchesRef) {
  const Tol tol{2e-5, 1e-6};
  Rng rng(6);
  struct Shape {
    int64_t rows, V;
  };
  for (Shape s : {Shape{1, 1}, Shape{5, 97}, Shape{64, 32000}, Shape{3, 128256}}) {
    auto x = randn(rng, s.rows * s.V, 5.0);
    x[0] += 60.0f;  // a far-off max, as in peaked logits
    auto ref = f64(x);
    log_softmax_rows(x.data(), s.rows, s.V);
    log_softmax_rows_ref(ref.data(), s.rows, s.V);
    const std::string what = "log_softmax " + std::to_string(s.rows) + "x" + std::to_string(s.V);
    EXPECT_TRUE(close(what.c_str(), x.data(), ref.data(), x.size(), tol));
  }
}

TEST(Kernels, SgemmMatchesRefAllTransposesWithStrides) {
  Rng rng(7);
  const int64_t M = 37, N = 53, K = 71, pad = 5;
  const float alpha = 0.75f, beta = -0.5f;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      // Stored shapes: A (M,K) or (K,M); B (K,N) or (N,K); each row padded.
      const int64_t a_rows = ta ? K : M, a_cols = ta ? M : K;
      const int64_t b_rows = tb ? N : K, b_cols = tb ? K : N;
      const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = N + pad;
      auto A = randn(rng, a_rows * lda), B = randn(rng, b_rows * ldb), C0 = randn(rng, M * ldc);
      auto C = C0, Cref = C0;
      sgemm(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
      sgemm_ref(ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, Cref.data(), ldc);
      // Exact fp64 value of each output (sgemm_ref itself rounds to float).
      std::vector<double> want(M * N);
      std::vector<float> got(M * N);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0.0;
          for (int64_t k = 0; k < K; ++k)
            acc += static_cast<double>(ta ? A[k * lda + m] : A[m * lda + k]) *
                   (tb ? B[n * ldb + k] : B[k * ldb + n]);
          want[m * N + n] = alpha * acc + static_cast<double>(beta) * C0[m * ldc + n];
          got[m * N + n] = C[m * ldc + n];
          EXPECT_NEAR(Cref[m * ldc + n], want[m * N + n], 1e-5);
          for (int64_t p = N; p < ldc; ++p) ASSERT_EQ(C[m * ldc + p], C0[m * ldc + p]) << "pad";
        }
      const std::string what =
          std::string("sgemm ") + (ta ? "T" : "N") + (tb ? "T" : "N") + " 37x53x71";
      EXPECT_TRUE(close(what.c_str(), got.data(), want.data(), got.size(), {1e-4, 1e-5}));
    }
}

TEST(Kernels, LinearForwardAddsBias) {
  Rng rng(8);
  const int64_t T = 9, I = 33, O = 17;
  auto X = randn(rng, T * I), W = randn(rng, O * I), b = randn(rng, O);
  std::vector<float> Y(T * O);
  linear_forward(Y.data(), X.data(), W.data(), b.data(), T, I, O);
  std::vector<double> ref(T * O);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o) {
      double acc = b[o];
      for (int64_t i = 0; i < I; ++i) acc += static_cast<double>(X[t * I + i]) * W[o * I + i];
      ref[t * O + o] = acc;
    }
  EXPECT_TRUE(close("linear_forward 9x33->17 +bias", Y.data(), ref.data(), Y.size(), {1e-5, 1e-5}));
}

}  // namespace
}  // namespace qcal

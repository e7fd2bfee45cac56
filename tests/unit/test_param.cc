// labels: unit
// Parameterizations and optimizers of the learned transforms (worker/calib/param.h):
// small linear algebra, decompose_dim, Cayley map and its backward, the SVD factor
// and its backward (float64 central finite differences), AdamW against PyTorch's
// formulas, the cosine schedule, and SpinQuant's Cayley SGD on the Stiefel manifold.
// All matrices are row-major n×n double.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "common/rng.h"
#include "worker/calib/param.h"

namespace qcal::calib {
namespace {

using Mat = std::vector<double>;

Mat randn(int64_t rows, int64_t cols, Rng& rng, double scale = 1.0) {
  Mat A(static_cast<size_t>(rows * cols));
  for (double& x : A) x = scale * rng.normal();
  return A;
}

// C (n×m) = A (n×k) B (k×m), written independently of param.cc.
Mat mul(const Mat& A, const Mat& B, int64_t n, int64_t k, int64_t m) {
  Mat C(static_cast<size_t>(n * m), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double s = 0.0;
      for (int64_t l = 0; l < k; ++l) s += A[i * k + l] * B[l * m + j];
      C[i * m + j] = s;
    }
  return C;
}

Mat tr(const Mat& A, int64_t n) {
  Mat T(A.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) T[j * n + i] = A[i * n + j];
  return T;
}

double dot(const Mat& a, const Mat& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

double max_abs_diff(const Mat& a, const Mat& b) {
  EXPECT_EQ(a.size(), b.size());
  double e = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(a[i] - b[i]);
    if (!(d <= e)) e = d;  // NaN propagates and fails the caller's bound
  }
  return e;
}

// Central difference of f at every entry of x (restored afterwards).
Mat finite_diff(Mat& x, const std::function<double()>& f, double h = 1e-6) {
  Mat g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f();
    x[i] = x0 - h;
    const double fm = f();
    x[i] = x0;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}

TEST(DecomposeDim, MatchesTable) {
  const struct {
    int64_t n, n1, n2;
  } kTable[] = {{4096, 64, 64},    {5120, 64, 80},    {8192, 64, 128},   {11008, 86, 128},
                {13824, 108, 128}, {14336, 112, 128}, {28672, 128, 224}, {3584, 56, 64},
                {18944, 128, 148}, {27648, 144, 192}, {1, 1, 1},         {3, 1, 3},
                {12, 2, 6}};
  for (const auto& c : kTable) {
    auto r = decompose_dim(c.n);
    ASSERT_TRUE(r.is_ok()) << c.n << ": " << r.status().to_string();
    EXPECT_EQ(r->first, c.n1) << c.n;
    EXPECT_EQ(r->second, c.n2) << c.n;
    EXPECT_EQ(r->first * r->second, c.n);
  }
}

TEST(DecomposeDim, RejectsTwoModFourAndNonPositive) {
  for (int64_t n : {2, 6, 4098, 11010, 0, -4}) {
    auto r = decompose_dim(n);
    ASSERT_FALSE(r.is_ok()) << n;
    EXPECT_EQ(r.status().code(), Code::kInvalidInput) << n;
  }
}

TEST(LuSolve, SolvesAndDetectsSingular) {
  Rng rng(1);
  const int64_t n = 12, m = 5;
  Mat A = randn(n, n, rng), X = randn(n, m, rng);
  A[0] = 0.0;  // forces a row swap at the first column
  Mat B = mul(A, X, n, n, m);
  ASSERT_TRUE(lu_solve(A, B, n, m));
  EXPECT_LE(max_abs_diff(B, X), 1e-12);
  // Product check: A · solve(A, B) = B.
  Mat B2 = randn(n, m, rng), Xs = B2;
  ASSERT_TRUE(lu_solve(A, Xs, n, m));
  EXPECT_LE(max_abs_diff(mul(A, Xs, n, n, m), B2), 1e-12);

  Mat S = randn(4, 4, rng);
  for (int j = 0; j < 4; ++j) S[3 * 4 + j] = 2.0 * S[1 * 4 + j];  // rank deficient
  for (int j = 0; j < 4; ++j) S[j * 4 + 2] = 0.0;                 // a zero column
  Mat Bs = randn(4, 2, rng);
  EXPECT_FALSE(lu_solve(S, Bs, 4, 2));
}

TEST(RandomOrthogonal, OrthogonalAndSignFixed) {
  Rng rng(2);
  for (int64_t n : {1, 5, 8, 64, 128}) {
    Mat Q = random_orthogonal(n, rng);
    EXPECT_LE(orthogonality_error(Q, n), 1e-12) << n;
  }
  // Same seed, same matrix; and Q = G R⁻¹ with R upper triangular with positive
  // diagonal, i.e. Qᵀ G is upper triangular with positive diagonal.
  const int64_t n = 6;
  Rng a(7), b(7), c(7);
  Mat Q = random_orthogonal(n, a);
  EXPECT_EQ(Q, random_orthogonal(n, b));
  const Mat G = randn(n, n, c);  // the Gaussian matrix random_orthogonal drew
  Mat R = mul(tr(Q, n), G, n, n, n);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_GT(R[i * n + i], 0.0);
    for (int64_t j = 0; j < i; ++j) EXPECT_NEAR(R[i * n + j], 0.0, 1e-12);
  }
  // orthogonality_error sees a perturbation.
  Q[3] += 1e-3;
  EXPECT_GT(orthogonality_error(Q, n), 5e-4);
}

TEST(Cayley, OrthogonalAndMatchesDefinition) {
  Rng rng(3);
  for (int64_t n : {5, 8, 32}) {
    Mat raw = randn(n, n, rng);
    Mat U = cayley(raw, n);
    EXPECT_LE(orthogonality_error(U, n), 1e-12) << n;
    // (I − A/2) U = I + A/2 with A = tril(raw) − tril(raw)ᵀ; the upper triangle
    // and the diagonal of raw do not matter.
    Mat A(raw.size(), 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        A[i * n + j] += raw[i * n + j];
        A[j * n + i] -= raw[i * n + j];
      }
    Mat M(raw.size()), N(raw.size());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        M[i * n + j] = (i == j) - 0.5 * A[i * n + j];
        N[i * n + j] = (i == j) + 0.5 * A[i * n + j];
      }
    EXPECT_LE(max_abs_diff(mul(M, U, n, n, n), N), 1e-12) << n;
    Mat raw2 = raw;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = i; j < n; ++j) raw2[i * n + j] = rng.normal();
    EXPECT_EQ(cayley(raw2, n), U) << n;
  }
  Mat zero(16, 0.0), I(16, 0.0);
  for (int i = 0; i < 4; ++i) I[i * 4 + i] = 1.0;
  EXPECT_EQ(cayley(zero, 4), I);
}

TEST(Cayley, BackwardMatchesFiniteDifferences) {
  for (int64_t n : {5, 8}) {
    Rng rng(10 + n);
    // The training init (a random orthogonal raw) and a generic raw.
    for (int init = 0; init < 2; ++init) {
      Mat raw = init == 0 ? random_orthogonal(n, rng) : randn(n, n, rng);
      const Mat G = randn(n, n, rng);
      const Mat g = cayley_bwd(raw, G, n);
      const Mat fd = finite_diff(raw, [&] { return dot(G, cayley(raw, n)); });
      const double err = max_abs_diff(g, fd);
      EXPECT_LE(err, 1e-8) << "n=" << n << " init=" << init;
      double gmax = 0.0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          if (j >= i) {
            EXPECT_EQ(g[i * n + j], 0.0) << i << "," << j;  // diagonal and strict upper
          } else {
            gmax = std::max(gmax, std::fabs(g[i * n + j]));
          }
        }
      EXPECT_GT(gmax, 1e-2);  // the lower triangle does get gradient
      std::printf("cayley_bwd n=%lld init=%d: max |analytic - fd| = %.3g (max |g| %.3g)\n",
                  static_cast<long long>(n), init, err, gmax);
    }
  }
}

TEST(SvdFactor, MaterializeAndIdentity) {
  Rng rng(4);
  const int64_t n = 8;
  SvdFactor f = SvdFactor::init_random(n, rng);
  EXPECT_EQ(f.num_params(), 2u * 64u + 8u);
  Mat P, Pit;
  f.materialize(&P, &Pit);
  // σ = 1 at init: P is a rotation and P⁻ᵀ = P.
  EXPECT_LE(orthogonality_error(P, n), 1e-12);
  EXPECT_LE(max_abs_diff(P, Pit), 1e-15);
  for (double& s : f.sigma) s = 0.3 + 2.0 * rng.uniform();
  f.materialize(&P, &Pit);
  // P (P⁻ᵀ)ᵀ = P P⁻¹ = I.
  Mat I(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) I[i * n + i] = 1.0;
  const double inv_err = max_abs_diff(mul(P, tr(Pit, n), n, n, n), I);
  EXPECT_LE(inv_err, 1e-12);
  // P = U diag(σ) Vᵀ with U, V the Cayley maps of the raw parameters.
  Mat U = cayley(f.u_raw, n), V = cayley(f.v_raw, n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < n; ++k) U[i * n + k] *= f.sigma[k];
  EXPECT_LE(max_abs_diff(mul(U, tr(V, n), n, n, n), P), 1e-13);
  std::printf("SvdFactor: max |P P^-1 - I| = %.3g\n", inv_err);

  SvdFactor id = SvdFactor::init_identity(n);
  id.materialize(&P, &Pit);
  EXPECT_EQ(P, I);
  EXPECT_EQ(Pit, I);
}

TEST(SvdFactor, BackwardMatchesFiniteDifferences) {
  for (int64_t n : {5, 8}) {
    Rng rng(20 + n);
    SvdFactor f = SvdFactor::init_random(n, rng);
    for (double& s : f.sigma) s = 0.4 + 1.5 * rng.uniform();
    const Mat A = randn(n, n, rng), B = randn(n, n, rng);
    auto loss = [&] {
      Mat P, Pit;
      f.materialize(&P, &Pit);
      return dot(A, P) + dot(B, Pit);
    };
    Mat du, dv, ds;
    f.backward(A, B, &du, &dv, &ds);
    const double eu = max_abs_diff(du, finite_diff(f.u_raw, loss));
    const double ev = max_abs_diff(dv, finite_diff(f.v_raw, loss));
    const double es = max_abs_diff(ds, finite_diff(f.sigma, loss));
    EXPECT_LE(eu, 1e-8) << n;
    EXPECT_LE(ev, 1e-8) << n;
    EXPECT_LE(es, 1e-8) << n;
    std::printf("SvdFactor bwd n=%lld: max err du %.3g dv %.3g dsigma %.3g\n",
                static_cast<long long>(n), eu, ev, es);

    // An empty gradient is zero.
    Mat zero(A.size(), 0.0), du1, dv1, ds1, du2, dv2, ds2;
    f.backward(A, {}, &du1, &dv1, &ds1);
    f.backward(A, zero, &du2, &dv2, &ds2);
    EXPECT_EQ(du1, du2);
    EXPECT_EQ(dv1, dv2);
    EXPECT_EQ(ds1, ds2);
    f.backward({}, B, &du1, &dv1, &ds1);
    f.backward(zero, B, &du2, &dv2, &ds2);
    EXPECT_EQ(du1, du2);
    EXPECT_EQ(dv1, dv2);
    EXPECT_EQ(ds1, ds2);
  }
}

// PyTorch's AdamW (torch.optim.AdamW, amsgrad=False) for one element, written out:
//   t ← t + 1
//   p ← p · (1 − lr·wd)
//   m ← β1·m + (1 − β1)·g
//   v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
struct AdamRef {
  double p, m = 0.0, v = 0.0;
  int t = 0;
  void step(double g, double lr, double wd = 0.01, double b1 = 0.9, double b2 = 0.999,
            double eps = 1e-8) {
    ++t;
    p *= 1.0 - lr * wd;
    m = b1 * m + (1.0 - b1) * g;
    v = b2 * v + (1.0 - b2) * g * g;
    p -= (lr / (1.0 - std::pow(b1, t))) * m /
         (std::sqrt(v) / std::sqrt(1.0 - std::pow(b2, t)) + eps);
  }
};

TEST(AdamW, ThreeStepsMatchPyTorchFormulas) {
  std::vector<double> p = {1.0, -2.0};
  AdamW opt;  // β = (0.9, 0.999), eps 1e-8, wd 0.01
  EXPECT_EQ(opt.add(&p), 0);
  const std::vector<std::vector<double>> g = {{0.5, -1.0}, {0.1, 0.3}, {-0.2, 0.4}};
  const double lr = 0.01;
  // Values computed by hand from the formulas above (independent double arithmetic);
  // step 1 by hand: m̂ = g, v̂ = g², so p = 1·0.9999 − 0.01·0.5/(0.5 + 1e-8) = 0.9899000002.
  const double expect[3][2] = {{0.9899000002, -1.9898000001},
                               {0.9817706006384452, -1.9853225342429126},
                               {0.978228886123465, -1.984323411594224}};
  AdamRef r0{1.0}, r1{-2.0};
  for (int s = 0; s < 3; ++s) {
    opt.step({g[s]}, lr);
    r0.step(g[s][0], lr);
    r1.step(g[s][1], lr);
    EXPECT_NEAR(p[0], expect[s][0], 1e-15) << s;
    EXPECT_NEAR(p[1], expect[s][1], 1e-15) << s;
    EXPECT_NEAR(p[0], r0.p, 1e-15) << s;
    EXPECT_NEAR(p[1], r1.p, 1e-15) << s;
  }
  EXPECT_EQ(opt.steps(), 3);
}

TEST(AdamW, DecoupledWeightDecayAndLrScale) {
  // Zero gradient: the Adam update is 0, only the decay p ← p(1 − lr·wd) acts.
  std::vector<double> p = {3.0, -0.5};
  AdamW opt(AdamWOptions{0.9, 0.999, 1e-8, 0.1});
  opt.add(&p);
  opt.step({{0.0, 0.0}}, 0.05);
  EXPECT_DOUBLE_EQ(p[0], 3.0 * (1.0 - 0.05 * 0.1));
  EXPECT_DOUBLE_EQ(p[1], -0.5 * (1.0 - 0.05 * 0.1));
  opt.step({{0.0, 0.0}}, 0.05);
  EXPECT_DOUBLE_EQ(p[0], 3.0 * (1.0 - 0.05 * 0.1) * (1.0 - 0.05 * 0.1));

  // lr_scale multiplies the lr of both the decay and the Adam step.
  std::vector<double> a = {0.7}, b = {0.7};
  AdamW o2;
  o2.add(&a, 1.0);
  o2.add(&b, 10.0);
  AdamRef ra{0.7}, rb{0.7};
  const double grads[] = {0.3, -0.8, 0.05, 1.2};
  for (double gv : grads) {
    o2.step({{gv}, {gv}}, 5e-3);
    ra.step(gv, 5e-3);
    rb.step(gv, 5e-2);
  }
  EXPECT_NEAR(a[0], ra.p, 1e-15);
  EXPECT_NEAR(b[0], rb.p, 1e-15);
  EXPECT_GT(std::fabs(b[0] - 0.7), 5.0 * std::fabs(a[0] - 0.7));
}

TEST(AdamW, EmptyGradientSkipsParameterAndItsStepCount) {
  std::vector<double> a = {1.0, 2.0}, b = {-1.0};
  AdamW opt;
  opt.add(&a);
  opt.add(&b);
  AdamRef ra0{1.0}, ra1{2.0}, rb{-1.0};
  opt.step({{0.4, -0.1}, {0.2}}, 0.01);
  ra0.step(0.4, 0.01);
  ra1.step(-0.1, 0.01);
  rb.step(0.2, 0.01);
  // b has no gradient: untouched (no decay either).
  const double b_before = b[0];
  opt.step({{0.3, 0.6}, {}}, 0.01);
  ra0.step(0.3, 0.01);
  ra1.step(0.6, 0.01);
  EXPECT_EQ(b[0], b_before);
  // Missing trailing entries also mean "no gradient".
  opt.step({{-0.2, 0.1}}, 0.01);
  ra0.step(-0.2, 0.01);
  ra1.step(0.1, 0.01);
  EXPECT_EQ(b[0], b_before);
  // b's next step is its 2nd (bias correction with t = 2), not its 4th.
  opt.step({{0.0, 0.0}, {-0.7}}, 0.01);
  ra0.step(0.0, 0.01);
  ra1.step(0.0, 0.01);
  rb.step(-0.7, 0.01);
  EXPECT_EQ(rb.t, 2);
  EXPECT_NEAR(b[0], rb.p, 1e-15);
  EXPECT_NEAR(a[0], ra0.p, 1e-15);
  EXPECT_NEAR(a[1], ra1.p, 1e-15);
  // With t = 4 bias correction the result would differ visibly.
  AdamRef wrong{-1.0};
  wrong.step(0.2, 0.01);
  wrong.t = 3;
  wrong.step(-0.7, 0.01);
  EXPECT_GT(std::fabs(wrong.p - rb.p), 1e-4);
  EXPECT_EQ(opt.steps(), 4);
}

TEST(CosineLr, EndpointsAndMidpoint) {
  const double base = 5e-3, eta_min = 5e-6;
  const int64_t T = 480;
  EXPECT_DOUBLE_EQ(cosine_lr(base, eta_min, 0, T), base);
  EXPECT_NEAR(cosine_lr(base, eta_min, T, T), eta_min, 1e-18);
  EXPECT_NEAR(cosine_lr(base, eta_min, T / 2, T), 0.5 * (base + eta_min), 1e-18);
  EXPECT_NEAR(cosine_lr(base, eta_min, T / 4, T),
              eta_min + (base - eta_min) * (1.0 + std::sqrt(0.5)) / 2.0, 1e-18);
  // Monotone decreasing on [0, T].
  for (int64_t t = 1; t <= T; ++t)
    EXPECT_LT(cosine_lr(base, eta_min, t, T), cosine_lr(base, eta_min, t - 1, T));
  // The clip groups: base 5e-2 decays to the same absolute eta_min.
  EXPECT_NEAR(cosine_lr(5e-2, eta_min, T, T), eta_min, 1e-18);
}

// f(R) = ‖R − Target‖², ∂f/∂R = 2(R − Target).
double frob_dist2(const Mat& R, const Mat& T) {
  double s = 0.0;
  for (size_t i = 0; i < R.size(); ++i) s += (R[i] - T[i]) * (R[i] - T[i]);
  return s;
}

TEST(StiefelSgd, StaysOrthogonalAndDescends) {
  const int64_t n = 8;
  for (bool reorth : {false, true}) {
    Rng rng(5);
    Mat R = random_orthogonal(n, rng);
    const Mat Target = random_orthogonal(n, rng);
    const double f0 = frob_dist2(R, Target);
    double worst_orth = 0.0, prev = f0;
    int increases = 0;
    for (int s = 0; s < 50; ++s) {
      Mat G(R.size());
      for (size_t i = 0; i < R.size(); ++i) G[i] = 2.0 * (R[i] - Target[i]);
      stiefel_sgd_step(R, G, n, 0.1, reorth && s % 10 == 0);
      worst_orth = std::max(worst_orth, orthogonality_error(R, n));
      const double f = frob_dist2(R, Target);
      if (f > prev + 1e-12) ++increases;
      prev = f;
    }
    const double f50 = frob_dist2(R, Target);
    EXPECT_LE(worst_orth, 1e-10) << reorth;
    EXPECT_EQ(increases, 0) << reorth;
    EXPECT_LT(f50, 0.5 * f0) << reorth;
    std::printf("stiefel reorth=%d: f0 %.4f f50 %.4f, max orth err %.3g\n", reorth, f0, f50,
                worst_orth);
  }
}

TEST(StiefelSgd, ReachesTargetInSameComponent) {
  // Target = R0 · Cayley(small skew): same connected component, so f → 0.
  const int64_t n = 6;
  Rng rng(6);
  Mat R = random_orthogonal(n, rng);
  const Mat Target = mul(R, cayley(randn(n, n, rng, 0.5), n), n, n, n);
  for (int s = 0; s < 200; ++s) {
    Mat G(R.size());
    for (size_t i = 0; i < R.size(); ++i) G[i] = 2.0 * (R[i] - Target[i]);
    stiefel_sgd_step(R, G, n, 0.1, false);
  }
  EXPECT_LE(frob_dist2(R, Target), 1e-8);
  EXPECT_LE(orthogonality_error(R, n), 1e-10);
}

TEST(StiefelSgd, ExactSolveIsTheReferenceFixedPoint) {
  // SpinQuant's loop: X unit-row R, V = −Gᵀ, Ŵ = V X − ½ Xᵀ X V X, W = Ŵ − Ŵᵀ,
  // α = min(lr, 1/(‖W‖₁ + 1e-8)), Y₀ = Xᵀ + αV, Y ← Xᵀ + αW(Xᵀ + Y)/2, R = Yᵀ.
  const int64_t n = 7;
  Rng rng(8);
  const Mat R0 = random_orthogonal(n, rng);
  for (double gscale : {1.0, 0.05}) {
    const Mat G = randn(n, n, rng, gscale);
    const double lr = 0.1;
    const Mat X = R0, Xt = tr(R0, n);
    Mat V = tr(G, n);
    for (double& x : V) x = -x;
    const Mat MX = mul(V, X, n, n, n);
    const Mat XXMX = mul(Xt, mul(X, MX, n, n, n), n, n, n);
    Mat Wh(MX.size()), W(MX.size());
    for (size_t i = 0; i < W.size(); ++i) Wh[i] = MX[i] - 0.5 * XXMX[i];
    const Mat Wht = tr(Wh, n);
    for (size_t i = 0; i < W.size(); ++i) W[i] = Wh[i] - Wht[i];
    double norm1 = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      double c = 0.0;
      for (int64_t i = 0; i < n; ++i) c += std::fabs(W[i * n + j]);
      norm1 = std::max(norm1, c);
    }
    const double alpha = std::min(lr, 1.0 / (norm1 + 1e-8));
    auto loop = [&](int iters) {
      Mat Y = Xt;
      for (size_t i = 0; i < Y.size(); ++i) Y[i] += alpha * V[i];
      for (int k = 0; k < iters; ++k) {
        Mat S = Xt;
        for (size_t i = 0; i < S.size(); ++i) S[i] = 0.5 * (Xt[i] + Y[i]);
        const Mat WS = mul(W, S, n, n, n);
        for (size_t i = 0; i < Y.size(); ++i) Y[i] = Xt[i] + alpha * WS[i];
      }
      return tr(Y, n);
    };
    Mat R = R0;
    stiefel_sgd_step(R, G, n, lr, false);
    const Mat Rstar = loop(200);
    const double d_fixed = max_abs_diff(R, Rstar);
    const double d5 = max_abs_diff(R, loop(5));
    // The loop's error contracts by αW/2 per iteration: ‖e₅‖ ≤ q⁵ ‖e₀‖₁ with
    // q = α‖W‖₁/2 and e₀ = Y₀ − Y* (column-sum norms bound the max entry).
    const double q = alpha * norm1 / 2.0;
    const Mat E0 = [&] {
      Mat e = tr(loop(0), n), ys = tr(Rstar, n);
      for (size_t i = 0; i < e.size(); ++i) e[i] -= ys[i];
      return e;
    }();
    double e0 = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      double c = 0.0;
      for (int64_t i = 0; i < n; ++i) c += std::fabs(E0[i * n + j]);
      e0 = std::max(e0, c);
    }
    EXPECT_LE(d_fixed, 1e-13) << gscale;
    EXPECT_LE(d5, std::pow(q, 5) * e0 + 1e-15) << gscale;
    EXPECT_GT(d5, 0.0) << gscale;  // the loop is not the exact solve
    std::printf("stiefel vs reference loop (|G| x%g): alpha %.4g, fixed point %.3g, 5 iters %.3g\n",
                gscale, alpha, d_fixed, d5);
  }
}

TEST(StiefelSgd, ReorthRepairsDrift) {
  const int64_t n = 8;
  Rng rng(9);
  Mat R = random_orthogonal(n, rng);
  for (double& x : R) x += 1e-4 * rng.normal();
  ASSERT_GT(orthogonality_error(R, n), 1e-6);
  Mat zero(R.size(), 0.0);
  Mat R2 = R;
  stiefel_sgd_step(R2, zero, n, 0.1, true);
  EXPECT_LE(orthogonality_error(R2, n), 1e-13);
  EXPECT_LE(max_abs_diff(R2, R), 1e-3);  // a retraction, not a new matrix
}

}  // namespace
}  // namespace qcal::calib

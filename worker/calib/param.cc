// Parameterizations and optimizers of the learned transforms (param.h).
// Matrices are row-major n×n double unless a comment says otherwise. Every
// backward here writes its outputs (`=`), never accumulates.
#include "worker/calib/param.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace qcal::calib {
namespace {

using Mat = std::vector<double>;

size_t sq(int64_t n) { return static_cast<size_t>(n) * static_cast<size_t>(n); }

Mat identity(int64_t n) {
  Mat I(sq(n), 0.0);
  for (int64_t i = 0; i < n; ++i) I[i * n + i] = 1.0;
  return I;
}

Mat transpose(const Mat& A, int64_t n) {
  Mat T(sq(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) T[j * n + i] = A[i * n + j];
  return T;
}

// C = op(A) op(B) with op = transpose when the flag is set (all n×n).
Mat matmul(const Mat& A, bool ta, const Mat& B, bool tb, int64_t n) {
  const Mat At = ta ? transpose(A, n) : Mat();
  const Mat Bt = tb ? transpose(B, n) : Mat();
  const Mat& a = ta ? At : A;
  const Mat& b = tb ? Bt : B;
  Mat C(sq(n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double* c = &C[i * n];
    for (int64_t k = 0; k < n; ++k) {
      const double aik = a[i * n + k];
      if (aik == 0.0) continue;
      const double* bk = &b[k * n];
      for (int64_t j = 0; j < n; ++j) c[j] += aik * bk[j];
    }
  }
  return C;
}

// Q of A = Q R by Householder reflections, with column k of Q multiplied by
// sign(R_kk) (sign 0 taken as +1), i.e. the unique QR whose R has a
// non-negative diagonal. This is scipy.linalg.qr / torch.linalg.qr followed by
// the references' `q *= sign(diag(r))`.
Mat qr_q_signfixed(Mat A, int64_t n) {
  std::vector<Mat> vs(static_cast<size_t>(n));  // reflector k acts on rows k..n-1
  std::vector<double> rdiag(static_cast<size_t>(n), 0.0);
  for (int64_t k = 0; k < n; ++k) {
    double norm2 = 0.0;
    for (int64_t i = k; i < n; ++i) norm2 += A[i * n + k] * A[i * n + k];
    const double norm = std::sqrt(norm2);
    if (norm == 0.0) continue;  // R_kk = 0, no reflection
    const double x0 = A[k * n + k];
    const double alpha = x0 >= 0.0 ? -norm : norm;  // R_kk, avoids cancellation
    Mat v(static_cast<size_t>(n - k));
    for (int64_t i = k; i < n; ++i) v[i - k] = A[i * n + k];
    v[0] -= alpha;
    double vn2 = 0.0;
    for (double x : v) vn2 += x * x;
    if (vn2 == 0.0) {
      rdiag[k] = alpha;
      continue;
    }
    const double inv = 1.0 / std::sqrt(vn2);
    for (double& x : v) x *= inv;
    // A[k:, k:] ← (I − 2 v vᵀ) A[k:, k:]
    for (int64_t j = k; j < n; ++j) {
      double d = 0.0;
      for (int64_t i = k; i < n; ++i) d += v[i - k] * A[i * n + j];
      d *= 2.0;
      for (int64_t i = k; i < n; ++i) A[i * n + j] -= d * v[i - k];
    }
    rdiag[k] = alpha;
    vs[k] = std::move(v);
  }
  // Q = H_0 H_1 … H_{n−1} applied to I, from the last reflector back.
  Mat Q = identity(n);
  for (int64_t k = n - 1; k >= 0; --k) {
    const Mat& v = vs[k];
    if (v.empty()) continue;
    for (int64_t j = 0; j < n; ++j) {
      double d = 0.0;
      for (int64_t i = k; i < n; ++i) d += v[i - k] * Q[i * n + j];
      d *= 2.0;
      for (int64_t i = k; i < n; ++i) Q[i * n + j] -= d * v[i - k];
    }
  }
  for (int64_t k = 0; k < n; ++k) {
    if (rdiag[k] < 0.0)
      for (int64_t i = 0; i < n; ++i) Q[i * n + k] = -Q[i * n + k];
  }
  return Q;
}

// A = T − Tᵀ with T = tril(raw): the strictly lower part of raw, mirrored with a
// minus sign; the diagonal cancels.
Mat skew_from_raw(const Mat& raw, int64_t n) {
  Mat A(sq(n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) {
      A[i * n + j] = raw[i * n + j];
      A[j * n + i] = -raw[i * n + j];
    }
  return A;
}

}  // namespace

bool lu_solve(std::vector<double> A, std::vector<double>& B, int64_t n, int64_t m) {
  QCAL_CHECK(n >= 0 && m >= 0);
  QCAL_CHECK(A.size() == sq(n));
  QCAL_CHECK(B.size() == static_cast<size_t>(n) * static_cast<size_t>(m));
  // Gaussian elimination with row pivoting (the LU factorization applied to B
  // as it is formed), then back substitution.
  for (int64_t k = 0; k < n; ++k) {
    int64_t p = k;
    double best = std::fabs(A[k * n + k]);
    for (int64_t i = k + 1; i < n; ++i) {
      const double a = std::fabs(A[i * n + k]);
      if (a > best) {
        best = a;
        p = i;
      }
    }
    if (!(best > 0.0) || !std::isfinite(best)) return false;
    if (p != k) {
      std::swap_ranges(A.begin() + k * n, A.begin() + (k + 1) * n, A.begin() + p * n);
      std::swap_ranges(B.begin() + k * m, B.begin() + (k + 1) * m, B.begin() + p * m);
    }
    const double piv = A[k * n + k];
    for (int64_t i = k + 1; i < n; ++i) {
      const double f = A[i * n + k] / piv;
      if (f == 0.0) continue;
      A[i * n + k] = 0.0;
      for (int64_t j = k + 1; j < n; ++j) A[i * n + j] -= f * A[k * n + j];
      for (int64_t j = 0; j < m; ++j) B[i * m + j] -= f * B[k * m + j];
    }
  }
  for (int64_t k = n - 1; k >= 0; --k) {
    double* b = &B[k * m];
    for (int64_t i = k + 1; i < n; ++i) {
      const double a = A[k * n + i];
      if (a == 0.0) continue;
      const double* x = &B[i * m];
      for (int64_t j = 0; j < m; ++j) b[j] -= a * x[j];
    }
    const double piv = A[k * n + k];
    for (int64_t j = 0; j < m; ++j) b[j] /= piv;
  }
  return true;
}

std::vector<double> random_orthogonal(int64_t n, Rng& rng) {
  // Gaussian entries drawn in row-major order.
  Mat G(sq(n));
  for (double& x : G) x = rng.normal();
  return qr_q_signfixed(std::move(G), n);
}

double orthogonality_error(const std::vector<double>& A, int64_t n) {
  QCAL_CHECK(A.size() == sq(n));
  double err = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double d = 0.0;
      for (int64_t k = 0; k < n; ++k) d += A[i * n + k] * A[j * n + k];
      if (i == j) d -= 1.0;
      const double e = std::fabs(d);
      if (!(e <= err)) err = e;  // NaN propagates
    }
  return err;
}

std::vector<double> cayley(const std::vector<double>& raw, int64_t n) {
  QCAL_CHECK(raw.size() == sq(n));
  const Mat A = skew_from_raw(raw, n);
  Mat M = identity(n), U = identity(n);  // M = I − A/2, U ← N = I + A/2
  for (size_t i = 0; i < A.size(); ++i) {
    M[i] -= 0.5 * A[i];
    U[i] += 0.5 * A[i];
  }
  // I − A/2 with A skew is never singular (eigenvalues 1 − iλ/2).
  QCAL_CHECK(lu_solve(std::move(M), U, n, n));
  return U;
}

std::vector<double> cayley_bwd(const std::vector<double>& raw, const std::vector<double>& dU,
                               int64_t n) {
  QCAL_CHECK(raw.size() == sq(n) && dU.size() == sq(n));
  const Mat U = cayley(raw, n);
  const Mat A = skew_from_raw(raw, n);
  // Mᵀ = (I − A/2)ᵀ = I + A/2 = N since A is skew.
  Mat N = identity(n);
  for (size_t i = 0; i < A.size(); ++i) N[i] += 0.5 * A[i];
  Mat X = dU;  // X = M⁻ᵀ G
  QCAL_CHECK(lu_solve(std::move(N), X, n, n));
  Mat IpU = U;
  for (int64_t i = 0; i < n; ++i) IpU[i * n + i] += 1.0;
  Mat dA = matmul(X, false, IpU, true, n);  // ∂A = ½ M⁻ᵀ G (I + U)ᵀ
  Mat draw(sq(n), 0.0);
  // ∂T = ∂A − ∂Aᵀ; ∂raw = tril(∂T): zero diagonal, zero strict upper triangle.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) draw[i * n + j] = 0.5 * (dA[i * n + j] - dA[j * n + i]);
  return draw;
}

SvdFactor SvdFactor::init_random(int64_t n, Rng& rng) {
  SvdFactor f;
  f.n = n;
  f.u_raw = random_orthogonal(n, rng);
  f.v_raw = random_orthogonal(n, rng);
  f.sigma.assign(static_cast<size_t>(n), 1.0);
  return f;
}

SvdFactor SvdFactor::init_identity(int64_t n) {
  SvdFactor f;
  f.n = n;
  f.u_raw.assign(sq(n), 0.0);
  f.v_raw.assign(sq(n), 0.0);
  f.sigma.assign(static_cast<size_t>(n), 1.0);
  return f;
}

void SvdFactor::materialize(std::vector<double>* P, std::vector<double>* P_it) const {
  const Mat U = cayley(u_raw, n);
  const Mat V = cayley(v_raw, n);
  auto build = [&](bool inverse) {
    Mat US = U;  // U diag(σ) or U diag(1/σ)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < n; ++k) US[i * n + k] *= inverse ? 1.0 / sigma[k] : sigma[k];
    return matmul(US, false, V, true, n);
  };
  if (P) *P = build(false);
  if (P_it) *P_it = build(true);
}

void SvdFactor::backward(const std::vector<double>& dP, const std::vector<double>& dP_it,
                         std::vector<double>* du_raw, std::vector<double>* dv_raw,
                         std::vector<double>* dsigma) const {
  QCAL_CHECK(dP.empty() || dP.size() == sq(n));
  QCAL_CHECK(dP_it.empty() || dP_it.size() == sq(n));
  const Mat U = cayley(u_raw, n);
  const Mat V = cayley(v_raw, n);
  Mat dU(sq(n), 0.0), dV(sq(n), 0.0);
  std::vector<double> ds(static_cast<size_t>(n), 0.0);
  // For G ∈ {dP with s = σ, dP⁻ᵀ with s = 1/σ}: ∂U += G V S, ∂V += Gᵀ U S,
  // ∂σ_i += (Uᵀ G V)_ii · ∂s_i/∂σ_i.
  auto add = [&](const Mat& G, bool inverse) {
    if (G.empty()) return;
    const Mat GV = matmul(G, false, V, false, n);
    const Mat GtU = matmul(G, true, U, false, n);
    for (int64_t k = 0; k < n; ++k) {
      const double s = inverse ? 1.0 / sigma[k] : sigma[k];
      double diag = 0.0;  // (Uᵀ G V)_kk = Σ_i U_ik (GV)_ik
      for (int64_t i = 0; i < n; ++i) {
        dU[i * n + k] += GV[i * n + k] * s;
        dV[i * n + k] += GtU[i * n + k] * s;
        diag += U[i * n + k] * GV[i * n + k];
      }
      ds[k] += inverse ? -diag / (sigma[k] * sigma[k]) : diag;
    }
  };
  add(dP, false);
  add(dP_it, true);
  if (du_raw) *du_raw = cayley_bwd(u_raw, dU, n);
  if (dv_raw) *dv_raw = cayley_bwd(v_raw, dV, n);
  if (dsigma) *dsigma = std::move(ds);
}

int AdamW::add(std::vector<double>* param, double lr_scale) {
  QCAL_CHECK(param != nullptr);
  Slot s;
  s.p = param;
  s.lr_scale = lr_scale;
  slots_.push_back(std::move(s));
  return static_cast<int>(slots_.size()) - 1;
}

void AdamW::step(const std::vector<std::vector<double>>& grads, double lr) {
  QCAL_CHECK(grads.size() <= slots_.size());
  ++t_;
  for (size_t id = 0; id < grads.size(); ++id) {
    const std::vector<double>& g = grads[id];
    if (g.empty()) continue;  // no grad: PyTorch leaves p and its state untouched
    Slot& s = slots_[id];
    std::vector<double>& p = *s.p;
    QCAL_CHECK(g.size() == p.size());
    if (s.m.empty()) {
      s.m.assign(p.size(), 0.0);
      s.v.assign(p.size(), 0.0);
    }
    ++s.t;
    const double lr_p = lr * s.lr_scale;
    const double decay = 1.0 - lr_p * o_.weight_decay;
    const double bc1 = 1.0 - std::pow(o_.beta1, static_cast<double>(s.t));
    const double bc2 = 1.0 - std::pow(o_.beta2, static_cast<double>(s.t));
    const double step_size = lr_p / bc1;
    const double bc2_sqrt = std::sqrt(bc2);
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= decay;
      s.m[i] = o_.beta1 * s.m[i] + (1.0 - o_.beta1) * g[i];
      s.v[i] = o_.beta2 * s.v[i] + (1.0 - o_.beta2) * g[i] * g[i];
      const double denom = std::sqrt(s.v[i]) / bc2_sqrt + o_.eps;
      p[i] -= step_size * s.m[i] / denom;
    }
  }
}

double cosine_lr(double base, double eta_min, int64_t t, int64_t t_max) {
  if (t_max <= 0) return base;
  const double pi = 3.14159265358979323846;
  return eta_min + (base - eta_min) *
                       (1.0 + std::cos(pi * static_cast<double>(t) / static_cast<double>(t_max))) /
                       2.0;
}

void stiefel_sgd_step(std::vector<double>& R, const std::vector<double>& G, int64_t n, double lr,
                      bool reorth) {
  QCAL_CHECK(R.size() == sq(n) && G.size() == sq(n));
  // 1. X = R with unit rows. SpinQuant's `unit` divides by (norm + 1e-8) in fp32,
  // where 1 + 1e-8 rounds to 1: the epsilon only guards zero rows. In fp64 it
  // would shrink R by 1e-8 every step, so it is applied as a floor instead.
  Mat X = R;
  for (int64_t i = 0; i < n; ++i) {
    double nn = 0.0;
    for (int64_t j = 0; j < n; ++j) nn += X[i * n + j] * X[i * n + j];
    const double inv = 1.0 / std::max(std::sqrt(nn), 1e-8);
    for (int64_t j = 0; j < n; ++j) X[i * n + j] *= inv;
  }
  // 2. QR retraction of Xᵀ, transposed back.
  if (reorth) X = transpose(qr_q_signfixed(transpose(X, n), n), n);
  // 3.–4. V = −Gᵀ; MX = V X; XMX = X MX; XXMX = Xᵀ XMX; Ŵ = MX − ½ XXMX; W = Ŵ − Ŵᵀ.
  Mat V = transpose(G, n);
  for (double& x : V) x = -x;
  const Mat MX = matmul(V, false, X, false, n);
  const Mat XMX = matmul(X, false, MX, false, n);
  const Mat XXMX = matmul(X, true, XMX, false, n);
  Mat What(sq(n));
  for (size_t i = 0; i < What.size(); ++i) What[i] = MX[i] - 0.5 * XXMX[i];
  Mat W(sq(n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) W[i * n + j] = What[i * n + j] - What[j * n + i];
  // 5. α = min(lr, 1/(‖W‖₁ + 1e-8)), ‖W‖₁ the largest column sum of |W|.
  double norm1 = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    double c = 0.0;
    for (int64_t i = 0; i < n; ++i) c += std::fabs(W[i * n + j]);
    norm1 = std::max(norm1, c);
  }
  const double alpha = std::min(lr, 1.0 / (norm1 + 1e-8));
  // 6. The fixed point of the reference's 5 iterations, solved exactly:
  //    (I − αW/2) Y = (I + αW/2) Xᵀ.
  Mat Lhs = identity(n), Rhs = identity(n);
  for (size_t i = 0; i < W.size(); ++i) {
    Lhs[i] -= 0.5 * alpha * W[i];
    Rhs[i] += 0.5 * alpha * W[i];
  }
  Mat Y = matmul(Rhs, false, X, true, n);
  QCAL_CHECK(lu_solve(std::move(Lhs), Y, n, n));  // I − αW/2, W skew: never singular
  // 7. R ← Yᵀ.
  R = transpose(Y, n);
}

Status sum_spans(const std::function<Status(double* data, int64_t n)>& sum,
                 const std::vector<SumSpan>& spans) {
  std::vector<double> buf;
  for (const SumSpan& sp : spans) buf.insert(buf.end(), sp.data, sp.data + sp.n);
  QCAL_RETURN_IF_ERROR(sum(buf.data(), static_cast<int64_t>(buf.size())));
  const double* at = buf.data();
  for (const SumSpan& sp : spans) {
    std::copy(at, at + sp.n, sp.data);
    at += sp.n;
  }
  return Status::ok();
}

}  // namespace qcal::calib

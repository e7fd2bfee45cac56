// CBQ (cbq.h): LoRA-Rounding, CFP, the window loss and the window trainer.
//
// Letters: N sequences of T tokens, H hidden, I intermediate, R/C rows/cols of one
// linear (HF [out, in]), G groups per row, r LoRA rank, k blocks per window.
// Gradients into LoraRoundGrads accumulate (+=); d_hq of window_loss is overwritten.
#include "worker/calib/cbq.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <utility>

#include "common/clock.h"
#include "common/dtype.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "worker/calib/activations.h"
#include "worker/calib/param.h"

namespace qcal::calib {
namespace {

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// h = clip(σ(V)(ζ − γ) + γ, 0, 1) and dh/dV (0 where the clip is active).
struct HVal {
  double h, dh;
};
HVal rect_sigmoid(double v, double zeta, double gamma) {
  const double sg = sigmoid(v);
  const double raw = sg * (zeta - gamma) + gamma;
  if (raw <= 0.0) return {0.0, 0.0};
  if (raw >= 1.0) return {1.0, 0.0};
  return {raw, sg * (1.0 - sg) * (zeta - gamma)};
}
// h⁻¹(f) for f in [0, 1): logit((f − γ)/(ζ − γ)).
double rect_sigmoid_inv(double f, double zeta, double gamma) {
  const double u = std::clamp((f - gamma) / (zeta - gamma), 1e-6, 1.0 - 1e-6);
  return std::log(u / (1.0 - u));
}

template <typename T>
bool has_rounding(const LoraRoundSpec& spec, const LoraRoundParams<T>& p) {
  return spec.rank > 0 && !p.a1.empty();
}
template <typename T>
int64_t rank_of(const LoraRoundParams<T>& p, int64_t R) {
  return R > 0 ? static_cast<int64_t>(p.a1.size()) / R : 0;
}

// V = V0 + A1·A2 (R, C).
template <typename T>
std::vector<T> compute_v(const LoraRoundParams<T>& p, int64_t R, int64_t C) {
  const int64_t r = rank_of(p, R);
  std::vector<T> V;
  if (!p.v0.empty()) {
    V = p.v0;
  } else {
    V.assign(static_cast<size_t>(R * C), T(0));
  }
  if (r > 0)
    gemm_t(false, false, R, C, r, T(1), p.a1.data(), r, p.a2.data(), C, p.v0.empty() ? T(0) : T(1),
           V.data(), C);
  return V;
}

// dA1 += dV·A2ᵀ, dA2 += A1ᵀ·dV.
template <typename T>
void chain_lora(const LoraRoundParams<T>& p, int64_t R, int64_t C, const std::vector<T>& dV,
                LoraRoundGrads<T>* g) {
  const int64_t r = rank_of(p, R);
  if (r == 0) return;
  if (g->a1.empty()) g->a1.assign(p.a1.size(), T(0));
  if (g->a2.empty()) g->a2.assign(p.a2.size(), T(0));
  gemm_t(false, true, R, r, C, T(1), dV.data(), C, p.a2.data(), C, T(1), g->a1.data(), r);
  gemm_t(true, false, r, C, R, T(1), p.a1.data(), r, dV.data(), C, T(1), g->a2.data(), C);
}

// Orthonormalizes the r columns of Y (n, r) in place (modified Gram-Schmidt); a
// column that vanishes is left zero.
void orthonormalize_cols(std::vector<double>& Y, int64_t n, int64_t r) {
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t i = 0; i < j; ++i) {
      double d = 0;
      for (int64_t k = 0; k < n; ++k) d += Y[k * r + i] * Y[k * r + j];
      for (int64_t k = 0; k < n; ++k) Y[k * r + j] -= d * Y[k * r + i];
    }
    double nn = 0;
    for (int64_t k = 0; k < n; ++k) nn += Y[k * r + j] * Y[k * r + j];
    const double inv = nn > 1e-300 ? 1.0 / std::sqrt(nn) : 0.0;
    for (int64_t k = 0; k < n; ++k) Y[k * r + j] *= inv;
  }
}

}  // namespace

const char* lora_init_name(LoraInit i) {
  switch (i) {
    case LoraInit::kResidual: return "residual";
    case LoraInit::kHalf: return "half";
    case LoraInit::kSvd: return "svd";
  }
  return "?";
}

// ================================================================ 1. LoRA-Rounding

template <typename T>
std::vector<T> lora_round_init_scale(const LoraRoundSpec& spec, const T* W, int64_t R, int64_t C) {
  const int64_t G = spec.groups(C), gc = spec.group_cols(C);
  std::vector<T> s(static_cast<size_t>(R * G));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      double amax = 0;
      for (int64_t c = g * gc; c < std::min(C, (g + 1) * gc); ++c)
        amax = std::max(amax, std::fabs(static_cast<double>(W[r * C + c])));
      s[static_cast<size_t>(r * G + g)] = static_cast<T>(std::max(amax / spec.qmax(), 1e-5));
    }
  return s;
}

template <typename T>
LoraRoundParams<T> lora_round_init(const LoraRoundSpec& spec, const T* W, int64_t R, int64_t C,
                                   std::vector<T> scale, LoraInit init, uint64_t seed) {
  LoraRoundParams<T> p;
  p.scale = std::move(scale);
  const int64_t r = std::min<int64_t>(spec.rank, std::min(R, C));
  if (r <= 0) return p;
  const int64_t G = spec.groups(C), gc = spec.group_cols(C);
  // Vt = h⁻¹(frac(W/s)): the V that reproduces W exactly (AdaRound's init).
  auto target = [&]() {
    std::vector<double> Vt(static_cast<size_t>(R * C));
    for (int64_t i = 0; i < R; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(W[i * C + c]) / p.scale[i * G + c / gc];
        Vt[i * C + c] = rect_sigmoid_inv(v - std::floor(v), spec.zeta, spec.gamma);
      }
    return Vt;
  };
  Rng rng(seed * 0x9e3779b97f4a7c15ull + 0x2545f4914f6cdd1dull);
  p.a1.assign(static_cast<size_t>(R * r), T(0));
  p.a2.assign(static_cast<size_t>(r * C), T(0));
  if (init == LoraInit::kSvd) {
    // Randomized range finder with two power iterations: Q (R, r) spans the top
    // singular subspace of Vt; A1 = Q·c, A2 = Qᵀ·Vt / c with ‖A1‖ = ‖A2‖.
    const std::vector<double> Vt = target();
    std::vector<double> Y(static_cast<size_t>(R * r), 0.0), Z(static_cast<size_t>(C * r), 0.0);
    for (auto& z : Z) z = rng.normal();
    for (int it = 0; it < 3; ++it) {
      if (it > 0) {
        orthonormalize_cols(Y, R, r);
        std::fill(Z.begin(), Z.end(), 0.0);
        gemm_t(true, false, C, r, R, 1.0, Vt.data(), C, Y.data(), r, 0.0, Z.data(), r);
      }
      orthonormalize_cols(Z, C, r);
      gemm_t(false, false, R, r, C, 1.0, Vt.data(), C, Z.data(), r, 0.0, Y.data(), r);
    }
    orthonormalize_cols(Y, R, r);
    std::vector<double> B(static_cast<size_t>(r * C), 0.0);
    gemm_t(true, false, r, C, R, 1.0, Y.data(), r, Vt.data(), C, 0.0, B.data(), C);
    double nb = 0;
    for (double b : B) nb += b * b;
    const double cfac = std::sqrt(std::sqrt(nb) / std::sqrt(static_cast<double>(r)));
    const double c = cfac > 0 ? cfac : 1.0;
    for (size_t i = 0; i < Y.size(); ++i) p.a1[i] = static_cast<T>(Y[i] * c);
    for (size_t i = 0; i < B.size(); ++i) p.a2[i] = static_cast<T>(B[i] / c);
    return p;
  }
  const double sd = 1.0 / std::sqrt(static_cast<double>(r));
  for (auto& a : p.a1) a = static_cast<T>(rng.normal() * sd);
  if (init == LoraInit::kResidual) {
    const std::vector<double> Vt = target();
    p.v0.assign(Vt.begin(), Vt.end());
  }
  return p;
}

template <typename T>
void lora_round_fwd(const LoraRoundSpec& spec, const LoraRoundParams<T>& p, const T* W, int64_t R,
                    int64_t C, T* w_hat, bool hard, RoundTape<T>* tape) {
  const int64_t G = spec.groups(C), gc = spec.group_cols(C);
  const bool rnd = has_rounding(spec, p);
  const std::vector<T> V = rnd ? compute_v(p, R, C) : std::vector<T>();
  const double qmin = spec.qmin(), qmax = spec.qmax();
  for (int64_t i = 0; i < R; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const size_t e = static_cast<size_t>(i * C + c);
      const double s = p.scale[static_cast<size_t>(i * G + c / gc)];
      const double v = static_cast<double>(W[e]) / s;
      double base = rnd ? std::floor(v) : std::nearbyint(v);
      const double hs =
          rnd ? rect_sigmoid(static_cast<double>(V[e]), spec.zeta, spec.gamma).h : 0.0;
      double h = hard ? (hs >= 0.5 ? 1.0 : 0.0) : hs;
      if (tape) {
        if (tape->mode == RoundTape<T>::Mode::kRecord) {
          tape->offsets.push_back(static_cast<T>(base - v));
          if (rnd && hard) tape->offsets.push_back(static_cast<T>(h - hs));
        } else {
          base = v + static_cast<double>(tape->offsets[tape->pos++]);
          if (rnd && hard) h = hs + static_cast<double>(tape->offsets[tape->pos++]);
        }
      }
      const double q = std::clamp(base + h, qmin, qmax);
      w_hat[e] = static_cast<T>(s * q);
    }
}

template <typename T>
void lora_round_bwd(const LoraRoundSpec& spec, const LoraRoundParams<T>& p, const T* W, int64_t R,
                    int64_t C, const T* dw_hat, LoraRoundGrads<T>* g, bool hard) {
  const int64_t G = spec.groups(C), gc = spec.group_cols(C);
  const bool rnd = has_rounding(spec, p);
  const std::vector<T> V = rnd ? compute_v(p, R, C) : std::vector<T>();
  std::vector<T> dV(rnd ? static_cast<size_t>(R * C) : 0, T(0));
  if (g->scale.empty()) g->scale.assign(p.scale.size(), T(0));
  const double qmin = spec.qmin(), qmax = spec.qmax();
  std::vector<double> ds(static_cast<size_t>(G));
  for (int64_t i = 0; i < R; ++i) {
    std::fill(ds.begin(), ds.end(), 0.0);
    for (int64_t c = 0; c < C; ++c) {
      const size_t e = static_cast<size_t>(i * C + c);
      const double d = dw_hat[e];
      if (d == 0.0) continue;
      const double s = p.scale[static_cast<size_t>(i * G + c / gc)];
      const double v = static_cast<double>(W[e]) / s;
      HVal hv{0.0, 0.0};
      if (rnd) hv = rect_sigmoid(static_cast<double>(V[e]), spec.zeta, spec.gamma);
      const double h = hard ? (hv.h >= 0.5 ? 1.0 : 0.0) : hv.h;
      const double q = (rnd ? std::floor(v) : std::nearbyint(v)) + h;
      if (q < qmin) {
        ds[static_cast<size_t>(c / gc)] += d * qmin;
      } else if (q > qmax) {
        ds[static_cast<size_t>(c / gc)] += d * qmax;
      } else {
        ds[static_cast<size_t>(c / gc)] += d * (q - v);
        if (rnd) dV[e] = static_cast<T>(d * s * hv.dh);
      }
    }
    for (int64_t k = 0; k < G; ++k)
      g->scale[static_cast<size_t>(i * G + k)] += static_cast<T>(ds[k]);
  }
  if (rnd) chain_lora(p, R, C, dV, g);
}

template <typename T>
double lora_round_reg(const LoraRoundSpec& spec, const LoraRoundParams<T>& p, int64_t R, int64_t C,
                      double beta, double weight, LoraRoundGrads<T>* g) {
  if (!has_rounding(spec, p)) return 0.0;
  const std::vector<T> V = compute_v(p, R, C);
  std::vector<T> dV(g ? V.size() : 0, T(0));
  double sum = 0.0;
  for (size_t e = 0; e < V.size(); ++e) {
    const HVal hv = rect_sigmoid(static_cast<double>(V[e]), spec.zeta, spec.gamma);
    const double u = 2.0 * hv.h - 1.0, au = std::fabs(u);
    sum += 1.0 - std::pow(au, beta);
    if (g && hv.dh != 0.0 && au > 0.0) {
      const double dr_dh = -2.0 * beta * std::pow(au, beta - 1.0) * (u > 0 ? 1.0 : -1.0);
      dV[e] = static_cast<T>(weight * dr_dh * hv.dh);
    }
  }
  if (g) chain_lora(p, R, C, dV, g);
  return sum;
}

template <typename T>
std::vector<int8_t> lora_round_codes(const LoraRoundSpec& spec, const LoraRoundParams<T>& p,
                                     const T* W, int64_t R, int64_t C) {
  const int64_t G = spec.groups(C), gc = spec.group_cols(C);
  const bool rnd = has_rounding(spec, p);
  const std::vector<T> V = rnd ? compute_v(p, R, C) : std::vector<T>();
  std::vector<int8_t> q(static_cast<size_t>(R * C));
  for (int64_t i = 0; i < R; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const size_t e = static_cast<size_t>(i * C + c);
      const double v = static_cast<double>(W[e]) / p.scale[static_cast<size_t>(i * G + c / gc)];
      double h = 0.0;
      if (rnd)
        h = rect_sigmoid(static_cast<double>(V[e]), spec.zeta, spec.gamma).h >= 0.5 ? 1.0 : 0.0;
      const double qq =
          std::clamp((rnd ? std::floor(v) : std::nearbyint(v)) + h,
                     static_cast<double>(spec.qmin()), static_cast<double>(spec.qmax()));
      q[e] = static_cast<int8_t>(qq);
    }
  return q;
}

// ================================================================ 2. CFP

CfpOutliers cfp_detect(const double* values, int64_t n, double lambda1, double lambda2) {
  CfpOutliers out;
  if (n < 4) {
    for (int64_t i = 0; i < n; ++i) out.max_inlier = std::max(out.max_inlier, values[i]);
    return out;
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return values[a] < values[b] || (values[a] == values[b] && a < b);
  });
  std::vector<double> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[i] = values[order[i]];
  auto quantile = [&](double q) {
    const double pos = q * static_cast<double>(n - 1);
    const auto lo = static_cast<int64_t>(std::floor(pos));
    const int64_t hi = std::min(lo + 1, n - 1);
    return x[lo] + (pos - static_cast<double>(lo)) * (x[hi] - x[lo]);
  };
  const double q1 = quantile(0.25), q3 = quantile(0.75);
  out.fence = q3 + lambda1 * (q3 - q1);
  out.max_inlier = x[n - 1];
  int64_t first_coarse = n;
  while (first_coarse > 0 && x[first_coarse - 1] > out.fence) --first_coarse;
  out.coarse = n - first_coarse;
  if (out.coarse == 0) return out;
  // Prefix sums of (x − median) for the variances of L = x[0, k) and U = x[k, n).
  const double shift = quantile(0.5);
  std::vector<double> s1(static_cast<size_t>(n + 1), 0.0), s2(static_cast<size_t>(n + 1), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - shift;
    s1[i + 1] = s1[i] + d;
    s2[i + 1] = s2[i] + d * d;
  }
  auto var = [&](int64_t a, int64_t b) {  // population variance of x[a, b)
    const double m = static_cast<double>(b - a);
    if (m <= 1) return 0.0;
    const double mean = (s1[b] - s1[a]) / m;
    return std::max(0.0, (s2[b] - s2[a]) / m - mean * mean);
  };
  double best = 0.0;
  int64_t best_k = -1;
  for (int64_t k = std::max<int64_t>(first_coarse, 1); k < n; ++k) {
    const double gap = x[k] - x[k - 1];
    const double M = gap * gap - lambda2 * (var(0, k) + var(k, n));
    if (M > best) {
      best = M;
      best_k = k;
    }
  }
  if (best_k < 0) return out;
  for (int64_t i = best_k; i < n; ++i) out.idx.push_back(order[i]);
  std::sort(out.idx.begin(), out.idx.end());
  out.max_inlier = x[best_k - 1];
  return out;
}

template <typename T>
int64_t cfp_truncate_weights(T* W, int64_t R, int64_t C, double lambda1, double lambda2) {
  int64_t count = 0;
  std::vector<double> a(static_cast<size_t>(C));
  for (int64_t i = 0; i < R; ++i) {
    T* w = W + i * C;
    for (int64_t c = 0; c < C; ++c) a[c] = std::fabs(static_cast<double>(w[c]));
    const CfpOutliers o = cfp_detect(a.data(), C, lambda1, lambda2);
    for (int64_t c : o.idx) {
      w[c] = static_cast<T>(w[c] < 0 ? -o.max_inlier : o.max_inlier);
      ++count;
    }
  }
  return count;
}

std::vector<double> cfp_act_scales(const std::vector<double>& channel_max, double lambda1,
                                   double lambda2, double alpha, std::vector<int64_t>* outliers) {
  std::vector<double> s(channel_max.size(), 1.0);
  const CfpOutliers o =
      cfp_detect(channel_max.data(), static_cast<int64_t>(channel_max.size()), lambda1, lambda2);
  if (o.max_inlier > 0)
    for (int64_t j : o.idx) s[j] = std::pow(channel_max[j] / o.max_inlier, alpha);
  if (outliers) *outliers = o.idx;
  return s;
}

// ================================================================ 3. Window loss

template <typename T>
void window_loss_acc(const T* h_fp, const T* h_q, int64_t rows, int64_t H, T* d_hq,
                     double grad_scale, double* sum_mse, double* sum_kl) {
  std::vector<double> p(static_cast<size_t>(H)), q(static_cast<size_t>(H));
  for (int64_t t = 0; t < rows; ++t) {
    const T* a = h_fp + t * H;
    const T* b = h_q + t * H;
    double ma = a[0], mb = b[0], e2 = 0.0;
    for (int64_t j = 0; j < H; ++j) {
      ma = std::max(ma, static_cast<double>(a[j]));
      mb = std::max(mb, static_cast<double>(b[j]));
      const double d = static_cast<double>(b[j]) - a[j];
      e2 += d * d;
    }
    double za = 0.0, zb = 0.0;
    for (int64_t j = 0; j < H; ++j) {
      p[j] = std::exp(a[j] - ma);
      q[j] = std::exp(b[j] - mb);
      za += p[j];
      zb += q[j];
    }
    const double lza = std::log(za), lzb = std::log(zb);
    double k = 0.0;
    for (int64_t j = 0; j < H; ++j) {
      const double lp = a[j] - ma - lza, lq = b[j] - mb - lzb;
      p[j] /= za;
      q[j] /= zb;
      k += p[j] * (lp - lq);
    }
    *sum_mse += e2 / static_cast<double>(H);
    *sum_kl += k;
    if (d_hq) {
      T* d = d_hq + t * H;
      for (int64_t j = 0; j < H; ++j)
        d[j] = static_cast<T>(
            (2.0 * (static_cast<double>(b[j]) - a[j]) / static_cast<double>(H) + q[j] - p[j]) *
            grad_scale);
    }
  }
}

template <typename T>
double window_loss(const T* h_fp, const T* h_q, int64_t rows, int64_t H, T* d_hq, double* mse,
                   double* kl) {
  double sum_mse = 0.0, sum_kl = 0.0;
  const double inv_rows = rows > 0 ? 1.0 / static_cast<double>(rows) : 0.0;
  window_loss_acc(h_fp, h_q, rows, H, d_hq, inv_rows, &sum_mse, &sum_kl);
  if (mse) *mse = sum_mse * inv_rows;
  if (kl) *kl = sum_kl * inv_rows;
  return (sum_mse + sum_kl) * inv_rows;
}

template <typename T>
void head_loss_acc(const T* gamma, const T* W, int64_t V, double eps, const T* h_fp, const T* h_q,
                   int64_t rows, int64_t H, T* d_hq, double grad_scale, double* sum_kl,
                   int64_t max_logits) {
  if (rows <= 0 || V <= 0) return;
  const int64_t rc = std::clamp<int64_t>(max_logits / V, 1, rows);
  std::vector<T> nf(static_cast<size_t>(rc * H)), nq(nf.size()), inv_f(static_cast<size_t>(rc)),
      inv_q(inv_f.size()), zf(static_cast<size_t>(rc * V)), zq(zf.size()), dn, dx;
  if (d_hq) {
    dn.resize(nf.size());
    dx.resize(nf.size());
  }
  const T e = static_cast<T>(eps);
  for (int64_t r0 = 0; r0 < rows; r0 += rc) {
    const int64_t n = std::min(rc, rows - r0);
    rmsnorm_fwd(nf.data(), h_fp + r0 * H, gamma, n, H, e, inv_f.data());
    rmsnorm_fwd(nq.data(), h_q + r0 * H, gamma, n, H, e, inv_q.data());
    gemm_t(false, true, n, V, H, T(1), nf.data(), H, W, H, T(0), zf.data(), V);
    gemm_t(false, true, n, V, H, T(1), nq.data(), H, W, H, T(0), zq.data(), V);
    for (int64_t t = 0; t < n; ++t) {
      const T* a = zf.data() + t * V;
      T* b = zq.data() + t * V;
      double ma = a[0], mb = b[0];
      for (int64_t v = 1; v < V; ++v) {
        ma = std::max(ma, static_cast<double>(a[v]));
        mb = std::max(mb, static_cast<double>(b[v]));
      }
      double za = 0.0, zb = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        za += std::exp(a[v] - ma);
        zb += std::exp(b[v] - mb);
      }
      const double lza = ma + std::log(za), lzb = mb + std::log(zb);
      double kl = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        const double lp = a[v] - lza, lq = b[v] - lzb, p = std::exp(lp);
        kl += p * (lp - lq);
        b[v] = static_cast<T>((std::exp(lq) - p) * grad_scale);  // ∂/∂z_q, scaled
      }
      *sum_kl += kl;
    }
    if (!d_hq) continue;
    gemm_t(false, false, n, H, V, T(1), zq.data(), V, W, H, T(0), dn.data(), H);
    rmsnorm_bwd(dx.data(), static_cast<T*>(nullptr), dn.data(), h_q + r0 * H, gamma, inv_q.data(),
                n, H);
    T* d = d_hq + r0 * H;
    for (int64_t i = 0; i < n * H; ++i) d[i] += dx[static_cast<size_t>(i)];
  }
}

// ================================================================ explicit instantiations

#define QCAL_CBQ_INSTANTIATE(T)                                                                    \
  template std::vector<T> lora_round_init_scale<T>(const LoraRoundSpec&, const T*, int64_t,        \
                                                   int64_t);                                       \
  template LoraRoundParams<T> lora_round_init<T>(const LoraRoundSpec&, const T*, int64_t, int64_t, \
                                                 std::vector<T>, LoraInit, uint64_t);              \
  template void lora_round_fwd<T>(const LoraRoundSpec&, const LoraRoundParams<T>&, const T*,       \
                                  int64_t, int64_t, T*, bool, RoundTape<T>*);                      \
  template void lora_round_bwd<T>(const LoraRoundSpec&, const LoraRoundParams<T>&, const T*,       \
                                  int64_t, int64_t, const T*, LoraRoundGrads<T>*, bool);           \
  template double lora_round_reg<T>(const LoraRoundSpec&, const LoraRoundParams<T>&, int64_t,      \
                                    int64_t, double, double, LoraRoundGrads<T>*);                  \
  template std::vector<int8_t> lora_round_codes<T>(                                                \
      const LoraRoundSpec&, const LoraRoundParams<T>&, const T*, int64_t, int64_t);                \
  template int64_t cfp_truncate_weights<T>(T*, int64_t, int64_t, double, double);                  \
  template double window_loss<T>(const T*, const T*, int64_t, int64_t, T*, double*, double*);      \
  template void window_loss_acc<T>(const T*, const T*, int64_t, int64_t, T*, double, double*,      \
                                   double*);                                                       \
  template void head_loss_acc<T>(const T*, const T*, int64_t, double, const T*, const T*, int64_t, \
                                 int64_t, T*, double, double*, int64_t);
QCAL_CBQ_INSTANTIATE(float)
QCAL_CBQ_INSTANTIATE(double)
#undef QCAL_CBQ_INSTANTIATE

// ================================================================ 4. Windows

Status CbqOptions::validate(const ModelConfig& c) const {
  auto bad = [](const std::string& m) { return invalid_input("cbq: " + m); };
  if (w_bits != 2 && w_bits != 3 && w_bits != 4 && w_bits != 8)
    return bad("w_bits must be 2, 3, 4 or 8, got " + std::to_string(w_bits));
  if (w_group == 0 || w_group < -1) return bad("w_group must be -1 or positive");
  if (a_bits < 2 || a_bits > 16) return bad("a_bits must be in [2, 16]");
  if (kv_bits < 2 || kv_bits > 16) return bad("kv_bits must be in [2, 16]");
  if (!(a_clip > 0 && a_clip <= 1) || !(kv_clip > 0 && kv_clip <= 1))
    return bad("a_clip / kv_clip must be in (0, 1]");
  if (window < 1) return bad("window must be >= 1");
  if (overlap < 0 || overlap >= window) return bad("overlap must be in [0, window)");
  if (lora_rounding && rank < 1) return bad("rank must be >= 1 with LoRA-Rounding");
  if (!(reg_lambda >= 0) || !std::isfinite(reg_lambda)) return bad("reg_lambda must be >= 0");
  if (!(beta_start > 0) || !(beta_end > 0)) return bad("beta_start / beta_end must be > 0");
  if (!(warmup >= 0 && warmup < 1)) return bad("warmup must be in [0, 1)");
  if (!(cfp_lambda1 >= 0) || !(cfp_lambda2 >= 0) || !(cfp_act_alpha >= 0 && cfp_act_alpha <= 1))
    return bad("cfp_lambda1 / cfp_lambda2 must be >= 0 and cfp_act_alpha in [0, 1]");
  if (epochs < 1) return bad("epochs must be >= 1");
  if (holdout < 0) return bad("cbq_holdout must be >= 0");
  if (bsz < 1) return bad("bsz must be >= 1");
  for (double lr : {lr_scale, lr_lora, lr_act})
    if (!(lr >= 0) || !std::isfinite(lr)) return bad("learning rates must be finite and >= 0");
  if (c.hidden_size <= 0 || c.num_hidden_layers <= 0) return bad("model config has no layers");
  if (!online.empty() && static_cast<int64_t>(online.size()) != c.num_hidden_layers)
    return bad("online transforms for " + std::to_string(online.size()) +
               " layers, the model has " + std::to_string(c.num_hidden_layers));
  if (needs_online && online.empty())
    return bad(
        "the recipe keeps transforms online but the options carry none (build them with "
        "cbq_options(recipe, setup))");
  if (prefix_len < 0) return bad("prefix_len must be >= 0");
  if (prefix_len == 0 && (!prefix_k.empty() || !prefix_v.empty()))
    return bad("prefix K/V given with prefix_len 0");
  if (prefix_len > 0) {
    const int64_t L = c.num_hidden_layers;
    if (static_cast<int64_t>(prefix_k.size()) != L || static_cast<int64_t>(prefix_v.size()) != L)
      return bad("the IntactKV prefix K/V must have one entry per layer (" + std::to_string(L) +
                 "), got " + std::to_string(prefix_k.size()) + " / " +
                 std::to_string(prefix_v.size()));
    const size_t n = static_cast<size_t>(prefix_len * c.kv_dim());
    for (int64_t l = 0; l < L; ++l)  // empty: a layer no window of this call trains
      if ((prefix_k[l].size() != n && !prefix_k[l].empty()) ||
          prefix_v[l].size() != prefix_k[l].size())
        return bad("the IntactKV prefix K/V of layer " + std::to_string(l) +
                   " is not prefix_len x n_kv*head_dim");
  }
  if (gptq_init &&
      (!(gptq.percdamp >= 0) || gptq.blocksize < 1 || !(gptq_margin > 0) || !(gptq_margin < 0.5)))
    return bad("gptq init: percdamp must be >= 0, blocksize >= 1 and gptq_margin in (0, 0.5)");
  return Status::ok();
}

LoraRoundSpec CbqOptions::lora_spec() const {
  LoraRoundSpec s;
  s.bits = w_bits;
  s.group = w_group;
  s.rank = lora_rounding ? rank : 0;
  return s;
}

BlockQuantSpec CbqOptions::block_spec(const ModelConfig& c) const {
  BlockQuantSpec q;
  for (int p = 0; p < kNumProj; ++p) {
    FakeQuantSpec& a = q.act[p];
    a.bits = a_bits;
    a.sym = true;
    a.group = -1;
    a.ste = Ste::kLsq;
    a.clip = learn_act_clip ? ClipMode::kLearned : ClipMode::kFixed;
    a.clip_ratio = learn_act_clip ? 1.0 : a_clip;
    q.w[p].bits = 16;  // Ŵ is LoRA-rounded outside the block
  }
  for (FakeQuantSpec* s : {&q.k, &q.v}) {
    s->bits = kv_bits;
    s->sym = false;
    s->group = c.head_dim;
    s->ste = Ste::kLsq;
    s->clip = learn_act_clip ? ClipMode::kLearned : ClipMode::kFixed;
    s->clip_ratio = learn_act_clip ? 1.0 : kv_clip;
  }
  return q;
}

std::vector<CbqWindow> cbq_plan(int64_t L, int window, int overlap) {
  return plan::cbq_windows(L, window, overlap);
}

CbqState cbq_initial_state(const std::vector<float>& x0, const CbqOptions& o) {
  CbqState s;
  s.x_fp = x0;
  if (!o.parallel) s.x_q = x0;
  return s;
}

namespace {

const BlockTransformsT<float> kNoTransforms;
const BlockQuantSpec kNoQuant;
const BlockClipT<float> kNoClip;

bool finite_all(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}
template <typename T>
bool finite_all_t(const std::vector<T>& v) {
  for (T x : v)
    if (!std::isfinite(static_cast<double>(x))) return false;
  return true;
}

// One linear of one block in the window.
struct LinearWork {
  int64_t R = 0, C = 0;
  std::vector<double> s0;     // (R·G) initial step sizes
  LoraRoundParams<float> lp;  // float working copy; v0 fixed
};

struct BlockWork {
  int64_t layer = -1;
  BlockWeightsT<float> base;  // CFP-processed FP weights (what is quantized)
  BlockWeightsT<float> cur;   // base with Ŵ in place of the linears
  std::array<LinearWork, kNumProj> lin;
  CbqBlockParams prm;   // fp64 masters (prm.cell empty: the codes live in `cell`)
  // GPTQ's codes per linear (CbqBlockParams::cell), held once here rather than in prm,
  // which keep_best and the held-out choice copy; back into the carried state at the end.
  std::array<std::vector<uint8_t>, kNumProj> cell;
  CbqLayerResult info;  // CFP results
};

// Per-channel max |x| of the inputs of q (attention), gate (MLP) and down.
struct ChanMax {
  std::vector<double> attn, mlp, down;
};

void fold_smoothing(BlockWeightsT<float>& w, const std::vector<double>& s_attn,
                    const std::vector<double>& s_mlp, const std::vector<double>& s_down, int64_t H,
                    int64_t I) {
  auto scale_cols = [](std::vector<float>& W, int64_t C, const std::vector<double>& s) {
    const int64_t R = static_cast<int64_t>(W.size()) / C;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j)
        if (s[j] != 1.0)
          W[i * C + j] = static_cast<float>(static_cast<double>(W[i * C + j]) * s[j]);
  };
  auto div_vec = [](std::vector<float>& g, const std::vector<double>& s) {
    for (size_t j = 0; j < g.size(); ++j)
      if (s[j] != 1.0) g[j] = static_cast<float>(static_cast<double>(g[j]) / s[j]);
  };
  if (!s_attn.empty()) {
    div_vec(w.input_norm, s_attn);
    for (int p : {kQ, kK, kV}) scale_cols(w.w[p], H, s_attn);
  }
  if (!s_mlp.empty()) {
    div_vec(w.post_norm, s_mlp);
    for (int p : {kGate, kUp}) scale_cols(w.w[p], H, s_mlp);
  }
  if (!s_down.empty()) {
    std::vector<float>& up = w.w[kUp];
    for (int64_t j = 0; j < I; ++j)
      if (s_down[j] != 1.0)
        for (int64_t c = 0; c < H; ++c)
          up[j * H + c] = static_cast<float>(static_cast<double>(up[j * H + c]) / s_down[j]);
    scale_cols(w.w[kDown], I, s_down);
  }
}

// gptq_init: W (R, C) moved into the rounding cells of `cell` (codes + half) on the
// grid s0 (R·G, groups of gc consecutive columns), a margin m inside each cell:
//   W' = s0·clamp(W/s0, q − 0.5 + m, q + 0.5 − m),
// so that round to nearest of W'/s0 is q.
void move_into_cells(std::vector<float>& W, int64_t R, int64_t C, int64_t G, int64_t gc,
                     const std::vector<float>& s0, const std::vector<uint8_t>& cell, int half,
                     double margin) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t cc = 0; cc < C; ++cc) {
      const double s2 = s0[r * G + cc / gc];
      const double q = static_cast<double>(cell[r * C + cc]) - half;
      const double v =
          std::clamp(static_cast<double>(W[r * C + cc]) / s2, q - 0.5 + margin, q + 0.5 - margin);
      W[r * C + cc] = static_cast<float>(s2 * v);
    }
}

}  // namespace

Status cbq_run_window(const ModelConfig& c, const CbqOptions& o, const std::vector<CbqWindow>& plan,
                      int64_t wi, const std::vector<BlockWeightsT<float>*>& layers,
                      const std::vector<CbqBlockParams>& carried, const CbqStreams& io,
                      std::vector<CbqBlockParams>* carried_out,
                      std::vector<CbqLayerResult>* finalized, CbqWindowReport* report) {
  const double t0 = steady_seconds();
  QCAL_RETURN_IF_ERROR(o.validate(c));
  if (wi < 0 || wi >= static_cast<int64_t>(plan.size()))
    return invalid_input("cbq: window " + std::to_string(wi) + " outside the plan of " +
                         std::to_string(plan.size()) + " windows");
  const CbqWindow win = plan[static_cast<size_t>(wi)];
  const int64_t k = win.last - win.first + 1, nfin = win.finalize_last - win.first + 1;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  if (static_cast<int64_t>(layers.size()) != k)
    return invalid_input("cbq: window " + std::to_string(wi) + " needs " + std::to_string(k) +
                         " layers, got " + std::to_string(layers.size()));
  if (!io.x_fp || (!o.parallel && !io.x_q))
    return invalid_input("cbq: window " + std::to_string(wi) + " has no input activations");
  const int64_t N = io.x_fp->sequences(), T = io.x_fp->seqlen();
  // holdout: the last sequences are not trained on; they pick the epoch (CbqOptions).
  const int64_t Nh = o.holdout, Ntr = N - Nh;
  if (Nh > 0 && Ntr < 1)
    return invalid_input("cbq: window " + std::to_string(wi) + ": cbq_holdout " +
                         std::to_string(Nh) + " leaves no training sequences of " +
                         std::to_string(N));
  // IntactKV: the quantized branch runs tokens [P:] of every sequence after the FP
  // prefix cache; the targets and the loss cover those Tq positions.
  const int64_t P = o.prefix_len, Tq = T - P;
  if (P > 0 && Tq < 1)
    return invalid_input("cbq: the IntactKV prefix of " + std::to_string(P) +
                         " tokens leaves nothing of sequences of " + std::to_string(T));
  if (N < 1 || T < 1 || io.x_fp->width() != H ||
      (!o.parallel && (io.x_q->sequences() != N || io.x_q->seqlen() != T || io.x_q->width() != H)))
    return invalid_input("cbq: window inputs are not N x T x H activations of the same size");
  const int64_t n_carry = wi > 0 ? std::max<int64_t>(0, plan[wi - 1].last - win.first + 1) : 0;
  if (static_cast<int64_t>(carried.size()) != n_carry)
    return invalid_input("cbq: window " + std::to_string(wi) + " expects " +
                         std::to_string(n_carry) + " carried blocks, got " +
                         std::to_string(carried.size()));
  for (int64_t j = 0; j < n_carry; ++j)
    if (carried[j].layer != win.first + j)
      return invalid_input("cbq: carried block " + std::to_string(j) + " is layer " +
                           std::to_string(carried[j].layer) + ", expected " +
                           std::to_string(win.first + j));
  for (int64_t j = 0; j < k; ++j) {
    const BlockWeightsT<float>* l = layers[j];
    bool ok = l != nullptr && static_cast<int64_t>(l->input_norm.size()) == H &&
              static_cast<int64_t>(l->post_norm.size()) == H;
    for (int p = 0; ok && p < kNumProj; ++p) {
      const auto shape = proj_shape(c, kProjNames[p]);
      ok = static_cast<int64_t>(l->w[p].size()) == shape[0] * shape[1];
    }
    if (!ok)
      return invalid_input("cbq: weights of layer " + std::to_string(win.first + j) +
                           " do not match the model config");
  }
  const std::string where = "cbq: window " + std::to_string(wi) + " (layers " +
                            std::to_string(win.first) + ".." + std::to_string(win.last) + ")";
  for (int64_t l = win.first; P > 0 && l <= win.last; ++l)
    if (o.prefix_k[static_cast<size_t>(l)].empty())
      return invalid_input(where + ": no IntactKV prefix K/V for layer " + std::to_string(l));
  // The logit loss (CbqOptions::head) in the window that ends the model.
  const CbqHead* head = o.head && win.last + 1 == c.num_hidden_layers ? o.head.get() : nullptr;
  const int64_t V = c.vocab_size;
  if (head && (static_cast<int64_t>(head->norm.size()) != H ||
               static_cast<int64_t>(head->lm_head.size()) != V * H))
    return invalid_input(where + ": the head's final norm / lm_head is not (H) / (V, H)");
  const double head_w = head ? o.head_weight : 0.0;
  // The head's KL summed over rows of the window's output; d (may be null) += its ∂.
  auto head_acc = [&](const float* h_fp, const float* h_q, int64_t rows, float* d,
                      double grad_scale, double* sum) {
    if (head)
      head_loss_acc(head->norm.data(), head->lm_head.data(), V, c.rms_norm_eps, h_fp, h_q, rows, H,
                    d, grad_scale * head_w, sum);
  };

  // Online transforms of block j of the window (identity when the options have none).
  auto online_of = [&](int64_t j) -> const BlockTransformsT<float>* {
    return o.online.empty() ? &kNoTransforms : &o.online[static_cast<size_t>(win.first + j)];
  };
  const LoraRoundSpec spec = o.lora_spec();
  const BlockQuantSpec qspec = o.block_spec(c);
  const bool learn_clip = o.learn_act_clip && (o.a_bits < 16 || o.kv_bits < 16);
  const bool smooth = o.cfp && o.cfp_acts && o.a_bits < 16;
  const int64_t bsz = std::min(o.bsz, N);
  const size_t chunk_n = static_cast<size_t>(bsz * T * H);
  // Drops the first P rows of each of nb sequences of T rows (in place, to nb·Tq rows).
  auto strip = [&](float* buf, int64_t nseq) {
    if (P == 0) return;
    for (int64_t s2 = 0; s2 < nseq; ++s2)
      std::copy(buf + (s2 * T + P) * H, buf + (s2 + 1) * T * H, buf + s2 * Tq * H);
  };
  auto set_prefix = [&](QBlock<float>& qb, int64_t j) {
    if (P > 0)
      qb.set_prefix(o.prefix_k[static_cast<size_t>(win.first + j)].data(),
                    o.prefix_v[static_cast<size_t>(win.first + j)].data(), P);
  };

  // ---- FP pass through the window, bsz sequences at a time: the targets (kept in a
  // scratch file or memory), the next window's FP input, CFP's statistics.
  std::unique_ptr<ActivationBuffer> target;
  if (io.scratch_dir.empty()) {
    target = std::make_unique<MemoryActivations>(Tq, H);
  } else {
    QCAL_ASSIGN_OR_RETURN(target, ScratchActivations::create(io.scratch_dir, Tq, H));
  }
  std::vector<ChanMax> cmax(static_cast<size_t>(k));
  {
    std::vector<std::unique_ptr<QBlock<float>>> fpb;
    std::vector<LinearInputHook> hooks(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) {
      fpb.push_back(
          std::make_unique<QBlock<float>>(c, layers[j], online_of(j), &kNoQuant, &kNoClip));
      if (!smooth) continue;
      ChanMax& cm = cmax[j];
      cm.attn.assign(static_cast<size_t>(H), 0.0);
      cm.mlp.assign(static_cast<size_t>(H), 0.0);
      cm.down.assign(static_cast<size_t>(I), 0.0);
      hooks[j] = [&cm](const std::string& proj, const float* x, int64_t nr, int64_t in) {
        std::vector<double>* m = nullptr;
        if (proj == kProjNames[kQ]) m = &cm.attn;
        if (proj == kProjNames[kGate]) m = &cm.mlp;
        if (proj == kProjNames[kDown]) m = &cm.down;
        if (!m) return;
        for (int64_t r = 0; r < nr; ++r)
          for (int64_t i = 0; i < in; ++i)
            (*m)[i] = std::max((*m)[i], std::fabs(static_cast<double>(x[r * in + i])));
      };
    }
    std::vector<float> a(chunk_n), b(chunk_n);
    for (int64_t b0 = 0; b0 < N; b0 += bsz) {
      const int64_t nb = std::min(bsz, N - b0);
      QCAL_RETURN_IF_ERROR(io.x_fp->read(b0, nb, a.data()));
      for (int64_t j = 0; j < k; ++j) {
        fpb[j]->forward(a.data(), b.data(), nb, T, nullptr, hooks[j]);
        if (j + 1 == nfin && io.next_fp) QCAL_RETURN_IF_ERROR(io.next_fp->append(b.data(), nb));
        a.swap(b);
      }
      strip(a.data(), nb);
      QCAL_RETURN_IF_ERROR(target->append(a.data(), nb));
    }
  }
  const ActivationSource& xin_all = o.parallel ? *io.x_fp : *io.x_q;

  // ---- CFP per block: the processed weights, then (cfp_decide) kept only where they
  // lower the block's RTN output error on its FP inputs.
  std::vector<CbqLayerResult> cfp_info(static_cast<size_t>(k));
  std::vector<BlockWeightsT<float>> cfp_base(static_cast<size_t>(k));
  std::vector<char> cfp_changed(static_cast<size_t>(k), 0);
  for (int64_t j = 0; j < k; ++j) {
    CbqLayerResult& info = cfp_info[j];
    BlockWeightsT<float>& w = cfp_base[j];
    w = *layers[j];
    if (o.cfp && o.cfp_weights)
      for (int p = 0; p < kNumProj; ++p) {
        const auto shape = proj_shape(c, kProjNames[p]);
        info.cfp_truncated[p] =
            cfp_truncate_weights(w.w[p].data(), shape[0], shape[1], o.cfp_lambda1, o.cfp_lambda2);
        if (info.cfp_truncated[p] > 0) cfp_changed[j] = 1;
      }
    if (smooth) {
      // Not on an input that an online transform mixes (the fold would not be exact).
      const BlockTransformsT<float>& t = *online_of(j);
      if (t.a1.empty() && t.a2.empty())
        info.smooth_attn = cfp_act_scales(cmax[j].attn, o.cfp_lambda1, o.cfp_lambda2,
                                          o.cfp_act_alpha, &info.outlier_channels[0]);
      if (t.u1.empty() && t.u2.empty())
        info.smooth_mlp = cfp_act_scales(cmax[j].mlp, o.cfp_lambda1, o.cfp_lambda2, o.cfp_act_alpha,
                                         &info.outlier_channels[1]);
      if (t.d1.empty() && t.d2.empty())
        info.smooth_down = cfp_act_scales(cmax[j].down, o.cfp_lambda1, o.cfp_lambda2,
                                          o.cfp_act_alpha, &info.outlier_channels[2]);
      for (const auto& ch : info.outlier_channels)
        if (!ch.empty()) cfp_changed[j] = 1;
      fold_smoothing(w, info.smooth_attn, info.smooth_mlp, info.smooth_down, H, I);
    }
  }
  if (o.cfp && o.cfp_decide &&
      std::any_of(cfp_changed.begin(), cfp_changed.end(), [](char x) { return x != 0; })) {
    // RTN weights of both variants on the initial grid; the initial activation clips.
    LoraRoundSpec rspec = spec;
    rspec.rank = 0;
    auto rtn_block = [&](const BlockWeightsT<float>& src) {
      BlockWeightsT<float> out = src;
      for (int p = 0; p < kNumProj; ++p) {
        const auto shape = proj_shape(c, kProjNames[p]);
        LoraRoundParams<float> lp;
        lp.scale = lora_round_init_scale(rspec, src.w[p].data(), shape[0], shape[1]);
        lora_round_fwd(rspec, lp, src.w[p].data(), shape[0], shape[1], out.w[p].data(), true);
      }
      return out;
    };
    const BlockClipT<float> clip0 = learn_clip
                                        ? cast_clip<float>(init_clip_params<double>(qspec, c, 4.0))
                                        : BlockClipT<float>();
    std::vector<BlockWeightsT<float>> q_with(static_cast<size_t>(k)),
        q_without(static_cast<size_t>(k));
    std::vector<std::unique_ptr<QBlock<float>>> fpb, qw, qo;
    for (int64_t j = 0; j < k; ++j) {
      fpb.push_back(
          std::make_unique<QBlock<float>>(c, layers[j], online_of(j), &kNoQuant, &kNoClip));
      if (!cfp_changed[j]) {
        qw.emplace_back();
        qo.emplace_back();
        continue;
      }
      q_with[j] = rtn_block(cfp_base[j]);
      q_without[j] = rtn_block(*layers[j]);
      qw.push_back(std::make_unique<QBlock<float>>(c, &q_with[j], online_of(j), &qspec, &clip0));
      qo.push_back(std::make_unique<QBlock<float>>(c, &q_without[j], online_of(j), &qspec, &clip0));
    }
    std::vector<float> a(chunk_n), b(chunk_n), y(chunk_n);
    for (int64_t b0 = 0; b0 < N; b0 += bsz) {
      const int64_t nb2 = std::min(bsz, N - b0);
      const int64_t n = nb2 * T * H;
      QCAL_RETURN_IF_ERROR(io.x_fp->read(b0, nb2, a.data()));
      for (int64_t j = 0; j < k; ++j) {
        fpb[j]->forward(a.data(), b.data(), nb2, T);
        if (cfp_changed[j]) {
          for (int v = 0; v < 2; ++v) {
            (v == 0 ? qw : qo)[j]->forward(a.data(), y.data(), nb2, T);
            double e = 0.0;
            for (int64_t i = 0; i < n; ++i) {
              const double d = static_cast<double>(y[i]) - b[i];
              e += d * d;
            }
            (v == 0 ? cfp_info[j].cfp_err_with : cfp_info[j].cfp_err_without) += e;
          }
        }
        a.swap(b);
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      CbqLayerResult& info = cfp_info[j];
      if (!cfp_changed[j] || info.cfp_err_with < info.cfp_err_without) continue;
      // CFP does not help this block: the unprocessed weights.
      const double ew = info.cfp_err_with, eo = info.cfp_err_without;
      info = CbqLayerResult();
      info.cfp_kept = false;
      info.cfp_err_with = ew;
      info.cfp_err_without = eo;
      cfp_base[j] = *layers[j];
    }
  }

  // ---- Blocks: CFP, parameters (carried or fresh).
  std::vector<BlockWork> bw(static_cast<size_t>(k));
  int64_t n_round = 0;
  for (int64_t j = 0; j < k; ++j) {
    BlockWork& b = bw[j];
    b.layer = win.first + j;
    b.base = std::move(cfp_base[j]);
    b.info = std::move(cfp_info[j]);
    b.info.layer = b.layer;
    b.cur = b.base;
    const bool is_carried = j < n_carry;
    if (is_carried) {
      b.prm = carried[j];
      for (int p = 0; p < kNumProj; ++p) b.cell[p] = std::move(b.prm.cell[p]);
      const BlockClipT<double> want =
          learn_clip ? init_clip_params<double>(qspec, c, 4.0) : BlockClipT<double>();
      bool same = b.prm.clip.k_max.size() == want.k_max.size() &&
                  b.prm.clip.v_max.size() == want.v_max.size();
      for (int p = 0; p < kNumProj; ++p)
        same = same && b.prm.clip.act_max[p].size() == want.act_max[p].size();
      if (!same)
        return invalid_input(where + ": carried clip parameters of layer " +
                             std::to_string(b.layer) + " do not match the options");
    } else {
      b.prm.layer = b.layer;
      if (learn_clip) b.prm.clip = init_clip_params<double>(qspec, c, 4.0);
    }
    for (int p = 0; p < kNumProj; ++p) {
      const auto shape = proj_shape(c, kProjNames[p]);
      LinearWork& lw = b.lin[p];
      lw.R = shape[0];
      lw.C = shape[1];
      std::vector<float>& W = b.base.w[p];
      std::vector<float> s0f;
      const int64_t G = spec.groups(lw.C), gc = spec.group_cols(lw.C);
      if (is_carried && !b.prm.s0[p].empty()) {
        // Carried from a GPTQ start: its step sizes, the base moved into its cells.
        if (static_cast<int64_t>(b.prm.s0[p].size()) != lw.R * G ||
            static_cast<int64_t>(b.cell[p].size()) != lw.R * lw.C)
          return invalid_input(where + ": the carried GPTQ start of layer " +
                               std::to_string(b.layer) + " " + kProjNames[p] +
                               " does not match the options");
        s0f.assign(b.prm.s0[p].begin(), b.prm.s0[p].end());
        move_into_cells(W, lw.R, lw.C, G, gc, s0f, b.cell[p], 1 << (o.w_bits - 1),
                        o.gptq_margin);
      } else {
        s0f = lora_round_init_scale(spec, W.data(), lw.R, lw.C);
      }
      lw.s0.assign(s0f.begin(), s0f.end());
      // Fresh init; a carried block keeps only V0 (recomputed from the same W, s0).
      const uint64_t seed = o.seed * 0x100000001b3ull + static_cast<uint64_t>(b.layer) * 7919u +
                            static_cast<uint64_t>(p);
      lw.lp = lora_round_init(spec, W.data(), lw.R, lw.C, s0f, o.init, seed);
      if (!is_carried) {
        b.prm.rho[p].assign(lw.s0.size(), 0.0);
        b.prm.a1[p].assign(lw.lp.a1.begin(), lw.lp.a1.end());
        b.prm.a2[p].assign(lw.lp.a2.begin(), lw.lp.a2.end());
      } else if (b.prm.rho[p].size() != lw.s0.size() || b.prm.a1[p].size() != lw.lp.a1.size() ||
                 b.prm.a2[p].size() != lw.lp.a2.size()) {
        return invalid_input(where + ": carried parameters of layer " + std::to_string(b.layer) +
                             " do not match the options");
      }
      if (!lw.lp.a1.empty()) n_round += lw.R * lw.C;
    }
  }
  // Masters → float working copies.
  auto sync = [&]() {
    for (BlockWork& b : bw)
      for (int p = 0; p < kNumProj; ++p) {
        LinearWork& lw = b.lin[p];
        for (size_t i = 0; i < lw.s0.size(); ++i)
          lw.lp.scale[i] = static_cast<float>(lw.s0[i] * std::exp(b.prm.rho[p][i]));
        std::copy(b.prm.a1[p].begin(), b.prm.a1[p].end(), lw.lp.a1.begin());
        std::copy(b.prm.a2[p].begin(), b.prm.a2[p].end(), lw.lp.a2.begin());
        if (o.v0_follows_scale && !lw.lp.v0.empty()) {
          // V0 = h⁻¹(frac(W/s)) at the current step sizes: A1·A2 = 0 is round to
          // nearest on the current grid (a constant of the step, no gradient).
          const int64_t G = spec.groups(lw.C), gc = spec.group_cols(lw.C);
          const float* W = b.base.w[p].data();
          for (int64_t i = 0; i < lw.R; ++i)
            for (int64_t c2 = 0; c2 < lw.C; ++c2) {
              const double v = static_cast<double>(W[i * lw.C + c2]) / lw.lp.scale[i * G + c2 / gc];
              lw.lp.v0[i * lw.C + c2] =
                  static_cast<float>(rect_sigmoid_inv(v - std::floor(v), spec.zeta, spec.gamma));
            }
        }
      }
  };
  auto quantize_weights = [&](bool hard) {
    for (BlockWork& b : bw)
      for (int p = 0; p < kNumProj; ++p) {
        LinearWork& lw = b.lin[p];
        lora_round_fwd(spec, lw.lp, b.base.w[p].data(), lw.R, lw.C, b.cur.w[p].data(), hard);
      }
  };
  std::vector<BlockClipT<float>> clipf(static_cast<size_t>(k));
  auto sync_clip = [&]() {
    for (int64_t j = 0; j < k; ++j) clipf[j] = cast_clip<float>(bw[j].prm.clip);
  };
  auto make_blocks = [&](std::vector<std::unique_ptr<QBlock<float>>>* qbs) {
    qbs->clear();
    for (int64_t j = 0; j < k; ++j) {
      qbs->push_back(
          std::make_unique<QBlock<float>>(c, &bw[j].cur, online_of(j), &qspec, &clipf[j]));
      set_prefix(*qbs->back(), j);
    }
  };
  // The quantized chain over sequences s0..s1−1, bsz at a time: E against the targets,
  // and the outputs after `nout` blocks into `sink` (may be null). With a prefix the
  // sink's rows 0..P−1 of each sequence are the window input's (the next window strips
  // them). run_all: every sequence.
  std::vector<float> ca(chunk_n), cb(chunk_n), ct(chunk_n), cfull;
  auto run_range = [&](int64_t s0, int64_t s1, int64_t nout, ActivationSink* sink,
                       double* e) -> Status {
    std::vector<std::unique_ptr<QBlock<float>>> qbs;
    make_blocks(&qbs);
    double sm = 0.0, sk = 0.0, sh = 0.0;
    for (int64_t b0 = s0; b0 < s1; b0 += bsz) {
      const int64_t nb = std::min(bsz, s1 - b0);
      QCAL_RETURN_IF_ERROR(xin_all.read(b0, nb, ca.data()));
      if (P > 0 && sink) cfull.assign(ca.begin(), ca.begin() + nb * T * H);
      strip(ca.data(), nb);
      for (int64_t j = 0; j < k; ++j) {
        qbs[j]->forward(ca.data(), cb.data(), nb, Tq);
        ca.swap(cb);
        if (j + 1 == nout && sink) {
          if (P == 0) {
            QCAL_RETURN_IF_ERROR(sink->append(ca.data(), nb));
          } else {
            for (int64_t s2 = 0; s2 < nb; ++s2)
              std::copy(ca.begin() + s2 * Tq * H, ca.begin() + (s2 + 1) * Tq * H,
                        cfull.begin() + (s2 * T + P) * H);
            QCAL_RETURN_IF_ERROR(sink->append(cfull.data(), nb));
          }
        }
      }
      if (e) {
        QCAL_RETURN_IF_ERROR(target->read(b0, nb, ct.data()));
        window_loss_acc(ct.data(), ca.data(), nb * Tq, H, static_cast<float*>(nullptr), 0.0, &sm,
                        &sk);
        head_acc(ct.data(), ca.data(), nb * Tq, nullptr, 0.0, &sh);
      }
    }
    if (e) *e = (sm + sk + head_w * sh) * (1.0 / static_cast<double>((s1 - s0) * Tq));
    return Status::ok();
  };
  auto run_all = [&](int64_t nout, ActivationSink* sink, double* e) {
    return run_range(0, N, nout, sink, e);
  };
  sync();
  sync_clip();
  quantize_weights(true);
  bool gptq_done = false;
  if (o.gptq_init && n_carry < k) {
    // ---- GPTQ initialization of the fresh blocks, in order (CbqOptions::gptq_init).
    QuantSpec gspec;
    gspec.bits = o.w_bits;
    gspec.group_size = o.w_group;
    gspec.sym = true;
    gspec.narrow = o.gptq_narrow;
    GptqOptions go = o.gptq;
    if (o.w_group > 0 && go.act_order) go.static_groups = true;
    const std::vector<std::vector<int>> groups = {{kQ, kK, kV}, {kO}, {kGate, kUp}, {kDown}};
    for (int64_t j = n_carry; j < k; ++j) {
      BlockWork& b = bw[j];
      BlockWeightsT<float> wq = b.base;  // earlier groups GPTQ-quantized (true-sequential)
      for (const auto& group : groups) {
        std::array<std::unique_ptr<HessianAccumulator>, kNumProj> acc;
        for (int p : group)
          acc[p] = std::make_unique<HessianAccumulator>(proj_shape(c, kProjNames[p])[1]);
        LinearInputHook hook = [&](const std::string& proj, const float* xin, int64_t rows,
                                   int64_t cols) {
          for (int p : group)
            if (proj == kProjNames[p] && cols == acc[p]->cols())
              acc[p]->add_batch(xin, rows, rows / Tq);
        };
        std::vector<std::unique_ptr<QBlock<float>>> chain;
        for (int64_t i = 0; i < j; ++i) {
          chain.push_back(
              std::make_unique<QBlock<float>>(c, &bw[i].cur, online_of(i), &qspec, &clipf[i]));
          set_prefix(*chain.back(), i);
        }
        QBlock<float> qb(c, &wq, online_of(j), &qspec, &clipf[j]);
        set_prefix(qb, j);
        for (int64_t b0 = 0; b0 < N; b0 += bsz) {
          const int64_t nb2 = std::min(bsz, N - b0);
          QCAL_RETURN_IF_ERROR(xin_all.read(b0, nb2, ca.data()));
          strip(ca.data(), nb2);
          for (auto& q : chain) {
            q->forward(ca.data(), cb.data(), nb2, Tq);
            ca.swap(cb);
          }
          qb.forward(ca.data(), cb.data(), nb2, Tq, nullptr, hook);
        }
        for (int p : group) {
          LinearWork& lw = b.lin[p];
          Tensor Wt({lw.R, lw.C});
          std::copy(b.base.w[p].begin(), b.base.w[p].end(), Wt.data.begin());
          auto res = gptq_quantize(Wt, acc[p]->hessian(), gspec, go);
          acc[p].reset();
          if (!res.is_ok())
            return res.status().with_context(where + ": gptq init of layer " +
                                             std::to_string(b.layer) + " " + kProjNames[p]);
          const QuantizedLinear& ql = res->qlinear;
          const int64_t G = spec.groups(lw.C), gc = spec.group_cols(lw.C);
          if (ql.num_groups() != G)
            return internal_error(where + ": gptq init gave " + std::to_string(ql.num_groups()) +
                                  " groups, expected " + std::to_string(G));
          for (int64_t cc = 0; cc < lw.C; ++cc)
            if (ql.g_idx[static_cast<size_t>(cc)] != cc / gc)
              return internal_error(where + ": gptq init groups are not consecutive columns");
          // Step sizes = GPTQ's scales; the base moved into GPTQ's rounding cell.
          std::vector<float> s0f(static_cast<size_t>(lw.R * G));
          for (int64_t r = 0; r < lw.R; ++r)
            for (int64_t g = 0; g < G; ++g)
              s0f[r * G + g] = std::max(ql.scales[g * lw.R + r], 1e-5f);
          const int half = 1 << (o.w_bits - 1);
          std::vector<uint8_t> cell(static_cast<size_t>(lw.R * lw.C));
          for (int64_t r = 0; r < lw.R; ++r)
            for (int64_t cc = 0; cc < lw.C; ++cc) {
              const double q =
                  static_cast<double>(ql.q[r * lw.C + cc]) - ql.zeros[(cc / gc) * lw.R + r];
              cell[r * lw.C + cc] = static_cast<uint8_t>(std::lround(q) + half);
            }
          std::vector<float>& W = b.base.w[p];
          move_into_cells(W, lw.R, lw.C, G, gc, s0f, cell, half, o.gptq_margin);
          lw.s0.assign(s0f.begin(), s0f.end());
          b.prm.s0[p] = lw.s0;
          b.cell[p] = std::move(cell);
          const uint64_t seed = o.seed * 0x100000001b3ull + static_cast<uint64_t>(b.layer) * 7919u +
                                static_cast<uint64_t>(p);
          lw.lp = lora_round_init(spec, W.data(), lw.R, lw.C, s0f, o.init, seed);
          b.prm.rho[p].assign(lw.s0.size(), 0.0);
          b.prm.a1[p].assign(lw.lp.a1.begin(), lw.lp.a1.end());
          b.prm.a2[p].assign(lw.lp.a2.begin(), lw.lp.a2.end());
          wq.w[p] = ql.dequantize().data;
        }
      }
      sync();
      quantize_weights(true);  // block j at GPTQ's solution: the next block's input
    }
    gptq_done = true;
  }
  double loss_hard_init = 0.0;
  QCAL_RETURN_IF_ERROR(run_all(0, nullptr, &loss_hard_init));
  std::vector<CbqBlockParams> init_prm;  // keep_best
  if (o.keep_best)
    for (const BlockWork& b : bw) init_prm.push_back(b.prm);
  // holdout: the hardened loss on the held-out sequences at the initial parameters
  // (epoch 0, a candidate only with keep_best) and after every epoch; the lowest wins.
  std::vector<CbqBlockParams> best_prm;
  double best_holdout = std::numeric_limits<double>::infinity();
  int64_t best_epoch = -1;
  if (Nh > 0 && o.keep_best) {
    QCAL_RETURN_IF_ERROR(run_range(Ntr, N, 0, nullptr, &best_holdout));
    best_prm = init_prm;
    best_epoch = 0;
  }

  // ---- Hardening: codes, fp16 scales, dequantized weights.
  const int half = 1 << (o.w_bits - 1);
  auto harden = [&]() -> Status {
    sync();
    sync_clip();
    for (int64_t j = 0; j < k; ++j) {
      BlockWork& b = bw[j];
      for (int p = 0; p < kNumProj; ++p) {
        LinearWork& lw = b.lin[p];
        const std::vector<int8_t> q = lora_round_codes(spec, lw.lp, b.base.w[p].data(), lw.R, lw.C);
        const int64_t G = spec.groups(lw.C), gc = spec.group_cols(lw.C);
        QuantizedLinear& ql = b.info.q[p];
        ql.out_features = lw.R;
        ql.in_features = lw.C;
        ql.spec.bits = o.w_bits;
        ql.spec.group_size = G > 1 ? gc : -1;
        ql.spec.sym = true;
        ql.q.resize(q.size());
        ql.scales.resize(static_cast<size_t>(G * lw.R));
        ql.zeros.assign(static_cast<size_t>(G * lw.R), half);
        ql.g_idx.resize(static_cast<size_t>(lw.C));
        for (int64_t i = 0; i < lw.C; ++i) ql.g_idx[i] = static_cast<int32_t>(i / gc);
        for (int64_t r = 0; r < lw.R; ++r)
          for (int64_t g = 0; g < G; ++g) {
            float s = std::max(lw.lp.scale[r * G + g], 1e-5f);
            s = std::min(f16_to_f32(f32_to_f16(s)), 65504.0f);
            ql.scales[g * lw.R + r] = s;
          }
        for (size_t e = 0; e < q.size(); ++e) ql.q[e] = static_cast<uint8_t>(q[e] + half);
        std::vector<float>& w = b.cur.w[p];
        for (int64_t r = 0; r < lw.R; ++r)
          for (int64_t i = 0; i < lw.C; ++i)
            w[r * lw.C + i] =
                dequantize_code(ql.q[r * lw.C + i], {ql.scales[(i / gc) * lw.R + r], half});
        if (!finite_all_t(w)) return internal_error(where + ": quantized weights are not finite");
      }
      for (int p = 0; p < kNumProj; ++p)
        b.info.act_clip[p] = o.a_bits >= 16 ? 1.0
                             : learn_clip   ? sigmoid(b.prm.clip.act_max[p][0])
                                            : o.a_clip;
      b.info.k_clip = o.kv_bits >= 16 ? 1.0 : learn_clip ? sigmoid(b.prm.clip.k_max[0]) : o.kv_clip;
      b.info.v_clip = o.kv_bits >= 16 ? 1.0 : learn_clip ? sigmoid(b.prm.clip.v_max[0]) : o.kv_clip;
    }
    return Status::ok();
  };
  // ---- Optimizers (fresh per window).
  AdamWOptions ao;
  ao.weight_decay = 0.0;
  AdamW opt_s(ao), opt_l(ao), opt_a(ao);
  for (BlockWork& b : bw)
    for (int p = 0; p < kNumProj; ++p) {
      opt_s.add(&b.prm.rho[p]);
      if (!b.prm.a1[p].empty()) {
        opt_l.add(&b.prm.a1[p]);
        opt_l.add(&b.prm.a2[p]);
      }
    }
  std::vector<std::vector<double>*> clip_params;
  for (BlockWork& b : bw) {
    for (int p = 0; p < kNumProj; ++p)
      if (!b.prm.clip.act_max[p].empty()) clip_params.push_back(&b.prm.clip.act_max[p]);
    if (!b.prm.clip.k_max.empty()) clip_params.push_back(&b.prm.clip.k_max);
    if (!b.prm.clip.v_max.empty()) clip_params.push_back(&b.prm.clip.v_max);
  }
  for (auto* v : clip_params) opt_a.add(v);
  auto tie_clip = [&]() {
    for (BlockWork& b : bw) {
      for (int p = 0; p < kNumProj; ++p)
        if (!b.prm.clip.act_max[p].empty()) b.prm.clip.act_min[p] = b.prm.clip.act_max[p];
      if (!b.prm.clip.k_max.empty()) b.prm.clip.k_min = b.prm.clip.k_max;
      if (!b.prm.clip.v_max.empty()) b.prm.clip.v_min = b.prm.clip.v_max;
    }
  };

  // ---- Training (sequences 0..Ntr−1).
  const int64_t nb = (Ntr + bsz - 1) / bsz;
  const int64_t total = static_cast<int64_t>(o.epochs) * nb;
  const int64_t warm = static_cast<int64_t>(std::ceil(o.warmup * static_cast<double>(total)));
  const int ranks = std::max(1, io.ranks);
  CbqWindowReport rep;
  rep.window = wi;
  rep.first = win.first;
  rep.last = win.last;
  rep.loss_hard_init = loss_hard_init;
  // Loss normalization: the hardened loss at the initial parameters (RTN for
  // kResidual), a per-window constant that measures the quantization damage; the
  // first soft loss is no scale (kResidual starts with soft Ŵ = W: E ≈ 0).
  const double e0 = loss_hard_init;
  std::vector<std::vector<float>> acts(static_cast<size_t>(k + 1));
  std::vector<float> dy, y_aug, d_aug, tgt;
  int64_t last_epoch = 0;  // the last epoch the held-out loss was taken after
  rep.holdout = Nh;
  rep.loss_holdout_init = best_epoch == 0 ? best_holdout : 0.0;
  auto fail = [&](int64_t step, const std::string& what) {
    return internal_error(where + " step " + std::to_string(step) + ": " + what);
  };
  for (int64_t step = 0; step < total; ++step) {
    if (o.should_stop && o.should_stop())
      return unavailable("cbq: window " + std::to_string(wi) + " stopped at step " +
                         std::to_string(step) + " of " + std::to_string(total));
    const int64_t b0 = (step % nb) * bsz, B = std::min(bsz, Ntr - b0);
    const int64_t r0 = b0 + B * io.rank / ranks, r1 = b0 + B * (io.rank + 1) / ranks;
    const int64_t micro = io.micro > 0 ? io.micro : B;
    // One forward/backward of the whole minibatch on one rank: exactly the arithmetic of
    // the single-process trainer; otherwise micro-batches and ranks sum their parts.
    const bool single = ranks == 1 && r1 - r0 <= micro;
    const double grad_scale = 1.0 / static_cast<double>(B * Tq);
    sync();
    sync_clip();
    quantize_weights(o.hard_ste);
    std::vector<std::unique_ptr<QBlock<float>>> qbs;
    make_blocks(&qbs);
    std::vector<BlockGradsT<float>> grads(static_cast<size_t>(k));
    double sm = 0.0, sk = 0.0, sh = 0.0, am = 0.0, ak = 0.0;
    for (int64_t m0 = r0; m0 < r1; m0 += micro) {
      const int64_t mb = std::min(micro, r1 - m0);
      const size_t n = static_cast<size_t>(mb * Tq * H);
      std::vector<std::unique_ptr<BlockTape<float>>> tapes;
      acts[0].resize(static_cast<size_t>(mb * T * H));
      QCAL_RETURN_IF_ERROR(xin_all.read(m0, mb, acts[0].data()));
      strip(acts[0].data(), mb);
      acts[0].resize(n);
      tgt.resize(n);
      QCAL_RETURN_IF_ERROR(target->read(m0, mb, tgt.data()));
      for (int64_t j = 0; j < k; ++j) {
        tapes.push_back(make_tape<float>());
        acts[j + 1].resize(n);
        qbs[j]->forward(acts[j].data(), acts[j + 1].data(), mb, Tq, tapes.back().get());
      }
      dy.resize(n);
      window_loss_acc(tgt.data(), acts[k].data(), mb * Tq, H, dy.data(), grad_scale, &sm, &sk);
      head_acc(tgt.data(), acts[k].data(), mb * Tq, dy.data(), grad_scale, &sh);
      if (o.aug_loss) {
        // FP window (original weights) on the quantized branch's input.
        std::vector<float> a = acts[0];
        y_aug.resize(n);
        for (int64_t j = 0; j < k; ++j) {
          QBlock<float> fb(c, layers[j], online_of(j), &kNoQuant, &kNoClip);
          set_prefix(fb, j);
          fb.forward(a.data(), y_aug.data(), mb, Tq);
          a.swap(y_aug);
        }
        d_aug.resize(n);
        window_loss_acc(a.data(), acts[k].data(), mb * Tq, H, d_aug.data(), grad_scale, &am, &ak);
        for (size_t i = 0; i < n; ++i) dy[i] += d_aug[i];
      }
      if (single) {
        const double loss = (sm + sk + head_w * sh) * grad_scale;
        if (!std::isfinite(loss))
          return fail(step, std::string("loss is ") + (std::isnan(loss) ? "NaN" : "inf"));
        if (o.aug_loss && !std::isfinite((am + ak) * grad_scale))
          return fail(step, "aug loss is not finite");
      }
      if (e0 > 0.0) {
        const float inv_e0 = static_cast<float>(1.0 / e0);
        for (float& v : dy) v *= inv_e0;
        // Backward through the chain; weight gradients accumulate over micro-batches.
        for (int64_t j = k - 1; j >= 0; --j) {
          BackwardOptions bo;
          bo.input = j > 0;
          bo.transforms = false;
          bo.clip = learn_clip;
          bo.weights = true;
          qbs[j]->backward(*tapes[j], dy.data(), &grads[j], bo);
          if (j > 0) dy.swap(grads[j].dx);
          tapes[j].reset();
        }
      }
    }
    double sums[3] = {sm, sk, sh};
    if (!single && io.sum && ranks > 1) QCAL_RETURN_IF_ERROR(io.sum(sums, 3));
    // this rank's part; the report's below
    const double loss = (sm + sk + head_w * sh) * grad_scale;
    const double loss_all = (sums[0] + sums[1] + head_w * sums[2]) * grad_scale;
    if (!std::isfinite(loss_all))
      return fail(step, std::string("loss is ") + (std::isnan(loss_all) ? "NaN" : "inf"));
    if (step == 0) rep.loss_first = single ? loss : loss_all;
    rep.loss_last = single ? loss : loss_all;
    ++rep.steps;
    if (e0 <= 0.0) break;  // exact already: nothing to learn

    const bool reg_on = o.lora_rounding && o.reg_lambda > 0 && step >= warm && n_round > 0;
    // β: beta_start at the first regularized step, beta_end at the last (linear).
    const double rel =
        std::min(1.0, static_cast<double>(step - warm) /
                          static_cast<double>(std::max<int64_t>(1, total - 1 - warm)));
    const double beta = o.beta_start + (o.beta_end - o.beta_start) * std::max(0.0, rel);
    const double reg_w = reg_on ? o.reg_lambda / static_cast<double>(n_round) : 0.0;
    std::vector<std::vector<double>> gs, gl, ga;
    std::vector<LoraRoundGrads<float>> regs;  // multi-rank: the regularizer, added after the sum
    for (int64_t j = 0; j < k; ++j) {
      BlockWork& b = bw[j];
      for (int p = 0; p < kNumProj; ++p) {
        LinearWork& lw = b.lin[p];
        LoraRoundGrads<float> lg;
        const std::vector<float>& dW = grads[j].w.w[p];
        if (dW.empty()) {
          lg.scale.assign(lw.lp.scale.size(), 0.0f);
        } else {
          lora_round_bwd(spec, lw.lp, b.base.w[p].data(), lw.R, lw.C, dW.data(), &lg, o.hard_ste);
        }
        if (reg_on && !lw.lp.a1.empty()) {
          if (single) {
            lora_round_reg(spec, lw.lp, lw.R, lw.C, beta, reg_w, &lg);
          } else {
            LoraRoundGrads<float> rg;
            rg.a1.assign(lw.lp.a1.size(), 0.0f);
            rg.a2.assign(lw.lp.a2.size(), 0.0f);
            lora_round_reg(spec, lw.lp, lw.R, lw.C, beta, reg_w, &rg);
            regs.push_back(std::move(rg));
          }
        }
        std::vector<double> drho(lw.s0.size());
        for (size_t i = 0; i < drho.size(); ++i)
          drho[i] = static_cast<double>(lg.scale[i]) * static_cast<double>(lw.lp.scale[i]);
        gs.push_back(std::move(drho));
        if (!lw.lp.a1.empty()) {
          if (lg.a1.empty()) lg.a1.assign(lw.lp.a1.size(), 0.0f);
          if (lg.a2.empty()) lg.a2.assign(lw.lp.a2.size(), 0.0f);
          gl.emplace_back(lg.a1.begin(), lg.a1.end());
          gl.emplace_back(lg.a2.begin(), lg.a2.end());
        }
      }
      if (learn_clip) {
        const BlockClipT<float>& gcl = grads[j].clip;
        auto tied = [](const std::vector<float>& a, const std::vector<float>& b2) {
          std::vector<double> s(1, 0.0);
          if (!a.empty()) s[0] += a[0];
          if (!b2.empty()) s[0] += b2[0];
          return s;
        };
        for (int p = 0; p < kNumProj; ++p)
          if (!b.prm.clip.act_max[p].empty()) ga.push_back(tied(gcl.act_max[p], gcl.act_min[p]));
        if (!b.prm.clip.k_max.empty()) ga.push_back(tied(gcl.k_max, gcl.k_min));
        if (!b.prm.clip.v_max.empty()) ga.push_back(tied(gcl.v_max, gcl.v_min));
      }
    }
    if (!single && io.sum && ranks > 1) {
      std::vector<SumSpan> spans;
      for (auto* g : {&gs, &gl, &ga})
        for (auto& v : *g) spans.push_back({v.data(), v.size()});
      QCAL_RETURN_IF_ERROR(sum_spans(io.sum, spans));
    }
    if (!regs.empty()) {
      size_t ri = 0;
      for (size_t g = 0; g + 1 < gl.size() && ri < regs.size(); g += 2, ++ri) {
        for (size_t i = 0; i < gl[g].size(); ++i) gl[g][i] += regs[ri].a1[i];
        for (size_t i = 0; i < gl[g + 1].size(); ++i) gl[g + 1][i] += regs[ri].a2[i];
      }
    }
    for (size_t i = 0; i < gs.size(); ++i)
      if (!finite_all(gs[i])) return fail(step, "gradient of the step sizes is not finite");
    for (const auto& g : gl)
      if (!finite_all(g)) return fail(step, "gradient of the LoRA factors is not finite");
    for (const auto& g : ga)
      if (!finite_all(g))
        return fail(step, "gradient of an activation clip parameter is not finite");
    opt_s.step(gs, cosine_lr(o.lr_scale, 1e-3 * o.lr_scale, step, total));
    opt_l.step(gl, cosine_lr(o.lr_lora, 1e-3 * o.lr_lora, step, total));
    if (!ga.empty()) opt_a.step(ga, cosine_lr(o.lr_act, 1e-3 * o.lr_act, step, total));
    tie_clip();
    if (Nh > 0 && (step + 1) % nb == 0) {
      // An epoch ends: the hardened loss on the held-out sequences.
      QCAL_RETURN_IF_ERROR(harden());
      double e = 0.0;
      QCAL_RETURN_IF_ERROR(run_range(Ntr, N, 0, nullptr, &e));
      if (!std::isfinite(e)) return fail(step, "held-out loss is not finite");
      last_epoch = (step + 1) / nb;
      rep.holdout_losses.push_back(e);
      if (e < best_holdout) {
        best_holdout = e;
        best_epoch = last_epoch;
        best_prm.clear();
        for (const BlockWork& b : bw) best_prm.push_back(b.prm);
      }
    }
  }
  for (BlockWork& b : bw)
    for (int p = 0; p < kNumProj; ++p)
      if (!finite_all(b.prm.rho[p]) || !finite_all(b.prm.a1[p]) || !finite_all(b.prm.a2[p]))
        return internal_error(where + ": parameters of layer " + std::to_string(b.layer) +
                              " are not finite after training");

  QCAL_RETURN_IF_ERROR(harden());
  // The hardened loss (keep_best: the initial parameters when training made it worse),
  // and the next window's quantized-branch input (sequential).
  ActivationSink* next_q = o.parallel ? nullptr : io.next_q;
  if (Nh > 0 && best_epoch >= 0) {
    // holdout: the parameters of the epoch with the lowest held-out loss (0: the
    // initial ones, with keep_best).
    QCAL_RETURN_IF_ERROR(run_all(0, nullptr, &rep.loss_hard_trained));
    if (!std::isfinite(rep.loss_hard_trained))
      return internal_error(where + ": hardened loss is not finite");
    const bool moved = best_epoch != last_epoch;
    if (moved) {
      for (int64_t j = 0; j < k; ++j) bw[j].prm = best_prm[static_cast<size_t>(j)];
      QCAL_RETURN_IF_ERROR(harden());
    }
    rep.reverted = best_epoch == 0;
    rep.best_epoch = best_epoch;
    rep.loss_holdout = best_holdout;
    if (moved || next_q) {
      QCAL_RETURN_IF_ERROR(run_all(nfin, next_q, &rep.loss_hard));
    } else {
      rep.loss_hard = rep.loss_hard_trained;
    }
  } else if (o.keep_best) {
    QCAL_RETURN_IF_ERROR(run_all(0, nullptr, &rep.loss_hard_trained));
    if (!std::isfinite(rep.loss_hard_trained))
      return internal_error(where + ": hardened loss is not finite");
    if (rep.loss_hard_trained > loss_hard_init) {
      for (int64_t j = 0; j < k; ++j) bw[j].prm = init_prm[j];
      rep.reverted = true;
      QCAL_RETURN_IF_ERROR(harden());
    }
    if (rep.reverted || next_q) {
      QCAL_RETURN_IF_ERROR(run_all(nfin, next_q, &rep.loss_hard));
    } else {
      rep.loss_hard = rep.loss_hard_trained;
    }
  } else {
    QCAL_RETURN_IF_ERROR(run_all(nfin, next_q, &rep.loss_hard));
    rep.loss_hard_trained = rep.loss_hard;
  }
  if (!std::isfinite(rep.loss_hard)) return internal_error(where + ": hardened loss is not finite");
  rep.gptq_init = gptq_done;

  // ---- Commit.
  if (carried_out) {
    carried_out->clear();
    for (int64_t j = nfin; j < k; ++j) {
      carried_out->push_back(std::move(bw[j].prm));
      carried_out->back().cell = std::move(bw[j].cell);
    }
  }
  for (int64_t j = 0; j < nfin; ++j) {
    *layers[j] = bw[j].cur;
    if (finalized) finalized->push_back(std::move(bw[j].info));
  }
  rep.seconds = steady_seconds() - t0;
  if (report) *report = rep;
  return Status::ok();
}

Status cbq_run_window(const ModelConfig& c, const CbqOptions& o, const std::vector<CbqWindow>& plan,
                      int64_t N, int64_t T, const std::vector<BlockWeightsT<float>*>& layers,
                      CbqState* state, std::vector<CbqLayerResult>* finalized,
                      CbqWindowReport* report) {
  if (!state) return invalid_input("cbq: no state");
  const int64_t H = c.hidden_size;
  const size_t act_n = static_cast<size_t>(N * T * H);
  if (N < 1 || T < 1 || state->x_fp.size() != act_n || (!o.parallel && state->x_q.size() != act_n))
    return invalid_input("cbq: state activations do not have N·T·H elements");
  MemoryActivations x_fp(std::move(state->x_fp), T, H), x_q(std::move(state->x_q), T, H);
  MemoryActivations next_fp(T, H), next_q(T, H);
  CbqStreams io;
  io.x_fp = &x_fp;
  io.x_q = o.parallel ? nullptr : &x_q;
  io.next_fp = &next_fp;
  io.next_q = o.parallel ? nullptr : &next_q;
  std::vector<CbqBlockParams> out;
  std::vector<CbqLayerResult> fin;
  Status st = cbq_run_window(c, o, plan, state->next_window, layers, state->carried, io, &out, &fin,
                             report);
  if (!st.is_ok()) {  // *state unchanged
    state->x_fp = std::move(x_fp.data());
    state->x_q = std::move(x_q.data());
    return st;
  }
  state->next_window += 1;
  state->x_fp = std::move(next_fp.data());
  state->x_q = std::move(next_q.data());
  state->carried = std::move(out);
  if (finalized)
    for (auto& f : fin) finalized->push_back(std::move(f));
  return Status::ok();
}

Result<CbqResult> cbq_calibrate(const ModelConfig& c, std::vector<BlockWeightsT<float>>& layers,
                                const std::vector<float>& x0, int64_t N, int64_t T,
                                const CbqOptions& o,
                                const std::function<void(const CbqWindowReport&)>& on_window,
                                const CbqState* resume) {
  const double t0 = steady_seconds();
  QCAL_RETURN_IF_ERROR(o.validate(c));
  const int64_t L = c.num_hidden_layers;
  if (static_cast<int64_t>(layers.size()) != L)
    return invalid_input("cbq: " + std::to_string(layers.size()) + " layers for a config of " +
                         std::to_string(L));
  const std::vector<CbqWindow> plan = cbq_plan(L, o.window, o.overlap);
  CbqState state = resume ? *resume : cbq_initial_state(x0, o);
  CbqResult res;
  while (state.next_window < static_cast<int64_t>(plan.size())) {
    const CbqWindow& w = plan[static_cast<size_t>(state.next_window)];
    std::vector<BlockWeightsT<float>*> wl;
    for (int64_t l = w.first; l <= w.last; ++l) wl.push_back(&layers[static_cast<size_t>(l)]);
    CbqWindowReport rep;
    QCAL_RETURN_IF_ERROR(cbq_run_window(c, o, plan, N, T, wl, &state, &res.layers, &rep));
    if (on_window) on_window(rep);
    res.windows.push_back(rep);
  }
  res.seconds = steady_seconds() - t0;
  return res;
}

}  // namespace qcal::calib

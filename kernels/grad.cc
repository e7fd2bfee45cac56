// Forward and backward primitives for calibration training (see grad.h).
// Backward convention (as in grad.h): parameter gradients (dgamma, dL, dR,
// dbeta) are ACCUMULATED (+=), input gradients (dx, dq, dk, dv, ...) are
// OVERWRITTEN. Letters: T tokens, C channels, n_h / n_kv heads, d head dim,
// G groups per row, V vocab. Matrices are row-major.
//
// The matrix work goes through gemm_t (OpenBLAS, threaded inside); the
// element-wise and row-wise loops run on a small pool of blocking worker
// threads (kernels/parallel.h), never while a GEMM runs, and never reduce across
// threads, so the results do not depend on the thread count.
#include "kernels/grad.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <type_traits>

#include "common/status.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

namespace qcal {

// ---------------------------------------------------------------- GEMM

void gemm_t(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
            const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
            int64_t ldc) {
  sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_t(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
            const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
            int64_t ldc) {
  dgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

namespace {

template <typename T>
void copy_n(T* dst, const T* src, int64_t n) {
  if (dst == src || n <= 0) return;
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    std::memcpy(dst + b, src + b, static_cast<size_t>(e - b) * sizeof(T));
  });
}

template <typename T>
T sigmoid(T b) {
  return T(1) / (T(1) + std::exp(-b));
}

}  // namespace

// ---------------------------------------------------------------- RMSNorm

template <typename T>
void rmsnorm_fwd(T* y, const T* x, const T* gamma, int64_t rows, int64_t C, T eps, T* inv_rms) {
  parallel_for(rows, C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      T* yr = y + r * C;
      double ss = 0.0;
      for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
      const T inv = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(C) + eps));
      inv_rms[r] = inv;
      for (int64_t c = 0; c < C; ++c) yr[c] = gamma[c] * (xr[c] * inv);
    }
  });
}

template <typename T>
void rmsnorm_bwd(T* dx, T* dgamma, const T* dy, const T* x, const T* gamma, const T* inv_rms,
                 int64_t rows, int64_t C) {
  if (dgamma) {
    // Column blocks, each summing over all rows in row order: deterministic.
    constexpr int64_t kCols = 256;
    const int64_t nb = (C + kCols - 1) / kCols;
    parallel_for(nb, kCols * rows, [&](int64_t b0, int64_t b1) {
      double acc[kCols];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * kCols, w = std::min(C, c0 + kCols) - c0;
        std::fill(acc, acc + w, 0.0);
        for (int64_t r = 0; r < rows; ++r) {
          const T* dyr = dy + r * C + c0;
          const T* xr = x + r * C + c0;
          const double inv = inv_rms[r];
          for (int64_t c = 0; c < w; ++c) acc[c] += static_cast<double>(dyr[c] * xr[c]) * inv;
        }
        for (int64_t c = 0; c < w; ++c) dgamma[c0 + c] += static_cast<T>(acc[c]);
      }
    });
  }
  if (!dx) return;
  parallel_for(rows, 2 * C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* dyr = dy + r * C;
      const T* xr = x + r * C;
      T* dxr = dx + r * C;
      double dot = 0.0;  // Σ x ⊙ γ ⊙ dy
      for (int64_t c = 0; c < C; ++c) dot += static_cast<double>(xr[c] * gamma[c] * dyr[c]);
      const T inv = inv_rms[r];
      const T coef =
          static_cast<T>(dot / static_cast<double>(C) * inv * inv * inv);  // r³·mean(x⊙γ⊙dy)
      for (int64_t c = 0; c < C; ++c) dxr[c] = inv * (gamma[c] * dyr[c]) - xr[c] * coef;
    }
  });
}

// ---------------------------------------------------------------- RoPE

namespace {

// Rotates pairs (i, i + d/2) of every head by angle sign·pos·θ^(−2i/d).
template <typename T>
void rope_rotate(T* x, int64_t T_, int64_t heads, int64_t d, int64_t pos0, double theta,
                 double sign) {
  QCAL_CHECK(d % 2 == 0);
  const int64_t half = d / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
  parallel_for(T_, heads * d + 8 * half, [&](int64_t t0, int64_t t1) {
    std::vector<T> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t t = t0; t < t1; ++t) {
      const double pos = static_cast<double>(pos0 + t);
      for (int64_t i = 0; i < half; ++i) {
        const double a = pos * inv_freq[i];
        cs[i] = static_cast<T>(std::cos(a));
        sn[i] = static_cast<T>(sign * std::sin(a));
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* x1 = x + (t * heads + h) * d;
        T* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const T a = x1[i], b = x2[i];
          x1[i] = a * cs[i] - b * sn[i];
          x2[i] = b * cs[i] + a * sn[i];
        }
      }
    }
  });
}

}  // namespace

template <typename T>
void rope_fwd(T* x, int64_t T_, int64_t heads, int64_t d, int64_t pos0, double theta) {
  rope_rotate(x, T_, heads, d, pos0, theta, 1.0);
}

template <typename T>
void rope_bwd(T* dx, int64_t T_, int64_t heads, int64_t d, int64_t pos0, double theta) {
  rope_rotate(dx, T_, heads, d, pos0, theta, -1.0);
}

// ---------------------------------------------------------------- attention

namespace {
// Query rows per block: the causal upper triangle right of a block's last row
// is never multiplied (about 1/3 of the work saved at T = 512).
constexpr int64_t kAttnBlock = 128;
}  // namespace

// attention_fwd / attention_bwd are the P = 0 case of the prefix versions: with
// P = 0 the prefix GEMMs are skipped and every remaining call is the plain one.
template <typename T>
void prefix_attention_fwd(T* out, const T* q, const T* pk, const T* pv, int64_t P, const T* k,
                          const T* v, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d, T* probs) {
  QCAL_CHECK(n_kv > 0 && n_h % n_kv == 0 && P >= 0);
  QCAL_CHECK_MSG(P == 0 || (pk != nullptr && pv != nullptr), "prefix_attention_fwd: no prefix");
  if (T_ <= 0) return;
  const int64_t group = n_h / n_kv;
  const int64_t qs = n_h * d, ks = n_kv * d;  // row strides of q/out and k/v
  const int64_t S = P + T_;                   // row length of probs
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d)));
  for (int64_t h = 0; h < n_h; ++h) {
    const int64_t kvh = h / group;
    for (int64_t r0 = 0; r0 < T_; r0 += kAttnBlock) {
      const int64_t r1 = std::min(T_, r0 + kAttnBlock), rows = r1 - r0, keys = r1;
      T* Pm = probs + (h * T_ + r0) * S;  // (rows, P + keys), leading dim S
      const T* qb = q + r0 * qs + h * d;
      // S = scale · Q[r0:r1] [PK; K[0:r1]]ᵀ
      if (P > 0) gemm_t(false, true, rows, P, d, scale, qb, qs, pk + kvh * d, ks, T(0), Pm, S);
      gemm_t(false, true, rows, keys, d, scale, qb, qs, k + kvh * d, ks, T(0), Pm + P, S);
      parallel_for(rows, 3 * (P + keys), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T* row = Pm + i * S;
          const int64_t valid = P + r0 + i + 1;  // the prefix and keys 0..r0+i are visible
          T mx = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, row[j]);
          double sum = 0.0;
          for (int64_t j = 0; j < valid; ++j) {
            row[j] = std::exp(row[j] - mx);
            sum += row[j];
          }
          const T inv = static_cast<T>(1.0 / sum);
          for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
          std::fill(row + valid, row + S, T(0));
        }
      });
      // out[r0:r1] = P [PV; V[0:r1]]
      T* ob = out + r0 * qs + h * d;
      if (P > 0) gemm_t(false, false, rows, d, P, T(1), Pm, S, pv + kvh * d, ks, T(0), ob, qs);
      gemm_t(false, false, rows, d, keys, T(1), Pm + P, S, v + kvh * d, ks, P > 0 ? T(1) : T(0), ob,
             qs);
    }
  }
}

template <typename T>
void prefix_attention_bwd(T* dq, T* dpk, T* dpv, T* dk, T* dv, const T* dout, const T* q,
                          const T* pk, const T* pv, int64_t P, const T* k, const T* v,
                          const T* probs, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d) {
  QCAL_CHECK(n_kv > 0 && n_h % n_kv == 0 && P >= 0);
  QCAL_CHECK_MSG(P == 0 || (pk != nullptr && pv != nullptr), "prefix_attention_bwd: no prefix");
  if (T_ <= 0) return;
  const int64_t group = n_h / n_kv;
  const int64_t qs = n_h * d, ks = n_kv * d;
  const int64_t S = P + T_;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(d)));
  std::fill(dk, dk + T_ * ks, T(0));
  std::fill(dv, dv + T_ * ks, T(0));
  std::vector<T> dS(static_cast<size_t>(std::min(T_, kAttnBlock) * S));  // (rows, P + keys)
  for (int64_t h = 0; h < n_h; ++h) {
    const int64_t kvh = h / group;
    for (int64_t r0 = 0; r0 < T_; r0 += kAttnBlock) {
      const int64_t r1 = std::min(T_, r0 + kAttnBlock), rows = r1 - r0, keys = r1;
      const int64_t kw = P + keys;              // columns of dS
      const T* Pm = probs + (h * T_ + r0) * S;  // (rows, kw), leading dim S
      const T* dO = dout + r0 * qs + h * d;     // (rows, d), leading dim qs
      const T* qb = q + r0 * qs + h * d;
      T* ds = dS.data();
      // dP = dO [PV; V[0:r1]]ᵀ
      if (P > 0) gemm_t(false, true, rows, P, d, T(1), dO, qs, pv + kvh * d, ks, T(0), ds, kw);
      gemm_t(false, true, rows, keys, d, T(1), dO, qs, v + kvh * d, ks, T(0), ds + P, kw);
      // dS = P ⊙ (dP − rowsum(dP ⊙ P)); zero where masked (P is 0 there).
      parallel_for(rows, 3 * kw, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const T* p = Pm + i * S;
          T* row = ds + i * kw;
          const int64_t valid = P + r0 + i + 1;
          double dot = 0.0;
          for (int64_t j = 0; j < valid; ++j) dot += static_cast<double>(row[j] * p[j]);
          const T dt = static_cast<T>(dot);
          for (int64_t j = 0; j < valid; ++j) row[j] = p[j] * (row[j] - dt);
          std::fill(row + valid, row + kw, T(0));
        }
      });
      // dQ[r0:r1] = scale · dS [PK; K[0:r1]];  dK[0:r1] += scale · dSᵀ Q[r0:r1];
      // dV[0:r1] += Pᵀ dO; the prefix columns likewise into dPK / dPV.
      T* dqb = dq + r0 * qs + h * d;
      if (P > 0) gemm_t(false, false, rows, d, P, scale, ds, kw, pk + kvh * d, ks, T(0), dqb, qs);
      gemm_t(false, false, rows, d, keys, scale, ds + P, kw, k + kvh * d, ks, P > 0 ? T(1) : T(0),
             dqb, qs);
      gemm_t(true, false, keys, d, rows, scale, ds + P, kw, qb, qs, T(1), dk + kvh * d, ks);
      gemm_t(true, false, keys, d, rows, T(1), Pm + P, S, dO, qs, T(1), dv + kvh * d, ks);
      if (P > 0 && dpk)
        gemm_t(true, false, P, d, rows, scale, ds, kw, qb, qs, T(1), dpk + kvh * d, ks);
      if (P > 0 && dpv)
        gemm_t(true, false, P, d, rows, T(1), Pm, S, dO, qs, T(1), dpv + kvh * d, ks);
    }
  }
}

template <typename T>
void attention_fwd(T* out, const T* q, const T* k, const T* v, int64_t T_, int64_t n_h,
                   int64_t n_kv, int64_t d, T* probs) {
  prefix_attention_fwd<T>(out, q, nullptr, nullptr, 0, k, v, T_, n_h, n_kv, d, probs);
}

template <typename T>
void attention_bwd(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                   const T* probs, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d) {
  prefix_attention_bwd<T>(dq, nullptr, nullptr, dk, dv, dout, q, nullptr, nullptr, 0, k, v, probs,
                          T_, n_h, n_kv, d);
}

// ---------------------------------------------------------------- SwiGLU

template <typename T>
void swiglu_fwd(T* out, const T* g, const T* u, int64_t n) {
  parallel_for(n, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = g[i] * sigmoid(g[i]) * u[i];
  });
}

template <typename T>
void swiglu_bwd(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n) {
  parallel_for(n, 10, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T gi = g[i], sg = sigmoid(gi), go = dout[i], ui = u[i];
      // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
      const T dsilu = sg * (T(1) + gi * (T(1) - sg));
      dg[i] = go * ui * dsilu;
      du[i] = go * gi * sg;
    }
  });
}

// ---------------------------------------------------------------- Kronecker

namespace {

// Row layout (rows, n1, n2) → column-block layout (n1, rows·n2): X_t[i, :] goes to
// dst[i, t·n2 : (t+1)·n2]. The L side of Lᵀ X_t R is then one GEMM over all rows.
template <typename T>
void rows_to_n1(T* dst, const T* src, int64_t rows, int64_t n1, int64_t n2) {
  parallel_for(rows, n1 * n2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < n1; ++i)
        std::memcpy(dst + i * rows * n2 + t * n2, src + (t * n1 + i) * n2,
                    static_cast<size_t>(n2) * sizeof(T));
  });
}

template <typename T>
void n1_to_rows(T* dst, const T* src, int64_t rows, int64_t n1, int64_t n2) {
  parallel_for(rows, n1 * n2, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < n1; ++i)
        std::memcpy(dst + (t * n1 + i) * n2, src + i * rows * n2 + t * n2,
                    static_cast<size_t>(n2) * sizeof(T));
  });
}

}  // namespace

template <typename T>
void kron_fwd(T* y, const T* x, const T* L, const T* R, int64_t rows, int64_t n1, int64_t n2,
              T* work) {
  const int64_t N = rows * n1 * n2, cols = rows * n2;
  if (N == 0) return;
  if (!L) {
    if (R)  // Y = X R with X viewed as (rows·n1, n2)
      gemm_t(false, false, rows * n1, n2, n2, T(1), x, n2, R, n2, T(0), y, n2);
    else
      copy_n(y, x, N);
    return;
  }
  rows_to_n1(work, x, rows, n1, n2);
  gemm_t(true, false, n1, cols, n1, T(1), L, n1, work, cols, T(0), y, cols);  // Lᵀ X (n1 layout)
  n1_to_rows(work, y, rows, n1, n2);
  if (R)
    gemm_t(false, false, rows * n1, n2, n2, T(1), work, n2, R, n2, T(0), y, n2);
  else
    copy_n(y, work, N);
}

template <typename T>
void kron_bwd(T* dx, T* dL, T* dR, const T* dy, const T* x, const T* L, const T* R, int64_t rows,
              int64_t n1, int64_t n2, T* work) {
  const int64_t N = rows * n1 * n2, cols = rows * n2;
  if (N == 0) return;
  T* w1 = work;
  T* w2 = work + N;
  const bool want_l = dL && L, want_r = dR && R;
  const T* M = dy;  // M_t = L dY_t, row layout
  if (L) {
    if (want_l) {
      // dL += Σ_t (X_t R) dY_tᵀ = Z' dY'ᵀ in the n1 layout.
      const T* Z = x;
      if (R) {
        gemm_t(false, false, rows * n1, n2, n2, T(1), x, n2, R, n2, T(0), w1, n2);
        Z = w1;
      }
      rows_to_n1(w2, Z, rows, n1, n2);
      rows_to_n1(w1, dy, rows, n1, n2);
      gemm_t(false, true, n1, n1, cols, T(1), w2, cols, w1, cols, T(1), dL, n1);
    } else if (want_r || dx) {
      rows_to_n1(w1, dy, rows, n1, n2);
    }
    if (want_r || dx) {
      gemm_t(false, false, n1, cols, n1, T(1), L, n1, w1, cols, T(0), w2, cols);  // L dY'
      n1_to_rows(w1, w2, rows, n1, n2);
      M = w1;
    }
  }
  // dR += Σ_t X_tᵀ M_t = Xᵀ M with X, M viewed as (rows·n1, n2).
  if (want_r) gemm_t(true, false, n2, n2, rows * n1, T(1), x, n2, M, n2, T(1), dR, n2);
  if (dx) {
    if (R)
      gemm_t(false, true, rows * n1, n2, n2, T(1), M, n2, R, n2, T(0), dx, n2);  // M Rᵀ
    else
      copy_n(dx, M, N);
  }
}

// ---------------------------------------------------------------- fake quant

namespace {

// The integer grid of a spec: q ∈ [qmin, qmax], scale denominator qmax.
struct Grid {
  double qmin, qmax;
};
Grid grid_of(const FakeQuantSpec& s) {
  if (s.sym) return {-std::ldexp(1.0, s.bits - 1), std::ldexp(1.0, s.bits - 1) - 1.0};
  return {0.0, std::ldexp(1.0, s.bits) - 1.0};
}

// Everything about one (row, group) that follows from its raw range; computed
// by the same code in forward and backward so both see identical values.
template <typename T>
struct GroupRange {
  T cmax, cmin;     // clip factors
  T xmax, xmin;     // clipped range
  T s;              // scale
  bool s_grad;      // s is a function of the range (not the min_scale / 0 → 1 fallback)
  bool s_from_max;  // sym: xmax (not |xmin|) defines s
};

template <typename T>
GroupRange<T> group_range(const FakeQuantSpec& sp, const Grid& gr, T raw_max, T raw_min,
                          const T* beta_max, const T* beta_min, int64_t bidx) {
  GroupRange<T> g;
  if (sp.clip == ClipMode::kLearned) {
    g.cmax = sigmoid(beta_max[bidx]);
    g.cmin = sigmoid(beta_min[bidx]);
  } else {
    g.cmax = g.cmin = static_cast<T>(sp.clip_ratio);
  }
  g.xmax = raw_max * g.cmax;
  g.xmin = raw_min * g.cmin;
  T s;
  if (sp.sym) {
    const T amin = std::fabs(g.xmin);
    g.s_from_max = g.xmax >= amin;
    s = (g.s_from_max ? g.xmax : amin) / static_cast<T>(gr.qmax);
  } else {
    g.s_from_max = true;
    s = (g.xmax - g.xmin) / static_cast<T>(gr.qmax);
  }
  g.s_grad = true;
  if (s < static_cast<T>(sp.min_scale)) {
    s = static_cast<T>(sp.min_scale);
    g.s_grad = false;
  }
  if (s == T(0)) {
    s = T(1);
    g.s_grad = false;
  }
  g.s = s;
  return g;
}

// std::nearbyint under the default rounding mode (half to even), without the
// libm call: adding 2^23 (float) / 2^52 (double) to |v| < that leaves no
// fraction bits, so the hardware rounds; larger |v| are integers already.
// Needs IEEE arithmetic (no -ffast-math, which would fold (a + M) − M).
template <typename T>
inline T round_half_even(T v) {
  constexpr T kM = std::is_same_v<T, float> ? T(8388608.0) : T(4503599627370496.0);
  const T a = std::fabs(v);
  const T r = a < kM ? (a + kM) - kM : a;
  return std::copysign(r, v);
}

// x clamped to [lo, hi] (lwc_range), the same expression forward and backward.
template <typename T>
T clamp_to(T x, T lo, T hi) {
  return x > hi ? hi : (x < lo ? lo : x);
}

// y = s·(clamp(round(x_c/s) + z, qmin, qmax) − z) over n elements of one group,
// x_c = x clamped to [lo, hi] when kClamp. `replay`: round(v) := v + replay[i];
// `record`: record[i] = round(v) − v. Either may be null.
template <typename T, bool kClamp>
void quant_elems(T* __restrict y, const T* __restrict x, int64_t n, T lo, T hi, T sc, T z, T qmin,
                 T qmax, const T* __restrict replay, T* __restrict record) {
  auto v_of = [&](int64_t i) { return (kClamp ? clamp_to(x[i], lo, hi) : x[i]) / sc; };
  if (replay) {
    for (int64_t i = 0; i < n; ++i) {
      const T rv = v_of(i) + replay[i];
      y[i] = sc * (std::min(std::max(rv + z, qmin), qmax) - z);
    }
  } else if (record) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = v_of(i), rv = round_half_even(v);
      record[i] = rv - v;
      y[i] = sc * (std::min(std::max(rv + z, qmin), qmax) - z);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T rv = round_half_even(v_of(i));
      y[i] = sc * (std::min(std::max(rv + z, qmin), qmax) - z);
    }
  }
}

}  // namespace

template <typename T>
void fake_quant_fwd(const FakeQuantSpec& s, T* y, const T* x, int64_t rows, int64_t cols,
                    const T* beta_max, const T* beta_min, int64_t n_beta, FakeQuantSaved<T>* saved,
                    RoundTape<T>* tape) {
  if (!s.on()) {
    copy_n(y, x, rows * cols);
    return;
  }
  QCAL_CHECK(s.bits >= (s.sym ? 2 : 1));
  const int64_t gs = s.group > 0 ? s.group : cols;
  const int64_t G = cols > 0 ? (cols + gs - 1) / gs : 0;
  const bool learned = s.clip == ClipMode::kLearned;
  if (learned) {
    QCAL_CHECK(beta_max && beta_min);
    QCAL_CHECK(n_beta == 1 || n_beta == rows * G);
  }
  const Grid gr = grid_of(s);
  FakeQuantSaved<T> local;
  FakeQuantSaved<T>& sv = saved ? *saved : local;
  const size_t ng = static_cast<size_t>(rows * G);
  sv.scale.assign(ng, T(1));
  sv.zero.assign(ng, T(0));
  sv.amax_at.assign(ng, -1);
  sv.amin_at.assign(ng, -1);
  sv.raw_max.assign(ng, T(0));
  sv.raw_min.assign(ng, T(0));

  // Tape layout of one call: kLsq asym: rows·G zero points, then rows·cols
  // rounding offsets round(v) − v; kLsq sym: the offsets only; kIdentity:
  // rows·cols offsets fq(x) − x.
  const bool lsq = s.ste == Ste::kLsq;
  const int64_t n_zero = (lsq && !s.sym) ? rows * G : 0;
  T* rec = nullptr;        // where this call records
  const T* rep = nullptr;  // where this call replays from
  if (tape) {
    const size_t need = static_cast<size_t>(n_zero + rows * cols);
    if (tape->mode == RoundTape<T>::Mode::kRecord) {
      const size_t base = tape->offsets.size();
      tape->offsets.resize(base + need);
      rec = tape->offsets.data() + base;
    } else {
      QCAL_CHECK_MSG(tape->pos + need <= tape->offsets.size(), "RoundTape replay overrun");
      rep = tape->offsets.data() + tape->pos;
      tape->pos += need;
    }
  }
  const T* rep_off = rep ? rep + n_zero : nullptr;
  T* rec_off = rec ? rec + n_zero : nullptr;
  const T qmin = static_cast<T>(gr.qmin), qmax = static_cast<T>(gr.qmax);

  parallel_for(rows, 8 * cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * gs, c1 = std::min(cols, c0 + gs), idx = r * G + g;
        const T* xr = x + r * cols;
        T* yr = y + r * cols;
        T mx = xr[c0], mn = xr[c0];
        for (int64_t c = c0 + 1; c < c1; ++c) {  // branch-free, vectorizable
          mx = std::max(mx, xr[c]);
          mn = std::min(mn, xr[c]);
        }
        int64_t imax = c0, imin = c0;  // first occurrences
        while (imax < c1 - 1 && !(xr[imax] == mx)) ++imax;
        while (imin < c1 - 1 && !(xr[imin] == mn)) ++imin;
        if (!s.lwc_range) {  // the range always contains 0
          if (!(mx > T(0))) {
            mx = T(0);
            imax = -1;
          }
          if (!(mn < T(0))) {
            mn = T(0);
            imin = -1;
          }
        }
        sv.raw_max[idx] = mx;
        sv.raw_min[idx] = mn;
        sv.amax_at[idx] = imax;
        sv.amin_at[idx] = imin;
        const GroupRange<T> gp =
            group_range(s, gr, mx, mn, beta_max, beta_min, n_beta == 1 ? 0 : idx);
        const T sc = gp.s;
        T z = T(0);
        if (!s.sym) {
          z = (lsq && rep) ? rep[idx] : round_half_even(-gp.xmin / sc);
          if (lsq && rec) rec[idx] = z;
        }
        sv.scale[idx] = sc;
        sv.zero[idx] = z;
        const int64_t o = r * cols + c0, n = c1 - c0;
        const T* rp = (lsq && rep_off) ? rep_off + o : nullptr;
        T* wp = (lsq && rec_off) ? rec_off + o : nullptr;
        if (s.lwc_range)
          quant_elems<T, true>(yr + c0, xr + c0, n, gp.xmin, gp.xmax, sc, z, qmin, qmax, rp, wp);
        else
          quant_elems<T, false>(yr + c0, xr + c0, n, gp.xmin, gp.xmax, sc, z, qmin, qmax, rp, wp);
        if (!lsq) {  // kIdentity: the surrogate is x + (fq(x) − x), a constant
          if (rep_off) {
            for (int64_t c = 0; c < n; ++c) yr[c0 + c] = xr[c0 + c] + rep_off[o + c];
          } else if (rec_off) {
            for (int64_t c = 0; c < n; ++c) rec_off[o + c] = yr[c0 + c] - xr[c0 + c];
          }
        }
      }
    }
  });
}

template <typename T>
void fake_quant_bwd(const FakeQuantSpec& s, T* dx, T* dbeta_max, T* dbeta_min, const T* dy,
                    const T* x, int64_t rows, int64_t cols, const T* beta_max, const T* beta_min,
                    int64_t n_beta, const FakeQuantSaved<T>& saved) {
  if (!s.on() || s.ste == Ste::kIdentity) {
    copy_n(dx, dy, rows * cols);
    return;
  }
  const int64_t gs = s.group > 0 ? s.group : cols;
  const int64_t G = cols > 0 ? (cols + gs - 1) / gs : 0;
  const bool learned = s.clip == ClipMode::kLearned;
  QCAL_CHECK(saved.scale.size() == static_cast<size_t>(rows * G));
  const Grid gr = grid_of(s);
  const T qmin = static_cast<T>(gr.qmin), qmax = static_cast<T>(gr.qmax);
  // Per-group gradients of the clip factors' β (summed in order afterwards).
  const bool want_beta = learned && (dbeta_max || dbeta_min);
  std::vector<T> gbmax(want_beta ? static_cast<size_t>(rows * G) : 0);
  std::vector<T> gbmin(gbmax.size());

  parallel_for(rows, 6 * cols, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * gs, c1 = std::min(cols, c0 + gs), idx = r * G + g;
        const T* xr = x + r * cols;
        const T* dyr = dy + r * cols;
        T* dxr = dx + r * cols;
        const T raw_max = saved.raw_max[idx], raw_min = saved.raw_min[idx];
        const GroupRange<T> gp =
            group_range(s, gr, raw_max, raw_min, beta_max, beta_min, n_beta == 1 ? 0 : idx);
        const T sc = saved.scale[idx], z = saved.zero[idx];
        double ds = 0.0, dxmax = 0.0, dxmin = 0.0;
        for (int64_t c = c0; c < c1; ++c) {
          const T xv = xr[c];
          const bool hi = s.lwc_range && xv > gp.xmax;
          const bool lo = s.lwc_range && !hi && xv < gp.xmin;
          const T xc = hi ? gp.xmax : (lo ? gp.xmin : xv);
          const T v = xc / sc;
          const T rv = round_half_even(v);
          const T qz = rv + z;
          const T go = dyr[c];
          T dxc;
          // x̂ = s·(clamp(round(v) + z) − z) with round(v) − v constant; the clamp
          // passes the gradient on its bounds (torch.clamp).
          if (qz < qmin) {
            ds += static_cast<double>(go * (qmin - z));
            dxc = T(0);
          } else if (qz > qmax) {
            ds += static_cast<double>(go * (qmax - z));
            dxc = T(0);
          } else {
            ds += static_cast<double>(go * (rv - v));
            dxc = go;
          }
          if (hi) {
            dxmax += static_cast<double>(dxc);
            dxr[c] = T(0);
          } else if (lo) {
            dxmin += static_cast<double>(dxc);
            dxr[c] = T(0);
          } else {
            dxr[c] = dxc;
          }
        }
        if (gp.s_grad) {
          const double inv_q = 1.0 / gr.qmax;
          if (s.sym) {
            if (gp.s_from_max)
              dxmax += ds * inv_q;
            else
              dxmin += ds * inv_q * (gp.xmin < T(0) ? -1.0 : 1.0);  // s = |xmin|/qmax
          } else {
            dxmax += ds * inv_q;
            dxmin -= ds * inv_q;
          }
        }
        // xmax = raw_max·cmax, raw_max = x[amax_at] (likewise min).
        if (saved.amax_at[idx] >= 0)
          dxr[saved.amax_at[idx]] += static_cast<T>(dxmax * static_cast<double>(gp.cmax));
        if (saved.amin_at[idx] >= 0)
          dxr[saved.amin_at[idx]] += static_cast<T>(dxmin * static_cast<double>(gp.cmin));
        if (want_beta) {
          // d cmax/dβ = σ(β)(1 − σ(β)).
          gbmax[idx] = static_cast<T>(dxmax * static_cast<double>(raw_max * gp.cmax) *
                                      static_cast<double>(T(1) - gp.cmax));
          gbmin[idx] = static_cast<T>(dxmin * static_cast<double>(raw_min * gp.cmin) *
                                      static_cast<double>(T(1) - gp.cmin));
        }
      }
    }
  });
  if (!want_beta) return;
  if (n_beta == 1) {
    double smax = 0.0, smin = 0.0;
    for (size_t i = 0; i < gbmax.size(); ++i) {
      smax += static_cast<double>(gbmax[i]);
      smin += static_cast<double>(gbmin[i]);
    }
    if (dbeta_max) dbeta_max[0] += static_cast<T>(smax);
    if (dbeta_min) dbeta_min[0] += static_cast<T>(smin);
  } else {
    for (size_t i = 0; i < gbmax.size(); ++i) {
      if (dbeta_max) dbeta_max[i] += gbmax[i];
      if (dbeta_min) dbeta_min[i] += gbmin[i];
    }
  }
}

// ---------------------------------------------------------------- cross-entropy

template <typename T>
double cross_entropy_fwd_bwd(const T* logits, const int32_t* targets, int64_t rows, int64_t V,
                             T* dlogits) {
  int64_t n_scored = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] >= 0) {
      QCAL_CHECK(targets[r] < V);
      ++n_scored;
    }
  }
  std::vector<double> nll(static_cast<size_t>(rows), 0.0);
  const double inv_n = n_scored > 0 ? 1.0 / static_cast<double>(n_scored) : 0.0;
  parallel_for(rows, 4 * V, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* lr = logits + r * V;
      T* dl = dlogits ? dlogits + r * V : nullptr;
      const int32_t t = targets[r];
      if (t < 0) {
        if (dl) std::fill(dl, dl + V, T(0));
        continue;
      }
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, lr[j]);
      double sum = 0.0;
      for (int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(lr[j] - mx));
      const double lse = std::log(sum);
      nll[r] = lse - static_cast<double>(lr[t] - mx);
      if (dl) {
        const double k = inv_n / sum;
        for (int64_t j = 0; j < V; ++j)
          dl[j] = static_cast<T>(std::exp(static_cast<double>(lr[j] - mx)) * k);
        dl[t] -= static_cast<T>(inv_n);
      }
    }
  });
  double total = 0.0;
  for (double v : nll) total += v;
  return total * inv_n;
}

// ---------------------------------------------------------------- instantiations

#define QCAL_GRAD_INSTANTIATE(T)                                                                   \
  template void rmsnorm_fwd<T>(T*, const T*, const T*, int64_t, int64_t, T, T*);                   \
  template void rmsnorm_bwd<T>(T*, T*, const T*, const T*, const T*, const T*, int64_t, int64_t);  \
  template void rope_fwd<T>(T*, int64_t, int64_t, int64_t, int64_t, double);                       \
  template void rope_bwd<T>(T*, int64_t, int64_t, int64_t, int64_t, double);                       \
  template void attention_fwd<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t,      \
                                 int64_t, T*);                                                     \
  template void attention_bwd<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*,     \
                                 int64_t, int64_t, int64_t, int64_t);                              \
  template void prefix_attention_fwd<T>(T*, const T*, const T*, const T*, int64_t, const T*,       \
                                        const T*, int64_t, int64_t, int64_t, int64_t, T*);         \
  template void prefix_attention_bwd<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*,          \
                                        const T*, int64_t, const T*, const T*, const T*, int64_t,  \
                                        int64_t, int64_t, int64_t);                                \
  template void swiglu_fwd<T>(T*, const T*, const T*, int64_t);                                    \
  template void swiglu_bwd<T>(T*, T*, const T*, const T*, const T*, int64_t);                      \
  template void kron_fwd<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, T*);      \
  template void kron_bwd<T>(T*, T*, T*, const T*, const T*, const T*, const T*, int64_t, int64_t,  \
                            int64_t, T*);                                                          \
  template void fake_quant_fwd<T>(const FakeQuantSpec&, T*, const T*, int64_t, int64_t, const T*,  \
                                  const T*, int64_t, FakeQuantSaved<T>*, RoundTape<T>*);           \
  template void fake_quant_bwd<T>(const FakeQuantSpec&, T*, T*, T*, const T*, const T*, int64_t,   \
                                  int64_t, const T*, const T*, int64_t, const FakeQuantSaved<T>&); \
  template double cross_entropy_fwd_bwd<T>(const T*, const int32_t*, int64_t, int64_t, T*);

QCAL_GRAD_INSTANTIATE(float)
QCAL_GRAD_INSTANTIATE(double)

#undef QCAL_GRAD_INSTANTIATE

}  // namespace qcal

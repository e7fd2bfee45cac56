// Forward primitives of a LLaMA block (see ops.h). Letters: T tokens, C
// channels, n_h query heads, n_kv KV heads, d head dim, V vocab.
//
// The element-wise and row-wise parts run on a small pool of blocking worker
// threads (not OpenMP): the BLAS is OpenBLAS's pthread build, whose threads
// run between our loops, and workers that sleep on a condition variable never
// spin against it. GEMMs are issued from the calling thread only.
#include "kernels/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

namespace qcal {

// ---------------------------------------------------------------- RMSNorm

void rmsnorm_forward(float* out, const float* x, const float* gamma, int64_t rows, int64_t C,
                     float eps) {
  parallel_for(rows, C, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      float* o = out + r * C;
      double ss = 0.0;
      for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xr[c]) * xr[c];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(C) + eps));
      for (int64_t c = 0; c < C; ++c) o[c] = gamma[c] * (xr[c] * inv);
    }
  });
}

void rmsnorm_forward_ref(double* out, const double* x, const double* gamma, int64_t rows, int64_t C,
                         double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += x[r * C + c] * x[r * C + c];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(C) + eps);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = gamma[c] * (x[r * C + c] * inv);
  }
}

// ---------------------------------------------------------------- RoPE

void rope_forward(float* x, int64_t T, int64_t n_heads, int64_t d, int64_t pos0, double theta) {
  QCAL_CHECK(d % 2 == 0);
  const int64_t half = d / 2;
  // cos/sin table (T, d/2), angles in double.
  std::vector<float> cs(static_cast<size_t>(T * half)), sn(cs.size());
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
  parallel_for(T, 8 * half, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const double pos = static_cast<double>(pos0 + t);
      for (int64_t i = 0; i < half; ++i) {
        const double a = pos * inv_freq[i];
        cs[t * half + i] = static_cast<float>(std::cos(a));
        sn[t * half + i] = static_cast<float>(std::sin(a));
      }
    }
  });
  parallel_for(T, n_heads * d, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cs.data() + t * half;
      const float* s = sn.data() + t * half;
      for (int64_t h = 0; h < n_heads; ++h) {
        float* x1 = x + (t * n_heads + h) * d;
        float* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

void rope_forward_ref(double* x, int64_t T, int64_t n_heads, int64_t d, int64_t pos0,
                      double theta) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < n_heads; ++h) {
      double* xh = x + (t * n_heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        const double ang = static_cast<double>(pos0 + t) *
                           std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
        const double a = xh[i], b = xh[i + half];
        xh[i] = a * std::cos(ang) - b * std::sin(ang);
        xh[i + half] = b * std::cos(ang) + a * std::sin(ang);
      }
    }
  }
}

// ---------------------------------------------------------------- attention

void attention_forward(float* out, const float* q, const float* k, const float* v, int64_t T,
                       int64_t n_h, int64_t n_kv, int64_t d) {
  QCAL_CHECK(n_kv > 0 && n_h % n_kv == 0);
  if (T <= 0) return;
  const int64_t group = n_h / n_kv;
  const int64_t qs = n_h * d, ks = n_kv * d;  // row strides of q/out and k/v
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  // Query rows in blocks, so the causal upper triangle beyond the block's last
  // row is never computed and the score buffer stays (kBlock, T).
  constexpr int64_t kBlock = 256;
  const int64_t bmax = std::min(T, kBlock);
  std::vector<float> S(static_cast<size_t>(bmax * T));  // (rows, keys) of one block
  for (int64_t h = 0; h < n_h; ++h) {
    const int64_t kvh = h / group;
    for (int64_t r0 = 0; r0 < T; r0 += kBlock) {
      const int64_t r1 = std::min(T, r0 + kBlock), rows = r1 - r0, keys = r1;
      float* s = S.data();
      // S (rows, keys) = scale · Q_h[r0:r1] K_h[0:r1]ᵀ
      sgemm(false, true, rows, keys, d, scale, q + r0 * qs + h * d, qs, k + kvh * d, ks, 0.0f, s,
            keys);
      parallel_for(rows, keys, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float* row = s + i * keys;
          const int64_t valid = r0 + i + 1;  // keys 0..r0+i are visible
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < valid; ++j) mx = std::max(mx, row[j]);
          float sum = 0.0f;
          for (int64_t j = 0; j < valid; ++j) {
            row[j] = std::exp(row[j] - mx);
            sum += row[j];
          }
          const float inv = 1.0f / sum;
          for (int64_t j = 0; j < valid; ++j) row[j] *= inv;
          for (int64_t j = valid; j < keys; ++j) row[j] = 0.0f;
        }
      });
      // out_h[r0:r1] (rows, d) = P (rows, keys) · V_h[0:r1] (keys, d)
      sgemm(false, false, rows, d, keys, 1.0f, s, keys, v + kvh * d, ks, 0.0f,
            out + r0 * qs + h * d, qs);
    }
  }
}

void attention_forward_ref(double* out, const double* q, const double* k, const double* v,
                           int64_t T, int64_t n_h, int64_t n_kv, int64_t d) {
  const int64_t group = n_h / n_kv;
  const int64_t qs = n_h * d, ks = n_kv * d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> p(static_cast<size_t>(T));
  for (int64_t h = 0; h < n_h; ++h) {
    const int64_t kvh = h / group;
    for (int64_t i = 0; i < T; ++i) {
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j <= i; ++j) {
        double dot = 0.0;
        for (int64_t e = 0; e < d; ++e) dot += q[i * qs + h * d + e] * k[j * ks + kvh * d + e];
        p[j] = dot * scale;
        mx = std::max(mx, p[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= i; ++j) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      for (int64_t e = 0; e < d; ++e) {
        double acc = 0.0;
        for (int64_t j = 0; j <= i; ++j) acc += p[j] * v[j * ks + kvh * d + e];
        out[i * qs + h * d + e] = acc / sum;
      }
    }
  }
}

// ---------------------------------------------------------------- SwiGLU

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  parallel_for(n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
}

void swiglu_forward_ref(double* out, const double* gate, const double* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
}

// ---------------------------------------------------------------- log-softmax

void log_softmax_rows(float* x, int64_t rows, int64_t V) {
  parallel_for(rows, 4 * V, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = x + r * V;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, row[j]);
      double sum = 0.0;
      for (int64_t j = 0; j < V; ++j) sum += std::exp(row[j] - mx);
      const float ls = static_cast<float>(std::log(sum));
      for (int64_t j = 0; j < V; ++j) row[j] = (row[j] - mx) - ls;
    }
  });
}

void log_softmax_rows_ref(double* x, int64_t rows, int64_t V) {
  for (int64_t r = 0; r < rows; ++r) {
    double* row = x + r * V;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, row[j]);
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(row[j] - mx);
    const double ls = std::log(sum);
    for (int64_t j = 0; j < V; ++j) row[j] = (row[j] - mx) - ls;
  }
}

}  // namespace qcal

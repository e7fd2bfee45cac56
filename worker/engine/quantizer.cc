// Integer weight quantizers and RTN (methods.md §0.1, §11.2).
// Letters: O output features, I input features, G groups, gs group size.
#include "worker/engine/quantizer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common/dtype.h"

namespace qcal {

namespace {

constexpr float kMinScale = 1e-5f;
constexpr float kMaxF16 = 65504.0f;
// MSE clip search (QuaRot WeightQuantizer): grid 100, maxshrink 0.8, norm 2.4.
constexpr int kClipGrid = 100;
constexpr int kClipCandidates = 80;
constexpr float kClipNorm = 2.4f;

// Stored scales are fp16: clamp, round, and keep them finite.
float finish_scale(float scale) {
  if (!(scale >= kMinScale)) scale = kMinScale;  // also NaN → kMinScale
  scale = round_to_dtype(scale, DType::kF16);
  if (!(scale <= kMaxF16)) scale = kMaxF16;
  return scale;
}

// Parameters for the range [lo, hi] with lo ≤ 0 ≤ hi.
QParam params_from_range(float lo, float hi, const QuantSpec& spec) {
  QParam p;
  if (spec.sym) {
    const int half = 1 << (spec.bits - 1);
    const float absmax = std::max(-lo, hi);
    // Full grid: 2·absmax / (2^b − 1) (the doubling is exact in fp32).
    p.scale = finish_scale(spec.narrow ? absmax / static_cast<float>(half - 1)
                                       : 2.0f * absmax / static_cast<float>(spec.maxq()));
    p.zero = half;
  } else {
    const int maxq = spec.maxq();
    p.scale = finish_scale((hi - lo) / static_cast<float>(maxq));
    float z = std::nearbyint(-lo / p.scale);
    if (!(z >= 0.0f)) z = 0.0f;
    if (z > static_cast<float>(maxq)) z = static_cast<float>(maxq);
    p.zero = static_cast<int32_t>(z);
  }
  return p;
}

// Σ weight·|ŵ − w|^2.4 over x[0..n) (weight 1 when null), or a value ≥ `stop` as soon as the
// partial sum reaches it: terms are non-negative, so such a candidate cannot be strictly better.
double clip_error(const float* x, const double* weight, int64_t n, QParam p, int maxq,
                  double stop) {
  double err = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const float d = dequantize_code(quantize_code(x[j], p, maxq), p) - x[j];
    const double e = static_cast<double>(std::pow(std::fabs(d), kClipNorm));
    err += weight ? weight[j] * e : e;
    if ((j & 7) == 7 && err >= stop) return err;
  }
  return err;
}

}  // namespace

Status QuantSpec::validate() const {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
    return invalid_input("quant spec: bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
  }
  if (group_size != -1 && group_size <= 0) {
    return invalid_input("quant spec: group_size must be -1 (per channel) or > 0, got " +
                         std::to_string(group_size));
  }
  return Status::ok();
}

QParam find_qparam(const float* x, int64_t n, const QuantSpec& spec, const double* weight) {
  // The range always contains 0 (asymmetric) and sym only needs |x|max, which is
  // max(−lo, hi) of the same range. Comparisons skip NaN.
  float lo = 0.0f;
  float hi = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  if (!spec.sym && lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
  if (!spec.mse_clip) return params_from_range(lo, hi, spec);

  const int maxq = spec.maxq();
  QParam best_p;
  double best = std::numeric_limits<double>::infinity();
  for (int i = 0; i < kClipCandidates; ++i) {
    const float shrink = static_cast<float>(1.0 - static_cast<double>(i) / kClipGrid);
    const QParam p = params_from_range(shrink * lo, shrink * hi, spec);
    const double err = clip_error(x, weight, n, p, maxq, best);
    if (err < best) {
      best = err;
      best_p = p;
    }
  }
  return best_p;
}

Tensor QuantizedLinear::dequantize() const {
  const int64_t O = out_features;
  const int64_t I = in_features;
  QCAL_CHECK(O > 0 && I > 0);
  QCAL_CHECK(static_cast<int64_t>(q.size()) == O * I);
  QCAL_CHECK(static_cast<int64_t>(g_idx.size()) == I);
  QCAL_CHECK(scales.size() == zeros.size() && static_cast<int64_t>(scales.size()) % O == 0);
  const int64_t G = num_groups();
  for (int32_t g : g_idx) QCAL_CHECK(g >= 0 && g < G);

  Tensor out({O, I});
  for (int64_t o = 0; o < O; ++o) {
    const uint8_t* qrow = q.data() + o * I;
    float* orow = out.ptr() + o * I;
    for (int64_t i = 0; i < I; ++i) {
      const int64_t gi = static_cast<int64_t>(g_idx[i]) * O + o;
      orow[i] = dequantize_code(qrow[i], QParam{scales[gi], zeros[gi]});
    }
  }
  return out;
}

Result<QuantizedLinear> rtn_quantize(const Tensor& W, const QuantSpec& spec) {
  QCAL_RETURN_IF_ERROR(spec.validate());
  if (W.ndim() != 2 || W.dim(0) <= 0 || W.dim(1) <= 0) {
    return invalid_input("rtn_quantize: W must be a non-empty (O, I) matrix, got " +
                         shape_str(W.shape));
  }
  const int64_t O = W.dim(0);
  const int64_t I = W.dim(1);
  for (int64_t k = 0; k < O * I; ++k) {
    if (!std::isfinite(W.data[k])) {
      return invalid_input("rtn_quantize: non-finite weight at [" + std::to_string(k / I) + ", " +
                           std::to_string(k % I) + "] of " + shape_str(W.shape));
    }
  }
  const int64_t gs = spec.group_size == -1 ? I : std::min(spec.group_size, I);
  const int64_t G = (I + gs - 1) / gs;
  const int maxq = spec.maxq();

  QuantizedLinear ql;
  ql.out_features = O;
  ql.in_features = I;
  ql.spec = spec;
  ql.q.resize(O * I);
  ql.scales.resize(G * O);  // (G, O)
  ql.zeros.resize(G * O);   // (G, O)
  ql.g_idx.resize(I);
  for (int64_t i = 0; i < I; ++i) ql.g_idx[i] = static_cast<int32_t>(i / gs);

  for (int64_t o = 0; o < O; ++o) {
    const float* w = W.ptr() + o * I;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * gs;
      const int64_t c1 = std::min(c0 + gs, I);
      const QParam p = find_qparam(w + c0, c1 - c0, spec);
      ql.scales[g * O + o] = p.scale;
      ql.zeros[g * O + o] = p.zero;
      for (int64_t c = c0; c < c1; ++c) {
        ql.q[o * I + c] = static_cast<uint8_t>(quantize_code(w[c], p, maxq));
      }
    }
  }
  return ql;
}

Tensor fake_quantize(const Tensor& W, const QuantSpec& spec) {
  Result<QuantizedLinear> ql = rtn_quantize(W, spec);
  QCAL_CHECK_MSG(ql.is_ok(), ql.status().to_string().c_str());
  return ql->dequantize();
}

}  // namespace qcal

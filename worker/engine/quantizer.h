// Integer weight quantizers (methods.md §0.1, §11.2) and RTN.
//
// One convention everywhere in the engine: unsigned codes q ∈ [0, 2^b − 1],
// ŵ = scale · (q − zero).
//  - symmetric: zero = 2^(b−1) and scale = absmax / (2^(b−1) − 1), which is
//    the signed grid [−2^(b−1), 2^(b−1) − 1] of QuaRot/FlatQuant shifted by
//    2^(b−1) (so it writes directly as GPTQ with z = 8 or compressed-tensors
//    signed codes q − 8, with no symmetric zero-point tensor);
//  - asymmetric: xmin = min(row min, 0), xmax = max(row max, 0) (both 0 → −1, +1),
//    scale = (xmax − xmin) / (2^b − 1), zero = round(−xmin / scale) ∈ [0, 2^b − 1].
// Scales are clamped ≥ 1e-5 and then rounded to fp16, the dtype they are
// stored in, so the engine's dequantized weights equal what a loader computes
// from the checkpoint, bit for bit. Rounding is half to even (std::nearbyint).
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"

namespace qcal {

struct QuantSpec {
  int bits = 4;              // 2, 3, 4 or 8
  int64_t group_size = 128;  // input columns per group; -1 = one group per row (per channel)
  bool sym = true;
  // MSE clip search (§0.1): shrink the range over 80 candidates, |·|^2.4 norm.
  bool mse_clip = false;

  int maxq() const { return (1 << bits) - 1; }
  // Checks bits ∈ {2,3,4,8}, group_size == -1 or > 0.
  Status validate() const;
};

// Scale and zero of one group of one row.
struct QParam {
  float scale = 1.0f;
  int32_t zero = 0;
};

// Parameters for x[0..n) (one row of one group).
QParam find_qparam(const float* x, int64_t n, const QuantSpec& spec);
// q = clamp(nearbyint(x / scale) + zero, 0, maxq).
inline int32_t quantize_code(float x, QParam p, int maxq);
inline float dequantize_code(int32_t q, QParam p) {
  return p.scale * static_cast<float>(q - p.zero);
}

// A quantized Linear weight W (O, I) in HF orientation.
struct QuantizedLinear {
  int64_t out_features = 0;  // O
  int64_t in_features = 0;   // I
  QuantSpec spec;
  std::vector<uint8_t> q;      // (O, I) codes in [0, maxq]
  std::vector<float> scales;   // (G, O), fp16-representable
  std::vector<int32_t> zeros;  // (G, O) in [0, maxq]
  std::vector<int32_t> g_idx;  // (I) group of each input column (act-order permutes it)
  bool act_order = false;      // g_idx is not i / group_size

  int64_t num_groups() const { return static_cast<int64_t>(scales.size()) / out_features; }
  // Ŵ (O, I): Ŵ[o, i] = scales[g_idx[i], o] * (q[o, i] − zeros[g_idx[i], o]).
  Tensor dequantize() const;
};

// Round-to-nearest quantization of W (O, I) with groups of consecutive columns.
Result<QuantizedLinear> rtn_quantize(const Tensor& W, const QuantSpec& spec);

// Fake-quantize (quantize then dequantize) W in place with RTN; returns the codes too.
// Convenience for tests and error measurements.
Tensor fake_quantize(const Tensor& W, const QuantSpec& spec);

inline int32_t quantize_code(float x, QParam p, int maxq) {
  float v = __builtin_nearbyintf(x / p.scale) + static_cast<float>(p.zero);
  if (!(v >= 0.0f)) v = 0.0f;  // also maps NaN to 0
  if (v > static_cast<float>(maxq)) v = static_cast<float>(maxq);
  return static_cast<int32_t>(v);
}

}  // namespace qcal

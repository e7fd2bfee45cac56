// Integer weight quantizers (methods.md §0.1, §11.2) and RTN.
//
// One convention everywhere in the engine: unsigned codes q ∈ [0, 2^b − 1],
// ŵ = scale · (q − zero).
//  - symmetric (default grid, "full"): zero = 2^(b−1) and
//    scale = 2·absmax / (2^b − 1), so all 2^b codes are used: the grid of
//    AutoGPTQ / GPTQModel (quantizer.py, zero (maxq+1)/2) and of
//    compressed-tensors / llm-compressor (calculate_qparams: absmax / (15/2)).
//    ŵ ∈ [−2^(b−1)·scale, (2^(b−1) − 1)·scale]: the largest negative weight is
//    inside the grid, the largest positive one is clipped to (2^b − 2)/(2^b − 1)
//    of absmax (0.933 at 4 bits);
//  - symmetric, narrow grid (QuantSpec::narrow): scale = absmax / (2^(b−1) − 1),
//    the signed grid [−2^(b−1), 2^(b−1) − 1] of QuaRot/FlatQuant/SpinQuant shifted
//    by 2^(b−1); ±absmax land on codes 1 and 2^b − 1, code 0 is used only by
//    GPTQ's error feedback (2^b − 1 levels). It is the grid of the calibration
//    engine's fake quantizers (kernels/grad.h), and the calibration engine
//    deploys its weights on it (worker/calib/methods.cc weight_spec);
//  Both write directly as GPTQ with z = 2^(b−1) or as compressed-tensors signed
//  codes q − 2^(b−1) with no symmetric zero-point tensor: the checkpoint stores the
//  scale, so loaders need not know which grid produced it.
//  - asymmetric: xmin = min(row min, 0), xmax = max(row max, 0) (both 0 → −1, +1),
//    scale = (xmax − xmin) / (2^b − 1), zero = round(−xmin / scale) ∈ [0, 2^b − 1].
// Scales are clamped ≥ 1e-5 and then rounded to fp16, the dtype they are
// stored in (and capped at 65504, the largest fp16), so the engine's
// dequantized weights equal what a loader computes from the checkpoint, bit for
// bit. The zero is computed from the rounded scale and clamped to [0, maxq].
// Rounding is half to even (std::nearbyint / std::rint, never std::round). NaN inputs are ignored
// by the range search and get code 0; callers reject non-finite weights first.
//
// Letters: O output features (rows of W), I input features (columns),
// G = ceil(I / group_size) groups (1 for per channel).
// Thread safety: everything here is a pure function of its inputs.
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
  // Symmetric only (ignored when !sym): scale = absmax / (2^(b−1) − 1) instead of
  // 2·absmax / (2^b − 1) (see the file comment). For recipes whose transforms or
  // clips were trained against that grid (the calibration engine's fake
  // quantizers) and to reproduce the QuaRot/FlatQuant papers' weight quantizer.
  bool narrow = false;
  // MSE clip search (§0.1): shrink the range by p = 1 − i/100, i = 0..79, and keep
  // the first candidate with a strictly smaller Σ c_j·|ŵ_j − w_j|^2.4 (i = 0 is the
  // plain range, so the result is never worse than without the search in that norm).
  // Every caller of find_qparam gets it: RTN (c = 1), and GPTQ's per-channel, static
  // and per-group parameters (a group's range searched on its error-updated columns),
  // where c_j = H_jj, the input's Hessian diagonal: the range that keeps the error
  // small where the layer's output is most sensitive. (Against c = 1, on the issue
  // #14 comparison with act-order + static groups: KL 0.0119 → 0.0051 on the outlier
  // fixture, grammar-tiny 0.00023 → 0.00022, babyllama unchanged within 0.5%.)
  bool mse_clip = false;

  int maxq() const { return (1 << bits) - 1; }
  // Checks bits ∈ {2,3,4,8}, group_size == -1 or > 0. kInvalidInput naming the field.
  Status validate() const;
};

// Scale and zero of one group of one row.
struct QParam {
  float scale = 1.0f;
  int32_t zero = 0;
};

// Parameters for x[0..n) (one row of one group); n ≥ 0 (n == 0 behaves as all zeros).
// `spec` must be valid. `weight` (n non-negative values, or null for all 1): each
// element's weight in the MSE clip search's error; unused without spec.mse_clip.
QParam find_qparam(const float* x, int64_t n, const QuantSpec& spec,
                   const double* weight = nullptr);
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
  // true iff g_idx is not i / group_size: GPTQ act-order without static groups
  // (scale lookups must then gather through g_idx).
  bool act_order = false;

  int64_t num_groups() const { return static_cast<int64_t>(scales.size()) / out_features; }
  // Ŵ (O, I): Ŵ[o, i] = scales[g_idx[i], o] * (q[o, i] − zeros[g_idx[i], o]), computed
  // with dequantize_code (the exact fp32 expression the solvers use). The fields must be
  // consistent (sizes above, g_idx[i] < G); a mismatch is a bug and aborts.
  Tensor dequantize() const;
};

// Round-to-nearest quantization of W (O, I) with groups of consecutive columns:
// group g covers columns [g·gs, min((g+1)·gs, I)), so the last group is partial when
// gs does not divide I; group_size −1 (or ≥ I) gives one group per row. g_idx[i] = i / gs.
// kInvalidInput for an invalid spec, a W that is not 2-D and non-empty, or a
// non-finite weight.
Result<QuantizedLinear> rtn_quantize(const Tensor& W, const QuantSpec& spec);

// Ŵ = rtn_quantize(W, spec).dequantize(): quantize then dequantize, for tests and error
// measurements. Preconditions (checked, abort on violation): the spec is valid and W is
// a 2-D, non-empty, finite matrix.
Tensor fake_quantize(const Tensor& W, const QuantSpec& spec);

inline int32_t quantize_code(float x, QParam p, int maxq) {
  // rint == nearbyint in value (half to even in the default rounding mode) but does
  // not save/restore the FP environment: 3-4x cheaper in glibc.
  float v = __builtin_rintf(x / p.scale) + static_cast<float>(p.zero);
  if (!(v >= 0.0f)) v = 0.0f;  // also maps NaN to 0
  if (v > static_cast<float>(maxq)) v = static_cast<float>(maxq);
  return static_cast<int32_t>(v);
}

}  // namespace qcal

// GPTQ (methods.md §2, §11.6): Hessian accumulation and the column-by-column
// solver with lazy block updates, act-order and static groups.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "worker/engine/quantizer.h"

namespace qcal {

// H = (2 / nsamples) Σ_tokens x xᵀ, accumulated in fp32 (no TF32).
// Not thread safe.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t cols);
  // X (rows, cols) holds the tokens of `num_sequences` calibration sequences.
  void add_batch(const float* X, int64_t rows, int64_t num_sequences);
  // Adds another accumulator's sums (same cols): for all-reduce across ranks.
  void merge(const HessianAccumulator& other);
  int64_t cols() const { return cols_; }
  int64_t nsamples() const { return nsamples_; }
  // The Hessian (cols, cols), symmetric.
  Tensor hessian() const;
  // Raw Σ x xᵀ (cols, cols), for reductions.
  std::vector<float>& raw_sum() { return sum_; }

 private:
  int64_t cols_;
  int64_t nsamples_ = 0;
  std::vector<float> sum_;  // (cols, cols) Σ x xᵀ
};

struct GptqOptions {
  double percdamp = 0.01;
  int64_t blocksize = 128;
  bool act_order = false;      // "desc_act"
  bool static_groups = false;
  // On Cholesky failure, damping is multiplied by 10 and retried up to this many
  // times (with a warning each time) before the layer falls back to RTN.
  int max_damp_retries = 4;
};

struct GptqResult {
  QuantizedLinear qlinear;
  double loss = 0.0;          // Σ (w − q)² / d² / 2 (the reference's bookkeeping)
  double percdamp_used = 0.0; // the damping that succeeded
  bool fell_back_to_rtn = false;
};

// Quantizes W (O, I) given the Hessian H (I, I) of its inputs.
Result<GptqResult> gptq_quantize(const Tensor& W, const Tensor& H, const QuantSpec& spec,
                                 const GptqOptions& opts);

// In-place Cholesky of a symmetric positive-definite matrix A (n, n), lower
// factor in the lower triangle (LAPACK dpotrf/spotrf semantics). false if not PD.
bool cholesky_lower(double* A, int64_t n);

}  // namespace qcal

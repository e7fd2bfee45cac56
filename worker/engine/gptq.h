// GPTQ (methods.md §2, §11.6): Hessian accumulation and the column-by-column
// solver with lazy block updates, act-order and static groups.
//
// Letters: O output features (rows of W), I input features (columns of W and
// the size of H), T tokens, B the block size, G = ceil(I / group_size) groups.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "worker/engine/quantizer.h"

namespace qcal {

// H = (2 / nsamples) Σ_tokens x xᵀ, accumulated in fp32 (no TF32). The raw sum is
// kept (not the reference's running rescale) and scaled once in hessian(); the
// two agree up to fp32 rounding. Not thread safe.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t cols);
  // X (rows, cols) holds the tokens of `num_sequences` calibration sequences:
  // sum += XᵀX (fp32 BLAS ssyrk), nsamples += num_sequences. rows == 0 only
  // counts the sequences. rows, num_sequences ≥ 0 (checked, abort).
  void add_batch(const float* X, int64_t rows, int64_t num_sequences);
  // Adds another accumulator's sums (same cols, checked): for all-reduce across ranks.
  void merge(const HessianAccumulator& other);
  int64_t cols() const { return cols_; }
  int64_t nsamples() const { return nsamples_; }
  // The Hessian (cols, cols), symmetric; all zeros while nsamples() == 0.
  Tensor hessian() const;
  // Raw Σ x xᵀ (cols, cols), both triangles filled, for reductions (a caller that
  // writes it must keep it symmetric).
  std::vector<float>& raw_sum();
  // Wall seconds spent in the BLAS rank-k updates so far (for benchmarks).
  double gemm_seconds() const { return gemm_seconds_; }

 private:
  int64_t cols_;
  int64_t nsamples_ = 0;
  // (cols, cols) Σ x xᵀ. The lower triangle is always current; the upper one only
  // when !upper_stale_ (add_batch updates the lower triangle alone).
  std::vector<float> sum_;
  bool upper_stale_ = false;
  double gemm_seconds_ = 0.0;
};

struct GptqOptions {
  double percdamp = 0.01;   // damp = percdamp · mean(diag H); must be ≥ 0
  int64_t blocksize = 128;  // B, columns per lazy-update block; must be > 0
  bool act_order = false;   // "desc_act"
  bool static_groups = false;
  // On Cholesky failure, damping is multiplied by 10 and retried up to this many
  // times (with a warning each time) before the layer falls back to RTN. No retry
  // when damp = percdamp · mean(diag H) is not > 0 (scaling it cannot help).
  int max_damp_retries = 4;
  // Tests: also return the solver's dequantized Q (what the error feedback used).
  bool keep_solver_q = false;
};

// Where the time went (wall seconds), for benchmarks and reports.
struct GptqProfile {
  double total_s = 0.0;
  double factor_s = 0.0;     // damping + Cholesky + triangular inverse (fp64), retries included
  double loop_s = 0.0;       // column loop inside blocks (quantize + rank-1 updates)
  double lazy_gemm_s = 0.0;  // lazy cross-block sgemm updates
  int factor_attempts = 0;   // 1 + damping retries
};

struct GptqResult {
  QuantizedLinear qlinear;
  // Σ (w − q)² / d² / 2 over all columns (the reference's bookkeeping, computed in
  // fp64); equals ½ tr((W − Ŵ) H_damped (W − Ŵ)ᵀ) in exact arithmetic. After an RTN
  // fallback it is ½ tr((W − Ŵ) H (W − Ŵ)ᵀ) with the undamped H.
  double loss = 0.0;
  double percdamp_used = 0.0;  // the damping that succeeded; 0 after an RTN fallback
  bool fell_back_to_rtn = false;
  std::vector<std::string> warnings;  // every warning also logged (damping retries, fallback)
  GptqProfile profile;
  Tensor solver_q;  // (O, I) original column order; only with keep_solver_q
};

// Quantizes W (O, I) given the Hessian H (I, I) of its inputs, exactly as
// methods.md §2.2:
//  - dead columns (H[i,i] == 0) get H[i,i] = 1 and W[:, i] = 0;
//  - per channel (group_size −1): one QParam per row from the original W;
//  - static_groups: groups of consecutive original columns from the (dead-zeroed) W
//    before any update; otherwise a group's parameters are computed when the solver
//    reaches its first column, from the current, error-updated W (all updates from
//    earlier columns applied, so the result does not depend on blocksize except
//    through fp32 rounding of the lazy updates);
//  - act_order: columns in order of descending diag(H) (stable); groups are then
//    consecutive in that order (g_idx[perm[j]] = j / gs), or on original columns
//    with static_groups (g_idx[i] = i / gs);
//  - Hinv = upper Cholesky factor of (H + damp·I)⁻¹, computed in fp64 (as
//    J·chol(J(H + damp·I)J)⁻¹·J, J the reversal: the same unique factor as the
//    reference's chol(cholesky_inverse(chol(H)), upper) in half the flops); the
//    column loop and lazy sgemm updates run in fp32.
// qlinear.dequantize() is bit-identical to the Q the solver used.
// Errors: kInvalidInput for an invalid spec/options, shapes that do not match, or
// non-finite W or H. A Hessian that stays non-PD after the retries is not an
// error: the layer falls back to RTN (fell_back_to_rtn, a warning).
// Thread safety: reentrant; uses the BLAS threads and as many worker threads.
Result<GptqResult> gptq_quantize(const Tensor& W, const Tensor& H, const QuantSpec& spec,
                                 const GptqOptions& opts);
// The same, taking the Hessian: it is released once the factor of its inverse is
// built, so the solver's peak is 12·I² bytes (H with the fp64 factor, then the
// factor with the fp32 U) instead of 16·I² (common/memory_model.cc counts 12).
// The one difference: a non-finite error feedback (an fp32 overflow) is
// kInternal instead of the RTN fallback, whose loss needs H.
Result<GptqResult> gptq_quantize(const Tensor& W, Tensor&& H, const QuantSpec& spec,
                                 const GptqOptions& opts);

// In-place Cholesky of a symmetric positive-definite row-major matrix A (n, n):
// on success the lower triangle holds L with A = L Lᵀ and the strict upper
// triangle is set to zero. Only the lower triangle of the input is read.
// false if A is not (numerically) PD; A is then partly overwritten.
bool cholesky_lower(double* A, int64_t n);

}  // namespace qcal

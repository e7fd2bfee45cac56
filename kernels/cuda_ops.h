// The block ops of kernels/grad.h on a CUDA device (issue #13, part 1): the
// device-op interface that a GPU calibration engine will call. No CUDA types
// here. Built with CUDA the ops live in kernels/cuda/*.cu; a build without CUDA
// links kernels/cuda_ops_none.cc, where every call returns kUnavailable.
//
// STATUS: compiled and linked with CUDA 13 and tested on machines WITHOUT a GPU
// (the tests skip there). None of this has run on a GPU yet; the engine does not
// call it (docs/GPU.md).
//
// Semantics are those of the fp32 instantiation of kernels/grad.h (same names,
// same argument order after the context, same layouts, same = / += rules, the
// same letters): row-major; "rows" are tokens (or weight output rows); every
// backward ACCUMULATES (+=) into parameter gradients (dgamma, dL, dR, dbeta,
// dpk, dpv) and OVERWRITES input gradients (dx, dq, dk, dv, dg, du). The CPU
// versions (grad.h, float and double) are the references the tests compare
// against (tests/unit/test_cuda_ops.cc, tolerances stated there).
// Letters: T tokens of one sequence, C channels, n_h / n_kv heads, d head dim,
// G groups per row, P prefix keys.
//
// Pointers: every tensor argument of an op is DEVICE memory (a DeviceArray's
// data(), or an offset into one) unless its name starts with host_. Ops only
// queue work on the context's stream and return; a failure of the queued work
// (an illegal address, say) surfaces at the next synchronize() or copy and
// poisons the context (CUDA errors are sticky): drop it, and its DeviceArrays.
//
// Errors (all ops): kInvalidInput for a bad shape or spec (checked before
// anything is queued), kUnavailable when built without CUDA or no GPU is present
// (run on the CPU path), kResourceExhausted when device memory runs out (with
// the byte count), kInternal for a CUDA/cuBLAS failure (a bug or a broken
// device: restart the task). Sizes of 0 are no-ops.
//
// Thread safety: a CudaContext and the DeviceArrays used with it belong to one
// thread at a time. Separate contexts may run concurrently.
//
// Numerics: fp32 data with fp32 GEMMs (cuBLAS default math: no TF32 unless
// CudaOptions::tf32); row reductions (sum of squares, dot products, softmax
// sums, the fake quantizer's gradient sums) accumulate in fp64 as the CPU does;
// the element-wise float expressions follow the CPU's operation order with
// explicitly rounded intrinsics (no FMA contraction), so rmsnorm/rope forwards
// and the fake quantizer forward equal the CPU float results except where a
// libm function (exp, cos, sin) differs by an ulp. Reductions across rows (the
// dgamma / dL / dR / dbeta sums) are done in a fixed order: results do not
// depend on timing, but differ from the CPU's in the last bits.
//
// NaN: a NaN input propagates to every output that depends on it. Where the CPU
// code's result depends on NaN ordering (the fake quantizer's group range, via
// std::max), the device is stricter: a NaN anywhere in a (row, group) makes that
// group's range, scale and every output of the group NaN.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "kernels/grad.h"

namespace qcal::cuda {

// ---- Device memory.

// An owning, move-only device allocation of n elements of T (float, double,
// int32_t, int64_t). Copies are synchronous and ordered after all work queued
// on any context of the device (contexts use blocking streams).
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  ~DeviceArray();
  DeviceArray(DeviceArray&& o) noexcept;
  DeviceArray& operator=(DeviceArray&& o) noexcept;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  // n elements, zero-filled. n ≥ 0 (0 holds no memory).
  static Result<DeviceArray> zeros(int64_t n);
  // A device copy of host[0..n).
  static Result<DeviceArray> from_host(const T* host, int64_t n);
  static Result<DeviceArray> from_host(const std::vector<T>& host) {
    return from_host(host.data(), static_cast<int64_t>(host.size()));
  }

  // host[0..size()) ← the device data.
  Status to_host(T* host) const;
  Result<std::vector<T>> to_host() const;
  // device[0..n) ← host[0..n), n ≤ size().
  Status upload(const T* host, int64_t n);
  Status fill_zero();

  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  int64_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  int64_t n_ = 0;
};

// ---- The context: one device, one stream, one cuBLAS handle, scratch memory.

struct CudaOptions {
  int device = 0;
  // cuBLAS GEMMs on TF32 tensor cores (fp32 accumulation). Off: plain fp32, the
  // CPU engine's numerics. Its effect on a calibration is not measured yet.
  bool tf32 = false;
};

class CudaContext {
 public:
  // Errors: kUnavailable (no CUDA / no GPU / no such device), kInternal.
  static Result<std::unique_ptr<CudaContext>> create(const CudaOptions& o = {});
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  // Waits for the queued work; returns its first failure (kInternal).
  Status synchronize();
  // "NVIDIA H100 80GB HBM3 (sm_90), 79.1 GiB"
  const std::string& device_name() const;
  const CudaOptions& options() const;

  struct Impl;  // kernels/cuda/context.cuh
  Impl& impl() { return *impl_; }

 private:
  CudaContext() = default;
  std::unique_ptr<Impl> impl_;
};

// ---- GEMMs (cuBLAS), row-major like kernels/gemm.h:
// C(M,N) = alpha·op(A)·op(B) + beta·C, op(A) (M,K), op(B) (K,N); lda/ldb/ldc are
// row strides. beta == 0: C is not read (NaN in C does not propagate).
Status gemm(CudaContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
            float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
            float* C, int64_t ldc);
// `batch` independent GEMMs, matrix i at A + i·stride_a (likewise B, C). A stride
// of 0 shares one matrix among the batch (never for C). The C matrices may
// interleave (heads of one (T, n_h·d) tensor: stride d, ldc n_h·d) but must not
// share elements (not checked).
Status gemm_strided_batched(CudaContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N,
                            int64_t K, float alpha, const float* A, int64_t lda, int64_t stride_a,
                            const float* B, int64_t ldb, int64_t stride_b, float beta, float* C,
                            int64_t ldc, int64_t stride_c, int64_t batch);

// ---- RMSNorm (grad.h rmsnorm_fwd / rmsnorm_bwd). y, x (rows, C), gamma (C),
// inv_rms (rows) saved for the backward; y may alias x. dgamma may be null.
Status rmsnorm_fwd(CudaContext& ctx, float* y, const float* x, const float* gamma, int64_t rows,
                   int64_t C, float eps, float* inv_rms);
Status rmsnorm_bwd(CudaContext& ctx, float* dx, float* dgamma, const float* dy, const float* x,
                   const float* gamma, const float* inv_rms, int64_t rows, int64_t C);

// ---- RoPE (HF rotate-half), in place on x (T, heads·d); d even.
Status rope_fwd(CudaContext& ctx, float* x, int64_t T, int64_t heads, int64_t d, int64_t pos0,
                double theta);
Status rope_bwd(CudaContext& ctx, float* dx, int64_t T, int64_t heads, int64_t d, int64_t pos0,
                double theta);

// ---- Causal GQA attention with an optional unquantized prefix of P keys
// (grad.h prefix_attention_*; P = 0 is attention_fwd / attention_bwd, and pk/pv,
// dpk/dpv may then be null). q, out, dq, dout (T, n_h·d); k, v, dk, dv (T, n_kv·d);
// pk, pv, dpk, dpv (P, n_kv·d); probs (n_h, T, P+T) saved, masked entries 0.
// cuBLAS strided-batched GEMMs around a row-softmax kernel; the scores are
// computed for the full (T, P+T) square (the causal half is then overwritten).
Status attention_fwd(CudaContext& ctx, float* out, const float* q, const float* pk, const float* pv,
                     int64_t P, const float* k, const float* v, int64_t T, int64_t n_h,
                     int64_t n_kv, int64_t d, float* probs);
// dq, dk, dv overwritten; dpk, dpv accumulated (either may be null). Scratch:
// n_h·T·(P+T) floats from the context.
Status attention_bwd(CudaContext& ctx, float* dq, float* dpk, float* dpv, float* dk, float* dv,
                     const float* dout, const float* q, const float* pk, const float* pv, int64_t P,
                     const float* k, const float* v, const float* probs, int64_t T, int64_t n_h,
                     int64_t n_kv, int64_t d);

// ---- SwiGLU: out = silu(g) ⊙ u over n elements (out may alias g or u).
Status swiglu_fwd(CudaContext& ctx, float* out, const float* g, const float* u, int64_t n);
Status swiglu_bwd(CudaContext& ctx, float* dg, float* du, const float* dout, const float* g,
                  const float* u, int64_t n);

// ---- Kronecker transform of each row (grad.h kron_fwd / kron_bwd): x (rows, n1·n2)
// row t viewed as X_t (n1, n2), Y_t = Lᵀ X_t R; L (n1, n1), R (n2, n2), either may
// be null (identity). Lᵀ X_t is one strided-batched GEMM over the rows (L shared,
// stride 0); X R and M Rᵀ are single GEMMs over (rows·n1, n2). y must not alias x.
// Scratch from the context: rows·n1·n2 floats (fwd), 2·rows·n1·n2 (bwd).
Status kron_fwd(CudaContext& ctx, float* y, const float* x, const float* L, const float* R,
                int64_t rows, int64_t n1, int64_t n2);
// dx overwritten (may be null); dL += Σ_t X_t R dY_tᵀ, dR += Σ_t X_tᵀ L dY_t (either
// may be null, and is ignored where L / R is null).
Status kron_bwd(CudaContext& ctx, float* dx, float* dL, float* dR, const float* dy, const float* x,
                const float* L, const float* R, int64_t rows, int64_t n1, int64_t n2);

// ---- Fake quantization with straight-through estimators (grad.h fake_quant_fwd /
// fake_quant_bwd, FakeQuantSpec and its meaning unchanged): per token (x (T, C),
// group −1), per output channel (W (O, I), group −1), per group (group g > 0, e.g.
// 128), per head (k/v (T, n_kv·d), group d). No RoundTape on the device.
// beta_max / beta_min: ClipMode::kLearned parameters, n_beta = 1 (LAC) or rows·G
// (LWC), device memory; null for kFixed.
struct DeviceFakeQuantSaved {
  DeviceArray<float> scale, zero;         // (rows·G)
  DeviceArray<int64_t> amax_at, amin_at;  // (rows·G) column of the max/min, −1: 0-widened
  DeviceArray<float> raw_max, raw_min;    // (rows·G) before clipping
  int64_t groups = 0;                     // rows·G of the forward that filled it
};
// y (rows, cols) = fq(x); y may alias x. `saved` is (re)allocated to rows·G and
// filled (it may be null when no backward follows). bits ≥ 16: y = x.
Status fake_quant_fwd(CudaContext& ctx, const FakeQuantSpec& s, float* y, const float* x,
                      int64_t rows, int64_t cols, const float* beta_max, const float* beta_min,
                      int64_t n_beta, DeviceFakeQuantSaved* saved);
// dx overwritten; dbeta_max / dbeta_min accumulated (null when not wanted; n_beta = 1:
// the sum over all groups, in a fixed order). kIdentity or bits ≥ 16: dx = dy.
// `saved` must come from the forward with the same spec, x and shape (its size is checked).
Status fake_quant_bwd(CudaContext& ctx, const FakeQuantSpec& s, float* dx, float* dbeta_max,
                      float* dbeta_min, const float* dy, const float* x, int64_t rows, int64_t cols,
                      const float* beta_max, const float* beta_min, int64_t n_beta,
                      const DeviceFakeQuantSaved& saved);

// ---- AdamW step over one flat parameter tensor, fp64 masters as the CPU engine
// (worker/calib/param.h AdamW::step, PyTorch semantics): with t the step number
// of this tensor (1 for its first step) and lr already scaled,
//   p ← p·(1 − lr·wd); m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²;
//   p ← p − (lr / (1 − β1ᵗ)) · m / (sqrt(v)/sqrt(1 − β2ᵗ) + eps).
// p, m, v (n) updated in place, g (n) read; all device memory.
struct AdamWStep {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  int64_t t = 1;  // ≥ 1
};
Status adamw_step(CudaContext& ctx, double* p, double* m, double* v, const double* g, int64_t n,
                  const AdamWStep& step);
// The scalar host reference of the same update (kernels/cuda_ops_ref.cc), the
// per-tensor body of calib::AdamW::step written out once; the device version
// must equal it bit for bit.
void adamw_step_ref(double* p, double* m, double* v, const double* g, int64_t n,
                    const AdamWStep& step);

}  // namespace qcal::cuda

// Causal GQA attention with an optional prefix on the device (kernels/cuda_ops.h
// attention_fwd / attention_bwd): cuBLAS strided-batched GEMMs around row-softmax
// kernels, the structure of grad.cc's prefix_attention_* without its 128-row
// blocking (each GEMM covers the whole (T, P+T) square; the causal half is then
// overwritten by the softmax kernels, which never read it).
//
// GQA batching: query head h = j·g + r (g = n_h / n_kv) reads KV head j. For each
// r one strided-batched call runs over the n_kv KV heads: Q_h starts at q + h·d
// (stride g·d between batch entries), K_j at k + j·d (stride d), probs_h at
// probs + h·T·S (stride g·T·S). dK_j / dV_j sum over r: the r = 0 call writes
// (beta 0), the others add (beta 1).
// Letters: T tokens, P prefix keys, S = P + T, n_h / n_kv heads, d head dim.
#include <cmath>
#include <string>

#include "kernels/cuda/context.cuh"

namespace qcal::cuda {
namespace {

constexpr int kSoftmaxThreads = 256;

// probs (n_h·T rows of S): row (h, t) sees columns 0 .. P + t; softmax there in
// place, zeros after. Scores arrive scaled.
__global__ void causal_softmax_kernel(float* probs, int64_t n_rows, int64_t T, int64_t P,
                                      int64_t S) {
  __shared__ float sf[32];
  __shared__ double sd[32];
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t t = row % T, valid = P + t + 1;
    float* p = probs + row * S;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) mx = nan_max(mx, p[j]);
    mx = block_extreme<true>(mx, sf);
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) {
      const float e = expf(__fsub_rn(p[j], mx));
      p[j] = e;
      sum += static_cast<double>(e);
    }
    sum = block_sum(sum, sd);
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = threadIdx.x; j < S; j += blockDim.x) {
      p[j] = j < valid ? __fmul_rn(p[j], inv) : 0.0f;
    }
  }
}

// ds (rows of S) holds dP on entry: dS = P ⊙ (dP − rowsum(dP ⊙ P)), zero where masked.
__global__ void causal_softmax_bwd_kernel(float* ds, const float* probs, int64_t n_rows, int64_t T,
                                          int64_t P, int64_t S) {
  __shared__ double sd[32];
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t t = row % T, valid = P + t + 1;
    const float* p = probs + row * S;
    float* g = ds + row * S;
    double dot = 0.0;
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x)
      dot += static_cast<double>(__fmul_rn(g[j], p[j]));
    dot = block_sum(dot, sd);
    const float dt = static_cast<float>(dot);
    for (int64_t j = threadIdx.x; j < S; j += blockDim.x) {
      g[j] = j < valid ? __fmul_rn(p[j], __fsub_rn(g[j], dt)) : 0.0f;
    }
  }
}

Status check_attention(const char* what, int64_t P, int64_t T, int64_t n_h, int64_t n_kv, int64_t d,
                       bool have_prefix) {
  if (T < 0 || P < 0 || d < 0 || n_kv <= 0 || n_h <= 0 || n_h % n_kv != 0) {
    return invalid_input(std::string(what) + ": bad shape (T " + std::to_string(T) + ", P " +
                         std::to_string(P) + ", n_h " + std::to_string(n_h) + ", n_kv " +
                         std::to_string(n_kv) + ", d " + std::to_string(d) +
                         "); n_h must be a positive multiple of n_kv");
  }
  if (P > 0 && !have_prefix) {
    return invalid_input(std::string(what) + ": P = " + std::to_string(P) + " without pk / pv");
  }
  return Status::ok();
}

}  // namespace

Status attention_fwd(CudaContext& ctx, float* out, const float* q, const float* pk, const float* pv,
                     int64_t P, const float* k, const float* v, int64_t T, int64_t n_h,
                     int64_t n_kv, int64_t d, float* probs) {
  const char* what = "attention_fwd";
  QCAL_RETURN_IF_ERROR(check_attention(what, P, T, n_h, n_kv, d, pk && pv));
  if (T == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), what));
  const int64_t g = n_h / n_kv, qs = n_h * d, ks = n_kv * d, S = P + T;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  for (int64_t r = 0; r < g; ++r) {
    const float* Q = q + r * d;
    float* Ph = probs + r * T * S;
    // S_h = scale · Q_h [PK_j; K_j]ᵀ
    if (P > 0) {
      QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, true, T, P, d, scale, Q, qs, g * d, pk,
                                                ks, d, 0.0f, Ph, S, g * T * S, n_kv));
    }
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, true, T, T, d, scale, Q, qs, g * d, k, ks,
                                              d, 0.0f, Ph + P, S, g * T * S, n_kv));
  }
  causal_softmax_kernel<<<grid_for(n_h * T), kSoftmaxThreads, 0, m.stream>>>(probs, n_h * T, T, P,
                                                                             S);
  QCAL_RETURN_IF_ERROR(launch_status(what));
  for (int64_t r = 0; r < g; ++r) {
    const float* Ph = probs + r * T * S;
    float* O = out + r * d;
    // out_h = P_h [PV_j; V_j]
    if (P > 0) {
      QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, false, T, d, P, 1.0f, Ph, S, g * T * S,
                                                pv, ks, d, 0.0f, O, qs, g * d, n_kv));
    }
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, false, T, d, T, 1.0f, Ph + P, S,
                                              g * T * S, v, ks, d, P > 0 ? 1.0f : 0.0f, O, qs,
                                              g * d, n_kv));
  }
  return Status::ok();
}

Status attention_bwd(CudaContext& ctx, float* dq, float* dpk, float* dpv, float* dk, float* dv,
                     const float* dout, const float* q, const float* pk, const float* pv, int64_t P,
                     const float* k, const float* v, const float* probs, int64_t T, int64_t n_h,
                     int64_t n_kv, int64_t d) {
  const char* what = "attention_bwd";
  QCAL_RETURN_IF_ERROR(check_attention(what, P, T, n_h, n_kv, d, pk && pv));
  if (T == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), what));
  const int64_t g = n_h / n_kv, qs = n_h * d, ks = n_kv * d, S = P + T;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  QCAL_ASSIGN_OR_RETURN(void* scratch,
                        m.scratch_at_least(static_cast<size_t>(n_h * T * S) * sizeof(float)));
  float* dS = static_cast<float*>(scratch);  // (n_h, T, S)
  for (int64_t r = 0; r < g; ++r) {
    const float* dO = dout + r * d;
    float* dSh = dS + r * T * S;
    // dP_h = dO_h [PV_j; V_j]ᵀ
    if (P > 0) {
      QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, true, T, P, d, 1.0f, dO, qs, g * d, pv,
                                                ks, d, 0.0f, dSh, S, g * T * S, n_kv));
    }
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, true, T, T, d, 1.0f, dO, qs, g * d, v, ks,
                                              d, 0.0f, dSh + P, S, g * T * S, n_kv));
  }
  causal_softmax_bwd_kernel<<<grid_for(n_h * T), kSoftmaxThreads, 0, m.stream>>>(dS, probs, n_h * T,
                                                                                 T, P, S);
  QCAL_RETURN_IF_ERROR(launch_status(what));
  for (int64_t r = 0; r < g; ++r) {
    const float* dSh = dS + r * T * S;
    const float* Ph = probs + r * T * S;
    const float* Q = q + r * d;
    const float* dO = dout + r * d;
    float* dQ = dq + r * d;
    const float first = r == 0 ? 0.0f : 1.0f;
    // dQ_h = scale · dS_h [PK_j; K_j]
    if (P > 0) {
      QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, false, T, d, P, scale, dSh, S,
                                                g * T * S, pk, ks, d, 0.0f, dQ, qs, g * d, n_kv));
    }
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, false, T, d, T, scale, dSh + P, S,
                                              g * T * S, k, ks, d, P > 0 ? 1.0f : 0.0f, dQ, qs,
                                              g * d, n_kv));
    // dK_j (+)= scale · dS_hᵀ Q_h;  dV_j (+)= P_hᵀ dO_h
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, true, false, T, d, T, scale, dSh + P, S,
                                              g * T * S, Q, qs, g * d, first, dk, ks, d, n_kv));
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, true, false, T, d, T, 1.0f, Ph + P, S, g * T * S,
                                              dO, qs, g * d, first, dv, ks, d, n_kv));
    // The prefix columns into dPK / dPV, accumulated.
    if (P > 0 && dpk) {
      QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, true, false, P, d, T, scale, dSh, S, g * T * S,
                                                Q, qs, g * d, 1.0f, dpk, ks, d, n_kv));
    }
    if (P > 0 && dpv) {
      QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, true, false, P, d, T, 1.0f, Ph, S, g * T * S,
                                                dO, qs, g * d, 1.0f, dpv, ks, d, n_kv));
    }
  }
  return Status::ok();
}

}  // namespace qcal::cuda

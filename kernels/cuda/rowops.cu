// Row-wise and element-wise device ops (kernels/cuda_ops.h): RMSNorm, RoPE,
// SwiGLU, AdamW. Each mirrors the operation order of its CPU version
// (kernels/grad.cc, worker/calib/param.cc) with explicitly rounded intrinsics,
// so nvcc cannot contract a·b + c into an FMA that the CPU does not use.
// Letters: T tokens, C channels, d head dim.
#include <cmath>
#include <string>
#include <vector>

#include "kernels/cuda/context.cuh"

namespace qcal::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int64_t kDgammaRows = 64;  // rows per partial sum of dgamma

Status check_rows(const char* what, int64_t rows, int64_t C) {
  if (rows < 0 || C < 0) {
    return invalid_input(std::string(what) + ": negative shape (" + std::to_string(rows) + ", " +
                         std::to_string(C) + ")");
  }
  return Status::ok();
}

Status enter(CudaContext& ctx, const char* what) {
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  return cuda_status(cudaSetDevice(ctx.impl().device), what);
}

// ---------------------------------------------------------------- RMSNorm

// One block per row (grid-stride). y may alias x: every thread reads its own
// elements for the sum before the barrier in block_sum and writes them after.
__global__ void rmsnorm_fwd_kernel(float* y, const float* x, const float* gamma, int64_t rows,
                                   int64_t C, float eps, float* inv_rms) {
  __shared__ double s[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    double ss = 0.0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const double v = xr[c];
      ss = __dadd_rn(ss, __dmul_rn(v, v));
    }
    ss = block_sum(ss, s);
    const float inv = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(C) + eps));
    if (threadIdx.x == 0) inv_rms[r] = inv;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      yr[c] = __fmul_rn(gamma[c], __fmul_rn(xr[c], inv));
    }
  }
}

// partial (chunks, C): partial[k][c] = Σ_{rows of chunk k} (dy·x)·inv, in row order.
__global__ void rmsnorm_dgamma_partial(double* partial, const float* dy, const float* x,
                                       const float* inv_rms, int64_t rows, int64_t C) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t k = blockIdx.y;
  if (c >= C) return;
  const int64_t r0 = k * kDgammaRows, r1 = min(rows, r0 + kDgammaRows);
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const double p = __fmul_rn(dy[r * C + c], x[r * C + c]);
    acc = __dadd_rn(acc, __dmul_rn(p, static_cast<double>(inv_rms[r])));
  }
  partial[k * C + c] = acc;
}

// dgamma[c] += Σ_k partial[k][c], chunks in order.
__global__ void rmsnorm_dgamma_finish(float* dgamma, const double* partial, int64_t chunks,
                                      int64_t C) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double acc = 0.0;
  for (int64_t k = 0; k < chunks; ++k) acc = __dadd_rn(acc, partial[k * C + c]);
  dgamma[c] = __fadd_rn(dgamma[c], static_cast<float>(acc));
}

__global__ void rmsnorm_dx_kernel(float* dx, const float* dy, const float* x, const float* gamma,
                                  const float* inv_rms, int64_t rows, int64_t C) {
  __shared__ double s[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* dyr = dy + r * C;
    const float* xr = x + r * C;
    float* dxr = dx + r * C;
    double dot = 0.0;  // Σ x ⊙ γ ⊙ dy
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      dot = __dadd_rn(dot, static_cast<double>(__fmul_rn(__fmul_rn(xr[c], gamma[c]), dyr[c])));
    }
    dot = block_sum(dot, s);
    const float inv = inv_rms[r];
    const double di = inv;
    const float coef = static_cast<float>(
        __dmul_rn(__dmul_rn(__dmul_rn(__ddiv_rn(dot, static_cast<double>(C)), di), di), di));
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      dxr[c] = __fsub_rn(__fmul_rn(inv, __fmul_rn(gamma[c], dyr[c])), __fmul_rn(xr[c], coef));
    }
  }
}

// ---------------------------------------------------------------- RoPE

// cs / sn (T, half): cos / sign·sin of (pos0 + t)·inv_freq[i], in fp64 as the CPU.
__global__ void rope_table_kernel(float* cs, float* sn, const double* inv_freq, int64_t T,
                                  int64_t half, int64_t pos0, double sign) {
  const int64_t n = T * half;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / half, i = e % half;
    const double a = __dmul_rn(static_cast<double>(pos0 + t), inv_freq[i]);
    double sv, cv;
    sincos(a, &sv, &cv);
    cs[e] = static_cast<float>(cv);
    sn[e] = static_cast<float>(__dmul_rn(sign, sv));
  }
}

// x (T, heads·d): one thread per (t, h, i < d/2) pair.
__global__ void rope_rotate_kernel(float* x, const float* cs, const float* sn, int64_t T,
                                   int64_t heads, int64_t d) {
  const int64_t half = d / 2, n = T * heads * half;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e % half, th = e / half, t = th / heads;
    float* x1 = x + th * d + i;
    float* x2 = x1 + half;
    const float c = cs[t * half + i], s = sn[t * half + i];
    const float a = *x1, b = *x2;
    *x1 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *x2 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

Status rope(CudaContext& ctx, float* x, int64_t T, int64_t heads, int64_t d, int64_t pos0,
            double theta, double sign, const char* what) {
  if (T < 0 || heads < 0 || d < 0 || d % 2 != 0) {
    return invalid_input(std::string(what) + ": bad shape (T " + std::to_string(T) + ", heads " +
                         std::to_string(heads) + ", d " + std::to_string(d) + "); d must be even");
  }
  if (!(theta > 0.0)) return invalid_input(std::string(what) + ": theta must be > 0");
  if (T == 0 || heads == 0 || d == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(enter(ctx, what));
  CudaContext::Impl& m = ctx.impl();
  const int64_t half = d / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
  const size_t freq_bytes = static_cast<size_t>(half) * sizeof(double);
  const size_t table = static_cast<size_t>(T * half);
  QCAL_ASSIGN_OR_RETURN(void* scratch, m.scratch_at_least(freq_bytes + 2 * table * sizeof(float)));
  double* d_freq = static_cast<double*>(scratch);
  float* cs = reinterpret_cast<float*>(static_cast<char*>(scratch) + freq_bytes);
  float* sn = cs + table;
  QCAL_RETURN_IF_ERROR(cuda_status(
      cudaMemcpyAsync(d_freq, inv_freq.data(), freq_bytes, cudaMemcpyHostToDevice, m.stream),
      what));
  rope_table_kernel<<<grid_for((T * half + 255) / 256), 256, 0, m.stream>>>(cs, sn, d_freq, T, half,
                                                                            pos0, sign);
  QCAL_RETURN_IF_ERROR(launch_status(what));
  rope_rotate_kernel<<<grid_for((T * heads * half + 255) / 256), 256, 0, m.stream>>>(x, cs, sn, T,
                                                                                     heads, d);
  return launch_status(what);
}

// ---------------------------------------------------------------- SwiGLU

// σ(b) = 1/(1 + exp(−b)) in float as the CPU; exp in fp64 rounded once to float
// (closer to glibc's expf than CUDA's expf).
__device__ inline float sigmoid_f(float b) {
  const float e = static_cast<float>(exp(-static_cast<double>(b)));
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

__global__ void swiglu_fwd_kernel(float* out, const float* g, const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i], ui = u[i];
    out[i] = __fmul_rn(__fmul_rn(gi, sigmoid_f(gi)), ui);
  }
}

__global__ void swiglu_bwd_kernel(float* dg, float* du, const float* dout, const float* g,
                                  const float* u, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i], sg = sigmoid_f(gi), go = dout[i], ui = u[i];
    // d silu/dg = σ(g)·(1 + g·(1 − σ(g)))
    const float dsilu = __fmul_rn(sg, __fadd_rn(1.0f, __fmul_rn(gi, __fsub_rn(1.0f, sg))));
    dg[i] = __fmul_rn(__fmul_rn(go, ui), dsilu);
    du[i] = __fmul_rn(__fmul_rn(go, gi), sg);
  }
}

// ---------------------------------------------------------------- AdamW

struct AdamWConsts {
  double decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

AdamWConsts adamw_consts(const AdamWStep& s) {
  AdamWConsts k;
  k.decay = 1.0 - s.lr * s.weight_decay;
  k.beta1 = s.beta1;
  k.one_minus_beta1 = 1.0 - s.beta1;
  k.beta2 = s.beta2;
  k.one_minus_beta2 = 1.0 - s.beta2;
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.t));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.t));
  k.step_size = s.lr / bc1;
  k.bc2_sqrt = std::sqrt(bc2);
  k.eps = s.eps;
  return k;
}

__global__ void adamw_kernel(double* p, double* m, double* v, const double* g, int64_t n,
                             AdamWConsts k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double gi = g[i];
    double pi = __dmul_rn(p[i], k.decay);
    const double mi = __dadd_rn(__dmul_rn(k.beta1, m[i]), __dmul_rn(k.one_minus_beta1, gi));
    const double vi =
        __dadd_rn(__dmul_rn(k.beta2, v[i]), __dmul_rn(__dmul_rn(k.one_minus_beta2, gi), gi));
    const double denom = __dadd_rn(__ddiv_rn(__dsqrt_rn(vi), k.bc2_sqrt), k.eps);
    pi = __dsub_rn(pi, __ddiv_rn(__dmul_rn(k.step_size, mi), denom));
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
  }
}

Status check_adamw(const AdamWStep& s, int64_t n) {
  if (n < 0) return invalid_input("adamw_step: negative size");
  if (s.t < 1) return invalid_input("adamw_step: step number t must be ≥ 1");
  if (!(s.beta1 >= 0.0 && s.beta1 < 1.0) || !(s.beta2 >= 0.0 && s.beta2 < 1.0)) {
    return invalid_input("adamw_step: betas must lie in [0, 1)");
  }
  if (!(s.eps > 0.0) || !std::isfinite(s.lr) || !std::isfinite(s.weight_decay)) {
    return invalid_input("adamw_step: eps must be > 0, lr and weight_decay finite");
  }
  return Status::ok();
}

}  // namespace

// ---------------------------------------------------------------- entry points

Status rmsnorm_fwd(CudaContext& ctx, float* y, const float* x, const float* gamma, int64_t rows,
                   int64_t C, float eps, float* inv_rms) {
  QCAL_RETURN_IF_ERROR(check_rows("rmsnorm_fwd", rows, C));
  if (!(eps >= 0.0f)) return invalid_input("rmsnorm_fwd: eps must be ≥ 0");
  if (rows == 0 || C == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(enter(ctx, "rmsnorm_fwd"));
  rmsnorm_fwd_kernel<<<grid_for(rows), kRowThreads, 0, ctx.impl().stream>>>(y, x, gamma, rows, C,
                                                                            eps, inv_rms);
  return launch_status("rmsnorm_fwd");
}

Status rmsnorm_bwd(CudaContext& ctx, float* dx, float* dgamma, const float* dy, const float* x,
                   const float* gamma, const float* inv_rms, int64_t rows, int64_t C) {
  QCAL_RETURN_IF_ERROR(check_rows("rmsnorm_bwd", rows, C));
  if (rows == 0 || C == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(enter(ctx, "rmsnorm_bwd"));
  CudaContext::Impl& m = ctx.impl();
  if (dgamma) {
    const int64_t chunks = (rows + kDgammaRows - 1) / kDgammaRows;
    if (chunks > 65535) return invalid_input("rmsnorm_bwd: more than 65535·64 rows");
    QCAL_ASSIGN_OR_RETURN(void* scratch,
                          m.scratch_at_least(static_cast<size_t>(chunks * C) * sizeof(double)));
    double* partial = static_cast<double*>(scratch);
    const dim3 grid(static_cast<unsigned>((C + 127) / 128), static_cast<unsigned>(chunks));
    rmsnorm_dgamma_partial<<<grid, 128, 0, m.stream>>>(partial, dy, x, inv_rms, rows, C);
    QCAL_RETURN_IF_ERROR(launch_status("rmsnorm_bwd dgamma"));
    rmsnorm_dgamma_finish<<<static_cast<unsigned>((C + 127) / 128), 128, 0, m.stream>>>(
        dgamma, partial, chunks, C);
    QCAL_RETURN_IF_ERROR(launch_status("rmsnorm_bwd dgamma"));
  }
  if (!dx) return Status::ok();
  rmsnorm_dx_kernel<<<grid_for(rows), kRowThreads, 0, m.stream>>>(dx, dy, x, gamma, inv_rms, rows,
                                                                  C);
  return launch_status("rmsnorm_bwd dx");
}

Status rope_fwd(CudaContext& ctx, float* x, int64_t T, int64_t heads, int64_t d, int64_t pos0,
                double theta) {
  return rope(ctx, x, T, heads, d, pos0, theta, 1.0, "rope_fwd");
}

Status rope_bwd(CudaContext& ctx, float* dx, int64_t T, int64_t heads, int64_t d, int64_t pos0,
                double theta) {
  return rope(ctx, dx, T, heads, d, pos0, theta, -1.0, "rope_bwd");
}

Status swiglu_fwd(CudaContext& ctx, float* out, const float* g, const float* u, int64_t n) {
  if (n < 0) return invalid_input("swiglu_fwd: negative size");
  if (n == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(enter(ctx, "swiglu_fwd"));
  swiglu_fwd_kernel<<<grid_for((n + 255) / 256), 256, 0, ctx.impl().stream>>>(out, g, u, n);
  return launch_status("swiglu_fwd");
}

Status swiglu_bwd(CudaContext& ctx, float* dg, float* du, const float* dout, const float* g,
                  const float* u, int64_t n) {
  if (n < 0) return invalid_input("swiglu_bwd: negative size");
  if (n == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(enter(ctx, "swiglu_bwd"));
  swiglu_bwd_kernel<<<grid_for((n + 255) / 256), 256, 0, ctx.impl().stream>>>(dg, du, dout, g, u,
                                                                              n);
  return launch_status("swiglu_bwd");
}

Status adamw_step(CudaContext& ctx, double* p, double* m, double* v, const double* g, int64_t n,
                  const AdamWStep& step) {
  QCAL_RETURN_IF_ERROR(check_adamw(step, n));
  if (n == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(enter(ctx, "adamw_step"));
  adamw_kernel<<<grid_for((n + 255) / 256), 256, 0, ctx.impl().stream>>>(p, m, v, g, n,
                                                                         adamw_consts(step));
  return launch_status("adamw_step");
}

}  // namespace qcal::cuda

// Fake quantization with straight-through estimators on the device
// (kernels/cuda_ops.h fake_quant_fwd / fake_quant_bwd): the CUDA twin of
// grad.cc's fake_quant_fwd<float> / fake_quant_bwd<float>. One block per
// (row, group), grid-stride. The per-group arithmetic is grad.cc's, operation
// for operation, in explicitly rounded float intrinsics; the group sums of the
// backward are fp64 block reductions (a different order than the CPU's loop).
// Letters: R rows, C columns, G groups per row, gs group size.
#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda/context.cuh"

namespace qcal::cuda {
namespace {

struct FqArgs {
  int64_t rows, cols, gs, G;
  float qmin, qmax;  // integer grid
  double qmax_d;     // the same, for the fp64 gradient factors
  float clip_ratio;  // kFixed
  float min_scale;
  int64_t n_beta;  // kLearned: 1 (LAC) or rows·G (LWC)
  bool sym, lwc_range, learned;
};

// grad.cc's GroupRange, in float.
struct Range {
  float cmax, cmin, xmax, xmin, s;
  bool s_grad, s_from_max;
};

// σ(b) as grad.cc's sigmoid<float>; exp in fp64 rounded once (see rowops.cu).
__device__ inline float sigmoid_f(float b) {
  const float e = static_cast<float>(exp(-static_cast<double>(b)));
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

__device__ Range group_range(const FqArgs& a, float raw_max, float raw_min, const float* beta_max,
                             const float* beta_min, int64_t bidx) {
  Range g;
  if (a.learned) {
    g.cmax = sigmoid_f(beta_max[bidx]);
    g.cmin = sigmoid_f(beta_min[bidx]);
  } else {
    g.cmax = g.cmin = a.clip_ratio;
  }
  g.xmax = __fmul_rn(raw_max, g.cmax);
  g.xmin = __fmul_rn(raw_min, g.cmin);
  float s;
  if (a.sym) {
    const float amin = fabsf(g.xmin);
    g.s_from_max = g.xmax >= amin;
    s = __fdiv_rn(g.s_from_max ? g.xmax : amin, a.qmax);
  } else {
    g.s_from_max = true;
    s = __fdiv_rn(__fsub_rn(g.xmax, g.xmin), a.qmax);
  }
  g.s_grad = true;
  if (s < a.min_scale) {
    s = a.min_scale;
    g.s_grad = false;
  }
  if (s == 0.0f) {
    s = 1.0f;
    g.s_grad = false;
  }
  g.s = s;
  return g;
}

// std::max / std::min exactly (their NaN behaviour included).
__device__ inline float std_max(float a, float b) { return a < b ? b : a; }
__device__ inline float std_min(float a, float b) { return b < a ? b : a; }

__device__ inline float clamp_to(float x, float lo, float hi) {
  return x > hi ? hi : (x < lo ? lo : x);
}

__global__ void fq_fwd_kernel(FqArgs a, float* y, const float* x, const float* beta_max,
                              const float* beta_min, float* scale, float* zero, int64_t* amax_at,
                              int64_t* amin_at, float* raw_max, float* raw_min) {
  __shared__ float sf[32];
  __shared__ int64_t si[32];
  const int64_t items = a.rows * a.G;
  for (int64_t idx = blockIdx.x; idx < items; idx += gridDim.x) {
    const int64_t r = idx / a.G, g = idx % a.G;
    const int64_t c0 = g * a.gs, n = min(a.cols, c0 + a.gs) - c0;
    const float* xg = x + r * a.cols + c0;
    float* yg = y + r * a.cols + c0;

    float mx = -INFINITY, mn = INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      mx = nan_max(mx, xg[j]);
      mn = nan_min(mn, xg[j]);
    }
    mx = block_extreme<true>(mx, sf);
    mn = block_extreme<false>(mn, sf);
    const bool has_nan = mx != mx || mn != mn;
    int64_t imax = -1, imin = -1;
    if (!has_nan) {
      // First occurrences (grad.cc scans from the left).
      int64_t jmax = INT64_MAX, jmin = INT64_MAX;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        if (xg[j] == mx && j < jmax) jmax = j;
        if (xg[j] == mn && j < jmin) jmin = j;
      }
      imax = c0 + block_min_index(jmax, si);
      imin = c0 + block_min_index(jmin, si);
      if (!a.lwc_range) {  // the range always contains 0
        if (!(mx > 0.0f)) {
          mx = 0.0f;
          imax = -1;
        }
        if (!(mn < 0.0f)) {
          mn = 0.0f;
          imin = -1;
        }
      }
    } else {
      mx = mn = NAN;  // a NaN poisons the group: its scale and every output
    }
    const Range gp =
        group_range(a, mx, mn, beta_max, beta_min, a.learned && a.n_beta == 1 ? 0 : idx);
    const float sc = gp.s;
    const float z = a.sym ? 0.0f : rintf(__fdiv_rn(-gp.xmin, sc));
    if (threadIdx.x == 0) {
      raw_max[idx] = mx;
      raw_min[idx] = mn;
      amax_at[idx] = imax;
      amin_at[idx] = imin;
      scale[idx] = sc;
      zero[idx] = z;
    }
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float xc = a.lwc_range ? clamp_to(xg[j], gp.xmin, gp.xmax) : xg[j];
      const float rv = rintf(__fdiv_rn(xc, sc));
      yg[j] = __fmul_rn(sc, __fsub_rn(std_min(std_max(__fadd_rn(rv, z), a.qmin), a.qmax), z));
    }
  }
}

// gb_max / gb_min (rows·G): each group's β gradient; written when `gb_max` is
// non-null (kLearned with a β gradient wanted), else skipped.
__global__ void fq_bwd_kernel(FqArgs a, float* dx, const float* dy, const float* x,
                              const float* beta_max, const float* beta_min, const float* scale,
                              const float* zero, const int64_t* amax_at, const int64_t* amin_at,
                              const float* raw_max_a, const float* raw_min_a, float* gb_max,
                              float* gb_min) {
  __shared__ double sd[32];
  const int64_t items = a.rows * a.G;
  for (int64_t idx = blockIdx.x; idx < items; idx += gridDim.x) {
    const int64_t r = idx / a.G, g = idx % a.G;
    const int64_t c0 = g * a.gs, n = min(a.cols, c0 + a.gs) - c0;
    const float* xg = x + r * a.cols + c0;
    const float* dyg = dy + r * a.cols + c0;
    float* dxr = dx + r * a.cols;
    const float raw_max = raw_max_a[idx], raw_min = raw_min_a[idx];
    const Range gp =
        group_range(a, raw_max, raw_min, beta_max, beta_min, a.learned && a.n_beta == 1 ? 0 : idx);
    const float sc = scale[idx], z = zero[idx];
    double ds = 0.0, dxmax = 0.0, dxmin = 0.0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float xv = xg[j];
      const bool hi = a.lwc_range && xv > gp.xmax;
      const bool lo = a.lwc_range && !hi && xv < gp.xmin;
      const float xc = hi ? gp.xmax : (lo ? gp.xmin : xv);
      const float v = __fdiv_rn(xc, sc);
      const float rv = rintf(v);
      const float qz = __fadd_rn(rv, z);
      const float go = dyg[j];
      float dxc;
      // x̂ = s·(clamp(round(v) + z) − z) with round(v) − v constant; the clamp
      // passes the gradient on its bounds (torch.clamp).
      if (qz < a.qmin) {
        ds += static_cast<double>(__fmul_rn(go, __fsub_rn(a.qmin, z)));
        dxc = 0.0f;
      } else if (qz > a.qmax) {
        ds += static_cast<double>(__fmul_rn(go, __fsub_rn(a.qmax, z)));
        dxc = 0.0f;
      } else {
        ds += static_cast<double>(__fmul_rn(go, __fsub_rn(rv, v)));
        dxc = go;
      }
      if (hi) {
        dxmax += static_cast<double>(dxc);
        dxr[c0 + j] = 0.0f;
      } else if (lo) {
        dxmin += static_cast<double>(dxc);
        dxr[c0 + j] = 0.0f;
      } else {
        dxr[c0 + j] = dxc;
      }
    }
    // The barriers inside block_sum also order the dx stores above before
    // thread 0's read-modify-writes below.
    ds = block_sum(ds, sd);
    dxmax = block_sum(dxmax, sd);
    dxmin = block_sum(dxmin, sd);
    if (threadIdx.x == 0) {
      if (gp.s_grad) {
        const double inv_q = 1.0 / a.qmax_d;
        if (a.sym) {
          if (gp.s_from_max)
            dxmax += ds * inv_q;
          else
            dxmin += ds * inv_q * (gp.xmin < 0.0f ? -1.0 : 1.0);  // s = |xmin|/qmax
        } else {
          dxmax += ds * inv_q;
          dxmin -= ds * inv_q;
        }
      }
      // xmax = raw_max·cmax, raw_max = x[amax_at] (likewise min).
      if (amax_at[idx] >= 0) {
        float& t = dxr[amax_at[idx]];
        t = __fadd_rn(t, static_cast<float>(dxmax * static_cast<double>(gp.cmax)));
      }
      if (amin_at[idx] >= 0) {
        float& t = dxr[amin_at[idx]];
        t = __fadd_rn(t, static_cast<float>(dxmin * static_cast<double>(gp.cmin)));
      }
      if (gb_max) {
        // d cmax/dβ = σ(β)(1 − σ(β)).
        gb_max[idx] = static_cast<float>(dxmax * static_cast<double>(__fmul_rn(raw_max, gp.cmax)) *
                                         static_cast<double>(__fsub_rn(1.0f, gp.cmax)));
        gb_min[idx] = static_cast<float>(dxmin * static_cast<double>(__fmul_rn(raw_min, gp.cmin)) *
                                         static_cast<double>(__fsub_rn(1.0f, gp.cmin)));
      }
    }
  }
}

// LWC: dbeta[i] += gb[i].
__global__ void add_elementwise(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = __fadd_rn(dst[i], src[i]);
}

// LAC: dst[0] += Σ src (one block, fp64, fixed order).
__global__ void add_sum(float* dst, const float* src, int64_t n) {
  __shared__ double sd[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += static_cast<double>(src[i]);
  acc = block_sum(acc, sd);
  if (threadIdx.x == 0) dst[0] = __fadd_rn(dst[0], static_cast<float>(acc));
}

Status check_spec(const char* what, const FakeQuantSpec& s, int64_t rows, int64_t cols,
                  const float* beta_max, const float* beta_min, int64_t n_beta, FqArgs* a) {
  if (rows < 0 || cols < 0) {
    return invalid_input(std::string(what) + ": negative shape (" + std::to_string(rows) + ", " +
                         std::to_string(cols) + ")");
  }
  if (s.bits < (s.sym ? 2 : 1)) {
    return invalid_input(std::string(what) + ": " + std::to_string(s.bits) + " bits is below the " +
                         (s.sym ? "symmetric minimum 2" : "asymmetric minimum 1"));
  }
  if (!(s.min_scale >= 0.0) || !(s.clip_ratio > 0.0)) {
    return invalid_input(std::string(what) + ": min_scale must be ≥ 0 and clip_ratio > 0");
  }
  a->rows = rows;
  a->cols = cols;
  a->gs = s.group > 0 ? s.group : cols;
  a->G = cols > 0 ? (cols + a->gs - 1) / a->gs : 0;
  const double qmin = s.sym ? -std::ldexp(1.0, s.bits - 1) : 0.0;
  const double qmax = s.sym ? std::ldexp(1.0, s.bits - 1) - 1.0 : std::ldexp(1.0, s.bits) - 1.0;
  a->qmin = static_cast<float>(qmin);
  a->qmax = static_cast<float>(qmax);
  a->qmax_d = qmax;
  a->clip_ratio = static_cast<float>(s.clip_ratio);
  a->min_scale = static_cast<float>(s.min_scale);
  a->sym = s.sym;
  a->lwc_range = s.lwc_range;
  a->learned = s.clip == ClipMode::kLearned;
  a->n_beta = n_beta;
  if (a->learned) {
    if (!beta_max || !beta_min) {
      return invalid_input(std::string(what) + ": learned clipping needs beta_max and beta_min");
    }
    if (n_beta != 1 && n_beta != rows * a->G) {
      return invalid_input(std::string(what) + ": n_beta " + std::to_string(n_beta) +
                           " is neither 1 nor rows·G = " + std::to_string(rows * a->G));
    }
  }
  return Status::ok();
}

int threads_for(int64_t gs) { return gs > 128 ? 256 : 128; }

Status copy_device(CudaContext& ctx, float* dst, const float* src, int64_t n, const char* what) {
  if (dst == src || n == 0) return Status::ok();
  return cuda_status(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.impl().stream),
                     what);
}

template <typename T>
Status ensure_size(DeviceArray<T>& a, int64_t n) {
  if (a.size() == n) return Status::ok();
  QCAL_ASSIGN_OR_RETURN(a, DeviceArray<T>::zeros(n));
  return Status::ok();
}

}  // namespace

Status fake_quant_fwd(CudaContext& ctx, const FakeQuantSpec& s, float* y, const float* x,
                      int64_t rows, int64_t cols, const float* beta_max, const float* beta_min,
                      int64_t n_beta, DeviceFakeQuantSaved* saved) {
  const char* what = "fake_quant_fwd";
  if (rows < 0 || cols < 0) return invalid_input("fake_quant_fwd: negative shape");
  FqArgs a;
  if (s.on()) QCAL_RETURN_IF_ERROR(check_spec(what, s, rows, cols, beta_max, beta_min, n_beta, &a));
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(ctx.impl().device), what));
  if (!s.on()) return copy_device(ctx, y, x, rows * cols, what);
  const int64_t groups = rows * a.G;
  DeviceFakeQuantSaved local;
  DeviceFakeQuantSaved& sv = saved ? *saved : local;
  QCAL_RETURN_IF_ERROR(ensure_size(sv.scale, groups));
  QCAL_RETURN_IF_ERROR(ensure_size(sv.zero, groups));
  QCAL_RETURN_IF_ERROR(ensure_size(sv.amax_at, groups));
  QCAL_RETURN_IF_ERROR(ensure_size(sv.amin_at, groups));
  QCAL_RETURN_IF_ERROR(ensure_size(sv.raw_max, groups));
  QCAL_RETURN_IF_ERROR(ensure_size(sv.raw_min, groups));
  sv.groups = groups;
  if (groups == 0) return Status::ok();
  fq_fwd_kernel<<<grid_for(groups), threads_for(a.gs), 0, ctx.impl().stream>>>(
      a, y, x, beta_max, beta_min, sv.scale.data(), sv.zero.data(), sv.amax_at.data(),
      sv.amin_at.data(), sv.raw_max.data(), sv.raw_min.data());
  QCAL_RETURN_IF_ERROR(launch_status(what));
  // `local` frees its arrays when this returns: wait for the kernel first.
  if (!saved) return ctx.synchronize();
  return Status::ok();
}

Status fake_quant_bwd(CudaContext& ctx, const FakeQuantSpec& s, float* dx, float* dbeta_max,
                      float* dbeta_min, const float* dy, const float* x, int64_t rows, int64_t cols,
                      const float* beta_max, const float* beta_min, int64_t n_beta,
                      const DeviceFakeQuantSaved& saved) {
  const char* what = "fake_quant_bwd";
  if (rows < 0 || cols < 0) return invalid_input("fake_quant_bwd: negative shape");
  const bool pass = !s.on() || s.ste == Ste::kIdentity;
  FqArgs a;
  if (!pass) QCAL_RETURN_IF_ERROR(check_spec(what, s, rows, cols, beta_max, beta_min, n_beta, &a));
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), what));
  if (pass) return copy_device(ctx, dx, dy, rows * cols, what);
  const int64_t groups = rows * a.G;
  if (saved.groups != groups || saved.scale.size() != groups || saved.raw_max.size() != groups ||
      saved.amax_at.size() != groups) {
    return invalid_input("fake_quant_bwd: saved state holds " + std::to_string(saved.groups) +
                         " groups, this shape has " + std::to_string(groups) +
                         " (not from the matching forward)");
  }
  if (groups == 0) return Status::ok();
  const bool want_beta = a.learned && (dbeta_max || dbeta_min);
  float* gb = nullptr;
  if (want_beta) {
    QCAL_ASSIGN_OR_RETURN(void* scratch,
                          m.scratch_at_least(2 * static_cast<size_t>(groups) * sizeof(float)));
    gb = static_cast<float*>(scratch);
  }
  fq_bwd_kernel<<<grid_for(groups), threads_for(a.gs), 0, m.stream>>>(
      a, dx, dy, x, beta_max, beta_min, saved.scale.data(), saved.zero.data(), saved.amax_at.data(),
      saved.amin_at.data(), saved.raw_max.data(), saved.raw_min.data(), gb,
      gb ? gb + groups : nullptr);
  QCAL_RETURN_IF_ERROR(launch_status(what));
  if (!want_beta) return Status::ok();
  if (n_beta == 1) {
    if (dbeta_max) add_sum<<<1, 1024, 0, m.stream>>>(dbeta_max, gb, groups);
    if (dbeta_min) add_sum<<<1, 1024, 0, m.stream>>>(dbeta_min, gb + groups, groups);
  } else {
    const unsigned grid = grid_for((groups + 255) / 256);
    if (dbeta_max) add_elementwise<<<grid, 256, 0, m.stream>>>(dbeta_max, gb, groups);
    if (dbeta_min) add_elementwise<<<grid, 256, 0, m.stream>>>(dbeta_min, gb + groups, groups);
  }
  return launch_status(what);
}

}  // namespace qcal::cuda

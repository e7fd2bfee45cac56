// The Kronecker transform on the device (kernels/cuda_ops.h kron_fwd / kron_bwd):
// Y_t = Lᵀ X_t R for every row t, X_t (n1, n2). X R and M Rᵀ are single GEMMs
// over X viewed as (rows·n1, n2); Lᵀ Z_t and L dY_t are strided-batched GEMMs
// over the rows with L shared (stride 0). dL = Σ_t Z_t dY_tᵀ is one GEMM with
// K = rows·n2 after moving Z and dY into the (n1, rows·n2) layout (grad.cc's
// rows_to_n1). Letters: n1, n2 factor sizes, N = rows·n1·n2.
#include <string>

#include "kernels/cuda/context.cuh"

namespace qcal::cuda {
namespace {

// dst (n1, rows·n2) ← src (rows, n1, n2): X_t[i, :] to dst[i, t·n2 : (t+1)·n2].
__global__ void rows_to_n1_kernel(float* dst, const float* src, int64_t rows, int64_t n1,
                                  int64_t n2) {
  const int64_t N = rows * n1 * n2;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < N;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % n2, ti = e / n2, i = ti % n1, t = ti / n1;
    dst[(i * rows + t) * n2 + c] = src[e];
  }
}

Status rows_to_n1(CudaContext& ctx, float* dst, const float* src, int64_t rows, int64_t n1,
                  int64_t n2) {
  rows_to_n1_kernel<<<grid_for((rows * n1 * n2 + 255) / 256), 256, 0, ctx.impl().stream>>>(
      dst, src, rows, n1, n2);
  return launch_status("kron: rows_to_n1");
}

Status copy(CudaContext& ctx, float* dst, const float* src, int64_t n) {
  return cuda_status(cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.impl().stream),
                     "kron: copy");
}

Status check_kron(const char* what, int64_t rows, int64_t n1, int64_t n2) {
  if (rows < 0 || n1 < 0 || n2 < 0) {
    return invalid_input(std::string(what) + ": negative shape (" + std::to_string(rows) + ", " +
                         std::to_string(n1) + ", " + std::to_string(n2) + ")");
  }
  return Status::ok();
}

}  // namespace

Status kron_fwd(CudaContext& ctx, float* y, const float* x, const float* L, const float* R,
                int64_t rows, int64_t n1, int64_t n2) {
  const char* what = "kron_fwd";
  QCAL_RETURN_IF_ERROR(check_kron(what, rows, n1, n2));
  const int64_t N = rows * n1 * n2, nn = n1 * n2;
  if (N == 0) return Status::ok();
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), what));
  if (!L) {
    if (!R) return copy(ctx, y, x, N);
    return gemm(ctx, false, false, rows * n1, n2, n2, 1.0f, x, n2, R, n2, 0.0f, y, n2);  // X R
  }
  const float* Z = x;
  if (R) {
    QCAL_ASSIGN_OR_RETURN(void* scratch,
                          m.scratch_at_least(static_cast<size_t>(N) * sizeof(float)));
    float* w = static_cast<float*>(scratch);
    QCAL_RETURN_IF_ERROR(
        gemm(ctx, false, false, rows * n1, n2, n2, 1.0f, x, n2, R, n2, 0.0f, w, n2));
    Z = w;
  }
  // Y_t = Lᵀ Z_t
  return gemm_strided_batched(ctx, true, false, n1, n2, n1, 1.0f, L, n1, 0, Z, n2, nn, 0.0f, y, n2,
                              nn, rows);
}

Status kron_bwd(CudaContext& ctx, float* dx, float* dL, float* dR, const float* dy, const float* x,
                const float* L, const float* R, int64_t rows, int64_t n1, int64_t n2) {
  const char* what = "kron_bwd";
  QCAL_RETURN_IF_ERROR(check_kron(what, rows, n1, n2));
  const int64_t N = rows * n1 * n2, nn = n1 * n2, cols = rows * n2;
  if (N == 0) return Status::ok();
  const bool want_l = dL && L, want_r = dR && R;
  if (!want_l && !want_r && !dx) return Status::ok();
  QCAL_RETURN_IF_ERROR(require_gpu(what));
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), what));
  QCAL_ASSIGN_OR_RETURN(void* scratch,
                        m.scratch_at_least(2 * static_cast<size_t>(N) * sizeof(float)));
  float* w1 = static_cast<float*>(scratch);
  float* w2 = w1 + N;
  if (want_l) {
    // dL += Σ_t (X_t R) dY_tᵀ = Z' dY'ᵀ in the n1 layout.
    const float* Z = x;
    if (R) {
      QCAL_RETURN_IF_ERROR(
          gemm(ctx, false, false, rows * n1, n2, n2, 1.0f, x, n2, R, n2, 0.0f, w1, n2));
      Z = w1;
    }
    QCAL_RETURN_IF_ERROR(rows_to_n1(ctx, w2, Z, rows, n1, n2));
    QCAL_RETURN_IF_ERROR(rows_to_n1(ctx, w1, dy, rows, n1, n2));
    QCAL_RETURN_IF_ERROR(
        gemm(ctx, false, true, n1, n1, cols, 1.0f, w2, cols, w1, cols, 1.0f, dL, n1));
  }
  if (!want_r && !dx) return Status::ok();
  const float* M = dy;  // M_t = L dY_t
  if (L) {
    QCAL_RETURN_IF_ERROR(gemm_strided_batched(ctx, false, false, n1, n2, n1, 1.0f, L, n1, 0, dy, n2,
                                              nn, 0.0f, w1, n2, nn, rows));
    M = w1;
  }
  // dR += Σ_t X_tᵀ M_t = Xᵀ M with X, M viewed as (rows·n1, n2).
  if (want_r) {
    QCAL_RETURN_IF_ERROR(
        gemm(ctx, true, false, n2, n2, rows * n1, 1.0f, x, n2, M, n2, 1.0f, dR, n2));
  }
  if (!dx) return Status::ok();
  if (!R) return copy(ctx, dx, M, N);
  return gemm(ctx, false, true, rows * n1, n2, n2, 1.0f, M, n2, R, n2, 0.0f, dx, n2);  // M Rᵀ
}

}  // namespace qcal::cuda

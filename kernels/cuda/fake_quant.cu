// RTN weight fake quantization on the GPU (kernels/quant_cuda.h). Must match the
// CPU quantizer (worker/engine/quantizer.cc) bit for bit, so every float
// operation is an explicitly rounded intrinsic (no FMA contraction) in the same
// order as the CPU code. Letters: R rows, C columns, gs group size.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kernels/device.h"
#include "kernels/quant_cuda.h"

namespace qcal {
namespace {

constexpr int kThreads = 128;  // one block per (row, group); gs is typically 128
constexpr float kMinScale = 1e-5f;
constexpr float kMaxF16 = 65504.0f;

__device__ float finish_scale(float s) {
  if (!(s >= kMinScale)) s = kMinScale;
  s = __half2float(__float2half_rn(s));
  if (!(s <= kMaxF16)) s = kMaxF16;
  return s;
}

// Block-wide min and max (every thread gets the result).
__device__ void block_min_max(float* lo, float* hi) {
  __shared__ float s_lo[kThreads / 32];
  __shared__ float s_hi[kThreads / 32];
  float l = *lo;
  float h = *hi;
  for (int off = 16; off > 0; off >>= 1) {
    l = fminf(l, __shfl_xor_sync(0xffffffffu, l, off));
    h = fmaxf(h, __shfl_xor_sync(0xffffffffu, h, off));
  }
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
    s_lo[warp] = l;
    s_hi[warp] = h;
  }
  __syncthreads();
  l = s_lo[0];
  h = s_hi[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    l = fminf(l, s_lo[w]);
    h = fmaxf(h, s_hi[w]);
  }
  __syncthreads();  // s_lo/s_hi are reused by the next group
  *lo = l;
  *hi = h;
}

// x (R, C) in place. Grid-stride over the R·G (row, group) items.
__global__ void fake_quant_rows_kernel(float* x, int64_t rows, int64_t cols, int64_t gs,
                                       int64_t groups, int bits, bool sym, bool narrow) {
  const int maxq = (1 << bits) - 1;
  for (int64_t item = blockIdx.x; item < rows * groups; item += gridDim.x) {
    const int64_t r = item / groups;
    const int64_t c0 = (item % groups) * gs;
    const int64_t n = min(gs, cols - c0);
    float* v = x + r * cols + c0;

    // Range containing 0; fminf/fmaxf skip NaN like the CPU's comparisons.
    float lo = 0.0f;
    float hi = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      lo = fminf(lo, v[j]);
      hi = fmaxf(hi, v[j]);
    }
    block_min_max(&lo, &hi);

    float scale;
    int zero;
    if (sym) {
      const int half = 1 << (bits - 1);
      const float absmax = fmaxf(-lo, hi);
      scale = finish_scale(narrow ? __fdiv_rn(absmax, static_cast<float>(half - 1))
                                  : __fdiv_rn(__fmul_rn(2.0f, absmax), static_cast<float>(maxq)));
      zero = half;
    } else {
      if (lo == 0.0f && hi == 0.0f) {
        lo = -1.0f;
        hi = 1.0f;
      }
      scale = finish_scale(__fdiv_rn(__fsub_rn(hi, lo), static_cast<float>(maxq)));
      float z = rintf(__fdiv_rn(-lo, scale));
      if (!(z >= 0.0f)) z = 0.0f;
      if (z > static_cast<float>(maxq)) z = static_cast<float>(maxq);
      zero = static_cast<int>(z);
    }

    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      float q = __fadd_rn(rintf(__fdiv_rn(v[j], scale)), static_cast<float>(zero));
      if (!(q >= 0.0f)) q = 0.0f;
      if (q > static_cast<float>(maxq)) q = static_cast<float>(maxq);
      v[j] = __fmul_rn(scale, static_cast<float>(static_cast<int>(q) - zero));
    }
  }
}

struct DeviceBuffer {
  float* ptr = nullptr;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

Status cuda_error(const char* what, cudaError_t e) {
  return internal_error(std::string("fake_quantize_rows_cuda: ") + what + ": " +
                        cudaGetErrorString(e));
}

}  // namespace

Status fake_quantize_rows_cuda(const float* host_in, float* host_out, int64_t rows, int64_t cols,
                               int bits, int64_t group_size, bool sym, bool narrow) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
    return invalid_input("fake_quantize_rows_cuda: bits must be 2, 3, 4 or 8, got " +
                         std::to_string(bits));
  }
  if (group_size != -1 && group_size <= 0) {
    return invalid_input("fake_quantize_rows_cuda: group_size must be -1 or > 0, got " +
                         std::to_string(group_size));
  }
  if (rows < 0 || cols < 0) {
    return invalid_input("fake_quantize_rows_cuda: negative shape (" + std::to_string(rows) + ", " +
                         std::to_string(cols) + ")");
  }
  if (rows == 0 || cols == 0) return Status::ok();
  std::string why;
  if (!cuda_available(&why)) return unavailable("fake_quantize_rows_cuda: " + why);

  const int64_t gs = group_size == -1 ? cols : std::min(group_size, cols);
  const int64_t groups = (cols + gs - 1) / gs;
  const size_t bytes = static_cast<size_t>(rows * cols) * sizeof(float);

  DeviceBuffer buf;
  cudaError_t e = cudaMalloc(&buf.ptr, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return resource_exhausted("fake_quantize_rows_cuda: cudaMalloc of " + std::to_string(bytes) +
                              " bytes failed: " + cudaGetErrorString(e));
  }
  e = cudaMemcpy(buf.ptr, host_in, bytes, cudaMemcpyHostToDevice);
  if (e != cudaSuccess) return cuda_error("copy to device", e);

  const int64_t items = rows * groups;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(items, int64_t{1} << 20));
  fake_quant_rows_kernel<<<grid, kThreads>>>(buf.ptr, rows, cols, gs, groups, bits, sym, narrow);
  e = cudaGetLastError();
  if (e != cudaSuccess) return cuda_error("kernel launch", e);
  e = cudaMemcpy(host_out, buf.ptr, bytes, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) return cuda_error("copy to host", e);
  return Status::ok();
}

}  // namespace qcal

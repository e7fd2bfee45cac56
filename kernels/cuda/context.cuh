// Internals shared by the device ops (kernels/cuda_ops.h): the context's state,
// error conversion and the block reductions. Included by kernels/cuda/*.cu only.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/cuda_ops.h"

namespace qcal::cuda {

struct CudaContext::Impl {
  CudaOptions options;
  std::string name;
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  // Scratch: one growing allocation, handed out as slices by scratch(). Ops use
  // it only while they run (stream order keeps a later op from overwriting data
  // an earlier queued kernel still reads: both run on the one stream).
  void* scratch = nullptr;
  size_t scratch_bytes = 0;

  // A device pointer to at least `bytes` bytes of scratch (synchronizes the
  // stream and reallocates when it has to grow). Errors: kResourceExhausted.
  Result<void*> scratch_at_least(size_t bytes);
};

// kInternal "<what>: <cuda error>" (clears a non-sticky error).
Status cuda_status(cudaError_t e, const char* what);
Status cublas_status(cublasStatus_t s, const char* what);
// The launch error of the last kernel, if any.
Status launch_status(const char* what);
// kUnavailable when there is no usable GPU (with the probe's reason).
Status require_gpu(const char* what);

// Grid size for `items` blocks of grid-stride work.
inline unsigned grid_for(int64_t items, int64_t cap = int64_t{1} << 16) {
  if (items < 1) return 1;
  return static_cast<unsigned>(items < cap ? items : cap);
}

// ---- Block reductions (blockDim.x a multiple of 32, ≤ 1024). Every thread gets
// the result. `s` is a shared array of 32 elements; the call ends with a
// barrier so `s` can be reused at once.

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The sum in a fixed order for a fixed blockDim (deterministic).
template <typename T>
__device__ inline T block_sum(T v, T* s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) s[warp] = v;
  __syncthreads();
  T r = s[0];
  for (int w = 1; w < nw; ++w) r += s[w];
  __syncthreads();
  return r;
}

// NaN-propagating max / min (a NaN anywhere gives NaN).
__device__ inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ inline float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }

template <bool kMax>
__device__ inline float block_extreme(float v, float* s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = kMax ? nan_max(v, o) : nan_min(v, o);
  }
  if (lane == 0) s[warp] = v;
  __syncthreads();
  float r = s[0];
  for (int w = 1; w < nw; ++w) r = kMax ? nan_max(r, s[w]) : nan_min(r, s[w]);
  __syncthreads();
  return r;
}

__device__ inline int64_t block_min_index(int64_t v, int64_t* s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const int64_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o < v ? o : v;
  }
  if (lane == 0) s[warp] = v;
  __syncthreads();
  int64_t r = s[0];
  for (int w = 1; w < nw; ++w) r = s[w] < r ? s[w] : r;
  __syncthreads();
  return r;
}

}  // namespace qcal::cuda

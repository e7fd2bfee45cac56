// The device context, device arrays and the cuBLAS GEMMs (kernels/cuda_ops.h).
// Row-major GEMMs go to column-major cuBLAS as the transposed product:
// C = op(A)·op(B) (row-major) is Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major matrix
// read column-major is its transpose, so cuBLAS gets (B, A) swapped and N, M
// swapped, with the same transpose flags.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <string>
#include <utility>

#include "kernels/cuda/context.cuh"
#include "kernels/device.h"

namespace qcal::cuda {

Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::ok();
  cudaGetLastError();  // clear it when it is not sticky
  if (e == cudaErrorMemoryAllocation) {
    return resource_exhausted(std::string(what) + ": " + cudaGetErrorString(e));
  }
  return internal_error(std::string(what) + ": " + cudaGetErrorString(e));
}

Status cublas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::ok();
  if (s == CUBLAS_STATUS_ALLOC_FAILED) {
    return resource_exhausted(std::string(what) + ": cuBLAS could not allocate");
  }
  return internal_error(std::string(what) + ": cuBLAS status " +
                        std::to_string(static_cast<int>(s)));
}

Status launch_status(const char* what) { return cuda_status(cudaGetLastError(), what); }

Status require_gpu(const char* what) {
  std::string why;
  if (cuda_available(&why)) return Status::ok();
  return unavailable(std::string(what) + ": " + why);
}

// ---------------------------------------------------------------- DeviceArray

template <typename T>
DeviceArray<T>::~DeviceArray() {
  if (ptr_) cudaFree(ptr_);
}

template <typename T>
DeviceArray<T>::DeviceArray(DeviceArray&& o) noexcept : ptr_(o.ptr_), n_(o.n_) {
  o.ptr_ = nullptr;
  o.n_ = 0;
}

template <typename T>
DeviceArray<T>& DeviceArray<T>::operator=(DeviceArray&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    n_ = o.n_;
    o.ptr_ = nullptr;
    o.n_ = 0;
  }
  return *this;
}

template <typename T>
Result<DeviceArray<T>> DeviceArray<T>::zeros(int64_t n) {
  if (n < 0) return invalid_input("DeviceArray: negative size " + std::to_string(n));
  QCAL_RETURN_IF_ERROR(require_gpu("DeviceArray"));
  DeviceArray a;
  // Explicit Result: nvcc does not move a local into a converting return.
  if (n == 0) return Result<DeviceArray>(std::move(a));
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  const cudaError_t e = cudaMalloc(&a.ptr_, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    a.ptr_ = nullptr;
    return resource_exhausted("DeviceArray: cudaMalloc of " + std::to_string(bytes) +
                              " bytes failed: " + cudaGetErrorString(e));
  }
  a.n_ = n;
  QCAL_RETURN_IF_ERROR(a.fill_zero());
  return Result<DeviceArray>(std::move(a));
}

template <typename T>
Result<DeviceArray<T>> DeviceArray<T>::from_host(const T* host, int64_t n) {
  QCAL_ASSIGN_OR_RETURN(DeviceArray a, zeros(n));
  QCAL_RETURN_IF_ERROR(a.upload(host, n));
  return Result<DeviceArray>(std::move(a));
}

template <typename T>
Status DeviceArray<T>::to_host(T* host) const {
  if (n_ == 0) return Status::ok();
  return cuda_status(
      cudaMemcpy(host, ptr_, static_cast<size_t>(n_) * sizeof(T), cudaMemcpyDeviceToHost),
      "DeviceArray::to_host");
}

template <typename T>
Result<std::vector<T>> DeviceArray<T>::to_host() const {
  std::vector<T> v(static_cast<size_t>(n_));
  QCAL_RETURN_IF_ERROR(to_host(v.data()));
  return v;
}

template <typename T>
Status DeviceArray<T>::upload(const T* host, int64_t n) {
  if (n < 0 || n > n_) {
    return invalid_input("DeviceArray::upload: " + std::to_string(n) + " elements into " +
                         std::to_string(n_));
  }
  if (n == 0) return Status::ok();
  return cuda_status(
      cudaMemcpy(ptr_, host, static_cast<size_t>(n) * sizeof(T), cudaMemcpyHostToDevice),
      "DeviceArray::upload");
}

template <typename T>
Status DeviceArray<T>::fill_zero() {
  if (n_ == 0) return Status::ok();
  return cuda_status(cudaMemset(ptr_, 0, static_cast<size_t>(n_) * sizeof(T)),
                     "DeviceArray::fill_zero");
}

template class DeviceArray<float>;
template class DeviceArray<double>;
template class DeviceArray<int32_t>;
template class DeviceArray<int64_t>;

// ---------------------------------------------------------------- CudaContext

Result<void*> CudaContext::Impl::scratch_at_least(size_t bytes) {
  if (bytes <= scratch_bytes) return scratch;
  QCAL_RETURN_IF_ERROR(cuda_status(cudaStreamSynchronize(stream), "scratch: synchronize"));
  if (scratch) cudaFree(scratch);
  scratch = nullptr;
  scratch_bytes = 0;
  const size_t want = std::max(bytes, size_t{1} << 20);
  const cudaError_t e = cudaMalloc(&scratch, want);
  if (e != cudaSuccess) {
    cudaGetLastError();
    scratch = nullptr;
    return resource_exhausted("CudaContext scratch: cudaMalloc of " + std::to_string(want) +
                              " bytes failed: " + cudaGetErrorString(e));
  }
  scratch_bytes = want;
  return scratch;
}

Result<std::unique_ptr<CudaContext>> CudaContext::create(const CudaOptions& o) {
  QCAL_RETURN_IF_ERROR(require_gpu("CudaContext"));
  int count = 0;
  QCAL_RETURN_IF_ERROR(cuda_status(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (o.device < 0 || o.device >= count) {
    return unavailable("CudaContext: no device " + std::to_string(o.device) + " (" +
                       std::to_string(count) + " present)");
  }
  std::unique_ptr<CudaContext> c(new CudaContext());
  c->impl_ = std::make_unique<Impl>();
  Impl& m = *c->impl_;
  m.options = o;
  m.device = o.device;
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(o.device), "cudaSetDevice"));
  cudaDeviceProp prop{};
  QCAL_RETURN_IF_ERROR(
      cuda_status(cudaGetDeviceProperties(&prop, o.device), "cudaGetDeviceProperties"));
  char mem[32];
  std::snprintf(mem, sizeof(mem), "%.1f GiB",
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  m.name = std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
           std::to_string(prop.minor) + "), " + mem;
  QCAL_RETURN_IF_ERROR(cuda_status(cudaStreamCreate(&m.stream), "cudaStreamCreate"));
  QCAL_RETURN_IF_ERROR(cublas_status(cublasCreate(&m.blas), "cublasCreate"));
  QCAL_RETURN_IF_ERROR(cublas_status(cublasSetStream(m.blas, m.stream), "cublasSetStream"));
  QCAL_RETURN_IF_ERROR(cublas_status(
      cublasSetMathMode(m.blas, o.tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
      "cublasSetMathMode"));
  Result<std::unique_ptr<CudaContext>> out(std::move(c));  // no implicit move under nvcc
  return out;
}

CudaContext::~CudaContext() {
  if (!impl_) return;
  if (impl_->stream) cudaStreamSynchronize(impl_->stream);
  if (impl_->blas) cublasDestroy(impl_->blas);
  if (impl_->scratch) cudaFree(impl_->scratch);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

Status CudaContext::synchronize() {
  return cuda_status(cudaStreamSynchronize(impl_->stream), "CudaContext::synchronize");
}

const std::string& CudaContext::device_name() const { return impl_->name; }
const CudaOptions& CudaContext::options() const { return impl_->options; }

// ---------------------------------------------------------------- GEMM

namespace {

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

Status check_gemm(const char* what, bool ta, bool tb, int64_t M, int64_t N, int64_t K, int64_t lda,
                  int64_t ldb, int64_t ldc) {
  if (!fits_int(M) || !fits_int(N) || !fits_int(K)) {
    return invalid_input(std::string(what) + ": shape (" + std::to_string(M) + ", " +
                         std::to_string(N) + ", " + std::to_string(K) + ") negative or past 2^31");
  }
  const int64_t need_a = std::max<int64_t>(1, ta ? M : K);
  const int64_t need_b = std::max<int64_t>(1, tb ? K : N);
  const int64_t need_c = std::max<int64_t>(1, N);
  if (!fits_int(lda) || !fits_int(ldb) || !fits_int(ldc) || lda < need_a || ldb < need_b ||
      ldc < need_c) {
    return invalid_input(std::string(what) + ": leading dimensions (" + std::to_string(lda) + ", " +
                         std::to_string(ldb) + ", " + std::to_string(ldc) +
                         ") below the row lengths (" + std::to_string(need_a) + ", " +
                         std::to_string(need_b) + ", " + std::to_string(need_c) + ")");
  }
  return Status::ok();
}

}  // namespace

Status gemm(CudaContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
            float alpha, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
            float* C, int64_t ldc) {
  QCAL_RETURN_IF_ERROR(check_gemm("gemm", trans_a, trans_b, M, N, K, lda, ldb, ldc));
  if (M == 0 || N == 0) return Status::ok();
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), "gemm: cudaSetDevice"));
  return cublas_status(
      cublasSgemm(m.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                  static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B,
                  static_cast<int>(ldb), A, static_cast<int>(lda), &beta, C, static_cast<int>(ldc)),
      "gemm: cublasSgemm");
}

Status gemm_strided_batched(CudaContext& ctx, bool trans_a, bool trans_b, int64_t M, int64_t N,
                            int64_t K, float alpha, const float* A, int64_t lda, int64_t stride_a,
                            const float* B, int64_t ldb, int64_t stride_b, float beta, float* C,
                            int64_t ldc, int64_t stride_c, int64_t batch) {
  QCAL_RETURN_IF_ERROR(
      check_gemm("gemm_strided_batched", trans_a, trans_b, M, N, K, lda, ldb, ldc));
  if (!fits_int(batch) || stride_a < 0 || stride_b < 0 || stride_c < 0) {
    return invalid_input("gemm_strided_batched: negative stride or batch past 2^31");
  }
  if (batch > 1 && stride_c == 0) {
    return invalid_input("gemm_strided_batched: C stride 0 (every product into one matrix)");
  }
  if (M == 0 || N == 0 || batch == 0) return Status::ok();
  CudaContext::Impl& m = ctx.impl();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(m.device), "gemm: cudaSetDevice"));
  return cublas_status(
      cublasSgemmStridedBatched(m.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
                                static_cast<int>(M), static_cast<int>(K), &alpha, B,
                                static_cast<int>(ldb), stride_b, A, static_cast<int>(lda), stride_a,
                                &beta, C, static_cast<int>(ldc), stride_c, static_cast<int>(batch)),
      "gemm_strided_batched: cublasSgemmStridedBatched");
}

}  // namespace qcal::cuda

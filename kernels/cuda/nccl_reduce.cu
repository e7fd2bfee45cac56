// NCCL sum all-reduce (see kernels/nccl_reduce.h).
#include <cuda_runtime.h>
#include <nccl.h>

#include <string>

#include "kernels/device.h"
#include "kernels/nccl_reduce.h"

namespace qcal {

namespace {
Status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::ok();
  return unavailable(std::string(what) + ": " + cudaGetErrorString(e));
}
Status nccl_status(ncclResult_t r, const char* what) {
  if (r == ncclSuccess) return Status::ok();
  return unavailable(std::string(what) + ": " + ncclGetErrorString(r));
}
}  // namespace

struct NcclAllReduce::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  float* buf = nullptr;  // device staging buffer
  size_t cap = 0;        // elements
};

Result<std::string> nccl_unique_id() {
  std::string why;
  if (!cuda_available(&why)) return unavailable(why);
  ncclUniqueId id;
  QCAL_RETURN_IF_ERROR(nccl_status(ncclGetUniqueId(&id), "ncclGetUniqueId"));
  return std::string(id.internal, sizeof(id.internal));
}

Result<std::unique_ptr<NcclAllReduce>> NcclAllReduce::create(const std::string& id, int rank,
                                                             int size) {
  std::string why;
  if (!cuda_available(&why)) return unavailable(why);
  ncclUniqueId uid;
  if (id.size() != sizeof(uid.internal)) return invalid_input("NCCL unique id has the wrong size");
  std::copy(id.begin(), id.end(), uid.internal);
  int devices = 0;
  QCAL_RETURN_IF_ERROR(cuda_status(cudaGetDeviceCount(&devices), "cudaGetDeviceCount"));
  QCAL_RETURN_IF_ERROR(cuda_status(cudaSetDevice(rank % devices), "cudaSetDevice"));
  std::unique_ptr<NcclAllReduce> r(new NcclAllReduce());
  r->impl_ = std::make_unique<Impl>();
  QCAL_RETURN_IF_ERROR(cuda_status(cudaStreamCreate(&r->impl_->stream), "cudaStreamCreate"));
  QCAL_RETURN_IF_ERROR(
      nccl_status(ncclCommInitRank(&r->impl_->comm, size, uid, rank), "ncclCommInitRank"));
  Result<std::unique_ptr<NcclAllReduce>> out(std::move(r));  // no implicit move under nvcc
  return out;
}

NcclAllReduce::~NcclAllReduce() {
  if (!impl_) return;
  if (impl_->comm) ncclCommDestroy(impl_->comm);
  if (impl_->buf) cudaFree(impl_->buf);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

Status NcclAllReduce::sum(float* data, int64_t n) {
  if (n <= 0) return Status::ok();
  Impl& m = *impl_;
  if (static_cast<size_t>(n) > m.cap) {
    if (m.buf) cudaFree(m.buf);
    m.buf = nullptr;
    QCAL_RETURN_IF_ERROR(cuda_status(cudaMalloc(&m.buf, n * sizeof(float)), "cudaMalloc"));
    m.cap = static_cast<size_t>(n);
  }
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  QCAL_RETURN_IF_ERROR(cuda_status(
      cudaMemcpyAsync(m.buf, data, bytes, cudaMemcpyHostToDevice, m.stream), "cudaMemcpy H2D"));
  QCAL_RETURN_IF_ERROR(nccl_status(
      ncclAllReduce(m.buf, m.buf, static_cast<size_t>(n), ncclFloat, ncclSum, m.comm, m.stream),
      "ncclAllReduce"));
  QCAL_RETURN_IF_ERROR(cuda_status(
      cudaMemcpyAsync(data, m.buf, bytes, cudaMemcpyDeviceToHost, m.stream), "cudaMemcpy D2H"));
  return cuda_status(cudaStreamSynchronize(m.stream), "cudaStreamSynchronize");
}

}  // namespace qcal

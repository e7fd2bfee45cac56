// kernels/cuda_ops.h for builds without CUDA: every call returns kUnavailable
// (kernels/cuda/*.cu provide the ops otherwise). Bad shapes are not diagnosed
// here: without a device nothing can be run anyway.
#ifndef QCAL_WITH_CUDA

#include "kernels/cuda_ops.h"

namespace qcal::cuda {

namespace {
Status none(const char* what) { return unavailable(std::string(what) + ": built without CUDA"); }
}  // namespace

template <typename T>
DeviceArray<T>::~DeviceArray() = default;
template <typename T>
DeviceArray<T>::DeviceArray(DeviceArray&&) noexcept {}
template <typename T>
DeviceArray<T>& DeviceArray<T>::operator=(DeviceArray&&) noexcept {
  return *this;
}
template <typename T>
Result<DeviceArray<T>> DeviceArray<T>::zeros(int64_t) {
  return none("DeviceArray");
}
template <typename T>
Result<DeviceArray<T>> DeviceArray<T>::from_host(const T*, int64_t) {
  return none("DeviceArray");
}
template <typename T>
Status DeviceArray<T>::to_host(T*) const {
  return none("DeviceArray");
}
template <typename T>
Result<std::vector<T>> DeviceArray<T>::to_host() const {
  return none("DeviceArray");
}
template <typename T>
Status DeviceArray<T>::upload(const T*, int64_t) {
  return none("DeviceArray");
}
template <typename T>
Status DeviceArray<T>::fill_zero() {
  return none("DeviceArray");
}
template class DeviceArray<float>;
template class DeviceArray<double>;
template class DeviceArray<int32_t>;
template class DeviceArray<int64_t>;

struct CudaContext::Impl {
  CudaOptions options;
  std::string name;
};

Result<std::unique_ptr<CudaContext>> CudaContext::create(const CudaOptions&) {
  return none("CudaContext");
}
CudaContext::~CudaContext() = default;
Status CudaContext::synchronize() { return none("CudaContext"); }
const std::string& CudaContext::device_name() const { return impl_->name; }
const CudaOptions& CudaContext::options() const { return impl_->options; }

Status gemm(CudaContext&, bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
            const float*, int64_t, float, float*, int64_t) {
  return none("gemm");
}
Status gemm_strided_batched(CudaContext&, bool, bool, int64_t, int64_t, int64_t, float,
                            const float*, int64_t, int64_t, const float*, int64_t, int64_t, float,
                            float*, int64_t, int64_t, int64_t) {
  return none("gemm_strided_batched");
}
Status rmsnorm_fwd(CudaContext&, float*, const float*, const float*, int64_t, int64_t, float,
                   float*) {
  return none("rmsnorm_fwd");
}
Status rmsnorm_bwd(CudaContext&, float*, float*, const float*, const float*, const float*,
                   const float*, int64_t, int64_t) {
  return none("rmsnorm_bwd");
}
Status rope_fwd(CudaContext&, float*, int64_t, int64_t, int64_t, int64_t, double) {
  return none("rope_fwd");
}
Status rope_bwd(CudaContext&, float*, int64_t, int64_t, int64_t, int64_t, double) {
  return none("rope_bwd");
}
Status attention_fwd(CudaContext&, float*, const float*, const float*, const float*, int64_t,
                     const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*) {
  return none("attention_fwd");
}
Status attention_bwd(CudaContext&, float*, float*, float*, float*, float*, const float*,
                     const float*, const float*, const float*, int64_t, const float*, const float*,
                     const float*, int64_t, int64_t, int64_t, int64_t) {
  return none("attention_bwd");
}
Status swiglu_fwd(CudaContext&, float*, const float*, const float*, int64_t) {
  return none("swiglu_fwd");
}
Status swiglu_bwd(CudaContext&, float*, float*, const float*, const float*, const float*, int64_t) {
  return none("swiglu_bwd");
}
Status kron_fwd(CudaContext&, float*, const float*, const float*, const float*, int64_t, int64_t,
                int64_t) {
  return none("kron_fwd");
}
Status kron_bwd(CudaContext&, float*, float*, float*, const float*, const float*, const float*,
                const float*, int64_t, int64_t, int64_t) {
  return none("kron_bwd");
}
Status fake_quant_fwd(CudaContext&, const FakeQuantSpec&, float*, const float*, int64_t, int64_t,
                      const float*, const float*, int64_t, DeviceFakeQuantSaved*) {
  return none("fake_quant_fwd");
}
Status fake_quant_bwd(CudaContext&, const FakeQuantSpec&, float*, float*, float*, const float*,
                      const float*, int64_t, int64_t, const float*, const float*, int64_t,
                      const DeviceFakeQuantSaved&) {
  return none("fake_quant_bwd");
}
Status adamw_step(CudaContext&, double*, double*, double*, const double*, int64_t,
                  const AdamWStep&) {
  return none("adamw_step");
}

}  // namespace qcal::cuda

#endif  // QCAL_WITH_CUDA

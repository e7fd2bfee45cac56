// Device probe for builds without CUDA.
#include "kernels/device.h"

namespace qcal {

bool cuda_available(std::string* why_not) {
  if (why_not) *why_not = "built without CUDA";
  return false;
}

std::string cuda_device_summary() { return "none (built without CUDA)"; }

}  // namespace qcal

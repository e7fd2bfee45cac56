// GPU presence. Built without CUDA, cuda_available() is false with reason
// "built without CUDA". Built with CUDA on a machine with no GPU (or an old
// driver), the first runtime call fails: that is detected once and reported
// as "no GPU: <cuda error>"; GPU tests skip cleanly on it.
#pragma once

#include <string>

namespace qcal {

bool cuda_available(std::string* why_not = nullptr);
// "CUDA 13.0, NVIDIA H100 80GB HBM3 (sm_90)" or the reason there is none.
std::string cuda_device_summary();

}  // namespace qcal

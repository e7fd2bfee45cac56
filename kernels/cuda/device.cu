// Device probe for CUDA builds: the first runtime call decides, once.
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "kernels/device.h"

namespace qcal {
namespace {
struct Probe {
  bool ok = false;
  std::string why;
  std::string summary;
};

const Probe& probe() {
  static Probe p;
  static std::once_flag once;
  std::call_once(once, [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      p.why = std::string("no GPU: ") + cudaGetErrorString(e);
      cudaGetLastError();  // clear the sticky error
      return;
    }
    if (n == 0) {
      p.why = "no GPU: no CUDA device present";
      return;
    }
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    p.ok = true;
    p.summary = "CUDA " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10) +
                ", " + prop.name + " (sm_" + std::to_string(prop.major) +
                std::to_string(prop.minor) + ")";
  });
  return p;
}
}  // namespace

bool cuda_available(std::string* why_not) {
  const Probe& p = probe();
  if (!p.ok && why_not) *why_not = p.why;
  return p.ok;
}

std::string cuda_device_summary() {
  const Probe& p = probe();
  return p.ok ? p.summary : p.why;
}

}  // namespace qcal

// Host references of kernels/cuda_ops.h that kernels/grad.h does not already
// provide (built with and without CUDA).
#include <cmath>

#include "kernels/cuda_ops.h"

namespace qcal::cuda {

// calib::AdamW::step's per-tensor loop (worker/calib/param.cc), with lr already
// scaled; the constants are computed as there, once per call.
void adamw_step_ref(double* p, double* m, double* v, const double* g, int64_t n,
                    const AdamWStep& s) {
  const double decay = 1.0 - s.lr * s.weight_decay;
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(s.t));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(s.t));
  const double step_size = s.lr / bc1;
  const double bc2_sqrt = std::sqrt(bc2);
  for (int64_t i = 0; i < n; ++i) {
    p[i] *= decay;
    m[i] = s.beta1 * m[i] + (1.0 - s.beta1) * g[i];
    v[i] = s.beta2 * v[i] + (1.0 - s.beta2) * g[i] * g[i];
    const double denom = std::sqrt(v[i]) / bc2_sqrt + s.eps;
    p[i] -= step_size * m[i] / denom;
  }
}

}  // namespace qcal::cuda

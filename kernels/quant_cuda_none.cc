// fake_quantize_rows_cuda for builds without CUDA (kernels/cuda/fake_quant.cu
// provides it otherwise).
#ifndef QCAL_WITH_CUDA

#include "kernels/quant_cuda.h"

namespace qcal {

Status fake_quantize_rows_cuda(const float*, float*, int64_t, int64_t, int, int64_t, bool, bool) {
  return unavailable("fake_quantize_rows_cuda: built without CUDA");
}

}  // namespace qcal

#endif  // QCAL_WITH_CUDA

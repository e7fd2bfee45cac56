// fake_quantize_rows_cuda for builds without CUDA (kernels/cuda/fake_quant.cu
// provides it otherwise): the same argument checks (kInvalidInput, as the
// header promises everywhere), then kUnavailable.
#ifndef QCAL_WITH_CUDA

#include <string>

#include "kernels/quant_cuda.h"

namespace qcal {

Status fake_quantize_rows_cuda(const float*, float*, int64_t rows, int64_t cols, int bits,
                               int64_t group_size, bool, bool) {
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
  return unavailable("fake_quantize_rows_cuda: built without CUDA");
}

}  // namespace qcal

#endif  // QCAL_WITH_CUDA

// NCCL all-reduce for builds without CUDA: always unavailable (callers use MPI).
#ifndef QCAL_WITH_CUDA
#include "kernels/nccl_reduce.h"

namespace qcal {

struct NcclAllReduce::Impl {};

Result<std::string> nccl_unique_id() { return unavailable("built without CUDA"); }

Result<std::unique_ptr<NcclAllReduce>> NcclAllReduce::create(const std::string&, int, int) {
  return unavailable("built without CUDA");
}

NcclAllReduce::~NcclAllReduce() = default;

Status NcclAllReduce::sum(float*, int64_t) { return unavailable("built without CUDA"); }

}  // namespace qcal
#endif

// Sum all-reduce of host fp32 buffers over NCCL, for worker rank groups on
// GPUs. No CUDA types here: callers (worker/rank_group) bootstrap it through
// MPI — rank 0 calls nccl_unique_id(), broadcasts the bytes, and every rank
// calls NcclAllReduce::create with them.
//
// Built without CUDA, or with no GPU present, every call returns kUnavailable
// and the caller keeps its MPI path. Not thread safe; one per rank group.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace qcal {

// A fresh NCCL unique id (opaque bytes, NCCL_UNIQUE_ID_BYTES long).
Result<std::string> nccl_unique_id();

class NcclAllReduce {
 public:
  // Joins the communicator `id` as `rank` of `size`, on GPU `rank % devices`.
  static Result<std::unique_ptr<NcclAllReduce>> create(const std::string& id, int rank, int size);
  ~NcclAllReduce();
  NcclAllReduce(const NcclAllReduce&) = delete;
  NcclAllReduce& operator=(const NcclAllReduce&) = delete;

  // data[0..n) ← Σ over ranks, in place (copied through a device buffer).
  Status sum(float* data, int64_t n);

 private:
  NcclAllReduce() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal

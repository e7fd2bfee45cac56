// A worker's rank group: the processes that run one task together under
// `mpirun` (data-parallel calibration). Everything MPI lives behind this
// interface; without MPI (not built with it, or not launched by mpirun) the
// group has one rank and every collective is a no-op.
//
// Roles: rank 0 (the root) talks to Redis, reads and writes artifacts and
// reports; it broadcasts each claim to the other ranks, which only compute.
// Calibration sequences are sharded contiguously: of N sequences, rank r of R
// holds [r*N/R, (r+1)*N/R). GPTQ Hessians are sums over sequences, so the
// per-rank sums are all-reduced (MPI_Allreduce, SUM, fp32) before the solver;
// results then differ from a single rank only by the order of that sum. The
// output activations are gathered back to the root (MPI_Gatherv).
//
// Collective discipline: every rank must make the same sequence of collective
// calls. A failure that happens on every rank at the same point (invalid
// input, the same unreadable file) is agreed on with `agree()`; a failure on
// one rank in the middle of a layer cannot be, and Open MPI's default error
// handler then aborts the whole group (the task's lease expires and another
// worker re-runs it).
//
// Thread safety: MPI is initialized with MPI_THREAD_FUNNELED; call every
// method from the thread that created the group.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "common/tensor.h"
#include "kernels/nccl_reduce.h"
#include "worker/engine/gptq.h"

namespace qcal {

// Sums a rank-local Hessian accumulator across the ranks of a worker group
// (all-reduce of raw_sum() and nsamples). nullptr = single rank.
using HessianReduce = std::function<Status(HessianAccumulator& acc)>;

class RankGroup {
 public:
  // Joins the MPI world when built with MPI and launched by a process manager
  // (OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK in the environment);
  // otherwise returns a single-rank group. Call once per process, before
  // starting threads. The destructor finalizes MPI when this initialized it.
  static std::unique_ptr<RankGroup> create(int* argc, char*** argv);
  // Always a single rank (tests, and the in-process worker).
  static std::unique_ptr<RankGroup> single();
  ~RankGroup();
  RankGroup(const RankGroup&) = delete;
  RankGroup& operator=(const RankGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }
  bool multi() const { return size_ > 1; }

  // This rank's contiguous share of n items: [r*n/R, (r+1)*n/R).
  struct Shard {
    int64_t begin = 0, end = 0;
    int64_t count() const { return end - begin; }
  };
  Shard shard(int64_t n) const { return shard_of(n, rank_, size_); }
  static Shard shard_of(int64_t n, int rank, int size);

  // The root's `*s` replaces every other rank's. Waiting ranks sleep between
  // polls (an idle rank costs no CPU while the root waits on Redis).
  Status broadcast(std::string* s);
  // Bitwise OR of `bits` across ranks: ranks agree on "someone failed" or
  // "the root was told to stop" between layers.
  Result<int> agree(int bits);
  // In-place sums across ranks.
  Status allreduce_sum(float* data, int64_t n);
  Status allreduce_sum(double* data, int64_t n);  // MPI only (training gradients, fp64)
  Status allreduce_sum(int64_t* data, int64_t n);
  // quantize_layer's HessianReduce: sums raw_sum() and nsamples() over the
  // ranks. nullptr for a single rank (quantize_layer then skips the step).
  HessianReduce hessian_reduce();

  // Activations of n_seq sequences of `seqlen` tokens, (n_seq*T, H).
  // scatter: the root's `full` is split by shard(); every rank's `local`
  // becomes its (count*T, H) share (`full` is read on the root only).
  // gather: the inverse; `full` is written on the root only. Every rank
  // passes the same n_seq, seqlen and hidden; T*H must fit in an int.
  Status scatter_sequences(const Tensor& full, int64_t n_seq, int64_t seqlen, int64_t hidden,
                           Tensor* local);
  Status gather_sequences(const Tensor& local, int64_t n_seq, int64_t seqlen, int64_t hidden,
                          Tensor* full);
  Status barrier();
  // Ends every rank of the group at once (MPI_Abort; std::_Exit without MPI).
  [[noreturn]] void abort(int code);

 private:
  RankGroup() = default;
  // Sets up nccl_ when every rank has a GPU (and QCAL_COMM is not "mpi").
  void init_nccl();
  int rank_ = 0;
  int size_ = 1;
  bool owns_mpi_ = false;
  std::unique_ptr<NcclAllReduce> nccl_;  // float sums over NCCL; null → MPI
};

}  // namespace qcal

#include "worker/rank_group.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <thread>
#include <vector>

#include "common/log.h"
#include "kernels/device.h"

#ifdef QCAL_WITH_MPI
#include <mpi.h>
#endif

namespace qcal {

namespace {

bool launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

#ifdef QCAL_WITH_MPI
// Element counts are ints in MPI: large buffers go in pieces.
constexpr int64_t kMaxChunk = int64_t{1} << 28;

Status mpi_status(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return Status::ok();
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  return unavailable(std::string(what) + ": " + std::string(msg, static_cast<size_t>(len)));
}

// Waits for a nonblocking request, sleeping between polls.
Status wait_polling(MPI_Request* req, const char* what) {
  int done = 0;
  auto sleep = std::chrono::microseconds(50);
  for (;;) {
    QCAL_RETURN_IF_ERROR(mpi_status(MPI_Test(req, &done, MPI_STATUS_IGNORE), what));
    if (done) return Status::ok();
    std::this_thread::sleep_for(sleep);
    sleep = std::min<std::chrono::microseconds>(sleep * 2, std::chrono::milliseconds(20));
  }
}

// A datatype of one sequence (T*H floats).
struct SeqType {
  MPI_Datatype t = MPI_DATATYPE_NULL;
  ~SeqType() {
    if (t != MPI_DATATYPE_NULL) MPI_Type_free(&t);
  }
};
Status make_seq_type(int64_t seq_elems, SeqType* st) {
  if (seq_elems <= 0 || seq_elems > INT_MAX)
    return invalid_input("sequence of " + std::to_string(seq_elems) +
                         " floats does not fit an MPI count");
  QCAL_RETURN_IF_ERROR(mpi_status(
      MPI_Type_contiguous(static_cast<int>(seq_elems), MPI_FLOAT, &st->t), "MPI_Type_contiguous"));
  return mpi_status(MPI_Type_commit(&st->t), "MPI_Type_commit");
}
#endif

}  // namespace

RankGroup::Shard RankGroup::shard_of(int64_t n, int rank, int size) {
  Shard s;
  s.begin = n * rank / size;
  s.end = n * (rank + 1) / size;
  return s;
}

std::unique_ptr<RankGroup> RankGroup::single() {
  return std::unique_ptr<RankGroup>(new RankGroup());
}

std::unique_ptr<RankGroup> RankGroup::create(int* argc, char*** argv) {
  auto g = single();
#ifdef QCAL_WITH_MPI
  if (!launched_by_mpirun()) return g;
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    g->owns_mpi_ = true;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
  MPI_Comm_rank(MPI_COMM_WORLD, &g->rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &g->size_);
  if (g->multi()) g->init_nccl();
#else
  (void)argc;
  (void)argv;
  if (launched_by_mpirun())
    LOG_WARN << "launched by mpirun, but this build has no MPI: every rank works alone";
#endif
  return g;
}

void RankGroup::init_nccl() {
#ifdef QCAL_WITH_MPI
  // All ranks must agree, or the collectives would not match: NCCL only when
  // every rank has a GPU and every rank joined the communicator.
  const char* comm = std::getenv("QCAL_COMM");
  int ok = (comm && std::string(comm) == "mpi") ? 0 : (cuda_available() ? 1 : 0);
  int all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all) return;
  std::string id;
  if (is_root()) {
    auto r = nccl_unique_id();
    if (r.is_ok()) id = *r;
  }
  id.resize(128, '\0');  // NCCL_UNIQUE_ID_BYTES
  MPI_Bcast(id.data(), 128, MPI_CHAR, 0, MPI_COMM_WORLD);
  auto c = NcclAllReduce::create(id, rank_, size_);
  ok = c.is_ok() ? 1 : 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (all) {
    nccl_ = std::move(c).value();
    if (is_root()) LOG_INFO << "rank group: " << size_ << " ranks, sums over NCCL";
  } else if (is_root()) {
    LOG_WARN << "rank group: NCCL setup failed on some rank, sums over MPI";
  }
#endif
}

RankGroup::~RankGroup() {
#ifdef QCAL_WITH_MPI
  if (owns_mpi_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
#endif
}

Status RankGroup::broadcast(std::string* s) {
  if (!multi()) return Status::ok();
#ifdef QCAL_WITH_MPI
  int64_t len = is_root() ? static_cast<int64_t>(s->size()) : 0;
  MPI_Request req;
  QCAL_RETURN_IF_ERROR(
      mpi_status(MPI_Ibcast(&len, 1, MPI_INT64_T, 0, MPI_COMM_WORLD, &req), "MPI_Ibcast"));
  QCAL_RETURN_IF_ERROR(wait_polling(&req, "MPI_Ibcast"));
  if (!is_root()) s->assign(static_cast<size_t>(len), '\0');
  for (int64_t off = 0; off < len; off += kMaxChunk) {
    int n = static_cast<int>(std::min(kMaxChunk, len - off));
    QCAL_RETURN_IF_ERROR(
        mpi_status(MPI_Bcast(s->data() + off, n, MPI_CHAR, 0, MPI_COMM_WORLD), "MPI_Bcast"));
  }
#else
  (void)s;
#endif
  return Status::ok();
}

Result<int> RankGroup::agree(int bits) {
  if (!multi()) return bits;
#ifdef QCAL_WITH_MPI
  int out = 0;
  QCAL_RETURN_IF_ERROR(mpi_status(MPI_Allreduce(&bits, &out, 1, MPI_INT, MPI_BOR, MPI_COMM_WORLD),
                                  "MPI_Allreduce(BOR)"));
  return out;
#else
  return bits;
#endif
}

#ifdef QCAL_WITH_MPI
namespace {
// In-place MPI sum of n elements of `type` (`size` bytes each), in chunks
// that fit MPI's int counts.
Status mpi_sum_chunked(void* data, int64_t n, MPI_Datatype type, size_t size, const char* what) {
  auto* bytes = static_cast<char*>(data);
  for (int64_t off = 0; off < n; off += kMaxChunk) {
    int c = static_cast<int>(std::min(kMaxChunk, n - off));
    QCAL_RETURN_IF_ERROR(mpi_status(
        MPI_Allreduce(MPI_IN_PLACE, bytes + off * size, c, type, MPI_SUM, MPI_COMM_WORLD), what));
  }
  return Status::ok();
}
}  // namespace
#endif

Status RankGroup::allreduce_sum(float* data, int64_t n) {
  if (!multi()) return Status::ok();
  if (nccl_) return nccl_->sum(data, n);
#ifdef QCAL_WITH_MPI
  return mpi_sum_chunked(data, n, MPI_FLOAT, sizeof(float), "MPI_Allreduce(float)");
#else
  (void)data;
  (void)n;
  return Status::ok();
#endif
}

Status RankGroup::allreduce_sum(double* data, int64_t n) {
  if (!multi()) return Status::ok();
#ifdef QCAL_WITH_MPI
  return mpi_sum_chunked(data, n, MPI_DOUBLE, sizeof(double), "MPI_Allreduce(double)");
#else
  (void)data;
  (void)n;
  return Status::ok();
#endif
}

Status RankGroup::allreduce_sum(int64_t* data, int64_t n) {
  if (!multi()) return Status::ok();
#ifdef QCAL_WITH_MPI
  return mpi_sum_chunked(data, n, MPI_INT64_T, sizeof(int64_t), "MPI_Allreduce(int64)");
#else
  (void)data;
  (void)n;
  return Status::ok();
#endif
}

HessianReduce RankGroup::hessian_reduce() {
  if (!multi()) return nullptr;
  return [this](HessianAccumulator& acc) -> Status {
    std::vector<float>& sum = acc.raw_sum();  // both triangles: every rank's is symmetric
    QCAL_RETURN_IF_ERROR(allreduce_sum(sum.data(), static_cast<int64_t>(sum.size())));
    int64_t n = acc.nsamples();
    QCAL_RETURN_IF_ERROR(allreduce_sum(&n, 1));
    // rows == 0 only counts sequences: nsamples becomes the group's total.
    acc.add_batch(nullptr, 0, n - acc.nsamples());
    return Status::ok();
  };
}

Status RankGroup::scatter_sequences(const Tensor& full, int64_t n_seq, int64_t seqlen,
                                    int64_t hidden, Tensor* local) {
  if (!multi()) {
    *local = full;
    return Status::ok();
  }
#ifdef QCAL_WITH_MPI
  const Shard mine = shard(n_seq);
  if (is_root() && full.numel() != n_seq * seqlen * hidden)
    return internal_error("scatter_sequences: root holds " + shape_str(full.shape) + ", not " +
                          std::to_string(n_seq) + " sequences of " + std::to_string(seqlen) +
                          " x " + std::to_string(hidden));
  SeqType st;
  QCAL_RETURN_IF_ERROR(make_seq_type(seqlen * hidden, &st));
  std::vector<int> counts(static_cast<size_t>(size_)), displs(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    Shard s = shard_of(n_seq, r, size_);
    counts[static_cast<size_t>(r)] = static_cast<int>(s.count());
    displs[static_cast<size_t>(r)] = static_cast<int>(s.begin);
  }
  *local = Tensor({mine.count() * seqlen, hidden});
  QCAL_RETURN_IF_ERROR(mpi_status(
      MPI_Scatterv(is_root() ? full.ptr() : nullptr, counts.data(), displs.data(), st.t,
                   local->ptr(), static_cast<int>(mine.count()), st.t, 0, MPI_COMM_WORLD),
      "MPI_Scatterv"));
#else
  (void)n_seq;
  (void)seqlen;
  (void)hidden;
#endif
  return Status::ok();
}

Status RankGroup::gather_sequences(const Tensor& local, int64_t n_seq, int64_t seqlen,
                                   int64_t hidden, Tensor* full) {
  const Shard mine = shard(n_seq);
  if (local.numel() != mine.count() * seqlen * hidden)
    return internal_error("gather_sequences: rank " + std::to_string(rank_) + " holds " +
                          shape_str(local.shape) + ", not " + std::to_string(mine.count()) +
                          " sequences");
  if (!multi()) {
    *full = local;
    return Status::ok();
  }
#ifdef QCAL_WITH_MPI
  SeqType st;
  QCAL_RETURN_IF_ERROR(make_seq_type(seqlen * hidden, &st));
  std::vector<int> counts(static_cast<size_t>(size_)), displs(static_cast<size_t>(size_));
  for (int r = 0; r < size_; ++r) {
    Shard s = shard_of(n_seq, r, size_);
    counts[static_cast<size_t>(r)] = static_cast<int>(s.count());
    displs[static_cast<size_t>(r)] = static_cast<int>(s.begin);
  }
  if (is_root()) *full = Tensor({n_seq * seqlen, hidden});
  QCAL_RETURN_IF_ERROR(mpi_status(MPI_Gatherv(local.ptr(), static_cast<int>(mine.count()), st.t,
                                              is_root() ? full->ptr() : nullptr, counts.data(),
                                              displs.data(), st.t, 0, MPI_COMM_WORLD),
                                  "MPI_Gatherv"));
#endif
  return Status::ok();
}

Status RankGroup::barrier() {
  if (!multi()) return Status::ok();
#ifdef QCAL_WITH_MPI
  return mpi_status(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
#else
  return Status::ok();
#endif
}

void RankGroup::abort(int code) {
#ifdef QCAL_WITH_MPI
  if (multi()) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::_Exit(code);
}

}  // namespace qcal

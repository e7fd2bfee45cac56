// GPTQ (methods.md §2.2, §11.6). Letters: O rows of W, I columns of W (= size of
// H), B block size, G groups, gs group size. All matrices are row-major.
#include "worker/engine/gptq.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <numeric>
#include <sstream>
#include <utility>

#include "common/log.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

// LAPACK (from OpenBLAS), Fortran calling convention: column-major, arguments by
// pointer, a trailing hidden length for each character argument.
extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info, size_t uplo_len);
void dtrtri_(const char* uplo, const char* diag, const int* n, double* a, const int* lda, int* info,
             size_t uplo_len, size_t diag_len);
}

namespace qcal {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Copies the strict lower triangle of the row-major (n, n) matrix onto the upper
// one, in tiles so both sides are read and written cache-friendly.
template <typename T>
void mirror_lower_to_upper(T* A, int64_t n) {
  constexpr int64_t kTile = 64;
  for (int64_t r0 = 0; r0 < n; r0 += kTile) {
    for (int64_t c0 = 0; c0 <= r0; c0 += kTile) {
      const int64_t r1 = std::min(r0 + kTile, n);
      const int64_t c1 = std::min(c0 + kTile, n);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < std::min(c1, r); ++c) A[c * n + r] = A[r * n + c];
      }
    }
  }
}

// y[0..n) −= a · x[0..n), element by element with the same rounding as the plain
// loop; GCC does not vectorize that loop at -O2, so spell out 4-wide vectors.
inline void sub_scaled(float* y, const float* x, float a, int64_t n) {
  typedef float v4 __attribute__((vector_size(16)));
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    v4 y0, y1, x0, x1;
    std::memcpy(&y0, y + c, sizeof(v4));
    std::memcpy(&y1, y + c + 4, sizeof(v4));
    std::memcpy(&x0, x + c, sizeof(v4));
    std::memcpy(&x1, x + c + 4, sizeof(v4));
    y0 -= a * x0;
    y1 -= a * x1;
    std::memcpy(y + c, &y0, sizeof(v4));
    std::memcpy(y + c + 4, &y1, sizeof(v4));
  }
  for (; c < n; ++c) y[c] -= a * x[c];
}

// §2.2 step 6 wants U, the upper Cholesky factor of A⁻¹ (A⁻¹ = UᵀU). The
// reference gets it as chol(cholesky_inverse(chol(A)), upper): 4/3·n³ flops in
// three passes. The factor is unique, so we compute the same U in 2/3·n³: with
// J the reversal permutation, let J A J = L Lᵀ (lower L). Then A = R Rᵀ with
// R = J L J upper, A⁻¹ = (R⁻¹)ᵀ R⁻¹ with R⁻¹ upper and positive on the
// diagonal, hence U = R⁻¹ = J L⁻¹ J.
// `A` holds J A J (row-major, lower triangle read). On success its lower
// triangle holds L⁻¹, and U[r][c] = A[(n−1−r)·n + (n−1−c)] for r ≤ c.
// LAPACK sees the transpose of a row-major matrix, so row-major lower is its 'U'.
bool reversed_inverse_cholesky(double* A, int64_t n) {
  (void)blas_threads();
  const int N = static_cast<int>(n);
  int info = 0;
  dpotrf_("U", &N, A, &N, &info, 1);  // row-major lower L, J A J = L Lᵀ
  if (info != 0) return false;
  dtrtri_("U", "N", &N, A, &N, &info, 1, 1);  // row-major lower L⁻¹
  if (info != 0) return false;
  for (int64_t i = 0; i < n; ++i) {
    const double d = A[i * n + i];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
  }
  return true;
}

std::string fmt_double(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

Status check_finite(const Tensor& t, const char* what) {
  const int64_t cols = t.dim(1);
  for (int64_t k = 0; k < t.numel(); ++k) {
    if (!std::isfinite(t.data[k])) {
      return invalid_input(std::string("gptq_quantize: non-finite ") + what + " at [" +
                           std::to_string(k / cols) + ", " + std::to_string(k % cols) + "] of " +
                           shape_str(t.shape));
    }
  }
  return Status::ok();
}

// ½ tr(D H Dᵀ) for D = W − Ŵ (O, I) and H (I, I): the layer-wise objective.
double half_trace_objective(const Tensor& W, const Tensor& What, const Tensor& H) {
  const int64_t O = W.dim(0);
  const int64_t I = W.dim(1);
  std::vector<float> D(W.data.size());
  for (size_t k = 0; k < D.size(); ++k) D[k] = W.data[k] - What.data[k];
  std::vector<float> DH(D.size());
  sgemm(false, false, O, I, I, 1.0f, D.data(), I, H.ptr(), I, 0.0f, DH.data(), I);
  double s = 0.0;
  for (size_t k = 0; k < D.size(); ++k) s += static_cast<double>(D[k]) * DH[k];
  return 0.5 * s;
}

// Replaces the result's layer by RTN (warning logged and recorded).
Status fall_back_to_rtn(const Tensor& W, const Tensor& H, const QuantSpec& spec,
                        const GptqOptions& opts, std::string msg, GptqResult* res) {
  LOG_WARN << msg;
  res->warnings.push_back(std::move(msg));
  QCAL_ASSIGN_OR_RETURN(res->qlinear, rtn_quantize(W, spec));
  Tensor What = res->qlinear.dequantize();
  res->loss = half_trace_objective(W, What, H);
  res->percdamp_used = 0.0;
  res->fell_back_to_rtn = true;
  if (opts.keep_solver_q) res->solver_q = std::move(What);
  return Status::ok();
}

}  // namespace

// ---------------------------------------------------------------------------
// HessianAccumulator
// ---------------------------------------------------------------------------

HessianAccumulator::HessianAccumulator(int64_t cols) : cols_(cols) {
  QCAL_CHECK(cols > 0 && cols <= INT_MAX);
  sum_.assign(static_cast<size_t>(cols * cols), 0.0f);
}

void HessianAccumulator::add_batch(const float* X, int64_t rows, int64_t num_sequences) {
  QCAL_CHECK(rows >= 0 && num_sequences >= 0 && rows <= INT_MAX);
  nsamples_ += num_sequences;
  if (rows == 0) return;
  const auto t0 = Clock::now();
  // Lower triangle (row-major) += XᵀX in fp32; half the flops of a full sgemm.
  ssyrk_lower_tn(cols_, rows, 1.0f, X, cols_, 1.0f, sum_.data(), cols_);
  upper_stale_ = true;
  gemm_seconds_ += seconds_since(t0);
}

void HessianAccumulator::merge(const HessianAccumulator& other) {
  QCAL_CHECK(other.cols_ == cols_);
  for (size_t k = 0; k < sum_.size(); ++k) sum_[k] += other.sum_[k];  // lower stays exact
  upper_stale_ = true;
  nsamples_ += other.nsamples_;
}

std::vector<float>& HessianAccumulator::raw_sum() {
  if (upper_stale_) mirror_lower_to_upper(sum_.data(), cols_);
  upper_stale_ = false;
  return sum_;
}

Tensor HessianAccumulator::hessian() const {
  Tensor H({cols_, cols_});
  if (nsamples_ == 0) return H;
  const float scale = 2.0f / static_cast<float>(nsamples_);
  for (size_t k = 0; k < sum_.size(); ++k) H.data[k] = scale * sum_[k];
  if (upper_stale_) mirror_lower_to_upper(H.ptr(), cols_);
  return H;
}

// ---------------------------------------------------------------------------
// Cholesky
// ---------------------------------------------------------------------------

bool cholesky_lower(double* A, int64_t n) {
  QCAL_CHECK(n >= 0 && n <= INT_MAX);
  if (n == 0) return true;
  (void)blas_threads();
  const int N = static_cast<int>(n);
  int info = 0;
  dpotrf_("U", &N, A, &N, &info, 1);  // LAPACK 'U' on the column-major view = row-major lower
  if (info != 0) return false;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = r + 1; c < n; ++c) A[r * n + c] = 0.0;
  }
  return true;
}

// ---------------------------------------------------------------------------
// GPTQ
// ---------------------------------------------------------------------------

namespace {
Result<GptqResult> gptq_solve(const Tensor& W, const Tensor& H, Tensor* release_h,
                              const QuantSpec& spec, const GptqOptions& opts);
}  // namespace

Result<GptqResult> gptq_quantize(const Tensor& W, const Tensor& H, const QuantSpec& spec,
                                 const GptqOptions& opts) {
  return gptq_solve(W, H, nullptr, spec, opts);
}

Result<GptqResult> gptq_quantize(const Tensor& W, Tensor&& H, const QuantSpec& spec,
                                 const GptqOptions& opts) {
  Tensor owned = std::move(H);
  return gptq_solve(W, owned, &owned, spec, opts);
}

namespace {
// `release_h` (when set) is H's owner: emptied once the factor is built (H is not
// read after that).
Result<GptqResult> gptq_solve(const Tensor& W, const Tensor& H, Tensor* release_h,
                              const QuantSpec& spec, const GptqOptions& opts) {
  const auto t_start = Clock::now();
  QCAL_RETURN_IF_ERROR(spec.validate());
  if (!(opts.percdamp >= 0.0) || !std::isfinite(opts.percdamp)) {
    return invalid_input("gptq_quantize: percdamp must be finite and >= 0, got " +
                         fmt_double(opts.percdamp));
  }
  if (opts.blocksize <= 0) {
    return invalid_input("gptq_quantize: blocksize must be > 0, got " +
                         std::to_string(opts.blocksize));
  }
  if (opts.max_damp_retries < 0) {
    return invalid_input("gptq_quantize: max_damp_retries must be >= 0, got " +
                         std::to_string(opts.max_damp_retries));
  }
  if (W.ndim() != 2 || W.dim(0) <= 0 || W.dim(1) <= 0) {
    return invalid_input("gptq_quantize: W must be a non-empty (O, I) matrix, got " +
                         shape_str(W.shape));
  }
  const int64_t O = W.dim(0);
  const int64_t I = W.dim(1);
  if (H.ndim() != 2 || H.dim(0) != I || H.dim(1) != I) {
    return invalid_input("gptq_quantize: H must be (" + std::to_string(I) + ", " +
                         std::to_string(I) + ") for W " + shape_str(W.shape) + ", got " +
                         shape_str(H.shape));
  }
  if (I > INT_MAX) return invalid_input("gptq_quantize: in_features too large for LAPACK");
  QCAL_RETURN_IF_ERROR(check_finite(W, "weight"));
  QCAL_RETURN_IF_ERROR(check_finite(H, "Hessian entry"));

  const std::string shapes = "W " + shape_str(W.shape) + ", H " + shape_str(H.shape);
  const bool per_channel = spec.group_size == -1;
  const int64_t gs = per_channel ? I : std::min(spec.group_size, I);  // i / gs is unchanged
  const int64_t G = per_channel ? 1 : (I + gs - 1) / gs;
  const bool static_groups = opts.static_groups && !per_channel;
  const int maxq = spec.maxq();

  GptqResult res;
  QuantizedLinear& ql = res.qlinear;
  ql.out_features = O;
  ql.in_features = I;
  ql.spec = spec;
  ql.scales.assign(static_cast<size_t>(G * O), 0.0f);  // (G, O)
  ql.zeros.assign(static_cast<size_t>(G * O), 0);      // (G, O)

  // diag(H), a dead input (H[d,d] = 0) counted as 1: the act-order key, and the
  // weight of each column's error in the MSE clip search (spec.mse_clip), so a
  // group's range is chosen for the inputs the layer's output depends on most.
  std::vector<double> diag(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) {
    const float h = H.at(i, i);
    diag[i] = h == 0.0f ? 1.0 : static_cast<double>(h);
  }
  const double* cw = spec.mse_clip ? diag.data() : nullptr;

  // 1. Per channel: one quantizer per row from the original W.
  if (per_channel) {
    for (int64_t o = 0; o < O; ++o) {
      const QParam p = find_qparam(W.ptr() + o * I, I, spec, cw);
      ql.scales[o] = p.scale;
      ql.zeros[o] = p.zero;
    }
  }

  // 2. Dead inputs: H[d,d] = 1 (below, when the working copy is built), W[:, d] = 0.
  std::vector<float> Wp(W.data);  // (O, I), permuted to solver order in step 4
  std::vector<char> dead(static_cast<size_t>(I), 0);
  for (int64_t i = 0; i < I; ++i) {
    dead[i] = H.at(i, i) == 0.0f;
    if (dead[i]) {
      for (int64_t o = 0; o < O; ++o) Wp[o * I + i] = 0.0f;
    }
  }

  // 3. Static groups: consecutive original columns of the dead-zeroed W.
  if (static_groups) {
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t c0 = g * gs;
        const QParam p =
            find_qparam(Wp.data() + o * I + c0, std::min(gs, I - c0), spec, cw ? cw + c0 : nullptr);
        ql.scales[g * O + o] = p.scale;
        ql.zeros[g * O + o] = p.zero;
      }
    }
  }

  // 4. Act-order: descending diag(H); stable so ties keep the original order.
  std::vector<int64_t> perm(static_cast<size_t>(I));  // solver position j → original column
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (opts.act_order) {
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return diag[a] > diag[b]; });
    std::vector<float> row(static_cast<size_t>(I));
    for (int64_t o = 0; o < O; ++o) {
      float* w = Wp.data() + o * I;
      for (int64_t j = 0; j < I; ++j) row[j] = w[perm[j]];
      std::copy(row.begin(), row.end(), w);
    }
  }
  std::vector<double> dperm(static_cast<size_t>(I));  // diag(H) in solver order
  for (int64_t j = 0; j < I; ++j) dperm[j] = diag[perm[j]];

  // 5-6. Damping and the upper Cholesky factor of the inverse, fp64, with retries.
  const auto t_factor = Clock::now();
  std::vector<double> A(static_cast<size_t>(I * I));
  double percdamp = opts.percdamp;
  bool factored = false;
  for (int attempt = 0; attempt <= opts.max_damp_retries; ++attempt) {
    ++res.profile.factor_attempts;
    // A = J·H[perm, perm]·J (see reversed_inverse_cholesky); only its lower triangle is read.
    double mean_diag = 0.0;
    for (int64_t r = 0; r < I; ++r) {
      const float* hrow = H.ptr() + perm[I - 1 - r] * I;
      double* arow = A.data() + r * I;
      for (int64_t c = 0; c <= r; ++c) arow[c] = static_cast<double>(hrow[perm[I - 1 - c]]);
      arow[r] = diag[perm[I - 1 - r]];
      mean_diag += arow[r];
    }
    mean_diag /= static_cast<double>(I);
    const double damp = percdamp * mean_diag;
    for (int64_t r = 0; r < I; ++r) A[r * I + r] += damp;
    if (reversed_inverse_cholesky(A.data(), I)) {
      factored = true;
      break;
    }
    std::string msg = "gptq: Cholesky failed (H + damp·I not positive definite) for " + shapes +
                      " at percdamp " + fmt_double(percdamp) + " (damp " + fmt_double(damp) +
                      ", mean diag " + fmt_double(mean_diag) + ")";
    // More damping cannot help when there is none to scale or it does not add to H.
    const bool futile = !(damp > 0.0);
    if (futile) {
      msg += "; damping cannot help (percdamp · mean diag = " + fmt_double(damp) + ")";
    } else if (attempt < opts.max_damp_retries) {
      percdamp *= 10.0;
      msg += "; retrying with percdamp " + fmt_double(percdamp);
    }
    LOG_WARN << msg;
    res.warnings.push_back(std::move(msg));
    if (futile) break;
  }
  res.profile.factor_s = seconds_since(t_factor);

  if (!factored) {
    A = std::vector<double>();
    QCAL_RETURN_IF_ERROR(fall_back_to_rtn(W, H, spec, opts,
                                          "gptq: falling back to RTN for " + shapes + " after " +
                                              std::to_string(res.profile.factor_attempts) +
                                              " Cholesky attempts",
                                          &res));
    res.profile.total_s = seconds_since(t_start);
    return res;
  }
  res.percdamp_used = percdamp;
  if (release_h) *release_h = Tensor();  // H is not read below

  // The loop runs in fp32 on U's upper triangle (row j: Hinv[j, j:]).
  std::vector<float> U(static_cast<size_t>(I * I), 0.0f);
  for (int64_t r = 0; r < I; ++r) {
    const double* arev = A.data() + (I - 1 - r) * I + (I - 1);  // A[I−1−r][I−1−c] at arev[−c]
    for (int64_t c = r; c < I; ++c) U[r * I + c] = static_cast<float>(arev[-c]);
  }
  A = std::vector<double>();

  // 7. Blocks of B columns: quantize column by column with rank-1 updates inside
  // the block, then one lazy sgemm update of the columns to its right. The updates
  // of one row depend only on that row's errors, so rows run in parallel.
  std::vector<uint8_t> codes(static_cast<size_t>(O * I));  // (O, I) solver order
  std::vector<float> qvals;                                // (O, I) solver order
  if (opts.keep_solver_q) qvals.resize(static_cast<size_t>(O * I));
  std::vector<double> row_loss(static_cast<size_t>(O), 0.0);
  const int64_t B = std::min(opts.blocksize, I);
  std::vector<float> W1(static_cast<size_t>(O * B));    // (O, nb) current block
  std::vector<float> Err1(static_cast<size_t>(O * B));  // (O, nb) scaled errors

  for (int64_t i1 = 0; i1 < I; i1 += B) {
    const int64_t i2 = std::min(i1 + B, I);
    const int64_t nb = i2 - i1;
    const auto t_loop = Clock::now();
    // Per row: nb columns, each a rank-1 update of the rest of the block.
    parallel_for(O, nb * nb / 2 + 1, [&](int64_t o0, int64_t o1) {
      std::vector<float> cur;  // current values of a group's columns, one row
      if (!per_channel && !static_groups) cur.resize(static_cast<size_t>(gs));
      for (int64_t o = o0; o < o1; ++o) {
        float* w1 = W1.data() + o * nb;
        float* e1 = Err1.data() + o * nb;
        const float* wrow = Wp.data() + o * I;
        std::copy(wrow + i1, wrow + i2, w1);
        double loss = 0.0;
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t j = i1 + i;
          int64_t g = 0;
          if (static_groups) {
            g = perm[j] / gs;
          } else if (!per_channel) {
            g = j / gs;
            if (j % gs == 0) {
              // Group boundary: parameters from the current W, i.e. with every
              // update from columns < j. Columns inside the block have them (W1);
              // columns past the block still miss this block's pending lazy update.
              const int64_t jend = std::min(j + gs, I);
              for (int64_t c = j; c < jend; ++c) {
                float v;
                if (c < i2) {
                  v = w1[c - i1];
                } else {
                  v = wrow[c];
                  for (int64_t k = 0; k < i; ++k) v -= e1[k] * U[(i1 + k) * I + c];
                }
                cur[c - j] = v;
              }
              const QParam p =
                  find_qparam(cur.data(), jend - j, spec, cw ? dperm.data() + j : nullptr);
              ql.scales[g * O + o] = p.scale;
              ql.zeros[g * O + o] = p.zero;
            }
          }
          const QParam p{ql.scales[g * O + o], ql.zeros[g * O + o]};
          const float w = w1[i];
          const float d = U[j * I + j];
          const int32_t code = quantize_code(w, p, maxq);
          const float qv = dequantize_code(code, p);
          codes[o * I + j] = static_cast<uint8_t>(code);
          if (!qvals.empty()) qvals[o * I + j] = qv;
          const float e = (w - qv) / d;
          e1[i] = e;
          const double dq = static_cast<double>(w) - qv;
          loss += dq * dq / (static_cast<double>(d) * d);
          const float* urow = U.data() + j * I + i1;
          sub_scaled(w1 + i + 1, urow + i + 1, e, nb - i - 1);
        }
        row_loss[o] += loss;
      }
    });
    res.profile.loop_s += seconds_since(t_loop);
    if (i2 < I) {
      const auto t_gemm = Clock::now();
      // W[:, i2:] −= Err1 · Hinv[i1:i2, i2:]
      sgemm(false, false, O, I - i2, nb, -1.0f, Err1.data(), nb, U.data() + i1 * I + i2, I, 1.0f,
            Wp.data() + i2, I);
      res.profile.lazy_gemm_s += seconds_since(t_gemm);
    }
  }

  double loss = 0.0;
  for (double l : row_loss) loss += l;
  res.loss = 0.5 * loss;
  if (!std::isfinite(res.loss)) {
    // Cannot happen with a finite W and a successful factorization short of an
    // fp32 overflow; keep the layer usable rather than write garbage (the RTN
    // fallback's loss needs H: without it, the error names the layer's shapes).
    if (release_h)
      return internal_error("gptq: non-finite error feedback for " + shapes +
                            " (an fp32 overflow); use recipe.weight_solver rtn for this model");
    QCAL_RETURN_IF_ERROR(fall_back_to_rtn(
        W, H, spec, opts, "gptq: non-finite error feedback for " + shapes + "; falling back to RTN",
        &res));
    res.profile.total_s = seconds_since(t_start);
    return res;
  }

  // 8. Back to the original column order.
  ql.q.resize(static_cast<size_t>(O * I));
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t j = 0; j < I; ++j) ql.q[o * I + perm[j]] = codes[o * I + j];
  }
  ql.g_idx.resize(static_cast<size_t>(I));
  for (int64_t j = 0; j < I; ++j) {
    const int64_t orig = perm[j];
    ql.g_idx[orig] = static_cast<int32_t>(per_channel ? 0 : (static_groups ? orig / gs : j / gs));
  }
  ql.act_order = false;
  for (int64_t i = 0; i < I && !per_channel; ++i) {
    if (ql.g_idx[i] != i / gs) ql.act_order = true;
  }
  if (opts.keep_solver_q) {
    res.solver_q = Tensor({O, I});
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t j = 0; j < I; ++j) res.solver_q.at(o, perm[j]) = qvals[o * I + j];
    }
  }
  res.profile.total_s = seconds_since(t_start);
  return res;
}
}  // namespace

}  // namespace qcal

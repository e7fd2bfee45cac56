// Forward and backward primitives of a LLaMA decoder block for calibration
// training (methods.md §5.7, §11.5), templated on the scalar type: T = float is
// the engine (OpenBLAS sgemm), T = double exists so every backward can be
// checked against float64 finite differences with the same code.
//
// Conventions: row-major; "rows" are tokens (or weight output rows); every
// backward ACCUMULATES (+=) into parameter gradients (dgamma, dL, dR, dbeta,
// ...) and OVERWRITES input gradients (dx) unless a comment says otherwise.
// Letters: T tokens of one sequence, C channels, n_h / n_kv heads, d head dim.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qcal {

// C(M,N) = alpha·op(A)·op(B) + beta·C (sgemm for float, dgemm for double).
void gemm_t(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
            const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
            int64_t ldc);
void gemm_t(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
            const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
            int64_t ldc);

// ---- RMSNorm: y = γ ⊙ x · r, r = 1/sqrt(mean(x²) + eps) per row.
template <typename T>
void rmsnorm_fwd(T* y, const T* x, const T* gamma, int64_t rows, int64_t C, T eps,
                 T* inv_rms /* (rows), saved for backward */);
// dx = r·(γ⊙dy) − x·r³·mean(x ⊙ γ ⊙ dy); dgamma += Σ_rows dy ⊙ x·r (dgamma may be null).
template <typename T>
void rmsnorm_bwd(T* dx, T* dgamma, const T* dy, const T* x, const T* gamma, const T* inv_rms,
                 int64_t rows, int64_t C);

// ---- RoPE (HF rotate-half), in place on x (T, heads·d), position of row t = pos0 + t.
template <typename T>
void rope_fwd(T* x, int64_t T_, int64_t heads, int64_t d, int64_t pos0, double theta);
// In place: dx = Rᵀ·dy (rotation by the negative angle).
template <typename T>
void rope_bwd(T* dx, int64_t T_, int64_t heads, int64_t d, int64_t pos0, double theta);

// ---- Causal GQA attention of one sequence, scale 1/sqrt(d), softmax in T.
// q (T, n_h·d), k/v (T, n_kv·d), out (T, n_h·d); probs (n_h, T, T) saved.
template <typename T>
void attention_fwd(T* out, const T* q, const T* k, const T* v, int64_t T_, int64_t n_h,
                   int64_t n_kv, int64_t d, T* probs);
// dq overwritten; dk, dv overwritten (sums over the query heads sharing a KV head).
template <typename T>
void attention_bwd(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                   const T* probs, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d);

// ---- The same with an unquantized prefix of P keys in front (IntactKV, methods.md
// §6): pk/pv (P, n_kv·d) precede the sequence's own k/v (T, n_kv·d); query t sees
// the prefix 0..P−1 and keys 0..t. probs (n_h, T, P+T) saved: row t holds the prefix
// columns 0..P−1, then the sequence's keys at P..P+T−1. P = 0 is attention_fwd /
// attention_bwd exactly (those are this with P = 0; pk/pv may then be null).
template <typename T>
void prefix_attention_fwd(T* out, const T* q, const T* pk, const T* pv, int64_t P, const T* k,
                          const T* v, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d, T* probs);
// dq, dk, dv overwritten; dpk, dpv (P, n_kv·d) ACCUMULATED (+=, so the prefix
// gradients of several sequences sum); either may be null (not wanted).
template <typename T>
void prefix_attention_bwd(T* dq, T* dpk, T* dpv, T* dk, T* dv, const T* dout, const T* q,
                          const T* pk, const T* pv, int64_t P, const T* k, const T* v,
                          const T* probs, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d);

// ---- SwiGLU: out = silu(g) ⊙ u.
template <typename T>
void swiglu_fwd(T* out, const T* g, const T* u, int64_t n);
template <typename T>
void swiglu_bwd(T* dg, T* du, const T* dout, const T* g, const T* u, int64_t n);

// ---- Kronecker transform of each row: x (n1·n2) viewed as X (n1, n2) row-major,
// y = x (L ⊗ R)  ⇔  Y = Lᵀ X R.  L (n1,n1), R (n2,n2); either may be null = identity.
// `work` must hold rows·n1·n2 elements. y must not alias x.
template <typename T>
void kron_fwd(T* y, const T* x, const T* L, const T* R, int64_t rows, int64_t n1, int64_t n2,
              T* work);
// dx = L dY Rᵀ per row (overwritten; dx may be null); dL += Σ X R dYᵀ; dR += Σ Xᵀ L dY
// (dL / dR may be null, and are ignored where L / R is null). `work`: 2·rows·n1·n2.
template <typename T>
void kron_bwd(T* dx, T* dL, T* dR, const T* dy, const T* x, const T* L, const T* R, int64_t rows,
              int64_t n1, int64_t n2, T* work);

// ---- Fake quantization with straight-through estimators (methods.md §0.1, §0.2).
//
// Straight-through estimators make the backward the exact gradient of a
// surrogate in which each rounding offset round(v) − v (kLsq) or fq(x) − x
// (kIdentity) is a constant. A RoundTape makes that surrogate evaluable for
// finite-difference tests: in kRecord mode every fake_quant_fwd appends its
// offsets; in kReplay mode it reads them back in the same order instead of
// rounding (the clamps, the ranges and everything else are recomputed).
// kLsq asym also records each group's zero point, which has no gradient, so
// the replayed surrogate holds it fixed. The surrogate still has kinks where an
// element's code round(v) + z lies exactly on a grid bound (the backward passes
// the gradient there, as torch.clamp does): finite-difference tests must give
// such elements no weight unless their v cannot move.
template <typename T>
struct RoundTape {
  enum class Mode { kRecord, kReplay } mode = Mode::kRecord;
  std::vector<T> offsets;
  size_t pos = 0;  // replay cursor
};

enum class Ste {
  kLsq,       // FlatQuant/OmniQuant: round_ste, clamp mask to x, LSQ gradient to the scale,
              // which flows on into the row max/min elements and the clip parameters
  kIdentity,  // SpinQuant: dx = dy, nothing to the scale or clip parameters
};

enum class ClipMode {
  kFixed,    // range × clip_ratio (QuaRot a_clip 0.9, kv_clip 0.95); no parameters
  kLearned,  // range × sigmoid(β): LAC (one scalar β pair, FlatQuant activations)
             // or LWC (one β pair per row·group, FlatQuant weights)
};

// One fake quantizer over a (rows, cols) matrix with groups of `group` consecutive
// columns (-1: one group per row). Per (row, group):
//   xmax = max(max_j x_j, 0)·cmax,  xmin = min(min_j x_j, 0)·cmin   (cmax/cmin = clip_ratio
//   or sigmoid(β_max)/sigmoid(β_min));
//   with `lwc_range` (FlatQuant LWC) the max/min are NOT widened to include 0 and
//   x is first clamped to [xmin, xmax];
//   sym:  s = max(|xmin|, xmax)/(2^(b−1) − 1), q = clamp(round(x/s), −2^(b−1), 2^(b−1) − 1),
//         x̂ = s·q;  s == 0 → s = 1;
//   asym: s = (xmax − xmin)/(2^b − 1), z = round(−xmin/s) (no gradient),
//         q = clamp(round(x/s) + z, 0, 2^b − 1), x̂ = s·(q − z);
//         xmax == xmin → s = 1 (activations; FlatQuant's convention), weights use s ≥ 1e-5.
//   `min_scale` clamps s from below (1e-5 for weights, 0 for activations).
// bits ≥ 16 means "off": y = x, backward dx = dy.
struct FakeQuantSpec {
  int bits = 16;
  bool sym = true;
  int64_t group = -1;
  Ste ste = Ste::kLsq;
  ClipMode clip = ClipMode::kFixed;
  double clip_ratio = 1.0;
  bool lwc_range = false;
  double min_scale = 0.0;
  bool on() const { return bits < 16; }
};

// Saved state for the backward (filled by fwd).
template <typename T>
struct FakeQuantSaved {
  std::vector<T> scale;          // (rows·G)
  std::vector<T> zero;           // (rows·G), asym
  std::vector<int64_t> amax_at;  // (rows·G) column of the max element (−1: the range was 0-widened)
  std::vector<int64_t> amin_at;     // (rows·G) column of the min element (−1 likewise)
  std::vector<T> raw_max, raw_min;  // (rows·G) before clipping
};

// y = fq(x). beta_max / beta_min: ClipMode::kLearned parameters, 1 element (shared
// by all groups: LAC) or rows·G elements (LWC); `n_beta` says which. Null for kFixed.
template <typename T>
void fake_quant_fwd(const FakeQuantSpec& s, T* y, const T* x, int64_t rows, int64_t cols,
                    const T* beta_max, const T* beta_min, int64_t n_beta, FakeQuantSaved<T>* saved,
                    RoundTape<T>* tape = nullptr);
// dx overwritten; dbeta_max / dbeta_min accumulated (null when not wanted).
template <typename T>
void fake_quant_bwd(const FakeQuantSpec& s, T* dx, T* dbeta_max, T* dbeta_min, const T* dy,
                    const T* x, int64_t rows, int64_t cols, const T* beta_max, const T* beta_min,
                    int64_t n_beta, const FakeQuantSaved<T>& saved);

// ---- Next-token cross-entropy over rows of logits (rows, V) with targets;
// target < 0 = not scored. Returns the mean NLL over scored rows; dlogits
// (may be null) = (softmax − onehot)/n_scored, zero on unscored rows.
template <typename T>
double cross_entropy_fwd_bwd(const T* logits, const int32_t* targets, int64_t rows, int64_t V,
                             T* dlogits);

}  // namespace qcal

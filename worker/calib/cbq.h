// CBQ: cross-block reconstruction with LoRA-Rounding and coarse-to-fine
// preprocessing (methods.md §7; training-loop conventions of §5.3 / §8).
//
// There is no public CBQ code; every constant the paper leaves open is chosen
// here, measured on the synthetic model of tests/unit/test_cbq.cc, and listed
// below with the reason (CbqOptions carries all of them).
//
// ---- The pieces
// 1. LoRA-Rounding weight quantizer (lora_round_*), per linear W (R, C), with
//    groups of `group` consecutive input columns (−1: per row), step sizes s
//    (R·G), low-rank A1 (R, r), A2 (r, C), an optional FIXED base V0 (R, C):
//      V  = V0 + A1·A2
//      h  = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1  (AdaRound)
//      v  = W / s;  q = clamp(floor(v) + h, −2^(b−1), 2^(b−1) − 1);  Ŵ = s·q
//    STE (§0.2 kLsq with floor for round): ∂Ŵ/∂h = s and ∂Ŵ/∂s = q − v where the
//    clamp is inactive; ∂Ŵ/∂s = q (the clamp bound) and ∂Ŵ/∂h = 0 where active.
//    Regularizer L_com = Σ (1 − |2h − 1|^β) (AdaRound form, §7.2). Hardening:
//    h ≥ 0.5 → 1, else 0 (⇔ V ≥ 0). rank 0 without V0 = "no LoRA-Rounding": q =
//    clamp(round(v)) with the learned step size only (round half to even).
// 2. CFP (§7.3): cfp_detect = Tukey fence Q3 + λ1·IQR (λ1 = 1.5) → coarse set →
//    best split of the sorted values into a lower part L (all inliers and the
//    lower coarse values) and an upper part U ⊆ coarse maximizing
//      M = (min U − max L)² − λ2·(var L + var U)
//    (M_inter = squared gap between the subsets, M_intra = within-subset
//    variances); U is the true outlier set iff max M > 0. Weights: per ROW of |W|,
//    outliers truncated to ±(largest non-outlier magnitude of the row).
//    Activations: values = per-channel max |X| over the calibration tokens of the
//    FP inputs of q/k/v, gate/up and down; outlier channel j gets
//      s_j = (max|X_j| / max inlier)^α   (α = 0.5, SmoothQuant-style), others 1;
//    x_j ← x_j / s_j is folded into the input/post-attention norm γ (attention,
//    MLP input) or into up_proj row j (down input), and W[:, j] ← W[:, j]·s_j into
//    every consumer: exact in exact arithmetic.
// 3. Window loss (window_loss): per token t over the hidden dimension,
//      E = mean_t [ mean_j (a_tj − b_tj)² + KL(softmax(a_t) ‖ softmax(b_t)) ],
//    a = FP target, b = quantized branch; ∂E/∂b = [2(b − a)/H + softmax(b) −
//    softmax(a)] / rows.
// 4. Windows (cbq_plan): k consecutive blocks, stride k − o: (0,1), (1,2), ... for
//    k = 2, o = 1; the last window is cut at L. Each window trains all its blocks
//    jointly (the quantized branch is the chain of QBlock<float> whose weights are
//    the LoRA-rounded Ŵ, weight fake-quantizers OFF, activation/KV quantizers per
//    the options; dx of block j+1 is dy of block j; ∂Ŵ from the block backward is
//    chained into s, A1, A2). The blocks of a window that no later window contains
//    are then hardened ("finalized"); the trained parameters of the others (the
//    overlap) are handed to the next window, which re-trains them from that state
//    (fresh AdamW moments and a fresh β schedule). k = 1, o = 0 is the per-block
//    reconstruction baseline through the same code path.
//    Target: the FP window applied to the FP inputs. Input of the quantized branch:
//    the finalized quantized model's output of the previous blocks (sequential,
//    default) or the FP inputs (parallel). Optional OmniQuant aug_loss term
//    E(T_fp(X_q), T_q(X_q)) (§7.2 "homologous reconstruction").
//
// ---- Choices. Measured on the synthetic model of tests/unit/test_cbq.cc (H 64, I 192,
// 4 layers, outlier channels α = 20; 16 × 32 calibration tokens, 80 steps per window;
// final-output MSE vs FP on 8 held-out sequences; QCAL_CBQ_SWEEP=1 / =w4a4 reruns the
// grid; "W2" / "W4A4" below are these two settings, the numbers MSEs).
// W2A16 g32: RTN 0.685, CBQ(2, 1) 0.074, per-block (k = 1) 0.079.
// W4A4 (per-channel weights, per-token activations, no rotation): RTN 0.583,
// CBQ(2, 1) 0.080 (lr_act 1e-2; 0.067 with the default 3e-2), per-block 0.095.
//  - Straight-through hard forward (hard_ste, default): the forward uses hard(h) ∈
//    {0, 1}, the backward the soft h' (and the LSQ gradient of the hard q). AdaRound's
//    soft relaxation (hard_ste = false, h ∈ [0, 1] in the forward, L_com pushing it to
//    {0, 1}) cannot binarize a LOW-RANK V element by element: the soft model drifts
//    away from anything hardenable (W2: soft loss 0.01 while the hardened loss stays
//    0.5) and ends at 0.351 (W2) / 0.099 (W4A4) vs 0.074 / 0.080 for hard STE.
//  - Init (LoraInit::kResidual, default): V0 = h⁻¹(frac(W/s0)) fixed (AdaRound's init,
//    not learned and recomputable from W, so the learned parameters stay (R + C)·r),
//    A2 = 0, A1 ~ N(0, 1/r): the hardened Ŵ starts exactly at RTN, elements near a
//    rounding tie (V0 ≈ 0) get the largest gradient h' and flip first, elements far
//    from it (|V0| ≈ 2.4, h' ≈ 0) stay. The spec-literal kHalf (V = 0: h = 0.5, so
//    every weight hardens UP) diverges at W2 (MSE 145; W4A4 0.079); kSvd (rank-r SVD
//    of h⁻¹(frac), which captures little of an i.i.d. pattern) gives W2 0.275, W4A4
//    0.066: kResidual is the one that is never worse than RTN at the start.
//  - rank r = 16 (capped at min(R, C)); W2: r 4 / 8 / 16 / 32 → 0.107 / 0.082 / 0.074 /
//    0.070, W4A4 0.100 / 0.089 / 0.080 / 0.071 (on 64-wide matrices; a real layer
//    has the same r over ≥ 4096 columns).
//  - Step sizes: s = s0·exp(ρ), ρ learned (ρ = 0 at start, s0 = absmax/(2^(b−1) − 1)
//    per row/group, ≥ 1e-5): Adam steps are relative changes of s in every layer.
//    Without LoRA-Rounding (learned step sizes only): W2 0.143, W4A4 0.310.
//  - Loss normalization: total = E / E_ref + λ·mean(L_com), E_ref = the hardened loss
//    at the initial parameters over the calibration set (a per-window constant, = RTN's
//    window loss; the first soft loss is no scale: it is ≈ 0 with kResidual and soft
//    forward). λ = 0.01 (AdaRound), L_com a MEAN over the window's rounding elements,
//    β 20 → 2 linearly after a 20% warm-up with L_com off. Measured λ 0 / 0.01 / 0.1:
//    W2 0.071 / 0.074 / 0.073, W4A4 0.074 / 0.080 / 0.081: with the hard forward it is
//    neutral to slightly harmful; 0.01 is kept as the paper's (AdaRound's) value.
//  - AdamW (param.h) with weight decay 0 (OmniQuant), cosine to 1e-3·lr, fresh moments
//    per window; lr ρ 1e-2 (W2: 3e-3 → 0.083, 3e-2 → 0.061 at 80 steps; a real run has
//    ~8× more steps per window), A1/A2 2e-2 (W2: 5e-3 → 0.112, 5e-2 → 0.073),
//    activation clip β 3e-2 (LAC-style learned activation step sizes range·σ(β), β₀ = 4
//    as in FlatQuant, whose LAC lr is 5e-2; W4A4: 1e-2 → 0.080, 3e-2 → 0.067, fixed
//    clip 1.0 → 0.081). epochs 20 (W2 / W4A4 at 60: 0.050 / 0.044), bsz 4.
//  - Windows: 2 blocks, overlap 1 (paper default). W2: per-block 0.079, (3, 2) 0.077;
//    parallel mode (FP inputs) 0.147; + aug_loss 0.091 (both off by default). W4A4:
//    per-block 0.095, (3, 2) 0.072, parallel 0.155, aug 0.082.
//  - Logit loss in the last window (head, off by default: issue #12). The window that
//    ends the model adds head_weight × the next-token KL of the FP head (final norm,
//    lm_head) to E. Synthetic W4A4, 4 epochs (test_cbq.cc): held-out next-token KL
//    0.117 → 0.109. Real babyllama-tok361, FlatQuant + CBQ (from GPTQ) + IntactKV
//    W4A4KV4, 64 × 256 tokens: 20 epochs 0.0846 → 0.0818 (weight 1) / 0.0819 (3); 40
//    epochs 0.0781. The calibration set's own KL falls much further (0.062 → 0.036 at
//    20 epochs, 0.030 at 40): the head term fits the calibration tokens' logits, and the
//    held-out gain is what survives. With it, at 40 epochs, windows of 3 / overlap 2
//    (0.0829) and + IntactKV+Cal (0.0820) did worse, and one window of all 5 blocks at
//    20 epochs (end to end: 0.0863) too. (These before the carried GPTQ start was
//    fixed, CbqBlockParams::cell; after it, 40 epochs 0.0810, with holdout 16 0.0799.)
//  - CFP: λ1 = 1.5, λ2 = 16, per ROW of |W| (per-row statistics are invariant to the
//    function-preserving channel rescalings that create activation outliers, and the
//    row's absmax is what sets its step). Measured on |N(0, 1)| rows: false positives
//    per row 1e-3 (64 values), 1.5e-4 (192), 0 (1024, 4096 in 2000 rows); a single
//    outlier is caught from 6σ (64) / 7σ (4096). λ2 = 4 / 9 / 25: false positives
//    4e-2 / 7e-3 / 3e-4 per 64-row, detection from 5 / 5.5 / 7σ. Truncation runs
//    before the activation smoothing (migrated columns are never cut). Smoothing only
//    when a_bits < 16 (weight-only recipes gain nothing from it): W4A4 without CFP
//    0.229 vs 0.080 with; α = 1 (full migration) gives 0.051 on the synthetic model,
//    whose outliers are exact γ rescalings that α = 1 undoes — α = 0.5 is kept as the
//    SmoothQuant default for real models. Weights-only CFP on the W2 model truncates
//    3 weights (false positives in 64-wide rows): 0.074 vs 0.072 without.
//
// Memory per window: FP activations 3 × N·T·H floats (running, next window's input,
// target) + the state's x_fp / x_q, the window's weights ×3 (FP, CFP base, Ŵ) plus V0
// and (R + C)·r masters per linear, and one minibatch tape per block.
// Thread safety: pure functions of their inputs; the BLAS runs multithreaded.
// Letters: N sequences of T tokens, H hidden, R/C rows/cols of one linear, G groups.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/plan.h"
#include "common/status.h"
#include "kernels/grad.h"
#include "worker/calib/activations.h"
#include "worker/calib/qblock.h"
#include "worker/engine/gptq.h"
#include "worker/engine/quantizer.h"

namespace qcal::calib {

// ================================================================ 1. LoRA-Rounding

struct LoraRoundSpec {
  int bits = 4;
  int64_t group = -1;  // input columns per step size; −1 = one per row
  int rank = 16;       // 0: no rounding parameters (learned step size + round only)
  double zeta = 1.1, gamma = -0.1;

  int qmin() const { return -(1 << (bits - 1)); }
  int qmax() const { return (1 << (bits - 1)) - 1; }
  int64_t group_cols(int64_t cols) const { return group > 0 && group < cols ? group : cols; }
  int64_t groups(int64_t cols) const {
    const int64_t g = group_cols(cols);
    return (cols + g - 1) / g;
  }
};

enum class LoraInit {
  kResidual,  // V0 = h⁻¹(frac(W/s0)) fixed, A1 ~ N(0, 1/r), A2 = 0 (default; see above)
  kHalf,      // V0 empty, A1 ~ N(0, 1/r), A2 = 0: h = 0.5 everywhere
  kSvd,       // V0 empty, A1·A2 = best rank-r approximation of h⁻¹(frac(W/s0))
};
const char* lora_init_name(LoraInit i);

template <typename T>
struct LoraRoundParams {
  std::vector<T> scale;  // (R·G) step sizes s
  std::vector<T> a1;     // (R, r)
  std::vector<T> a2;     // (r, C)
  std::vector<T> v0;     // (R, C) fixed base of V, or empty
};
template <typename T>
struct LoraRoundGrads {
  std::vector<T> scale, a1, a2;  // same shapes as the parameters; accumulated (+=)
};

// s0 = max(absmax of each row·group / qmax, 1e-5) (§0.1 symmetric signed grid).
template <typename T>
std::vector<T> lora_round_init_scale(const LoraRoundSpec& spec, const T* W, int64_t R, int64_t C);
// Parameters for W (R, C) with step sizes `scale` (usually lora_round_init_scale):
// the init above, A1 drawn from `seed`. spec.rank == 0 gives empty a1/a2/v0.
template <typename T>
LoraRoundParams<T> lora_round_init(const LoraRoundSpec& spec, const T* W, int64_t R, int64_t C,
                                   std::vector<T> scale, LoraInit init, uint64_t seed);

// Ŵ (R, C) from W. `hard`: h hardened (h ≥ 0.5 → 1). `tape` (finite-difference tests,
// grad.h RoundTape): kRecord appends per element floor(v) − v (round(v) − v without
// rounding parameters) and, when hard, hard(h) − h; kReplay adds those offsets back
// instead of rounding / hardening (the clamp and everything else are recomputed).
template <typename T>
void lora_round_fwd(const LoraRoundSpec& spec, const LoraRoundParams<T>& p, const T* W, int64_t R,
                    int64_t C, T* w_hat, bool hard = false, RoundTape<T>* tape = nullptr);
// Accumulates into g (sized on first use) the gradient of L given dŴ = ∂L/∂Ŵ (R, C),
// at the point p: the exact gradient of the surrogate in which floor(v) − v (and with
// `hard`, hard(h) − h: the straight-through hard forward) is constant. The clamp is
// tested on the q the forward used; at exactly a bound the gradient passes (PyTorch).
template <typename T>
void lora_round_bwd(const LoraRoundSpec& spec, const LoraRoundParams<T>& p, const T* W, int64_t R,
                    int64_t C, const T* dw_hat, LoraRoundGrads<T>* g, bool hard = false);
// Σ (1 − |2h − 1|^β) over the R·C elements (0 without rounding parameters); when g is
// non-null accumulates weight·∂/∂(A1, A2) of that sum.
template <typename T>
double lora_round_reg(const LoraRoundSpec& spec, const LoraRoundParams<T>& p, int64_t R, int64_t C,
                      double beta, double weight, LoraRoundGrads<T>* g);
// Hardened signed codes q ∈ [qmin, qmax] (R, C): exactly the q of lora_round_fwd(hard).
template <typename T>
std::vector<int8_t> lora_round_codes(const LoraRoundSpec& spec, const LoraRoundParams<T>& p,
                                     const T* W, int64_t R, int64_t C);

// ================================================================ 2. CFP

struct CfpOutliers {
  std::vector<int64_t> idx;  // indices of the true outliers, ascending
  double fence = 0;          // Q3 + λ1·IQR
  int64_t coarse = 0;        // number of values above the fence
  double max_inlier = 0;     // largest value not in idx
};
// Quartiles by linear interpolation (numpy's default). Fewer than 4 values: none.
CfpOutliers cfp_detect(const double* values, int64_t n, double lambda1, double lambda2);
// Per row of |W| (R, C): truncates the true outliers to ±max_inlier in place.
// Returns the number of truncated weights.
template <typename T>
int64_t cfp_truncate_weights(T* W, int64_t R, int64_t C, double lambda1, double lambda2);
// Per-channel scales from max |X_j| (channel_max, n): outlier channels get
// (max|X_j| / max_inlier)^alpha, the others exactly 1. `outliers` (may be null)
// receives the outlier channels.
std::vector<double> cfp_act_scales(const std::vector<double>& channel_max, double lambda1,
                                   double lambda2, double alpha, std::vector<int64_t>* outliers);

// ================================================================ 3. Window loss

// E (above) of rows tokens × H; d_hq (rows, H; may be null) overwritten with ∂E/∂h_q.
// mse / kl (may be null) receive the two parts (each a mean over tokens).
template <typename T>
double window_loss(const T* h_fp, const T* h_q, int64_t rows, int64_t H, T* d_hq,
                   double* mse = nullptr, double* kl = nullptr);
// The same as running sums over any number of calls (rows in order give exactly
// window_loss's sums): *sum_mse / *sum_kl += the rows' terms; d_hq (may be null) gets
// each row's ∂ times `grad_scale` (window_loss: 1/rows).
template <typename T>
void window_loss_acc(const T* h_fp, const T* h_q, int64_t rows, int64_t H, T* d_hq,
                     double grad_scale, double* sum_mse, double* sum_kl);

// The model's head on a window's output (CbqOptions::head, the window that ends at the
// model's last block): per token t the next-token logits z = W · RMSNorm_γ(h) (W the
// lm_head (V, H), γ the final norm) and KL(softmax(z_fp,t) ‖ softmax(z_q,t)), the
// quantity the model is evaluated on. *sum_kl += the rows' KL; d_hq (may be null)
// ACCUMULATES (+=) grad_scale · ∂KL/∂h_q = grad_scale · RMSNorm'ᵀ Wᵀ (softmax(z_q) −
// softmax(z_fp)). Rows run in chunks of at most max(V, max_logits) logits.
template <typename T>
void head_loss_acc(const T* gamma, const T* W, int64_t V, double eps, const T* h_fp, const T* h_q,
                   int64_t rows, int64_t H, T* d_hq, double grad_scale, double* sum_kl,
                   int64_t max_logits = int64_t{1} << 22);

// The FP head of a model in the basis of the windows' activations (the deployed final
// norm and lm_head: rotations folded the way the output carries them).
struct CbqHead {
  std::vector<float> norm;     // (H)
  std::vector<float> lm_head;  // (V, H)
};

// ================================================================ 4. Windows

struct CbqOptions {
  // Quantizers. Weights: symmetric signed grid, per row (w_group −1) or groups of
  // consecutive input columns. Activations: symmetric per token (every linear's
  // input); K/V: asymmetric per (token, head). 16 = off.
  int w_bits = 4;  // 2, 3, 4 or 8
  int64_t w_group = -1;
  int a_bits = 16;
  double a_clip = 1.0;  // fixed clip ratio when !learn_act_clip
  int kv_bits = 16;
  double kv_clip = 1.0;
  bool learn_act_clip = true;  // learned activation / KV step sizes (range·σ(β))
  // Windows.
  int window = 2, overlap = 1;
  bool parallel = false;  // quantized branch fed FP inputs instead of quantized ones
  bool aug_loss = false;  // + E(T_fp(X_q), T_q(X_q))
  // LoRA-Rounding.
  bool lora_rounding = true;  // false: learned step sizes with round-to-nearest only
  // true: the forward uses the hardened h with the straight-through gradient of the
  // soft h (what is trained is what is deployed); false: AdaRound's soft relaxation
  // (h ∈ [0, 1] in the forward, hardened only at the end).
  bool hard_ste = true;
  int rank = 16;
  LoraInit init = LoraInit::kResidual;
  // kResidual: recompute V0 = h⁻¹(frac(W/s)) from the CURRENT step sizes s at every
  // step (a constant of the step: no gradient through it), so that A1·A2 = 0 is round
  // to nearest on the current grid; false: V0 fixed at the initial s0 (above). With
  // learned step sizes a fixed V0 stops matching the grid as soon as s moves and the
  // rounding it encodes drifts away from round-to-nearest. Measured on the trained
  // fixtures (per-block, 32 × 128 calibration tokens, 8 epochs, output KL vs FP):
  // grammar-tiny W4A16 per channel 0.0019 fixed → 0.0008 following (step sizes only,
  // no LoRA: 0.0010); W2A16 g64 0.167 → 0.087 (0.182); grammar-tiny-outlier W4A4KV4
  // 0.848 → 0.838 (2.14). methods.h cbq_options (every recipe) sets it; the default
  // stays false so the measurements above remain reproducible.
  bool v0_follows_scale = false;
  double reg_lambda = 0.01;
  double beta_start = 20.0, beta_end = 2.0, warmup = 0.2;
  // CFP.
  bool cfp = true;          // master switch for both parts below
  bool cfp_weights = true;  // per-row truncation of weight outliers
  bool cfp_acts = true;     // outlier-channel smoothing (only when a_bits < 16)
  double cfp_lambda1 = 1.5, cfp_lambda2 = 16.0, cfp_act_alpha = 0.5;
  // Keep CFP on a block only where it lowers that block's quantized output error on the
  // calibration data: per block, ‖B_fp(x) − B_q(x)‖² summed over the FP inputs x of the
  // block, B_q with round-to-nearest weights on the initial grid and the window's
  // activation / K/V quantizers, with and without the block's CFP (truncation and
  // smoothing); CbqLayerResult::cfp_kept / cfp_err_* record the decision. The FP
  // inputs are the same in every window that contains the block, so a carried block
  // gets the same decision. Costs one more FP pass over the window and two quantized
  // forwards per block.
  bool cfp_decide = true;
  // Training (AdamW, weight decay 0, cosine to 1e-3·lr, fresh per window).
  int epochs = 20;
  int64_t bsz = 4;                                        // sequences per step
  double lr_scale = 1e-2, lr_lora = 2e-2, lr_act = 3e-2;  // ρ, A1/A2, activation β
  uint64_t seed = 0;
  // Polled before every training step (may be null): when it returns true the
  // window stops with kUnavailable "cbq: window W stopped at step S" and *state is
  // unchanged, so a cancelled service task ends within one step, not one window.
  std::function<bool()> should_stop;
  // Online (activation-side) transforms per model layer (L entries, or empty = none):
  // QuaRot/SpinQuant's online Hadamards, FlatQuant's Kronecker pairs (a1/a2, u1/u2,
  // d1/d2, po, pk/pk_it; the same form as NativeLayer::online). Both branches of a
  // window run their blocks with them (fixed; the weights are then the deployed,
  // transform-folded ones), so the trained codes are those of the deployed basis.
  // CFP's activation smoothing is skipped on an input that has an online transform
  // (a1/a2: attention, u1/u2: MLP, d1/d2: down), where it would not be exact.
  std::vector<BlockTransformsT<float>> online;
  // Set for recipes that keep transforms online: cbq_run_window then refuses options
  // whose `online` does not have L entries (methods.h cbq_options(recipe, setup)).
  bool needs_online = false;
  // IntactKV (methods.md §6): the FP pivot cache the deployed model carries, per model
  // layer (L entries of (prefix_len, n_kv·d) each: K after RoPE and P_k, V; block.h
  // prefix_kv), or empty. With a prefix every sequence must begin with the prefix
  // tokens (the caller checks the ids); the quantized branch then runs each sequence's
  // tokens [P:] after that FP cache (QBlock::set_prefix, positions from P), exactly as
  // the deployed model is evaluated, and the loss covers positions P..T−1 (the FP
  // target there equals the FP model's with its own prefix: causal attention). Without
  // it the quantized branch would be trained against its own quantized BOS K/V, which
  // the deployed model never uses.
  int64_t prefix_len = 0;
  std::vector<std::vector<float>> prefix_k, prefix_v;
  // GPTQ initialization ("gptq + block/cbq"): before training, every block the window
  // trains for the first time is rounded by GPTQ (true-sequential groups, Hessians of
  // the quantized branch's inputs through the window's earlier blocks at their initial
  // hardened state, activation / K/V quantizers and online transforms as trained), and
  // the reconstruction starts from that solution: step sizes s0 = GPTQ's scales, and
  // the base W the rounding is learned on moved into GPTQ's rounding cell,
  //   W' = s0·clamp(W/s0, q − 0.5 + m, q + 0.5 − m)   (q: GPTQ's signed code, m =
  //   gptq_margin),
  // so that round-to-nearest of W'/s0 (what the hardened LoRA-Rounding starts from,
  // kResidual) is exactly GPTQ's code: the window's initial hardened loss is GPTQ's.
  // The margin keeps the weights GPTQ moved out of their RTN cell (its error
  // compensation) off the cell boundary, where the LoRA offsets and step-size changes
  // would flip them back first.
  // `gptq` carries percdamp / blocksize / act_order (static groups are forced with
  // w_group > 0, the reconstruction's groups being consecutive columns).
  bool gptq_init = false;
  GptqOptions gptq;
  // In (0, 0.5). Measured: synthetic W2A16 g32 window 0 at 4 epochs (test_cbq.cc) ends
  // at 0.113 / 0.104 / 0.112 with m = 0.01 / 0.25 / 0.4, but tests/unit/test_compose.cc's
  // composed recipe (grammar-tiny W4A4KV4) gives KL 0.0063 with 0.01 and 0.0068 with
  // 0.25: 0.01 is kept.
  double gptq_margin = 0.01;
  bool gptq_narrow =
      true;  // GPTQ's grid: absmax/(2^(b−1) − 1) (the trainer's) or 2·absmax/(2^b − 1)
  // Keep the window's initial parameters when training ends with a higher hardened
  // loss over the calibration set than they had (CbqWindowReport::reverted): the
  // window's calibration objective never ends worse than its initialization (RTN,
  // GPTQ, or the carried state). Costs one more quantized pass over the window.
  bool keep_best = true;
  // Logit loss in the last window (issue #12): the window whose last block is the
  // model's last adds head_weight × the head's logit KL (head_loss_acc) to its loss E,
  // in training, in the hardened losses and in keep_best's comparison, so the blocks
  // that end the model are fitted to the next-token distribution rather than to the
  // hidden state alone. Null: no head term (every window's loss is the block-output E).
  std::shared_ptr<const CbqHead> head;
  double head_weight = 1.0;
  // Held-out selection (issue #12): the last `holdout` calibration sequences are not
  // trained on; the window's hardened loss on them is taken at the initial parameters
  // (with keep_best) and after every epoch, and the parameters with the lowest win
  // (CbqWindowReport::best_epoch; keep_best's calibration-set comparison is then not
  // made). A window's reconstruction fits its calibration sequences far better than
  // unseen ones (babyllama W4A4KV4: calibration-set KL 0.030, held-out 0.078); this
  // stops it where the unseen ones stop improving. 0: off (train on every sequence).
  // The held-out sequences still flow through every window (and GPTQ's init uses them).
  // Measured (KL to FP on the evaluation split, this machine): babyllama W4A4KV4
  // FlatQuant + CBQ from GPTQ + IntactKV, logit loss 1, 64 sequences: 40 epochs 0.0810,
  // holdout 16 0.0799 (60 epochs 0.0796), 8 0.0833, 24 0.0831; tests/unit/test_compose.cc
  // (grammar-tiny, 32 sequences): no holdout 0.0062, holdout 8 0.0031 (every window
  // keeps its GPTQ start).
  int64_t holdout = 0;

  // kInvalidInput naming the field (bits, window/overlap, group not positive, ...).
  Status validate(const ModelConfig& c) const;
  LoraRoundSpec lora_spec() const;
  // The QBlock spec of the quantized branch: weight quantizers off, act/KV per the options.
  BlockQuantSpec block_spec(const ModelConfig& c) const;
};

using plan::CbqWindow;  // blocks first..last trained, first..finalize_last hardened after
// The windows for L blocks (common/plan.h cbq_windows, the planner's rule). window ≥ 1,
// 0 ≤ overlap < window (validate()).
std::vector<CbqWindow> cbq_plan(int64_t L, int window, int overlap);

struct CbqWindowReport {
  int64_t window = 0, first = 0, last = 0;
  double loss_first = 0, loss_last = 0;  // E of the first / last minibatch (soft weights)
  // E over all N sequences with hardened weights: at the initial parameters (= RTN
  // for kResidual / no LoRA-Rounding) and after training.
  double loss_hard_init = 0, loss_hard = 0;
  int64_t steps = 0;
  double seconds = 0;
  // keep_best: training ended above loss_hard_init and the initial parameters were
  // kept (loss_hard is then theirs, with the fp16 scales); loss_hard_trained is the
  // trained parameters' hardened loss either way.
  bool reverted = false;
  double loss_hard_trained = 0;
  bool gptq_init = false;  // the fresh blocks started from GPTQ's solution
  // holdout > 0: the held-out sequences' hardened loss at the initial parameters (0
  // without keep_best) and after each epoch; the epoch kept (0: the initial
  // parameters, `reverted`) and its held-out loss.
  int64_t holdout = 0;
  double loss_holdout_init = 0, loss_holdout = 0;
  std::vector<double> holdout_losses;
  int64_t best_epoch = -1;
};

// Trained parameters of one block, carried from a window to the next (fp64 masters).
struct CbqBlockParams {
  int64_t layer = -1;
  std::array<std::vector<double>, kNumProj> rho;     // (R·G) log step-size offsets
  std::array<std::vector<double>, kNumProj> a1, a2;  // LoRA factors
  BlockClipT<double> clip;                           // activation / KV β (ties max = min)
  // gptq_init: where the block's rounding is learned from, carried with it so that the
  // next window continues from GPTQ's solution rather than from round-to-nearest of the
  // unmoved weights: per linear the step sizes s0 (R·G) that ρ is relative to, and
  // GPTQ's codes (R·C, signed code + 2^(b−1)) whose cells the base was moved into
  // (CbqOptions::gptq_init). Empty: s0 from W's range, W unmoved.
  std::array<std::vector<double>, kNumProj> s0;
  std::array<std::vector<uint8_t>, kNumProj> cell;
};

// Everything that flows from one window to the next: a service can run each window
// as its own task by persisting this (plus the FP weights of the layers it names).
struct CbqState {
  int64_t next_window = 0;
  std::vector<float> x_fp;  // (N·T, H) FP activations entering plan[next_window].first
  std::vector<float> x_q;   // (N·T, H) quantized-branch input there (empty when parallel)
  std::vector<CbqBlockParams> carried;  // blocks of the next window trained before
};
// The state before window 0: x_fp = x_q = x0 (layer-0 inputs).
CbqState cbq_initial_state(const std::vector<float>& x0, const CbqOptions& o);

// The result for one finalized layer.
struct CbqLayerResult {
  int64_t layer = -1;
  // Codes and fp16-representable scales in the engine's format (quantizer.h: unsigned
  // codes = signed + 2^(b−1), zero = 2^(b−1)); dequantize() equals the layer's weights.
  std::array<QuantizedLinear, kNumProj> q;
  // Clip ratios σ(β) of the activation quantizers (input of linear p) and K/V
  // (a_clip / kv_clip when not learned; 1 when off).
  std::array<double, kNumProj> act_clip{};
  double k_clip = 1.0, v_clip = 1.0;
  std::array<int64_t, kNumProj> cfp_truncated{};  // weights truncated by CFP
  // cfp_decide: whether the block kept its CFP, and the block's summed squared output
  // error (RTN weights) with and without it (0 when CFP changed nothing or is off).
  bool cfp_kept = true;
  double cfp_err_with = 0, cfp_err_without = 0;
  // Activation smoothing folded into the returned weights (empty = none): attention
  // input (H, into input_norm), MLP input (H, into post_norm), down input (I, into
  // up_proj rows). x ← x / s there.
  std::vector<double> smooth_attn, smooth_mlp, smooth_down;
  std::array<std::vector<int64_t>, 3> outlier_channels;  // attn, mlp, down
};

// ---- The window on activation streams (issue #10): no N·T·H array is held; the
// targets are kept in a scratch file (or memory) while the window trains.
struct CbqStreams {
  // FP activations entering the window's first block. The FP pass runs the window's
  // FP blocks on them: the targets and CFP's statistics. Required.
  const ActivationSource* x_fp = nullptr;
  // The quantized branch's input (sequential mode); null in parallel mode (x_fp then).
  const ActivationSource* x_q = nullptr;
  // Receive the next window's inputs (either may be null): x_fp through the finalized
  // FP blocks, x_q through the finalized quantized blocks (sequential only).
  ActivationSink* next_fp = nullptr;
  ActivationSink* next_q = nullptr;
  // The targets go to an unnamed file in this directory, or memory when empty.
  std::string scratch_dir;
  // Data parallel: each training minibatch is split over the ranks and `sum` adds their
  // loss sums and gradients; the FP pass and the full-set losses run on every rank.
  int rank = 0, ranks = 1;
  std::function<Status(double*, int64_t)> sum;
  // Sequences per training forward/backward (gradients accumulate); 0 = the minibatch.
  int64_t micro = 0;
};
// Window `window` of `plan` with the trained parameters `carried` of the blocks it shares
// with the previous window (in order); on success the parameters of the blocks the next
// window shares go to `carried_out`, and the finalized layers as in the overload below.
Status cbq_run_window(const ModelConfig& c, const CbqOptions& o, const std::vector<CbqWindow>& plan,
                      int64_t window, const std::vector<BlockWeightsT<float>*>& layers,
                      const std::vector<CbqBlockParams>& carried, const CbqStreams& io,
                      std::vector<CbqBlockParams>* carried_out,
                      std::vector<CbqLayerResult>* finalized, CbqWindowReport* report);

// Runs window state->next_window of `plan` (built by cbq_plan for the same options).
// `layers[j]` is the FP weights of block plan[w].first + j (j < window size); on
// success the finalized blocks (first..finalize_last) are replaced by their
// quantized form (dequantized codes; norms / up_proj with the CFP smoothing folded;
// biases unchanged), their results appended to `finalized` (may be null), and *state
// advanced.
// The carried blocks keep their FP weights. On error nothing is replaced and
// *state is unchanged. Errors: kInvalidInput (options, sizes, state not matching
// the plan), kInternal (a non-finite loss / gradient / parameter: the message names
// the window, its blocks and the step).
Status cbq_run_window(const ModelConfig& c, const CbqOptions& o, const std::vector<CbqWindow>& plan,
                      int64_t N, int64_t T, const std::vector<BlockWeightsT<float>*>& layers,
                      CbqState* state, std::vector<CbqLayerResult>* finalized,
                      CbqWindowReport* report);

struct CbqResult {
  std::vector<CbqWindowReport> windows;
  std::vector<CbqLayerResult> layers;  // finalized in order, from the resumed window on
  double seconds = 0;
};
// All windows from `resume` (or from scratch with x0), in one process: `layers` (all
// L FP blocks) is replaced by the quantized blocks. x0 (N·T, H): layer-0 inputs.
// `on_window` (may be null) is called after each window.
Result<CbqResult> cbq_calibrate(const ModelConfig& c, std::vector<BlockWeightsT<float>>& layers,
                                const std::vector<float>& x0, int64_t N, int64_t T,
                                const CbqOptions& o,
                                const std::function<void(const CbqWindowReport&)>& on_window,
                                const CbqState* resume = nullptr);

}  // namespace qcal::calib

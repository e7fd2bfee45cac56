// IntactKV (methods.md §6, §11.8): the K/V cache of a pivot prefix ([BOS], or
// [BOS] + system prompt) computed by the full-precision model in the quantized
// model's basis, kept unquantized in front of every sequence; the evaluation
// protocol that uses it (§0.3, §6.2); its calibration as trainable parameters
// ("+Cal", §6.4); and a diagnostic of attention sinks.
//
// Letters: L layers, P prefix tokens, T tokens per sequence, V vocab, H hidden,
// n_h / n_kv heads, d head dim, K = n_kv·d.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "common/data.h"
#include "common/status.h"
#include "kernels/grad.h"
#include "worker/calib/native.h"
#include "worker/calib/qblock.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"

namespace qcal::calib {

// The FP twin of a deployed model: a copy of `m_with_float_weights` with every
// activation / K / V quantizer off (bits 16), w_bits 16, w_group −1, no packed
// weights and no IntactKV. Everything else (embed, norms with their folded
// diagonals, lm_head, the float weights `fw`, the transformed biases, the online
// transforms) is kept as is.
//
// What the calibration pipeline must hand in: a NativeModel whose layers are the
// *deployed, unquantized* form of the quantized model, i.e. per layer the
// reparameterized FP weights (every offline transform folded, FlatQuant's LWC
// clamp included, but not weight-quantized) in `fw`, the same input/post norms,
// biases and online transforms (a1/a2, u1/u2, d1/d2, po, pk/pk_it) as the
// quantized NativeLayer, and the same embed / final_norm / lm_head (with R1 and
// norm folds). In methods.cc terms: `native_layer(dl, nullptr, r)` for every
// layer's Deployed `dl`, before the weights are quantized (GPTQ / RTN).
// Aborts (programmer error) when m.w_bits < 16 or a layer lacks float weights.
NativeModel fp_view(const NativeModel& m_with_float_weights);

// IntactKV_[B] / IntactKV_[P] (§6.2, §6.3): runs `prefix` through `fp_transformed`
// (the same model and online transforms as `quantized`, FP weights, every
// quantizer off; see fp_view) with positions 0..P−1, and stores in `quantized`
// the prefix ids, every layer's K (after RoPE and P_k) and V (P, K), and the FP
// logits of the prefix (P, V). native_logits on `quantized` then prepends that
// cache unquantized and starts the sequence at position P.
// Replaces any IntactKV `quantized` already had. On error `quantized` is unchanged.
// Errors (kInvalidInput): empty prefix or ids outside the vocabulary; shapes of
// the two models that differ; `fp_transformed` with a quantizer on, w_bits < 16
// or an IntactKV prefix of its own; online transforms that differ between the two
// (the cache would be in the wrong basis).
Status attach_intactkv(NativeModel& quantized, const NativeModel& fp_transformed,
                       const std::vector<int32_t>& prefix);

// Perplexity of the native model `m` on `data` and, when `fp` is given, KL and
// top-1 agreement against it, with evaluate_logits' scoring (every position
// 0..T−2 of every sequence predicts the next token).
//   Without IntactKV: the logits of every full sequence.
//   With IntactKV (prefix of P tokens): every sequence must begin with the
//     prefix; the quantized model consumes tokens[P:] after the FP prefix cache,
//     and the logits of positions 0..P−1 are the stored FP prefix logits, so
//     every position is still scored and the numbers compare with the
//     non-IntactKV run on the same data. (The IntactKV paper instead overwrites
//     each window's first token with BOS, §0.3; callers that want that must
//     prepare the data so.)
// `fp` is always evaluated on the full sequences.
// Errors (kInvalidInput): a sequence not beginning with the prefix ("IntactKV
// needs every sequence to begin with the prefix [1]; sequence 3 begins with 17"),
// a prefix not shorter than seqlen, an FP model of another vocabulary; plus
// evaluate_logits' checks (seqlen ≥ 2, ≥ 1 sequence, batch ≥ 1).
// Memory: `batch` sequences of logits (batch·T, V) per model at a time: the
// in-memory, materializing path (a model held whole, tests). A checkpoint on disk
// is evaluated by evaluate_stream over open_eval_model (native_eval.h), which
// gives the same numbers (check_intactkv_prefix is the one prefix check of both).
Result<EvalResult> evaluate_native(const NativeModel& m, const TokenSequences& data,
                                   const LlamaModel* fp, int64_t batch);

// ---- IntactKV as trainable parameters ("+Cal", methods.md §6.4).

// The QBlock inputs that compute what native_logits computes for layer l of m
// (fake quantization in fp32 instead of the integer GEMM):
//   w: the float weights in the deployed basis: `fw` at w_bits 16, else the
//      dequantized codes scales·q (exactly native's dequantization), with the
//      layer's norms and (transformed) biases;
//   t: the online transforms a1/a2, u1/u2, d1/d2, po, pk, pk_it acting on the
//      activations only. Every weight-side member (a1_it, a2_it, u1_it, u2_it,
//      d1_it, d2_it, po_it, pv, pv_it, ca, cu, cd) stays EMPTY: QBlock transforms a
//      weight only through those, so the stored weights are used as they are;
//   q: act[p] / k / v from NativeActQuant (bits, sym, group, clip as a fixed
//      ratio; Ste::kLsq for the backward), weight quantizers off.
// Aborts (programmer error) when l is out of range or a layer lacks its weights.
struct NativeBlockInputs {
  BlockWeightsT<float> w;
  BlockTransformsT<float> t;
  BlockQuantSpec q;
};
NativeBlockInputs native_block_inputs(const NativeModel& m, int64_t l);

// native_logits(m, tokens, B, T) computed through a chain of QBlock<float> built by
// native_block_inputs (with m's IntactKV cache as every block's prefix, positions
// starting at P), then the final norm and lm_head. Differs from native_logits by
// float summation order, and where the integer GEMM and the fake-quantized fp32
// GEMM round an activation to neighbouring codes (rare boundary flips).
std::vector<float> qblock_chain_logits(const NativeModel& m, const int32_t* tokens, int64_t B,
                                       int64_t T);

// The paper's training setup (§6.4): HF Trainer, paged AdamW 32-bit, batch 1 with
// gradient accumulation, constant schedule after linear warmup, global grad-norm
// clip, seed 42.
struct IntactKvCalOptions {
  int64_t steps = 160, accum = 16;
  double lr = 2e-4, warmup_ratio = 0.03, max_grad_norm = 0.3, weight_decay = 0;
  uint64_t seed = 42;
  // Data parallel: every rank draws the same sequences; each computes its share of a
  // step's `accum` ones, and `sum` (in-place sum of doubles across the ranks) adds the
  // losses and prefix gradients before the step. Empty / one rank: the single-process
  // arithmetic.
  int rank = 0, ranks = 1;
  std::function<Status(double* data, int64_t n)> sum;
};
struct IntactKvCalReport {
  double loss_first = 0, loss_last = 0;  // mean objective of the first / last step's sequences
  int64_t steps = 0;
  double seconds = 0;
};

// Trains the IntactKV cache of `quantized` (attach_intactkv must have attached
// it; `fp_transformed` is attach_intactkv's second argument): every layer's
// prefix K and V (P, n_kv·d) are the only parameters, everything else is frozen.
// Objective per sequence (every token after the prefix counts; there are no
// assistant masks):
//   L = Σ_l ½ · mean_{tokens t ≥ P, channels} (h_l^q − h_l^fp)²
// with h_l the output of decoder layer l: h^fp from fp_transformed on the full
// sequence (QBlocks, quantizers off; positions < P dropped), h^q from the
// quantized QBlock chain (native_block_inputs) on tokens[P:] after the prefix
// cache, positions from P. The backward runs through every layer (dx chained)
// and sums the prefix gradients of all layers; the activations of one sequence
// are recomputed layer by layer in the backward (memory: L+1 residual streams of
// T−P tokens plus one layer's tape; the FP targets are cached while they fit in
// 1 GiB, recomputed per sequence otherwise; the float weights of both models,
// the quantized ones dequantized).
// Optimization: AdamW (param.h, fp64 masters; betas 0.9/0.999, eps 1e-8,
// weight_decay) at lr·min(1, s/W) for step s = 0..steps−1, W = ceil(warmup_ratio
// · steps) (HF's linear warmup: step 0 runs at lr 0), on the mean gradient of
// `accum` sequences (batch 1 each) clipped to global norm max_grad_norm
// (coefficient max_grad_norm/(norm + 1e-6) when below 1). Sequences are drawn
// without replacement from a permutation of data (Rng(seed)), reshuffled when
// used up. `progress` (may be null) gets each finished step and its loss.
// steps = 0 returns at once (loss_first = loss_last = 0) and leaves the cache
// bit-identical. Only the cache (intact_k / intact_v) changes; the stored FP
// prefix logits stay (they do not depend on it).
// Errors, with `quantized` unchanged: kInvalidInput for no IntactKV cache,
// options out of range (steps < 0, accum < 1, lr ≤ 0, warmup_ratio ∉ [0, 1],
// max_grad_norm ≤ 0, weight_decay < 0), attach_intactkv's FP-twin checks, no
// sequence, seqlen ≤ P, token ids outside the vocabulary, a sequence not
// beginning with the prefix (evaluate_native's message); kInternal naming the
// step when the loss or the gradient norm is not finite.
Result<IntactKvCalReport> calibrate_intactkv(
    NativeModel& quantized, const NativeModel& fp_transformed, const TokenSequences& data,
    const IntactKvCalOptions& o,
    const std::function<void(int64_t step, int64_t steps, double loss)>& progress = nullptr);

// The objective L of ONE sequence `seq` (T tokens, beginning with the prefix) at
// the prefix cache (k, v) given here (L entries of (P, n_kv·d); quantized's own
// cache is not read, only its prefix length), in float64, and its gradient with
// respect to k and v when dk / dv are non-null (resized, overwritten).
// calibrate_intactkv runs the same code in float. `tape` (may be null) is the
// RoundTape of the quantized chain's fake quantizers, in the order of the forward:
// kRecord while computing the gradient, kReplay (pos reset here) for the
// finite-difference surrogate. For tests. Aborts on inconsistent shapes.
double intactkv_cal_objective(const NativeModel& quantized, const NativeModel& fp_transformed,
                              const int32_t* seq, int64_t T,
                              const std::vector<std::vector<double>>& k,
                              const std::vector<std::vector<double>>& v,
                              std::vector<std::vector<double>>* dk,
                              std::vector<std::vector<double>>* dv,
                              RoundTape<double>* tape = nullptr);

// The calibration data of +Cal: the sequences of `calib` with their first P tokens
// replaced by `prefix` where they do not begin with it (the IntactKV paper's protocol;
// P must be shorter than seqlen), and how many were changed.
TokenSequences intactkv_cal_data(const TokenSequences& calib, const std::vector<int32_t>& prefix,
                                 int64_t* replaced);

// Attention-sink diagnostic: per layer l (L entries), the mean attention
// probability that a query puts on position 0, averaged over the n_h heads,
// the query positions t = 1..T−1 (position 0 trivially attends to itself) and
// the first `max_seqs` sequences of `data` (all when max_seqs ≤ 0), through the
// FP model `m` (worker/engine's block_forward; the scores are recomputed from
// the same normalized inputs). Values lie in [0, 1]; a uniform causal attention
// gives mean_t 1/(t+1), a sink on BOS gives values near 1.
// Errors: kInvalidInput for seqlen < 2 or no sequence; read errors of the model.
// Memory: the activations of the chosen sequences (S·T, H) plus one layer.
Result<std::vector<double>> attention_sink_share(const LlamaModel& m, const TokenSequences& data,
                                                 int64_t max_seqs);

}  // namespace qcal::calib

// IntactKV (methods.md §6, §11.8): the K/V cache of a pivot prefix ([BOS], or
// [BOS] + system prompt) computed by the full-precision model in the quantized
// model's basis, kept unquantized in front of every sequence; the evaluation
// protocol that uses it (§0.3, §6.2); and a diagnostic of attention sinks.
//
// Letters: L layers, P prefix tokens, T tokens per sequence, V vocab, H hidden,
// n_h / n_kv heads, d head dim, K = n_kv·d.
#pragma once

#include <cstdint>
#include <vector>

#include "common/data.h"
#include "common/status.h"
#include "worker/calib/native.h"
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
// Memory: `batch` sequences of logits (batch·T, V) per model at a time.
Result<EvalResult> evaluate_native(const NativeModel& m, const TokenSequences& data,
                                   const LlamaModel* fp, int64_t batch);

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

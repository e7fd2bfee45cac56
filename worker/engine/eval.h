// Evaluation: perplexity of a model on token sequences and, against an FP
// model, the per-token KL divergence and top-1 agreement.
//
// evaluate_stream is the evaluator of record (the validate task, `qcal eval`):
// it streams both models a layer at a time and the vocabulary projection in
// chunks of lm_head rows with online log-sum-exp, so no (rows, V) logits and no
// whole model are ever held (issue #10; its peak memory is
// common/eval_memory.h). evaluate_logits is the materializing reference it is
// tested against.
//
// Letters: S sequences, T seqlen, P IntactKV prefix tokens, H hidden, V vocab.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "common/data.h"
#include "common/eval_memory.h"
#include "worker/engine/model.h"

namespace qcal {

struct EvalResult {
  double nll = 0.0;    // mean nats per predicted token
  double ppl = 0.0;    // exp(nll)
  int64_t tokens = 0;  // predicted tokens: sequences * (seqlen − 1)
  int64_t sequences = 0;
  std::optional<double> kl;          // mean KL(FP ‖ model) per predicted token, nats
  std::optional<double> top1_agree;  // fraction of positions where argmaxes agree
  std::optional<double> fp_ppl;
  nlohmann::json to_json() const;
};

// Token t+1 is predicted from tokens ≤ t inside each sequence. Positions whose
// prediction is scored: 0..T−2 of every sequence.

// One model as evaluate_stream reads it: the embedding rows of the tokens, then
// one decoder layer at a time, then the final norm and lm_head rows in chunks.
// Implementations read from the mapped checkpoint on each call and keep nothing
// large between calls (LlamaEvalModel below; calib::open_eval_model for every
// checkpoint format, worker/calib/native_eval.h). Errors are returned as the
// reader's Status (kInvalidInput for bad values or shapes, kIoError, kCorrupt).
// Calls come from one thread at a time.
class EvalModel {
 public:
  virtual ~EvalModel() = default;
  virtual const ModelConfig& config() const = 0;
  // The IntactKV prefix (P token ids) whose FP K/V cache precedes every sequence
  // in every layer, and whose FP logits the model stores; empty (the default) for
  // none. With a prefix, evaluate_stream runs tokens[P:] of each sequence through
  // the layers and takes the logits of positions 0..P−1 from prefix_logits.
  virtual const std::vector<int32_t>& prefix() const;
  // x (n, H) = the embedding rows of ids[0..n) (every id in [0, V): the caller
  // checked them).
  virtual Status embed(const int32_t* ids, int64_t n, float* x) const = 0;
  // Reads layer l (0 ≤ l < num_hidden_layers) and runs it in place on x (B·T, H):
  // B sequences of T tokens at positions P..P+T−1 (0..T−1 without a prefix).
  virtual Status forward_layer(int64_t l, float* x, int64_t B, int64_t T) const = 0;
  // γ (H) of the final RMSNorm.
  virtual Result<std::vector<float>> final_norm() const = 0;
  // out (n, H) = rows [v0, v0 + n) of lm_head in fp32, 0 ≤ v0, v0 + n ≤ V.
  virtual Status head_rows(int64_t v0, int64_t n, float* out) const = 0;
  // out (n) = entries [v0, v0 + n) of the stored FP logits of prefix position
  // p < P. The default (no prefix) returns kInternal.
  virtual Status prefix_logits(int64_t p, int64_t v0, int64_t n, float* out) const;
};

// An HF checkpoint (FP, GPTQ or compressed-tensors, through LlamaModel: layers
// dequantized on load) as an EvalModel. Does not own `m`, which must outlive it
// (owning(): does). A quantized lm_head (a third-party GPTQ with "lm_head": true;
// qcal never writes one) is dequantized whole on first use: only that case holds
// V·H·4 bytes.
class LlamaEvalModel final : public EvalModel {
 public:
  explicit LlamaEvalModel(const LlamaModel& m) : m_(&m) {}
  static std::unique_ptr<EvalModel> owning(std::unique_ptr<LlamaModel> m);
  const ModelConfig& config() const override { return m_->config(); }
  Status embed(const int32_t* ids, int64_t n, float* x) const override;
  Status forward_layer(int64_t l, float* x, int64_t B, int64_t T) const override;
  Result<std::vector<float>> final_norm() const override;
  Status head_rows(int64_t v0, int64_t n, float* out) const override;

 private:
  const LlamaModel* m_;
  std::unique_ptr<LlamaModel> owned_;
};

// Perplexity of `model` on `data` and, when `fp` is given, KL(p_fp ‖ p_model),
// top-1 agreement and the FP perplexity, streaming. Per batch of o.batch
// sequences: the model's layers one at a time on its activations (tokens[P:]
// after an IntactKV prefix), then the FP model's likewise on the full sequences;
// the final norms; then lm_head rows in chunks of o.head_rows (each read once
// per batch, converted to fp32), scored in tiles of max(1, o.tile_floats /
// o.head_rows) rows with an online log-sum-exp (running-max rescaling), the
// target's logit, a running argmax (first of equal maxima) and the online KL sum
// Σ exp(z_fp − m_fp)·(z_fp − z) rescaled with the FP running max. Positions
// 0..P−1 of the model take its stored prefix logits.
// The scoring is in double from the fp32 logits: on the same logits it equals an
// fp64 log-softmax scoring to ~1e-15, and evaluate_logits (fp32 log-softmax) to
// ~1e-8 relative on ppl; tiles of other shapes change the GEMM's rounding of the
// logits by ulps (tests/unit/test_eval_stream.cc). A model against itself gives
// KL 0 and top-1 agreement 1 exactly. Deterministic: rows are scored
// independently (split across threads) and summed in order, so the scorer adds
// no dependence on the thread count (measured: QCAL_THREADS 1 and 2 give the
// same bits; OpenBLAS with 3 threads rounds differently). A NaN or inf anywhere
// in the logits makes ppl (or kl) NaN, never a finite number.
// Memory: estimate_eval_memory (common/eval_memory.h): the two batches'
// residual streams plus the larger of one layer of each model and the lm_head
// chunks with their logit tiles.
// Errors (kInvalidInput): seqlen < 2, no sequence, o.batch / o.head_rows /
// o.tile_floats < 1, a token id outside [0, V) (naming sequence and position),
// an FP model of another vocabulary or with a prefix of its own, and with a
// prefix a sequence not beginning with it (check_intactkv_prefix); plus any
// error of the models' readers.
Result<EvalResult> evaluate_stream(const EvalModel& model, const EvalModel* fp,
                                   const TokenSequences& data, const EvalOptions& o = {});

// evaluate_stream over HF checkpoints (LlamaEvalModel) with o.batch = batch.
Result<EvalResult> evaluate(const LlamaModel& model, const TokenSequences& data,
                            const LlamaModel* fp_model = nullptr, int64_t batch = 8);

// OK iff every sequence of `data` begins with `prefix` and is longer than it;
// else kInvalidInput ("IntactKV needs every sequence to begin with the prefix
// [1]; sequence 3 begins with 17", or that the prefix leaves nothing of a
// sequence). The IntactKV evaluation protocol (intactkv.h evaluate_native).
Status check_intactkv_prefix(const std::vector<int32_t>& prefix, const TokenSequences& data);

// Logits (nb·T, V) of sequences [s0, s0 + nb) of the evaluation data, from any
// model (the native quantized model, a transformed model in a test).
using BatchLogits = std::function<Result<Tensor>(int64_t s0, int64_t nb)>;
// The materializing reference of evaluate_stream: the same scoring (same
// positions, KL and top-1 rules) over whole (nb·T, V) logits from `model` and,
// if given, `fp`, log-softmaxed in fp32 and compared in double.
// Memory: batch·T·V floats per model.
Result<EvalResult> evaluate_logits(const BatchLogits& model, const BatchLogits* fp,
                                   const TokenSequences& data, int64_t V, int64_t batch = 8);

}  // namespace qcal

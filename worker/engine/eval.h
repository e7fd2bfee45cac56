// Evaluation: perplexity of a model on token sequences and, against an FP
// model, the per-token KL divergence and top-1 agreement.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>

#include "common/data.h"
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
// prediction is scored: 0..T−2 of every sequence. Sequences are processed in
// batches of `batch` to bound memory; both models advance layer by layer.
Result<EvalResult> evaluate(const LlamaModel& model, const TokenSequences& data,
                            const LlamaModel* fp_model = nullptr, int64_t batch = 8);

// Logits (nb·T, V) of sequences [s0, s0 + nb) of the evaluation data, from any
// model (the native quantized model, a transformed model in a test).
using BatchLogits = std::function<Result<Tensor>(int64_t s0, int64_t nb)>;
// The same scoring as evaluate() (same positions, same KL and top-1 rules) over
// logits from `model` and, if given, `fp`.
Result<EvalResult> evaluate_logits(const BatchLogits& model, const BatchLogits* fp,
                                   const TokenSequences& data, int64_t V, int64_t batch = 8);

}  // namespace qcal

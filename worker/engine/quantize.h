// The in-process quantization job (`qcal quantize`): the sequential layer walk
// of GPTQ (methods.md §2.3) or plain RTN, then the checkpoint writer.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/data.h"
#include "worker/engine/gptq.h"
#include "worker/engine/model.h"
#include "worker/engine/qformats.h"
#include "worker/engine/quantizer.h"

namespace qcal {

enum class WeightMethod { kRtn, kGptq };
Result<WeightMethod> parse_weight_method(const std::string& name);  // "rtn" | "gptq"

struct QuantizeOptions {
  WeightMethod method = WeightMethod::kGptq;
  QuantSpec spec;
  GptqOptions gptq;
  bool true_sequential = true;  // groups {q,k,v} → {o} → {gate,up} → {down}
  WriteOptions write;
  int64_t batch = 8;  // sequences per forward batch
};

// Per-layer statistics of the walk.
struct LayerReport {
  int64_t layer = 0;
  // ‖Y_fp − Y_q‖² / ‖Y_fp‖² of the block output, both from the same
  // (quantized-path) input.
  double rel_output_error = 0.0;
  double seconds = 0.0;
  nlohmann::json proj_losses = nlohmann::json::object();  // GPTQ loss per projection
};

struct QuantizeReport {
  std::vector<LayerReport> layers;
  double seconds = 0.0;
  nlohmann::json to_json() const;
};

using ProgressFn = std::function<void(int64_t layer, int64_t num_layers)>;

// Sums a rank-local Hessian accumulator across the ranks of a worker group
// (MPI/NCCL all-reduce of raw_sum() and nsamples). nullptr = single rank.
using HessianReduce = std::function<Status(HessianAccumulator& acc)>;

// One step of the walk, shared by `quantize_model` and the service's
// calibrate tasks so both produce identical bits: quantizes layer `l` of
// `model` from `x` (N*T, H), the layer's input on the quantized path for this
// rank's N sequences of `seqlen` tokens; adds the layer's seven quantized
// linears to `out` (keys "model.layers.<l>.<proj>"); replaces `x` by the
// layer's output through the quantized weights. Checks the opts, not the model.
Result<LayerReport> quantize_layer(const LlamaModel& model, int64_t l, Tensor& x, int64_t seqlen,
                                   const QuantizeOptions& opts,
                                   std::map<std::string, QuantizedLinear>* out,
                                   const HessianReduce& reduce = nullptr);

// The checkpoint writer's options for a recipe (records GPTQ settings in
// quantization_config). Used by quantize_model and the service's assemble task.
WriteOptions checkpoint_write_options(const QuantizeOptions& opts);

// Validates `opts` against the model before any work: spec, batch, an FP
// (not already quantized) checkpoint with every tensor present, and every
// projection shape writable in the chosen format. kInvalidInput naming the
// problem.
Status check_quantize_inputs(const LlamaModel& model, const QuantizeOptions& opts);

// Quantizes the model at `model_dir` on `calib` and writes `out_dir`.
Result<QuantizeReport> quantize_model(const std::string& model_dir, const TokenSequences& calib,
                                      const QuantizeOptions& opts, const std::string& out_dir,
                                      const ProgressFn& progress = nullptr);

}  // namespace qcal

// The in-process quantization job (`qcal quantize`): the sequential layer walk
// of GPTQ (methods.md §2.3) or plain RTN, then the checkpoint writer.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/data.h"
#include "worker/engine/gptq.h"
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

// Quantizes the model at `model_dir` on `calib` and writes `out_dir`.
Result<QuantizeReport> quantize_model(const std::string& model_dir, const TokenSequences& calib,
                                      const QuantizeOptions& opts, const std::string& out_dir,
                                      const ProgressFn& progress = nullptr);

}  // namespace qcal

// A Hugging Face model directory: config.json plus one `model.safetensors` or
// shards listed in `model.safetensors.index.json`. Files are memory-mapped;
// tensors are read one at a time, so the model is never loaded whole.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/model_config.h"
#include "common/safetensors.h"

namespace qcal {

class ModelDir {
 public:
  // Opens `dir`: parses config.json, maps every shard, checks the index (each
  // listed shard exists, each tensor is where the index says). Errors name the
  // file and the problem.
  static Result<std::unique_ptr<ModelDir>> open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  // The whole config.json (to read `quantization_config` and keep unknown keys).
  const nlohmann::json& config_json() const { return config_json_; }
  // The `quantization_config` object, if the model is quantized.
  std::optional<nlohmann::json> quantization_config() const;

  // nullptr if absent. `file` (optional) receives the shard that holds it.
  const TensorInfo* find(const std::string& name, const SafetensorsFile** file = nullptr) const;
  bool has(const std::string& name) const { return find(name) != nullptr; }
  // All tensor names, sorted.
  std::vector<std::string> tensor_names() const;
  // Reads a float tensor as fp32 and checks its shape equals `expect_shape`
  // (when non-empty). Errors: kNotFound "missing tensor X", kInvalidInput
  // "tensor X has shape [a,b], config implies [c,d]".
  Result<Tensor> read_f32(const std::string& name, const std::vector<int64_t>& expect_shape = {}) const;
  // Checks that every tensor an unquantized LLaMA model needs is present with
  // the shape the config implies (embed, per-layer norms and projections,
  // optional q/k/v bias, final norm, lm_head unless tied).
  Status validate_fp_model() const;
  // Total bytes of all tensor data.
  uint64_t total_bytes() const;

 private:
  ModelDir() = default;
  std::string dir_;
  ModelConfig config_;
  nlohmann::json config_json_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>> index_;
};

// HF tensor names.
std::string layer_prefix(int64_t layer);  // "model.layers.<l>."
// The seven projections of a block in HF naming, in "true sequential" order of
// capture groups: {q,k,v} -> {o} -> {gate,up} -> {down}.
extern const char* const kProjNames[7];  // "self_attn.q_proj", ..., "mlp.down_proj"
// Shape [out, in] of projection `proj` (one of kProjNames) under `c`.
std::vector<int64_t> proj_shape(const ModelConfig& c, const std::string& proj);

}  // namespace qcal

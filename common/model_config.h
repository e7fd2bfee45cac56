// The parts of a Hugging Face config.json that define a LLaMA-family model
// (model_type llama, mistral, qwen2): pre-RMSNorm, RoPE, SwiGLU, GQA.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "common/dtype.h"
#include "common/status.h"

namespace qcal {

struct ModelConfig {
  std::string model_type = "llama";  // llama | mistral | qwen2
  int64_t hidden_size = 0;           // H
  int64_t intermediate_size = 0;     // I
  int64_t num_hidden_layers = 0;     // L
  int64_t num_attention_heads = 0;   // n_h
  int64_t num_key_value_heads = 0;   // n_kv (defaults to n_h)
  int64_t head_dim = 0;              // d_h (defaults to H / n_h)
  int64_t vocab_size = 0;            // V
  int64_t max_position_embeddings = 2048;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v bias (true for qwen2)
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  DType torch_dtype = DType::kF32;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
  // Number of parameters (embeddings, all blocks, final norm, lm_head unless tied).
  int64_t num_parameters() const;
  // Serializes back to HF config.json form (architectures, model_type, ...).
  nlohmann::json to_json() const;
};

// Parses and validates config.json content. Errors (kInvalidInput) name the
// field: unsupported model_type, missing/non-positive sizes, heads not
// dividing hidden, kv heads not dividing heads, unsupported rope_scaling, ...
// `what` (the path) prefixes messages.
Result<ModelConfig> parse_model_config(const nlohmann::json& j, const std::string& what);
Result<ModelConfig> load_model_config(const std::string& config_json_path);

}  // namespace qcal

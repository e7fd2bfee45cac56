#include "common/model_config.h"

#include <cmath>
#include <limits>

#include "common/fsutil.h"
#include "common/json_util.h"

namespace qcal {

namespace {

using json = nlohmann::json;

// Written into config.json so transformers does not warn about a missing
// version; the oldest release that reads every field we write.
constexpr const char* kTransformersVersion = "4.44.0";

// Limits that keep num_parameters() and every byte count far from int64
// overflow while admitting every real model (vocab 256k, hidden 16k, 126 layers).
constexpr int64_t kMaxDim = int64_t{1} << 22;
constexpr int64_t kMaxLayers = 4096;
// Real config.json files nest 3-4 levels (quantization_config groups).
constexpr int kMaxJsonDepth = 64;

const char* architecture_for(const std::string& model_type) {
  if (model_type == "mistral") return "MistralForCausalLM";
  if (model_type == "qwen2") return "Qwen2ForCausalLM";
  return "LlamaForCausalLM";
}

// Renders `v` for an error message: at most 3 levels deep and ~80 characters.
// A plain dump() recurses without bound, and a hostile config can nest deeply.
void brief_into(const json& v, int depth, std::string* out) {
  if (out->size() > 80) return;
  if (v.is_object() || v.is_array()) {
    const bool obj = v.is_object();
    if (depth >= 3) {
      *out += obj ? "{...}" : "[...]";
      return;
    }
    *out += obj ? "{" : "[";
    bool first = true;
    for (auto it = v.begin(); it != v.end() && out->size() <= 80; ++it) {
      if (!first) *out += ", ";
      first = false;
      if (obj) *out += json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace) + ": ";
      brief_into(it.value(), depth + 1, out);
    }
    *out += obj ? "}" : "]";
    return;
  }
  *out += v.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string brief(const json& v) {
  std::string s;
  brief_into(v, 0, &s);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

class Reader {
 public:
  Reader(const json& j, const std::string& what) : j_(j), what_(what) {}

  Status err(const std::string& field, const std::string& problem) const {
    return invalid_input(what_ + ": " + field + " " + problem);
  }
  const json* get(const char* field) const {
    auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  // A required (or, with `dflt`, optional) positive integer no larger than `max`.
  Status pos_int(const char* field, int64_t* out, int64_t max, bool required) const {
    const json* v = get(field);
    if (!v) return required ? err(field, "is missing") : Status::ok();
    if (!v->is_number_integer()) return err(field, "must be an integer, got " + brief(*v));
    if (v->is_number_unsigned() ? v->get<uint64_t>() > static_cast<uint64_t>(max)
                                : v->get<int64_t>() > max)
      return err(field,
                 "= " + brief(*v) + " is implausibly large (limit " + std::to_string(max) + ")");
    int64_t x = v->get<int64_t>();
    if (x <= 0) return err(field, "must be positive, got " + std::to_string(x));
    *out = x;
    return Status::ok();
  }
  Status pos_double(const char* field, double* out) const {
    const json* v = get(field);
    if (!v) return Status::ok();
    if (!v->is_number()) return err(field, "must be a number, got " + brief(*v));
    double x = v->get<double>();
    if (!(x > 0) || !std::isfinite(x)) return err(field, "must be positive, got " + brief(*v));
    *out = x;
    return Status::ok();
  }
  Status boolean(const char* field, bool* out, bool* present = nullptr) const {
    const json* v = get(field);
    if (present) *present = v != nullptr;
    if (!v) return Status::ok();
    if (!v->is_boolean()) return err(field, "must be true or false, got " + brief(*v));
    *out = v->get<bool>();
    return Status::ok();
  }
  // A token id: an integer, or a list of them (the first is used; Llama 3 lists
  // several eos ids).
  Status token_id(const char* field, int64_t* out) const {
    const json* v = get(field);
    if (!v) return Status::ok();
    const json* x = v;
    if (v->is_array()) {
      if (v->empty()) return Status::ok();
      x = &(*v)[0];
    }
    if (!x->is_number_integer() || x->get<int64_t>() < 0)
      return err(field, "must be a non-negative integer or a list of them, got " + brief(*v));
    *out = x->get<int64_t>();
    return Status::ok();
  }

 private:
  const json& j_;
  const std::string& what_;
};

}  // namespace

int64_t ModelConfig::num_parameters() const {
  const int64_t H = hidden_size, I = intermediate_size, V = vocab_size;
  int64_t per_layer = 2 * H               // input / post-attention RMSNorm
                      + q_dim() * H       // q_proj
                      + 2 * kv_dim() * H  // k_proj, v_proj
                      + H * q_dim()       // o_proj
                      + 3 * H * I;        // gate, up, down
  if (attention_bias) per_layer += q_dim() + 2 * kv_dim();
  int64_t n = V * H + num_hidden_layers * per_layer + H;
  if (!tie_word_embeddings) n += V * H;
  return n;
}

nlohmann::json ModelConfig::to_json() const {
  json j;
  j["architectures"] = json::array({architecture_for(model_type)});
  j["model_type"] = model_type;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rope_theta"] = rope_theta;
  j["rope_scaling"] = nullptr;
  j["rms_norm_eps"] = rms_norm_eps;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["attention_bias"] = attention_bias;
  j["attention_dropout"] = 0.0;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["torch_dtype"] = torch_dtype_name(torch_dtype);
  j["use_cache"] = true;
  j["transformers_version"] = kTransformersVersion;
  if (model_type == "llama") j["mlp_bias"] = false;
  if (model_type == "mistral") j["sliding_window"] = nullptr;
  if (model_type == "qwen2") j["use_sliding_window"] = false;
  return j;
}

Result<ModelConfig> parse_model_config(const nlohmann::json& j, const std::string& what) {
  if (!j.is_object()) return invalid_input(what + ": config is not a JSON object");
  Reader r(j, what);
  ModelConfig c;

  const json* mt = r.get("model_type");
  if (!mt) return r.err("model_type", "is missing (supported: llama, mistral, qwen2)");
  if (!mt->is_string()) return r.err("model_type", "must be a string, got " + brief(*mt));
  c.model_type = mt->get<std::string>();
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
    return r.err("model_type",
                 "'" + c.model_type + "' is not supported (supported: llama, mistral, qwen2)");

  QCAL_RETURN_IF_ERROR(r.pos_int("hidden_size", &c.hidden_size, kMaxDim, true));
  QCAL_RETURN_IF_ERROR(r.pos_int("intermediate_size", &c.intermediate_size, kMaxDim, true));
  QCAL_RETURN_IF_ERROR(r.pos_int("num_hidden_layers", &c.num_hidden_layers, kMaxLayers, true));
  QCAL_RETURN_IF_ERROR(r.pos_int("num_attention_heads", &c.num_attention_heads, kMaxDim, true));
  QCAL_RETURN_IF_ERROR(r.pos_int("vocab_size", &c.vocab_size, kMaxDim, true));
  c.num_key_value_heads = c.num_attention_heads;
  QCAL_RETURN_IF_ERROR(r.pos_int("num_key_value_heads", &c.num_key_value_heads, kMaxDim, false));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    return r.err("num_key_value_heads", "= " + std::to_string(c.num_key_value_heads) +
                                            " does not divide num_attention_heads = " +
                                            std::to_string(c.num_attention_heads));
  if (r.get("head_dim")) {
    QCAL_RETURN_IF_ERROR(r.pos_int("head_dim", &c.head_dim, kMaxDim, false));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      return r.err("num_attention_heads",
                   "= " + std::to_string(c.num_attention_heads) +
                       " does not divide hidden_size = " + std::to_string(c.hidden_size) +
                       " (and no head_dim is given)");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.q_dim() > kMaxDim)
    return r.err("head_dim",
                 "* num_attention_heads = " + std::to_string(c.q_dim()) + " is implausibly large");
  QCAL_RETURN_IF_ERROR(r.pos_int("max_position_embeddings", &c.max_position_embeddings,
                                 std::numeric_limits<int32_t>::max(), false));
  QCAL_RETURN_IF_ERROR(r.pos_double("rope_theta", &c.rope_theta));
  QCAL_RETURN_IF_ERROR(r.pos_double("rms_norm_eps", &c.rms_norm_eps));

  if (const json* rs = r.get("rope_scaling"))
    return r.err("rope_scaling", "= " + brief(*rs) + " is not supported (only null: plain RoPE)");
  if (const json* act = r.get("hidden_act"); act && *act != "silu")
    return r.err("hidden_act", "= " + brief(*act) + " is not supported (only \"silu\")");
  bool mlp_bias = false;
  QCAL_RETURN_IF_ERROR(r.boolean("mlp_bias", &mlp_bias));
  if (mlp_bias) return r.err("mlp_bias", "= true is not supported");

  QCAL_RETURN_IF_ERROR(r.boolean("tie_word_embeddings", &c.tie_word_embeddings));
  bool has_bias = false;
  QCAL_RETURN_IF_ERROR(r.boolean("attention_bias", &c.attention_bias, &has_bias));
  if (!has_bias && c.model_type == "qwen2") c.attention_bias = true;  // Qwen2 always has q/k/v bias

  // transformers >= 4.56 writes "dtype"; older versions "torch_dtype".
  const char* dtype_field = r.get("torch_dtype") ? "torch_dtype" : "dtype";
  if (const json* td = r.get(dtype_field)) {
    if (!td->is_string()) return r.err(dtype_field, "must be a string, got " + brief(*td));
    auto dt = dtype_from_torch_name(td->get<std::string>());
    if (!dt)
      return r.err(dtype_field,
                   "= " + brief(*td) + " is not supported (float32, float16, bfloat16)");
    c.torch_dtype = *dt;
  }
  QCAL_RETURN_IF_ERROR(r.token_id("bos_token_id", &c.bos_token_id));
  QCAL_RETURN_IF_ERROR(r.token_id("eos_token_id", &c.eos_token_id));
  return c;
}

Result<ModelConfig> load_model_config(const std::string& config_json_path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, read_file(config_json_path));
  if (json_nesting_exceeds(text, kMaxJsonDepth) != std::string::npos)
    return invalid_input(config_json_path + ": JSON nested deeper than " +
                         std::to_string(kMaxJsonDepth) + " levels");
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return invalid_input(config_json_path + ": not valid JSON");
  return parse_model_config(j, config_json_path);
}

}  // namespace qcal

// Synthetic checkpoints: option validation, the per-tensor recipes (stream,
// initialization, outlier rescaling) and the sharded, atomic writer. The
// stream and initialization scheme is specified in synth.h; changing any
// constant here changes every generated file.
#include "worker/engine/synth.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>
#include <tuple>
#include <utility>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

namespace qcal {

namespace {

using json = nlohmann::json;

// Bumped whenever the recipe changes the bits of a generated file.
constexpr int kRecipeVersion = 1;
constexpr double kNormNoise = 0.1;  // γ ~ U[1 - kNormNoise, 1 + kNormNoise]
constexpr double kBiasStd = 0.2;
// Mean square of a residual-stream channel at the final norm of an untied
// model: 1 (token part) + 1 (prior direction) + ~0.4 (all blocks' outputs),
// so that x·u ≈ sqrt(H / kResidualEnergy) there (measured: L = 2..8,
// H = 64..512, the fitted prior gain is 0.96-1.03).
constexpr double kResidualEnergy = 2.4;

// ---------------------------------------------------------------- streams

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// FNV-1a-64 over the little-endian seed bytes followed by `name`.
uint64_t stream_key(uint64_t seed, std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto eat = [&h](unsigned char b) {
    h ^= b;
    h *= 0x100000001b3ull;
  };
  for (int i = 0; i < 8; ++i) eat(static_cast<unsigned char>(seed >> (8 * i)));
  for (char ch : name) eat(static_cast<unsigned char>(ch));
  return h;
}

Rng row_rng(uint64_t key, int64_t row) {
  return Rng(mix64(key ^ mix64(static_cast<uint64_t>(row))));
}

// Runs fn(r0, r1) over [0, rows) on the pool; `cost` (elements per row) keeps
// small tensors on one thread.
void parallel_rows(int64_t rows, int64_t cost, const std::function<void(int64_t, int64_t)>& fn) {
  parallel_for(rows, cost, fn);
}

// k distinct values of [0, n), sorted: a partial Fisher-Yates shuffle.
std::vector<int64_t> choose_channels(uint64_t seed, const char* what, int64_t n, int64_t k) {
  if (k <= 0) return {};
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[static_cast<size_t>(i)] = i;
  Rng rng = row_rng(stream_key(seed, what), 0);
  for (int64_t i = 0; i < k; ++i) {
    int64_t j = i + static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - i)));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  perm.resize(static_cast<size_t>(k));
  std::sort(perm.begin(), perm.end());
  return perm;
}

// ---------------------------------------------------------------- validation

Status check_positive(const char* field, int64_t v) {
  if (v <= 0)
    return invalid_input(std::string(field) + " must be positive, got " + std::to_string(v));
  return Status::ok();
}

Status check_outliers(const OutlierOptions& out, const ModelConfig& c);

// Checks the options and fills the config defaults (kv heads, head_dim).
Result<ModelConfig> resolve(const SynthOptions& o) {
  ModelConfig c = o.config;
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
    return invalid_input("model_type '" + c.model_type +
                         "' is not supported (supported: llama, mistral, qwen2)");
  QCAL_RETURN_IF_ERROR(check_positive("hidden_size", c.hidden_size));
  QCAL_RETURN_IF_ERROR(check_positive("intermediate_size", c.intermediate_size));
  QCAL_RETURN_IF_ERROR(check_positive("num_hidden_layers", c.num_hidden_layers));
  QCAL_RETURN_IF_ERROR(check_positive("num_attention_heads", c.num_attention_heads));
  QCAL_RETURN_IF_ERROR(check_positive("vocab_size", c.vocab_size));
  QCAL_RETURN_IF_ERROR(check_positive("max_position_embeddings", c.max_position_embeddings));
  if (c.num_key_value_heads < 0)
    return invalid_input(
        "num_key_value_heads must be positive (or 0 for num_attention_heads), got " +
        std::to_string(c.num_key_value_heads));
  if (c.num_key_value_heads == 0) c.num_key_value_heads = c.num_attention_heads;
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    return invalid_input(
        "num_key_value_heads = " + std::to_string(c.num_key_value_heads) +
        " does not divide num_attention_heads = " + std::to_string(c.num_attention_heads));
  if (c.head_dim < 0)
    return invalid_input(
        "head_dim must be positive (or 0 for hidden_size / num_attention_heads), got " +
        std::to_string(c.head_dim));
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_attention_heads != 0)
      return invalid_input("num_attention_heads = " + std::to_string(c.num_attention_heads) +
                           " does not divide hidden_size = " + std::to_string(c.hidden_size) +
                           " (and no head_dim is given)");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0)
    return invalid_input("head_dim = " + std::to_string(c.head_dim) +
                         " must be even (RoPE rotates pairs of dimensions)");
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta))
    return invalid_input("rope_theta must be positive, got " + std::to_string(c.rope_theta));
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps))
    return invalid_input("rms_norm_eps must be positive, got " + std::to_string(c.rms_norm_eps));
  if (c.torch_dtype != DType::kF32 && c.torch_dtype != DType::kF16 && c.torch_dtype != DType::kBF16)
    return invalid_input(std::string("torch_dtype ") + dtype_name(c.torch_dtype) +
                         " is not a storage dtype for weights (float32, float16, bfloat16)");
  for (auto [field, id] :
       {std::pair{"bos_token_id", c.bos_token_id}, {"eos_token_id", c.eos_token_id}})
    if (id < 0 || id >= c.vocab_size)
      return invalid_input(std::string(field) + " = " + std::to_string(id) +
                           " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  // The canonical parser must accept what we write (size limits, ...).
  QCAL_ASSIGN_OR_RETURN(ModelConfig parsed, parse_model_config(c.to_json(), "synth config"));
  (void)parsed;

  QCAL_RETURN_IF_ERROR(check_outliers(o.outliers, c));
  if (o.max_shard_bytes == 0) return invalid_input("max_shard_bytes must be positive");
  return c;
}

// Checks outlier options against the (resolved) shapes of `c`.
Status check_outliers(const OutlierOptions& out, const ModelConfig& c) {
  for (auto [field, n, dim, dim_name] :
       {std::tuple{"outliers.norm_channels", out.norm_channels, c.hidden_size, "hidden_size"},
        {"outliers.up_channels", out.up_channels, c.intermediate_size, "intermediate_size"},
        {"outliers.v_channels", out.v_channels, c.kv_dim(), "num_key_value_heads * head_dim"}}) {
    if (n < 0 || n > dim)
      return invalid_input(std::string(field) + " = " + std::to_string(n) + " is outside [0, " +
                           dim_name + " = " + std::to_string(dim) + "]");
  }
  if (out.any() && (!(out.alpha > 0) || !std::isfinite(out.alpha)))
    return invalid_input("outliers.alpha must be positive and finite, got " +
                         std::to_string(out.alpha));
  return Status::ok();
}

OutlierChannels pick_channels(const OutlierOptions& o, uint64_t seed, const ModelConfig& c) {
  OutlierChannels ch;
  ch.norm = choose_channels(seed, "qcal.synth.outliers.norm", c.hidden_size, o.norm_channels);
  ch.up = choose_channels(seed, "qcal.synth.outliers.up", c.intermediate_size, o.up_channels);
  ch.v = choose_channels(seed, "qcal.synth.outliers.v", c.kv_dim(), o.v_channels);
  return ch;
}

// ---------------------------------------------------------------- recipes

enum class Role {
  kEmbed,
  kInputNorm,
  kQ,
  kQBias,
  kK,
  kKBias,
  kV,
  kVBias,
  kO,
  kPostNorm,
  kGate,
  kUp,
  kDown,
  kFinalNorm,
  kLmHead,
  kOther,  // a tensor of an input checkpoint that no recipe knows (inject_outliers)
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;  // (out, in) or (n)
  Role role;
  DType dtype = DType::kF32;  // storage
  int64_t numel() const { return Tensor::count(shape); }
  uint64_t nbytes() const { return static_cast<uint64_t>(numel()) * dtype_size(dtype); }
};

// Every tensor of the model, in file order.
std::vector<TensorSpec> model_specs(const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t Q = c.q_dim(), KV = c.kv_dim();
  std::vector<TensorSpec> s;
  s.push_back({"model.embed_tokens.weight", {V, H}, Role::kEmbed});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "input_layernorm.weight", {H}, Role::kInputNorm});
    s.push_back({p + "self_attn.q_proj.weight", {Q, H}, Role::kQ});
    if (c.attention_bias) s.push_back({p + "self_attn.q_proj.bias", {Q}, Role::kQBias});
    s.push_back({p + "self_attn.k_proj.weight", {KV, H}, Role::kK});
    if (c.attention_bias) s.push_back({p + "self_attn.k_proj.bias", {KV}, Role::kKBias});
    s.push_back({p + "self_attn.v_proj.weight", {KV, H}, Role::kV});
    if (c.attention_bias) s.push_back({p + "self_attn.v_proj.bias", {KV}, Role::kVBias});
    s.push_back({p + "self_attn.o_proj.weight", {H, Q}, Role::kO});
    s.push_back({p + "post_attention_layernorm.weight", {H}, Role::kPostNorm});
    s.push_back({p + "mlp.gate_proj.weight", {I, H}, Role::kGate});
    s.push_back({p + "mlp.up_proj.weight", {I, H}, Role::kUp});
    s.push_back({p + "mlp.down_proj.weight", {H, I}, Role::kDown});
  }
  s.push_back({"model.norm.weight", {H}, Role::kFinalNorm});
  if (!c.tie_word_embeddings) s.push_back({"lm_head.weight", {V, H}, Role::kLmHead});
  for (TensorSpec& t : s) t.dtype = c.torch_dtype;
  return s;
}

// ---------------------------------------------------------------- outlier factors

// The outlier factors of a tensor of role `role` and shape (rows, cols):
// element (r, j) is multiplied by row_mul[r] · col_mul[j] (an empty vector
// means all ones). The one definition of the injection, shared by
// synth_model() and inject_outliers().
void outlier_factors(const ModelConfig& c, const OutlierChannels& ch, double alpha, Role role,
                     int64_t rows, int64_t cols, std::vector<double>* row_mul,
                     std::vector<double>* col_mul) {
  const double a = alpha, inv = 1.0 / alpha;
  auto set = [](std::vector<double>* v, int64_t n, const std::vector<int64_t>& idx, double f) {
    if (idx.empty()) return;
    if (v->empty()) v->assign(static_cast<size_t>(n), 1.0);
    for (int64_t j : idx) (*v)[static_cast<size_t>(j)] *= f;
  };
  switch (role) {
    case Role::kInputNorm:
    case Role::kPostNorm: set(col_mul, cols, ch.norm, a); break;
    case Role::kQ:
    case Role::kK:
    case Role::kGate: set(col_mul, cols, ch.norm, inv); break;
    case Role::kV:
      set(col_mul, cols, ch.norm, inv);
      set(row_mul, rows, ch.v, a);
      break;
    case Role::kVBias: set(col_mul, cols, ch.v, a); break;
    case Role::kUp:
      set(col_mul, cols, ch.norm, inv);
      set(row_mul, rows, ch.up, a);
      break;
    case Role::kDown: set(col_mul, cols, ch.up, inv); break;
    case Role::kO: {
      // Query head h reads KV head h / group; v channel g·d + p feeds
      // o_proj column h·d + p of every such h.
      const int64_t d = c.head_dim;
      const int64_t group = c.num_attention_heads / c.num_key_value_heads;
      std::vector<int64_t> cols_o;
      for (int64_t j : ch.v)
        for (int64_t h = (j / d) * group; h < (j / d + 1) * group; ++h)
          cols_o.push_back(h * d + j % d);
      set(col_mul, cols, cols_o, inv);
      break;
    }
    default: break;
  }
}

class Generator {
 public:
  Generator(const ModelConfig& c, uint64_t seed, OutlierChannels ch, double alpha)
      : c_(c), seed_(seed), ch_(std::move(ch)), alpha_(alpha) {
    const int64_t H = c.hidden_size;
    // The prior direction u: a random unit vector (untied models only).
    u_.resize(static_cast<size_t>(H));
    Rng rng = row_rng(stream_key(seed, "qcal.synth.prior_direction"), 0);
    double n2 = 0;
    for (double& x : u_) {
      x = rng.normal();
      n2 += x * x;
    }
    for (double& x : u_) x /= std::sqrt(n2);
    // Σ_t ln(t+1) / V = lgamma(V+1) / V centers the log-prior.
    mean_log_rank_ =
        std::lgamma(static_cast<double>(c.vocab_size) + 1) / static_cast<double>(c.vocab_size);
  }

  // Fills `out` (numel floats) with the tensor's stored values, before the
  // final rounding to the storage dtype.
  void fill(const TensorSpec& t, std::vector<float>* out) const {
    const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
    const int64_t cols = t.shape.back();
    out->resize(static_cast<size_t>(t.numel()));
    std::vector<double> row_mul, col_mul;
    outlier_factors(c_, ch_, alpha_, t.role, rows, cols, &row_mul, &col_mul);
    const uint64_t key = stream_key(seed_, t.name);
    float* dst = out->data();
    parallel_rows(rows, cols, [&](int64_t r0, int64_t r1) {
      std::vector<double> buf(static_cast<size_t>(cols));
      for (int64_t r = r0; r < r1; ++r) {
        Rng rng = row_rng(key, r);
        base_row(t.role, r, rng, buf.data(), cols);
        const double rm = row_mul.empty() ? 1.0 : row_mul[static_cast<size_t>(r)];
        float* o = dst + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          double v = buf[static_cast<size_t>(j)] * rm;
          if (!col_mul.empty()) v *= col_mul[static_cast<size_t>(j)];
          o[j] = static_cast<float>(v);
        }
      }
    });
  }

 private:
  // The unscaled values of row r (before outlier injection).
  void base_row(Role role, int64_t r, Rng& rng, double* x, int64_t n) const {
    const double H = static_cast<double>(c_.hidden_size);
    const double depth = 1.0 / std::sqrt(2.0 * static_cast<double>(c_.num_hidden_layers));
    switch (role) {
      case Role::kInputNorm:
      case Role::kPostNorm:
      case Role::kFinalNorm:
        for (int64_t j = 0; j < n; ++j) x[j] = 1.0 + kNormNoise * (2.0 * rng.uniform() - 1.0);
        return;
      case Role::kQBias:
      case Role::kKBias:
      case Role::kVBias:
        for (int64_t j = 0; j < n; ++j) x[j] = kBiasStd * rng.normal();
        return;
      case Role::kQ:
      case Role::kK:
      case Role::kV:
      case Role::kGate:
      case Role::kUp:
      case Role::kO:
      case Role::kDown: {
        double sd = 1.0 / std::sqrt(static_cast<double>(n));
        if (role == Role::kO || role == Role::kDown) sd *= depth;
        for (int64_t j = 0; j < n; ++j) x[j] = sd * rng.normal();
        return;
      }
      case Role::kEmbed:
        if (c_.tie_word_embeddings) {
          const double sd = 1.0 / std::sqrt(H);
          for (int64_t j = 0; j < n; ++j) x[j] = sd * rng.normal();
        } else {
          normal_perp_u(rng, x, n, 1.0);
          add_u(x, n, std::sqrt(H));
        }
        return;
      case Role::kOther: break;
      case Role::kLmHead: {
        normal_perp_u(rng, x, n, kSynthLogitScale * std::sqrt(2.0 / H));
        const double prior =
            -kSynthZipfExponent * (std::log(static_cast<double>(r) + 1.0) - mean_log_rank_);
        add_u(x, n, prior / std::sqrt(H / kResidualEnergy));
        return;
      }
    }
  }

  // x = sd · (z − (z·u) u), z ~ N(0, I).
  void normal_perp_u(Rng& rng, double* x, int64_t n, double sd) const {
    double dot = 0;
    for (int64_t j = 0; j < n; ++j) {
      x[j] = rng.normal();
      dot += x[j] * u_[static_cast<size_t>(j)];
    }
    for (int64_t j = 0; j < n; ++j) x[j] = sd * (x[j] - dot * u_[static_cast<size_t>(j)]);
  }
  void add_u(double* x, int64_t n, double a) const {
    for (int64_t j = 0; j < n; ++j) x[j] += a * u_[static_cast<size_t>(j)];
  }

  const ModelConfig& c_;
  uint64_t seed_;
  OutlierChannels ch_;
  double alpha_;
  std::vector<double> u_;  // (H) unit prior direction
  double mean_log_rank_ = 0;
};

// ---------------------------------------------------------------- writing

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

// Greedy split of the specs, in order, into shards of at most `max_bytes`.
std::vector<std::vector<size_t>> plan_shards(const std::vector<TensorSpec>& specs,
                                             uint64_t max_bytes) {
  std::vector<std::vector<size_t>> shards(1);
  uint64_t used = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uint64_t b = specs[i].nbytes();
    if (!shards.back().empty() && used + b > max_bytes) {
      shards.emplace_back();
      used = 0;
    }
    shards.back().push_back(i);
    used += b;
  }
  return shards;
}

Status write_json(const std::string& path, const json& j) {
  return write_file_atomic(path, j.dump(2) + "\n");
}

// Writes the tensors `specs`, in order, as model.safetensors or shards of at
// most `max_shard_bytes` plus model.safetensors.index.json; `write(spec, w)`
// writes one tensor's data to its writer. Every shard carries `metadata`.
using TensorWriteFn = std::function<Status(const TensorSpec&, SafetensorsWriter&)>;
Status write_tensors(const std::string& dir, const std::vector<TensorSpec>& specs,
                     uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata,
                     const TensorWriteFn& write) {
  const auto shards = plan_shards(specs, max_shard_bytes);
  json weight_map = json::object();
  uint64_t total = 0;
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string file =
        shards.size() == 1 ? "model.safetensors" : shard_name(k, shards.size());
    SafetensorsWriter w(join_path(dir, file));
    for (const auto& [key, value] : metadata) w.set_metadata(key, value);
    for (size_t i : shards[k]) w.add(specs[i].name, specs[i].dtype, specs[i].shape);
    QCAL_RETURN_IF_ERROR(w.begin());
    for (size_t i : shards[k]) {
      QCAL_RETURN_IF_ERROR(write(specs[i], w));
      weight_map[specs[i].name] = file;
      total += specs[i].nbytes();
    }
    QCAL_RETURN_IF_ERROR(w.finish());
  }
  if (shards.size() > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    QCAL_RETURN_IF_ERROR(write_json(join_path(dir, "model.safetensors.index.json"), index));
  }
  return Status::ok();
}

json outlier_info(const OutlierOptions& o, const OutlierChannels& ch) {
  return {
      {"alpha", o.alpha}, {"norm_channels", ch.norm}, {"up_channels", ch.up}, {"v_channels", ch.v}};
}

Status write_model(const SynthOptions& o, const ModelConfig& c, const OutlierChannels& ch,
                   const std::string& dir) {
  json info = {{"version", kRecipeVersion}, {"seed", o.seed}};
  if (o.outliers.any()) info["outliers"] = outlier_info(o.outliers, ch);

  Generator gen(c, o.seed, ch, o.outliers.any() ? o.outliers.alpha : 1.0);
  std::vector<float> buf;  // one tensor
  QCAL_RETURN_IF_ERROR(write_tensors(dir, model_specs(c), o.max_shard_bytes,
                                     {{"format", "pt"}, {"qcal.synth", info.dump()}},
                                     [&](const TensorSpec& t, SafetensorsWriter& w) {
                                       gen.fill(t, &buf);
                                       return w.write_f32(buf.data(), buf.size());
                                     }));
  const json cj = c.to_json();
  QCAL_RETURN_IF_ERROR(write_json(join_path(dir, "config.json"), cj));
  json gj = {{"_from_model_config", true},
             {"bos_token_id", c.bos_token_id},
             {"eos_token_id", c.eos_token_id}};
  if (cj.contains("transformers_version")) gj["transformers_version"] = cj["transformers_version"];
  return write_json(join_path(dir, "generation_config.json"), gj);
}

// Removes the staging directory unless it was published.
struct StagingGuard {
  std::string path;
  ~StagingGuard() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

}  // namespace

Result<OutlierChannels> synth_outlier_channels(const SynthOptions& opts) {
  QCAL_ASSIGN_OR_RETURN(ModelConfig c, resolve(opts));
  return pick_channels(opts.outliers, opts.seed, c);
}

Result<OutlierChannels> outlier_channels(const ModelConfig& c, const OutlierOptions& opts,
                                         uint64_t seed) {
  QCAL_RETURN_IF_ERROR(check_outliers(opts, c));
  return pick_channels(opts, seed, c);
}

Status inject_outliers(const std::string& in_dir, const OutlierOptions& opts, uint64_t seed,
                       const std::string& out_dir, bool overwrite) {
  if (out_dir.empty()) return invalid_input("output directory is empty");
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<ModelDir> md, ModelDir::open(in_dir));
  if (md->quantization_config())
    return invalid_input(in_dir +
                         " is a quantized checkpoint; outliers are injected into FP models");
  QCAL_RETURN_IF_ERROR(md->validate_fp_model());
  const ModelConfig& c = md->config();
  if (!opts.any()) return invalid_input("no outlier channels requested");
  QCAL_ASSIGN_OR_RETURN(OutlierChannels ch, outlier_channels(c, opts, seed));
  if (path_exists(out_dir) && !overwrite)
    return invalid_input(out_dir + " already exists (pass overwrite to replace it)");

  // The recipe's tensors in model order, stored as they are in the input; any
  // other tensor of the input is copied through unchanged.
  ModelConfig with_bias = c;  // q/k/v biases are read when present (LlamaModel), so scaled too
  with_bias.attention_bias = c.attention_bias || md->has(layer_prefix(0) + "self_attn.v_proj.bias");
  std::vector<TensorSpec> specs = model_specs(with_bias);
  std::set<std::string> known;
  for (TensorSpec& t : specs) {
    const TensorInfo* info = md->find(t.name);
    if (!info) return invalid_input(in_dir + ": missing tensor " + t.name);
    known.insert(t.name);
    t.dtype = info->dtype;
  }
  for (const std::string& name : md->tensor_names()) {
    if (known.count(name)) continue;
    const TensorInfo* info = md->find(name);
    specs.push_back({name, info->shape, Role::kOther, info->dtype});
  }
  // One file, unless the input is sharded: then shards of at most 2 GiB (synth's default).
  const uint64_t max_shard = path_exists(join_path(in_dir, "model.safetensors.index.json"))
                                 ? (2ull << 30)
                                 : std::numeric_limits<uint64_t>::max() / 2;

  QCAL_ASSIGN_OR_RETURN(std::string staging, make_staging_dir(out_dir));
  StagingGuard guard{staging};
  json info = {{"seed", seed}, {"outliers", outlier_info(opts, ch)}};
  std::vector<float> buf;
  QCAL_RETURN_IF_ERROR(write_tensors(
      staging, specs, max_shard, {{"format", "pt"}, {"qcal.outliers", info.dump()}},
      [&](const TensorSpec& t, SafetensorsWriter& w) -> Status {
        const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
        const int64_t cols = t.shape.empty() ? 1 : t.shape.back();
        std::vector<double> row_mul, col_mul;
        if (t.shape.size() <= 2)
          outlier_factors(c, ch, opts.alpha, t.role, rows, cols, &row_mul, &col_mul);
        const SafetensorsFile* file = nullptr;
        const TensorInfo* ti = md->find(t.name, &file);
        if (row_mul.empty() && col_mul.empty()) return w.write(file->raw(*ti));  // bit-identical
        QCAL_ASSIGN_OR_RETURN(Tensor x, file->read_f32(t.name));
        buf.resize(x.data.size());
        for (int64_t r = 0; r < rows; ++r) {
          const double rm = row_mul.empty() ? 1.0 : row_mul[static_cast<size_t>(r)];
          for (int64_t j = 0; j < cols; ++j) {
            double v = static_cast<double>(x.data[static_cast<size_t>(r * cols + j)]) * rm;
            if (!col_mul.empty()) v *= col_mul[static_cast<size_t>(j)];
            buf[static_cast<size_t>(r * cols + j)] = static_cast<float>(v);
          }
        }
        return w.write_f32(buf.data(), buf.size());
      }));
  QCAL_RETURN_IF_ERROR(write_json(join_path(staging, "config.json"), md->config_json()));
  // Every other file of the input (generation config, tokenizer) is copied.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(in_dir, ec)) {
    const std::string name = e.path().filename().string();
    const bool weights =
        name == "model.safetensors.index.json" ||
        (name.size() >= 12 && name.compare(name.size() - 12, 12, ".safetensors") == 0);
    if (!e.is_regular_file() || name == "config.json" || weights ||
        name.find(".tmp.") != std::string::npos)
      continue;
    QCAL_ASSIGN_OR_RETURN(std::string bytes, read_file(e.path().string()));
    QCAL_RETURN_IF_ERROR(write_file_atomic(join_path(staging, name), bytes));
  }
  if (ec) return io_error(in_dir + ": cannot list: " + ec.message());
  return publish_dir(staging, out_dir, overwrite);
}

Status synth_model(const SynthOptions& opts, const std::string& out_dir) {
  QCAL_ASSIGN_OR_RETURN(ModelConfig c, resolve(opts));
  if (out_dir.empty()) return invalid_input("output directory is empty");
  if (path_exists(out_dir) && !opts.overwrite)
    return invalid_input(out_dir + " already exists (pass overwrite to replace it)");
  const OutlierChannels ch = pick_channels(opts.outliers, opts.seed, c);
  QCAL_ASSIGN_OR_RETURN(std::string staging, make_staging_dir(out_dir));
  StagingGuard guard{staging};
  QCAL_RETURN_IF_ERROR(write_model(opts, c, ch, staging));
  return publish_dir(staging, out_dir, opts.overwrite);
}

std::vector<int32_t> synth_tokens(int64_t count, int64_t vocab, uint64_t seed) {
  if (count <= 0 || vocab <= 0) return {};
  vocab = std::min<int64_t>(vocab, std::numeric_limits<int32_t>::max());
  std::vector<double> cdf(static_cast<size_t>(vocab));
  double acc = 0;
  for (int64_t t = 0; t < vocab; ++t) {
    acc += std::pow(static_cast<double>(t) + 1.0, -kSynthZipfExponent);
    cdf[static_cast<size_t>(t)] = acc;
  }
  Rng rng(mix64(stream_key(seed, "qcal.synth.tokens")));
  std::vector<int32_t> out(static_cast<size_t>(count));
  for (auto& tok : out) {
    const double x = rng.uniform() * acc;
    const int64_t t = std::upper_bound(cdf.begin(), cdf.end(), x) - cdf.begin();
    tok = static_cast<int32_t>(std::min(t, vocab - 1));
  }
  return out;
}

}  // namespace qcal

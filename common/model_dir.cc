#include "common/model_dir.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "common/fsutil.h"
#include "common/json_util.h"
#include "common/log.h"

namespace qcal {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

// Reads and parses a small JSON file (config, index), refusing deep nesting.
Result<json> read_json(const std::string& path) {
  constexpr int kMaxDepth = 64;
  QCAL_ASSIGN_OR_RETURN(std::string text, read_file(path));
  if (json_nesting_exceeds(text, kMaxDepth) != std::string::npos)
    return invalid_input(path + ": JSON nested deeper than " + std::to_string(kMaxDepth) +
                         " levels");
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return invalid_input(path + ": not valid JSON");
  return j;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

const char* const kProjNames[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                   "mlp.down_proj"};

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

std::vector<int64_t> proj_shape(const ModelConfig& c, const std::string& proj) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  if (proj == "self_attn.q_proj") return {c.q_dim(), H};
  if (proj == "self_attn.k_proj" || proj == "self_attn.v_proj") return {c.kv_dim(), H};
  if (proj == "self_attn.o_proj") return {H, c.q_dim()};
  if (proj == "mlp.gate_proj" || proj == "mlp.up_proj") return {I, H};
  if (proj == "mlp.down_proj") return {H, I};
  QCAL_CHECK_MSG(false, ("proj_shape: unknown projection '" + proj + "'").c_str());
  return {};
}

Result<std::unique_ptr<ModelDir>> ModelDir::open(const std::string& dir) {
  if (!is_directory(dir)) return not_found(dir + ": model directory does not exist");
  std::unique_ptr<ModelDir> m(new ModelDir());
  m->dir_ = dir;

  const std::string config_path = join_path(dir, "config.json");
  if (!path_exists(config_path)) return not_found(config_path + ": missing config.json");
  QCAL_ASSIGN_OR_RETURN(m->config_json_, read_json(config_path));
  QCAL_ASSIGN_OR_RETURN(m->config_, parse_model_config(m->config_json_, config_path));

  const std::string single = join_path(dir, kSingleFile);
  const std::string index_path = join_path(dir, kIndexFile);
  std::vector<std::string> all_st;  // every *.safetensors file name in dir, sorted
  {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (ends_with(e.path().filename().string(), ".safetensors"))
        all_st.push_back(e.path().filename().string());
    if (ec) return io_error(dir + ": cannot list: " + ec.message());
    std::sort(all_st.begin(), all_st.end());
  }

  if (path_exists(single)) {
    // transformers loads model.safetensors when present, whatever else is there.
    if (all_st.size() > 1 || path_exists(index_path))
      LOG_WARN << dir << ": using " << kSingleFile << "; ignoring other safetensors files";
    QCAL_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open(single));
    for (const TensorInfo& t : f->header().tensors) m->index_[t.name] = {f.get(), &t};
    m->files_.push_back(std::move(f));
    return m;
  }

  if (!path_exists(index_path)) {
    if (all_st.empty()) return not_found(dir + ": no " + kSingleFile + " or " + kIndexFile);
    std::string names;
    for (const auto& n : all_st) names += (names.empty() ? "" : ", ") + n;
    return invalid_input(dir + ": found " + names + " but no " + kIndexFile +
                         " (a single-file model must be named " + kSingleFile + ")");
  }

  QCAL_ASSIGN_OR_RETURN(json ij, read_json(index_path));
  if (!ij.is_object() || !ij.contains("weight_map") || !ij["weight_map"].is_object())
    return invalid_input(index_path + ": missing \"weight_map\" object");
  const json& wm = ij["weight_map"];
  std::map<std::string, std::string> tensor_to_shard;
  std::set<std::string> shards;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    if (!it.value().is_string())
      return invalid_input(index_path + ": weight_map entry for '" + it.key() +
                           "' is not a file name");
    std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
      return invalid_input(index_path + ": weight_map entry for '" + it.key() + "' names '" +
                           shard + "', not a file in the model directory");
    tensor_to_shard[it.key()] = shard;
    shards.insert(shard);
  }
  if (shards.empty()) return invalid_input(index_path + ": weight_map is empty");

  std::map<std::string, const SafetensorsFile*> by_shard;
  for (const std::string& shard : shards) {
    const std::string p = join_path(dir, shard);
    if (!path_exists(p)) {
      std::string example;
      for (const auto& [t, s] : tensor_to_shard)
        if (s == shard) {
          example = t;
          break;
        }
      return not_found(index_path + ": shard " + shard + " (listed for tensor '" + example +
                       "') does not exist");
    }
    QCAL_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open(p));
    for (const TensorInfo& t : f->header().tensors) {
      auto [it, inserted] = m->index_.emplace(t.name, std::make_pair(f.get(), &t));
      if (!inserted)
        return corrupt(dir + ": tensor '" + t.name + "' appears in two shards, " +
                       fs::path(it->second.first->path()).filename().string() + " and " + shard);
    }
    by_shard[shard] = f.get();
    m->files_.push_back(std::move(f));
  }
  for (const auto& [t, shard] : tensor_to_shard) {
    if (!by_shard[shard]->find(t))
      return corrupt(index_path + ": tensor '" + t + "' is listed in shard " + shard +
                     ", but that shard does not contain it");
  }
  for (const auto& [name, loc] : m->index_)
    if (!tensor_to_shard.count(name))
      LOG_WARN << index_path << ": tensor '" << name << "' in "
               << fs::path(loc.first->path()).filename().string() << " is not listed in weight_map";
  return m;
}

std::optional<nlohmann::json> ModelDir::quantization_config() const {
  auto it = config_json_.find("quantization_config");
  if (it == config_json_.end() || !it->is_object()) return std::nullopt;
  return *it;
}

const TensorInfo* ModelDir::find(const std::string& name, const SafetensorsFile** file) const {
  auto it = index_.find(name);
  if (it == index_.end()) return nullptr;
  if (file) *file = it->second.first;
  return it->second.second;
}

std::vector<std::string> ModelDir::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [n, loc] : index_) names.push_back(n);
  return names;
}

Result<Tensor> ModelDir::read_f32(const std::string& name,
                                  const std::vector<int64_t>& expect_shape) const {
  const SafetensorsFile* f = nullptr;
  const TensorInfo* t = find(name, &f);
  if (!t) return not_found(dir_ + ": missing tensor " + name);
  if (!expect_shape.empty() && t->shape != expect_shape)
    return invalid_input(dir_ + ": tensor " + name + " has shape " + shape_str(t->shape) +
                         ", config implies " + shape_str(expect_shape));
  QCAL_ASSIGN_OR_RETURN(Tensor x, f->read_f32(name));
  // A NaN / Inf weight would surface much later as a NaN loss with no name on
  // it: name the file and the tensor here.
  const int64_t n = x.numel();
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(x.data[k])) {
      std::string at;
      int64_t rest = k;
      for (size_t d = x.shape.size(); d-- > 0;) {
        const int64_t dim = std::max<int64_t>(1, x.shape[d]);
        at = std::to_string(rest % dim) + (at.empty() ? "" : ", " + at);
        rest /= dim;
      }
      return invalid_input(f->path() + ": tensor " + name + " holds a non-finite value (" +
                           (std::isnan(x.data[k]) ? "NaN" : "Inf") + ") at [" + at + "]");
    }
  }
  return x;
}

Status ModelDir::validate_fp_model() const {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  std::vector<std::pair<std::string, std::vector<int64_t>>> expect;
  expect.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    expect.push_back({p + "input_layernorm.weight", {H}});
    expect.push_back({p + "post_attention_layernorm.weight", {H}});
    for (const char* proj : kProjNames) {
      std::vector<int64_t> s = proj_shape(c, proj);
      expect.push_back({p + proj + ".weight", s});
      const std::string ps = proj;
      if (c.attention_bias &&
          (ps == "self_attn.q_proj" || ps == "self_attn.k_proj" || ps == "self_attn.v_proj"))
        expect.push_back({p + proj + ".bias", {s[0]}});
    }
  }
  expect.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) expect.push_back({"lm_head.weight", {V, H}});
  // The other way round: tensors of layers the config does not have (a
  // config.json with fewer layers than the checkpoint would silently make a
  // smaller model).
  int64_t max_layer = -1;
  std::string extra;
  for (const auto& [name, loc] : index_) {
    if (name.rfind("model.layers.", 0) != 0) continue;
    const size_t dot = name.find('.', 13);
    const std::string num =
        name.substr(13, dot == std::string::npos ? std::string::npos : dot - 13);
    if (num.empty() || num.size() > 9 || num.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const int64_t l = std::stoll(num);
    if (l >= c.num_hidden_layers && l > max_layer) {
      max_layer = l;
      extra = name;
    }
  }
  if (max_layer >= 0)
    return invalid_input(dir_ + ": config.json has num_hidden_layers " +
                         std::to_string(c.num_hidden_layers) + " but the checkpoint holds layer " +
                         std::to_string(max_layer) + " (tensor " + extra +
                         "); the config does not describe this checkpoint");

  // Report several problems at once: a wrong config usually breaks many tensors.
  constexpr size_t kMaxListed = 5;
  std::vector<std::string> problems;
  Code first = Code::kOk;
  size_t count = 0;
  auto add = [&](Code code, std::string msg) {
    if (first == Code::kOk) first = code;
    if (problems.size() < kMaxListed) problems.push_back(std::move(msg));
    ++count;
  };
  for (const auto& [name, shape] : expect) {
    const TensorInfo* t = find(name);
    if (!t) {
      add(Code::kNotFound, "missing tensor " + name);
    } else if (t->shape != shape) {
      add(Code::kInvalidInput, "tensor " + name + " has shape " + shape_str(t->shape) +
                                   ", config implies " + shape_str(shape));
    } else if (!is_float_dtype(t->dtype)) {
      add(Code::kInvalidInput,
          "tensor " + name + " has dtype " + dtype_name(t->dtype) + ", expected a float dtype");
    }
  }
  if (count == 0) return Status::ok();
  std::string msg = dir_ + ": ";
  for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
  if (count > problems.size())
    msg += " (and " + std::to_string(count - problems.size()) + " more problems)";
  return Status(first, msg);
}

uint64_t ModelDir::total_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_)
    for (const TensorInfo& t : f->header().tensors) n += t.nbytes();
  return n;
}

}  // namespace qcal

// Inputs of the assemble task for tests (test_assemble_stream, test_assemble_memory),
// drawn from common/rng.h: a generated BF16 checkpoint and block results (qcal.block
// v1), SpinQuant's rotations, the IntactKV prefix states and +Cal's trained cache.
// Letters: H hidden, K = n_kv·d, P IntactKV prefix length.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/plan.h"
#include "common/recipe.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "worker/artifacts.h"
#include "worker/calib/block.h"

namespace qcal::assemble_fixture {

namespace fs = std::filesystem;
using json = nlohmann::json;

// FNV-1a-64 of `seed` then `name`: one random stream per tensor.
inline uint64_t stream_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto feed = [&](unsigned char b) { h = (h ^ b) * 0x100000001b3ull; };
  for (int i = 0; i < 8; ++i) feed(static_cast<unsigned char>(seed >> (8 * i)));
  for (char ch : name) feed(static_cast<unsigned char>(ch));
  return h;
}

inline std::vector<float> normal_values(uint64_t seed, const std::string& name, int64_t n,
                                        double mean, double sd) {
  Rng rng(stream_seed(seed, name));
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(mean + sd * rng.normal());
  return v;
}

// config.json, model.safetensors (BF16, model order), generation_config.json,
// tokenizer.json.
inline void write_source(const std::string& dir, const ModelConfig& c) {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  t.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    t.push_back({p + "input_layernorm.weight", {H}});
    t.push_back({p + "post_attention_layernorm.weight", {H}});
    for (int k = 0; k < 7; ++k) {
      const std::vector<int64_t> s = proj_shape(c, kProjNames[k]);
      t.push_back({p + kProjNames[k] + ".weight", s});
      if (k < 3 && c.attention_bias) t.push_back({p + kProjNames[k] + ".bias", {s[0]}});
    }
  }
  t.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {V, H}});
  SafetensorsWriter w(join_path(dir, "model.safetensors"));
  w.set_metadata("format", "pt");
  for (const auto& [name, shape] : t) w.add(name, c.torch_dtype, shape);
  ASSERT_TRUE(w.begin().is_ok());
  for (const auto& [name, shape] : t) {
    const bool norm = name.ends_with("norm.weight");
    const std::vector<float> v =
        normal_values(11, name, Tensor::count(shape), norm ? 1.0 : 0.0, norm ? 0.2 : 0.05);
    ASSERT_TRUE(w.write_f32(v.data(), v.size()).is_ok()) << name;
  }
  ASSERT_TRUE(w.finish().is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "config.json"), c.to_json().dump(2) + "\n").is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "generation_config.json"),
                                R"({"bos_token_id": 1, "eos_token_id": 2})")
                  .is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "tokenizer.json"),
                                R"({"version": "1.0", "model": {"type": "BPE"}})")
                  .is_ok());
}

// ---------------------------------------------------------------- the inputs

// Which online transforms a case's blocks carry, with their sides.
inline std::map<std::string, int64_t> online_of(const std::string& transform, const ModelConfig& c,
                                                bool online) {
  if (!online) return {};
  if (transform == "quarot")
    return {{"po", c.num_attention_heads},
            {"d1", c.intermediate_size},
            {"pk", c.head_dim},
            {"pk_it", c.head_dim}};
  if (transform == "flatquant")
    return {{"a1", 8}, {"a2", 8},  {"u1", 8},          {"u2", 8},
            {"d1", 8}, {"d2", 16}, {"pk", c.head_dim}, {"pk_it", c.head_dim}};
  return {};
}

inline void set_online(calib::BlockTransformsT<float>* t, const std::string& name,
                       std::vector<float> m) {
  if (name == "a1") t->a1 = std::move(m);
  if (name == "a2") t->a2 = std::move(m);
  if (name == "u1") t->u1 = std::move(m);
  if (name == "u2") t->u2 = std::move(m);
  if (name == "d1") t->d1 = std::move(m);
  if (name == "d2") t->d2 = std::move(m);
  if (name == "po") t->po = std::move(m);
  if (name == "pk") t->pk = std::move(m);
  if (name == "pk_it") t->pk_it = std::move(m);
}

// A consistent quantized linear (O, I) of its own stream: codes in [0, 2^b − 1],
// fp16-representable scales, zeros 2^(b−1) when symmetric, g_idx permuted groups
// under act-order.
inline QuantizedLinear make_linear(int64_t O, int64_t I, const QuantSpec& spec, bool act_order,
                                   uint64_t seed, const std::string& name) {
  Rng rng(stream_seed(seed, name));
  QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec = spec;
  q.act_order = act_order;
  const int64_t gs = spec.group_size > 0 && spec.group_size < I ? spec.group_size : I;
  const int64_t G = (I + gs - 1) / gs;
  const int maxq = (1 << spec.bits) - 1;
  q.q.resize(static_cast<size_t>(O * I));
  for (auto& v : q.q) v = static_cast<uint8_t>(rng.below(static_cast<uint64_t>(maxq) + 1));
  q.scales.resize(static_cast<size_t>(G * O));
  for (auto& s : q.scales)
    s = round_to_dtype(static_cast<float>(1e-3 + 0.05 * rng.uniform()), DType::kF16);
  q.zeros.resize(static_cast<size_t>(G * O));
  for (auto& z : q.zeros)
    z = spec.sym ? (1 << (spec.bits - 1))
                 : static_cast<int32_t>(rng.below(static_cast<uint64_t>(maxq) + 1));
  q.g_idx.resize(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) q.g_idx[i] = static_cast<int32_t>(i / gs);
  if (act_order)
    for (int64_t i = I - 1; i > 0; --i)
      std::swap(q.g_idx[i], q.g_idx[rng.below(static_cast<uint64_t>(i) + 1)]);
  return q;
}

// What the generated block results carry besides the recipe's quantized linears.
struct BlockStyle {
  bool act_order = false;  // g_idx permuted
  bool online = false;     // online transforms and act/K/V quantizers
};

inline calib::NativeActQuant act_quant(int bits, bool sym, int64_t group, float clip) {
  calib::NativeActQuant a;
  a.bits = bits;
  a.sym = sym;
  a.group = group;
  a.clip = clip;
  return a;
}

// Block result l of a case: its linears at the recipe's bits / group / symmetry,
// norms, biases, online transforms and quantizers, and the FP prefix K/V.
inline calib::BlockResult make_block(const BlockStyle& k, const Recipe& r, const ModelConfig& c,
                                     int64_t l) {
  const uint64_t seed = 100 + static_cast<uint64_t>(l);
  calib::BlockResult b;
  b.layer = l;
  b.w_bits = r.w_bits();
  QuantSpec spec;
  spec.bits = r.w_bits();
  spec.group_size = r.w_group() > 0 ? r.w_group() : -1;
  spec.sym = r.w_sym();
  for (int p = 0; p < calib::kNumProj; ++p) {
    const std::vector<int64_t> s = proj_shape(c, kProjNames[p]);
    b.q[p] = make_linear(s[0], s[1], spec, k.act_order, seed, kProjNames[p]);
  }
  const int64_t H = c.hidden_size, K = c.kv_dim();
  b.input_norm = normal_values(seed, "input_norm", H, 1.0, 0.3);
  b.post_norm = normal_values(seed, "post_norm", H, 1.0, 0.3);
  if (c.attention_bias) {
    b.bias[0] = normal_values(seed, "q_bias", c.q_dim(), 0.0, 0.1);
    b.bias[1] = normal_values(seed, "k_bias", K, 0.0, 0.1);
    b.bias[2] = normal_values(seed, "v_bias", K, 0.0, 0.1);
  }
  for (const auto& [name, side] : online_of(r.transform(), c, k.online))
    set_online(&b.online, name, normal_values(seed, "online." + name, side * side, 0.0, 0.2));
  if (k.online) {
    for (int p = 0; p < calib::kNumProj; ++p) b.act[p] = act_quant(r.a_bits(), true, -1, 0.9f);
    b.k = act_quant(r.kv_bits(), false, c.head_dim, 0.95f);
    b.v = act_quant(r.kv_bits(), false, c.head_dim, 1.0f);
  }
  if (r.intactkv()) {
    const int64_t P = static_cast<int64_t>(r.intactkv_prefix_for(c).size());
    b.prefix_k = normal_values(seed, "prefix_k", P * K, 0.0, 1.0);
    b.prefix_v = normal_values(seed, "prefix_v", P * K, 0.0, 1.0);
  }
  b.report = {{"layer", l}};
  return b;
}

// ArtifactRef of a file already under the store.
inline ArtifactRef ref_of(const ArtifactStore& store, const std::string& rel) {
  auto d = sha256_file(store.absolute(rel));
  EXPECT_TRUE(d.is_ok()) << d.status().to_string();
  return ArtifactRef{rel, d.is_ok() ? d->sha256 : std::string(64, '0'), d.is_ok() ? d->bytes : 0};
}

// Writes every input the assemble of `k` reads into `store`; returns the results of
// its deps by task id, and the deps in `deps`.
inline std::map<std::string, json> make_inputs(const BlockStyle& k, const Recipe& r,
                                               const ModelConfig& c, ArtifactStore* store,
                                               std::vector<std::string>* deps) {
  std::map<std::string, json> results;
  const int64_t L = c.num_hidden_layers, H = c.hidden_size, K = c.kv_dim();
  for (int64_t l = 0; l < L; ++l) {
    const std::string id = plan::numbered(plan::kQuantize, l);
    const std::string rel =
        task_artifact_path("job", id, 1, plan::block_artifact(l) + ".safetensors");
    fs::create_directories(fs::path(store->absolute(rel)).parent_path());
    EXPECT_TRUE(calib::save_block_result(make_block(k, r, c, l), c, store->absolute(rel)).is_ok());
    results[id] = {{"artifacts", {{plan::block_artifact(l), ref_of(*store, rel).to_json()}}}};
    deps->push_back(id);
  }
  if (r.transform() == "spinquant") {
    calib::Fitted f;
    const std::vector<float> R1 = normal_values(7, "R1", H * H, 0.0, 0.125);
    f.arrays["R1"] = std::vector<double>(R1.begin(), R1.end());
    for (int64_t l = 0; l < L; ++l) {
      const std::string n = "R2." + std::to_string(l);
      const std::vector<float> R2 = normal_values(7, n, c.head_dim * c.head_dim, 0.0, 0.25);
      f.arrays[n] = std::vector<double>(R2.begin(), R2.end());
    }
    const std::string rel = task_artifact_path("job", "spinquant", 1, "rotations.safetensors");
    fs::create_directories(fs::path(store->absolute(rel)).parent_path());
    EXPECT_TRUE(calib::save_fitted(f, store->absolute(rel)).is_ok());
    results["spinquant"] = {{"artifacts", {{"rotations", ref_of(*store, rel).to_json()}}}};
    deps->push_back("spinquant");
  }
  if (r.intactkv()) {
    const int64_t P = static_cast<int64_t>(r.intactkv_prefix_for(c).size());
    if (r.b("intactkv_cal")) {
      calib::Fitted f;
      for (int64_t l = 0; l < L; ++l)
        for (const char* kv : {"k.", "v."}) {
          const std::string n = kv + std::to_string(l);
          const std::vector<float> v = normal_values(9, n, P * K, 0.0, 1.0);
          f.arrays[n] = std::vector<double>(v.begin(), v.end());
        }
      const std::string rel = task_artifact_path("job", "intactkv-cal", 1, "prefix_kv.safetensors");
      fs::create_directories(fs::path(store->absolute(rel)).parent_path());
      EXPECT_TRUE(calib::save_fitted(f, store->absolute(rel)).is_ok());
      results["intactkv-cal"] = {{"artifacts", {{"prefix_kv", ref_of(*store, rel).to_json()}}}};
      deps->push_back("intactkv-cal");
    }
    const std::string id = plan::numbered(plan::kCapture, L - 1);
    auto w =
        store->create_activations(task_artifact_path("job", id, 1, "prefix.safetensors"), 1, P, H);
    EXPECT_TRUE(w.is_ok());
    const std::vector<float> x = normal_values(13, "prefix", P * H, 0.0, 2.0);
    EXPECT_TRUE((*w)->append(x.data(), 1).is_ok());
    auto ref = (*w)->finish();
    EXPECT_TRUE(ref.is_ok());
    results[id] = {{"artifacts", {{"prefix", ref->to_json()}}}};
    deps->push_back(id);
  }
  return results;
}

}  // namespace qcal::assemble_fixture

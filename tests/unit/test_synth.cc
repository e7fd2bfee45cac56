// Tests of the synthetic model generator: determinism, HF layout (single file
// and sharded, llama / qwen2 bias / tied), validation, initialization
// statistics, and that outlier injection leaves the logits unchanged while
// the activations really carry outlier channels.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_config.h"
#include "common/model_dir.h"
#include "common/safetensors.h"
#include "tests/unit/test_util.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;

// The test's temporary directories: `<tmp>/qcal_synth_XXXXXX`.
class TempDir : public ::qcal::testing::TempDir {
 public:
  TempDir() : ::qcal::testing::TempDir("qcal_synth_") {}
};

ModelConfig small_config() {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 257;
  c.torch_dtype = DType::kF32;
  return c;
}

// The model of the invariance tests: 2 layers, H=128, 4 heads, 2 kv heads,
// I=256, V=257, F32.
ModelConfig invariance_config() {
  ModelConfig c = small_config();
  c.hidden_size = 128;
  c.intermediate_size = 256;
  return c;
}

// Every file of a directory (name -> bytes).
std::map<std::string, std::string> read_dir(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    auto bytes = read_file(e.path().string());
    EXPECT_TRUE(bytes.is_ok()) << bytes.status().to_string();
    if (bytes.is_ok()) files[e.path().filename().string()] = *bytes;
  }
  return files;
}

std::string synth_or_die(const SynthOptions& o, const std::string& dir) {
  Status s = synth_model(o, dir);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  return dir;
}

Tensor read_tensor(const std::string& dir, const std::string& name) {
  auto md = ModelDir::open(dir);
  EXPECT_TRUE(md.is_ok()) << md.status().to_string();
  if (!md.is_ok()) return {};
  auto t = (*md)->read_f32(name);
  EXPECT_TRUE(t.is_ok()) << t.status().to_string();
  return t.is_ok() ? *t : Tensor{};
}

double stddev(const Tensor& t) {
  double s = 0, s2 = 0;
  for (float v : t.data) {
    s += v;
    s2 += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(t.data.size());
  return std::sqrt(std::max(0.0, s2 / n - (s / n) * (s / n)));
}

TokenSequences synth_sequences(int64_t count, int64_t T, int64_t vocab, uint64_t seed) {
  TokenSequences seqs;
  seqs.seqlen = T;
  seqs.tokens = synth_tokens(count * T, vocab, seed);
  return seqs;
}

// ---------------------------------------------------------------- files

TEST(Synth, SameOptionsGiveByteIdenticalFiles) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  o.seed = 7;
  o.outliers.norm_channels = 3;
  o.outliers.up_channels = 2;
  o.outliers.v_channels = 2;
  auto a = read_dir(synth_or_die(o, tmp.sub("a")));
  auto b = read_dir(synth_or_die(o, tmp.sub("b")));
  // config.json, generation_config.json, model.safetensors, .qcal-output.json
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a, b);

  o.max_shard_bytes = 40000;  // sharded
  auto c = read_dir(synth_or_die(o, tmp.sub("c")));
  auto d = read_dir(synth_or_die(o, tmp.sub("d")));
  EXPECT_GT(c.size(), 4u);
  EXPECT_EQ(c, d);
}

TEST(Synth, DifferentSeedGivesDifferentWeights) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  o.seed = 1;
  synth_or_die(o, tmp.sub("s1"));
  o.seed = 2;
  synth_or_die(o, tmp.sub("s2"));
  for (const char* name : {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                           "model.norm.weight", "lm_head.weight"}) {
    Tensor a = read_tensor(tmp.sub("s1"), name), b = read_tensor(tmp.sub("s2"), name);
    ASSERT_EQ(a.shape, b.shape) << name;
    int64_t same = 0;
    for (size_t i = 0; i < a.data.size(); ++i) same += a.data[i] == b.data[i];
    EXPECT_EQ(same, 0) << name;
  }
}

TEST(Synth, TensorValuesDependOnlyOnSeedNameAndOwnShape) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  synth_or_die(o, tmp.sub("a"));
  o.config.intermediate_size = 96;
  o.config.num_hidden_layers = 3;
  synth_or_die(o, tmp.sub("b"));
  for (const char* name : {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                           "model.layers.1.input_layernorm.weight", "lm_head.weight"}) {
    Tensor a = read_tensor(tmp.sub("a"), name), b = read_tensor(tmp.sub("b"), name);
    EXPECT_EQ(a.data, b.data) << name;
  }
}

TEST(Synth, ConfigParsesBackWithTheSameShapes) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  o.config.num_key_value_heads = 0;  // default: n_h
  o.config.head_dim = 0;             // default: H / n_h
  o.config.bos_token_id = 5;
  o.config.eos_token_id = 6;
  o.config.torch_dtype = DType::kBF16;
  synth_or_die(o, tmp.sub("m"));
  auto c = load_model_config(tmp.sub("m/config.json"));
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->intermediate_size, 128);
  EXPECT_EQ(c->num_hidden_layers, 2);
  EXPECT_EQ(c->num_attention_heads, 4);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->vocab_size, 257);
  EXPECT_EQ(c->torch_dtype, DType::kBF16);
  EXPECT_FALSE(c->tie_word_embeddings);
  auto g = read_file(tmp.sub("m/generation_config.json"));
  ASSERT_TRUE(g.is_ok());
  auto gj = nlohmann::json::parse(*g);
  EXPECT_EQ(gj["bos_token_id"], 5);
  EXPECT_EQ(gj["eos_token_id"], 6);
}

struct Variant {
  const char* name;
  const char* model_type;
  bool tie;
  bool attention_bias;
  uint64_t max_shard_bytes;
};

class SynthVariant : public ::testing::TestWithParam<Variant> {};

TEST_P(SynthVariant, OpensAndValidatesAsFpModel) {
  const Variant& v = GetParam();
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  o.config.model_type = v.model_type;
  o.config.tie_word_embeddings = v.tie;
  o.config.attention_bias = v.attention_bias;
  o.max_shard_bytes = v.max_shard_bytes;
  o.outliers.v_channels = 3;  // exercises the v bias scaling for qwen2
  const std::string dir = synth_or_die(o, tmp.sub("m"));
  auto md = ModelDir::open(dir);
  ASSERT_TRUE(md.is_ok()) << md.status().to_string();
  Status s = (*md)->validate_fp_model();
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ((*md)->config().model_type, v.model_type);
  EXPECT_EQ((*md)->config().attention_bias, v.attention_bias);

  const int64_t per_layer = 9 + (v.attention_bias ? 3 : 0);
  const size_t expect_tensors = 2 + 2 * per_layer + (v.tie ? 0 : 1);
  EXPECT_EQ((*md)->tensor_names().size(), expect_tensors);
  EXPECT_EQ((*md)->has("lm_head.weight"), !v.tie);
  EXPECT_EQ((*md)->has("model.layers.1.self_attn.k_proj.bias"), v.attention_bias);
  EXPECT_EQ((*md)->total_bytes(), static_cast<uint64_t>((*md)->config().num_parameters()) * 4);

  const bool sharded = v.max_shard_bytes < (*md)->total_bytes();
  EXPECT_EQ(path_exists(dir + "/model.safetensors.index.json"), sharded);
  EXPECT_EQ(path_exists(dir + "/model.safetensors"), !sharded);
  if (sharded) {
    auto text = read_file(dir + "/model.safetensors.index.json");
    ASSERT_TRUE(text.is_ok());
    auto index = nlohmann::json::parse(*text);
    EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), (*md)->total_bytes());
    EXPECT_EQ(index["weight_map"].size(), expect_tensors);
    // No shard above the limit unless it holds a single tensor.
    std::map<std::string, int> per_file;
    for (auto& [name, file] : index["weight_map"].items()) per_file[file.get<std::string>()]++;
    EXPECT_GT(per_file.size(), 1u);
    for (auto& [file, n] : per_file) {
      const uint64_t size = fs::file_size(dir + "/" + file);
      if (n > 1) {
        EXPECT_LT(size, v.max_shard_bytes + 4096) << file;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, SynthVariant,
    ::testing::Values(Variant{"llama_single", "llama", false, false, 2ull << 30},
                      Variant{"llama_sharded", "llama", false, false, 60000},
                      Variant{"qwen2_bias_single", "qwen2", false, true, 2ull << 30},
                      Variant{"qwen2_bias_sharded", "qwen2", false, true, 60000},
                      Variant{"tied_single", "llama", true, false, 2ull << 30},
                      Variant{"tied_sharded", "mistral", true, false, 60000}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Synth, StorageDtypeFollowsTorchDtype) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  synth_or_die(o, tmp.sub("f32"));
  for (DType dt : {DType::kF16, DType::kBF16}) {
    o.config.torch_dtype = dt;
    const std::string dir = synth_or_die(o, tmp.sub(dtype_name(dt)));
    auto md = ModelDir::open(dir);
    ASSERT_TRUE(md.is_ok()) << md.status().to_string();
    for (const std::string& name : (*md)->tensor_names()) EXPECT_EQ((*md)->find(name)->dtype, dt);
    // The same values, rounded once to the storage dtype.
    Tensor ref = read_tensor(tmp.sub("f32"), "model.layers.0.mlp.up_proj.weight");
    Tensor got = read_tensor(dir, "model.layers.0.mlp.up_proj.weight");
    ASSERT_EQ(ref.shape, got.shape);
    for (size_t i = 0; i < ref.data.size(); ++i)
      ASSERT_EQ(got.data[i], round_to_dtype(ref.data[i], dt)) << dtype_name(dt) << " at " << i;
  }
}

TEST(Synth, RejectsInvalidOptionsWithAMessage) {
  struct Case {
    const char* expect;  // substring of the message
    std::function<void(SynthOptions&)> mutate;
  };
  const std::vector<Case> cases = {
      {"model_type 'gpt2' is not supported", [](SynthOptions& o) { o.config.model_type = "gpt2"; }},
      {"hidden_size must be positive", [](SynthOptions& o) { o.config.hidden_size = 0; }},
      {"intermediate_size must be positive",
       [](SynthOptions& o) { o.config.intermediate_size = -4; }},
      {"num_hidden_layers must be positive",
       [](SynthOptions& o) { o.config.num_hidden_layers = 0; }},
      {"vocab_size must be positive", [](SynthOptions& o) { o.config.vocab_size = 0; }},
      {"does not divide hidden_size",
       [](SynthOptions& o) {
         o.config.num_attention_heads = 3;
         o.config.num_key_value_heads = 1;
       }},
      {"num_key_value_heads = 3 does not divide num_attention_heads = 4",
       [](SynthOptions& o) { o.config.num_key_value_heads = 3; }},
      {"head_dim = 15 must be even", [](SynthOptions& o) { o.config.head_dim = 15; }},
      {"torch_dtype I8", [](SynthOptions& o) { o.config.torch_dtype = DType::kI8; }},
      {"eos_token_id = 300 is outside the vocabulary",
       [](SynthOptions& o) { o.config.eos_token_id = 300; }},
      {"outliers.norm_channels = 65 is outside [0, hidden_size = 64]",
       [](SynthOptions& o) { o.outliers.norm_channels = 65; }},
      {"outliers.v_channels = 33", [](SynthOptions& o) { o.outliers.v_channels = 33; }},
      {"outliers.up_channels = -1", [](SynthOptions& o) { o.outliers.up_channels = -1; }},
      {"outliers.alpha must be positive",
       [](SynthOptions& o) {
         o.outliers.up_channels = 1;
         o.outliers.alpha = 0;
       }},
      {"max_shard_bytes must be positive", [](SynthOptions& o) { o.max_shard_bytes = 0; }},
  };
  TempDir tmp;
  for (const Case& k : cases) {
    SynthOptions o;
    o.config = small_config();
    k.mutate(o);
    Status s = synth_model(o, tmp.sub("m"));
    EXPECT_EQ(s.code(), Code::kInvalidInput) << k.expect << ": " << s.to_string();
    EXPECT_NE(s.message().find(k.expect), std::string::npos) << s.message();
    EXPECT_FALSE(path_exists(tmp.sub("m")));
    EXPECT_EQ(synth_outlier_channels(o).status().code(), Code::kInvalidInput);
  }
}

TEST(Synth, RefusesAnExistingDirectoryUnlessOverwrite) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  synth_or_die(o, tmp.sub("m"));
  o.seed = 9;
  Status s = synth_model(o, tmp.sub("m"));
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_NE(s.message().find("already exists"), std::string::npos) << s.message();
  o.overwrite = true;
  EXPECT_TRUE(synth_model(o, tmp.sub("m")).is_ok());
  auto md = ModelDir::open(tmp.sub("m"));
  ASSERT_TRUE(md.is_ok());
  auto meta = (*md)->find("model.norm.weight");
  ASSERT_NE(meta, nullptr);
  // No staging directory is left behind.
  for (const auto& e : fs::directory_iterator(tmp.sub("")))
    EXPECT_EQ(e.path().filename().string().find(".partial"), std::string::npos);
}

// ---------------------------------------------------------------- init

TEST(Synth, InitializationScales) {
  TempDir tmp;
  SynthOptions o;
  o.config = invariance_config();
  o.config.num_hidden_layers = 4;
  const std::string dir = synth_or_die(o, tmp.sub("m"));
  const double H = 128, I = 256, L = 4;
  struct Expect {
    const char* name;
    double sd;
  };
  for (const Expect& e : {Expect{"model.layers.0.self_attn.q_proj.weight", 1 / std::sqrt(H)},
                          {"model.layers.2.self_attn.v_proj.weight", 1 / std::sqrt(H)},
                          {"model.layers.1.mlp.gate_proj.weight", 1 / std::sqrt(H)},
                          {"model.layers.3.self_attn.o_proj.weight", 1 / std::sqrt(H * 2 * L)},
                          {"model.layers.3.mlp.down_proj.weight", 1 / std::sqrt(I * 2 * L)}}) {
    Tensor t = read_tensor(dir, e.name);
    EXPECT_NEAR(stddev(t), e.sd, 0.05 * e.sd) << e.name;
  }
  for (const char* name : {"model.layers.0.input_layernorm.weight",
                           "model.layers.3.post_attention_layernorm.weight", "model.norm.weight"}) {
    Tensor t = read_tensor(dir, name);
    auto [lo, hi] = std::minmax_element(t.data.begin(), t.data.end());
    EXPECT_GE(*lo, 0.9f) << name;
    EXPECT_LE(*hi, 1.1f) << name;
    EXPECT_GT(*hi - *lo, 0.1f) << name;  // not trivially 1
  }
  // Embedding rows: unit-variance token part plus the shared prior direction.
  Tensor emb = read_tensor(dir, "model.embed_tokens.weight");
  EXPECT_NEAR(stddev(emb), std::sqrt(2.0), 0.15);
}

// ---------------------------------------------------------------- tokens

TEST(SynthTokens, DeterministicInRangeAndZipfSkewed) {
  const int64_t V = 1000, N = 200000;
  auto a = synth_tokens(N, V, 3);
  EXPECT_EQ(a, synth_tokens(N, V, 3));
  EXPECT_NE(a, synth_tokens(N, V, 4));
  ASSERT_EQ(a.size(), static_cast<size_t>(N));
  std::vector<int64_t> freq(V);
  for (int32_t t : a) {
    ASSERT_GE(t, 0);
    ASSERT_LT(t, V);
    freq[t]++;
  }
  double z = 0;
  for (int64_t t = 0; t < V; ++t) z += std::pow(t + 1.0, -kSynthZipfExponent);
  for (int64_t t : {0, 1, 9}) {
    const double p = std::pow(t + 1.0, -kSynthZipfExponent) / z;
    EXPECT_NEAR(static_cast<double>(freq[t]) / N, p, 5 * std::sqrt(p / N)) << "token " << t;
  }
  EXPECT_TRUE(synth_tokens(0, V, 1).empty());
  EXPECT_TRUE(synth_tokens(10, 0, 1).empty());
}

// ---------------------------------------------------------------- outliers

TEST(SynthOutliers, ChannelsAreDeterministicDistinctAndRecorded) {
  SynthOptions o;
  o.config = invariance_config();
  o.outliers.norm_channels = 5;
  o.outliers.up_channels = 7;
  o.outliers.v_channels = 3;
  auto ch = synth_outlier_channels(o);
  ASSERT_TRUE(ch.is_ok()) << ch.status().to_string();
  auto check = [](const std::vector<int64_t>& v, size_t n, int64_t dim) {
    ASSERT_EQ(v.size(), n);
    EXPECT_TRUE(std::is_sorted(v.begin(), v.end()));
    EXPECT_EQ(std::adjacent_find(v.begin(), v.end()), v.end());
    for (int64_t j : v) {
      EXPECT_GE(j, 0);
      EXPECT_LT(j, dim);
    }
  };
  check(ch->norm, 5, 128);
  check(ch->up, 7, 256);
  check(ch->v, 3, 64);
  auto again = synth_outlier_channels(o);
  EXPECT_EQ(ch->norm, again->norm);
  o.seed = 2;
  EXPECT_NE(ch->up, synth_outlier_channels(o)->up);
  o.seed = 1;

  TempDir tmp;
  const std::string dir = synth_or_die(o, tmp.sub("m"));
  auto f = SafetensorsFile::open(dir + "/model.safetensors");
  ASSERT_TRUE(f.is_ok());
  const auto& meta = (*f)->header().metadata;
  ASSERT_EQ(meta.count("qcal.synth"), 1u);
  EXPECT_EQ(meta.at("format"), "pt");
  auto info = nlohmann::json::parse(meta.at("qcal.synth"));
  EXPECT_EQ(info["outliers"]["norm_channels"].get<std::vector<int64_t>>(), ch->norm);
  EXPECT_EQ(info["outliers"]["up_channels"].get<std::vector<int64_t>>(), ch->up);
  EXPECT_EQ(info["outliers"]["v_channels"].get<std::vector<int64_t>>(), ch->v);
}

// Per-channel max |x| over all rows, at the input of each projection of each
// layer: absmax[layer][proj] = (in).
using ChannelMax = std::vector<std::map<std::string, std::vector<double>>>;

ChannelMax activation_absmax(const LlamaModel& m, const TokenSequences& seqs) {
  const ModelConfig& c = m.config();
  ChannelMax out(static_cast<size_t>(c.num_hidden_layers));
  auto x = m.embed(seqs, 0, seqs.count());
  EXPECT_TRUE(x.is_ok()) << x.status().to_string();
  if (!x.is_ok()) return out;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto w = m.load_layer(l);
    EXPECT_TRUE(w.is_ok()) << w.status().to_string();
    if (!w.is_ok()) return out;
    auto& per_proj = out[static_cast<size_t>(l)];
    block_forward(c, *w, x->ptr(), seqs.count(), seqs.seqlen,
                  [&](const std::string& proj, const float* a, int64_t rows, int64_t in) {
                    auto& mx = per_proj[proj];
                    mx.assign(static_cast<size_t>(in), 0.0);
                    for (int64_t r = 0; r < rows; ++r)
                      for (int64_t j = 0; j < in; ++j)
                        mx[static_cast<size_t>(j)] =
                            std::max(mx[static_cast<size_t>(j)], std::fabs(double(a[r * in + j])));
                  });
  }
  return out;
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

// How much the `channels` stand out: each one's absmax over the median
// channel's, and the largest absmax among the other channels (same units).
struct OutlierStats {
  double min_ratio, median_ratio, max_other;
};
OutlierStats outlier_stats(const std::vector<double>& absmax,
                           const std::vector<int64_t>& channels) {
  const double med = median(absmax);
  std::vector<double> ratios;
  for (int64_t j : channels) ratios.push_back(absmax[static_cast<size_t>(j)] / med);
  double max_other = 0;
  for (size_t j = 0; j < absmax.size(); ++j)
    if (!std::binary_search(channels.begin(), channels.end(), static_cast<int64_t>(j)))
      max_other = std::max(max_other, absmax[j] / med);
  return {*std::min_element(ratios.begin(), ratios.end()), median(ratios), max_other};
}

struct InjectionCase {
  const char* name;
  int64_t norm, up, v;
};

class SynthInjection : public ::testing::TestWithParam<InjectionCase> {};

// The injected model computes the same function (logits equal to float
// rounding) while its activations carry outlier channels.
TEST_P(SynthInjection, PreservesLogitsAndCreatesOutliers) {
  const InjectionCase& k = GetParam();
  TempDir tmp;
  SynthOptions o;
  o.config = invariance_config();
  o.seed = 11;
  const std::string ref_dir = synth_or_die(o, tmp.sub("ref"));
  o.outliers = {k.norm, k.up, k.v, 20.0};
  const std::string inj_dir = synth_or_die(o, tmp.sub("inj"));
  auto ch = synth_outlier_channels(o);
  ASSERT_TRUE(ch.is_ok());

  auto ref = LlamaModel::open(ref_dir);
  auto inj = LlamaModel::open(inj_dir);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  ASSERT_TRUE(inj.is_ok()) << inj.status().to_string();
  const TokenSequences seqs = synth_sequences(4, 32, o.config.vocab_size, 5);

  // Logits: |Δ| ≤ rtol · max|logit| everywhere.
  auto a = model_logits(**ref, seqs, 0, seqs.count());
  auto b = model_logits(**inj, seqs, 0, seqs.count());
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  ASSERT_TRUE(b.is_ok()) << b.status().to_string();
  ASSERT_EQ(a->shape, b->shape);
  double max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < a->data.size(); ++i) {
    ASSERT_TRUE(std::isfinite(b->data[i])) << i;
    max_abs = std::max(max_abs, std::fabs(double(a->data[i])));
    max_diff = std::max(max_diff, std::fabs(double(a->data[i]) - b->data[i]));
  }
  const double rtol = 1e-4;
  std::printf("[%s] logits max|Δ| = %.3g, max|logit| = %.3g, relative %.3g (%.1f%% of budget %g)\n",
              k.name, max_diff, max_abs, max_diff / max_abs, 100 * max_diff / (rtol * max_abs),
              rtol);
  EXPECT_GT(max_abs, 1.0);
  EXPECT_LE(max_diff, rtol * max_abs);

  // Outliers: at every layer the injected channels carry α times the
  // reference activations, ~α times the median channel.
  ChannelMax am_ref = activation_absmax(**ref, seqs);
  ChannelMax am_inj = activation_absmax(**inj, seqs);
  const double alpha = o.outliers.alpha;
  const ModelConfig& c = (*inj)->config();
  const int64_t d = c.head_dim, group = c.num_attention_heads / c.num_key_value_heads;
  std::vector<int64_t> o_cols;  // o_proj input columns fed by the injected v channels
  for (int64_t j : ch->v)
    for (int64_t h = (j / d) * group; h < (j / d + 1) * group; ++h) o_cols.push_back(h * d + j % d);
  std::sort(o_cols.begin(), o_cols.end());
  struct Site {
    const char* what;
    const char* proj;
    const std::vector<int64_t>* channels;
  };
  for (const Site& s : {Site{"input_layernorm out", "self_attn.q_proj", &ch->norm},
                        {"post_attention_layernorm out", "mlp.up_proj", &ch->norm},
                        {"down_proj in", "mlp.down_proj", &ch->up},
                        {"o_proj in", "self_attn.o_proj", &o_cols}}) {
    if (s.channels->empty()) continue;
    for (int64_t l = 0; l < o.config.num_hidden_layers; ++l) {
      const OutlierStats inj = outlier_stats(am_inj[l].at(s.proj), *s.channels);
      const OutlierStats ref = outlier_stats(am_ref[l].at(s.proj), *s.channels);
      std::printf(
          "[%s] layer %lld %-29s absmax / median channel: injected min %.1f median %.1f "
          "(others <= %.1f); reference median %.2f\n",
          k.name, static_cast<long long>(l), s.what, inj.min_ratio, inj.median_ratio, inj.max_other,
          ref.median_ratio);
      // Each injected channel is exactly α times its reference self...
      for (int64_t j : *s.channels) {
        const double a = am_ref[l].at(s.proj)[j], b = am_inj[l].at(s.proj)[j];
        EXPECT_NEAR(b, alpha * a, 1e-4 * alpha * a) << s.what << " layer " << l << " ch " << j;
      }
      // ...which makes it an outlier: typically ~α times the median channel
      // (at least α/2), and none below α/5 (the natural spread of channel
      // maxima, e.g. of silu(gate)·up, reaches ~6x the median).
      EXPECT_GE(inj.median_ratio, alpha / 2) << s.what << " layer " << l;
      EXPECT_GE(inj.min_ratio, alpha / 5) << s.what << " layer " << l;
      EXPECT_LT(ref.median_ratio, alpha / 8) << s.what << " layer " << l;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Alpha20, SynthInjection,
                         ::testing::Values(InjectionCase{"all", 4, 4, 4},
                                           InjectionCase{"up_and_v_only", 0, 6, 3}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(SynthOutliers, UntouchedTensorsAreBitIdentical) {
  TempDir tmp;
  SynthOptions o;
  o.config = small_config();
  synth_or_die(o, tmp.sub("ref"));
  o.outliers = {0, 6, 3, 20.0};  // up/down and v/o only
  synth_or_die(o, tmp.sub("inj"));
  auto ref = ModelDir::open(tmp.sub("ref"));
  auto inj = ModelDir::open(tmp.sub("inj"));
  ASSERT_TRUE(ref.is_ok() && inj.is_ok());
  for (const std::string& name : (*ref)->tensor_names()) {
    const bool touched =
        name.find("up_proj") != std::string::npos || name.find("down_proj") != std::string::npos ||
        name.find("v_proj") != std::string::npos || name.find("o_proj") != std::string::npos;
    const SafetensorsFile *fr = nullptr, *fi = nullptr;
    const TensorInfo* tr = (*ref)->find(name, &fr);
    const TensorInfo* ti = (*inj)->find(name, &fi);
    ASSERT_NE(ti, nullptr) << name;
    EXPECT_EQ(fr->raw(*tr) == fi->raw(*ti), !touched) << name;
  }
}

// BF16 storage: the rescaled weights round differently, so the function is
// preserved only to about storage precision. Measured, loosely bounded.
TEST(SynthOutliers, Bf16InjectionIsCloseButNotExact) {
  TempDir tmp;
  SynthOptions o;
  o.config = invariance_config();
  o.config.torch_dtype = DType::kBF16;
  synth_or_die(o, tmp.sub("ref"));
  o.outliers = {4, 4, 4, 20.0};
  synth_or_die(o, tmp.sub("inj"));
  auto ref = LlamaModel::open(tmp.sub("ref"));
  auto inj = LlamaModel::open(tmp.sub("inj"));
  ASSERT_TRUE(ref.is_ok() && inj.is_ok());
  const TokenSequences seqs = synth_sequences(2, 32, o.config.vocab_size, 5);
  auto a = model_logits(**ref, seqs, 0, seqs.count());
  auto b = model_logits(**inj, seqs, 0, seqs.count());
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  double max_abs = 0, max_diff = 0;
  for (size_t i = 0; i < a->data.size(); ++i) {
    max_abs = std::max(max_abs, std::fabs(double(a->data[i])));
    max_diff = std::max(max_diff, std::fabs(double(a->data[i]) - b->data[i]));
  }
  std::printf("bf16 injected logits: max|Δ| = %.3g, relative to max|logit| %.3g\n", max_diff,
              max_diff / max_abs);
  EXPECT_LE(max_diff, 5e-2 * max_abs);
}

// ---------------------------------------------------------------- quality

double perplexity(const LlamaModel& m, const TokenSequences& seqs) {
  auto lg = model_logits(m, seqs, 0, seqs.count());
  EXPECT_TRUE(lg.is_ok()) << lg.status().to_string();
  if (!lg.is_ok()) return NAN;
  const int64_t V = m.config().vocab_size, T = seqs.seqlen;
  double nll = 0;
  int64_t n = 0;
  for (int64_t s = 0; s < seqs.count(); ++s)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const float* z = lg->ptr() + (s * T + t) * V;
      const double mx = *std::max_element(z, z + V);
      double se = 0;
      for (int64_t v = 0; v < V; ++v) se += std::exp(double(z[v]) - mx);
      nll += mx + std::log(se) - z[seqs.seq(s)[t + 1]];
      ++n;
    }
  return std::exp(nll / static_cast<double>(n));
}

// The untied model carries the Zipf log-prior of synth_tokens(), so its
// perplexity on such data is well below V; the tied one is reported only.
TEST(Synth, PerplexityOnSynthTokens) {
  TempDir tmp;
  SynthOptions o;
  o.config = invariance_config();
  o.config.vocab_size = 1024;
  synth_or_die(o, tmp.sub("untied"));
  o.config.tie_word_embeddings = true;
  synth_or_die(o, tmp.sub("tied"));
  const TokenSequences seqs = synth_sequences(8, 64, o.config.vocab_size, 21);
  auto untied = LlamaModel::open(tmp.sub("untied"));
  auto tied = LlamaModel::open(tmp.sub("tied"));
  ASSERT_TRUE(untied.is_ok() && tied.is_ok());
  const double p_untied = perplexity(**untied, seqs), p_tied = perplexity(**tied, seqs);
  std::printf("perplexity on synth_tokens, V = 1024: untied %.1f, tied %.1f\n", p_untied, p_tied);
  EXPECT_LT(p_untied, 1024.0 / 3);
  EXPECT_TRUE(std::isfinite(p_tied));
}

}  // namespace
}  // namespace qcal

// labels: unit
// Streaming checkpoint writers (worker/engine/qformats.h, worker/calib/native.h,
// common/safetensors.h): the files they write are byte-identical to those of
// the whole-model writers as they were before streaming (golden SHA-256
// digests recorded from that build), overrides streamed in row chunks equal a
// whole-tensor write, and failures leave nothing behind.
//
// Every input here is drawn from common/rng.h (the same bits on every
// machine), never from the quantizer, so the golden digests change only when
// the writers' output does.
//
// Letters: O out_features, I in_features, H hidden, V vocab, L layers, P
// IntactKV prefix length, K = n_kv·d.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "kernels/qgemm.h"
#include "tests/unit/test_util.h"
#include "worker/calib/native.h"
#include "worker/engine/qformats.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using qcal::testing::TempDir;

// ---------------------------------------------------------------- inputs

// FNV-1a-64 of `seed` then `name`: one random stream per tensor / module.
uint64_t stream_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto feed = [&](unsigned char b) { h = (h ^ b) * 0x100000001b3ull; };
  for (int i = 0; i < 8; ++i) feed(static_cast<unsigned char>(seed >> (8 * i)));
  for (char ch : name) feed(static_cast<unsigned char>(ch));
  return h;
}

std::vector<float> normal_values(uint64_t seed, const std::string& name, int64_t n, double sd) {
  Rng rng(stream_seed(seed, name));
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(sd * rng.normal());
  return v;
}

// The source model of the GPTQ / compressed-tensors cases: a small BF16 LLaMA
// with q/k/v biases (copied next to the packed tensors), 3-bit friendly sizes.
ModelConfig source_config(int64_t layers = 2) {
  ModelConfig c = qcal::testing::small_config(128, 64, layers);
  c.attention_bias = true;
  c.torch_dtype = DType::kBF16;
  return c;
}

// Writes config.json, model.safetensors (model order), generation_config.json
// and tokenizer.json.
void write_source(const std::string& dir, const ModelConfig& c, uint64_t seed) {
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
  t.push_back({"lm_head.weight", {V, H}});
  SafetensorsWriter w(join_path(dir, "model.safetensors"));
  for (const auto& [name, shape] : t) w.add(name, c.torch_dtype, shape);
  ASSERT_TRUE(w.begin().is_ok());
  for (const auto& [name, shape] : t) {
    const std::vector<float> v = normal_values(seed, name, Tensor::count(shape), 0.05);
    ASSERT_TRUE(w.write_f32(v.data(), v.size()).is_ok()) << name;
  }
  ASSERT_TRUE(w.finish().is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "config.json"), c.to_json().dump(2)).is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "generation_config.json"),
                                R"({"bos_token_id": 1, "eos_token_id": 2})")
                  .is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "tokenizer.json"),
                                R"({"version": "1.0", "model": {"type": "BPE"}})")
                  .is_ok());
}

// A consistent quantized linear (O, I) drawn from its own stream: codes in
// [0, 2^b − 1] (both ends present), fp16 scales (one subnormal), zeros 2^(b−1)
// when symmetric, g_idx a permutation's groups under act-order.
QuantizedLinear make_linear(int64_t O, int64_t I, const QuantSpec& spec, bool act_order,
                            uint64_t seed, const std::string& name) {
  Rng rng(stream_seed(seed, name));
  QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec = spec;
  q.act_order = act_order;
  const int64_t G = spec.group_size == -1 ? 1 : (I + spec.group_size - 1) / spec.group_size;
  const int maxq = (1 << spec.bits) - 1;
  q.q.resize(static_cast<size_t>(O * I));
  for (auto& c : q.q) c = static_cast<uint8_t>(rng.below(static_cast<uint64_t>(maxq) + 1));
  q.q.front() = 0;
  q.q.back() = static_cast<uint8_t>(maxq);
  q.scales.resize(static_cast<size_t>(G * O));
  for (auto& s : q.scales)
    s = round_to_dtype(static_cast<float>(1e-3 + 0.2 * rng.uniform()), DType::kF16);
  q.scales.front() = round_to_dtype(1e-5f, DType::kF16);
  q.zeros.resize(static_cast<size_t>(G * O));
  for (auto& z : q.zeros)
    z = spec.sym ? (1 << (spec.bits - 1))
                 : static_cast<int32_t>(rng.below(static_cast<uint64_t>(maxq) + 1));
  if (!spec.sym) {
    q.zeros.front() = 0;
    q.zeros.back() = maxq;
  }
  std::vector<int32_t> perm(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) perm[i] = static_cast<int32_t>(i);
  if (act_order)
    for (int64_t i = I - 1; i > 0; --i)
      std::swap(perm[i], perm[rng.below(static_cast<uint64_t>(i) + 1)]);
  q.g_idx.resize(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i)
    q.g_idx[i] = spec.group_size > 0 ? static_cast<int32_t>(perm[i] / spec.group_size) : 0;
  return q;
}

// The module names a case quantizes: every projection of every layer, less
// `skip`, plus lm_head when asked.
std::vector<std::string> module_names(const ModelConfig& c, const std::string& skip, bool lm_head) {
  std::vector<std::string> out;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (const char* p : kProjNames)
      if (layer_prefix(l) + p != skip) out.push_back(layer_prefix(l) + p);
  if (lm_head) out.push_back("lm_head");
  return out;
}

std::vector<int64_t> module_shape(const ModelConfig& c, const std::string& name) {
  if (name == "lm_head") return {c.vocab_size, c.hidden_size};
  const std::string proj = name.substr(name.find('.', std::string("model.layers.").size()) + 1);
  return proj_shape(c, proj);
}

// One digest for a directory: SHA-256 of the lines "<file> <sha256>\n" over its
// files in name order; `listing` receives those lines (for failure messages).
std::string dir_digest(const std::string& dir, std::string* listing) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  std::string lines;
  for (const std::string& f : files) {
    auto d = sha256_file(join_path(dir, f));
    lines += f + " " + (d.is_ok() ? d->sha256 : d.status().to_string()) + "\n";
  }
  if (listing) *listing = lines;
  return sha256_hex(lines);
}

// ---------------------------------------------------------------- GPTQ / CT

struct QCase {
  const char* name;
  CheckpointFormat format;
  int bits;
  int64_t group_size;
  bool sym;
  bool act_order;
  uint64_t max_shard_bytes;  // 0 = one file
  bool partial;              // layer 1 down_proj left in FP, lm_head quantized, extra config
  const char* golden;        // dir_digest of the output of the pre-streaming writer
};

const CheckpointFormat kGptq = CheckpointFormat::kGptq;
const CheckpointFormat kCt = CheckpointFormat::kCompressedTensors;

const QCase kQCases[] = {
    {"gptq_sym2_g32", kGptq, 2, 32, true, false, 0, false,
     "f776657aab9eca127663e9b856082a994bc9e787ab4e693123bdfbcf07ac46b2"},
    {"gptq_asym3_g32", kGptq, 3, 32, false, false, 0, false,
     "d87b0e28b2f56ab916244914779376a80cf0203dd53f549ddc327533606dbf32"},
    {"gptq_sym4_channel_partial", kGptq, 4, -1, true, false, 0, true,
     "886aef1c666b6b1d149a614b89b1528fd664989040bff0a8b2903f24f933cd02"},
    {"gptq_asym8_g16", kGptq, 8, 16, false, false, 0, false,
     "057a75d364b02c5fab73529a30aea47d47b7a5ffa38486bbdbe20c3018b8e641"},
    {"gptq_sym4_g32_actorder", kGptq, 4, 32, true, true, 0, false,
     "c3f017beeb4455c2c3378f19154c6d03c134d262d9f245b7a9da3a639914cf24"},
    {"gptq_asym4_g32_sharded", kGptq, 4, 32, false, false, 24000, false,
     "fd36e112b89255df8c816813c31797dd8252e19f6434475a9b8604424c0e996d"},
    {"gptq_sym3_g16_actorder_sharded_partial", kGptq, 3, 16, true, true, 30000, true,
     "d48d8d8577b74c04877e4699abcb07862f50ae36f0ff6b36f022314858fd1467"},
    {"ct_sym4_g32", kCt, 4, 32, true, false, 0, false,
     "9dc7defaf2bd4183634cbdfc10133deb8ba732e2f7a044d95b792646d2f4d4e3"},
    {"ct_asym8_channel", kCt, 8, -1, false, false, 0, false,
     "d122a914fcf0bb63d2863fae4b5b8f657e12921aac75abf9c20d492383dc9604"},
    {"ct_asym4_g32_actorder_sharded", kCt, 4, 32, false, true, 24000, false,
     "a7238b541cc30203798ff7135d557cad99ddc7362320db45f4ce123169b29d1f"},
    {"ct_sym8_g16_partial", kCt, 8, 16, true, false, 0, true,
     "1a9bd0e594e94948d1fbdc4b86bd52944de01bd09e064946439f4e4cc0917952"},
};

WriteOptions case_options(const QCase& k) {
  WriteOptions o;
  o.format = k.format;
  if (k.max_shard_bytes) o.max_shard_bytes = k.max_shard_bytes;
  if (k.partial)
    o.extra_config = {{"damp_percent", 0.05}, {"meta", {{"uri", "qcal-test"}}}, {"mse", 2.4}};
  return o;
}

std::map<std::string, QuantizedLinear> case_linears(const ModelConfig& c, const QCase& k) {
  std::map<std::string, QuantizedLinear> m;
  const QuantSpec spec{k.bits, k.group_size, k.sym};
  for (const std::string& name :
       module_names(c, k.partial ? layer_prefix(1) + "mlp.down_proj" : "", k.partial)) {
    const std::vector<int64_t> s = module_shape(c, name);
    m[name] = make_linear(s[0], s[1], spec, k.act_order, 7, name);
  }
  return m;
}

class StreamWriters : public ::testing::Test {
 protected:
  void SetUp() override {
    cfg_ = source_config();
    write_source(tmp_.sub("fp"), cfg_, 11);
    auto src = ModelDir::open(tmp_.sub("fp"));
    ASSERT_TRUE(src.is_ok()) << src.status().to_string();
    src_ = std::move(src).value();
  }
  TempDir tmp_{"qcal_stream_"};
  ModelConfig cfg_;
  std::unique_ptr<ModelDir> src_;
};

TEST_F(StreamWriters, QuantizedCheckpointBytesEqualThePreStreamingWriter) {
  int failures = 0;
  for (const QCase& k : kQCases) {
    const std::string out = tmp_.sub(k.name);
    Status st = write_quantized_checkpoint(*src_, case_linears(cfg_, k), case_options(k), out);
    ASSERT_TRUE(st.is_ok()) << k.name << ": " << st.to_string();
    std::string listing;
    const std::string got = dir_digest(out, &listing);
    if (got != k.golden) ++failures;
    EXPECT_EQ(got, k.golden) << k.name << " files:\n" << listing;
  }
  EXPECT_EQ(failures, 0);
}

// ---------------------------------------------------------------- native

using calib::NativeActQuant;
using calib::NativeLayer;
using calib::NativeModel;

ModelConfig native_config() {
  ModelConfig c = qcal::testing::small_config(96, 97, 2);
  c.attention_bias = true;
  return c;
}

// n×n matrix of its own stream.
std::vector<float> square(uint64_t seed, const std::string& name, int64_t n) {
  return normal_values(seed, name, n * n, 1.0 / static_cast<double>(n));
}

PackedWeight packed(uint64_t seed, const std::string& name, int64_t out, int64_t in, int bits,
                    int64_t group) {
  Rng rng(stream_seed(seed, name));
  const int64_t G = group > 0 ? (in + group - 1) / group : 1;
  const int lo = -(1 << (bits - 1)), n = 1 << bits;
  std::vector<int8_t> codes(static_cast<size_t>(out * in));
  for (auto& c : codes) c = static_cast<int8_t>(lo + static_cast<int>(rng.below(n)));
  std::vector<float> scales(static_cast<size_t>(out * G));
  for (auto& s : scales) s = static_cast<float>(0.01 + 0.1 * rng.uniform());
  return pack_weight(codes.data(), scales.data(), out, in, bits, group);
}

struct NCase {
  const char* name;
  int w_bits;
  int64_t w_group;
  bool rich;  // online transforms, biases, varied quantizers, IntactKV (P = 2)
  const char* golden;
};

const NCase kNCases[] = {
    {"native_w4_g32_rich", 4, 32, true,
     "119f92b2fd9c2a1989c9a1b99d3ea44c663f572944d91a3a4d902e4af6a97272"},
    {"native_w8_channel", 8, -1, false,
     "adfb9374bb5abe4a378bdc853bddab006908ff405678a30c01b760e9b344b0c2"},
    {"native_w16_rich", 16, -1, true,
     "28fbc14cdef7a4994e8bb005e4c82ed566fc29c4a01b728bd0d83478e42c54ba"},
};

NativeModel native_model(const NCase& k, int64_t layers = 2, uint64_t seed = 5) {
  NativeModel m;
  m.config = native_config();
  m.config.num_hidden_layers = layers;
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = layers;
  m.recipe = {{"transform", k.rich ? "flatquant" : "none"}, {"w_bits", k.w_bits}, {"lr", 5e-3}};
  m.w_bits = k.w_bits;
  m.w_group = k.w_group;
  m.embed = normal_values(seed, "embed", V * H, 1.0);
  m.final_norm = normal_values(seed, "norm", H, 0.1);
  for (float& x : m.final_norm) x += 1.0f;
  m.lm_head = normal_values(seed, "lm_head", V * H, 0.1);
  m.layers.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    NativeLayer& y = m.layers[l];
    const std::string lp = layer_prefix(l);
    y.input_norm = normal_values(seed, lp + "in", H, 0.1);
    y.post_norm = normal_values(seed, lp + "post", H, 0.1);
    for (int p = 0; p < calib::kNumProj; ++p) {
      const int64_t out = calib::proj_out(c, p), in = calib::proj_in(c, p);
      const std::string pn = lp + kProjNames[p];
      if (k.w_bits < 16)
        y.qw[p] = packed(seed, pn, out, in, k.w_bits, k.w_group);
      else
        y.fw[p] = normal_values(seed, pn, out * in, 0.1);
      if (k.rich) y.act[p] = NativeActQuant{4, true, -1, 0.9f};
    }
    if (!k.rich) continue;
    y.act[calib::kDown].clip = 0.87310123f;
    y.k = NativeActQuant{4, false, 16, 0.95f};
    y.v = NativeActQuant{8, false, -1, 1.0f};
    if (l == 0)
      for (int p = 0; p < 3; ++p)
        y.bias[p] =
            normal_values(seed, lp + "bias" + std::to_string(p), calib::proj_out(c, p), 0.2);
    y.online.a1 = square(seed, lp + "a1", 8);
    y.online.a2 = square(seed, lp + "a2", 8);
    if (l == 0) y.online.u1 = square(seed, lp + "u1", H);  // a lone factor
    y.online.d1 = square(seed, lp + "d1", 12);
    y.online.d2 = square(seed, lp + "d2", 8);
    if (l == 0) y.online.po = square(seed, lp + "po", c.num_attention_heads);
    y.online.pk = square(seed, lp + "pk", c.head_dim);
    y.online.pk_it = square(seed, lp + "pk_it", c.head_dim);
  }
  if (k.rich) {
    const int64_t P = 2;
    m.intact_prefix = {1, 42};
    for (int64_t l = 0; l < L; ++l) {
      m.intact_k.push_back(normal_values(seed, "ik" + std::to_string(l), P * c.kv_dim(), 1.0));
      m.intact_v.push_back(normal_values(seed, "iv" + std::to_string(l), P * c.kv_dim(), 1.0));
    }
    m.intact_logits = normal_values(seed, "ilogits", P * V, 2.0);
  }
  return m;
}

TEST(StreamNative, NativeBytesEqualThePreStreamingWriter) {
  TempDir tmp("qcal_stream_native_");
  int failures = 0;
  for (const NCase& k : kNCases) {
    const std::string out = tmp.sub(k.name);
    Status st = calib::write_native(native_model(k), out, false);
    ASSERT_TRUE(st.is_ok()) << k.name << ": " << st.to_string();
    std::string listing;
    const std::string got = dir_digest(out, &listing);
    if (got != k.golden) ++failures;
    EXPECT_EQ(got, k.golden) << k.name << " files:\n" << listing;
  }
  EXPECT_EQ(failures, 0);
}

}  // namespace
}  // namespace qcal

// labels: unit
// Streaming checkpoint writers (worker/engine/qformats.h, worker/calib/native.h,
// common/safetensors.h): the files they write are byte-identical to those of
// the whole-model writers as they were before streaming (golden SHA-256
// digests recorded from that build), whether fed whole or streamed; overrides
// streamed in row chunks equal a whole-tensor write; failures leave nothing
// behind; the streaming writers' peak resident set does not grow with the
// layer count (measured in a forked child).
//
// Every input here is drawn from common/rng.h (the same bits on every
// machine), never from the quantizer, so the golden digests change only when
// the writers' output does: a deliberate format change must update them.
//
// Letters: O out_features, I in_features, H hidden, V vocab, L layers, P
// IntactKV prefix length, K = n_kv·d.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
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
#include "worker/engine/synth.h"

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
// files in name order, the publishing manifest (.qcal-output.json: who published it
// and when) aside; `listing` receives those lines (for failure messages).
std::string dir_digest(const std::string& dir, std::string* listing) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != ".qcal-output.json") files.push_back(e.path().filename().string());
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

// The declarations of a case and a provider drawing each linear only when
// asked (the same linears as case_linears); `calls` records the order.
CheckpointStream case_stream(const ModelConfig& c, const QCase& k,
                             std::vector<std::string>* calls) {
  CheckpointStream in;
  for (auto& [name, q] : case_linears(c, k)) in.linears[name] = linear_decl(q);
  const QuantSpec spec{k.bits, k.group_size, k.sym};
  in.provide = [c, spec, k, calls](const std::string& name) -> Result<QuantizedLinear> {
    if (calls) calls->push_back(name);
    const std::vector<int64_t> s = module_shape(c, name);
    return make_linear(s[0], s[1], spec, k.act_order, 7, name);
  };
  return in;
}

// Entries of `dir` other than `keep` (outputs, staging directories, temporaries).
std::vector<std::string> entries_but(const std::string& dir, const std::string& keep) {
  std::vector<std::string> v;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != keep) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

TEST_F(StreamWriters, StreamedFromAProviderEqualsTheGoldenBytes) {
  int failures = 0;
  for (const QCase& k : kQCases) {
    const std::string out = tmp_.sub(std::string("s_") + k.name);
    std::vector<std::string> calls;
    const CheckpointStream in = case_stream(cfg_, k, &calls);
    WriteOptions o = case_options(k);
    o.chunk_bytes = 777;  // source tensors copied in odd pieces: same bytes
    Status st = stream_quantized_checkpoint(*src_, in, o, out);
    ASSERT_TRUE(st.is_ok()) << k.name << ": " << st.to_string();
    std::string listing;
    const std::string got = dir_digest(out, &listing);
    if (got != k.golden) ++failures;
    EXPECT_EQ(got, k.golden) << k.name << " files:\n" << listing;
    // Once per module, in name order (a layer's modules are consecutive in it).
    std::vector<std::string> want;
    for (const auto& [name, d] : in.linears) want.push_back(name);
    EXPECT_EQ(calls, want) << k.name;
  }
  EXPECT_EQ(failures, 0);

  // With layers 0..11 the order is the names' string order: 1, 10, 11, 2, ...
  ModelConfig c12 = source_config(12);
  write_source(tmp_.sub("fp12"), c12, 12);
  auto src12 = ModelDir::open(tmp_.sub("fp12"));
  ASSERT_TRUE(src12.is_ok());
  std::vector<std::string> calls;
  ASSERT_TRUE(stream_quantized_checkpoint(**src12, case_stream(c12, kQCases[7], &calls), {},
                                          tmp_.sub("out12"))
                  .is_ok());
  ASSERT_EQ(calls.size(), 12u * 7u);
  std::vector<int64_t> layer_order;
  for (const std::string& m : calls) {
    const int64_t l = std::stoll(m.substr(std::string("model.layers.").size()));
    if (layer_order.empty() || layer_order.back() != l) layer_order.push_back(l);
  }
  EXPECT_EQ(layer_order, (std::vector<int64_t>{0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9}));
}

// fp32 rows of a source tensor times a (H, H) matrix: the "rotated" tensor.
struct Rotated {
  Tensor src;              // (R, H)
  std::vector<float> rot;  // (H, H)
  std::vector<std::pair<int64_t, int64_t>> calls;
  Status rows(int64_t row0, int64_t rows, float* out) {
    calls.push_back({row0, rows});
    const int64_t H = src.dim(1);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < H; ++j) {
        double a = 0;
        for (int64_t i = 0; i < H; ++i)
          a += static_cast<double>(src.data[(row0 + r) * H + i]) * rot[i * H + j];
        out[r * H + j] = static_cast<float>(a);
      }
    return Status::ok();
  }
};

TEST_F(StreamWriters, OverridesStreamedInRowChunksEqualTheWholeTensorWrite) {
  const int64_t H = cfg_.hidden_size, V = cfg_.vocab_size;
  const QCase& k = kQCases[0];
  auto write = [&](const std::string& out, uint64_t chunk, Rotated* embed) {
    CheckpointStream in = case_stream(cfg_, k, nullptr);
    TensorOverride e;
    e.dtype = DType::kBF16;
    e.shape = {V, H};
    e.rows = [embed](int64_t r0, int64_t n, float* o) { return embed->rows(r0, n, o); };
    in.overrides["model.embed_tokens.weight"] = e;
    TensorOverride norm;  // a folded norm: ones, written as F32
    norm.dtype = DType::kF32;
    norm.shape = {H};
    norm.rows = [](int64_t, int64_t n, float* o) {
      std::fill(o, o + n, 1.0f);
      return Status::ok();
    };
    in.overrides["model.norm.weight"] = norm;
    TensorOverride added;  // a tensor the source lacks
    added.dtype = DType::kF16;
    added.shape = {3, 4};
    added.rows = [](int64_t r0, int64_t n, float* o) {
      for (int64_t i = 0; i < n * 4; ++i) o[i] = static_cast<float>(r0 * 4 + i) / 8.0f;
      return Status::ok();
    };
    in.overrides["qcal.test.added"] = added;
    in.config_updates = {{"tie_word_embeddings", false}, {"qcal_rotated", true}};
    WriteOptions o = case_options(k);
    o.chunk_bytes = chunk;
    return stream_quantized_checkpoint(*src_, in, o, out);
  };
  Rotated embed;
  auto src_embed = src_->read_f32("model.embed_tokens.weight");
  ASSERT_TRUE(src_embed.is_ok());
  embed.src = *src_embed;
  embed.rot = normal_values(3, "rotation", H * H, 1.0 / std::sqrt(static_cast<double>(H)));

  ASSERT_TRUE(write(tmp_.sub("whole"), uint64_t{1} << 30, &embed).is_ok());
  ASSERT_EQ(embed.calls.size(), 1u);
  embed.calls.clear();
  // 3 rows of H fp32 values per call.
  ASSERT_TRUE(write(tmp_.sub("chunks"), 3 * H * 4, &embed).is_ok());
  ASSERT_EQ(embed.calls.size(), static_cast<size_t>((V + 2) / 3));
  for (size_t i = 0; i < embed.calls.size(); ++i) {
    EXPECT_EQ(embed.calls[i].first, static_cast<int64_t>(3 * i));
    EXPECT_EQ(embed.calls[i].second, std::min<int64_t>(3, V - static_cast<int64_t>(3 * i)));
  }
  std::string a, b;
  EXPECT_EQ(dir_digest(tmp_.sub("chunks"), &b), dir_digest(tmp_.sub("whole"), &a)) << a << b;

  // What was written: the rotated rows rounded once to BF16, the rest as declared.
  auto out = ModelDir::open(tmp_.sub("chunks"));
  ASSERT_TRUE(out.is_ok()) << out.status().to_string();
  const TensorInfo* te = (*out)->find("model.embed_tokens.weight");
  ASSERT_NE(te, nullptr);
  EXPECT_EQ(te->dtype, DType::kBF16);
  auto got = (*out)->read_f32("model.embed_tokens.weight");
  ASSERT_TRUE(got.is_ok());
  std::vector<float> want(static_cast<size_t>(V * H));
  ASSERT_TRUE(embed.rows(0, V, want.data()).is_ok());
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    bad += got->data[i] != round_to_dtype(want[i], DType::kBF16) || !std::isfinite(got->data[i]);
  EXPECT_EQ(bad, 0u) << "of " << want.size() << " rotated embedding values";
  EXPECT_EQ((*out)->find("model.norm.weight")->dtype, DType::kF32);
  auto norm = (*out)->read_f32("model.norm.weight");
  ASSERT_TRUE(norm.is_ok());
  EXPECT_EQ(norm->data, std::vector<float>(static_cast<size_t>(H), 1.0f));
  auto added = (*out)->read_f32("qcal.test.added");
  ASSERT_TRUE(added.is_ok());
  EXPECT_EQ(added->shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(added->data[11], 11.0f / 8.0f);
  // Tensors not overridden are the source's bytes.
  const SafetensorsFile *fs_out = nullptr, *fs_src = nullptr;
  const TensorInfo* lo = (*out)->find("lm_head.weight", &fs_out);
  const TensorInfo* ls = src_->find("lm_head.weight", &fs_src);
  ASSERT_TRUE(lo && ls);
  EXPECT_EQ(fs_out->raw(*lo), fs_src->raw(*ls));
  EXPECT_EQ((*out)->config_json()["tie_word_embeddings"], false);
  EXPECT_EQ((*out)->config_json()["qcal_rotated"], true);
  EXPECT_EQ((*out)->config_json()["quantization_config"]["bits"], 2);
  auto q = read_quantized_linear(**out, "model.layers.1.mlp.up_proj");
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  const QuantizedLinear want_q = case_linears(cfg_, k).at("model.layers.1.mlp.up_proj");
  EXPECT_EQ(q->q, want_q.q);
  EXPECT_EQ(q->scales, want_q.scales);
}

// Expects `st` to fail with `code` and a message holding every piece.
void expect_error(const Status& st, Code code, std::initializer_list<std::string> pieces) {
  EXPECT_EQ(st.code(), code) << st.to_string();
  for (const std::string& p : pieces)
    EXPECT_NE(st.message().find(p), std::string::npos) << "'" << p << "' not in: " << st.message();
}

TEST_F(StreamWriters, FailuresLeaveNoOutputAndNoStagingDirectory) {
  const QCase& k = kQCases[9];  // sharded: a failure can come after a finished shard
  const std::string out = tmp_.sub("out");
  auto check_nothing_left = [&](const char* what) {
    EXPECT_EQ(entries_but(tmp_.path(), "fp"), std::vector<std::string>{}) << what;
  };
  {  // The provider fails midway: its code and message come back, with the module.
    std::vector<std::string> calls;
    CheckpointStream in = case_stream(cfg_, k, &calls);
    auto inner = in.provide;
    in.provide = [&, inner](const std::string& name) -> Result<QuantizedLinear> {
      if (calls.size() == 9) {
        calls.push_back(name);
        return unavailable("block store briefly gone");
      }
      return inner(name);
    };
    Status st = stream_quantized_checkpoint(*src_, in, case_options(k), out);
    ASSERT_EQ(calls.size(), 10u);
    expect_error(st, Code::kUnavailable, {"module " + calls.back(), "block store briefly gone"});
    check_nothing_left("provider failure");
  }
  {  // A linear that differs from its declaration.
    CheckpointStream in = case_stream(cfg_, k, nullptr);
    auto inner = in.provide;
    in.provide = [inner](const std::string& name) -> Result<QuantizedLinear> {
      QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, inner(name));
      if (name == "model.layers.1.self_attn.k_proj") q.act_order = false;
      return q;
    };
    expect_error(stream_quantized_checkpoint(*src_, in, case_options(k), out), Code::kInvalidInput,
                 {"module model.layers.1.self_attn.k_proj", "differs from its declaration",
                  "act_order false", "act_order true"});
    check_nothing_left("declaration mismatch");
  }
  {  // A linear failing the contents checks.
    CheckpointStream in = case_stream(cfg_, k, nullptr);
    auto inner = in.provide;
    in.provide = [inner](const std::string& name) -> Result<QuantizedLinear> {
      QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, inner(name));
      if (name == "model.layers.1.mlp.gate_proj") q.q[5] = 16;
      return q;
    };
    expect_error(stream_quantized_checkpoint(*src_, in, case_options(k), out), Code::kInvalidInput,
                 {"module model.layers.1.mlp.gate_proj", "code q[0, 5] = 16"});
    check_nothing_left("bad contents");
  }
  {  // A row source failing, and one producing a non-finite value.
    for (bool nan : {false, true}) {
      CheckpointStream in = case_stream(cfg_, k, nullptr);
      TensorOverride ov;
      ov.shape = {cfg_.hidden_size};
      ov.rows = [nan](int64_t r0, int64_t n, float* o) {
        for (int64_t i = 0; i < n; ++i) o[i] = r0 + i == 7 && nan ? NAN : 1.0f;
        return nan ? Status::ok() : io_error("rotation file: read failed");
      };
      in.overrides["model.layers.1.input_layernorm.weight"] = ov;
      Status st = stream_quantized_checkpoint(*src_, in, case_options(k), out);
      if (nan)
        expect_error(st, Code::kInvalidInput,
                     {"tensor model.layers.1.input_layernorm.weight", "element 7"});
      else
        expect_error(st, Code::kIoError,
                     {"override of tensor model.layers.1.input_layernorm.weight",
                      "rotation file: read failed"});
      check_nothing_left("row source");
    }
  }

  // Refused before any linear is asked for or any byte written.
  struct Case {
    const char* what;
    std::function<void(CheckpointStream&, WriteOptions&)> edit;
    std::vector<std::string> expect;
  };
  TensorOverride ones;
  ones.shape = {cfg_.hidden_size};
  ones.rows = [](int64_t, int64_t n, float* o) {
    std::fill(o, o + n, 1.0f);
    return Status::ok();
  };
  const std::vector<Case> cases = {
      {"mixed specs",
       [](CheckpointStream& in, WriteOptions&) {
         in.linears["model.layers.1.mlp.up_proj"].spec.bits = 8;
       },
       {"module model.layers.1.mlp.up_proj", "differ from module"}},
      {"not writable",
       [](CheckpointStream& in, WriteOptions&) {
         for (auto& [n, d] : in.linears) d.spec.bits = 3;
       },
       {"compressed-tensors pack-quantized is written for 4 or 8 bits only"}},
      {"declared shape",
       [](CheckpointStream& in, WriteOptions&) {
         in.linears["model.layers.0.self_attn.q_proj"].out_features = 32;
       },
       {"module model.layers.0.self_attn.q_proj", "source weight has shape [64, 64]"}},
      {"override of a replaced weight",
       [&](CheckpointStream& in, WriteOptions&) {
         in.overrides["model.layers.0.mlp.up_proj.weight"] = ones;
       },
       {"model.layers.0.mlp.up_proj.weight", "replaced by its quantized module"}},
      {"override shape",
       [&](CheckpointStream& in, WriteOptions&) {
         TensorOverride o = ones;
         o.shape = {cfg_.hidden_size + 1};
         in.overrides["model.norm.weight"] = o;
       },
       {"override of tensor model.norm.weight", "shape [65]", "the source tensor has [64]"}},
      {"override dtype",
       [&](CheckpointStream& in, WriteOptions&) {
         TensorOverride o = ones;
         o.dtype = DType::kI32;
         in.overrides["model.norm.weight"] = o;
       },
       {"model.norm.weight", "dtype I32 is not a float dtype"}},
      {"override without rows",
       [&](CheckpointStream& in, WriteOptions&) {
         TensorOverride o = ones;
         o.rows = nullptr;
         in.overrides["model.norm.weight"] = o;
       },
       {"model.norm.weight", "no row source"}},
      {"config update of quantization_config",
       [](CheckpointStream& in, WriteOptions&) {
         in.config_updates = {{"quantization_config", nullptr}};
       },
       {"quantization_config"}},
      {"chunk_bytes 0",
       [](CheckpointStream&, WriteOptions& o) { o.chunk_bytes = 0; },
       {"chunk_bytes is 0"}},
      {"no provider",
       [](CheckpointStream& in, WriteOptions&) { in.provide = nullptr; },
       {"no provider"}},
  };
  for (const Case& c : cases) {
    std::vector<std::string> calls;
    CheckpointStream in = case_stream(cfg_, k, &calls);
    WriteOptions o = case_options(k);
    c.edit(in, o);
    Status st = stream_quantized_checkpoint(*src_, in, o, out);
    EXPECT_EQ(st.code(), Code::kInvalidInput) << c.what << ": " << st.to_string();
    for (const std::string& p : c.expect)
      EXPECT_NE(st.message().find(p), std::string::npos) << c.what << ": " << st.message();
    EXPECT_TRUE(calls.empty()) << c.what << ": the provider was called";
    check_nothing_left(c.what);
  }
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

// A source reading `m`, recording the calls; embed / lm_head go through
// rows_of (any chunking).
calib::NativeSource model_source(const NativeModel& m, std::vector<std::string>* calls) {
  const int64_t H = m.config.hidden_size, V = m.config.vocab_size;
  calib::NativeSource s;
  auto logged = [calls](std::string what, RowFn f) -> RowFn {
    return [calls, what, f](int64_t r0, int64_t n, float* out) {
      if (calls && (calls->empty() || calls->back() != what)) calls->push_back(what);
      return f(r0, n, out);
    };
  };
  s.embed = logged("embed", rows_of(m.embed.data(), H));
  s.layer = [&m, calls](int64_t l) -> Result<NativeLayer> {
    if (calls) calls->push_back("layer " + std::to_string(l));
    return m.layers[l];
  };
  s.final_norm = logged("final_norm", rows_of(m.final_norm.data(), 1));
  s.lm_head = logged("lm_head", rows_of(m.lm_head.data(), H));
  s.intact_kv = [&m, calls](int64_t l, std::vector<float>* k, std::vector<float>* v) {
    if (calls) calls->push_back("intact " + std::to_string(l));
    *k = m.intact_k[l];
    *v = m.intact_v[l];
    return Status::ok();
  };
  s.intact_logits = logged("intact_logits", rows_of(m.intact_logits.data(), V));
  return s;
}

TEST(StreamNative, StreamedLayersEqualTheGoldenBytes) {
  TempDir tmp("qcal_stream_native_");
  int failures = 0;
  for (const NCase& k : kNCases) {
    const std::string out = tmp.sub(k.name);
    const NativeModel m = native_model(k);
    std::vector<std::string> calls;
    // 300 bytes: one row of H = 64 fp32 values per call.
    Status st =
        calib::stream_native(calib::native_decl(m), model_source(m, &calls), out, false, 300);
    ASSERT_TRUE(st.is_ok()) << k.name << ": " << st.to_string();
    std::string listing;
    const std::string got = dir_digest(out, &listing);
    if (got != k.golden) ++failures;
    EXPECT_EQ(got, k.golden) << k.name << " files:\n" << listing;
    std::vector<std::string> want = {"embed", "layer 0", "layer 1", "final_norm", "lm_head"};
    if (k.rich)
      for (const char* w : {"intact 0", "intact 1", "intact_logits"}) want.push_back(w);
    EXPECT_EQ(calls, want) << k.name;
  }
  EXPECT_EQ(failures, 0);
}

TEST(StreamNative, FailuresLeaveNoOutputAndNoStagingDirectory) {
  TempDir tmp("qcal_stream_native_bad_");
  const NativeModel m = native_model(kNCases[0]);
  const calib::NativeModelDecl decl = calib::native_decl(m);
  const std::string out = tmp.sub("out");
  auto check_nothing_left = [&](const std::string& what) {
    EXPECT_EQ(entries_but(tmp.path(), ""), std::vector<std::string>{}) << what;
  };
  // A layer source returning a changed layer 1 (or failing there).
  auto with_layer1 = [&](std::function<Result<NativeLayer>(NativeLayer)> edit) {
    calib::NativeSource s = model_source(m, nullptr);
    s.layer = [&m, edit](int64_t l) -> Result<NativeLayer> {
      if (l == 1) return edit(m.layers[1]);
      return m.layers[l];
    };
    return calib::stream_native(decl, s, out, false);
  };
  struct Case {
    const char* what;
    std::function<Result<NativeLayer>(NativeLayer)> edit;
    Code code;
    std::vector<std::string> expect;
  };
  const std::vector<Case> cases = {
      {"source failure",
       [](NativeLayer) -> Result<NativeLayer> { return unavailable("layer store briefly gone"); },
       Code::kUnavailable,
       {"layer 1", "layer store briefly gone"}},
      {"quantizer differs",
       [](NativeLayer y) -> Result<NativeLayer> {
         y.act[calib::kGate].bits = 8;
         return y;
       },
       Code::kInvalidInput,
       {"layers[1].act.gate_proj", "differs from its declaration"}},
      {"online transform differs",
       [](NativeLayer y) -> Result<NativeLayer> {
         y.online.u1 = square(1, "u1", 64);
         return y;
       },
       Code::kInvalidInput,
       {"model.layers.1.online.u1", "the layer's is 64×64, declared absent"}},
      {"bias differs",
       [](NativeLayer y) -> Result<NativeLayer> {
         y.bias[1] = std::vector<float>(32, 0.5f);
         return y;
       },
       Code::kInvalidInput,
       {"model.layers.1.self_attn.k_proj.bias", "the layer has it, not declared"}},
      {"non-finite norm",
       [](NativeLayer y) -> Result<NativeLayer> {
         y.post_norm[3] = INFINITY;
         return y;
       },
       Code::kInvalidInput,
       {"model.layers.1.post_attention_layernorm.weight", "non-finite value", "element 3"}},
      {"packed weight of another shape",
       [](NativeLayer y) -> Result<NativeLayer> {
         y.qw[calib::kDown].data.pop_back();
         return y;
       },
       Code::kInvalidInput,
       {"model.layers.1.mlp.down_proj.qweight", "bytes of codes"}},
  };
  for (const Case& c : cases) {
    Status st = with_layer1(c.edit);
    EXPECT_EQ(st.code(), c.code) << c.what << ": " << st.to_string();
    for (const std::string& p : c.expect)
      EXPECT_NE(st.message().find(p), std::string::npos) << c.what << ": " << st.message();
    check_nothing_left(c.what);
  }
  {  // An IntactKV cache of the wrong size (after every layer was written).
    calib::NativeSource s = model_source(m, nullptr);
    s.intact_kv = [&m](int64_t l, std::vector<float>* k, std::vector<float>* v) {
      *k = m.intact_k[l];
      *v = m.intact_v[l];
      if (l == 1) v->pop_back();
      return Status::ok();
    };
    expect_error(calib::stream_native(decl, s, out, false), Code::kInvalidInput,
                 {"model.intactkv.1.v has 63 elements, the config implies 64"});
    check_nothing_left("intact size");
  }
  {  // A failing row source of lm_head: its code, with the tensor.
    calib::NativeSource s = model_source(m, nullptr);
    s.lm_head = [](int64_t, int64_t, float*) { return io_error("lm_head: read failed"); };
    expect_error(calib::stream_native(decl, s, out, false), Code::kIoError,
                 {"tensor lm_head.weight", "lm_head: read failed"});
    check_nothing_left("row source failure");
  }
  // Refused before any callback: a bad declaration or missing callbacks.
  struct DeclCase {
    const char* what;
    std::function<void(calib::NativeModelDecl&, calib::NativeSource&)> edit;
    std::vector<std::string> expect;
  };
  const std::vector<DeclCase> decl_cases = {
      {"w_bits",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.w_bits = 5; },
       {"write_native", "w_bits: 5 is not a supported bit width"}},
      {"act bits",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.layers[1].act[0].bits = 7; },
       {"layers[1].act.q_proj.bits"}},
      {"layer count",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.layers.pop_back(); },
       {"layers: 1 layers, the config has 2"}},
      {"online side",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.layers[0].online["a1"] = 7; },
       {"model.layers.0.online.a1 (7×7)", "do not factor the dimension 64"}},
      {"online name",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.layers[0].online["zz"] = 4; },
       {"layers[0].online: unknown transform 'zz'"}},
      {"pk alone",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.layers[0].online.erase("pk_it"); },
       {"must both be present or both absent"}},
      {"prefix id",
       [](calib::NativeModelDecl& d, calib::NativeSource&) { d.intact_prefix[1] = 97; },
       {"intactkv.prefix[1]: token id 97 outside [0, 97)"}},
      {"no layer source",
       [](calib::NativeModelDecl&, calib::NativeSource& s) { s.layer = nullptr; },
       {"the source lacks"}},
      {"no IntactKV source",
       [](calib::NativeModelDecl&, calib::NativeSource& s) { s.intact_logits = nullptr; },
       {"IntactKV prefix is declared"}},
  };
  for (const DeclCase& c : decl_cases) {
    calib::NativeModelDecl d = decl;
    std::vector<std::string> calls;
    calib::NativeSource s = model_source(m, &calls);
    c.edit(d, s);
    Status st = calib::stream_native(d, s, out, false);
    EXPECT_EQ(st.code(), Code::kInvalidInput) << c.what << ": " << st.to_string();
    for (const std::string& p : c.expect)
      EXPECT_NE(st.message().find(p), std::string::npos) << c.what << ": " << st.message();
    EXPECT_TRUE(calls.empty()) << c.what << ": a source was called";
    check_nothing_left(c.what);
  }
}

// ---------------------------------------------------------------- memory

int64_t status_kib(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(in, line))
    if (line.compare(0, n, key) == 0) return std::atoll(line.c_str() + n + 1);
  return -1;
}

// Runs `fn` in a forked child: its peak resident set during `fn` above the
// resident set before it (VmHWM after /proc/self/clear_refs "5"), KiB;
// -1 when `fn` fails or the child dies.
int64_t child_peak_kib(const std::function<Status()>& fn) {
  int fd[2];
  if (::pipe(fd) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fd[0]);
    int64_t v = -1;
    const int64_t before = status_kib("VmRSS:");
    {
      std::ofstream f("/proc/self/clear_refs");
      f << "5";
    }
    if (fn().is_ok()) v = status_kib("VmHWM:") - before;
    if (::write(fd[1], &v, sizeof v) != sizeof v) ::_exit(1);
    ::_exit(0);
  }
  ::close(fd[1]);
  int64_t v = -1;
  if (::read(fd[0], &v, sizeof v) != sizeof v) v = -1;
  ::close(fd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? v : -1;
}

// The memory tests' model: hidden 512, 8 query / 2 KV heads of 64, MLP 1536,
// vocab 2048; `layers` deep. One layer holds 3.0 M weights.
ModelConfig memory_config(int64_t layers) {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 512;
  c.intermediate_size = 1536;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 2048;
  c.torch_dtype = DType::kBF16;
  return c;
}
constexpr int64_t kLayerWeights = 2 * 512 * 512 + 2 * 128 * 512 + 3 * 1536 * 512;

TEST(StreamMemory, PeakResidentSetDoesNotGrowWithTheLayerCount) {
  if (status_kib("VmHWM:") < 0) GTEST_SKIP() << "no /proc/self/status";
  TempDir tmp("qcal_stream_mem_");
  const QuantSpec spec{8, 128, false};
  std::map<int64_t, std::unique_ptr<ModelDir>> src;
  for (int64_t L : {2, 8}) {
    SynthOptions so;
    so.config = memory_config(L);
    ASSERT_TRUE(synth_model(so, tmp.sub("fp" + std::to_string(L))).is_ok());
    auto d = ModelDir::open(tmp.sub("fp" + std::to_string(L)));
    ASSERT_TRUE(d.is_ok());
    src[L] = std::move(d).value();
  }
  auto decls = [&](int64_t L) {
    std::map<std::string, LinearDecl> m;
    for (int64_t l = 0; l < L; ++l)
      for (const char* p : kProjNames) {
        const std::vector<int64_t> s = proj_shape(memory_config(L), p);
        m[layer_prefix(l) + p] = LinearDecl{s[0], s[1], spec, false};
      }
    return m;
  };
  auto gptq = [&](int64_t L, bool stream) {
    return child_peak_kib([&, L, stream]() -> Status {
      const std::string out = tmp.sub("q" + std::to_string(L) + (stream ? "s" : "m"));
      CheckpointStream in;
      in.linears = decls(L);
      in.provide = [](const std::string& name) -> Result<QuantizedLinear> {
        const std::vector<int64_t> s = module_shape(memory_config(1), name);
        return make_linear(s[0], s[1], QuantSpec{8, 128, false}, false, 3, name);
      };
      if (stream) return stream_quantized_checkpoint(*src[L], in, {}, out);
      std::map<std::string, QuantizedLinear> all;  // what the map form needs its caller to hold
      for (const auto& [name, d] : in.linears) all[name] = *in.provide(name);
      return write_quantized_checkpoint(*src[L], all, {}, out);
    });
  };
  // Native: 8-bit weights (one byte per weight), layers made on demand.
  const NCase nk = {"mem", 8, 128, false, ""};
  auto native = [&](int64_t L, bool stream) {
    return child_peak_kib([&, L, stream]() -> Status {
      const std::string out = tmp.sub("n" + std::to_string(L) + (stream ? "s" : "m"));
      NativeModel skeleton;  // config and quantizers only
      skeleton.config = memory_config(L);
      skeleton.w_bits = nk.w_bits;
      skeleton.w_group = nk.w_group;
      skeleton.layers.resize(static_cast<size_t>(L));
      const ModelConfig c = skeleton.config;
      auto layer = [c](int64_t l) -> Result<NativeLayer> {
        NativeLayer y;
        y.input_norm.assign(static_cast<size_t>(c.hidden_size), 1.0f);
        y.post_norm = y.input_norm;
        for (int p = 0; p < calib::kNumProj; ++p)
          y.qw[p] = packed(l, kProjNames[p], calib::proj_out(c, p), calib::proj_in(c, p), 8, 128);
        return y;
      };
      const RowFn wave = [c](int64_t r0, int64_t n, float* o) {
        for (int64_t i = 0; i < n * c.hidden_size; ++i)
          o[i] = static_cast<float>(std::sin(0.001 * static_cast<double>(r0 * c.hidden_size + i)));
        return Status::ok();
      };
      if (stream) {
        calib::NativeModelDecl d = calib::native_decl(skeleton);
        calib::NativeSource s;
        s.embed = wave;
        s.layer = layer;
        s.final_norm = [](int64_t, int64_t n, float* o) {
          std::fill(o, o + n, 1.0f);
          return Status::ok();
        };
        s.lm_head = wave;
        return calib::stream_native(d, s, out, false);
      }
      NativeModel m = skeleton;
      const int64_t VH = c.vocab_size * c.hidden_size;
      m.embed.resize(static_cast<size_t>(VH));
      QCAL_RETURN_IF_ERROR(wave(0, c.vocab_size, m.embed.data()));
      m.lm_head = m.embed;
      m.final_norm.assign(static_cast<size_t>(c.hidden_size), 1.0f);
      for (int64_t l = 0; l < L; ++l) {
        QCAL_ASSIGN_OR_RETURN(m.layers[l], layer(l));
      }
      return calib::write_native(m, out, false);
    });
  };
  const double layer_mib = kLayerWeights / 1048576.0;  // one byte per weight at 8 bits
  for (const char* kind : {"gptq", "native"}) {
    auto run = std::string(kind) == "gptq" ? std::function<int64_t(int64_t, bool)>(gptq)
                                           : std::function<int64_t(int64_t, bool)>(native);
    const int64_t s2 = run(2, true), s8 = run(8, true), m2 = run(2, false), m8 = run(8, false);
    ASSERT_GE(s2, 0) << kind;
    ASSERT_GE(s8, 0) << kind;
    ASSERT_GE(m2, 0) << kind;
    ASSERT_GE(m8, 0) << kind;
    std::printf(
        "  %-6s peak above start, MiB: streaming L=2 %.1f, L=8 %.1f; whole-model L=2 %.1f, "
        "L=8 %.1f (one layer: %.1f)\n",
        kind, s2 / 1024.0, s8 / 1024.0, m2 / 1024.0, m8 / 1024.0, layer_mib);
    // The measurement sees growth: the whole-model form holds 6 more layers at L = 8.
    EXPECT_GT((m8 - m2) / 1024.0, 4.0 * layer_mib) << kind;
    // The streaming form does not grow with depth (less than half a layer's weights).
    EXPECT_LT((s8 - s2) / 1024.0, 0.5 * layer_mib) << kind;
  }
}

}  // namespace
}  // namespace qcal

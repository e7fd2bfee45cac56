// Quantized checkpoint writers and readers (worker/engine/qformats.h).
//
// The round-trip tests read the written files back with `ref::`, a second,
// independent reader written here from shared/design/formats.md alone: it
// parses the safetensors bytes itself (8-byte length + JSON header), decodes
// fp16 itself, unpacks the bit fields word by word (AutoGPTQ's explicit
// 10-10-spill layout for 3 bits) and applies the v1 "zero − 1" quirk. It calls
// nothing from qformats.cc. The dequantized weights must equal
// QuantizedLinear::dequantize() bit for bit.
//
// Letters: O = out_features, I = in_features, b = bits, G = groups.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/fsutil.h"
#include "common/model_config.h"
#include "common/model_dir.h"
#include "common/safetensors.h"
#include "worker/engine/qformats.h"
#include "worker/engine/quantizer.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ======================================================================
// Independent reader, from formats.md.
// ======================================================================
namespace ref {

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
  std::string file;  // file name (within the checkpoint directory)
};
using Tensors = std::map<std::string, RawTensor>;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One safetensors file: u64 little-endian header length N, N bytes of JSON,
// then the data buffer that data_offsets are relative to.
Tensors read_safetensors(const std::string& dir, const std::string& file) {
  const std::string bytes = slurp(dir + "/" + file);
  Tensors out;
  if (bytes.size() < 8) {
    ADD_FAILURE() << file << ": too short";
    return out;
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  const json header = json::parse(bytes.substr(8, n));
  const size_t data = 8 + n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    RawTensor t;
    t.dtype = it.value()["dtype"].get<std::string>();
    t.shape = it.value()["shape"].get<std::vector<int64_t>>();
    const auto off = it.value()["data_offsets"].get<std::vector<uint64_t>>();
    t.bytes = bytes.substr(data + off[0], off[1] - off[0]);
    t.file = file;
    out[it.key()] = std::move(t);
  }
  return out;
}

// A checkpoint directory: model.safetensors, or the shards of the index.
Tensors read_checkpoint(const std::string& dir) {
  const std::string index = dir + "/model.safetensors.index.json";
  if (!fs::exists(index)) return read_safetensors(dir, "model.safetensors");
  const json j = json::parse(slurp(index));
  std::set<std::string> files;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it)
    files.insert(it.value().get<std::string>());
  Tensors all;
  for (const std::string& f : files)
    for (auto& [k, v] : read_safetensors(dir, f)) all[k] = v;
  return all;
}

json read_json(const std::string& path) { return json::parse(slurp(path)); }

// IEEE binary16 → float, by hand.
float half_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0)
    v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31)
    v = man ? NAN : INFINITY;
  else
    v = std::ldexp(static_cast<float>(man | 0x400), exp - 25);
  return sign ? -v : v;
}

std::vector<int32_t> as_i32(const RawTensor& t) {
  EXPECT_EQ(t.dtype, "I32");
  std::vector<int32_t> v(t.bytes.size() / 4);
  std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
  return v;
}
std::vector<int64_t> as_i64(const RawTensor& t) {
  EXPECT_EQ(t.dtype, "I64");
  std::vector<int64_t> v(t.bytes.size() / 8);
  std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
  return v;
}
std::vector<float> as_f16(const RawTensor& t) {
  EXPECT_EQ(t.dtype, "F16");
  std::vector<float> v(t.bytes.size() / 2);
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, t.bytes.data() + 2 * i, 2);
    v[i] = half_to_float(h);
  }
  return v;
}

// 32 b-bit values from b consecutive words, per formats.md: for b ∈ {2,4,8}
// each word holds 32/b values, value k at bit offset b*k; for b = 3 the
// AutoGPTQ layout: word0 = values 0..9 at 3k, value 10's low 2 bits at 30;
// word1 = value 10's bit 2 at 0, values 11..20 at 3(k−11)+1, value 21's low
// bit at 31; word2 = value 21's high 2 bits at 0, values 22..31 at 3(k−22)+2.
std::vector<uint32_t> decode32(const std::vector<uint32_t>& w, int b) {
  std::vector<uint32_t> v(32);
  if (b == 3) {
    for (int k = 0; k < 10; ++k) v[k] = (w[0] >> (3 * k)) & 7;
    v[10] = ((w[0] >> 30) & 3) | ((w[1] & 1) << 2);
    for (int k = 11; k < 21; ++k) v[k] = (w[1] >> (3 * (k - 11) + 1)) & 7;
    v[21] = ((w[1] >> 31) & 1) | ((w[2] & 3) << 1);
    for (int k = 22; k < 32; ++k) v[k] = (w[2] >> (3 * (k - 22) + 2)) & 7;
  } else {
    const int per = 32 / b;
    const uint32_t mask = (1u << b) - 1;
    for (int k = 0; k < 32; ++k) v[k] = (w[k / per] >> (b * (k % per))) & mask;
  }
  return v;
}

// Unpacks `n` values (n a multiple of 32) from the word sequence word(0..).
template <class F>
std::vector<uint32_t> unpack_seq(int64_t n, int b, F word) {
  std::vector<uint32_t> out;
  for (int64_t blk = 0; blk < n / 32; ++blk) {
    std::vector<uint32_t> w(b);
    for (int j = 0; j < b; ++j) w[j] = static_cast<uint32_t>(word(blk * b + j));
    auto v = decode32(w, b);
    out.insert(out.end(), v.begin(), v.end());
  }
  return out;
}

// GPTQ: Ŵ[n, i] = scales[g_idx[i], n] * (q[i, n] − z[g_idx[i], n]); v1 stores z − 1.
std::vector<float> gptq_dequant(const Tensors& T, const std::string& p, int b, bool v1,
                                int64_t* O_out, int64_t* I_out) {
  const RawTensor& qw = T.at(p + ".qweight");
  const int64_t O = qw.shape[1], I = qw.shape[0] * 32 / b;
  const auto qweight = as_i32(qw);
  const auto qzeros = as_i32(T.at(p + ".qzeros"));
  const auto scales = as_f16(T.at(p + ".scales"));
  const auto g_idx = as_i32(T.at(p + ".g_idx"));
  EXPECT_EQ(static_cast<int64_t>(g_idx.size()), I);
  const int64_t G = T.at(p + ".scales").shape[0];
  EXPECT_EQ(T.at(p + ".qzeros").shape, (std::vector<int64_t>{G, O * b / 32}));
  std::vector<std::vector<uint32_t>> qcol(O), zrow(G);
  for (int64_t n = 0; n < O; ++n)
    qcol[n] = unpack_seq(I, b, [&](int64_t r) { return qweight[r * O + n]; });
  for (int64_t g = 0; g < G; ++g)
    zrow[g] = unpack_seq(O, b, [&](int64_t c) { return qzeros[g * (O * b / 32) + c]; });
  std::vector<float> W(O * I);
  for (int64_t n = 0; n < O; ++n)
    for (int64_t i = 0; i < I; ++i) {
      const int64_t g = g_idx[i];
      const int32_t z = static_cast<int32_t>(zrow[g][n]) + (v1 ? 1 : 0);
      W[n * I + i] = scales[g * O + n] * static_cast<float>(static_cast<int32_t>(qcol[n][i]) - z);
    }
  *O_out = O;
  *I_out = I;
  return W;
}

// compressed-tensors pack-quantized: signed codes q_s = packed − 2^(b−1), LSB
// first along each row; scale [O, G]; zero points [ceil(O*b/32), G] packed
// along dim 0 with the same offset; x̂ = s * (q_s − zp).
std::vector<float> ct_dequant(const Tensors& T, const std::string& p, int b, int64_t group_size,
                              int64_t* O_out, int64_t* I_out) {
  const auto shape = as_i64(T.at(p + ".weight_shape"));
  const int64_t O = shape[0], I = shape[1];
  const int per = 32 / b, off = 1 << (b - 1);
  const uint32_t mask = (1u << b) - 1;
  const int64_t W = (I * b + 31) / 32;
  EXPECT_EQ(T.at(p + ".weight_packed").shape, (std::vector<int64_t>{O, W}));
  const auto packed = as_i32(T.at(p + ".weight_packed"));
  const auto scale = as_f16(T.at(p + ".weight_scale"));
  const int64_t G = T.at(p + ".weight_scale").shape[1];
  std::vector<int32_t> zp(O * G, 0);
  if (T.count(p + ".weight_zero_point")) {
    const auto zpp = as_i32(T.at(p + ".weight_zero_point"));
    EXPECT_EQ(T.at(p + ".weight_zero_point").shape, (std::vector<int64_t>{(O * b + 31) / 32, G}));
    for (int64_t o = 0; o < O; ++o)
      for (int64_t g = 0; g < G; ++g)
        zp[o * G + g] =
            static_cast<int32_t>(
                (static_cast<uint32_t>(zpp[(o / per) * G + g]) >> (b * (o % per))) & mask) -
            off;
  }
  std::vector<int32_t> g_idx(I);
  if (T.count(p + ".weight_g_idx"))
    g_idx = as_i32(T.at(p + ".weight_g_idx"));
  else
    for (int64_t i = 0; i < I; ++i) g_idx[i] = group_size > 0 ? i / group_size : 0;
  std::vector<float> Wd(O * I);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) {
      const int32_t qs =
          static_cast<int32_t>((static_cast<uint32_t>(packed[o * W + i / per]) >> (b * (i % per))) &
                               mask) -
          off;
      const int64_t g = g_idx[i];
      Wd[o * I + i] = scale[o * G + g] * static_cast<float>(qs - zp[o * G + g]);
    }
  *O_out = O;
  *I_out = I;
  return Wd;
}

}  // namespace ref

// ======================================================================
// Fixtures: a tiny BF16 LLaMA on disk and random quantized linears.
// ======================================================================

ModelConfig tiny_config() {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 64;
  c.attention_bias = true;  // q/k/v biases: copied next to the packed weights
  c.torch_dtype = DType::kBF16;
  return c;
}

const char* const kProjs[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                               "mlp.down_proj"};

std::vector<int64_t> tiny_proj_shape(const ModelConfig& c, const std::string& proj) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t qd = c.num_attention_heads * c.head_dim, kvd = c.num_key_value_heads * c.head_dim;
  if (proj == "self_attn.q_proj") return {qd, H};
  if (proj == "self_attn.k_proj" || proj == "self_attn.v_proj") return {kvd, H};
  if (proj == "self_attn.o_proj") return {H, qd};
  if (proj == "mlp.down_proj") return {H, I};
  return {I, H};  // gate, up
}

std::string module_name(int64_t l, const char* proj) {
  return "model.layers." + std::to_string(l) + "." + proj;
}

void write_text(const std::string& path, const std::string& s) {
  std::ofstream out(path, std::ios::binary);
  out << s;
}

// Writes the FP model (BF16 tensors) plus config, generation config and a tokenizer.
void write_fp_model(const std::string& dir, const ModelConfig& c) {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  t.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {H}});
    t.push_back({p + "post_attention_layernorm.weight", {H}});
    for (const char* proj : kProjs) {
      auto s = tiny_proj_shape(c, proj);
      t.push_back({p + proj + ".weight", s});
      const std::string ps = proj;
      if (ps == "self_attn.q_proj" || ps == "self_attn.k_proj" || ps == "self_attn.v_proj")
        t.push_back({p + proj + ".bias", {s[0]}});
    }
  }
  t.push_back({"model.norm.weight", {H}});
  t.push_back({"lm_head.weight", {V, H}});
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  SafetensorsWriter w(dir + "/model.safetensors");
  for (auto& [name, shape] : t) w.add(name, DType::kBF16, shape);
  ASSERT_TRUE(w.begin().is_ok());
  for (auto& [name, shape] : t) {
    std::vector<float> v(static_cast<size_t>(Tensor::count(shape)));
    for (float& x : v) x = nd(rng);
    ASSERT_TRUE(w.write_f32(v.data(), v.size()).is_ok()) << name;
  }
  ASSERT_TRUE(w.finish().is_ok());
  write_text(dir + "/config.json", c.to_json().dump(2));
  write_text(dir + "/generation_config.json", R"({"bos_token_id": 1, "eos_token_id": 2})");
  write_text(dir + "/tokenizer.json", R"({"version": "1.0", "model": {"type": "BPE"}})");
}

QuantizedLinear random_linear(int64_t O, int64_t I, const QuantSpec& spec, bool act_order,
                              std::mt19937& rng) {
  QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec = spec;
  q.act_order = act_order;
  const int64_t G = spec.group_size == -1 ? 1 : (I + spec.group_size - 1) / spec.group_size;
  const int maxq = (1 << spec.bits) - 1;
  std::uniform_int_distribution<int> code(0, maxq);
  q.q.resize(O * I);
  for (auto& c : q.q) c = static_cast<uint8_t>(code(rng));
  q.q[0] = 0;
  q.q[O * I - 1] = static_cast<uint8_t>(maxq);
  std::uniform_real_distribution<float> sd(1e-3f, 0.2f);
  q.scales.resize(G * O);
  for (auto& s : q.scales) s = round_to_dtype(sd(rng), DType::kF16);
  q.scales[0] = round_to_dtype(1e-5f, DType::kF16);  // an fp16 subnormal
  q.zeros.resize(G * O);
  for (auto& z : q.zeros) z = spec.sym ? (1 << (spec.bits - 1)) : code(rng);
  if (!spec.sym) {
    q.zeros[0] = 0;
    q.zeros[G * O - 1] = maxq;
  }
  q.g_idx.resize(I);
  std::vector<int32_t> perm(I);
  for (int64_t i = 0; i < I; ++i) perm[i] = static_cast<int32_t>(i);
  if (act_order) std::shuffle(perm.begin(), perm.end(), rng);
  for (int64_t i = 0; i < I; ++i)
    q.g_idx[i] = spec.group_size > 0 ? static_cast<int32_t>(perm[i] / spec.group_size) : 0;
  return q;
}

std::map<std::string, QuantizedLinear> random_model_linears(const ModelConfig& c,
                                                            const QuantSpec& spec, bool act_order,
                                                            uint32_t seed) {
  std::mt19937 rng(seed);
  std::map<std::string, QuantizedLinear> m;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (const char* proj : kProjs) {
      auto s = tiny_proj_shape(c, proj);
      m[module_name(l, proj)] = random_linear(s[0], s[1], spec, act_order, rng);
    }
  return m;
}

// Bitwise float comparison; reports the first mismatch and the count.
void expect_bitwise_equal(const std::vector<float>& got, const std::vector<float>& want,
                          const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0) {
      if (!bad) first = i;
      ++bad;
    }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " values differ; first at "
                     << first << ": got " << (bad ? got[first] : 0.0f) << ", want "
                     << (bad ? want[first] : 0.0f);
}

class QFormatsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string tag = std::string(info->test_suite_name()) + "_" + info->name();
    std::replace(tag.begin(), tag.end(), '/', '_');
    root_ =
        (fs::temp_directory_path() / ("qcal_qformats_" + std::to_string(::getpid()) + "_" + tag))
            .string();
    fs::remove_all(root_);
    fs::create_directories(root_);
    cfg_ = tiny_config();
    src_dir_ = root_ + "/fp";
    write_fp_model(src_dir_, cfg_);
    auto src = ModelDir::open(src_dir_);
    ASSERT_TRUE(src.is_ok()) << src.status().to_string();
    src_ = std::move(src).value();
  }
  void TearDown() override {
    src_.reset();
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  std::unique_ptr<ModelDir> open(const std::string& dir) {
    auto d = ModelDir::open(dir);
    EXPECT_TRUE(d.is_ok()) << d.status().to_string();
    return d.is_ok() ? std::move(d).value() : nullptr;
  }

  // Entries of root_ other than `fp` (outputs, staging directories).
  std::vector<std::string> leftovers() {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(root_))
      if (e.path().filename() != "fp") v.push_back(e.path().filename().string());
    std::sort(v.begin(), v.end());
    return v;
  }

  std::string root_, src_dir_;
  ModelConfig cfg_;
  std::unique_ptr<ModelDir> src_;
};

// ======================================================================
// Round trips through the independent reader.
// ======================================================================

struct RoundTripCase {
  const char* name;
  CheckpointFormat format;
  int bits;
  int64_t group_size;
  bool sym;
  bool act_order;
};

void PrintTo(const RoundTripCase& c, std::ostream* os) { *os << c.name; }

class RoundTrip : public QFormatsTest, public ::testing::WithParamInterface<RoundTripCase> {};

TEST_P(RoundTrip, IndependentReaderMatchesDequantize) {
  const RoundTripCase& tc = GetParam();
  QuantSpec spec;
  spec.bits = tc.bits;
  spec.group_size = tc.group_size;
  spec.sym = tc.sym;
  const auto qlin = random_model_linears(cfg_, spec, tc.act_order, 7);
  WriteOptions opts;
  opts.format = tc.format;
  const std::string out = root_ + "/out";
  Status st = write_quantized_checkpoint(*src_, qlin, opts, out);
  ASSERT_TRUE(st.is_ok()) << st.to_string();

  const ref::Tensors T = ref::read_checkpoint(out);
  const ref::Tensors S = ref::read_checkpoint(src_dir_);
  const json qc = ref::read_json(out + "/config.json")["quantization_config"];
  const bool gptq = tc.format == CheckpointFormat::kGptq;
  if (gptq) {
    EXPECT_EQ(qc["checkpoint_format"], tc.sym ? "gptq" : "gptq_v2");
  } else {
    EXPECT_EQ(qc["quant_method"], "compressed-tensors");
  }
  const bool v1 = gptq && qc["checkpoint_format"] == "gptq";

  // Exactly the expected tensor set.
  std::set<std::string> want;
  for (const auto& [name, t] : S) {
    const bool replaced = name.size() > 7 && name.substr(name.size() - 7) == ".weight" &&
                          qlin.count(name.substr(0, name.size() - 7));
    if (!replaced) want.insert(name);
  }
  for (const auto& [m, q] : qlin) {
    if (gptq) {
      for (const char* s : {"qweight", "qzeros", "scales", "g_idx"}) want.insert(m + "." + s);
    } else {
      for (const char* s : {"weight_packed", "weight_scale", "weight_shape"})
        want.insert(m + "." + s);
      if (!tc.sym) want.insert(m + ".weight_zero_point");
      if (tc.act_order) want.insert(m + ".weight_g_idx");
    }
  }
  std::set<std::string> got;
  for (const auto& [name, t] : T) got.insert(name);
  EXPECT_EQ(got, want);

  // Unquantized tensors (embeddings, norms, biases, lm_head): same dtype, shape, bytes.
  for (const auto& [name, t] : S) {
    if (!T.count(name)) continue;
    EXPECT_EQ(T.at(name).dtype, "BF16") << name;
    EXPECT_EQ(T.at(name).shape, t.shape) << name;
    EXPECT_TRUE(T.at(name).bytes == t.bytes) << name << " not copied byte-identical";
  }

  auto dir = open(out);
  ASSERT_TRUE(dir);
  for (const auto& [m, q] : qlin) {
    int64_t O = 0, I = 0;
    std::vector<float> w = gptq ? ref::gptq_dequant(T, m, tc.bits, v1, &O, &I)
                                : ref::ct_dequant(T, m, tc.bits, tc.group_size, &O, &I);
    EXPECT_EQ(O, q.out_features) << m;
    EXPECT_EQ(I, q.in_features) << m;
    const Tensor want_w = q.dequantize();
    expect_bitwise_equal(w, want_w.data, m + " (independent reader)");

    // qcal's own reader gives back the same struct and weight.
    auto back = read_quantized_linear(*dir, m);
    ASSERT_TRUE(back.is_ok()) << back.status().to_string();
    EXPECT_EQ(back->out_features, q.out_features);
    EXPECT_EQ(back->in_features, q.in_features);
    EXPECT_EQ(back->spec.bits, q.spec.bits);
    EXPECT_EQ(back->spec.group_size, q.spec.group_size);
    EXPECT_EQ(back->spec.sym, q.spec.sym);
    EXPECT_EQ(back->act_order, q.act_order) << m;
    EXPECT_TRUE(back->q == q.q) << m;
    EXPECT_TRUE(back->zeros == q.zeros) << m;
    EXPECT_TRUE(back->g_idx == q.g_idx) << m;
    expect_bitwise_equal(back->scales, q.scales, m + " scales");
    auto rw = read_linear_weight(*dir, m);
    ASSERT_TRUE(rw.is_ok()) << rw.status().to_string();
    EXPECT_EQ(rw->shape, want_w.shape);
    expect_bitwise_equal(rw->data, want_w.data, m + " (read_linear_weight)");
  }
  // lm_head stays FP and reads through the same call.
  auto lm = read_linear_weight(*dir, "lm_head");
  ASSERT_TRUE(lm.is_ok()) << lm.status().to_string();
  auto lm_src = src_->read_f32("lm_head.weight");
  ASSERT_TRUE(lm_src.is_ok());
  expect_bitwise_equal(lm->data, lm_src->data, "lm_head");
}

INSTANTIATE_TEST_SUITE_P(
    Formats, RoundTrip,
    ::testing::Values(
        RoundTripCase{"GptqSym4G128", CheckpointFormat::kGptq, 4, 128, true, false},
        RoundTripCase{"GptqSym4G32", CheckpointFormat::kGptq, 4, 32, true, false},
        RoundTripCase{"GptqAsym4G32V2", CheckpointFormat::kGptq, 4, 32, false, false},
        RoundTripCase{"GptqSym8G32", CheckpointFormat::kGptq, 8, 32, true, false},
        RoundTripCase{"GptqAsym8G16", CheckpointFormat::kGptq, 8, 16, false, false},
        RoundTripCase{"GptqSym2G32", CheckpointFormat::kGptq, 2, 32, true, false},
        RoundTripCase{"GptqAsym2G32", CheckpointFormat::kGptq, 2, 32, false, false},
        RoundTripCase{"GptqSym3G32", CheckpointFormat::kGptq, 3, 32, true, false},
        RoundTripCase{"GptqAsym3G32", CheckpointFormat::kGptq, 3, 32, false, false},
        RoundTripCase{"GptqActOrder4G16", CheckpointFormat::kGptq, 4, 16, true, true},
        RoundTripCase{"GptqActOrderAsym4G32", CheckpointFormat::kGptq, 4, 32, false, true},
        RoundTripCase{"GptqPerChannelSym4", CheckpointFormat::kGptq, 4, -1, true, false},
        RoundTripCase{"GptqPerChannelAsym4", CheckpointFormat::kGptq, 4, -1, false, false},
        RoundTripCase{"GptqGroupNotDividing", CheckpointFormat::kGptq, 4, 48, true, false},
        RoundTripCase{"CtSym4G32", CheckpointFormat::kCompressedTensors, 4, 32, true, false},
        RoundTripCase{"CtSym4G128", CheckpointFormat::kCompressedTensors, 4, 128, true, false},
        RoundTripCase{"CtAsym4G32", CheckpointFormat::kCompressedTensors, 4, 32, false, false},
        RoundTripCase{"CtSym8G32", CheckpointFormat::kCompressedTensors, 8, 32, true, false},
        RoundTripCase{"CtAsym8G16", CheckpointFormat::kCompressedTensors, 8, 16, false, false},
        RoundTripCase{"CtPerChannelSym4", CheckpointFormat::kCompressedTensors, 4, -1, true, false},
        RoundTripCase{"CtPerChannelAsym8", CheckpointFormat::kCompressedTensors, 8, -1, false,
                      false},
        RoundTripCase{"CtActOrder4G16", CheckpointFormat::kCompressedTensors, 4, 16, true, true},
        RoundTripCase{"CtGroupNotDividing", CheckpointFormat::kCompressedTensors, 4, 48, false,
                      false}),
    [](const ::testing::TestParamInfo<RoundTripCase>& info) { return info.param.name; });

// CT rows whose bit length is not a multiple of 32 are zero-padded: a model
// with intermediate size 36, whose down_proj rows are 36 * 4 = 144 bits.
TEST_F(QFormatsTest, CtPadsPartialWords) {
  ModelConfig c = tiny_config();
  c.intermediate_size = 36;
  const std::string dir = root_ + "/fp36";
  write_fp_model(dir, c);
  auto src = open(dir);
  ASSERT_TRUE(src);
  QuantSpec spec;
  spec.bits = 4;
  spec.group_size = 16;  // G = 3, the last group partial
  spec.sym = false;
  std::mt19937 rng(3);
  std::map<std::string, QuantizedLinear> qlin;
  qlin["model.layers.0.mlp.down_proj"] = random_linear(64, 36, spec, false, rng);
  WriteOptions opts;
  opts.format = CheckpointFormat::kCompressedTensors;
  ASSERT_TRUE(write_quantized_checkpoint(*src, qlin, opts, root_ + "/out").is_ok());
  const auto T = ref::read_checkpoint(root_ + "/out");
  const std::string m = "model.layers.0.mlp.down_proj";
  EXPECT_EQ(T.at(m + ".weight_packed").shape, (std::vector<int64_t>{64, 5}));
  EXPECT_EQ(T.at(m + ".weight_scale").shape, (std::vector<int64_t>{64, 3}));
  const auto packed = ref::as_i32(T.at(m + ".weight_packed"));
  for (int64_t o = 0; o < 64; ++o)
    EXPECT_EQ(packed[o * 5 + 4] & ~0xFFFF, 0) << "padding of row " << o;
  int64_t O, I;
  auto w = ref::ct_dequant(T, m, 4, 16, &O, &I);
  expect_bitwise_equal(w, qlin[m].dequantize().data, m);
  // Modules left FP are listed in `ignore`.
  const json qc = ref::read_json(root_ + "/out/config.json")["quantization_config"];
  EXPECT_EQ(qc["ignore"].size(), 14u);
  EXPECT_EQ(qc["ignore"][0], "lm_head");
}

// ======================================================================
// Exact words and configs.
// ======================================================================

TEST_F(QFormatsTest, GptqSymmetricQzerosWords) {
  // v1 stores zero − 1 in every field: 7 per nibble for 4-bit, 0x7F per byte
  // for 8-bit, 1 per 2-bit field; 3-bit stores 3 = 0b011 at every 3rd bit.
  struct Case {
    int bits;
    std::vector<uint32_t> words;
  };
  for (const Case& c : {Case{4, {0x77777777u}}, Case{8, {0x7F7F7F7Fu}}, Case{2, {0x55555555u}},
                        Case{3, {0xDB6DB6DBu, 0xB6DB6DB6u, 0x6DB6DB6Du}}}) {
    QuantSpec spec;
    spec.bits = c.bits;
    spec.group_size = 32;
    spec.sym = true;
    const auto qlin = random_model_linears(cfg_, spec, false, 11);
    const std::string out = root_ + "/out" + std::to_string(c.bits);
    ASSERT_TRUE(write_quantized_checkpoint(*src_, qlin, {}, out).is_ok());
    const auto T = ref::read_checkpoint(out);
    for (const auto& [m, q] : qlin) {
      const auto z = ref::as_i32(T.at(m + ".qzeros"));
      for (size_t i = 0; i < z.size(); ++i)
        ASSERT_EQ(static_cast<uint32_t>(z[i]), c.words[i % c.words.size()])
            << c.bits << "-bit " << m << " word " << i;
    }
  }
  // The documented 4-bit word, as the signed int32 loaders see it.
  EXPECT_EQ(static_cast<int32_t>(0x77777777u), 2004318071);
}

TEST_F(QFormatsTest, GptqConfigFields) {
  QuantSpec spec;  // 4-bit, g128, sym
  auto qlin = random_model_linears(cfg_, spec, false, 5);
  WriteOptions opts;
  opts.extra_config = {{"damp_percent", 0.05}, {"true_sequential", false}, {"method", "gptq"}};
  const std::string out = root_ + "/out";
  ASSERT_TRUE(write_quantized_checkpoint(*src_, qlin, opts, out).is_ok());
  const json cfg = ref::read_json(out + "/config.json");
  const json& qc = cfg["quantization_config"];
  EXPECT_EQ(qc["quant_method"], "gptq");
  EXPECT_EQ(qc["checkpoint_format"], "gptq");
  EXPECT_EQ(qc["bits"], 4);
  EXPECT_EQ(qc["group_size"], 128);
  EXPECT_EQ(qc["sym"], true);
  EXPECT_EQ(qc["desc_act"], false);
  EXPECT_EQ(qc["lm_head"], false);
  EXPECT_EQ(qc["static_groups"], false);
  EXPECT_EQ(qc["true_sequential"], false);
  EXPECT_DOUBLE_EQ(qc["damp_percent"].get<double>(), 0.05);
  EXPECT_EQ(qc["meta"]["quantizer"], json::array({"qcal:0.1.0"}));
  EXPECT_EQ(qc["meta"]["method"], "gptq");
  EXPECT_FALSE(qc.contains("dynamic"));  // every projection is quantized
  // The source config is kept.
  EXPECT_EQ(cfg["hidden_size"], 64);
  EXPECT_EQ(cfg["torch_dtype"], "bfloat16");
  EXPECT_EQ(cfg["num_key_value_heads"], 2);
  // quantize_config.json duplicates it; aux files are copied.
  EXPECT_EQ(ref::read_json(out + "/quantize_config.json"), qc);
  EXPECT_EQ(ref::slurp(out + "/tokenizer.json"), ref::slurp(src_dir_ + "/tokenizer.json"));
  EXPECT_EQ(ref::slurp(out + "/generation_config.json"),
            ref::slurp(src_dir_ + "/generation_config.json"));
  // Keys are written sorted.
  const std::string text = ref::slurp(out + "/config.json");
  EXPECT_LT(text.find("\"attention_bias\""), text.find("\"hidden_size\""));
  EXPECT_LT(text.find("\"bits\""), text.find("\"checkpoint_format\""));

  // Asymmetric → gptq_v2; act-order → desc_act; a projection left FP → dynamic exclusion.
  spec.sym = false;
  spec.group_size = 32;
  qlin = random_model_linears(cfg_, spec, true, 6);
  qlin.erase("model.layers.1.mlp.down_proj");
  ASSERT_TRUE(write_quantized_checkpoint(*src_, qlin, {}, root_ + "/out2").is_ok());
  const json qc2 = ref::read_json(root_ + "/out2/config.json")["quantization_config"];
  EXPECT_EQ(qc2["checkpoint_format"], "gptq_v2");
  EXPECT_EQ(qc2["sym"], false);
  EXPECT_EQ(qc2["desc_act"], true);
  EXPECT_EQ(qc2["group_size"], 32);
  EXPECT_DOUBLE_EQ(qc2["damp_percent"].get<double>(), 0.01);
  EXPECT_EQ(qc2["dynamic"], json({{"-:^model\\.layers\\.1\\.mlp\\.down_proj$", json::object()}}));
  // The FP projection is copied as is.
  const auto T = ref::read_checkpoint(root_ + "/out2");
  EXPECT_EQ(T.count("model.layers.1.mlp.down_proj.weight"), 1u);
  EXPECT_EQ(T.count("model.layers.1.mlp.down_proj.qweight"), 0u);
  auto d2 = open(root_ + "/out2");
  ASSERT_TRUE(d2);
  EXPECT_EQ(read_quantized_linear(*d2, "model.layers.1.mlp.down_proj").status().code(),
            Code::kNotFound);
  auto fpw = read_linear_weight(*d2, "model.layers.1.mlp.down_proj");
  ASSERT_TRUE(fpw.is_ok()) << fpw.status().to_string();
  auto srcw = src_->read_f32("model.layers.1.mlp.down_proj.weight");
  ASSERT_TRUE(srcw.is_ok());
  expect_bitwise_equal(fpw->data, srcw->data, "FP down_proj");
  EXPECT_TRUE(read_quantized_linear(*d2, "model.layers.0.mlp.down_proj").is_ok());
}

TEST_F(QFormatsTest, CompressedTensorsConfigExact) {
  QuantSpec spec;
  spec.bits = 4;
  spec.group_size = 128;
  spec.sym = true;
  WriteOptions opts;
  opts.format = CheckpointFormat::kCompressedTensors;
  const std::string out = root_ + "/out";
  ASSERT_TRUE(
      write_quantized_checkpoint(*src_, random_model_linears(cfg_, spec, false, 1), opts, out)
          .is_ok());
  const json want = json::parse(R"({
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "version": "0.12.0+qcal",
    "config_groups": {
      "group_0": {
        "targets": ["Linear"],
        "weights": {
          "num_bits": 4, "type": "int", "symmetric": true,
          "strategy": "group", "group_size": 128,
          "block_structure": null, "dynamic": false, "actorder": null,
          "scale_dtype": null, "zp_dtype": null,
          "observer": "minmax", "observer_kwargs": {}
        },
        "input_activations": null, "output_activations": null,
        "format": "pack-quantized"
      }
    },
    "ignore": ["lm_head"],
    "kv_cache_scheme": null,
    "global_compression_ratio": null,
    "sparsity_config": {},
    "transform_config": {}
  })");
  EXPECT_EQ(ref::read_json(out + "/config.json")["quantization_config"], want);
  EXPECT_FALSE(fs::exists(out + "/quantize_config.json"));

  // Per channel, asymmetric, act-order.
  spec.group_size = -1;
  spec.sym = false;
  ASSERT_TRUE(write_quantized_checkpoint(*src_, random_model_linears(cfg_, spec, false, 2), opts,
                                         root_ + "/out2")
                  .is_ok());
  json w = ref::read_json(
      root_ + "/out2/config.json")["quantization_config"]["config_groups"]["group_0"]["weights"];
  EXPECT_EQ(w["strategy"], "channel");
  EXPECT_EQ(w["group_size"], -1);
  EXPECT_EQ(w["symmetric"], false);
  spec.group_size = 32;
  spec.sym = true;
  ASSERT_TRUE(write_quantized_checkpoint(*src_, random_model_linears(cfg_, spec, true, 3), opts,
                                         root_ + "/out3")
                  .is_ok());
  w = ref::read_json(
      root_ + "/out3/config.json")["quantization_config"]["config_groups"]["group_0"]["weights"];
  EXPECT_EQ(w["actorder"], "group");
}

// ======================================================================
// Sharding, overwrite, failures.
// ======================================================================

TEST_F(QFormatsTest, ShardedOutputWithIndexReadsBack) {
  QuantSpec spec;
  spec.group_size = 32;
  const auto qlin = random_model_linears(cfg_, spec, false, 9);
  WriteOptions opts;
  opts.max_shard_bytes = 12000;  // the 64x64 BF16 embeddings alone are 8 KiB
  const std::string out = root_ + "/out";
  ASSERT_TRUE(write_quantized_checkpoint(*src_, qlin, opts, out).is_ok());
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
  const json index = ref::read_json(out + "/model.safetensors.index.json");
  std::set<std::string> shard_files;
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().extension() == ".safetensors") shard_files.insert(e.path().filename().string());
  ASSERT_GT(shard_files.size(), 2u);
  const size_t n = shard_files.size();
  char buf[64];
  for (size_t k = 1; k <= n; ++k) {
    std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", k, n);
    EXPECT_TRUE(shard_files.count(buf)) << buf;
  }
  const auto T = ref::read_checkpoint(out);
  uint64_t total = 0;
  for (const auto& [name, t] : T) {
    total += t.bytes.size();
    EXPECT_EQ(index["weight_map"][name], t.file) << name;
  }
  EXPECT_EQ(index["weight_map"].size(), T.size());
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  // Each shard but those holding one oversized tensor stays within the limit.
  for (const std::string& f : shard_files) {
    const auto shard = ref::read_safetensors(out, f);
    uint64_t bytes = 0;
    for (const auto& [name, t] : shard) bytes += t.bytes.size();
    if (shard.size() > 1) {
      EXPECT_LE(bytes, opts.max_shard_bytes) << f;
    }
  }
  auto dir = open(out);
  ASSERT_TRUE(dir);
  for (const auto& [m, q] : qlin) {
    auto w = read_linear_weight(*dir, m);
    ASSERT_TRUE(w.is_ok()) << w.status().to_string();
    expect_bitwise_equal(w->data, q.dequantize().data, m);
  }
}

TEST_F(QFormatsTest, ExistingOutputWithoutOverwriteIsUntouched) {
  const std::string out = root_ + "/out";
  fs::create_directories(out);
  write_text(out + "/keep.txt", "precious");
  QuantSpec spec;
  const auto qlin = random_model_linears(cfg_, spec, false, 2);
  Status st = write_quantized_checkpoint(*src_, qlin, {}, out);
  EXPECT_EQ(st.code(), Code::kInvalidInput) << st.to_string();
  EXPECT_NE(st.message().find("exists"), std::string::npos) << st.message();
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(out)) files.push_back(e.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"keep.txt"});
  EXPECT_EQ(ref::slurp(out + "/keep.txt"), "precious");
  EXPECT_EQ(leftovers(), std::vector<std::string>{"out"});

  WriteOptions opts;
  opts.overwrite = true;
  // Never over the source model itself.
  st = write_quantized_checkpoint(*src_, qlin, opts, src_dir_);
  EXPECT_EQ(st.code(), Code::kInvalidInput) << st.to_string();
  EXPECT_TRUE(fs::exists(src_dir_ + "/model.safetensors"));
  // Nor over a directory qcal did not publish (issue #11), overwrite or not.
  st = write_quantized_checkpoint(*src_, qlin, opts, out);
  EXPECT_EQ(st.code(), Code::kPermissionDenied) << st.to_string();
  EXPECT_EQ(ref::slurp(out + "/keep.txt"), "precious");
  EXPECT_EQ(leftovers(), std::vector<std::string>{"out"});
  // A qcal output (it carries .qcal-output.json) is replaced with overwrite.
  fs::remove_all(out);
  ASSERT_TRUE(write_quantized_checkpoint(*src_, qlin, {}, out).is_ok());
  write_text(out + "/keep.txt", "stale");
  st = write_quantized_checkpoint(*src_, qlin, opts, out);
  ASSERT_TRUE(st.is_ok()) << st.to_string();
  EXPECT_FALSE(fs::exists(out + "/keep.txt"));
  EXPECT_TRUE(fs::exists(out + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(out + "/.qcal-output.json"));
  EXPECT_EQ(leftovers(), std::vector<std::string>{"out"});
}

TEST_F(QFormatsTest, InvalidModuleLeavesNothing) {
  QuantSpec spec;
  spec.group_size = 32;
  const std::string out = root_ + "/out";
  {  // a code out of range in one module
    auto qlin = random_model_linears(cfg_, spec, false, 4);
    qlin["model.layers.1.mlp.up_proj"].q[5] = 16;
    Status st = write_quantized_checkpoint(*src_, qlin, {}, out);
    EXPECT_EQ(st.code(), Code::kInvalidInput);
    EXPECT_NE(st.message().find("model.layers.1.mlp.up_proj"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("16"), std::string::npos) << st.message();
  }
  {  // mixed bits
    auto qlin = random_model_linears(cfg_, spec, false, 4);
    QuantSpec s8 = spec;
    s8.bits = 8;
    std::mt19937 rng(1);
    qlin["model.layers.1.self_attn.k_proj"] = random_linear(32, 64, s8, false, rng);
    Status st = write_quantized_checkpoint(*src_, qlin, {}, out);
    EXPECT_EQ(st.code(), Code::kInvalidInput);
    EXPECT_NE(st.message().find("model.layers.1.self_attn.k_proj"), std::string::npos)
        << st.message();
  }
  {  // a module the source does not have, and one of the wrong shape
    auto qlin = random_model_linears(cfg_, spec, false, 4);
    std::mt19937 rng(1);
    qlin["model.layers.7.mlp.up_proj"] = random_linear(128, 64, spec, false, rng);
    Status st = write_quantized_checkpoint(*src_, qlin, {}, out);
    EXPECT_EQ(st.code(), Code::kInvalidInput);
    EXPECT_NE(st.message().find("model.layers.7.mlp.up_proj"), std::string::npos) << st.message();
    qlin.erase("model.layers.7.mlp.up_proj");
    qlin["model.layers.0.mlp.up_proj"] = random_linear(64, 64, spec, false, rng);
    st = write_quantized_checkpoint(*src_, qlin, {}, out);
    EXPECT_EQ(st.code(), Code::kInvalidInput);
    EXPECT_NE(st.message().find("[128, 64]"), std::string::npos) << st.message();
  }
  {  // compressed-tensors refuses 3-bit
    QuantSpec s3 = spec;
    s3.bits = 3;
    WriteOptions opts;
    opts.format = CheckpointFormat::kCompressedTensors;
    Status st =
        write_quantized_checkpoint(*src_, random_model_linears(cfg_, s3, false, 4), opts, out);
    EXPECT_EQ(st.code(), Code::kInvalidInput);
  }
  EXPECT_TRUE(write_quantized_checkpoint(*src_, {}, {}, out).code() == Code::kInvalidInput);
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

TEST_F(QFormatsTest, FailureMidWriteLeavesNoOutputOrStaging) {
  // The shards are written before the aux files are copied; a tokenizer file
  // that is a directory makes the copy fail after the tensors are on disk (an
  // input that is not a regular file: kInvalidInput, common/path_policy.h).
  fs::create_directories(src_dir_ + "/tokenizer.model");
  QuantSpec spec;
  Status st = write_quantized_checkpoint(*src_, random_model_linears(cfg_, spec, false, 4), {},
                                         root_ + "/out");
  EXPECT_EQ(st.code(), Code::kInvalidInput) << st.to_string();
  EXPECT_NE(st.message().find("tokenizer.model"), std::string::npos) << st.message();
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
}

// ======================================================================
// check_writable, readers' errors, inspect, packing primitives.
// ======================================================================

TEST(QFormats, CheckWritableNamesTheNumbers) {
  std::mt19937 rng(1);
  QuantSpec spec;
  spec.group_size = 16;
  spec.bits = 3;
  // 3-bit GPTQ needs I and O multiples of 32.
  Status st = check_writable(random_linear(64, 48, spec, false, rng), CheckpointFormat::kGptq);
  EXPECT_EQ(st.code(), Code::kInvalidInput);
  EXPECT_NE(st.message().find("in_features 48"), std::string::npos) << st.message();
  st = check_writable(random_linear(40, 64, spec, false, rng), CheckpointFormat::kGptq);
  EXPECT_NE(st.message().find("out_features 40"), std::string::npos) << st.message();
  EXPECT_TRUE(
      check_writable(random_linear(32, 64, spec, false, rng), CheckpointFormat::kGptq).is_ok());
  EXPECT_EQ(
      check_writable(random_linear(32, 64, spec, false, rng), CheckpointFormat::kCompressedTensors)
          .code(),
      Code::kInvalidInput);
  // 4-bit: multiples of 8 suffice for GPTQ; compressed-tensors pads.
  spec.bits = 4;
  EXPECT_TRUE(
      check_writable(random_linear(24, 40, spec, false, rng), CheckpointFormat::kGptq).is_ok());
  st = check_writable(random_linear(36, 40, spec, false, rng), CheckpointFormat::kGptq);
  EXPECT_NE(st.message().find("out_features 36"), std::string::npos) << st.message();
  EXPECT_TRUE(
      check_writable(random_linear(36, 44, spec, false, rng), CheckpointFormat::kCompressedTensors)
          .is_ok());
  EXPECT_EQ(check_writable(random_linear(32, 64, spec, false, rng), CheckpointFormat::kGptq).code(),
            Code::kOk);
  // Only the shape and spec matter: a probe without data is checked the same.
  QuantizedLinear probe;
  probe.out_features = 36;
  probe.in_features = 64;
  probe.spec = spec;
  probe.act_order = true;
  EXPECT_NE(check_writable(probe, CheckpointFormat::kGptq).message().find("out_features 36"),
            std::string::npos);
  probe.out_features = 32;
  EXPECT_TRUE(check_writable(probe, CheckpointFormat::kGptq).is_ok());
  probe.spec.bits = 5;
  EXPECT_EQ(check_writable(probe, CheckpointFormat::kGptq).code(), Code::kInvalidInput);
  probe.spec.bits = 4;
  probe.spec.group_size = 0;
  EXPECT_EQ(check_writable(probe, CheckpointFormat::kGptq).code(), Code::kInvalidInput);
}

// The writer also checks each linear's data against its shape and spec.
TEST_F(QFormatsTest, InconsistentLinearIsRefusedByWriter) {
  QuantSpec spec;
  spec.group_size = 32;
  const std::string m = "model.layers.0.self_attn.o_proj";
  auto refused = [&](auto mutate, const std::string& needle) {
    auto qlin = random_model_linears(cfg_, spec, false, 21);
    mutate(qlin[m]);
    Status st = write_quantized_checkpoint(*src_, qlin, {}, root_ + "/out");
    EXPECT_EQ(st.code(), Code::kInvalidInput) << needle;
    EXPECT_NE(st.message().find(m), std::string::npos) << st.message();
    EXPECT_NE(st.message().find(needle), std::string::npos) << st.message();
  };
  refused([](QuantizedLinear& q) { q.zeros[3] = 7; }, "symmetric quantizer has zero 8");
  refused([](QuantizedLinear& q) { q.scales[2] = 0.1f; }, "fp16");
  refused([](QuantizedLinear& q) { q.scales[2] = INFINITY; }, "fp16");
  refused([](QuantizedLinear& q) { q.scales.pop_back(); }, "scales has 127 values");
  refused([](QuantizedLinear& q) { q.q.resize(10); }, "q has 10 codes");
  refused([](QuantizedLinear& q) { std::swap(q.g_idx[0], q.g_idx[63]); }, "act_order is false");
  refused([](QuantizedLinear& q) { q.g_idx[5] = 2; }, "outside [0, 2)");
  refused(
      [](QuantizedLinear& q) {
        q.act_order = true;
        q.g_idx.clear();
      },
      "g_idx is empty");
  EXPECT_EQ(leftovers(), std::vector<std::string>{});
  // A permuted g_idx is fine with act_order.
  auto qlin = random_model_linears(cfg_, spec, false, 21);
  std::swap(qlin[m].g_idx[0], qlin[m].g_idx[63]);
  qlin[m].act_order = true;
  EXPECT_TRUE(write_quantized_checkpoint(*src_, qlin, {}, root_ + "/out").is_ok());
}

TEST_F(QFormatsTest, ReaderErrorsNameTheTensor) {
  // A GPTQ checkpoint written by hand with a qzeros of the wrong width.
  const std::string dir = root_ + "/bad";
  fs::create_directories(dir);
  json cfg = cfg_.to_json();
  cfg["quantization_config"] = {{"quant_method", "gptq"},
                                {"checkpoint_format", "gptq"},
                                {"bits", 4},
                                {"group_size", 128},
                                {"sym", true},
                                {"desc_act", false}};
  write_text(dir + "/config.json", cfg.dump());
  {
    SafetensorsWriter w(dir + "/model.safetensors");
    w.add("m.qweight", DType::kI32, {8, 32});
    w.add("m.qzeros", DType::kI32, {1, 3});
    w.add("m.scales", DType::kF16, {1, 32});
    w.add("m.g_idx", DType::kI32, {64});
    w.add("n.qweight", DType::kI32, {8, 32});
    w.add("n.qzeros", DType::kI32, {1, 4});
    w.add("n.scales", DType::kF16, {1, 32});
    w.add("n.g_idx", DType::kI32, {64});
    ASSERT_TRUE(w.begin().is_ok());
    for (int k = 0; k < 2; ++k) {
      ASSERT_TRUE(w.write(std::string(8 * 32 * 4, '\0')).is_ok());
      ASSERT_TRUE(w.write(std::string((k == 0 ? 3 : 4) * 4, '\x77')).is_ok());
      std::vector<float> s(32, 0.5f);
      ASSERT_TRUE(w.write_f32(s.data(), s.size()).is_ok());
      std::vector<int32_t> g(64, 0);
      if (k == 1) g[10] = 1;  // outside [0, G=1)
      ASSERT_TRUE(w.write(std::string(reinterpret_cast<const char*>(g.data()), 256)).is_ok());
    }
    ASSERT_TRUE(w.finish().is_ok());
  }
  auto d = open(dir);
  ASSERT_TRUE(d);
  auto r = read_quantized_linear(*d, "m");
  EXPECT_EQ(r.status().code(), Code::kCorrupt);
  EXPECT_NE(r.status().message().find("m.qzeros"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find("[1, 4]"), std::string::npos) << r.status().message();
  r = read_quantized_linear(*d, "n");
  EXPECT_EQ(r.status().code(), Code::kCorrupt);
  EXPECT_NE(r.status().message().find("n.g_idx"), std::string::npos) << r.status().message();
  r = read_quantized_linear(*d, "absent");
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  // An FP model has nothing quantized.
  EXPECT_EQ(read_quantized_linear(*src_, "model.layers.0.mlp.up_proj").status().code(),
            Code::kNotFound);
  // read_linear_weight of an FP model is the weight itself.
  auto w = read_linear_weight(*src_, "model.layers.0.mlp.up_proj");
  ASSERT_TRUE(w.is_ok());
  EXPECT_EQ(w->shape, (std::vector<int64_t>{128, 64}));
}

TEST_F(QFormatsTest, InspectSummarizesBothFormats) {
  auto fp = inspect_checkpoint(*src_);
  ASSERT_TRUE(fp.is_ok()) << fp.status().to_string();
  EXPECT_TRUE((*fp)["quantization"].is_null());
  EXPECT_EQ((*fp)["num_quantized_modules"], 0);
  EXPECT_EQ((*fp)["modules"], json::array());
  EXPECT_EQ((*fp)["config"]["hidden_size"], 64);
  EXPECT_EQ((*fp)["config"]["num_key_value_heads"], 2);
  EXPECT_EQ((*fp)["config"]["torch_dtype"], "bfloat16");
  EXPECT_EQ((*fp)["config"]["num_parameters"], cfg_.num_parameters());
  const int64_t n_src = static_cast<int64_t>(src_->tensor_names().size());
  EXPECT_EQ((*fp)["num_fp_tensors"], n_src);
  EXPECT_EQ((*fp)["files"].size(), 1u);
  EXPECT_EQ((*fp)["total_bytes"], fs::file_size(src_dir_ + "/model.safetensors"));

  for (CheckpointFormat f : {CheckpointFormat::kGptq, CheckpointFormat::kCompressedTensors}) {
    QuantSpec spec;
    spec.group_size = 32;
    spec.sym = false;
    WriteOptions opts;
    opts.format = f;
    const std::string out = root_ + "/out_" + checkpoint_format_name(f);
    ASSERT_TRUE(
        write_quantized_checkpoint(*src_, random_model_linears(cfg_, spec, true, 8), opts, out)
            .is_ok());
    auto d = open(out);
    ASSERT_TRUE(d);
    auto j = inspect_checkpoint(*d);
    ASSERT_TRUE(j.is_ok()) << j.status().to_string();
    const json& qj = (*j)["quantization"];
    EXPECT_EQ(qj["format"], f == CheckpointFormat::kGptq ? "gptq_v2" : "compressed-tensors");
    EXPECT_EQ(qj["bits"], 4);
    EXPECT_EQ(qj["group_size"], 32);
    EXPECT_EQ(qj["sym"], false);
    EXPECT_EQ(qj["desc_act"], true);
    EXPECT_EQ((*j)["num_quantized_modules"], 14);
    EXPECT_EQ((*j)["num_fp_tensors"], n_src - 14);
    std::map<std::string, json> mods;
    for (const json& m : (*j)["modules"]) mods[m["name"].get<std::string>()] = m;
    EXPECT_EQ(mods.size(), 14u);
    EXPECT_EQ(
        mods["model.layers.1.mlp.down_proj"],
        json({{"name", "model.layers.1.mlp.down_proj"}, {"out", 64}, {"in", 128}, {"groups", 4}}));
    EXPECT_EQ(
        mods["model.layers.0.self_attn.k_proj"],
        json(
            {{"name", "model.layers.0.self_attn.k_proj"}, {"out", 32}, {"in", 64}, {"groups", 2}}));
  }
}

TEST(QFormats, ParseCheckpointFormat) {
  EXPECT_EQ(*parse_checkpoint_format("gptq"), CheckpointFormat::kGptq);
  EXPECT_EQ(*parse_checkpoint_format("compressed-tensors"), CheckpointFormat::kCompressedTensors);
  EXPECT_EQ(parse_checkpoint_format("awq").status().code(), Code::kInvalidInput);
  EXPECT_STREQ(checkpoint_format_name(CheckpointFormat::kGptq), "gptq");
  EXPECT_STREQ(checkpoint_format_name(CheckpointFormat::kCompressedTensors), "compressed-tensors");
  for (auto f : {CheckpointFormat::kGptq, CheckpointFormat::kCompressedTensors})
    EXPECT_EQ(*parse_checkpoint_format(checkpoint_format_name(f)), f);
}

TEST(QFormats, PackBitsRoundTripAndLayout) {
  std::mt19937 rng(2);
  for (int bits = 1; bits <= 8; ++bits)
    for (int dim = 0; dim < 2; ++dim)
      for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {7, 13}, {32, 3}, {64, 96}}) {
        std::uniform_int_distribution<int32_t> d(0, (1 << bits) - 1);
        std::vector<int32_t> v(rows * cols);
        for (auto& x : v) x = d(rng);
        auto w = pack_bits(v, rows, cols, bits, dim);
        const int64_t n = dim == 0 ? rows : cols;
        EXPECT_EQ(static_cast<int64_t>(w.size()), packed_words(n, bits) * (dim == 0 ? cols : rows));
        EXPECT_EQ(unpack_bits(w, rows, cols, bits, dim), v) << bits << " bits, dim " << dim;
      }
  // 4-bit: value k at bit 4k, LSB first.
  EXPECT_EQ(pack_bits({1, 2, 3, 4, 5, 6, 7, 8}, 1, 8, 4, 1),
            std::vector<int32_t>{static_cast<int32_t>(0x87654321u)});
  EXPECT_EQ(pack_bits({1, 2, 3}, 3, 1, 8, 0), std::vector<int32_t>{0x030201});
  // 3-bit: matches the independent AutoGPTQ-layout decoder.
  std::vector<int32_t> v(32);
  std::uniform_int_distribution<int32_t> d(0, 7);
  for (auto& x : v) x = d(rng);
  auto w = pack_bits(v, 1, 32, 3, 1);
  ASSERT_EQ(w.size(), 3u);
  auto dec = ref::decode32(
      {static_cast<uint32_t>(w[0]), static_cast<uint32_t>(w[1]), static_cast<uint32_t>(w[2])}, 3);
  for (int k = 0; k < 32; ++k) EXPECT_EQ(static_cast<int32_t>(dec[k]), v[k]) << k;
}

}  // namespace
}  // namespace qcal

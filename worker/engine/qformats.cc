// GPTQ and compressed-tensors checkpoint writers and readers
// (shared/design/formats.md §2a, §2b). Letters as in qformats.h: O, I, b, G.
#include "worker/engine/qformats.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <regex>
#include <set>
#include <utility>

#include "common/dtype.h"
#include "common/fsutil.h"
#include "common/path_policy.h"
#include "common/safetensors.h"

namespace qcal {

// Safetensors data is little-endian; tensors are copied to and from it with memcpy.
static_assert(std::endian::native == std::endian::little, "qcal assumes a little-endian host");
static_assert(sizeof(int32_t) == 4 && sizeof(int64_t) == 8 && sizeof(uint16_t) == 2);

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kQuantizerTag = "qcal:0.1.0";
// compressed-tensors records the library version that wrote the checkpoint; no
// loader interprets it. A PEP 440 local version marks the writer.
constexpr const char* kCtVersion = "0.12.0+qcal";

// Files of a HF model directory copied verbatim when present.
constexpr const char* kAuxFiles[] = {
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
};

// Tensor suffixes of a packed module, per format.
constexpr const char* kGptqSuffixes[] = {"qweight", "qzeros", "scales", "g_idx"};
constexpr const char* kCtSuffixes[] = {"weight_packed", "weight_scale", "weight_zero_point",
                                       "weight_shape", "weight_g_idx"};

std::string num(int64_t v) { return std::to_string(v); }

bool valid_bits(int b) { return b == 2 || b == 3 || b == 4 || b == 8; }

// ceil(n * bits / 32): the int32 words of a bit stream of n values.
constexpr int64_t words_for(int64_t n, int bits) { return (n * bits + 31) / 32; }
// The layouts of formats.md in numbers: 32/b values per word for b | 32, and
// AutoGPTQ's 3-bit block of 32 values in exactly 3 words (96 bits, no padding).
static_assert(words_for(16, 2) == 1 && words_for(8, 4) == 1 && words_for(4, 8) == 1);
static_assert(words_for(32, 3) == 3 && words_for(10, 3) == 1 && words_for(11, 3) == 2);
struct Gptq3BitBlock {
  uint32_t word[3];  // values 0..9 | 10 (split) | 11..20 | 21 (split) | 22..31
};
static_assert(sizeof(Gptq3BitBlock) * 8 == 32 * 3, "3-bit block: 32 values in 96 bits");
// v1 zero − 1 for symmetric 4-bit: 7 in every nibble.
static_assert(static_cast<int32_t>(0x77777777u) == 2004318071);

int64_t expected_groups(int64_t in_features, int64_t group_size) {
  return group_size == -1 ? 1 : (in_features + group_size - 1) / group_size;
}

// ---- bit streams (see qformats.h) ----

// Feeds values get(0..n) into a bit stream; put(j, word) receives each word once, in order.
template <class Get, class Put>
void pack_stream(int64_t n, int bits, Get get, Put put) {
  uint64_t acc = 0;
  int filled = 0;
  int64_t w = 0;
  for (int64_t k = 0; k < n; ++k) {
    acc |= static_cast<uint64_t>(get(k)) << filled;
    filled += bits;
    if (filled >= 32) {
      put(w++, static_cast<uint32_t>(acc));
      acc >>= 32;
      filled -= 32;
    }
  }
  if (filled > 0) put(w++, static_cast<uint32_t>(acc));
}

// Reads n values from a bit stream whose words are word(0..); put(k, value).
template <class Word, class Put>
void unpack_stream(int64_t n, int bits, Word word, Put put) {
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  uint64_t acc = 0;
  int avail = 0;
  int64_t w = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (avail < bits) {
      acc |= static_cast<uint64_t>(static_cast<uint32_t>(word(w++))) << avail;
      avail += 32;
    }
    put(k, static_cast<int32_t>(acc & mask));
    acc >>= bits;
    avail -= bits;
  }
}

template <class T>
std::string to_bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// ---- what a QuantizedLinear becomes on disk ----

struct PackedSpec {
  std::string suffix;
  DType dtype;
  std::vector<int64_t> shape;
};

// g_idx of `q`, derived as i / group_size when the struct leaves it empty.
std::vector<int32_t> effective_g_idx(const QuantizedLinear& q) {
  if (!q.g_idx.empty()) return q.g_idx;
  std::vector<int32_t> g(static_cast<size_t>(q.in_features), 0);
  if (q.spec.group_size > 0)
    for (int64_t i = 0; i < q.in_features; ++i)
      g[static_cast<size_t>(i)] = static_cast<int32_t>(i / q.spec.group_size);
  return g;
}

// The tensors replacing `<prefix>.weight` of a linear declared as `q`, sorted
// by suffix. `with_g_idx` only matters for compressed-tensors (GPTQ always
// stores g_idx).
std::vector<PackedSpec> packed_specs(const LinearDecl& q, CheckpointFormat f, bool with_g_idx) {
  const int64_t O = q.out_features, I = q.in_features, b = q.spec.bits;
  const int64_t G = expected_groups(I, q.spec.group_size);
  std::vector<PackedSpec> out;
  if (f == CheckpointFormat::kGptq) {
    out.push_back({"g_idx", DType::kI32, {I}});
    out.push_back({"qweight", DType::kI32, {I * b / 32, O}});
    out.push_back({"qzeros", DType::kI32, {G, O * b / 32}});
    out.push_back({"scales", DType::kF16, {G, O}});
  } else {
    if (with_g_idx) out.push_back({"weight_g_idx", DType::kI32, {I}});
    out.push_back({"weight_packed", DType::kI32, {O, packed_words(I, static_cast<int>(b))}});
    out.push_back({"weight_scale", DType::kF16, {O, G}});
    out.push_back({"weight_shape", DType::kI64, {2}});
    if (!q.spec.sym)
      out.push_back({"weight_zero_point", DType::kI32, {packed_words(O, static_cast<int>(b)), G}});
  }
  return out;
}

// Little-endian bytes of packed tensor `suffix` of `q` (after check_writable);
// suffixes are unique across the two formats.
std::string pack_tensor(const QuantizedLinear& q, const std::string& suffix) {
  const int64_t O = q.out_features, I = q.in_features, G = q.num_groups();
  const int b = q.spec.bits;
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  if (suffix == "g_idx" || suffix == "weight_g_idx") return to_bytes(effective_g_idx(q));
  if (suffix == "qweight") {  // (I*b/32, O): column o is the stream of q[o, :]
    std::vector<int32_t> w(at(I * b / 32 * O));
    for (int64_t o = 0; o < O; ++o)
      pack_stream(
          I, b, [&](int64_t k) { return q.q[at(o * I + k)]; },
          [&](int64_t j, uint32_t v) { w[at(j * O + o)] = static_cast<int32_t>(v); });
    return to_bytes(w);
  }
  if (suffix == "qzeros") {  // (G, O*b/32): row g is the stream of z'[g, :]
    // v1 ("gptq", written for symmetric models) stores zero − 1.
    const int32_t off = q.spec.sym ? 1 : 0;
    const int64_t W = O * b / 32;
    std::vector<int32_t> z(at(G * W));
    for (int64_t g = 0; g < G; ++g)
      pack_stream(
          O, b, [&](int64_t k) { return static_cast<uint32_t>(q.zeros[at(g * O + k)] - off); },
          [&](int64_t j, uint32_t v) { z[at(g * W + j)] = static_cast<int32_t>(v); });
    return to_bytes(z);
  }
  if (suffix == "scales") {  // (G, O), the struct's own layout
    std::vector<uint16_t> h(q.scales.size());
    from_f32(DType::kF16, q.scales.data(), h.data(), h.size());
    return to_bytes(h);
  }
  if (suffix == "weight_packed") {  // (O, ceil(I*b/32)): row o is the stream of q[o, :]
    const int64_t W = packed_words(I, b);
    std::vector<int32_t> w(at(O * W));
    for (int64_t o = 0; o < O; ++o)
      pack_stream(
          I, b, [&](int64_t k) { return q.q[at(o * I + k)]; },
          [&](int64_t j, uint32_t v) { w[at(o * W + j)] = static_cast<int32_t>(v); });
    return to_bytes(w);
  }
  if (suffix == "weight_scale") {  // (O, G): the transpose of the struct's (G, O)
    std::vector<float> t(at(O * G));
    for (int64_t g = 0; g < G; ++g)
      for (int64_t o = 0; o < O; ++o) t[at(o * G + g)] = q.scales[at(g * O + o)];
    std::vector<uint16_t> h(t.size());
    from_f32(DType::kF16, t.data(), h.data(), h.size());
    return to_bytes(h);
  }
  if (suffix == "weight_zero_point") {
    // (ceil(O*b/32), G): the (O, G) signed zero points zp = zero − 2^(b−1),
    // packed along dim 0 with the +2^(b−1) offset, i.e. our unsigned zeros.
    const int64_t W = packed_words(O, b);
    std::vector<int32_t> z(at(W * G), 0);
    for (int64_t g = 0; g < G; ++g)
      pack_stream(
          O, b, [&](int64_t k) { return static_cast<uint32_t>(q.zeros[at(g * O + k)]); },
          [&](int64_t j, uint32_t v) { z[at(j * G + g)] = static_cast<int32_t>(v); });
    return to_bytes(z);
  }
  if (suffix == "weight_shape") return to_bytes(std::vector<int64_t>{O, I});
  QCAL_CHECK_MSG(false, suffix.c_str());
  return {};
}

// ---- JSON helpers (never throw) ----

Status get_int(const json& j, const char* key, int64_t* out, const std::string& what,
               bool required = true) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return invalid_input(what + ": missing '" + key + "'");
    return Status::ok();
  }
  if (!it->is_number_integer())
    return invalid_input(what + ": '" + key + "' is not an integer: " + it->dump());
  *out = it->get<int64_t>();
  return Status::ok();
}

Status get_bool(const json& j, const char* key, bool* out, const std::string& what) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::ok();  // keep the default
  if (!it->is_boolean()) return invalid_input(what + ": '" + key + "' is not a boolean");
  *out = it->get<bool>();
  return Status::ok();
}

std::string get_str(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// ---- the quantization_config of a checkpoint, as far as reading needs it ----

enum class Layout { kGptqV1, kGptqV2, kCompressedTensors };

struct QuantConfig {
  Layout layout = Layout::kGptqV1;
  int bits = 4;
  int64_t group_size = 128;  // -1 = per channel
  bool sym = true;
  bool desc_act = false;
};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kGptqV1: return "gptq";
    case Layout::kGptqV2: return "gptq_v2";
    case Layout::kCompressedTensors: return "compressed-tensors";
  }
  return "?";
}

Status check_group_size(int64_t gs, const std::string& what) {
  if (gs == -1 || gs > 0) return Status::ok();
  return invalid_input(what + ": group_size " + num(gs) + " (expected -1 or > 0)");
}

// Python's re.match (anchored at the start only); false for an invalid pattern.
bool re_match(const std::string& pattern, const std::string& s) {
  try {
    return std::regex_search(s, std::regex(pattern), std::regex_constants::match_continuous);
  } catch (const std::regex_error&) {
    return false;
  }
}

// GPTQ config for module `prefix` (empty: the base config). GPTQModel's
// `dynamic` overrides apply: "-:<re>" excludes matching modules (kNotFound),
// "+:<re>" or "<re>" overrides bits/group_size/sym/desc_act. The first match
// in key order wins (GPTQModel uses insertion order; JSON objects here are
// sorted, which only matters for overlapping patterns).
Result<QuantConfig> parse_gptq_config(const json& qc, const std::string& prefix) {
  const std::string what = "quantization_config";
  QuantConfig c;
  std::string fmt = get_str(qc, "checkpoint_format");
  if (fmt.empty()) fmt = get_str(qc, "format");
  if (fmt.empty() || fmt == "gptq") {
    c.layout = Layout::kGptqV1;
  } else if (fmt == "gptq_v2") {
    c.layout = Layout::kGptqV2;
  } else {
    return invalid_input(what + ": unsupported GPTQ checkpoint_format '" + fmt +
                         "' (supported: gptq, gptq_v2)");
  }
  int64_t bits = 0;
  QCAL_RETURN_IF_ERROR(get_int(qc, "bits", &bits, what));
  if (!valid_bits(static_cast<int>(bits)))
    return invalid_input(what + ": unsupported bits " + num(bits) + " (2, 3, 4 or 8)");
  c.bits = static_cast<int>(bits);
  QCAL_RETURN_IF_ERROR(get_int(qc, "group_size", &c.group_size, what));
  QCAL_RETURN_IF_ERROR(check_group_size(c.group_size, what));
  QCAL_RETURN_IF_ERROR(get_bool(qc, "sym", &c.sym, what));
  QCAL_RETURN_IF_ERROR(get_bool(qc, "desc_act", &c.desc_act, what));
  auto dyn = qc.find("dynamic");
  if (prefix.empty() || dyn == qc.end() || !dyn->is_object()) return c;
  for (auto it = dyn->begin(); it != dyn->end(); ++it) {
    std::string pattern = it.key();
    const bool negative = pattern.rfind("-:", 0) == 0;
    if (negative || pattern.rfind("+:", 0) == 0) pattern = pattern.substr(2);
    if (!re_match(pattern, prefix)) continue;
    if (negative) return not_found("module '" + prefix + "' is excluded from quantization");
    const std::string dwhat = what + ".dynamic[" + it.key() + "]";
    if (!it.value().is_object()) return invalid_input(dwhat + " is not an object");
    int64_t b = c.bits;
    QCAL_RETURN_IF_ERROR(get_int(it.value(), "bits", &b, dwhat, /*required=*/false));
    if (!valid_bits(static_cast<int>(b)))
      return invalid_input(dwhat + ": unsupported bits " + num(b) + " (2, 3, 4 or 8)");
    c.bits = static_cast<int>(b);
    QCAL_RETURN_IF_ERROR(get_int(it.value(), "group_size", &c.group_size, dwhat, false));
    QCAL_RETURN_IF_ERROR(check_group_size(c.group_size, dwhat));
    QCAL_RETURN_IF_ERROR(get_bool(it.value(), "sym", &c.sym, dwhat));
    QCAL_RETURN_IF_ERROR(get_bool(it.value(), "desc_act", &c.desc_act, dwhat));
    break;
  }
  return c;
}

// The QuantizationArgs of one compressed-tensors scheme's weights.
Result<QuantConfig> parse_ct_weights(const json& w, const std::string& what) {
  if (!w.is_object()) return invalid_input(what + ": weights is not an object");
  QuantConfig c;
  c.layout = Layout::kCompressedTensors;
  std::string type = get_str(w, "type");
  if (!type.empty() && type != "int")
    return invalid_input(what + ": unsupported weight type '" + type + "' (int only)");
  int64_t bits = 0;
  QCAL_RETURN_IF_ERROR(get_int(w, "num_bits", &bits, what));
  // 3-bit compressed-tensors packing changed from padded to dense between
  // versions (formats.md §2b), so a 3-bit file is ambiguous; 2/4/8 are not.
  if (bits != 2 && bits != 4 && bits != 8)
    return invalid_input(what + ": unsupported num_bits " + num(bits) + " (2, 4 or 8)");
  c.bits = static_cast<int>(bits);
  c.sym = true;
  QCAL_RETURN_IF_ERROR(get_bool(w, "symmetric", &c.sym, what));
  std::string strategy = get_str(w, "strategy");
  int64_t gs = -1;
  QCAL_RETURN_IF_ERROR(get_int(w, "group_size", &gs, what, /*required=*/false));
  if (strategy.empty()) strategy = gs > 0 ? "group" : "channel";
  if (strategy == "group") {
    if (gs <= 0) return invalid_input(what + ": strategy group needs group_size > 0");
    c.group_size = gs;
  } else if (strategy == "channel") {
    c.group_size = -1;
  } else {
    return invalid_input(what + ": unsupported strategy '" + strategy + "' (group or channel)");
  }
  auto ao = w.find("actorder");
  c.desc_act = ao != w.end() && ao->is_string() && !ao->get<std::string>().empty();
  return c;
}

// Does compressed-tensors target `t` select module `prefix`? Returns a
// priority (exact name 3 > regex 2 > class name 1) or 0.
int ct_target_score(const std::string& t, const std::string& prefix) {
  if (t == prefix) return 3;
  if (t.rfind("re:", 0) == 0) return re_match(t.substr(3), prefix) ? 2 : 0;
  // Class names: every packed module we read is a Linear.
  return t == "Linear" ? 1 : 0;
}

// The quantization config that applies to `prefix` (empty prefix: the first
// group, for summaries).
Result<QuantConfig> parse_quant_config(const json& qc, const std::string& prefix) {
  const std::string what = "quantization_config";
  if (!qc.is_object()) return invalid_input(what + " is not an object");
  const std::string method = get_str(qc, "quant_method");
  if (method == "gptq") return parse_gptq_config(qc, prefix);
  if (method != "compressed-tensors")
    return invalid_input(what + ": unsupported quant_method '" + method +
                         "' (gptq or compressed-tensors)");
  auto groups = qc.find("config_groups");
  if (groups == qc.end() || !groups->is_object() || groups->empty())
    return invalid_input(what + ": compressed-tensors config has no config_groups");
  const json* best = nullptr;
  std::string best_name;
  int best_score = 0;
  for (auto it = groups->begin(); it != groups->end(); ++it) {
    const json& g = it.value();
    if (!g.is_object())
      return invalid_input(what + ".config_groups." + it.key() + " is not an object");
    int score = prefix.empty() ? 1 : 0;
    auto targets = g.find("targets");
    if (!prefix.empty() && targets != g.end() && targets->is_array())
      for (const json& t : *targets)
        if (t.is_string()) score = std::max(score, ct_target_score(t.get<std::string>(), prefix));
    if (score > best_score) {
      best = &g;
      best_name = it.key();
      best_score = score;
    }
  }
  if (!best) return invalid_input(what + ": no config group targets module '" + prefix + "'");
  const std::string gwhat = what + ".config_groups." + best_name;
  std::string fmt = get_str(*best, "format");
  if (fmt.empty()) fmt = get_str(qc, "format");
  if (fmt != "pack-quantized")
    return invalid_input(gwhat + ": unsupported compressed-tensors format '" + fmt +
                         "' (pack-quantized only)");
  auto w = best->find("weights");
  if (w == best->end() || w->is_null()) return invalid_input(gwhat + ": no weights scheme");
  return parse_ct_weights(*w, gwhat + ".weights");
}

// ---- reading packed tensors ----

const TensorInfo* find_tensor(const ModelDir& dir, const std::string& name,
                              const SafetensorsFile** file) {
  return dir.find(name, file);
}

Status check_tensor(const TensorInfo* t, const std::string& name, DType dtype,
                    const std::vector<int64_t>& shape) {
  if (!t) return corrupt("missing tensor '" + name + "'");
  if (t->dtype != dtype)
    return corrupt("tensor '" + name + "' has dtype " + dtype_name(t->dtype) + ", expected " +
                   dtype_name(dtype));
  if (!shape.empty() && t->shape != shape)
    return corrupt("tensor '" + name + "' has shape " + shape_str(t->shape) + ", expected " +
                   shape_str(shape));
  return Status::ok();
}

template <class T>
Result<std::vector<T>> read_int_tensor(const ModelDir& dir, const std::string& name, DType dtype,
                                       const std::vector<int64_t>& shape) {
  const SafetensorsFile* f = nullptr;
  const TensorInfo* t = find_tensor(dir, name, &f);
  QCAL_RETURN_IF_ERROR(check_tensor(t, name, dtype, shape));
  std::string_view raw = f->raw(*t);
  std::vector<T> v(raw.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), raw.data(), v.size() * sizeof(T));
  return v;
}

// A float tensor of the given shape as fp32 (f16, bf16 or f32 on disk).
Result<std::vector<float>> read_float_tensor(const ModelDir& dir, const std::string& name,
                                             const std::vector<int64_t>& shape) {
  const SafetensorsFile* f = nullptr;
  const TensorInfo* t = find_tensor(dir, name, &f);
  if (!t) return corrupt("missing tensor '" + name + "'");
  if (!is_float_dtype(t->dtype))
    return corrupt("tensor '" + name + "' has dtype " + dtype_name(t->dtype) +
                   ", expected a float dtype");
  if (t->shape != shape)
    return corrupt("tensor '" + name + "' has shape " + shape_str(t->shape) + ", expected " +
                   shape_str(shape));
  std::vector<float> v(static_cast<size_t>(Tensor::count(shape)));
  to_f32(t->dtype, f->raw(*t).data(), v.data(), v.size());
  return v;
}

Status check_g_idx(const std::vector<int32_t>& g_idx, int64_t G, const std::string& name) {
  for (size_t i = 0; i < g_idx.size(); ++i)
    if (g_idx[i] < 0 || g_idx[i] >= G)
      return corrupt("tensor '" + name + "': g_idx[" + num(static_cast<int64_t>(i)) +
                     "] = " + num(g_idx[i]) + " outside [0, " + num(G) + ")");
  return Status::ok();
}

// act_order = g_idx differs from i / group_size.
bool is_act_order(const std::vector<int32_t>& g_idx, int64_t group_size) {
  for (size_t i = 0; i < g_idx.size(); ++i) {
    int64_t trivial = group_size > 0 ? static_cast<int64_t>(i) / group_size : 0;
    if (g_idx[i] != trivial) return true;
  }
  return false;
}

Result<QuantizedLinear> read_gptq(const ModelDir& dir, const std::string& prefix,
                                  const QuantConfig& c) {
  const std::string p = prefix + ".";
  const int b = c.bits;
  const TensorInfo* qw = dir.find(p + "qweight");
  if (!qw) return not_found("module '" + prefix + "' is not quantized in " + dir.dir());
  QCAL_RETURN_IF_ERROR(check_tensor(qw, p + "qweight", DType::kI32, {}));
  if (qw->shape.size() != 2)
    return corrupt("tensor '" + p + "qweight' has shape " + shape_str(qw->shape) +
                   ", expected 2-D [I*b/32, O]");
  const int64_t R = qw->shape[0], O = qw->shape[1];
  int64_t I = 0;
  if (const TensorInfo* gi = dir.find(p + "g_idx")) {
    if (gi->shape.size() != 1)
      return corrupt("tensor '" + p + "g_idx' has shape " + shape_str(gi->shape) +
                     ", expected [I]");
    I = gi->shape[0];
  } else {
    if (R * 32 % b != 0)
      return corrupt("tensor '" + p + "qweight' has " + num(R) + " rows, not a whole number of " +
                     num(b) + "-bit values");
    I = R * 32 / b;
  }
  if (I * b % 32 != 0 || R != I * b / 32)
    return corrupt("tensor '" + p + "qweight' has shape " + shape_str(qw->shape) + ", expected [" +
                   num(I) + "*" + num(b) + "/32, " + num(O) + "] for in_features " + num(I));
  if (O * b % 32 != 0)
    return corrupt("tensor '" + p + "qweight': out_features " + num(O) + " times " + num(b) +
                   " bits is not a multiple of 32, so qzeros cannot be packed");
  const TensorInfo* sc = dir.find(p + "scales");
  if (!sc) return corrupt("missing tensor '" + p + "scales'");
  if (sc->shape.size() != 2 || sc->shape[1] != O)
    return corrupt("tensor '" + p + "scales' has shape " + shape_str(sc->shape) +
                   ", expected [G, " + num(O) + "]");
  const int64_t G = sc->shape[0];
  if (G != expected_groups(I, c.group_size))
    return corrupt("tensor '" + p + "scales' has " + num(G) + " groups, group_size " +
                   num(c.group_size) + " and in_features " + num(I) + " imply " +
                   num(expected_groups(I, c.group_size)));

  QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec.bits = b;
  q.spec.group_size = c.group_size;
  q.spec.sym = c.sym;
  QCAL_ASSIGN_OR_RETURN(q.scales, read_float_tensor(dir, p + "scales", {G, O}));
  QCAL_ASSIGN_OR_RETURN(auto qweight,
                        read_int_tensor<int32_t>(dir, p + "qweight", DType::kI32, {I * b / 32, O}));
  QCAL_ASSIGN_OR_RETURN(auto qzeros,
                        read_int_tensor<int32_t>(dir, p + "qzeros", DType::kI32, {G, O * b / 32}));
  if (dir.has(p + "g_idx")) {
    QCAL_ASSIGN_OR_RETURN(q.g_idx, read_int_tensor<int32_t>(dir, p + "g_idx", DType::kI32, {I}));
    QCAL_RETURN_IF_ERROR(check_g_idx(q.g_idx, G, p + "g_idx"));
  } else {
    q.g_idx = effective_g_idx(q);
  }
  q.act_order = is_act_order(q.g_idx, c.group_size);

  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  q.q.assign(at(O * I), 0);
  for (int64_t o = 0; o < O; ++o)
    unpack_stream(
        I, b, [&](int64_t j) { return qweight[at(j * O + o)]; },
        [&](int64_t k, int32_t v) { q.q[at(o * I + k)] = static_cast<uint8_t>(v); });
  // v1 stores zero − 1; loaders add 1 back without wrapping.
  const int32_t off = c.layout == Layout::kGptqV1 ? 1 : 0;
  const int64_t W = O * b / 32;
  q.zeros.assign(at(G * O), 0);
  for (int64_t g = 0; g < G; ++g)
    unpack_stream(
        O, b, [&](int64_t j) { return qzeros[at(g * W + j)]; },
        [&](int64_t k, int32_t v) { q.zeros[at(g * O + k)] = v + off; });
  return q;
}

Result<QuantizedLinear> read_ct(const ModelDir& dir, const std::string& prefix,
                                const QuantConfig& c) {
  const std::string p = prefix + ".";
  const int b = c.bits;
  if (!dir.has(p + "weight_packed"))
    return not_found("module '" + prefix + "' is not quantized in " + dir.dir());
  QCAL_ASSIGN_OR_RETURN(auto shape,
                        read_int_tensor<int64_t>(dir, p + "weight_shape", DType::kI64, {2}));
  const int64_t O = shape[0], I = shape[1];
  if (O <= 0 || I <= 0)
    return corrupt("tensor '" + p + "weight_shape' holds [" + num(O) + ", " + num(I) +
                   "], expected positive sizes");
  const int64_t G = expected_groups(I, c.group_size);

  QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec.bits = b;
  q.spec.group_size = c.group_size;
  q.spec.sym = c.sym;
  QCAL_ASSIGN_OR_RETURN(auto packed, read_int_tensor<int32_t>(dir, p + "weight_packed", DType::kI32,
                                                              {O, packed_words(I, b)}));
  QCAL_ASSIGN_OR_RETURN(auto scale_og, read_float_tensor(dir, p + "weight_scale", {O, G}));
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  q.scales.assign(at(G * O), 0.0f);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t g = 0; g < G; ++g) q.scales[at(g * O + o)] = scale_og[at(o * G + g)];
  q.q.assign(at(O * I), 0);
  const int64_t W = packed_words(I, b);
  for (int64_t o = 0; o < O; ++o)
    unpack_stream(
        I, b, [&](int64_t j) { return packed[at(o * W + j)]; },
        [&](int64_t k, int32_t v) { q.q[at(o * I + k)] = static_cast<uint8_t>(v); });
  if (c.sym) {
    q.zeros.assign(at(G * O), 1 << (b - 1));
  } else {
    // Packed with the +2^(b−1) offset, the signed zero point is our unsigned zero.
    QCAL_ASSIGN_OR_RETURN(auto zp, read_int_tensor<int32_t>(dir, p + "weight_zero_point",
                                                            DType::kI32, {packed_words(O, b), G}));
    q.zeros.assign(at(G * O), 0);
    for (int64_t g = 0; g < G; ++g)
      unpack_stream(
          O, b, [&](int64_t j) { return zp[at(j * G + g)]; },
          [&](int64_t k, int32_t v) { q.zeros[at(g * O + k)] = v; });
  }
  if (dir.has(p + "weight_g_idx")) {
    QCAL_ASSIGN_OR_RETURN(q.g_idx,
                          read_int_tensor<int32_t>(dir, p + "weight_g_idx", DType::kI32, {I}));
    QCAL_RETURN_IF_ERROR(check_g_idx(q.g_idx, G, p + "weight_g_idx"));
  } else {
    q.g_idx = effective_g_idx(q);
  }
  q.act_order = is_act_order(q.g_idx, c.group_size);
  return q;
}

// ---- writing ----

// One tensor of the output: copied from the source, produced by an override,
// or packed from a linear.
struct OutTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  const SafetensorsFile* file = nullptr;  // source tensor, or
  const TensorInfo* info = nullptr;
  const TensorOverride* ov = nullptr;   // rows on demand, or
  const std::string* module = nullptr;  // packed tensor `suffix` of this module
  std::string suffix;
};

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

// Escapes a module name for a Python regex.
std::string regex_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (std::strchr(".^$|()[]{}*+?\\", ch)) out += '\\';
    out += ch;
  }
  return out;
}

json gptq_quant_config(const QuantSpec& spec, bool desc_act, bool lm_head,
                       const std::vector<std::string>& unquantized, const json& extra) {
  json qc = json::object();
  qc["quant_method"] = "gptq";
  qc["checkpoint_format"] = spec.sym ? "gptq" : "gptq_v2";
  qc["bits"] = spec.bits;
  qc["group_size"] = spec.group_size;
  qc["sym"] = spec.sym;
  qc["desc_act"] = desc_act;
  qc["lm_head"] = lm_head;
  qc["damp_percent"] = 0.01;
  qc["true_sequential"] = true;
  qc["static_groups"] = false;
  json meta = json::object();
  if (extra.is_object()) {
    for (auto it = extra.begin(); it != extra.end(); ++it) {
      const std::string& k = it.key();
      if (k == "damp_percent" || k == "true_sequential" || k == "static_groups") {
        qc[k] = it.value();
      } else if (k == "meta" && it.value().is_object()) {
        for (auto m = it.value().begin(); m != it.value().end(); ++m) meta[m.key()] = m.value();
      } else {
        meta[k] = it.value();
      }
    }
  }
  meta["quantizer"] = json::array({kQuantizerTag});
  qc["meta"] = std::move(meta);
  // Projections left in full precision: GPTQModel's / vLLM's negative
  // `dynamic` overrides ("-:" + regex) exclude them from quantization.
  if (!unquantized.empty()) {
    json dyn = json::object();
    for (const std::string& m : unquantized) dyn["-:^" + regex_escape(m) + "$"] = json::object();
    qc["dynamic"] = std::move(dyn);
  }
  return qc;
}

json ct_quant_config(const QuantSpec& spec, bool act_order, bool lm_head,
                     const std::vector<std::string>& unquantized) {
  json w = json::object();
  w["num_bits"] = spec.bits;
  w["type"] = "int";
  w["symmetric"] = spec.sym;
  w["strategy"] = spec.group_size == -1 ? "channel" : "group";
  w["group_size"] = spec.group_size;
  w["block_structure"] = nullptr;
  w["dynamic"] = false;
  w["actorder"] = act_order ? json("group") : json(nullptr);
  w["scale_dtype"] = nullptr;
  w["zp_dtype"] = nullptr;
  w["observer"] = "minmax";
  w["observer_kwargs"] = json::object();
  json g = json::object();
  g["targets"] = json::array({"Linear"});
  g["weights"] = std::move(w);
  g["input_activations"] = nullptr;
  g["output_activations"] = nullptr;
  g["format"] = "pack-quantized";
  json ignore = json::array();
  std::vector<std::string> ig = unquantized;
  if (!lm_head) ig.push_back("lm_head");
  std::sort(ig.begin(), ig.end());
  for (const std::string& m : ig) ignore.push_back(m);
  json qc = json::object();
  qc["quant_method"] = "compressed-tensors";
  qc["format"] = "pack-quantized";
  qc["quantization_status"] = "compressed";
  qc["version"] = kCtVersion;
  qc["config_groups"] = json{{"group_0", std::move(g)}};
  qc["ignore"] = std::move(ignore);
  qc["kv_cache_scheme"] = nullptr;
  qc["global_compression_ratio"] = nullptr;
  qc["sparsity_config"] = json::object();
  qc["transform_config"] = json::object();
  return qc;
}

// Everything decided before the first byte is written.
struct WritePlan {
  std::vector<OutTensor> tensors;  // in name order
  std::vector<size_t> shard_of;    // shard of each tensor
  size_t num_shards = 1;
  json qc;      // quantization_config
  json config;  // config.json
};

Status check_contents(const QuantizedLinear& q);  // below check_writable

std::string decl_str(const LinearDecl& d) {
  return "[" + num(d.out_features) + ", " + num(d.in_features) + "], bits " + num(d.spec.bits) +
         ", group_size " + num(d.spec.group_size) + ", sym " + (d.spec.sym ? "true" : "false") +
         ", act_order " + (d.act_order ? "true" : "false");
}

// Every check that needs no codes, then the layout: tensors, shards, configs.
Result<WritePlan> plan_checkpoint(const ModelDir& src, const CheckpointStream& in,
                                  const WriteOptions& opts, const std::string& out_dir) {
  const CheckpointFormat fmt = opts.format;
  const auto& linears = in.linears;
  if (linears.empty()) return invalid_input("write checkpoint: no quantized linears given");
  if (!in.provide) return invalid_input("write checkpoint: no provider for the quantized linears");
  if (src.quantization_config())
    return invalid_input(src.dir() + ": source model is already quantized");
  if (opts.max_shard_bytes == 0) return invalid_input("write checkpoint: max_shard_bytes is 0");
  if (opts.chunk_bytes == 0) return invalid_input("write checkpoint: chunk_bytes is 0");
  if (path_exists(out_dir) && !opts.overwrite)
    return invalid_input(out_dir + ": output exists (pass --overwrite to replace it)");
  {
    std::error_code ec;
    if (path_exists(out_dir) && fs::equivalent(out_dir, src.dir(), ec))
      return invalid_input(out_dir + ": output directory is the source model directory");
  }

  const auto& [first_name, first] = *linears.begin();
  bool act_order = false;
  for (const auto& [name, d] : linears) {
    const QuantSpec& s = d.spec;
    if (s.bits != first.spec.bits || s.group_size != first.spec.group_size ||
        s.sym != first.spec.sym)
      return invalid_input(
          "module " + name + ": bits " + num(s.bits) + ", group_size " + num(s.group_size) +
          ", sym " + (s.sym ? "true" : "false") + " differ from module " + first_name + " (bits " +
          num(first.spec.bits) + ", group_size " + num(first.spec.group_size) + ", sym " +
          (first.spec.sym ? "true" : "false") + "); a checkpoint has one quantization config");
    QuantizedLinear probe;
    probe.out_features = d.out_features;
    probe.in_features = d.in_features;
    probe.spec = d.spec;
    QCAL_RETURN_IF_ERROR(check_writable(probe, fmt).with_context("module " + name));
    const TensorInfo* w = src.find(name + ".weight");
    if (!w) return invalid_input("module " + name + ": source has no tensor " + name + ".weight");
    if (w->shape != std::vector<int64_t>{d.out_features, d.in_features})
      return invalid_input("module " + name + ": source weight has shape " + shape_str(w->shape) +
                           ", quantized linear is [" + num(d.out_features) + ", " +
                           num(d.in_features) + "]");
    act_order = act_order || d.act_order;
  }
  auto replaced = [&](const std::string& name) {
    return name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 &&
           linears.count(name.substr(0, name.size() - 7));
  };
  for (const auto& [name, ov] : in.overrides) {
    const std::string what = "override of tensor " + name;
    if (replaced(name)) return invalid_input(what + ": it is replaced by its quantized module");
    if (!is_float_dtype(ov.dtype))
      return invalid_input(what + ": dtype " + dtype_name(ov.dtype) + " is not a float dtype");
    if (!ov.rows) return invalid_input(what + ": no row source");
    for (int64_t d : ov.shape)
      if (d < 0) return invalid_input(what + ": negative shape " + shape_str(ov.shape));
    const TensorInfo* t = src.find(name);
    if (t && t->shape != ov.shape)
      return invalid_input(what + ": shape " + shape_str(ov.shape) + ", the source tensor has " +
                           shape_str(t->shape));
  }
  if (!in.config_updates.is_object())
    return invalid_input("write checkpoint: config_updates is not a JSON object");
  if (in.config_updates.contains("quantization_config"))
    return invalid_input("write checkpoint: config_updates may not set quantization_config");

  // The output tensors: every source tensor but the replaced weights (each
  // copied or overridden), the overrides the source lacks, the packed ones.
  WritePlan plan;
  std::vector<OutTensor>& tensors = plan.tensors;
  auto set_override = [](OutTensor& t, const TensorOverride& ov) {
    t.ov = &ov;
    t.dtype = ov.dtype;
    t.shape = ov.shape;
    t.nbytes = static_cast<uint64_t>(Tensor::count(ov.shape)) * dtype_size(ov.dtype);
  };
  for (const std::string& name : src.tensor_names()) {
    if (replaced(name)) continue;
    OutTensor t;
    t.name = name;
    auto ov = in.overrides.find(name);
    if (ov != in.overrides.end()) {
      set_override(t, ov->second);
    } else {
      t.info = src.find(name, &t.file);
      t.dtype = t.info->dtype;
      t.shape = t.info->shape;
      t.nbytes = t.info->nbytes();
    }
    tensors.push_back(std::move(t));
  }
  for (const auto& [name, ov] : in.overrides) {
    if (src.has(name)) continue;
    OutTensor t;
    t.name = name;
    set_override(t, ov);
    tensors.push_back(std::move(t));
  }
  // compressed-tensors with act-order: every module carries weight_g_idx
  // (the loader registers it for the whole scheme).
  for (const auto& [name, d] : linears) {
    for (PackedSpec& ps : packed_specs(d, fmt, act_order)) {
      OutTensor t;
      t.name = name + "." + ps.suffix;
      t.dtype = ps.dtype;
      t.nbytes = static_cast<uint64_t>(Tensor::count(ps.shape)) * dtype_size(ps.dtype);
      t.shape = std::move(ps.shape);
      t.module = &name;
      t.suffix = std::move(ps.suffix);
      tensors.push_back(std::move(t));
    }
  }
  std::sort(tensors.begin(), tensors.end(),
            [](const OutTensor& a, const OutTensor& b) { return a.name < b.name; });
  for (size_t i = 1; i < tensors.size(); ++i)
    if (tensors[i].name == tensors[i - 1].name)
      return invalid_input(
          "tensor " + tensors[i].name +
          " exists in the source and would also be written for a quantized module");

  // Shards: consecutive tensors in name order, closed before exceeding the limit.
  plan.shard_of.assign(tensors.size(), 0);
  size_t shard = 0;
  uint64_t in_shard = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (in_shard > 0 && in_shard + tensors[i].nbytes > opts.max_shard_bytes) {
      ++shard;
      in_shard = 0;
    }
    plan.shard_of[i] = shard;
    in_shard += tensors[i].nbytes;
  }
  plan.num_shards = tensors.empty() ? 1 : shard + 1;

  // Linears of the architecture that stay unquantized must be excluded in the config.
  std::vector<std::string> unquantized;
  for (int64_t l = 0; l < src.config().num_hidden_layers; ++l)
    for (const char* proj : kProjNames) {
      const std::string m = layer_prefix(l) + proj;
      if (src.has(m + ".weight") && !linears.count(m)) unquantized.push_back(m);
    }
  const bool lm_head = linears.count("lm_head") > 0;
  plan.qc = fmt == CheckpointFormat::kGptq
                ? gptq_quant_config(first.spec, act_order, lm_head, unquantized, opts.extra_config)
                : ct_quant_config(first.spec, act_order, lm_head, unquantized);
  plan.config = src.config_json();
  for (auto it = in.config_updates.begin(); it != in.config_updates.end(); ++it)
    plan.config[it.key()] = it.value();
  plan.config["quantization_config"] = plan.qc;
  return plan;
}

// The provided linear of `name`, checked against its declaration and contents.
Result<QuantizedLinear> fetch_linear(const CheckpointStream& in, const std::string& name) {
  Result<QuantizedLinear> r = in.provide(name);
  if (!r.is_ok()) return r.status().with_context("module " + name);
  const LinearDecl got = linear_decl(*r), want = in.linears.at(name);
  if (!(got == want))
    return invalid_input("module " + name + ": the provided linear (" + decl_str(got) +
                         ") differs from its declaration (" + decl_str(want) + ")");
  QCAL_RETURN_IF_ERROR(check_contents(*r).with_context("module " + name));
  return r;
}

// Copies a source tensor in pieces of `chunk` bytes, dropping each piece's
// pages after use so the resident set stays at one piece.
Status copy_tensor(SafetensorsWriter& w, const SafetensorsFile& f, const TensorInfo& t,
                   uint64_t chunk) {
  const std::string_view raw = f.raw(t);
  if (raw.empty()) return w.append({});
  for (uint64_t off = 0; off < raw.size(); off += chunk) {
    const uint64_t n = std::min<uint64_t>(chunk, raw.size() - off);
    QCAL_RETURN_IF_ERROR(w.append(raw.substr(off, n)));
    f.release(t, off, off + n);
  }
  return Status::ok();
}

// Writes everything into `staging`: shards, index, configs, aux files. Each
// quantized linear is fetched at its first tensor and dropped after its last.
Status write_staging(const ModelDir& src, const CheckpointStream& in, const WritePlan& plan,
                     const WriteOptions& opts, const std::string& staging) {
  const std::vector<OutTensor>& tensors = plan.tensors;
  const size_t num_shards = plan.num_shards;
  std::map<std::string, size_t> left;  // module -> its tensors not yet written
  for (const OutTensor& t : tensors)
    if (t.module) ++left[*t.module];
  std::map<std::string, QuantizedLinear> live;  // fetched, not yet fully written
  for (size_t s = 0; s < num_shards; ++s) {
    const std::string file = num_shards == 1 ? "model.safetensors" : shard_name(s, num_shards);
    SafetensorsWriter w(join_path(staging, file));
    for (size_t i = 0; i < tensors.size(); ++i)
      if (plan.shard_of[i] == s) w.add(tensors[i].name, tensors[i].dtype, tensors[i].shape);
    QCAL_RETURN_IF_ERROR(w.begin());
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (plan.shard_of[i] != s) continue;
      const OutTensor& t = tensors[i];
      if (t.info) {
        QCAL_RETURN_IF_ERROR(copy_tensor(w, *t.file, *t.info, opts.chunk_bytes));
      } else if (t.ov) {
        const RowFn rows = [&](int64_t row0, int64_t n, float* out) {
          return t.ov->rows(row0, n, out).with_context("override of tensor " + t.name);
        };
        QCAL_RETURN_IF_ERROR(w.write_rows(rows, opts.chunk_bytes));
      } else {
        const std::string& name = *t.module;
        auto it = live.find(name);
        if (it == live.end()) {
          QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, fetch_linear(in, name));
          it = live.emplace(name, std::move(q)).first;
        }
        QCAL_RETURN_IF_ERROR(w.write(pack_tensor(it->second, t.suffix)));
        if (--left[name] == 0) live.erase(it);
      }
    }
    QCAL_RETURN_IF_ERROR(w.finish());
  }
  if (num_shards > 1) {
    json index = json::object();
    uint64_t total = 0;
    json map = json::object();
    for (size_t i = 0; i < tensors.size(); ++i) {
      total += tensors[i].nbytes;
      map[tensors[i].name] = shard_name(plan.shard_of[i], num_shards);
    }
    index["metadata"] = json{{"total_size", total}};
    index["weight_map"] = std::move(map);
    QCAL_RETURN_IF_ERROR(write_file_atomic(join_path(staging, "model.safetensors.index.json"),
                                           index.dump(2) + "\n"));
  }
  QCAL_RETURN_IF_ERROR(
      write_file_atomic(join_path(staging, "config.json"), plan.config.dump(2) + "\n"));
  if (opts.format == CheckpointFormat::kGptq)
    QCAL_RETURN_IF_ERROR(
        write_file_atomic(join_path(staging, "quantize_config.json"), plan.qc.dump(2) + "\n"));
  for (const char* name : kAuxFiles) {
    const std::string from = join_path(src.dir(), name);
    if (!path_exists(from)) continue;
    // A regular file inside the process policy's roots (common/path_policy.h).
    QCAL_RETURN_IF_ERROR(copy_input_file(from, join_path(staging, name)));
  }
  return Status::ok();
}

// Runs `write` into a fresh staging directory `<out_dir>.partial.<pid>` and
// publishes it at `out_dir` (publish_dir: fsync, rename; an existing `out_dir`
// is replaced only with `overwrite`). On any error the staging directory is
// removed and nothing appears at `out_dir`. The one publishing step of these
// writers: a fenced publish replaces this function.
Status publish_checkpoint(const std::string& out_dir, bool overwrite,
                          const std::function<Status(const std::string& staging)>& write) {
  QCAL_ASSIGN_OR_RETURN(std::string staging, make_staging_dir(out_dir));
  Status st = write(staging);
  if (st.is_ok()) st = publish_dir(staging, out_dir, overwrite);
  if (!st.is_ok()) {
    std::error_code ec;
    fs::remove_all(staging, ec);
  }
  return st;
}

}  // namespace

// ---------------------------------------------------------------- public

Result<CheckpointFormat> parse_checkpoint_format(const std::string& name) {
  if (name == "gptq") return CheckpointFormat::kGptq;
  if (name == "compressed-tensors" || name == "compressed_tensors" || name == "ct")
    return CheckpointFormat::kCompressedTensors;
  return invalid_input("unknown checkpoint format '" + name + "' (gptq or compressed-tensors)");
}

const char* checkpoint_format_name(CheckpointFormat f) {
  switch (f) {
    case CheckpointFormat::kGptq: return "gptq";
    case CheckpointFormat::kCompressedTensors: return "compressed-tensors";
  }
  return "?";
}

int64_t packed_words(int64_t n, int bits) { return words_for(n, bits); }

std::vector<int32_t> pack_bits(const std::vector<int32_t>& v, int64_t rows, int64_t cols, int bits,
                               int dim) {
  QCAL_CHECK(bits >= 1 && bits <= 8);
  QCAL_CHECK(dim == 0 || dim == 1);
  QCAL_CHECK(rows >= 0 && cols >= 0 && static_cast<int64_t>(v.size()) == rows * cols);
  for (int32_t x : v) QCAL_CHECK_MSG(x >= 0 && x < (1 << bits), "value out of range for bits");
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  std::vector<int32_t> out;
  if (dim == 0) {
    const int64_t W = packed_words(rows, bits);
    out.assign(at(W * cols), 0);
    for (int64_t c = 0; c < cols; ++c)
      pack_stream(
          rows, bits, [&](int64_t k) { return static_cast<uint32_t>(v[at(k * cols + c)]); },
          [&](int64_t j, uint32_t w) { out[at(j * cols + c)] = static_cast<int32_t>(w); });
  } else {
    const int64_t W = packed_words(cols, bits);
    out.assign(at(rows * W), 0);
    for (int64_t r = 0; r < rows; ++r)
      pack_stream(
          cols, bits, [&](int64_t k) { return static_cast<uint32_t>(v[at(r * cols + k)]); },
          [&](int64_t j, uint32_t w) { out[at(r * W + j)] = static_cast<int32_t>(w); });
  }
  return out;
}

std::vector<int32_t> unpack_bits(const std::vector<int32_t>& words, int64_t rows, int64_t cols,
                                 int bits, int dim) {
  QCAL_CHECK(bits >= 1 && bits <= 8);
  QCAL_CHECK(dim == 0 || dim == 1);
  QCAL_CHECK(rows >= 0 && cols >= 0);
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  std::vector<int32_t> out(at(rows * cols), 0);
  if (dim == 0) {
    QCAL_CHECK(static_cast<int64_t>(words.size()) == packed_words(rows, bits) * cols);
    for (int64_t c = 0; c < cols; ++c)
      unpack_stream(
          rows, bits, [&](int64_t j) { return words[at(j * cols + c)]; },
          [&](int64_t k, int32_t x) { out[at(k * cols + c)] = x; });
  } else {
    const int64_t W = packed_words(cols, bits);
    QCAL_CHECK(static_cast<int64_t>(words.size()) == rows * W);
    for (int64_t r = 0; r < rows; ++r)
      unpack_stream(
          cols, bits, [&](int64_t j) { return words[at(r * W + j)]; },
          [&](int64_t k, int32_t x) { out[at(r * cols + k)] = x; });
  }
  return out;
}

Status check_writable(const QuantizedLinear& q, CheckpointFormat format) {
  const QuantSpec& s = q.spec;
  const int64_t O = q.out_features, I = q.in_features;
  if (!valid_bits(s.bits)) return invalid_input("bits " + num(s.bits) + " (expected 2, 3, 4 or 8)");
  QCAL_RETURN_IF_ERROR(check_group_size(s.group_size, "quantizer spec"));
  if (O <= 0 || I <= 0)
    return invalid_input("shape [" + num(O) + ", " + num(I) + "] is not positive");
  if (format == CheckpointFormat::kCompressedTensors) {
    if (s.bits != 4 && s.bits != 8)
      return invalid_input(
          "compressed-tensors pack-quantized is written for 4 or 8 bits only, got " + num(s.bits) +
          " (3-bit packing differs between versions; use gptq)");
  } else {
    if (I * s.bits % 32 != 0)
      return invalid_input("GPTQ qweight packs in_features along 32-bit words: in_features " +
                           num(I) + " times " + num(s.bits) + " bits is not a multiple of 32 (" +
                           (s.bits == 3 ? std::string("need a multiple of 32")
                                        : "need a multiple of " + num(32 / s.bits)) +
                           ")");
    if (O * s.bits % 32 != 0)
      return invalid_input("GPTQ qzeros packs out_features along 32-bit words: out_features " +
                           num(O) + " times " + num(s.bits) + " bits is not a multiple of 32 (" +
                           (s.bits == 3 ? std::string("need a multiple of 32")
                                        : "need a multiple of " + num(32 / s.bits)) +
                           ")");
  }
  return Status::ok();
}

namespace {

// The data of `q` against its shape and spec (after check_writable): sizes of
// q/scales/zeros/g_idx, codes and zeros in [0, 2^b − 1], symmetric zeros equal
// to 2^(b−1), g_idx in [0, G) and equal to i / group_size unless act_order,
// scales finite and fp16-representable (so the file holds them exactly).
Status check_contents(const QuantizedLinear& q) {
  const QuantSpec& s = q.spec;
  const int64_t O = q.out_features, I = q.in_features;
  auto at = [](int64_t i) { return static_cast<size_t>(i); };
  const int64_t G = expected_groups(I, s.group_size);
  if (static_cast<int64_t>(q.q.size()) != O * I)
    return invalid_input("q has " + num(static_cast<int64_t>(q.q.size())) + " codes, expected " +
                         num(O) + "x" + num(I));
  if (static_cast<int64_t>(q.scales.size()) != G * O)
    return invalid_input("scales has " + num(static_cast<int64_t>(q.scales.size())) +
                         " values, expected G*O = " + num(G) + "*" + num(O) + " (group_size " +
                         num(s.group_size) + ", in_features " + num(I) + ")");
  if (static_cast<int64_t>(q.zeros.size()) != G * O)
    return invalid_input("zeros has " + num(static_cast<int64_t>(q.zeros.size())) +
                         " values, expected G*O = " + num(G) + "*" + num(O));
  if (q.g_idx.empty()) {
    if (q.act_order) return invalid_input("act_order is set but g_idx is empty");
  } else if (static_cast<int64_t>(q.g_idx.size()) != I) {
    return invalid_input("g_idx has " + num(static_cast<int64_t>(q.g_idx.size())) +
                         " entries, expected in_features " + num(I));
  }
  for (int64_t i = 0; i < static_cast<int64_t>(q.g_idx.size()); ++i) {
    const int32_t g = q.g_idx[at(i)];
    if (g < 0 || g >= G)
      return invalid_input("g_idx[" + num(i) + "] = " + num(g) + " outside [0, " + num(G) + ")");
    if (!q.act_order && g != (s.group_size > 0 ? i / s.group_size : 0))
      return invalid_input("g_idx[" + num(i) + "] = " + num(g) +
                           " is not i / group_size but act_order is false");
  }
  const int maxq = s.maxq();
  for (int64_t k = 0; k < O * I; ++k)
    if (q.q[at(k)] > maxq)
      return invalid_input("code q[" + num(k / I) + ", " + num(k % I) + "] = " + num(q.q[at(k)]) +
                           " exceeds 2^" + num(s.bits) + " - 1 = " + num(maxq));
  const int32_t sym_zero = 1 << (s.bits - 1);
  for (int64_t k = 0; k < G * O; ++k) {
    const int32_t z = q.zeros[at(k)];
    if (z < 0 || z > maxq)
      return invalid_input("zero[" + num(k / O) + ", " + num(k % O) + "] = " + num(z) +
                           " outside [0, " + num(maxq) + "]");
    if (s.sym && z != sym_zero)
      return invalid_input("zero[" + num(k / O) + ", " + num(k % O) + "] = " + num(z) +
                           " but a symmetric quantizer has zero " + num(sym_zero));
    const float sc = q.scales[at(k)];
    if (!std::isfinite(sc) || round_to_dtype(sc, DType::kF16) != sc)
      return invalid_input("scale[" + num(k / O) + ", " + num(k % O) + "] = " + std::to_string(sc) +
                           " is not a finite fp16 value");
  }
  return Status::ok();
}

}  // namespace

LinearDecl linear_decl(const QuantizedLinear& q) {
  LinearDecl d;
  d.out_features = q.out_features;
  d.in_features = q.in_features;
  d.spec = q.spec;
  d.act_order = q.act_order;
  return d;
}

Status stream_quantized_checkpoint(const ModelDir& src, const CheckpointStream& in,
                                   const WriteOptions& opts, const std::string& out_dir) {
  QCAL_ASSIGN_OR_RETURN(WritePlan plan, plan_checkpoint(src, in, opts, out_dir));
  return publish_checkpoint(out_dir, opts.overwrite, [&](const std::string& staging) {
    return write_staging(src, in, plan, opts, staging);
  });
}

Status write_quantized_checkpoint(const ModelDir& src,
                                  const std::map<std::string, QuantizedLinear>& qlinears,
                                  const WriteOptions& opts, const std::string& out_dir) {
  CheckpointStream in;
  for (const auto& [name, q] : qlinears) in.linears[name] = linear_decl(q);
  in.provide = [&](const std::string& name) -> Result<QuantizedLinear> {
    return qlinears.at(name);
  };
  QCAL_ASSIGN_OR_RETURN(WritePlan plan, plan_checkpoint(src, in, opts, out_dir));
  // Every module is validated before anything is written.
  for (const auto& [name, q] : qlinears)
    QCAL_RETURN_IF_ERROR(check_contents(q).with_context("module " + name));
  return publish_checkpoint(out_dir, opts.overwrite, [&](const std::string& staging) {
    return write_staging(src, in, plan, opts, staging);
  });
}

Result<QuantizedLinear> read_quantized_linear(const ModelDir& dir, const std::string& prefix) {
  auto qc = dir.quantization_config();
  if (!qc) return not_found(dir.dir() + ": checkpoint is not quantized (no quantization_config)");
  QCAL_ASSIGN_OR_RETURN(QuantConfig c, parse_quant_config(*qc, prefix));
  Result<QuantizedLinear> r =
      c.layout == Layout::kCompressedTensors ? read_ct(dir, prefix, c) : read_gptq(dir, prefix, c);
  if (!r.is_ok() && r.status().code() == Code::kCorrupt)
    return r.status().with_context(dir.dir() + ": module " + prefix);
  return r;
}

Result<Tensor> read_linear_weight(const ModelDir& dir, const std::string& prefix) {
  if (dir.quantization_config() &&
      (dir.has(prefix + ".qweight") || dir.has(prefix + ".weight_packed"))) {
    QCAL_ASSIGN_OR_RETURN(QuantizedLinear q, read_quantized_linear(dir, prefix));
    return q.dequantize();
  }
  return dir.read_f32(prefix + ".weight");
}

Result<nlohmann::json> inspect_checkpoint(const ModelDir& dir) {
  const ModelConfig& c = dir.config();
  json out = json::object();
  out["dir"] = dir.dir();
  out["config"] = json{{"model_type", c.model_type},
                       {"num_hidden_layers", c.num_hidden_layers},
                       {"hidden_size", c.hidden_size},
                       {"num_attention_heads", c.num_attention_heads},
                       {"num_key_value_heads", c.num_key_value_heads},
                       {"intermediate_size", c.intermediate_size},
                       {"vocab_size", c.vocab_size},
                       {"torch_dtype", torch_dtype_name(c.torch_dtype)},
                       {"num_parameters", c.num_parameters()}};

  const std::vector<std::string> names = dir.tensor_names();
  std::map<std::string, uint64_t> files;  // file name -> bytes
  for (const std::string& n : names) {
    const SafetensorsFile* f = nullptr;
    if (dir.find(n, &f) && f && !files.count(f->path())) {
      std::error_code ec;
      files[f->path()] = fs::file_size(f->path(), ec);
    }
  }
  json jfiles = json::array();
  uint64_t total = 0;
  for (const auto& [path, bytes] : files) {
    jfiles.push_back(json{{"name", fs::path(path).filename().string()}, {"bytes", bytes}});
    total += bytes;
  }
  out["files"] = std::move(jfiles);
  out["total_bytes"] = total;
  out["tensor_bytes"] = dir.total_bytes();
  out["num_tensors"] = names.size();

  std::optional<QuantConfig> qcfg;
  if (auto qc = dir.quantization_config()) {
    QCAL_ASSIGN_OR_RETURN(QuantConfig qq, parse_quant_config(*qc, ""));
    qcfg = qq;
    out["quantization"] = json{{"format", layout_name(qq.layout)},
                               {"bits", qq.bits},
                               {"group_size", qq.group_size},
                               {"sym", qq.sym},
                               {"desc_act", qq.desc_act}};
  } else {
    out["quantization"] = nullptr;
  }

  // Quantized modules, from tensor headers only (weight_shape's 16 bytes aside).
  json modules = json::array();  // an array: the CLI's text form summarizes long arrays
  std::set<std::string> packed_names;
  for (const std::string& n : names) {
    if (!qcfg) break;
    const bool gptq = n.size() > 8 && n.compare(n.size() - 8, 8, ".qweight") == 0;
    const bool ct = n.size() > 14 && n.compare(n.size() - 14, 14, ".weight_packed") == 0;
    if (!gptq && !ct) continue;
    const std::string prefix = n.substr(0, n.size() - (gptq ? 8 : 14));
    const std::string p = prefix + ".";
    int64_t O = 0, I = 0, G = 0;
    if (gptq) {
      const TensorInfo* qw = dir.find(n);
      const TensorInfo* sc = dir.find(p + "scales");
      const TensorInfo* gi = dir.find(p + "g_idx");
      if (qw->shape.size() != 2 || !sc || sc->shape.size() != 2)
        return corrupt(dir.dir() + ": module " + prefix + ": malformed qweight/scales");
      O = qw->shape[1];
      G = sc->shape[0];
      I = gi && gi->shape.size() == 1 ? gi->shape[0] : qw->shape[0] * 32 / qcfg->bits;
      for (const char* s : kGptqSuffixes)
        if (dir.has(p + s)) packed_names.insert(p + s);
    } else {
      QCAL_ASSIGN_OR_RETURN(auto shape,
                            read_int_tensor<int64_t>(dir, p + "weight_shape", DType::kI64, {2}));
      const TensorInfo* sc = dir.find(p + "weight_scale");
      if (!sc || sc->shape.size() != 2)
        return corrupt(dir.dir() + ": module " + prefix + ": malformed weight_scale");
      O = shape[0];
      I = shape[1];
      G = sc->shape[1];
      for (const char* s : kCtSuffixes)
        if (dir.has(p + s)) packed_names.insert(p + s);
    }
    modules.push_back(json{{"name", prefix}, {"out", O}, {"in", I}, {"groups", G}});
  }
  out["num_quantized_modules"] = modules.size();
  out["num_fp_tensors"] = names.size() - packed_names.size();
  out["modules"] = std::move(modules);
  return out;
}

}  // namespace qcal

// The native qcal checkpoint (docs/NATIVE_FORMAT.md): writer, validating reader,
// and quantized inference on the CPU (methods.md §3.5, §5.5, §6.2, §6.3, §11.4).
//
// Letters: B sequences, T tokens per sequence, N rows of a chunk (sequences ×
// T), P IntactKV prefix length, S = P + T keys, H hidden, I intermediate,
// V vocab, n_h / n_kv heads, d head dim, Q = n_h·d, K = n_kv·d, G weight groups.
#include "worker/calib/native.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>
#include <string_view>
#include <utility>

#include "common/dtype.h"
#include "common/fsutil.h"
#include "common/json_util.h"
#include "common/model_dir.h"
#include "common/safetensors.h"
#include "kernels/gemm.h"
#include "kernels/grad.h"
#include "kernels/ops.h"
#include "worker/engine/model.h"

namespace qcal::calib {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kQuantFile = "qcal_quant.json";
constexpr const char* kConfigFile = "config.json";
constexpr const char* kTensorFile = "model.safetensors";
constexpr int kMaxJsonDepth = 32;

// Short projection names used in qcal_quant.json, in Proj order.
constexpr const char* kProjShort[kNumProj] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                              "gate_proj", "up_proj", "down_proj"};

// The online transforms the format stores, with the dimension each one acts on.
enum class OnlineDim { kHidden, kInter, kHeads, kHeadDim };
struct OnlineSlot {
  const char* name;
  std::vector<float> BlockTransformsT<float>::*member;
  OnlineDim dim;
};
const OnlineSlot kOnline[] = {
    {"a1", &BlockTransformsT<float>::a1, OnlineDim::kHidden},
    {"a2", &BlockTransformsT<float>::a2, OnlineDim::kHidden},
    {"u1", &BlockTransformsT<float>::u1, OnlineDim::kHidden},
    {"u2", &BlockTransformsT<float>::u2, OnlineDim::kHidden},
    {"d1", &BlockTransformsT<float>::d1, OnlineDim::kInter},
    {"d2", &BlockTransformsT<float>::d2, OnlineDim::kInter},
    {"po", &BlockTransformsT<float>::po, OnlineDim::kHeads},
    {"pk", &BlockTransformsT<float>::pk, OnlineDim::kHeadDim},
    {"pk_it", &BlockTransformsT<float>::pk_it, OnlineDim::kHeadDim},
};

bool supported_bits(int b) { return b == 2 || b == 3 || b == 4 || b == 6 || b == 8; }
const char* kBitsList = "2, 3, 4, 6, 8 or 16 (off)";

int64_t dim_of(const ModelConfig& c, OnlineDim d) {
  switch (d) {
    case OnlineDim::kHidden: return c.hidden_size;
    case OnlineDim::kInter: return c.intermediate_size;
    case OnlineDim::kHeads: return c.num_attention_heads;
    case OnlineDim::kHeadDim: return c.head_dim;
  }
  return 0;
}

// Side of a square matrix stored as n² floats, or 0 if the size is not a square.
int64_t square_side(size_t n) {
  int64_t s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  return s * s == static_cast<int64_t>(n) ? s : 0;
}

// Bytes per packed weight row: two codes per byte for bits ≤ 4 (low nibble =
// even column), one per byte otherwise.
int64_t row_bytes(int bits, int64_t in) { return bits <= 4 ? (in + 1) / 2 : in; }
// Scale groups per row: ceil(in/group), the last possibly short (kernels/qgemm.h).
int64_t num_groups(int64_t group, int64_t in) {
  return group > 0 && in > 0 ? (in + group - 1) / group : 1;
}

// ---- Tensor names.
std::string proj_name(int64_t l, int p) { return layer_prefix(l) + kProjNames[p]; }
std::string online_name(int64_t l, const char* t) { return layer_prefix(l) + "online." + t; }
std::string intact_name(int64_t l, const char* kv) {
  return "model.intactkv." + std::to_string(l) + "." + kv;
}
constexpr const char* kEmbed = "model.embed_tokens.weight";
constexpr const char* kNorm = "model.norm.weight";
constexpr const char* kLmHead = "lm_head.weight";
constexpr const char* kIntactLogits = "model.intactkv.logits";

Status check_finite(const std::vector<float>& v, const std::string& name) {
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      return invalid_input("tensor " + name + ": non-finite value " + std::to_string(v[i]) +
                           " at element " + std::to_string(i));
  return Status::ok();
}

Status check_size(const std::vector<float>& v, size_t want, const std::string& name) {
  if (v.size() != want)
    return invalid_input("tensor " + name + " has " + std::to_string(v.size()) +
                         " elements, the config implies " + std::to_string(want));
  return check_finite(v, name);
}

Status check_act(const NativeActQuant& a, const std::string& what) {
  if (a.bits != 16 && !supported_bits(a.bits))
    return invalid_input(what + ".bits: " + std::to_string(a.bits) +
                         " is not a supported bit width (" + kBitsList + ")");
  if (a.group != -1 && a.group <= 0)
    return invalid_input(what + ".group: " + std::to_string(a.group) +
                         " must be -1 (per token) or positive");
  if (!std::isfinite(a.clip) || a.clip <= 0.0f || a.clip > 1.0f)
    return invalid_input(what + ".clip: " + std::to_string(a.clip) + " must be in (0, 1]");
  return Status::ok();
}

Status check_packed(const PackedWeight& w, int w_bits, int64_t w_group, int64_t out, int64_t in,
                    const std::string& name) {
  const int64_t group = w.group > 0 ? w.group : -1;
  if (w.bits != w_bits)
    return invalid_input("tensor " + name + ".qweight: " + std::to_string(w.bits) +
                         "-bit codes, the model says w_bits " + std::to_string(w_bits));
  if (group != w_group)
    return invalid_input("tensor " + name + ".scales: group " + std::to_string(group) +
                         ", the model says w_group " + std::to_string(w_group));
  if (w.out != out || w.in != in)
    return invalid_input("tensor " + name + ".qweight: shape [" + std::to_string(w.out) + ", " +
                         std::to_string(w.in) + "], the config implies [" + std::to_string(out) +
                         ", " + std::to_string(in) + "]");
  if (static_cast<int64_t>(w.data.size()) != out * row_bytes(w.bits, in))
    return invalid_input("tensor " + name + ".qweight: " + std::to_string(w.data.size()) +
                         " bytes of codes, expected " +
                         std::to_string(out * row_bytes(w.bits, in)));
  const int64_t G = num_groups(group, in);
  if (static_cast<int64_t>(w.scales.size()) != out * G)
    return invalid_input("tensor " + name + ".scales: " + std::to_string(w.scales.size()) +
                         " scales, expected " + std::to_string(out * G) + " (out × groups)");
  for (size_t i = 0; i < w.scales.size(); ++i)
    if (!std::isfinite(w.scales[i]) || w.scales[i] < 0.0f)
      return invalid_input("tensor " + name + ".scales: invalid scale " +
                           std::to_string(w.scales[i]) + " at element " + std::to_string(i));
  const int lo = -(1 << (w.bits - 1)), hi = (1 << (w.bits - 1)) - 1;
  std::vector<int8_t> codes(static_cast<size_t>(in));
  for (int64_t o = 0; o < out; ++o) {
    unpack_row(w, o, codes.data());
    for (int64_t i = 0; i < in; ++i)
      if (codes[i] < lo || codes[i] > hi)
        return invalid_input("tensor " + name + ".qweight: code " + std::to_string(codes[i]) +
                             " at [" + std::to_string(o) + ", " + std::to_string(i) +
                             "] outside the " + std::to_string(w.bits) + "-bit range [" +
                             std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return Status::ok();
}

Status check_finite(const float* v, size_t n, const std::string& name, size_t offset) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i]))
      return invalid_input("tensor " + name + ": non-finite value " + std::to_string(v[i]) +
                           " at element " + std::to_string(offset + i));
  return Status::ok();
}

// ---- Checks, shared by the writers (before they write) and the reader (after
// it loads). kInvalidInput naming the tensor / field.

// The Kronecker pairs among the online transforms and the dimension each acts on.
struct PairSlot {
  const char* left;
  const char* right;
  OnlineDim dim;
};
const PairSlot kPairs[] = {{"a1", "a2", OnlineDim::kHidden},
                           {"u1", "u2", OnlineDim::kHidden},
                           {"d1", "d2", OnlineDim::kInter}};

// Side of online transform `name` in `y` (0 = absent).
int64_t side_of(const NativeLayerDecl& y, const char* name) {
  auto it = y.online.find(name);
  return it == y.online.end() ? 0 : it->second;
}

// The Kronecker pair (a, b) of layer l, either factor possibly absent, acting
// on n: both present, side(a)·side(b) = n; one present, its side divides n.
Status check_pair(const NativeLayerDecl& y, int64_t l, const char* a, const char* b, int64_t n) {
  const bool has_l = y.online.count(a), has_r = y.online.count(b);
  const int64_t sl = has_l ? y.online.at(a) : 1, sr = has_r ? y.online.at(b) : 1;
  if (sl <= 0) return invalid_input("tensor " + online_name(l, a) + " is not a square matrix");
  if (sr <= 0) return invalid_input("tensor " + online_name(l, b) + " is not a square matrix");
  const bool ok = (has_l && has_r) ? sl * sr == n : n % (sl * sr) == 0;
  if (!ok)
    return invalid_input("tensors " + online_name(l, a) + " (" + std::to_string(sl) + "×" +
                         std::to_string(sl) + ") and " + online_name(l, b) + " (" +
                         std::to_string(sr) + "×" + std::to_string(sr) +
                         ") do not factor the dimension " + std::to_string(n));
  return Status::ok();
}

Status check_side(const NativeLayerDecl& y, int64_t l, const char* name, int64_t want) {
  const int64_t s = side_of(y, name);
  if (s != want)
    return invalid_input("tensor " + online_name(l, name) + " is " + std::to_string(s) + "×" +
                         std::to_string(s) + ", the config implies " + std::to_string(want) + "×" +
                         std::to_string(want));
  return Status::ok();
}

// Layer l's declaration: its quantizers and online transform shapes.
Status check_layer_decl(const ModelConfig& c, const NativeLayerDecl& y, int64_t l) {
  const std::string li = "layers[" + std::to_string(l) + "]";
  for (int p = 0; p < kNumProj; ++p)
    QCAL_RETURN_IF_ERROR(check_act(y.act[p], li + ".act." + kProjShort[p]));
  QCAL_RETURN_IF_ERROR(check_act(y.k, li + ".k"));
  QCAL_RETURN_IF_ERROR(check_act(y.v, li + ".v"));
  for (const auto& [name, side] : y.online) {
    bool known = false;
    for (const OnlineSlot& s : kOnline) known = known || name == s.name;
    if (!known) return invalid_input(li + ".online: unknown transform '" + name + "'");
  }
  for (const PairSlot& pair : kPairs)
    QCAL_RETURN_IF_ERROR(check_pair(y, l, pair.left, pair.right, dim_of(c, pair.dim)));
  if (y.online.count("po")) QCAL_RETURN_IF_ERROR(check_side(y, l, "po", c.num_attention_heads));
  if (y.online.count("pk") != y.online.count("pk_it"))
    return invalid_input("tensors " + online_name(l, "pk") + " and " + online_name(l, "pk_it") +
                         " must both be present or both absent");
  if (y.online.count("pk")) {
    QCAL_RETURN_IF_ERROR(check_side(y, l, "pk", c.head_dim));
    QCAL_RETURN_IF_ERROR(check_side(y, l, "pk_it", c.head_dim));
  }
  return Status::ok();
}

// Everything the files say besides the tensor values: config, weight format,
// per-layer quantizers and online transform shapes, IntactKV prefix ids.
Status check_decl(const NativeModelDecl& m) {
  const ModelConfig& c = m.config;
  QCAL_RETURN_IF_ERROR(parse_model_config(c.to_json(), "config").status());
  const int64_t V = c.vocab_size, L = c.num_hidden_layers;
  if (m.w_bits != 16 && !supported_bits(m.w_bits))
    return invalid_input("w_bits: " + std::to_string(m.w_bits) + " is not a supported bit width (" +
                         kBitsList + ")");
  if (m.w_group != -1) {
    if (m.w_bits == 16) return invalid_input("w_group: must be -1 for unquantized weights");
    if (m.w_group <= 0)
      return invalid_input("w_group: " + std::to_string(m.w_group) +
                           " must be -1 (per channel) or positive");
  }
  if (!m.recipe.is_object()) return invalid_input("recipe: must be a JSON object");
  if (static_cast<int64_t>(m.layers.size()) != L)
    return invalid_input("layers: " + std::to_string(m.layers.size()) + " layers, the config has " +
                         std::to_string(L));
  for (int64_t l = 0; l < L; ++l) QCAL_RETURN_IF_ERROR(check_layer_decl(c, m.layers[l], l));
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  for (int64_t i = 0; i < P; ++i)
    if (m.intact_prefix[i] < 0 || m.intact_prefix[i] >= V)
      return invalid_input("intactkv.prefix[" + std::to_string(i) + "]: token id " +
                           std::to_string(m.intact_prefix[i]) + " outside [0, " +
                           std::to_string(V) + ")");
  return Status::ok();
}

json act_to_json(const NativeActQuant& a) {
  return {
      {"bits", a.bits}, {"sym", a.sym}, {"group", a.group}, {"clip", static_cast<double>(a.clip)}};
}

bool same_act(const NativeActQuant& a, const NativeActQuant& b) {
  return a.bits == b.bits && a.sym == b.sym && a.group == b.group && a.clip == b.clip;
}

// Layer l as given against its declaration (quantizers, online shapes, biases).
Status check_layer_matches(const NativeLayerDecl& want, int64_t l, const NativeLayer& y) {
  const NativeLayerDecl got = native_layer_decl(y);
  const std::string li = "layers[" + std::to_string(l) + "]";
  auto act_diff = [&](const NativeActQuant& g, const NativeActQuant& w, const std::string& what) {
    return invalid_input(what + ": the layer's quantizer " + act_to_json(g).dump() +
                         " differs from its declaration " + act_to_json(w).dump());
  };
  for (int p = 0; p < kNumProj; ++p)
    if (!same_act(got.act[p], want.act[p]))
      return act_diff(got.act[p], want.act[p], li + ".act." + kProjShort[p]);
  if (!same_act(got.k, want.k)) return act_diff(got.k, want.k, li + ".k");
  if (!same_act(got.v, want.v)) return act_diff(got.v, want.v, li + ".v");
  auto shape = [](const NativeLayerDecl& d, const char* name) {
    auto it = d.online.find(name);
    if (it == d.online.end()) return std::string("absent");
    if (it->second <= 0) return std::string("not a square matrix");
    return std::to_string(it->second) + "×" + std::to_string(it->second);
  };
  for (const OnlineSlot& s : kOnline)
    if (shape(got, s.name) != shape(want, s.name))
      return invalid_input("tensor " + online_name(l, s.name) + ": the layer's is " +
                           shape(got, s.name) + ", declared " + shape(want, s.name));
  for (int p = 0; p < 3; ++p)
    if (got.bias[p] != want.bias[p])
      return invalid_input(
          "tensor " + proj_name(l, p) + ".bias: " +
          (got.bias[p] ? "the layer has it, not declared" : "declared, the layer has none"));
  return Status::ok();
}

// The values of layer l: sizes the config implies, finite floats, code ranges
// (its declaration is checked apart).
Status check_layer_tensors(const ModelConfig& c, int w_bits, int64_t w_group, int64_t l,
                           const NativeLayer& y) {
  const int64_t H = c.hidden_size;
  const std::string lp = layer_prefix(l);
  QCAL_RETURN_IF_ERROR(check_size(y.input_norm, H, lp + "input_layernorm.weight"));
  QCAL_RETURN_IF_ERROR(check_size(y.post_norm, H, lp + "post_attention_layernorm.weight"));
  for (int p = 0; p < kNumProj; ++p) {
    const int64_t out = proj_out(c, p), in = proj_in(c, p);
    if (w_bits < 16) {
      QCAL_RETURN_IF_ERROR(check_packed(y.qw[p], w_bits, w_group, out, in, proj_name(l, p)));
    } else {
      QCAL_RETURN_IF_ERROR(check_size(y.fw[p], out * in, proj_name(l, p) + ".weight"));
    }
  }
  for (int p = 0; p < 3; ++p)
    if (!y.bias[p].empty())
      QCAL_RETURN_IF_ERROR(check_size(y.bias[p], proj_out(c, p), proj_name(l, p) + ".bias"));
  for (const OnlineSlot& s : kOnline)
    QCAL_RETURN_IF_ERROR(check_finite(y.online.*s.member, online_name(l, s.name)));
  return Status::ok();
}

// Everything that must hold for layer l of a model of config c, read on its own
// (NativeCheckpoint::read_layer): its declaration and its tensors.
Status check_layer(const ModelConfig& c, int w_bits, int64_t w_group, const NativeLayer& y,
                   int64_t l) {
  QCAL_RETURN_IF_ERROR(check_layer_decl(c, native_layer_decl(y), l));
  return check_layer_tensors(c, w_bits, w_group, l, y);
}

// Everything that must hold for a whole NativeModel (write_native before it
// writes, the reader after it loads).
Status check_model(const NativeModel& m) {
  QCAL_RETURN_IF_ERROR(check_decl(native_decl(m)));
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  QCAL_RETURN_IF_ERROR(check_size(m.embed, V * H, kEmbed));
  QCAL_RETURN_IF_ERROR(check_size(m.final_norm, H, kNorm));
  QCAL_RETURN_IF_ERROR(check_size(m.lm_head, V * H, kLmHead));
  for (int64_t l = 0; l < L; ++l)
    QCAL_RETURN_IF_ERROR(check_layer_tensors(c, m.w_bits, m.w_group, l, m.layers[l]));
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  if (P == 0) {
    if (!m.intact_k.empty() || !m.intact_v.empty() || !m.intact_logits.empty())
      return invalid_input("intactkv: cache tensors without a prefix");
    return Status::ok();
  }
  if (static_cast<int64_t>(m.intact_k.size()) != L || static_cast<int64_t>(m.intact_v.size()) != L)
    return invalid_input("intactkv: need K and V caches for all " + std::to_string(L) + " layers");
  for (int64_t l = 0; l < L; ++l) {
    QCAL_RETURN_IF_ERROR(check_size(m.intact_k[l], P * c.kv_dim(), intact_name(l, "k")));
    QCAL_RETURN_IF_ERROR(check_size(m.intact_v[l], P * c.kv_dim(), intact_name(l, "v")));
  }
  return check_size(m.intact_logits, P * V, kIntactLogits);
}

// ---------------------------------------------------------------- writer

json quant_json(const NativeModelDecl& m) {
  json j = {{"format", kNativeFormat},
            {"version", kNativeVersion},
            {"recipe", m.recipe},
            {"w_bits", m.w_bits},
            {"w_group", m.w_group}};
  json layers = json::array();
  for (const NativeLayerDecl& y : m.layers) {
    json act = json::object();
    for (int p = 0; p < kNumProj; ++p) act[kProjShort[p]] = act_to_json(y.act[p]);
    json online = json::array();
    for (const OnlineSlot& s : kOnline)
      if (y.online.count(s.name)) online.push_back(s.name);
    layers.push_back(
        {{"act", act}, {"k", act_to_json(y.k)}, {"v", act_to_json(y.v)}, {"online", online}});
  }
  j["layers"] = layers;
  j["intactkv"] = m.intact_prefix.empty() ? json(nullptr) : json{{"prefix", m.intact_prefix}};
  return j;
}

// One tensor of a layer; `data` is null when only declaring.
struct LayerTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t bytes = 0;
};

// The tensors of layer l in file order (the one definition of that order):
// shapes from the declaration, data from `y` when given (after
// check_layer_matches and check_layer_tensors, so the sizes agree).
std::vector<LayerTensor> layer_tensors(const NativeModelDecl& m, int64_t l, const NativeLayer* y) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size;
  const NativeLayerDecl& d = m.layers[l];
  const std::string lp = layer_prefix(l);
  std::vector<LayerTensor> ts;
  auto f32 = [&](std::string name, std::vector<int64_t> shape, const std::vector<float>* v) {
    ts.push_back({std::move(name), DType::kF32, std::move(shape), v ? v->data() : nullptr,
                  v ? v->size() * sizeof(float) : 0});
  };
  f32(lp + "input_layernorm.weight", {H}, y ? &y->input_norm : nullptr);
  f32(lp + "post_attention_layernorm.weight", {H}, y ? &y->post_norm : nullptr);
  for (const OnlineSlot& s : kOnline) {
    const int64_t n = side_of(d, s.name);
    if (n > 0) f32(online_name(l, s.name), {n, n}, y ? &(y->online.*s.member) : nullptr);
  }
  for (int p = 0; p < kNumProj; ++p) {
    const std::string pn = proj_name(l, p);
    const int64_t out = proj_out(c, p), in = proj_in(c, p);
    if (m.w_bits < 16) {
      const PackedWeight* w = y ? &y->qw[p] : nullptr;
      ts.push_back({pn + ".qweight",
                    DType::kU8,
                    {out, row_bytes(m.w_bits, in)},
                    w ? w->data.data() : nullptr,
                    w ? w->data.size() : 0});
      f32(pn + ".scales", {out, num_groups(m.w_group, in)}, w ? &w->scales : nullptr);
    } else {
      f32(pn + ".weight", {out, in}, y ? &y->fw[p] : nullptr);
    }
    if (p < 3 && d.bias[p]) f32(pn + ".bias", {out}, y ? &y->bias[p] : nullptr);
  }
  return ts;
}

Status write_staging(const NativeModelDecl& m, const NativeSource& src, uint64_t chunk,
                     const std::string& staging) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  SafetensorsWriter w(join_path(staging, kTensorFile));
  w.set_metadata("format", kNativeFormat);
  w.set_metadata("qcal.native_version", std::to_string(kNativeVersion));
  w.add(kEmbed, DType::kF32, {V, H});
  for (int64_t l = 0; l < L; ++l)
    for (const LayerTensor& t : layer_tensors(m, l, nullptr)) w.add(t.name, t.dtype, t.shape);
  w.add(kNorm, DType::kF32, {H});
  w.add(kLmHead, DType::kF32, {V, H});
  if (P > 0) {
    for (int64_t l = 0; l < L; ++l) {
      w.add(intact_name(l, "k"), DType::kF32, {P, c.kv_dim()});
      w.add(intact_name(l, "v"), DType::kF32, {P, c.kv_dim()});
    }
    w.add(kIntactLogits, DType::kF32, {P, V});
  }
  QCAL_RETURN_IF_ERROR(w.begin());

  auto rows = [&](const RowFn& fn, const std::string& name) {
    return w.write_rows([&](int64_t row0, int64_t n,
                            float* out) { return fn(row0, n, out).with_context("tensor " + name); },
                        chunk);
  };
  QCAL_RETURN_IF_ERROR(rows(src.embed, kEmbed));
  for (int64_t l = 0; l < L; ++l) {
    Result<NativeLayer> y = src.layer(l);
    if (!y.is_ok()) return y.status().with_context("layer " + std::to_string(l));
    QCAL_RETURN_IF_ERROR(check_layer_matches(m.layers[l], l, *y));
    QCAL_RETURN_IF_ERROR(check_layer_tensors(c, m.w_bits, m.w_group, l, *y));
    for (const LayerTensor& t : layer_tensors(m, l, &*y))
      QCAL_RETURN_IF_ERROR(w.write(std::string_view(static_cast<const char*>(t.data), t.bytes)));
  }
  QCAL_RETURN_IF_ERROR(rows(src.final_norm, kNorm));
  QCAL_RETURN_IF_ERROR(rows(src.lm_head, kLmHead));
  if (P > 0) {
    std::vector<float> k, v;
    for (int64_t l = 0; l < L; ++l) {
      QCAL_RETURN_IF_ERROR(
          src.intact_kv(l, &k, &v).with_context("IntactKV cache of layer " + std::to_string(l)));
      QCAL_RETURN_IF_ERROR(check_size(k, P * c.kv_dim(), intact_name(l, "k")));
      QCAL_RETURN_IF_ERROR(check_size(v, P * c.kv_dim(), intact_name(l, "v")));
      QCAL_RETURN_IF_ERROR(w.write_f32(k.data(), k.size()));
      QCAL_RETURN_IF_ERROR(w.write_f32(v.data(), v.size()));
    }
    QCAL_RETURN_IF_ERROR(rows(src.intact_logits, kIntactLogits));
  }
  QCAL_RETURN_IF_ERROR(w.finish());
  QCAL_RETURN_IF_ERROR(
      write_file_atomic(join_path(staging, kConfigFile), c.to_json().dump(2) + "\n"));
  return write_file_atomic(join_path(staging, kQuantFile), quant_json(m).dump(2) + "\n");
}

// Runs `write` into a fresh staging directory `<dir>.partial.<pid>` and
// publishes it at `dir` (publish_dir: fsync, rename; an existing `dir` is
// replaced only with `overwrite`). On any error the staging directory is
// removed and nothing appears at `dir`. The one publishing step of the native
// writer: a fenced publish replaces this function.
Status publish_native(const std::string& dir, bool overwrite,
                      const std::function<Status(const std::string& staging)>& write) {
  QCAL_ASSIGN_OR_RETURN(std::string staging, make_staging_dir(dir));
  Status st = write(staging);
  if (st.is_ok()) st = publish_dir(staging, dir, overwrite);
  if (!st.is_ok()) {
    std::error_code ec;
    fs::remove_all(staging, ec);
  }
  return st;
}

// ---------------------------------------------------------------- reader

// Typed access to qcal_quant.json fields; errors name the path in the file.
class JsonReader {
 public:
  explicit JsonReader(std::string file) : file_(std::move(file)) {}
  Status fail(const std::string& path, const std::string& msg) const {
    return invalid_input(file_ + ": " + path + ": " + msg);
  }
  Status only_keys(const json& j, const std::string& path,
                   std::initializer_list<const char*> keys) const {
    if (!j.is_object()) return fail(path, "must be an object");
    for (auto it = j.begin(); it != j.end(); ++it) {
      bool known = false;
      for (const char* k : keys) known = known || it.key() == k;
      if (!known) return fail(path, "unknown key '" + it.key() + "'");
    }
    for (const char* k : keys)
      if (!j.contains(k)) return fail(path, std::string("missing key '") + k + "'");
    return Status::ok();
  }
  Result<int64_t> integer(const json& j, const std::string& path) const {
    if (!j.is_number_integer()) return fail(path, "must be an integer");
    return j.get<int64_t>();
  }
  Result<bool> boolean(const json& j, const std::string& path) const {
    if (!j.is_boolean()) return fail(path, "must be true or false");
    return j.get<bool>();
  }
  Result<double> number(const json& j, const std::string& path) const {
    if (!j.is_number()) return fail(path, "must be a number");
    return j.get<double>();
  }
  Result<NativeActQuant> act(const json& j, const std::string& path) const {
    QCAL_RETURN_IF_ERROR(only_keys(j, path, {"bits", "sym", "group", "clip"}));
    NativeActQuant a;
    QCAL_ASSIGN_OR_RETURN(int64_t bits, integer(j["bits"], path + ".bits"));
    if (bits != 16 && !supported_bits(static_cast<int>(bits)))
      return fail(path + ".bits",
                  std::to_string(bits) + " is not a supported bit width (" + kBitsList + ")");
    a.bits = static_cast<int>(bits);
    QCAL_ASSIGN_OR_RETURN(a.sym, boolean(j["sym"], path + ".sym"));
    QCAL_ASSIGN_OR_RETURN(a.group, integer(j["group"], path + ".group"));
    QCAL_ASSIGN_OR_RETURN(double clip, number(j["clip"], path + ".clip"));
    a.clip = static_cast<float>(clip);
    return a;
  }

 private:
  std::string file_;
};

// Checks tensors by name against the checkpoint's header (dtype and shape), and
// remembers which were named (the rest are "unexpected"). Reads no tensor data.
class TensorChecker {
 public:
  TensorChecker(const SafetensorsFile& f, std::string what) : f_(f), what_(std::move(what)) {}
  bool has(const std::string& name) const { return f_.find(name) != nullptr; }
  Status expect(const std::string& name, DType dtype, const std::vector<int64_t>& shape) {
    const TensorInfo* t = f_.find(name);
    if (!t) return invalid_input(what_ + ": missing tensor " + name);
    if (t->dtype != dtype)
      return invalid_input(what_ + ": tensor " + name + " has dtype " + dtype_name(t->dtype) +
                           ", expected " + dtype_name(dtype));
    if (t->shape != shape)
      return invalid_input(what_ + ": tensor " + name + " has shape " + shape_str(t->shape) +
                           ", expected " + shape_str(shape));
    used_.insert(name);
    return Status::ok();
  }
  Status check_all_used() const {
    for (const TensorInfo& t : f_.header().tensors)
      if (!used_.count(t.name))
        return invalid_input(what_ + ": unexpected tensor " + t.name +
                             " (not part of this configuration)");
    return Status::ok();
  }

 private:
  const SafetensorsFile& f_;
  std::string what_;
  std::set<std::string> used_;
};

// Pointer and element count of the F32 tensor `name` (present: checked at open).
const float* f32_data(const SafetensorsFile& f, const std::string& name, size_t* n) {
  const TensorInfo* t = f.find(name);
  QCAL_CHECK_MSG(t && t->dtype == DType::kF32, ("native: tensor " + name + " vanished").c_str());
  const std::string_view b = f.raw(*t);
  *n = b.size() / sizeof(float);
  return reinterpret_cast<const float*>(b.data());
}

// Copies elements [first, first + n) of the F32 tensor `name` into out and
// drops the tensor's mapped pages.
void copy_f32(const SafetensorsFile& f, const std::string& name, size_t first, size_t n,
              float* out) {
  size_t total = 0;
  const float* src = f32_data(f, name, &total);
  QCAL_CHECK(first + n <= total);
  if (n > 0) std::memcpy(out, src + first, n * sizeof(float));
  f.release(*f.find(name));
}

// The whole F32 tensor `name` into out.
void copy_f32(const SafetensorsFile& f, const std::string& name, std::vector<float>* out) {
  size_t total = 0;
  f32_data(f, name, &total);
  out->resize(total);
  copy_f32(f, name, 0, total, out->data());
}

// Parses and checks qcal_quant.json and config.json into m (no tensor data) and
// the online transforms each layer lists; then maps model.safetensors and checks
// its tensor list against them. What read_native checks before reading values.
Status open_native(const std::string& dir, NativeModel& m,
                   std::vector<std::vector<std::string>>& online,
                   std::unique_ptr<SafetensorsFile>* file_out) {
  const std::string qpath = join_path(dir, kQuantFile);
  QCAL_ASSIGN_OR_RETURN(std::string text, read_file(qpath));
  if (json_nesting_exceeds(text, kMaxJsonDepth) != std::string::npos)
    return invalid_input(qpath + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth));
  const json q = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (q.is_discarded()) return invalid_input(qpath + ": not valid JSON");
  const JsonReader jr(qpath);
  if (!q.is_object()) return jr.fail("(top level)", "must be an object");
  if (!q.contains("format") || !q["format"].is_string() || q["format"] != kNativeFormat)
    return jr.fail("format", std::string("not a ") + kNativeFormat + " checkpoint (format " +
                                 (q.contains("format") ? q["format"].dump() : "missing") + ")");
  if (!q.contains("version")) return jr.fail("version", "missing");
  QCAL_ASSIGN_OR_RETURN(int64_t version, jr.integer(q["version"], "version"));
  if (version > kNativeVersion)
    return jr.fail("version", "format version " + std::to_string(version) +
                                  " was written by a newer qcal (this build reads version " +
                                  std::to_string(kNativeVersion) + ")");
  if (version < 1) return jr.fail("version", "invalid format version " + std::to_string(version));
  QCAL_RETURN_IF_ERROR(
      jr.only_keys(q, "(top level)",
                   {"format", "version", "recipe", "w_bits", "w_group", "layers", "intactkv"}));
  if (!q["recipe"].is_object()) return jr.fail("recipe", "must be an object");
  m.recipe = q["recipe"];
  QCAL_ASSIGN_OR_RETURN(int64_t w_bits, jr.integer(q["w_bits"], "w_bits"));
  if (w_bits != 16 && !supported_bits(static_cast<int>(w_bits)))
    return jr.fail("w_bits",
                   std::to_string(w_bits) + " is not a supported bit width (" + kBitsList + ")");
  m.w_bits = static_cast<int>(w_bits);
  QCAL_ASSIGN_OR_RETURN(m.w_group, jr.integer(q["w_group"], "w_group"));

  QCAL_ASSIGN_OR_RETURN(m.config, load_model_config(join_path(dir, kConfigFile)));
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  if (m.w_group != -1 && (m.w_group <= 0 || m.w_bits == 16))
    return jr.fail("w_group",
                   std::to_string(m.w_group) + " must be -1, or positive with quantized weights");

  const json& layers = q["layers"];
  if (!layers.is_array() || static_cast<int64_t>(layers.size()) != L)
    return jr.fail("layers",
                   "must be an array of " + std::to_string(L) + " entries (num_hidden_layers)");
  online.assign(static_cast<size_t>(L), {});
  m.layers.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    const std::string lp = "layers[" + std::to_string(l) + "]";
    const json& jl = layers[l];
    QCAL_RETURN_IF_ERROR(jr.only_keys(jl, lp, {"act", "k", "v", "online"}));
    std::vector<const char*> names(kProjShort, kProjShort + kNumProj);
    const json& ja = jl["act"];
    if (!ja.is_object() || ja.size() != kNumProj)
      return jr.fail(lp + ".act", "must be an object with the 7 projections q_proj .. down_proj");
    NativeLayer& y = m.layers[l];
    for (int p = 0; p < kNumProj; ++p) {
      if (!ja.contains(kProjShort[p]))
        return jr.fail(lp + ".act", std::string("missing key '") + kProjShort[p] + "'");
      QCAL_ASSIGN_OR_RETURN(y.act[p], jr.act(ja[kProjShort[p]], lp + ".act." + kProjShort[p]));
    }
    QCAL_ASSIGN_OR_RETURN(y.k, jr.act(jl["k"], lp + ".k"));
    QCAL_ASSIGN_OR_RETURN(y.v, jr.act(jl["v"], lp + ".v"));
    if (!jl["online"].is_array()) return jr.fail(lp + ".online", "must be an array");
    for (const json& n : jl["online"]) {
      bool known = false;
      for (const OnlineSlot& s : kOnline) known = known || (n.is_string() && n == s.name);
      if (!known) return jr.fail(lp + ".online", "unknown transform " + n.dump());
      if (std::find(online[l].begin(), online[l].end(), n.get<std::string>()) != online[l].end())
        return jr.fail(lp + ".online", "duplicate transform " + n.dump());
      online[l].push_back(n.get<std::string>());
    }
  }
  const json& jk = q["intactkv"];
  if (!jk.is_null()) {
    QCAL_RETURN_IF_ERROR(jr.only_keys(jk, "intactkv", {"prefix"}));
    if (!jk["prefix"].is_array() || jk["prefix"].empty())
      return jr.fail("intactkv.prefix", "must be a non-empty array of token ids");
    for (size_t i = 0; i < jk["prefix"].size(); ++i) {
      const std::string path = "intactkv.prefix[" + std::to_string(i) + "]";
      QCAL_ASSIGN_OR_RETURN(int64_t id, jr.integer(jk["prefix"][i], path));
      if (id < 0 || id >= V)
        return jr.fail(
            path, "token id " + std::to_string(id) + " outside [0, " + std::to_string(V) + ")");
      m.intact_prefix.push_back(static_cast<int32_t>(id));
    }
  }

  // Tensors: names, dtypes and shapes.
  const std::string tpath = join_path(dir, kTensorFile);
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::open(tpath));
  TensorChecker tc(*file, tpath);
  QCAL_RETURN_IF_ERROR(tc.expect(kEmbed, DType::kF32, {V, H}));
  QCAL_RETURN_IF_ERROR(tc.expect(kNorm, DType::kF32, {H}));
  QCAL_RETURN_IF_ERROR(tc.expect(kLmHead, DType::kF32, {V, H}));
  for (int64_t l = 0; l < L; ++l) {
    const std::string lp = layer_prefix(l);
    QCAL_RETURN_IF_ERROR(tc.expect(lp + "input_layernorm.weight", DType::kF32, {H}));
    QCAL_RETURN_IF_ERROR(tc.expect(lp + "post_attention_layernorm.weight", DType::kF32, {H}));
    for (int p = 0; p < kNumProj; ++p) {
      const std::string pn = proj_name(l, p);
      const int64_t out = proj_out(c, p), in = proj_in(c, p);
      if (m.w_bits < 16) {
        QCAL_RETURN_IF_ERROR(
            tc.expect(pn + ".qweight", DType::kU8, {out, row_bytes(m.w_bits, in)}));
        QCAL_RETURN_IF_ERROR(
            tc.expect(pn + ".scales", DType::kF32, {out, num_groups(m.w_group, in)}));
      } else {
        QCAL_RETURN_IF_ERROR(tc.expect(pn + ".weight", DType::kF32, {out, in}));
      }
      if (p < 3 && (c.attention_bias || tc.has(pn + ".bias")))
        QCAL_RETURN_IF_ERROR(tc.expect(pn + ".bias", DType::kF32, {out}));
    }
    for (const std::string& n : online[l]) {
      for (const OnlineSlot& s : kOnline) {
        if (n != s.name) continue;
        const std::string tn = online_name(l, s.name);
        const TensorInfo* ti = file->find(tn);
        if (!ti)
          return invalid_input(tpath + ": missing tensor " + tn + " (listed in " + qpath +
                               " layers[" + std::to_string(l) + "].online)");
        // Square; the factorization against the dimension is checked with the values.
        const int64_t side = ti->shape.size() == 2 ? ti->shape[0] : -1;
        if (side <= 0 || side > dim_of(c, s.dim))
          return invalid_input(tpath + ": tensor " + tn + " has shape " + shape_str(ti->shape) +
                               ", expected a square matrix of side dividing " +
                               std::to_string(dim_of(c, s.dim)));
        QCAL_RETURN_IF_ERROR(tc.expect(tn, DType::kF32, {side, side}));
      }
    }
  }
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  if (P > 0) {
    for (int64_t l = 0; l < L; ++l) {
      QCAL_RETURN_IF_ERROR(tc.expect(intact_name(l, "k"), DType::kF32, {P, c.kv_dim()}));
      QCAL_RETURN_IF_ERROR(tc.expect(intact_name(l, "v"), DType::kF32, {P, c.kv_dim()}));
    }
    QCAL_RETURN_IF_ERROR(tc.expect(kIntactLogits, DType::kF32, {P, V}));
  }
  QCAL_RETURN_IF_ERROR(tc.check_all_used());
  *file_out = std::move(file);
  return Status::ok();
}

// Layer l's tensors (present: open_native checked them) into y, with the
// quantizer settings of meta; values unchecked.
void load_layer(const SafetensorsFile& f, const NativeModel& meta,
                const std::vector<std::string>& online, int64_t l, NativeLayer* y) {
  const ModelConfig& c = meta.config;
  const NativeLayer& settings = meta.layers[static_cast<size_t>(l)];
  y->act = settings.act;
  y->k = settings.k;
  y->v = settings.v;
  const std::string lp = layer_prefix(l);
  copy_f32(f, lp + "input_layernorm.weight", &y->input_norm);
  copy_f32(f, lp + "post_attention_layernorm.weight", &y->post_norm);
  for (int p = 0; p < kNumProj; ++p) {
    const std::string pn = proj_name(l, p);
    if (meta.w_bits < 16) {
      PackedWeight& w = y->qw[p];
      w.bits = meta.w_bits;
      w.out = proj_out(c, p);
      w.in = proj_in(c, p);
      w.group = meta.w_group;
      const TensorInfo* t = f.find(pn + ".qweight");
      const std::string_view b = f.raw(*t);
      w.data.assign(reinterpret_cast<const uint8_t*>(b.data()),
                    reinterpret_cast<const uint8_t*>(b.data()) + b.size());
      f.release(*t);
      copy_f32(f, pn + ".scales", &w.scales);
    } else {
      copy_f32(f, pn + ".weight", &y->fw[p]);
    }
    if (p < 3 && f.find(pn + ".bias")) copy_f32(f, pn + ".bias", &y->bias[p]);
  }
  for (const std::string& n : online)
    for (const OnlineSlot& s : kOnline)
      if (n == s.name) copy_f32(f, online_name(l, s.name), &(y->online.*s.member));
}

// ---------------------------------------------------------------- inference

// Sizes (n1, n2) of a Kronecker pair acting on n (validated by check_pair).
void pair_dims(const std::vector<float>& L, const std::vector<float>& R, int64_t n, int64_t* n1,
               int64_t* n2) {
  if (!L.empty()) {
    *n1 = square_side(L.size());
    *n2 = n / *n1;
  } else if (!R.empty()) {
    *n2 = square_side(R.size());
    *n1 = n / *n2;
  } else {
    *n1 = 1;
    *n2 = n;
  }
}

struct Scratch {
  std::vector<float> tmp, work;                  // kron
  std::vector<int8_t> codes;                     // (rows, in) activation codes
  std::vector<uint8_t> ucodes;                   // asymmetric codes
  std::vector<float> sx, zx, xh;                 // scales, zeros, fake-quantized activations
  std::array<std::vector<float>, kNumProj> deq;  // dequantized weights of the current layer
};

// In place: x (rows, n) ← x (L ⊗ R) row by row.
void apply_kron(float* x, int64_t rows, int64_t n, const std::vector<float>& L,
                const std::vector<float>& R, Scratch& s) {
  if (L.empty() && R.empty()) return;
  int64_t n1, n2;
  pair_dims(L, R, n, &n1, &n2);
  s.tmp.resize(static_cast<size_t>(rows * n));
  s.work.resize(static_cast<size_t>(rows * n));
  kron_fwd<float>(s.tmp.data(), x, L.empty() ? nullptr : L.data(), R.empty() ? nullptr : R.data(),
                  rows, n1, n2, s.work.data());
  std::memcpy(x, s.tmp.data(), static_cast<size_t>(rows * n) * sizeof(float));
}

// y (rows, cols) = the dequantized value of x under `a` (x̂ = s·q, or s·(q − z)).
void fake_quant(const NativeActQuant& a, const float* x, int64_t rows, int64_t cols, float* y,
                Scratch& s) {
  const int64_t gs = a.group > 0 ? std::min(a.group, cols) : cols, G = num_groups(gs, cols);
  const size_t n = static_cast<size_t>(rows * cols);
  s.sx.resize(static_cast<size_t>(rows * G));
  if (a.sym) {
    s.codes.resize(n);
    quantize_act_sym(x, rows, cols, a.bits, a.clip, a.group, s.codes.data(), s.sx.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < cols; ++i)
        y[r * cols + i] = s.sx[r * G + i / gs] * static_cast<float>(s.codes[r * cols + i]);
  } else {
    s.ucodes.resize(n);
    s.zx.resize(static_cast<size_t>(rows * G));
    quantize_asym(x, rows, cols, a.bits, a.clip, a.group, s.ucodes.data(), s.sx.data(),
                  s.zx.data());
    dequantize_asym(s.ucodes.data(), s.sx.data(), s.zx.data(), rows, cols, a.group, y);
  }
}

// One layer as the forward pass needs it: the layer, the model's shapes and
// weight width, and the IntactKV prefix cache of this layer (P rows; null when 0).
struct LayerRef {
  const ModelConfig& c;
  int w_bits;
  const NativeLayer& y;
  int64_t P;
  const float* prefix_k;  // (P, K)
  const float* prefix_v;  // (P, K)
};

// The fp32 weight (out, in) of projection p: fw, or the dequantized codes.
const float* float_weight(int w_bits, const NativeLayer& y, int p, Scratch& s) {
  if (w_bits >= 16) return y.fw[p].data();
  std::vector<float>& W = s.deq[p];
  if (W.empty()) {
    const PackedWeight& w = y.qw[p];
    const int64_t G = num_groups(w.group, w.in), gs = w.group > 0 ? w.group : w.in;
    W.resize(static_cast<size_t>(w.out * w.in));
    std::vector<int8_t> codes(static_cast<size_t>(w.in));
    for (int64_t o = 0; o < w.out; ++o) {
      unpack_row(w, o, codes.data());
      for (int64_t i = 0; i < w.in; ++i)
        W[o * w.in + i] = w.scales[o * G + i / gs] * static_cast<float>(codes[i]);
    }
  }
  return W.data();
}

// y (rows, out) = q_act(x) · q_w(W_p)ᵀ + bias: the integer kernels when both the
// weight and the activation are quantized (per token, symmetric), else fp32.
void run_linear(const LayerRef& lr, int p, const float* x, int64_t rows, const float* bias,
                float* out, Scratch& s) {
  const ModelConfig& c = lr.c;
  const NativeLayer& y = lr.y;
  const int64_t in = proj_in(c, p), nout = proj_out(c, p);
  const NativeActQuant& a = y.act[p];
  if (a.bits < 16 && lr.w_bits < 16 && a.sym && a.group <= 0) {
    s.codes.resize(static_cast<size_t>(rows * in));
    s.sx.resize(static_cast<size_t>(rows));
    quantize_act_sym(x, rows, in, a.bits, a.clip, -1, s.codes.data(), s.sx.data());
    qgemm(s.codes.data(), s.sx.data(), rows, y.qw[p], bias, out);
    return;
  }
  const float* xin = x;
  if (a.bits < 16) {
    s.xh.resize(static_cast<size_t>(rows * in));
    fake_quant(a, x, rows, in, s.xh.data(), s);
    xin = s.xh.data();
  }
  linear_forward(out, xin, float_weight(lr.w_bits, y, p, s), bias, rows, in, nout);
}

const float* opt_ptr(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

// One decoder block on nb sequences of T tokens, in place on xs (nb·T, H). k_out /
// v_out (nb·T, K each; may be null) receive the new cache entries (quantized K/V).
void native_block(const LayerRef& lr, float* xs, int64_t nb, int64_t T, Scratch& s, float* k_out,
                  float* v_out) {
  const ModelConfig& c = lr.c;
  const NativeLayer& y = lr.y;
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  const int64_t n_h = c.num_attention_heads, n_kv = c.num_key_value_heads, d = c.head_dim;
  const int64_t N = nb * T, P = lr.P, S = P + T;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const BlockTransformsT<float>& t = y.online;

  std::vector<float> h(N * H), q(N * Q), k(N * K), v(N * K), att(N * Q), o(N * H);
  // Attention half.
  rmsnorm_forward(h.data(), xs, y.input_norm.data(), N, H, eps);
  apply_kron(h.data(), N, H, t.a1, t.a2, s);
  run_linear(lr, kQ, h.data(), N, opt_ptr(y.bias[0]), q.data(), s);
  run_linear(lr, kK, h.data(), N, opt_ptr(y.bias[1]), k.data(), s);
  run_linear(lr, kV, h.data(), N, opt_ptr(y.bias[2]), v.data(), s);
  for (int64_t b = 0; b < nb; ++b) {
    rope_forward(q.data() + b * T * Q, T, n_h, d, P, c.rope_theta);
    rope_forward(k.data() + b * T * K, T, n_kv, d, P, c.rope_theta);
  }
  // Per head: q_h ← q_h·P_k⁻ᵀ, k_h ← k_h·P_k (rows of d over every head).
  apply_kron(q.data(), N * n_h, d, {}, t.pk_it, s);
  apply_kron(k.data(), N * n_kv, d, {}, t.pk, s);
  // Only the new tokens' K/V are quantized (in place); the IntactKV prefix stays fp32.
  if (y.k.bits < 16) fake_quant(y.k, k.data(), N, K, k.data(), s);
  if (y.v.bits < 16) fake_quant(y.v, v.data(), N, K, v.data(), s);
  if (k_out) std::memcpy(k_out, k.data(), static_cast<size_t>(N * K) * sizeof(float));
  if (v_out) std::memcpy(v_out, v.data(), static_cast<size_t>(N * K) * sizeof(float));
  std::vector<float> kf, vf;  // (S, K) prefix ; sequence
  if (P > 0) {
    kf.resize(static_cast<size_t>(S * K));
    vf.resize(static_cast<size_t>(S * K));
    std::memcpy(kf.data(), lr.prefix_k, static_cast<size_t>(P * K) * sizeof(float));
    std::memcpy(vf.data(), lr.prefix_v, static_cast<size_t>(P * K) * sizeof(float));
  }
  for (int64_t b = 0; b < nb; ++b) {
    const float* kb = k.data() + b * T * K;
    const float* vb = v.data() + b * T * K;
    if (P > 0) {
      std::memcpy(kf.data() + P * K, kb, static_cast<size_t>(T * K) * sizeof(float));
      std::memcpy(vf.data() + P * K, vb, static_cast<size_t>(T * K) * sizeof(float));
      kb = kf.data();
      vb = vf.data();
    }
    prefix_attention(att.data() + b * T * Q, q.data() + b * T * Q, kb, vb, P, T, n_h, n_kv, d);
  }
  // P_oᵀ X per token over the (n_h, d) heads.
  apply_kron(att.data(), N, Q, t.po, {}, s);
  run_linear(lr, kO, att.data(), N, nullptr, o.data(), s);
  for (int64_t i = 0; i < N * H; ++i) xs[i] += o[i];

  // MLP half.
  std::vector<float> gate(N * I), up(N * I);
  rmsnorm_forward(h.data(), xs, y.post_norm.data(), N, H, eps);
  apply_kron(h.data(), N, H, t.u1, t.u2, s);
  run_linear(lr, kGate, h.data(), N, nullptr, gate.data(), s);
  run_linear(lr, kUp, h.data(), N, nullptr, up.data(), s);
  swiglu_forward(gate.data(), gate.data(), up.data(), N * I);
  apply_kron(gate.data(), N, I, t.d1, t.d2, s);
  run_linear(lr, kDown, gate.data(), N, nullptr, o.data(), s);
  for (int64_t i = 0; i < N * H; ++i) xs[i] += o[i];
}

// One layer on B sequences of T tokens, in place on x (B·T, H), in groups of
// >= 512 rows (bounding the workspace); k_cap / v_cap (B·T, K; may be null)
// receive the new cache entries. The dequantized weights in `s` are the layer's.
void layer_forward(const LayerRef& lr, float* x, int64_t B, int64_t T, Scratch& s, float* k_cap,
                   float* v_cap) {
  const int64_t H = lr.c.hidden_size, K = lr.c.kv_dim();
  const int64_t per = std::min(B, std::max<int64_t>(1, (512 + T - 1) / T));
  for (auto& w : s.deq) w.clear();
  for (int64_t b0 = 0; b0 < B; b0 += per)
    native_block(lr, x + b0 * T * H, std::min(per, B - b0), T, s,
                 k_cap ? k_cap + b0 * T * K : nullptr, v_cap ? v_cap + b0 * T * K : nullptr);
}

}  // namespace

// ---------------------------------------------------------------- public API

void prefix_attention(float* out, const float* q, const float* k, const float* v, int64_t P,
                      int64_t T, int64_t n_h, int64_t n_kv, int64_t d) {
  QCAL_CHECK(P >= 0 && T >= 0 && n_kv > 0 && n_h % n_kv == 0 && d > 0);
  if (T == 0) return;
  const int64_t S = P + T, Q = n_h * d, K = n_kv * d, rep = n_h / n_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> sc(static_cast<size_t>(T * S));  // (T, S) scores, then probabilities
  for (int64_t hh = 0; hh < n_h; ++hh) {
    const int64_t g = hh / rep;
    sgemm(false, true, T, S, d, scale, q + hh * d, Q, k + g * d, K, 0.0f, sc.data(), S);
    for (int64_t t = 0; t < T; ++t) {
      float* row = sc.data() + t * S;
      const int64_t len = P + t + 1;  // query t (position P + t) sees keys 0 .. P + t
      float mx = row[0];
      for (int64_t j = 1; j < len; ++j) mx = std::max(mx, row[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < len; ++j) row[j] *= inv;
      for (int64_t j = len; j < S; ++j) row[j] = 0.0f;
    }
    sgemm(false, false, T, d, S, 1.0f, sc.data(), S, v + g * d, K, 0.0f, out + hh * d, Q);
  }
}

void native_layer_forward(const ModelConfig& c, int w_bits, const NativeLayer& layer,
                          const float* prefix_k, const float* prefix_v, int64_t P, float* x,
                          int64_t B, int64_t T) {
  QCAL_CHECK(B >= 0 && T >= 0 && P >= 0 && (P == 0 || (prefix_k && prefix_v)));
  if (B * T == 0) return;
  Scratch s;
  layer_forward(LayerRef{c, w_bits, layer, P, prefix_k, prefix_v}, x, B, T, s, nullptr, nullptr);
}

NativeLayerDecl native_layer_decl(const NativeLayer& y) {
  NativeLayerDecl d;
  d.act = y.act;
  d.k = y.k;
  d.v = y.v;
  for (const OnlineSlot& s : kOnline) {
    const std::vector<float>& v = y.online.*s.member;
    if (!v.empty()) d.online[s.name] = square_side(v.size());  // 0: not square (refused)
  }
  for (int p = 0; p < 3; ++p) d.bias[p] = !y.bias[p].empty();
  return d;
}

NativeModelDecl native_decl(const NativeModel& m) {
  NativeModelDecl d;
  d.config = m.config;
  d.recipe = m.recipe;
  d.w_bits = m.w_bits;
  d.w_group = m.w_group;
  for (const NativeLayer& y : m.layers) d.layers.push_back(native_layer_decl(y));
  d.intact_prefix = m.intact_prefix;
  return d;
}

Status stream_native(const NativeModelDecl& decl, const NativeSource& src, const std::string& dir,
                     bool overwrite, uint64_t chunk_bytes) {
  const std::string what = "write_native " + dir;
  QCAL_RETURN_IF_ERROR(check_decl(decl).with_context(what));
  if (!src.embed || !src.layer || !src.final_norm || !src.lm_head)
    return invalid_input(what + ": the source lacks embed, layer, final_norm or lm_head");
  if (!decl.intact_prefix.empty() && (!src.intact_kv || !src.intact_logits))
    return invalid_input(what + ": an IntactKV prefix is declared but the source lacks " +
                         "intact_kv or intact_logits");
  if (chunk_bytes == 0) return invalid_input(what + ": chunk_bytes is 0");
  if (!overwrite && path_exists(dir))
    return invalid_input(dir + ": output exists (pass --overwrite to replace it)");
  return publish_native(dir, overwrite, [&](const std::string& staging) {
    return write_staging(decl, src, chunk_bytes, staging);
  });
}

Status write_native(const NativeModel& m, const std::string& dir, bool overwrite) {
  QCAL_RETURN_IF_ERROR(check_model(m).with_context("write_native " + dir));
  const ModelConfig& c = m.config;
  NativeSource src;
  src.embed = rows_of(m.embed.data(), c.hidden_size);
  src.layer = [&m](int64_t l) -> Result<NativeLayer> { return m.layers[l]; };
  src.final_norm = rows_of(m.final_norm.data(), 1);
  src.lm_head = rows_of(m.lm_head.data(), c.hidden_size);
  src.intact_kv = [&m](int64_t l, std::vector<float>* k, std::vector<float>* v) {
    *k = m.intact_k[l];
    *v = m.intact_v[l];
    return Status::ok();
  };
  src.intact_logits = rows_of(m.intact_logits.data(), c.vocab_size);
  return stream_native(native_decl(m), src, dir, overwrite);
}

Result<std::unique_ptr<NativeCheckpoint>> NativeCheckpoint::open(const std::string& dir) {
  std::unique_ptr<NativeCheckpoint> ck(new NativeCheckpoint());
  ck->dir_ = dir;
  QCAL_RETURN_IF_ERROR(open_native(dir, ck->meta_, ck->online_, &ck->file_));
  return ck;
}

NativeCheckpoint::~NativeCheckpoint() = default;

Result<NativeLayer> NativeCheckpoint::read_layer(int64_t l) const {
  const ModelConfig& c = meta_.config;
  if (l < 0 || l >= c.num_hidden_layers)
    return invalid_input(dir_ + ": layer " + std::to_string(l) + " out of range [0, " +
                         std::to_string(c.num_hidden_layers) + ")");
  NativeLayer y;
  load_layer(*file_, meta_, online_[static_cast<size_t>(l)], l, &y);
  Status st = check_layer(c, meta_.w_bits, meta_.w_group, y, l);
  if (!st.is_ok()) return st.with_context(dir_);
  return y;
}

Status NativeCheckpoint::read_intact_kv(int64_t l, std::vector<float>* k,
                                        std::vector<float>* v) const {
  const ModelConfig& c = meta_.config;
  if (meta_.intact_prefix.empty())
    return invalid_input(dir_ + ": the checkpoint has no IntactKV cache");
  if (l < 0 || l >= c.num_hidden_layers)
    return invalid_input(dir_ + ": layer " + std::to_string(l) + " out of range");
  copy_f32(*file_, intact_name(l, "k"), k);
  copy_f32(*file_, intact_name(l, "v"), v);
  Status st = check_finite(*k, intact_name(l, "k"));
  if (st.is_ok()) st = check_finite(*v, intact_name(l, "v"));
  return st.is_ok() ? st : st.with_context(dir_);
}

Result<std::vector<float>> NativeCheckpoint::read_final_norm() const {
  std::vector<float> g;
  copy_f32(*file_, kNorm, &g);
  Status st = check_finite(g, kNorm);
  if (!st.is_ok()) return st.with_context(dir_);
  return g;
}

Status NativeCheckpoint::read_embed_rows(const int32_t* ids, int64_t n, float* out) const {
  const int64_t H = meta_.config.hidden_size, V = meta_.config.vocab_size;
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= V)
      return invalid_input("token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                           " out of range [0, " + std::to_string(V) + ")");
  size_t total = 0;
  const float* e = f32_data(*file_, kEmbed, &total);
  const TensorInfo& ti = *file_->find(kEmbed);
  for (int64_t i = 0; i < n; ++i) {
    const size_t first = static_cast<size_t>(ids[i]) * static_cast<size_t>(H);
    std::memcpy(out + i * H, e + first, static_cast<size_t>(H) * sizeof(float));
    // Scattered rows map their page-cache neighbours too (model.h kEmbedReleaseRows).
    if ((i + 1) % kEmbedReleaseRows == 0 || i + 1 == n) file_->release(ti);
    Status st = check_finite(out + i * H, static_cast<size_t>(H), kEmbed, first);
    if (!st.is_ok()) {
      file_->release(ti);
      return st.with_context(dir_);
    }
  }
  return Status::ok();
}

Status NativeCheckpoint::read_lm_head_rows(int64_t v0, int64_t n, float* out) const {
  const int64_t H = meta_.config.hidden_size, V = meta_.config.vocab_size;
  if (v0 < 0 || n < 0 || v0 + n > V)
    return invalid_input(dir_ + ": lm_head rows [" + std::to_string(v0) + ", " +
                         std::to_string(v0 + n) + ") out of range [0, " + std::to_string(V) + ")");
  const size_t first = static_cast<size_t>(v0 * H), count = static_cast<size_t>(n * H);
  copy_f32(*file_, kLmHead, first, count, out);
  Status st = check_finite(out, count, kLmHead, first);
  return st.is_ok() ? st : st.with_context(dir_);
}

Status NativeCheckpoint::read_intact_logits(int64_t p, int64_t v0, int64_t n, float* out) const {
  const int64_t V = meta_.config.vocab_size, P = static_cast<int64_t>(meta_.intact_prefix.size());
  if (p < 0 || p >= P || v0 < 0 || n < 0 || v0 + n > V)
    return invalid_input(dir_ + ": IntactKV logits [" + std::to_string(p) + ", " +
                         std::to_string(v0) + ":" + std::to_string(v0 + n) +
                         ") outside the stored (" + std::to_string(P) + ", " + std::to_string(V) +
                         ")");
  const size_t first = static_cast<size_t>(p * V + v0), count = static_cast<size_t>(n);
  copy_f32(*file_, kIntactLogits, first, count, out);
  Status st = check_finite(out, count, kIntactLogits, first);
  return st.is_ok() ? st : st.with_context(dir_);
}

Result<NativeModel> read_native(const std::string& dir) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<NativeCheckpoint> ck, NativeCheckpoint::open(dir));
  const SafetensorsFile& f = *ck->file_;
  NativeModel m = ck->meta_;
  const int64_t L = m.config.num_hidden_layers;
  copy_f32(f, kEmbed, &m.embed);
  copy_f32(f, kNorm, &m.final_norm);
  copy_f32(f, kLmHead, &m.lm_head);
  for (int64_t l = 0; l < L; ++l)
    load_layer(f, ck->meta_, ck->online_[static_cast<size_t>(l)], l, &m.layers[l]);
  if (!m.intact_prefix.empty()) {
    m.intact_k.resize(static_cast<size_t>(L));
    m.intact_v.resize(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) {
      copy_f32(f, intact_name(l, "k"), &m.intact_k[l]);
      copy_f32(f, intact_name(l, "v"), &m.intact_v[l]);
    }
    copy_f32(f, kIntactLogits, &m.intact_logits);
  }
  Status st = check_model(m);
  if (!st.is_ok()) return st.with_context(dir);
  return m;
}

bool is_native_dir(const std::string& dir) { return path_exists(join_path(dir, kQuantFile)); }

std::vector<float> native_logits(const NativeModel& m, const int32_t* tokens, int64_t B,
                                 int64_t T) {
  return native_logits(m, tokens, B, T, nullptr);
}

std::vector<float> native_logits(const NativeModel& m, const int32_t* tokens, int64_t B, int64_t T,
                                 NativeKvCapture* capture) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, K = c.kv_dim();
  QCAL_CHECK(B >= 0 && T >= 0);
  QCAL_CHECK(static_cast<int64_t>(m.layers.size()) == c.num_hidden_layers);
  const int64_t rows = B * T;
  if (capture) {
    capture->k.assign(static_cast<size_t>(c.num_hidden_layers),
                      std::vector<float>(static_cast<size_t>(rows * K)));
    capture->v = capture->k;
  }
  if (rows == 0) return {};
  std::vector<float> x(static_cast<size_t>(rows * H));  // (B·T, H) residual stream
  for (int64_t r = 0; r < rows; ++r) {
    QCAL_CHECK_MSG(tokens[r] >= 0 && tokens[r] < V, "native_logits: token id outside the vocab");
    std::memcpy(x.data() + r * H, m.embed.data() + static_cast<int64_t>(tokens[r]) * H,
                static_cast<size_t>(H) * sizeof(float));
  }
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  Scratch s;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerRef lr{c,
                      m.w_bits,
                      m.layers[l],
                      P,
                      P > 0 ? m.intact_k[l].data() : nullptr,
                      P > 0 ? m.intact_v[l].data() : nullptr};
    layer_forward(lr, x.data(), B, T, s, capture ? capture->k[l].data() : nullptr,
                  capture ? capture->v[l].data() : nullptr);
  }
  std::vector<float> xn(static_cast<size_t>(rows * H)), out(static_cast<size_t>(rows * V));
  rmsnorm_forward(xn.data(), x.data(), m.final_norm.data(), rows, H,
                  static_cast<float>(c.rms_norm_eps));
  linear_forward(out.data(), xn.data(), m.lm_head.data(), nullptr, rows, H, V);
  return out;
}

}  // namespace qcal::calib

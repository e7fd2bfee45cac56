// The native qcal checkpoint (docs/NATIVE_FORMAT.md) and quantized inference on
// the CPU with the integer kernels (kernels/qgemm.h): int4/int8 weights,
// activations quantized per token on the fly, a quantized K/V cache, and the
// online transforms a recipe leaves (Hadamards, Kronecker pairs, the cross-head
// P_o, P_k on K and P_k⁻ᵀ on Q), plus the IntactKV prefix cache.
//
// Directory layout: config.json (the HF config, unchanged), qcal_quant.json
// (format "qcal-native", version 1, the recipe, per-layer quantizer settings),
// model.safetensors (all tensors; names in NATIVE_FORMAT.md).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/data.h"
#include "common/model_config.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "kernels/qgemm.h"
#include "worker/calib/qblock.h"

namespace qcal::calib {

inline constexpr const char* kNativeFormat = "qcal-native";
inline constexpr int kNativeVersion = 1;

// Dynamic quantizer of an activation, the K or the V cache.
struct NativeActQuant {
  int bits = 16;       // 16 = off
  bool sym = true;     // activations: symmetric per token; K/V: asymmetric
  int64_t group = -1;  // columns per group (K/V: head_dim); -1 = per token
  float clip = 1.0f;   // fixed ratio (QuaRot) or sigmoid(β) of a trained LAC
};

struct NativeLayer {
  std::vector<float> input_norm, post_norm;  // with every foldable diagonal folded in
  // Quantized weights (w_bits < 16): symmetric signed codes with per-(row, group) scales.
  std::array<PackedWeight, kNumProj> qw;
  // Unquantized weights (w_bits == 16, the transform-only check): HF [out, in].
  std::array<std::vector<float>, kNumProj> fw;
  std::array<std::vector<float>, 3> bias;  // q, k, v (transformed); empty when absent
  // Online transforms, activation side only (empty = identity): a1/a2 (q/k/v input),
  // u1/u2 (gate/up input), d1/d2 (down input), po (across heads, o input),
  // pk (K, after RoPE), pk_it (Q, after RoPE). Other members unused.
  BlockTransformsT<float> online;
  std::array<NativeActQuant, kNumProj> act;
  NativeActQuant k, v;
};

struct NativeModel {
  ModelConfig config;
  nlohmann::json recipe = nlohmann::json::object();  // what produced it (for inspect)
  int w_bits = 4;
  int64_t w_group = -1;
  std::vector<float> embed, final_norm, lm_head;  // fp32 (rotations folded)
  std::vector<NativeLayer> layers;
  // IntactKV: FP K/V of the pivot prefix per layer, in the model's (rotated /
  // transformed) cache basis: (P, n_kv·d) each; K after RoPE and P_k. Empty = off.
  std::vector<int32_t> intact_prefix;
  std::vector<std::vector<float>> intact_k, intact_v;
  std::vector<float> intact_logits;  // (P, V) FP logits of the prefix
};

// Writes `m` to `dir` (NATIVE_FORMAT.md): into the staging directory
// `<dir>.partial.<pid>`, every file fsynced, then renamed into place (an
// existing `dir` is replaced only with `overwrite`). Same bytes as
// stream_native(native_decl(m), ...) with sources reading `m`.
// Errors: kInvalidInput (before anything is written) when `m` fails the
// checks read_native applies (message names the tensor or field, prefixed
// "write_native <dir>") or `dir` exists without `overwrite`; kIoError /
// kResourceExhausted from the filesystem. On error nothing appears at `dir`
// and no staging directory is left.
Status write_native(const NativeModel& m, const std::string& dir, bool overwrite);

// ---- Streaming writer: one layer at a time (memory: one layer plus one piece).

// What qcal_quant.json and the tensor list say of one layer, known before its
// weights exist (from small per-layer metadata).
struct NativeLayerDecl {
  std::array<NativeActQuant, kNumProj> act;
  NativeActQuant k, v;
  // The online transforms present, by name ("a1" "a2" "u1" "u2" "d1" "d2"
  // "po" "pk" "pk_it"; see NativeLayer::online), each with its side n (an
  // n×n matrix). Absent = identity.
  std::map<std::string, int64_t> online;
  std::array<bool, 3> bias{};  // q, k, v bias present
};
// Everything the files say besides the tensor values.
struct NativeModelDecl {
  ModelConfig config;
  nlohmann::json recipe = nlohmann::json::object();
  int w_bits = 4;
  int64_t w_group = -1;
  std::vector<NativeLayerDecl> layers;  // num_hidden_layers entries
  std::vector<int32_t> intact_prefix;   // IntactKV pivot tokens; empty = off
};
// The declarations `y` / `m` satisfy.
NativeLayerDecl native_layer_decl(const NativeLayer& y);
NativeModelDecl native_decl(const NativeModel& m);

// The values, produced on demand, in file order: embed, layers 0..L−1,
// final_norm, lm_head, then (IntactKV) intact_kv for layers 0..L−1 and
// intact_logits. Each callback's error aborts the write and is returned with
// the tensor or layer as context, its code unchanged.
struct NativeSource {
  RowFn embed;  // (V, H), fp32 with rotations folded
  // Layer l, called once for l = 0, 1, …, L−1 in order; it must match
  // decl.layers[l] (kInvalidInput naming the difference) and pass the
  // checks read_native applies to a layer (sizes, finite values, code ranges).
  std::function<Result<NativeLayer>(int64_t l)> layer;
  RowFn final_norm;  // (H): one value per row
  RowFn lm_head;     // (V, H)
  // IntactKV only: layer l's prefix cache, K after RoPE and P_k and V, (P, K)
  // each; called for l = 0..L−1 in order after every layer.
  std::function<Status(int64_t l, std::vector<float>* k, std::vector<float>* v)> intact_kv;
  RowFn intact_logits;  // IntactKV only: (P, V) FP logits of the prefix
};

// Writes the model `decl` declares with values from `src` to `dir`, staged
// and published as write_native (same bytes for the same values). Row
// sources are called with consecutive ranges of at most
// max(1, chunk_bytes / (row_numel·4)) rows.
// Errors: kInvalidInput before anything is written for a declaration that
// fails read_native's checks (prefixed "write_native <dir>"), a missing
// callback, `dir` existing without `overwrite`; while writing, kInvalidInput
// for a layer differing from its declaration or failing its checks, a
// non-finite value (naming tensor and element) or an IntactKV cache of the
// wrong size; any code from a callback; kIoError from the filesystem. On
// error nothing appears at `dir` and no staging directory is left.
Status stream_native(const NativeModelDecl& decl, const NativeSource& src, const std::string& dir,
                     bool overwrite, uint64_t chunk_bytes = kWriteChunkBytes);

// Validates everything (format, version, shapes, code ranges); kInvalidInput naming
// the tensor or field. Holds the whole model: NativeCheckpoint reads it piece by piece.
Result<NativeModel> read_native(const std::string& dir);
// True iff `dir` holds a qcal_quant.json.
bool is_native_dir(const std::string& dir);

// A native checkpoint opened for reading one piece at a time (the streaming
// evaluator, worker/calib/native_eval.h), so that nothing holds the whole model.
// open() checks qcal_quant.json and config.json as read_native does, maps
// model.safetensors and checks its tensor list (every tensor the configuration
// implies present with its dtype and shape, none unexpected) without reading
// tensor data. Each read_* copies one piece out of the mapping, checks its values
// as read_native does (kInvalidInput naming the tensor: non-finite values, codes
// outside the bit range, negative scales, transform factors that do not factor
// their dimension) and drops the mapped pages again, so the resident set is what
// the caller keeps. read_native(dir) is open() plus every read.
// Thread safety: const calls may run concurrently.
class NativeCheckpoint {
 public:
  // Errors: read_native's for the JSON files and the tensor list; kCorrupt for a
  // damaged safetensors file; kNotFound / kIoError from the filesystem.
  static Result<std::unique_ptr<NativeCheckpoint>> open(const std::string& dir);
  ~NativeCheckpoint();
  NativeCheckpoint(const NativeCheckpoint&) = delete;
  NativeCheckpoint& operator=(const NativeCheckpoint&) = delete;

  const std::string& dir() const { return dir_; }
  // config, recipe, w_bits, w_group and intact_prefix; layers hold only their
  // quantizer settings (act, k, v); every tensor member is empty.
  const NativeModel& meta() const { return meta_; }
  const ModelConfig& config() const { return meta_.config; }
  // Layer l's weights, norms, biases, online transforms and quantizer settings.
  Result<NativeLayer> read_layer(int64_t l) const;
  // Layer l's IntactKV cache, (P, n_kv·d) each. kInvalidInput without a prefix.
  Status read_intact_kv(int64_t l, std::vector<float>* k, std::vector<float>* v) const;
  // γ (H) of the final norm.
  Result<std::vector<float>> read_final_norm() const;
  // out (n, H) = embedding rows of ids[0..n); kInvalidInput for an id outside [0, V).
  Status read_embed_rows(const int32_t* ids, int64_t n, float* out) const;
  // out (n, H) = lm_head rows [v0, v0 + n); kInvalidInput outside [0, V).
  Status read_lm_head_rows(int64_t v0, int64_t n, float* out) const;
  // out (n) = entries [v0, v0 + n) of the stored FP logits of prefix position p.
  Status read_intact_logits(int64_t p, int64_t v0, int64_t n, float* out) const;

 private:
  friend Result<NativeModel> read_native(const std::string& dir);
  NativeCheckpoint() = default;
  std::string dir_;
  NativeModel meta_;
  std::vector<std::vector<std::string>> online_;  // per layer: the listed transforms
  std::unique_ptr<SafetensorsFile> file_;
};

// Logits (B·T, V) of B sequences of T tokens with the integer kernels. With IntactKV
// the prefix cache is prepended: the sequence tokens start at position P, and the
// caller decides whether token 0 of each sequence is the prefix itself (see eval).
std::vector<float> native_logits(const NativeModel& m, const int32_t* tokens, int64_t B, int64_t T);

// The K/V cache entries a forward pass adds, per layer (L entries of (B·T, n_kv·d),
// sequence-major): K after RoPE, P_k and the K quantizer, V after the V quantizer,
// exactly as they join the cache (NATIVE_FORMAT.md steps 3–5). The IntactKV prefix
// entries already in the cache are not repeated. IntactKV builds its prefix cache
// from this with every quantizer off (worker/calib/intactkv.h).
struct NativeKvCapture {
  std::vector<std::vector<float>> k, v;
};
// native_logits, also filling `capture` (resized; may be null).
std::vector<float> native_logits(const NativeModel& m, const int32_t* tokens, int64_t B, int64_t T,
                                 NativeKvCapture* capture);

// One decoder layer of a native model (NATIVE_FORMAT.md steps 1–12) in place on
// x (B·T, H): B sequences of T tokens at positions P..P+T−1 after the IntactKV
// prefix cache prefix_k / prefix_v ((P, n_kv·d) each; null when P = 0), in groups
// of >= 512 rows. native_logits runs exactly this for every layer. `layer` must
// satisfy read_native's checks for config c and w_bits (aborts on shapes it
// cannot use).
void native_layer_forward(const ModelConfig& c, int w_bits, const NativeLayer& layer,
                          const float* prefix_k, const float* prefix_v, int64_t P, float* x,
                          int64_t B, int64_t T);

// Causal GQA attention of T queries at positions P..P+T−1 over P+T keys (an
// IntactKV prefix of P, then the sequence itself): q (T, n_h·d), k/v (P+T, n_kv·d),
// out (T, n_h·d); query t sees keys 0..P+t; scale 1/sqrt(d), fp32 softmax with max
// subtraction. P = 0 is attention_forward (kernels/ops.h).
void prefix_attention(float* out, const float* q, const float* k, const float* v, int64_t P,
                      int64_t T, int64_t n_h, int64_t n_kv, int64_t d);

}  // namespace qcal::calib

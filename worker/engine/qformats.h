// Quantized checkpoints that inference engines load (shared/design/formats.md):
//  - GPTQ (AutoGPTQ layout): qweight int32 [I*b/32, O] packed along the input
//    dim, qzeros int32 [G, O*b/32], scales fp16 [G, O], g_idx int32 [I].
//    Symmetric → checkpoint_format "gptq" (v1: stored zero − 1, 0x77777777 for
//    4-bit); asymmetric → "gptq_v2" (real zero).
//  - compressed-tensors "pack-quantized", 4 and 8 bits: weight_packed int32
//    [O, I*b/32], weight_scale fp16 [O, G], weight_zero_point (asym only)
//    int32 [O*b/32, G], weight_shape int64 [2], weight_g_idx (act-order).
// Unquantized tensors (embeddings, norms, biases, lm_head) are copied in their
// source dtype, or produced by row sources (TensorOverride) where a recipe
// changed them. Output is sharded above `max_shard_bytes` with an index, and
// published atomically (staging directory, fsync, rename).
//
// Two entry points write the same bytes: stream_quantized_checkpoint() takes
// each quantized linear from a provider when it is needed (memory: one linear
// and one piece, whatever the model size), write_quantized_checkpoint() takes
// them all from a map.
//
// Letters: O = out_features, I = in_features, b = bits, G = number of groups
// (ceil(I / group_size), 1 for group_size -1).
//
// Decisions beyond formats.md:
//  - Scales are written as fp16 in both formats (QuantizedLinear scales are
//    fp16-representable, so the file holds them exactly; a bf16 model's loader
//    converts on load). Readers accept f16, bf16 and f32 scales.
//  - 3-bit GPTQ qzeros use the same dense 32-values-in-3-words scheme as
//    3-bit qweight, along the output dim (AutoGPTQ packs them so): shape
//    [G, O*3/32], O a multiple of 32; v1 stores zero − 1 (3 for symmetric).
//  - Reading a v1 ("gptq") checkpoint adds 1 to each stored zero without
//    wrapping, as loaders do; a v1 asymmetric zero of 0 (stored as 2^b − 1)
//    thus reads as 2^b, which is what those loaders compute with.
//
// Thread safety: all functions are pure or touch only their own arguments and
// files; concurrent calls on distinct output directories are safe.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/model_dir.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "worker/engine/quantizer.h"

namespace qcal {

enum class CheckpointFormat { kGptq, kCompressedTensors };
// "gptq" | "compressed-tensors" (also "compressed_tensors", "ct"); kInvalidInput otherwise.
Result<CheckpointFormat> parse_checkpoint_format(const std::string& name);
// "gptq" | "compressed-tensors".
const char* checkpoint_format_name(CheckpointFormat f);

struct WriteOptions {
  CheckpointFormat format = CheckpointFormat::kGptq;
  // Tensor data bytes per shard; above it the output is split into
  // model-0000k-of-0000n.safetensors plus model.safetensors.index.json. A
  // tensor larger than this gets a shard of its own.
  uint64_t max_shard_bytes = 2ull << 30;  // 2 GiB
  // Replace an existing `out_dir` (otherwise kInvalidInput, and it is left untouched).
  bool overwrite = false;
  // Recorded in quantization_config (e.g. damp_percent, true_sequential, meta).
  // GPTQ: damp_percent, true_sequential and static_groups go to the top level
  // (defaults 0.01, true, false); "meta" and any other key go under `meta`.
  // compressed-tensors: not recorded (its loaders take the config as a
  // pydantic model; unknown keys are a compatibility risk).
  nlohmann::json extra_config = nlohmann::json::object();
  // Bytes per piece when copying a source tensor or converting an override's
  // rows; bounds the writer's buffers and the source pages kept resident.
  // Does not change the output. 0 is refused (kInvalidInput).
  uint64_t chunk_bytes = kWriteChunkBytes;
};

// Checks that a linear of `q`'s shape and spec can be written in `format`;
// looks only at out_features, in_features and spec, so a probe without data
// refuses a job before calibration. bits ∈ {2,3,4,8}, group_size -1 or > 0;
// compressed-tensors: 4 or 8 bits only; GPTQ: I*b and O*b multiples of 32
// (qweight / qzeros words hold whole values: for 2/4/8 bits I and O multiples
// of 32/b, for 3 bits multiples of 32). kInvalidInput naming the numbers; the
// caller adds the module name.
Status check_writable(const QuantizedLinear& q, CheckpointFormat format);

// What the writer must know of a quantized linear before its codes exist, to
// lay out the files (tensor shapes, shards, index, config): available from
// small per-block metadata.
struct LinearDecl {
  int64_t out_features = 0;  // O
  int64_t in_features = 0;   // I
  QuantSpec spec;
  // g_idx is not i / group_size (sets desc_act; compressed-tensors then gives
  // every module a weight_g_idx).
  bool act_order = false;
  bool operator==(const LinearDecl& o) const {
    return out_features == o.out_features && in_features == o.in_features &&
           spec.bits == o.spec.bits && spec.group_size == o.spec.group_size &&
           spec.sym == o.spec.sym && act_order == o.act_order;
  }
};
// The declaration `q` satisfies.
LinearDecl linear_decl(const QuantizedLinear& q);

// An unquantized tensor written from rows produced on demand (e.g. a rotated
// embedding or lm_head, norms folded to ones) instead of copied from the
// source: `rows` (common/safetensors.h) is called with consecutive row ranges
// of at most max(1, chunk_bytes / (row_numel·4)) rows while the tensor is
// written, and its fp32 values are converted to `dtype` as they stream.
struct TensorOverride {
  DType dtype = DType::kBF16;  // F32, F16 or BF16
  // The source tensor's shape when the source has the tensor (anything else is
  // refused); a tensor the source lacks is added with this shape.
  std::vector<int64_t> shape;
  RowFn rows;
};

// The inputs of a streamed checkpoint.
struct CheckpointStream {
  // Module prefix (as in write_quantized_checkpoint) → declaration. Every
  // check that needs no codes runs on these before anything is written.
  std::map<std::string, LinearDecl> linears;
  // Returns the quantized linear of a declared module. Called exactly once per
  // module, when the writer reaches the module's first tensor: in the order of
  // the modules' names as strings (model.layers.10.* before model.layers.2.*),
  // the modules of one layer consecutively, so a provider can keep one block's
  // results at a time. The result must match its declaration exactly and pass
  // the contents checks of write_quantized_checkpoint (kInvalidInput naming the
  // module otherwise). An error aborts the write and is returned with the
  // module name as context, its code unchanged (e.g. kUnavailable stays
  // retryable).
  std::function<Result<QuantizedLinear>(const std::string& module)> provide;
  // Tensor name → override. Names of replaced weights (`<module>.weight`) are
  // refused; everything not overridden is copied from the source.
  std::map<std::string, TensorOverride> overrides;
  // Top-level keys set in the output config.json (e.g. {"tie_word_embeddings":
  // false} when a rotation unties lm_head); "quantization_config" is refused.
  nlohmann::json config_updates = nlohmann::json::object();
};

// Writes the FP model `src` with the declared linears replaced by their
// quantized form to `out_dir`, streaming: each linear comes from
// `in.provide` when it is needed, each override from its row source, every
// other tensor is copied from the source mmap in pieces of `chunk_bytes`
// whose pages are released after use. Memory: one quantized linear (and its
// packed form) plus one piece; pending linears only if another tensor's name
// sorts between two of a module's packed tensors (never with HF names).
// Same files, layout and errors as write_quantized_checkpoint below (whose
// output for the same linears it reproduces byte for byte), plus:
//  kInvalidInput - before anything is written: a declaration failing
//                  check_writable or mixing specs, no provider, an override
//                  of a replaced weight, of a non-float dtype, without rows, or
//                  of another shape than the source's tensor, config_updates
//                  not an object or setting quantization_config, chunk_bytes
//                  0; while writing (nothing is published, no staging
//                  directory is left): a provided linear that differs from its
//                  declaration or fails the contents checks, a non-finite (or
//                  unwritten) override value (message names tensor and element);
//  any code      - returned by `provide` or a row source, with context.
Status stream_quantized_checkpoint(const ModelDir& src, const CheckpointStream& in,
                                   const WriteOptions& opts, const std::string& out_dir);

// Writes the FP model `src` with the given linears replaced by their quantized
// form to `out_dir`. Keys of `qlinears` are module prefixes without the
// trailing dot ("model.layers.0.self_attn.q_proj"); every other tensor of
// `src` is copied unchanged (same dtype and bytes), including `prefix.bias`.
// Tensors are streamed from the source mmap, so memory stays at the quantized
// linears plus one piece (stream_quantized_checkpoint needs only one linear).
// Tensors are sorted by name (deterministic output).
// Also writes config.json (the source's plus `quantization_config`), for GPTQ a
// duplicate quantize_config.json, and copies generation_config.json and the
// tokenizer files present in the source directory.
// Errors (nothing is published, no staging directory is left behind):
//  kInvalidInput - no linears, a module missing from `src` or of another shape,
//                  mixed bits/group_size/sym across modules, a module failing
//                  check_writable or inconsistent in itself (sizes of
//                  q/scales/zeros/g_idx, codes or zeros outside [0, 2^b − 1],
//                  symmetric zeros not 2^(b−1), g_idx not i / group_size
//                  without act_order, scales not finite fp16 values), `src`
//                  already quantized, `out_dir` is `src` or exists without
//                  `overwrite`; messages name the module and the numbers;
//  kIoError      - the filesystem refused a write.
Status write_quantized_checkpoint(const ModelDir& src,
                                  const std::map<std::string, QuantizedLinear>& qlinears,
                                  const WriteOptions& opts, const std::string& out_dir);

// Reads the quantized linear `prefix` back from a GPTQ (gptq / gptq_v2) or
// compressed-tensors pack-quantized checkpoint (format from its
// quantization_config). spec/act_order are filled from the config and g_idx
// (act_order = g_idx is not i / group_size). kNotFound if the checkpoint or the
// module is not quantized; kInvalidInput for an unsupported config; kCorrupt
// for inconsistent tensor shapes/dtypes/values (message names the tensor).
Result<QuantizedLinear> read_quantized_linear(const ModelDir& dir, const std::string& prefix);

// The weight (O, I) fp32 of linear `prefix`: dequantized from the packed
// tensors when the checkpoint is quantized and holds them, otherwise
// `prefix.weight` (kNotFound when neither exists).
Result<Tensor> read_linear_weight(const ModelDir& dir, const std::string& prefix);

// Human-readable summary of a model directory for `qcal inspect`: config,
// format, bits, group size, tensor count/bytes, and per-module quantization.
// As JSON (the text form is rendered from it by the CLI):
//   {"dir", "config": {model_type, num_hidden_layers, hidden_size,
//      num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
//      torch_dtype, num_parameters},
//    "files": [{"name", "bytes"}], "total_bytes" (files), "tensor_bytes",
//    "num_tensors",
//    "quantization": null | {"format": "gptq"|"gptq_v2"|"compressed-tensors",
//      "bits", "group_size", "sym", "desc_act"},
//    "num_quantized_modules", "num_fp_tensors",
//    "modules": [{"name": prefix, "out", "in", "groups"}] (in name order)}
Result<nlohmann::json> inspect_checkpoint(const ModelDir& dir);

// ---- Bit packing (pure; used by the writers and readers, exposed for tests) ----
//
// A bit stream of n b-bit values: value k occupies bits [k*b, (k+1)*b) of the
// little-endian concatenation of 32-bit words, least-significant bits first;
// the last word is zero-padded. For b ∈ {2, 4, 8} this is "32/b values per
// word, value k at bit offset k*b" (GPTQ and compressed-tensors); for b = 3 it
// is AutoGPTQ's scheme of 32 values in exactly 3 words (values 0..9, then
// value 10 split across words 0 and 1, 11..20, value 21 split across words 1
// and 2, 22..31).

// Words for n values of `bits` bits: ceil(n * bits / 32).
int64_t packed_words(int64_t n, int bits);
// Packs the row-major (rows, cols) matrix `v` (each value in [0, 2^bits)) into
// bit streams along `dim`: dim 0 → (packed_words(rows), cols), one stream per
// column; dim 1 → (rows, packed_words(cols)), one stream per row.
// QCAL_CHECKs sizes and value ranges (programmer invariants).
std::vector<int32_t> pack_bits(const std::vector<int32_t>& v, int64_t rows, int64_t cols, int bits,
                               int dim);
// Inverse of pack_bits: `words` is the packed form of a (rows, cols) matrix.
std::vector<int32_t> unpack_bits(const std::vector<int32_t>& words, int64_t rows, int64_t cols,
                                 int bits, int dim);

}  // namespace qcal

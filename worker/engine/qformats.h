// Quantized checkpoints that inference engines load (shared/design/formats.md):
//  - GPTQ (AutoGPTQ layout): qweight int32 [I*b/32, O] packed along the input
//    dim, qzeros int32 [G, O*b/32], scales fp16 [G, O], g_idx int32 [I].
//    Symmetric → checkpoint_format "gptq" (v1: stored zero − 1, 0x77777777 for
//    4-bit); asymmetric → "gptq_v2" (real zero).
//  - compressed-tensors "pack-quantized", 4 and 8 bits: weight_packed int32
//    [O, I*b/32], weight_scale fp16 [O, G], weight_zero_point (asym only)
//    int32 [O*b/32, G], weight_shape int64 [2], weight_g_idx (act-order).
// Unquantized tensors (embeddings, norms, biases, lm_head) are copied in their
// source dtype. Output is sharded above `max_shard_bytes` with an index, and
// published atomically (staging directory, fsync, rename).
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "common/model_dir.h"
#include "common/status.h"
#include "worker/engine/quantizer.h"

namespace qcal {

enum class CheckpointFormat { kGptq, kCompressedTensors };
Result<CheckpointFormat> parse_checkpoint_format(const std::string& name);  // "gptq" | "compressed-tensors"
const char* checkpoint_format_name(CheckpointFormat f);

struct WriteOptions {
  CheckpointFormat format = CheckpointFormat::kGptq;
  uint64_t max_shard_bytes = 2ull << 30;  // 2 GiB
  bool overwrite = false;
  // Recorded in quantization_config (e.g. damp_percent, true_sequential, meta).
  nlohmann::json extra_config = nlohmann::json::object();
};

// Checks that `q` can be written in `format` (e.g. compressed-tensors: 4 or 8
// bits only; GPTQ: O divisible by 32/b for qzeros packing). kInvalidInput.
Status check_writable(const QuantizedLinear& q, CheckpointFormat format);

// Writes the FP model `src` with the given linears replaced by their quantized
// form to `out_dir`. Keys of `qlinears` are module prefixes without the
// trailing dot ("model.layers.0.self_attn.q_proj"); every other tensor of
// `src` is copied unchanged. Tensors are streamed from the source mmap, so
// memory stays at the quantized linears plus one tensor.
Status write_quantized_checkpoint(const ModelDir& src,
                                  const std::map<std::string, QuantizedLinear>& qlinears,
                                  const WriteOptions& opts, const std::string& out_dir);

// Reads the quantized linear `prefix` back from a GPTQ or compressed-tensors
// checkpoint (format from its quantization_config). kNotFound if the module
// is not quantized there.
Result<QuantizedLinear> read_quantized_linear(const ModelDir& dir, const std::string& prefix);

// The weight (O, I) fp32 of linear `prefix`: `prefix.weight` when stored
// unquantized, otherwise dequantized from the checkpoint's packed tensors.
Result<Tensor> read_linear_weight(const ModelDir& dir, const std::string& prefix);

// Human-readable summary of a model directory for `qcal inspect`: config,
// format, bits, group size, tensor count/bytes, and per-module quantization.
// As JSON (the text form is rendered from it by the CLI).
Result<nlohmann::json> inspect_checkpoint(const ModelDir& dir);

}  // namespace qcal

// Deterministic synthetic LLaMA-architecture checkpoints in HF format
// (`qcal synth`), with optional function-preserving outlier injection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/model_config.h"
#include "common/status.h"

namespace qcal {

struct OutlierOptions {
  // Number of channels to scale in each place (0 = off), and the factor α.
  int64_t norm_channels = 0;  // input/post-attention RMSNorm γ ×α, next projections' columns ÷α
  int64_t up_channels = 0;    // up_proj rows ×α, down_proj columns ÷α
  int64_t v_channels = 0;     // v_proj rows ×α, matching o_proj columns ÷α (all heads of the group)
  double alpha = 20.0;
  bool any() const { return norm_channels > 0 || up_channels > 0 || v_channels > 0; }
};

struct SynthOptions {
  ModelConfig config;         // shapes; torch_dtype is the storage dtype
  uint64_t seed = 1;
  OutlierOptions outliers;
  uint64_t max_shard_bytes = 2ull << 30;
  bool overwrite = false;
};

// Writes config.json, model.safetensors (or shards + index) and
// generation_config.json to `out_dir`, atomically. Weights are drawn from a
// fixed-seed generator with scales that keep activations O(1) through depth;
// the same options give byte-identical files. Tensors are generated and
// written one at a time (memory stays at one tensor).
Status synth_model(const SynthOptions& opts, const std::string& out_dir);

// Random token stream (for demos and tests): `count` ids in [0, vocab), with
// a Zipf-like skew so that frequent tokens exist.
std::vector<int32_t> synth_tokens(int64_t count, int64_t vocab, uint64_t seed);

}  // namespace qcal

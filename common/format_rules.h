// What each output format can hold, from shapes alone (no tensors): the rules of
// worker/engine/qformats.h's writers, here so that the planner and `qcal
// quantize` refuse an unwritable job before any compute (issue #10 part 5).
#pragma once

#include <cstdint>
#include <string>

#include "common/model_config.h"
#include "common/recipe.h"
#include "common/status.h"

namespace qcal {

// A linear (O, I) quantized to `bits` with `group` columns per scale (−1: per
// channel) in `format` ("gptq" | "compressed-tensors" | "native"): bits the format
// holds, GPTQ's 32-bit packing of I and O, compressed-tensors' 4 / 8 bits.
// kInvalidInput naming the numbers; the caller adds the layer.
Status check_linear_writable(int64_t O, int64_t I, int bits, int64_t group,
                             const std::string& format);

// Every linear of the model under the recipe in `format`, with the layer and linear
// named ("output.format gptq: model.layers.*.mlp.down_proj: ...").
Status check_model_writable(const ModelConfig& c, const Recipe& r, const std::string& format);

}  // namespace qcal

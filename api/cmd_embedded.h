// The embedded, single-process `qcal` commands:
//   synth       a random LLaMA-family checkpoint (worker/engine/synth.h)
//   synth-data  random token ids as .jsonl
//   quantize    one recipe (api/spec_flags.h) planned and run in process
//               (worker/local_runner.h)
//   eval        perplexity and KL of a checkpoint, native qcal ones included
//   inspect     a checkpoint's config, quantization and tensors
// Exit codes: 0 success, 2 bad input (invalid, missing or corrupt), 1 anything else.
#pragma once

#include <vector>

#include "api/commands.h"

namespace qcal {

// These commands with their flag tables (api/commands.h), in `qcal help` order.
std::vector<Command> embedded_commands();

}  // namespace qcal

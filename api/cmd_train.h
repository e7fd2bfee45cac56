// The `qcal` commands that build the tiny trained fixtures (tools/make_fixtures.sh):
//   synth-grammar    a structured token corpus (worker/calib/grammar.h) as .u32
//   train-lm         trains a small LLaMA on a .u32 corpus with AdamW and writes
//                    an HF checkpoint (worker/calib/fp_model.h)
//   inject-outliers  function-preserving outlier channels in an existing FP
//                    checkpoint (worker/engine/synth.h inject_outliers)
//   sinks            the attention mass each layer puts on the first token
//                    (worker/calib/intactkv.h attention_sink_share)
// train-lm --sink-init plants an attention-sink circuit before training (the
// sink fixture, tools/make_fixtures.sh; see plant_sink in cmd_train.cc).
// Exit codes: 0 success, 2 bad input (invalid, missing or corrupt), 1 anything
// else (including a training run that diverged: the message names the step).
#pragma once

#include <vector>

#include "api/commands.h"

namespace qcal {

// These commands with their flag tables (api/commands.h), in `qcal help` order.
std::vector<Command> fixture_commands();

}  // namespace qcal

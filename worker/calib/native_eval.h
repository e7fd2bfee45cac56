// Evaluation of checkpoints on disk in every output format through the
// streaming evaluator (worker/engine/eval.h evaluate_stream): the native qcal
// checkpoint read a layer at a time (NativeCheckpoint), and HF checkpoints (FP,
// GPTQ, compressed-tensors) through LlamaModel. What the validate task and
// `qcal eval` run.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "worker/calib/native.h"
#include "worker/engine/eval.h"

namespace qcal::calib {

// A native checkpoint as an EvalModel: embedding rows, each layer (with its
// IntactKV prefix K/V) and lm_head rows read from the mapping on demand and
// validated as read (NativeCheckpoint); layers run with native_layer_forward,
// the integer kernels, exactly as native_logits runs them. prefix() is the
// checkpoint's IntactKV prefix and prefix_logits its stored FP prefix logits.
// Owns `ck`.
std::unique_ptr<EvalModel> native_eval_model(std::unique_ptr<NativeCheckpoint> ck);

// Opens `dir` for evaluate_stream: a native checkpoint when it holds
// qcal_quant.json (is_native_dir), else an HF checkpoint (LlamaModel::open,
// LlamaEvalModel::owning). The result owns what it opened. Reads headers and
// JSON only. Errors: NativeCheckpoint::open's or LlamaModel::open's.
Result<std::unique_ptr<EvalModel>> open_eval_model(const std::string& dir);

}  // namespace qcal::calib

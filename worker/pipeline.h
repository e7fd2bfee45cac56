// The pipeline's task runners (issue #10; the DAG of common/plan.h): embed,
// capture, transform, learn, quantize, cbq-window and assemble, over the
// artifact store. Every runner reads the checkpoint a block at a time
// (mmapped) and its activations in micro-batches of recipe.batch sequences, so
// no task holds more than its own blocks' weights and bounded buffers; the
// whole-model learning tasks (spinquant, intactkv-cal) are the exception the
// planner sizes and refuses. The methods' numerics are worker/calib/method.h's;
// the same functions run in the service's workers and in `qcal quantize` (which
// runs the DAG in one process, worker/local_runner.h), so both write the same
// bytes.
//
// Ranks: transform, quantize and cbq-window run on every rank of ctx.group:
// the training minibatches are split over the ranks (gradients summed), GPTQ's
// Hessians are accumulated per rank over its shard of the sequences and summed;
// every rank reads its inputs from the (shared) store; the root alone writes
// artifacts and reports. The other tasks run on the root.
//
// Results: {"artifacts": {name: ArtifactRef}, ...} with, per type:
//   embed      "x" (X_0), "prefix" (IntactKV); "sequences", "seqlen"
//   capture    "x" (X_{l+1}), "stats", "prefix"; "layer"
//   transform  "params" (the block's fitted transform); "report"
//   learn      "rotations" (spinquant) | "prefix_kv" (intactkv-cal); "report"
//   quantize   "block-LLLL" per layer, "x" (sequential GPTQ); "layers" reports
//   cbq-window "block-LLLL" per finalized layer, "state", "x"; "window", "finalized"
//   assemble   {"output", "bytes", "format", "layers"}
#pragma once

#include <nlohmann/json.hpp>

#include "common/model_config.h"
#include "common/recipe.h"
#include "common/status.h"
#include "worker/calib/cbq.h"
#include "worker/tasks.h"

namespace qcal {

// The runner for a pipeline task type; the others are tasks.cc's.
Result<nlohmann::json> run_pipeline_task(const TaskContext& ctx);
// The task types that run on every rank of a group (the rest on the root alone).
bool runs_on_all_ranks(const std::string& task_type);

// The artifacts a pipeline task reads (for checksum verification before it runs).
Result<std::vector<TaskInput>> pipeline_task_inputs(const TaskContext& ctx);

// The CBQ options a recipe implies for a window of `window` blocks with `overlap`
// (reconstruction block: 1 / 0), online transforms not set.
calib::CbqOptions cbq_options_for(const Recipe& r, const ModelConfig& c, int64_t window,
                                  int64_t overlap);

}  // namespace qcal

// The pipeline's DAG (common/plan.h) and each task's memory estimate, from a
// validated recipe, the model's config and the data's sizes — a pure function,
// shared by the coordinator's planner (which first checks the files) and
// `qcal quantize` (which runs the same DAG in one process), so one recipe always
// means the same tasks. No numerics: the coordinator links it without the engine.
//
// Task shapes by recipe (L layers; k = blocks_per_task):
//   embed → [capture-0000 … capture-(L−1)]           when FP activations, statistics or
//                                                    IntactKV's prefix are needed
//   [spinquant]                                      whole-model learning (before blocks)
//   [<transform>-LLLL per block]                     transforms with a block task
//   quantize-LLLL per k blocks                       sequential mode: a chain; parallel /
//                                                    RTN: independent
//   or cbq-window-WWWW per window                    reconstruction (a chain; parallel mode
//                                                    with overlap 0: independent)
//   [intactkv-cal]                                   +Cal (whole model, after the blocks)
//   assemble → validate
// Memory: each task's estimate is the sum of the core row's terms and those of the
// recipe's methods (common/memory_model.h). Training tasks stream their minibatches,
// and quantize tasks their forwards (GPTQ's Hessians, the output check), in
// micro-batches of params.micro sequences, chosen here as the largest that keeps
// the task within `target_fraction` of a worker (results change only by float
// summation order).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/job_store.h"
#include "common/model_config.h"
#include "common/recipe.h"
#include "common/status.h"

namespace qcal {

// One task's estimate, by component (name → bytes), in a stable order. Parts named
// "phase/name" are held during that phase only (common/memory_model.h).
struct MemoryEstimate {
  std::vector<std::pair<std::string, uint64_t>> parts;
  uint64_t total() const;  // the peak: parts held throughout + the largest phase
  // "weights 3.4 GiB, activations 32.0 GiB, ..."
  std::string describe() const;
  nlohmann::json to_json() const;  // {"total": n, "weights": n, ...}
};

struct Plan {
  std::vector<TaskDef> tasks;  // in a topological order
  // {"method", "recipe", "transform", "weight_solver", "reconstruction", "layers",
  //  "format", "calib_sequences", "tasks", "critical_path" (tasks on the longest
  //  dependency chain), "peak" {"task", "bytes"}, "worker_memory_bytes",
  //  "store_bytes" (artifacts + output), "estimates" {task id: MemoryEstimate JSON}}
  nlohmann::json summary;
};

struct PlanInputs {
  const Recipe* recipe = nullptr;  // validated (validate() and validate_for(config))
  ModelConfig config;
  std::string format;              // resolved: native | gptq | compressed-tensors
  uint64_t calib_seqs = 0, calib_T = 0;
  bool has_eval = false;
  uint64_t eval_seqs = 0, eval_T = 0;
  uint64_t worker_memory_bytes = 24ull << 30;
  double target_fraction = 0.8;  // micro-batches are chosen to fit this share of a worker
  uint64_t eval_batch = 8;       // sequences per evaluation batch
};

// The DAG with every task's mem_bytes and params, or kResourceExhausted naming the
// largest task, its parts and what to change when it cannot fit a worker (also for
// whole-model tasks of models too large for one process). Checked arithmetic: sizes
// that overflow 64 bits are kInvalidInput.
Result<Plan> build_pipeline_plan(const PlanInputs& in);

// "41.2 GiB", "3.0 MiB", "512 B".
std::string format_bytes(uint64_t bytes);

}  // namespace qcal

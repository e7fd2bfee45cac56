// The task runners: what a worker does with one claimed task of the DAG in
// common/plan.h. Each runner reads its inputs from the artifact store
// (verifying checksums), calls the same engine functions as `qcal quantize`
// in the same order, and returns the task's result JSON. Output is therefore
// byte-identical to quantize_model with the same recipe:
//
//   capture        calib = load_token_sequences(calib.path, calib.seqlen, V,
//                  calib.nsamples); x = model->embed(calib, 0, N) → "x"
//                  (parallel mode: also the FP input of every window's first
//                  layer l > 0, as "x.<l>", from a plain FP forward)
//   calibrate      x from the dep ("x.<layer_begin>" when the dep has it, else
//                  "x"); quantize_layer for l in [layer_begin, layer_end) →
//                  "qlinears" and, in sequential mode, "x" (the window's
//                  output; not written by the last window, which nobody reads)
//   assemble       every dep's "qlinears" → write_quantized_checkpoint(
//                  model->dir(), all, checkpoint_write_options(opts), staging),
//                  published as output.path under the fence (worker/publish.h)
//   validate       evaluate(output, eval data, FP model) and the gate
//
// Results (JSON; artifact refs as in common/plan.h):
//   capture   {"artifacts": {"x": A, ["x.<l>": A …]}, "sequences": N, "seqlen": T}
//   calibrate {"artifacts": {"qlinears": A, ["x": A]}, "layers": [LayerReport…],
//              "layer_begin": b, "layer_end": e}
//   assemble  {"output": path, "bytes": n, "format": name, "modules": count}
//   validate  {"report": EvalResult JSON + {"gate": {...}}, "gate_passed": bool}
//             (no eval data: {"report": {"skipped": "..."}, "gate_passed": true})
//
// Calibration recipes (spec.recipe.calib; the DAGs and results of common/plan.h),
// through worker/calib with calib_recipe_from_spec (worker/engine/recipe.h):
//   calib          load_token_sequences; calib::calibrate_to_dir(model, calib,
//                  recipe, output.path, params.format) — one task
//   capture        calib::load_fp_model; cbq_prepare; save_cbq_setup →
//                  "setup/<file>" artifacts (a directory, every file checksummed)
//   cbq-window     load_cbq_setup; window 0: cbq_initial_state(x0), else
//                  load_cbq_state of the previous window's "state"; ONE
//                  cbq_run_window on the setup's FP blocks first..last;
//                  save_cbq_state(new state, the layers this window finalized) →
//                  "state/<file>"; result "window" = CbqWindowReport. A window
//                  re-run (worker died) reads the same setup and previous state,
//                  so with the same BLAS thread count its bytes are the same.
//   assemble       load_cbq_setup; every window's finalized layers (in dep
//                  order) → cbq_finish → write_native(staging), published
//                  like the weight-only assemble (worker/publish.h; a re-run
//                  replaces its own job's output, the manifest says whose it is)
//   validate       a native output (calib::is_native_dir) is evaluated with
//                  calib::evaluate_native; the gate is the same
// The calibration runners check ctx.cancel before they start (a window runs to
// its end once started) and run on the root rank alone.
//
// Ranks: calibrate runs on every rank of ctx.group together (sequences
// sharded, Hessians all-reduced, activations gathered; the root reads and
// writes the store and its result is the task's). The other tasks run on the
// root alone.
//
// Errors follow status.h: kInvalidInput for a bad spec / params / data
// (never retried), kCorrupt when an input artifact fails its checksum (see
// find_corrupt_input), kIoError / kResourceExhausted from the store, and
// cancelled() when ctx.cancel was set (checked before every layer).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/status.h"
#include "worker/artifacts.h"
#include "worker/publish.h"
#include "worker/rank_group.h"

namespace qcal {

struct TaskContext {
  std::string job_id;
  JobSpec spec;
  TaskDef task;
  int64_t attempt = 1;  // goes into artifact paths (task_artifact_path)
  // Results of the tasks in task.deps, by task id (JobStore::get_tasks).
  std::map<std::string, nlohmann::json> deps;
  ArtifactStore* store = nullptr;             // required
  const std::atomic<bool>* cancel = nullptr;  // optional; set → stop between layers
  RankGroup* group = nullptr;                 // nullptr = a single rank
  // Progress lines ("layer 3/32 ..."), e.g. to stderr and the job log. Optional.
  std::function<void(const std::string&)> log;
  // The publishing fence of this claim (worker/publish.h); nullptr = unfenced
  // (tests, embedded use). The tasks that write output.path publish through it.
  PublishFence* fence = nullptr;
};

// Runs ctx.task (dispatch on its type). Not thread safe with respect to ctx.
Result<nlohmann::json> run_task(const TaskContext& ctx);

// One artifact a task reads, and the dep that produced it.
struct TaskInput {
  std::string producer;  // dep task id
  std::string key;       // "x", "x.<l>", "qlinears"
  ArtifactRef ref;
};
// The artifacts ctx.task will read. kInvalidInput when a dep's result lacks
// one (the DAG is wrong).
Result<std::vector<TaskInput>> task_inputs(const TaskContext& ctx);
// Verifies every input of ctx.task (size and SHA-256). Returns OK and leaves
// `producer` empty when all match; otherwise the kCorrupt status of the first
// bad one, with `*producer` set to the dep that must run again.
Status find_corrupt_input(const TaskContext& ctx, std::string* producer);

// The status of a task stopped by ctx.cancel: kUnavailable, message
// "cancelled: <what>". (status.h has no code of its own for it.)
Status cancelled(const std::string& what);
bool is_cancelled(const Status& s);

}  // namespace qcal

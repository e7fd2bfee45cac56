// The planner: turns a validated JobSpec into the task DAG of common/plan.h,
// with a peak-memory estimate per task, after checking everything that can be
// checked without touching tensors. A job the planner accepts fails later
// only for reasons it could not see (a file changed, a worker died, numerics).
//
// Letters: N calibration sequences, T calibration seqlen, H hidden,
// I intermediate, Q = n_h·d (query width), K = n_kv·d, V vocab, L layers,
// k = recipe.window, b = the workers' forward batch (sequences).
//
// Checks, in order (the first failure is returned):
//   recipe.method     in the method table below, else kInvalidInput
//                     "recipe.method: method X is not supported by this
//                     server (supported: rtn, gptq)"
//   recipe            QuantSpec::validate (bits, group_size); overlap only for
//                     methods that reconstruct across blocks (none yet)
//   output.format     parse_checkpoint_format
//   model             ModelDir::open (config.json + safetensors headers, mmap,
//                     no tensor data); not already quantized; every tensor
//                     present with the shape the config implies
//                     (validate_fp_model)
//   format            check_writable for each of the seven projections, with
//                     a probe QuantizedLinear holding only shapes and spec
//   calib.path        exists, is a regular file, .jsonl or .u32 (kNotFound /
//                     kInvalidInput); eval.path likewise when given
//   output.path       not the model directory; absent unless output.overwrite
//                     (and then a directory); its nearest existing ancestor is
//                     a writable directory (so the parent can be created)
//   range             check_estimate_range (coordinator/memory_guard.h): an
//                     overflow-checked upper bound of every estimate below fits
//                     in 62 bits, else kResourceExhausted naming the numbers
//   memory            every task's estimate ≤ PlannerLimits::worker_memory_bytes,
//                     else kResourceExhausted with the numbers:
//                     "calibrate-0003 needs 41.2 GiB (weights 3.4 GiB,
//                     activations 32.0 GiB, ...) but workers have 24.0 GiB;
//                     lower calib.nsamples or calib.seqlen"
//
// Memory model (bytes; what the engine holds at its peak, see quantize.cc,
// model.cc block_forward and gptq.cc):
//   calibrate  weights      = k · (params of one block) · 4 · 2   FP + working copy
//              activations  = N·T·H·4 · 4   input, scratch, FP out, quantized out
//              hessian      = (largest linear input)² · 4          GPTQ only; the
//                             sum of the four capture groups' inputs² without
//                             true_sequential (all accumulators live at once)
//              gptq solver  = (largest linear input)² · 16         GPTQ only: fp32
//                             copy + fp64 factor + fp32 inverse
//              batch        = b·T·(H + max(2Q + 2K, 2I)) · 4       block_forward arena
//              quantized    = k · (block linear params) · 1 + scales/zeros
//                             (codes are held as one byte each until assembly)
//   capture    activations  = N·T·H·4  (×2 in parallel mode: the running FP
//                             stream plus the copy being written)
//              embeddings   = min(V, N·T)·H·4  rows read as fp32
//              parallel mode also: one block's weights + batch arena
//   assemble   quantized    = every linear: params · 1 + scales/zeros (G·O·8) + g_idx
//              tensor       = the largest source tensor in fp32 (streamed one at a time)
//   validate   weights      = 2 · (largest of one block, lm_head V·H) · 4  (FP and
//                             quantized model; lm_head stays loaded)
//              activations  = 2 · b·T_e·(H + V)·4 + batch arena    (T_e eval seqlen)
//              eval data    = N_e·T_e·4  the eval tokens (N_e = eval sequences)
// N = calib.nsamples; when 0 ("all") it is bounded from the file size
// (.u32: bytes/4/T; .jsonl: bytes/2/T, at least "d," per token).
//
// Calibration recipes (spec.recipe.calib, common/job_spec.h) are planned into
// the calibration DAGs of common/plan.h. Checks, in order:
//   recipe            calib_recipe_from_spec (worker/engine/recipe.h):
//                     calib::recipe_from_json + validate, "recipe.<field>: ..."
//   output.format     calib_output_format ("auto" → native, or gptq when
//                     everything folds and nothing is reconstructed)
//   model             as above, then CalibRecipe::validate_for(config) and, with
//                     a reconstruction, CbqOptions::validate
//   format            gptq / compressed-tensors: check_writable as above
//   calib.path, eval.path, output.path, memory: as above
// DAG: calib → validate without reconstruction; capture → cbq-window-0000 → … →
// assemble → validate with reconstruction "cbq" / "block" (windows from
// calib::cbq_plan(L, window, overlap); per block = window 1, overlap 0).
// Memory (M = the whole FP model in fp32: L block params + 2·V·H, as FpModel
// holds it; x = N·T·H·4):
//   calib      weights 2·M, activations 3·x, batch arena
//   capture    weights 2·M (FP + transformed setup), activations 2·x, batch
//   cbq-window weights M + k·(block params·12 + linear params·4) (setup, and per
//              window block FP / CFP base / Ŵ / V0), activations 7·x (window
//              running, next input, target; the state's x_fp / x_q in and out),
//              batch 3·k minibatch arenas of cali_bsz sequences
//   assemble   weights 2·M (setup + native model), quantized L·(block codes)
//   validate   native output: M + the largest of a block / lm_head; else as above
// Summary: {"method", "recipe" (CalibRecipe::to_json), "reconstruction", "layers",
// "format", "calib_sequences", "tasks", "peak", "worker_memory_bytes",
// "estimates"} plus "windows", "window", "overlap" with a reconstruction.
//
// Thread safety: plan_job is a pure function of its arguments and the files it
// reads; concurrent calls are safe.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/status.h"

namespace qcal {

// A calibration method the service runs. Adding a method is one row in
// supported_methods() (planner.cc) plus its worker implementation.
struct MethodInfo {
  const char* name;
  bool uses_hessian;         // adds the Hessian and solver to a calibrate task's memory
  bool overlapping_windows;  // accepts recipe.overlap > 0 (cross-block methods)
};
const std::vector<MethodInfo>& supported_methods();
// nullptr when the server does not run `name`.
const MethodInfo* find_method(const std::string& name);

class PathPolicy;  // common/path_policy.h

struct PlannerLimits {
  // Confinement of the spec's paths, applied by admit_job (coordinator/admission.h)
  // before planning; nullptr = unconfined (tests, the CLI's dry runs).
  const PathPolicy* paths = nullptr;
  // Memory of one worker (the smallest one, when they differ).
  uint64_t worker_memory_bytes = 24ull << 30;
  // Sequences per forward batch on the workers (QuantizeOptions::batch and the
  // evaluation batch); enters the batch terms of the estimate.
  int64_t batch = 8;
};

// One task's estimate, by component (name → bytes), in a stable order.
struct MemoryEstimate {
  std::vector<std::pair<std::string, uint64_t>> parts;
  uint64_t total() const;
  // "weights 3.4 GiB, activations 32.0 GiB, ..."
  std::string describe() const;
  nlohmann::json to_json() const;  // {"total": n, "weights": n, ...}
};

struct Plan {
  std::vector<TaskDef> tasks;  // DAG order: capture, calibrate-0000.., assemble, validate
  // {"method", "mode", "layers", "window", "format", "calib_sequences",
  //  "tasks": n, "peak": {"task", "bytes"}, "worker_memory_bytes",
  //  "estimates": {task id: MemoryEstimate JSON}}
  nlohmann::json summary;
};

// Validates `spec` against the files it names and plans its DAG (see the top
// of this file). Error codes: kInvalidInput (bad recipe, wrong shapes,
// quantized model, unwritable format, output exists), kNotFound (model dir,
// tensor or data file missing), kResourceExhausted (does not fit the workers),
// kIoError (a header could not be read). Messages start with the spec field.
Result<Plan> plan_job(const JobSpec& spec, const PlannerLimits& limits);

// "41.2 GiB", "3.0 MiB", "512 B".
std::string format_bytes(uint64_t bytes);

}  // namespace qcal

// The planner: a validated JobSpec → the task DAG of common/plan.h with every
// task's memory estimate (common/pipeline_plan.h), after checking everything
// that can be checked without touching tensors (issue #10 part 5: fail fast).
// A job the planner accepts fails later only for reasons it could not see (a
// file changed, a worker died, numerics). The coordinator plans every
// submission with it; `qcal quantize` plans with it too and runs the same DAG
// in one process.
//
// Checks, in order (the first failure is returned):
//   output.format   output_format(spec) (auto → gptq when everything folds, else
//                   native; gptq / compressed-tensors only for recipes that fold)
//   calib.seqlen    at least 2
//   model           ModelDir::open (config.json + safetensors headers, mmap, no
//                   tensor data); not already quantized; every tensor present with
//                   the shape the config implies (validate_fp_model)
//   recipe          Recipe::validate_for(config): group sizes dividing every
//                   linear's input (unless the format holds partial groups: native),
//                   FlatQuant's Kronecker splits, Hadamard orders, a CBQ window no
//                   longer than the model, IntactKV prefix ids in the vocabulary
//   format          every linear writable in the format (common/format_rules.h)
//   calib.path      exists, is a regular file, .jsonl or .u32; eval.path likewise
//   output.path     not the model directory; absent unless output.overwrite (then
//                   a directory); its nearest existing ancestor a writable directory
//   memory          every task's estimate ≤ PlannerLimits::worker_memory_bytes,
//                   else kResourceExhausted with the numbers and what to change
// N = calib.nsamples; when 0 ("all") it is bounded from the file size
// (.u32: bytes/4/T; .jsonl: bytes/2/T, at least "d," per token).
//
// Thread safety: plan_job is a pure function of its arguments and the files it
// reads; concurrent calls are safe.
#pragma once

#include <cstdint>

#include "common/job_spec.h"
#include "common/pipeline_plan.h"
#include "common/status.h"

namespace qcal {

class PathPolicy;  // common/path_policy.h

struct PlannerLimits {
  // Confinement of the spec's paths, applied by admit_job (coordinator/admission.h)
  // before planning; nullptr = unconfined (tests, `qcal quantize`, dry runs).
  const PathPolicy* paths = nullptr;
  // Memory of one worker (the smallest one, when they differ).
  uint64_t worker_memory_bytes = 24ull << 30;
  // Sequences per evaluation batch on the workers.
  int64_t batch = 8;
};

// Validates `spec` against the files it names and plans its DAG (see above). Error
// codes: kInvalidInput (bad recipe for this model, unwritable format, output exists),
// kNotFound (model dir, tensor or data file missing), kResourceExhausted (does not
// fit the workers), kIoError (a header could not be read). Messages start with the
// spec field.
Result<Plan> plan_job(const JobSpec& spec, const PlannerLimits& limits);

}  // namespace qcal

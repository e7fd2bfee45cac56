// The one mapping from a job spec's recipe and output sections to the
// engine's QuantizeOptions. The service's tasks and `qcal quantize` both go
// through it, so one recipe always means the same numerics and the same
// checkpoint bytes.
#pragma once

#include "common/job_spec.h"
#include "common/status.h"
#include "worker/engine/quantize.h"

namespace qcal {

// Builds QuantizeOptions from `spec`:
//   recipe.method        → method (rtn | gptq)
//   recipe.w_bits / group_size / sym / mse_clip → spec
//   recipe.damp / act_order / static_groups     → gptq (blocksize stays 128)
//   recipe.true_sequential                      → true_sequential
//   output.format / overwrite                   → write (max_shard_bytes 2 GiB)
// batch stays at its default (8 sequences per forward batch); it changes
// memory, never results.
// Fields that name a feature this engine does not have yet are refused rather
// than ignored: recipe.overlap ≠ 0 (CBQ windows). recipe.mode and
// recipe.window shape the task DAG, not the per-layer numerics, and are read
// by the planner and the tasks directly.
// Errors: kInvalidInput naming the field ("recipe.damp: must be positive
// (got 0)"). Pure; thread safe.
Result<QuantizeOptions> quantize_options_from_spec(const JobSpec& spec);

}  // namespace qcal

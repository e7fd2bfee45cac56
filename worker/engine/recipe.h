// The one mapping from a job spec's recipe and output sections to the
// engine's QuantizeOptions. The service's tasks and `qcal quantize` both go
// through it, so one recipe always means the same numerics and the same
// checkpoint bytes.
#pragma once

#include "common/job_spec.h"
#include "common/status.h"
#include "worker/calib/recipe.h"
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

// The calibration engine's recipe of a job whose recipe is a calibration recipe
// (spec.recipe.calib, common/job_spec.h): calib::recipe_from_json, then
// CalibRecipe::validate (and validate_for(*config) when given). Errors are
// kInvalidInput naming the field under "recipe." ("recipe.a_bits: must be 2, 3,
// 4, 6, 8 or 16 (got 5)"); a weight-only spec is kInvalidInput too. The planner
// and every calibration task go through it, so one recipe always means the same
// numerics. Pure; thread safe.
Result<calib::CalibRecipe> calib_recipe_from_spec(const JobSpec& spec,
                                                  const ModelConfig* config = nullptr);

// What a calibration job writes: output.format with "auto" resolved — gptq when
// everything folds into the weights (CalibRecipe::folds_completely) and there is
// no reconstruction, else native. Refuses (kInvalidInput, "output.format: ...")
// gptq / compressed-tensors for a recipe that leaves work to do online or
// reconstructs blocks (the service writes reconstructed models natively).
Result<std::string> calib_output_format(const JobSpec& spec, const calib::CalibRecipe& r);

}  // namespace qcal

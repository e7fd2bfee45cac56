// Quantize-style command-line flags → the JobSpec JSON of common/job_spec.h,
// for `qcal submit` (sent to the coordinator). The recipe flags mean what they
// mean to `qcal quantize`, so one recipe spelled as flags means the same job
// both ways.
//
// Flag → JSON field (a flag that is absent leaves its field out, so the
// defaults documented in common/job_spec.h apply; parse_job_spec fills them):
//   --model DIR                 model                      (required)
//   --method rtn|gptq           recipe.method
//   --w-bits N                  recipe.w_bits
//   --group-size N              recipe.group_size          (-1 = per channel)
//   --sym | --asym              recipe.sym                 (exclusive)
//   --act-order                 recipe.act_order = true
//   --static-groups             recipe.static_groups = true
//   --damp X                    recipe.damp
//   --mse-clip                  recipe.mse_clip = true
//   --no-true-sequential        recipe.true_sequential = false
//   --mode sequential|parallel  recipe.mode
//   --window N / --overlap N    recipe.window / recipe.overlap (blocks per
//                               calibrate task; not CBQ's --cbq-window)
//   --seed N                    recipe.seed
//   --calib FILE                calib.path                 (required)
//   --nsamples N / --seqlen N   calib.nsamples / calib.seqlen
//   --eval-data FILE            eval.path (the eval object exists only with it)
//   --eval-nsamples N           eval.nsamples
//   --eval-seqlen N             eval.seqlen (default: --seqlen when given)
//   --out DIR                   output.path                (required)
//   --format gptq|compressed-tensors   output.format
//   --overwrite                 output.overwrite = true
//   --max-ppl-increase X        gate.max_ppl_increase
//   --max-kl X                  gate.max_kl
//   --priority high|normal|low  priority
//   --labels k=v,k2=v2          labels {"k": "v", "k2": "v2"}
//
// Calibration recipes. When the flags ask for the calibration engine
// (wants_calibration in api/calib_cli.h: a transform --method, --a-bits /
// --kv-bits < 16, --format native, --intactkv, --weight-solver, a
// reconstruction flag, ...), the recipe object is
// recipe_from_flags(f).to_json(): every key of the calibration schema, with
// the method resolved into "transform" / "weight_solver" (no "method" alias:
// the spec's alias does not take lora-rounding). The recipe flags are the
// rows of recipe_flags() (api/calib_cli.h), and mean what they mean to
// `qcal quantize` (--group-size → w_group, default per
// channel; --damp / --act-order / --static-groups / --blocksize → gptq.*;
// --mse-clip → w_mse_clip; --format also takes auto | native, the default
// auto). --window, --overlap, --mode and --no-true-sequential shape only the
// weight-only DAG and are refused there (CBQ's windows are --cbq-window /
// --cbq-overlap / --cbq-parallel, which also set the service's tasks: one per
// window). A calibration spec is checked in full before it is returned, the
// way the coordinator and planner will check it (recipe_from_flags →
// CalibRecipe::validate, parse_job_spec, calib_recipe_from_spec,
// calib_output_format), so a bad combination fails at `qcal submit`.
// Without the calibration engine, the calibration-only flags are refused
// (--a-bits / --kv-bits 16 aside), and the spec is exactly the weight-only one
// above.
//
// For a weight-only spec this layer checks only what a flag can get wrong by
// itself: numbers that do not parse, --sym with --asym, a --priority outside
// the three names, a label without '=' or with an empty key, the same label
// key twice, an eval flag without --eval-data. Range checks (bits, group size,
// methods) belong to parse_job_spec, which the coordinator runs on every
// submission. Errors are kInvalidInput naming the flag. Paths are copied as
// given.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "common/flags.h"
#include "common/status.h"

namespace qcal {

// The flags job_spec_json_from_flags reads, as rows for a command's flag table
// (add its own on top: --server, --json, ...): the job's flags of the table
// above, then recipe_flags() (api/calib_cli.h).
const std::vector<FlagSpec>& spec_flags();
// The names of spec_flags()' rows that take a value / take none.
const std::set<std::string>& spec_valued_flags();
const std::set<std::string>& spec_boolean_flags();

// Builds the JobSpec JSON from parsed flags; see the table above.
Result<nlohmann::json> job_spec_json_from_flags(const Flags& f);

// Parses "k=v,k2=v2" (whitespace around items ignored; empty string → empty
// map). `flag` names the flag in errors ("--labels").
Result<std::map<std::string, std::string>> parse_labels(const std::string& s,
                                                        const std::string& flag);

}  // namespace qcal

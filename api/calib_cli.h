// `qcal quantize --method smoothquant|quarot|spinquant|flatquant` (and rtn/gptq with
// quantized activations or KV cache): the calibration-engine path of the CLI, and
// `qcal eval` on a native qcal checkpoint.
#pragma once

#include <set>
#include <string>
#include <vector>

#include "common/flags.h"
#include "common/status.h"
#include "worker/calib/recipe.h"

namespace qcal {

// The heading of the recipe rows that the weight-only path reads too.
inline constexpr const char* kRecipeGroup = "Recipe";

// Every recipe flag of `qcal quantize` and `qcal submit` (which append these
// rows to their own tables): first the rows the weight-only rtn/gptq path
// reads as well (group kRecipeGroup: --method, --w-bits, --group-size, --sym,
// --asym, --act-order, --static-groups, --damp, --mse-clip,
// --no-true-sequential, --blocksize, --batch), then the calibration engine's
// (every other group). The one place that lists the recipe flags; the shown
// defaults are CalibRecipe's and GptqOptions'.
const std::vector<FlagSpec>& recipe_flags();

// The names of the calibration-only rows of recipe_flags() (outside
// kRecipeGroup): the flags `qcal quantize` accepts on top of its weight-only ones.
const std::set<std::string>& calib_valued_flags();
const std::set<std::string>& calib_bool_flags();

// True iff the flags ask for the calibration engine: a transform method,
// --a-bits / --kv-bits below 16, --format native, --intactkv [--intactkv-prefix,
// --intactkv-cal, --intactkv-cal-steps, --intactkv-cal-lr],
// --weight-solver, or a reconstruction flag (--reconstruction none|block|cbq,
// --cbq-window, --cbq-overlap, --cbq-parallel, --cbq-epochs, --lora-rank, --no-cfp).
bool wants_calibration(const Flags& f);

// The CalibRecipe the flags describe (validated). --intactkv turns IntactKV on;
// --intactkv-prefix 1,5,9 sets its prefix (default [bos_token_id]; needs --intactkv);
// --intactkv-cal trains that cache ("+Cal", needs --intactkv) with
// --intactkv-cal-steps N (160) and --intactkv-cal-lr X (2e-4), which need it.
// --method rtn|gptq|lora-rounding (or --weight-solver alone) quantizes the
// untransformed model with that solver; a transform method takes --weight-solver
// (default rtn). lora-rounding needs --reconstruction block|cbq; --reconstruction
// block|cbq without --method / --weight-solver means lora-rounding.
Result<calib::CalibRecipe> recipe_from_flags(const Flags& f);

}  // namespace qcal

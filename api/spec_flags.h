// Command-line flags → the JobSpec JSON of common/job_spec.h, for `qcal submit`
// (sent to the coordinator) and `qcal quantize` (run in one process): one code
// path, so one recipe spelled as flags means the same job both ways.
//
// Recipe flags come from the method registry (common/method_registry.h): every
// option with a flag sets its recipe key (a boolean's flag sets true, its
// negative flag, e.g. --no-lwc, false; --intactkv-prefix 1,5,9 takes token ids).
// Aliases and earlier spellings:
//   --method X            transform X (smoothquant|quarot|spinquant|flatquant) or
//                         weight solver X (rtn|gptq|lora-rounding)
//   --cbq-parallel        --mode parallel
//   --window N            blocks per quantize task (--blocks-per-task N); not with a
//                         reconstruction, whose window is --cbq-window
//   --overlap 0           accepted; other values are CBQ's --cbq-overlap
// Defaults the flags fill in: without --method / --weight-solver the weight solver
// is gptq (rtn with a transform, else lora-rounding with a reconstruction); a recipe
// with no transform, no quantized activations / KV cache, no reconstruction and no
// IntactKV (the weight-only case) quantizes weights in groups of 128 unless
// --group-size says otherwise (the earlier weight-only form's default); every other
// recipe per output channel.
// Job flags (absent → the spec's defaults):
//   --model DIR (required), --calib FILE (required), --nsamples N, --seqlen N,
//   --eval-data FILE, --eval-nsamples N, --eval-seqlen N (default: --seqlen),
//   --out DIR (required), --format auto|native|gptq|compressed-tensors, --overwrite,
//   --max-shard-mb N, --max-ppl-increase X, --max-kl X, --priority high|normal|low,
//   --labels k=v,k2=v2
// The spec is checked in full before it is returned (parse_job_spec: the recipe's
// values, caps and combinations, the format), so a bad combination fails at once.
// Errors are kInvalidInput naming the flag.
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "common/flags.h"
#include "common/status.h"

namespace qcal {

// The rows job_spec_json_from_flags reads, for a command's flag table (a command
// adds its own on top: --server, --json, ...): the job flags above, then
// recipe_flags().
const std::vector<FlagSpec>& spec_flags();
// The names of spec_flags()' rows that take a value / take none.
const std::set<std::string>& spec_valued_flags();
const std::set<std::string>& spec_boolean_flags();
// The recipe rows alone: the aliases, then every registry option with a flag (and its
// negative flag), grouped by method, with the registry's help and default.
const std::vector<FlagSpec>& recipe_flags();
// The recipe key a recipe flag sets ("damp" → "gptq.percdamp"); "" for the aliases.
std::string recipe_key_of_flag(const std::string& flag);

// The recipe object the flags describe (only what they give, plus the defaults above).
Result<nlohmann::json> recipe_json_from_flags(const Flags& f);
// Builds the JobSpec JSON from parsed flags; see above.
Result<nlohmann::json> job_spec_json_from_flags(const Flags& f);

// Parses "k=v,k2=v2" (whitespace around items ignored; empty string → empty
// map). `flag` names the flag in errors ("--labels").
Result<std::map<std::string, std::string>> parse_labels(const std::string& s,
                                                        const std::string& flag);

}  // namespace qcal

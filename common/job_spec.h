// A quantization job as the user submits it (REST `POST /v1/jobs`, `qcal
// submit`, schedule templates). One schema for the service and the CLI:
// `qcal quantize` flags map onto the same recipe fields.
//
// JSON form (defaults shown; `model`, `calib.path` and `output.path` are required):
// {
//   "model": "/models/llama",
//   "recipe": {"method": "gptq", "w_bits": 4, "group_size": 128, "sym": true,
//              "act_order": false, "static_groups": false, "damp": 0.01,
//              "mse_clip": false, "true_sequential": true,
//              "mode": "sequential", "window": 1, "overlap": 0, "seed": 0},
//   "calib": {"path": "/data/calib.jsonl", "nsamples": 128, "seqlen": 2048},
//   "eval":  {"path": "/data/eval.jsonl", "nsamples": 0, "seqlen": 2048},   // optional
//   "output": {"path": "/out/llama-w4", "format": "gptq", "overwrite": false},
//   "gate": {"max_ppl_increase": 0.05, "max_kl": 0.1},                      // optional
//   "priority": "normal",                 // high | normal | low
//   "labels": {"team": "infra"}
// }
//
// The recipe object has two forms (issue #5 part 3: one recipe schema for
// `qcal quantize` and the REST API):
//  - weight-only: the keys above, method rtn | gptq (GPTQ / compressed-tensors
//    output through the block-wise DAG; unchanged, byte-identical outputs);
//  - calibration: the calibration engine's recipe (worker/calib/recipe.h,
//    CalibRecipe::to_json's keys: transform, weight_solver, w_bits, w_group,
//    a_bits, a_clip, kv_bits, kv_clip, ..., intactkv, intactkv_prefix, gptq,
//    reconstruction, cbq_window, cbq_overlap, cbq_parallel, cbq_epochs,
//    lora_rank, cfp, seed, batch), plus "method" as the CLI's --method: rtn |
//    gptq set weight_solver, smoothquant | quarot | spinquant | flatquant set
//    transform. A recipe is a calibration recipe when it has a key only that
//    schema has (calib_recipe_keys() minus the weight-only keys) or its method
//    names a transform. Its defaults are CalibRecipe's (weight_solver rtn,
//    per-channel weights). Weight-only keys in it are refused with the
//    calibration key to use ("recipe.group_size: ... use w_group").
//    output.format then also takes "native" and "auto" (the default: native
//    unless everything folds into the weights, see worker/engine/recipe.h).
//    The object is kept as given (method resolved); the engine parses and
//    validates it (calib::recipe_from_json + validate) when the job is planned:
//    calib_recipe_from_spec in worker/engine/recipe.h.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

struct RecipeSpec {
  std::string method = "gptq";  // rtn | gptq
  int w_bits = 4;
  int64_t group_size = 128;  // -1 = per channel
  bool sym = true;
  bool act_order = false;
  bool static_groups = false;
  double damp = 0.01;
  bool mse_clip = false;
  bool true_sequential = true;
  std::string mode = "sequential";  // sequential | parallel
  int64_t window = 1;               // blocks per calibration task
  int64_t overlap = 0;
  uint64_t seed = 0;
  // The calibration recipe (see the top of this file), "method" resolved into
  // transform / weight_solver; nullopt for a weight-only recipe. When set, the
  // fields above are unused but for `method` (a display name: the transform, else
  // the weight solver, else "rtn") and w_bits / seed (copied when given).
  std::optional<nlohmann::json> calib;
  bool calibration() const { return calib.has_value(); }
};

// The keys of a calibration recipe object (CalibRecipe::to_json's, without the
// "method" alias), and the weight-only recipe's keys.
const std::vector<std::string>& calib_recipe_keys();
const std::vector<std::string>& weight_only_recipe_keys();

struct DataSpec {
  std::string path;
  int64_t nsamples = 128;  // sequences (0 = all, for eval)
  int64_t seqlen = 2048;
};

struct OutputSpec {
  std::string path;
  // gptq | compressed-tensors; calibration recipes also native | auto (their default)
  std::string format = "gptq";
  bool overwrite = false;
};

// The validation gate: the job fails (with its report) when a bound is exceeded.
struct GateSpec {
  std::optional<double> max_ppl_increase;  // (ppl_q / ppl_fp) − 1, e.g. 0.05
  std::optional<double> max_kl;            // mean KL(FP‖q) per token, nats
};

enum class Priority { kHigh, kNormal, kLow };
const char* priority_name(Priority p);

struct JobSpec {
  std::string model;
  RecipeSpec recipe;
  DataSpec calib;
  std::optional<DataSpec> eval;
  OutputSpec output;
  GateSpec gate;
  Priority priority = Priority::kNormal;
  std::map<std::string, std::string> labels;

  nlohmann::json to_json() const;  // full form, defaults filled in
};

// Parses and validates a job spec. Unknown keys are errors (a typo must not
// silently fall back to a default). Errors are kInvalidInput naming the field:
// "recipe.w_bits: must be one of 2, 3, 4, 8 (got 5)". Every number has a cap
// (common/limits.h: nsamples, seqlen, group_size, damp, window, gate values;
// labels: count, key charset and length, value length, no control
// characters). Paths are checked for form only (non-empty, at most
// limits::kMaxPathBytes, no NUL); where they lead is checked by the path
// policy (common/path_policy.h) and existence by the planner.
Result<JobSpec> parse_job_spec(const nlohmann::json& j);

}  // namespace qcal

// A quantization job as the user submits it (REST `POST /v1/jobs`, `qcal
// submit`, schedule templates). One schema for the service and the CLI:
// `qcal quantize` flags map onto the same recipe fields.
//
// JSON form (defaults shown; `model`, `calib.path` and `output.path` are required):
// {
//   "model": "/models/llama",
//   "recipe": {"transform": "flatquant", "weight_solver": "gptq", "w_bits": 4,
//              "a_bits": 4, "kv_bits": 4, ...},            // common/recipe.h
//              (absent: GPTQ W4 g128)
//   "calib": {"path": "/data/calib.jsonl", "nsamples": 128, "seqlen": 2048},
//   "eval":  {"path": "/data/eval.jsonl", "nsamples": 0, "seqlen": 2048},   // optional
//   "output": {"path": "/out/llama-w4", "format": "auto", "overwrite": false,
//              "max_shard_mb": 2048},
//   "gate": {"max_ppl_increase": 0.05, "max_kl": 0.1},                      // optional
//   "priority": "normal",                 // high | normal | low
//   "labels": {"team": "infra"}
// }
//
// The recipe object is common/recipe.h's: the one recipe (the method registry's
// keys, common/method_registry.h), or the earlier weight-only form ({"method":
// "gptq", "w_bits", "group_size", "sym", "act_order", "static_groups", "damp",
// "mse_clip", "true_sequential", "mode", "window", "overlap", "seed"}), which is
// mapped onto it (defaults GPTQ W4 with groups of 128 in that form). It is parsed
// and validated (values, caps, combinations) here; the checks that need the
// model's shapes run when the job is planned.
// output.format: auto (the default: gptq when everything folds into the weights,
// else native), native, gptq, compressed-tensors (output_format() resolves it).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/recipe.h"
#include "common/status.h"

namespace qcal {

struct DataSpec {
  std::string path;
  int64_t nsamples = 128;  // sequences (0 = all, for eval)
  int64_t seqlen = 2048;
};

struct OutputSpec {
  std::string path;
  std::string format = "auto";  // auto | native | gptq | compressed-tensors
  bool overwrite = false;
  int64_t max_shard_mb = 2048;  // GPTQ / compressed-tensors: data per safetensors shard
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
  Recipe recipe;
  DataSpec calib;
  std::optional<DataSpec> eval;
  OutputSpec output;
  GateSpec gate;
  Priority priority = Priority::kNormal;
  std::map<std::string, std::string> labels;

  nlohmann::json to_json() const;  // full form, defaults filled in
};

// What the job writes: output.format with "auto" resolved (gptq when the recipe folds
// completely, else native). kInvalidInput ("output.format: ...") for gptq /
// compressed-tensors with a recipe that leaves work online, native with asymmetric
// weights, compressed-tensors at bits other than 4 and 8.
Result<std::string> output_format(const JobSpec& spec);

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

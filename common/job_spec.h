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
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

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
};

struct DataSpec {
  std::string path;
  int64_t nsamples = 128;  // sequences (0 = all, for eval)
  int64_t seqlen = 2048;
};

struct OutputSpec {
  std::string path;
  std::string format = "gptq";  // gptq | compressed-tensors
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
// "recipe.w_bits: must be one of 2, 3, 4, 8 (got 5)". Paths are checked for
// form only (non-empty); existence is checked by the planner.
Result<JobSpec> parse_job_spec(const nlohmann::json& j);

}  // namespace qcal

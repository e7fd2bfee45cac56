// `qcal quantize` and the in-process API: a job's DAG (common/planner.h) run
// task by task in this process, in a topological order, against a private
// artifact store — the same task runners as the service's workers
// (worker/tasks.h, worker/pipeline.h), so one spec gives the same output bytes
// either way (with the same thread count). The store is a temporary directory
// next to the output (removed afterwards unless kept).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "common/data.h"
#include "common/job_spec.h"
#include "common/pipeline_plan.h"
#include "common/recipe.h"
#include "common/status.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/native.h"

namespace qcal {

struct LocalRunOptions {
  // The artifact store's root; empty = "<output.path>.qcal-store.<pid>", removed at the end.
  std::string store_dir;
  bool keep_store = false;
  // The planner's memory limit; 0 = this machine's physical memory.
  uint64_t memory_bytes = 0;
  // Progress lines (one per task and the tasks' own lines). May be empty.
  std::function<void(const std::string&)> log;
};

struct LocalRunResult {
  Plan plan;
  std::map<std::string, nlohmann::json> results;  // by task id
  double seconds = 0;
  // The per-layer reports of the block tasks, the windows, the whole-model fits:
  // {"layers": [...], "windows": [...], "transform": [...], "learn": {...}}.
  nlohmann::json report() const;
};

// Plans `spec` (checks included) and runs every task. Errors are the planner's or the
// first failing task's, prefixed with its id.
Result<LocalRunResult> run_job_locally(const JobSpec& spec, const LocalRunOptions& o = {});

// ---- Conveniences for tests and tools (small models).
// The FP model `fp` (written to a temporary directory) calibrated by `r` on `calib`
// (written as a temporary .u32 file), read back as a native model. `report` (may be
// null) receives LocalRunResult::report().
Result<calib::NativeModel> calibrate(const calib::FpModel& fp, const TokenSequences& calib,
                                     const Recipe& r, nlohmann::json* report = nullptr);
// The same from a checkpoint directory into `out_dir` in `format` (auto | native | gptq |
// compressed-tensors).
Result<nlohmann::json> calibrate_to_dir(const std::string& model_dir, const TokenSequences& calib,
                                        const Recipe& r, const std::string& out_dir,
                                        const std::string& format, bool overwrite);

}  // namespace qcal

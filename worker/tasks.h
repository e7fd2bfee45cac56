// The task runners: what a worker (or `qcal quantize`, worker/local_runner.h)
// does with one claimed task of a job's DAG (common/plan.h: embed, capture,
// transform, learn, quantize, cbq-window, assemble, validate). run_task
// dispatches: validate runs here (calib::open_eval_model + evaluate_stream on
// the output against the FP model, then the gate); every other type is a
// pipeline task (worker/pipeline.h). Each runner reads its inputs from the
// artifact store (find_corrupt_input verifies them first), writes its own
// artifacts under its attempt, and returns the task's result JSON (common/plan.h
// lists each type's). The same tasks run the same engine code in the service
// and in `qcal quantize`, so with the same thread count the output bytes are
// the same.
//
// Publishing: assemble writes the output into a staging directory and publishes
// it as output.path under ctx.fence (worker/publish.h): only while this claim
// still holds its attempt and the job still owns the path; a re-run replaces its
// own job's earlier output (the manifest says whose it is).
//
// Ranks: the task types runs_on_all_ranks names (transform, learn, quantize,
// cbq-window) run on every rank of ctx.group together (calibration sequences
// sharded, gradients / Hessians / statistics all-reduced; the root reads and
// writes the store and its result is the task's). The others run on the root.
//
// Errors follow status.h: kInvalidInput for a bad spec / params / data
// (never retried), kCorrupt when an input artifact fails its checksum (see
// find_corrupt_input), kIoError / kResourceExhausted from the store, and
// cancelled() when ctx.cancel was set (checked between layers and, in a CBQ
// window or FlatQuant block, between training steps).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "common/job_store.h"
#include "common/status.h"
#include "worker/artifacts.h"
#include "worker/publish.h"
#include "worker/rank_group.h"

namespace qcal {

struct TaskContext {
  std::string job_id;
  JobSpec spec;
  TaskDef task;
  int64_t attempt = 1;  // goes into artifact paths (task_artifact_path)
  // Results of the tasks in task.deps, by task id (JobStore::get_tasks).
  std::map<std::string, nlohmann::json> deps;
  ArtifactStore* store = nullptr;             // required
  const std::atomic<bool>* cancel = nullptr;  // optional; set → stop between layers
  RankGroup* group = nullptr;                 // nullptr = a single rank
  // Progress lines ("layer 3/32 ..."), e.g. to stderr and the job log. Optional.
  std::function<void(const std::string&)> log;
  // The publishing fence of this claim (worker/publish.h); nullptr = unfenced
  // (tests, embedded use). The tasks that write output.path publish through it.
  PublishFence* fence = nullptr;
};

// Runs ctx.task (dispatch on its type). Not thread safe with respect to ctx.
Result<nlohmann::json> run_task(const TaskContext& ctx);

// One artifact a task reads, and the dep that produced it.
struct TaskInput {
  std::string producer;  // dep task id
  std::string key;       // "x", "x.<l>", "qlinears"
  ArtifactRef ref;
};
// The artifacts ctx.task will read. kInvalidInput when a dep's result lacks
// one (the DAG is wrong).
Result<std::vector<TaskInput>> task_inputs(const TaskContext& ctx);
// Verifies every input of ctx.task (size and SHA-256). Returns OK and leaves
// `producer` empty when all match; otherwise the kCorrupt status of the first
// bad one, with `*producer` set to the dep that must run again.
Status find_corrupt_input(const TaskContext& ctx, std::string* producer);

// The status of a task stopped by ctx.cancel: kUnavailable, message
// "cancelled: <what>". (status.h has no code of its own for it.)
Status cancelled(const std::string& what);
bool is_cancelled(const Status& s);

}  // namespace qcal

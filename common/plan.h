// The task DAG of a quantization job (issue #10: one layer-streaming pipeline
// for every recipe): what common/pipeline_plan.h emits, what the coordinator
// stores in Redis, what a worker (or `qcal quantize`, in process) executes.
// The planner never touches tensors; a worker never plans.
//
// Letters: L layers, N calibration sequences of T tokens, H hidden; P the
// IntactKV prefix length. Task ids carry a 4-digit layer (or window) number.
//
//   embed ──► capture-0000 ──► capture-0001 ──► … ──► capture-(L−2)
//     │            │                │
//     │       flatquant-0000   flatquant-0001  …      (transforms with a block task,
//     │            │                │                  in parallel, on FP inputs)
//     ▼            ▼                ▼
//   quantize-0000 ──► quantize-0001 ──► … ──► quantize-(L−1)   (sequential mode: each on
//     │                                        the quantized outputs of the one before)
//     └──────────────────────► assemble ──► validate
//
//   embed        reads the job's calibration tokens and writes X_0 = the embedding
//                rows (N·T, H) as artifact "x" (with the recipe's embed_mean_sub), and
//                with IntactKV the prefix's X^p_0 (P, H) as "prefix".
//   capture-LLLL (when a method needs FP inputs or activation statistics, or IntactKV
//                needs the prefix) the FP block l on X_l streamed in micro-batches:
//                "x" = X_{l+1} (omitted for the last layer), "stats" = per-channel
//                max |x| of block l's q/k/v, gate/up and down inputs, "prefix" =
//                X^p_{l+1}. deps: embed or capture-(l−1).
//   spinquant    (whole model, in memory) learns R1 and every R2: "rotations".
//                deps: embed.
//   <transform>-LLLL  a transform whose row has block_task (flatquant): fits block l
//                on X_l (input) and X_{l+1} (target) read in micro-batches: "params"
//                (the learned transform of block l, small). deps: the producers of
//                X_l and X_{l+1} (and of stats_l).
//   quantize-LLLL  params {"layers": [l0, l1)}: the deployed block (original weights
//                + the transform) rounded by the weight solver; GPTQ's Hessians from
//                the block's inputs: the quantized path X^q_l (sequential: the
//                previous quantize task's "x"; the first one: embed's "x", rotated
//                when the transform rotates the residual stream) or FP inputs
//                (parallel mode: capture's); RTN needs no data. Writes
//                "block.LLLL" per layer (qcal.block v1: codes, scales, the deployed
//                norms/biases, online transforms, activation/KV quantizers, and with
//                IntactKV the FP prefix K/V) and "x" = X^q_{l1} in sequential mode.
//   cbq-window-WWWW  params {"window", "first", "last", "finalize_last"}: one CBQ
//                window (reconstruction block = windows of 1) on the quantized-path
//                input (previous window's "x"; parallel mode: capture's FP input),
//                targets X_{last+1} from capture, the carried parameters of the
//                previous window ("state"); writes "block.LLLL" for the layers it
//                finalizes, "state" and "x" (sequential).
//   intactkv-cal (whole model, in memory) trains the IntactKV cache ("+Cal") of the
//                assembled blocks: "prefix_kv". deps: every block producer.
//   assemble     streams every "block.LLLL" (and "rotations" / "prefix_kv") into the
//                output checkpoint: native, or GPTQ / compressed-tensors when
//                everything folds; embeddings and lm_head are rotated/folded by rows.
//                result {"output", "bytes", "format"}.
//   validate     evaluates the output against the FP model on the job's eval data
//                (streaming, both checkpoint kinds) and applies the gate:
//                result {"report": EvalResult JSON + gate, "gate_passed": bool}
//                (no eval data → {"skipped": ...}, gate_passed true).
//
// Parallel mode: every quantize task (and window) reads FP inputs from the capture
// instead of the previous task, so all of them can run at once.
//
// An artifact reference A is {"path": relative to the store root, "sha256": hex,
// "bytes": n}; a task's result holds {"artifacts": {name: A, ...}, ...}; readers
// verify the checksum and, on mismatch, ask the store to re-run the producer
// (JobStore::rerun_producer). Every task is idempotent: a re-run writes under its
// own attempt number and overwrites nothing another task relies on.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace qcal::plan {

inline constexpr const char* kEmbed = "embed";
inline constexpr const char* kCapture = "capture";
inline constexpr const char* kTransform = "transform";  // ids "<method>-LLLL"
inline constexpr const char* kLearn = "learn";          // ids "spinquant", "intactkv-cal"
inline constexpr const char* kQuantize = "quantize";
inline constexpr const char* kCbqWindow = "cbq-window";
inline constexpr const char* kAssemble = "assemble";
inline constexpr const char* kValidate = "validate";

// "<prefix>-0003"
inline std::string numbered(const std::string& prefix, int64_t i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "-%04lld", static_cast<long long>(i));
  return prefix + buf;
}
// Artifact names.
inline std::string block_artifact(int64_t layer) { return numbered("block", layer); }

// A CBQ window: blocks first..last are trained together; blocks first..finalize_last
// are hardened after it (the next window starts at finalize_last + 1 − overlap).
struct CbqWindow {
  int64_t first = 0, last = 0;
  int64_t finalize_last = 0;
};
// The windows over L blocks, window ≥ 1, 0 ≤ overlap < window, stride window − overlap:
// (0,1;0)(1,2;1)(2,3;3) for L 4, window 2, overlap 1. Empty for arguments outside
// those ranges. The one rule the planner's cbq-window tasks and the worker share.
inline std::vector<CbqWindow> cbq_windows(int64_t L, int64_t window, int64_t overlap) {
  std::vector<CbqWindow> plan;
  if (L <= 0 || window < 1 || overlap < 0 || overlap >= window) return plan;
  const int64_t stride = window - overlap;
  for (int64_t first = 0;; first += stride) {
    CbqWindow w;
    w.first = first;
    w.last = std::min<int64_t>(first + window, L) - 1;
    const bool final_window = w.last == L - 1;
    w.finalize_last = final_window ? L - 1 : first + stride - 1;
    plan.push_back(w);
    if (final_window) break;
  }
  return plan;
}

}  // namespace qcal::plan

// The method registry (issue #10): one row per method the service runs, read by
// the recipe parser (common/recipe.h), the CLI flags and --help (api/), the
// planner's DAG and memory model (common/pipeline_plan.h), and the OpenAPI
// document (`qcal registry --openapi` prints the recipe schema that
// api/openapi.yaml holds; a test keeps the two equal). The numerics of a method
// are one file under worker/calib/methods/ behind the interface of
// worker/calib/method.h, found by the row's name; this file holds no numerics,
// so the coordinator links it without the engine.
//
// Adding a method: one row in method_registry.cc and one file in
// worker/calib/methods/ (registered by name there).
//
// Rows have a kind. A recipe names one transform, one weight solver and one
// reconstruction (the rows of those kinds), and the "core" and "intactkv" rows
// are always part of it. A row's options are recipe keys; every key belongs to
// exactly one row.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace qcal {

enum class MethodKind {
  kCore,            // quantizer widths, data batching, seed: every recipe
  kTransform,       // none, smoothquant, quarot, spinquant, flatquant
  kWeightSolver,    // rtn, gptq, lora-rounding
  kReconstruction,  // none, block, cbq
  kAddon,           // intactkv
};
const char* method_kind_name(MethodKind k);  // "core" | "transform" | ...

enum class OptType { kBool, kInt, kNum, kString, kIds };

// One recipe key.
struct OptionSpec {
  std::string key;   // JSON key; dotted = nested ("gptq.percdamp")
  std::string flag;  // CLI flag without "--" ("damp"); empty = JSON only
  OptType type = OptType::kNum;
  nlohmann::json def;                // default value
  double min = 0, max = 0;           // inclusive caps for kInt / kNum (and each id of kIds)
  std::vector<std::string> choices;  // kString: the allowed values (empty = any)
  std::string help;                  // one line, for --help and OpenAPI
  // kBool with a flag: the flag sets it to true; `neg_flag` (e.g. "no-lwc")
  // sets it to false. Either may be empty.
  std::string neg_flag;
};

// What a method needs from the FP capture pass (task "capture-LLLL").
struct CaptureNeeds {
  bool fp_inputs = false;  // every block's FP input activations X_l (N·T, H)
  bool act_stats = false;  // per-channel max |x| of the q/k/v, gate/up, down inputs
};

// Sizes the memory terms see: the model's block shapes, the calibration data,
// and the micro-batch the tasks stream in. All in elements, not bytes.
struct MemCtx {
  uint64_t L = 0, H = 0, I = 0, Q = 0, K = 0, V = 0;  // layers, hidden, intermediate,
                                                      // n_h·d, n_kv·d, vocab
  uint64_t n_heads = 0, n_kv = 0, head_dim = 0;
  uint64_t block_params = 0;              // the seven linears + norms (+ q/k/v bias)
  uint64_t linear_params = 0;             // the seven linears
  uint64_t max_in = 0;                    // largest linear input width
  uint64_t N = 0, T = 0;                  // calibration sequences × tokens
  uint64_t micro = 1;                     // sequences per forward micro-batch
  uint64_t train_micro = 1;               // sequences per training forward/backward micro-batch
  uint64_t window = 1;                    // blocks in a CBQ window (1 for other tasks)
  uint64_t prefix = 0;                    // IntactKV prefix tokens (0 without IntactKV)
  uint64_t w_bits = 4, w_group_cols = 0;  // group columns (0 = per channel)
  uint64_t a_bits = 16;                   // activations (< 16: quantized forwards)
  bool head = false;        // a CBQ window that ends the model and trains the logit loss
  bool gptq_start = false;  // CBQ windows started from GPTQ (their codes are carried)
};

// One named part of a task's peak memory, in bytes.
using MemPart = std::pair<std::string, uint64_t>;
// A method's contribution to a task of type `task_type` (common/plan.h names).
using MemoryTerms =
    std::function<void(const MemCtx& m, const std::string& task_type, std::vector<MemPart>* parts)>;

struct MethodRow {
  std::string name;  // "flatquant"
  MethodKind kind = MethodKind::kCore;
  std::string summary;  // one line
  std::vector<OptionSpec> options;
  CaptureNeeds needs;
  // Transforms: a separate task per block fits the block's transform ("flatquant-LLLL")
  // on FP inputs, in parallel with every other block; false: the transform is cheap
  // and computed where the block is quantized.
  bool block_task = false;
  // Learns over the whole model in one process before (transforms: spinquant) or after
  // (intactkv_cal) the block tasks; the planner refuses models that do not fit.
  bool whole_model = false;
  // Rotates the residual stream (x → x·R1): embeddings, lm_head and every FP activation
  // read from the capture are rotated too.
  bool rotates_residual = false;
  // Its blocks calibrate independently (given FP inputs): parallel tasks.
  bool independent_blocks = true;
  MemoryTerms memory;  // may be empty
};

// Every row, in a stable order (core first, then by kind).
const std::vector<MethodRow>& method_registry();
// The row named `name` of kind `kind`; nullptr if none.
const MethodRow* find_method_row(const std::string& name, MethodKind kind);
// The row that owns option `key`; nullptr if none.
const MethodRow* row_of_option(const std::string& key);
const OptionSpec* find_option(const std::string& key);
// The names of the rows of one kind, in order ("none, smoothquant, quarot, ...").
std::vector<std::string> method_names(MethodKind kind);

// The recipe schema as OpenAPI 3 YAML (the `Recipe` component, indented for
// api/openapi.yaml's components/schemas block): every key with its type,
// default, caps, choices and help.
std::string recipe_openapi_yaml();

}  // namespace qcal

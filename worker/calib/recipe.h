// The calibration recipe: transform × weight solver × quantizer bit widths,
// one schema for `qcal quantize` flags and the REST API's recipe object
// (issue #3 part 3; CBQ/IntactKV extend it in issue #5).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/status.h"
#include "worker/engine/gptq.h"

namespace qcal::calib {

enum class Transform { kNone, kSmoothQuant, kQuaRot, kSpinQuant, kFlatQuant };
enum class WeightSolver { kRtn, kGptq, kLoraRounding };  // "rtn" | "gptq" | "lora-rounding"
// Block reconstruction after the transform (issue #5, methods.md §7):
// none; per block (CBQ's trainer with windows of 1, overlap 0); CBQ windows.
enum class Reconstruction { kNone, kBlock, kCbq };  // "none" | "block" | "cbq"

struct CalibRecipe {
  Transform transform = Transform::kNone;
  WeightSolver weight_solver = WeightSolver::kRtn;
  // Weights: symmetric signed grid, per output channel (group −1) or groups.
  int w_bits = 4;
  int64_t w_group = -1;
  bool w_mse_clip = false;  // §0.1 grid search (RTN and GPTQ's group params)
  // Activations (inputs of every linear but lm_head): symmetric per token.
  int a_bits = 16;      // 16 = unquantized
  double a_clip = 1.0;  // QuaRot's a_clip_ratio 0.9 (fixed methods)
  // K/V cache: asymmetric per (token, head).
  int kv_bits = 16;
  double kv_clip = 1.0;  // QuaRot 0.95
  // SmoothQuant migration strength.
  double sq_alpha = 0.5;
  // FlatQuant (§5.3/§5.6 defaults).
  int64_t epochs = 15;
  int64_t cali_bsz = 4;
  double flat_lr = 5e-3;
  bool lwc = true, lac = true, add_diag = true;
  double diag_alpha = 0.3;
  // SpinQuant (§4.3): Cayley SGD steps, peak lr; trains at W16 when the solver is GPTQ.
  int64_t spin_steps = 100;
  double spin_lr = 1.5;
  int64_t spin_bsz = 4;
  // QuaRot/SpinQuant embedding row-mean subtraction (§10.1): off by default
  // (it changes an RMSNorm model's function).
  bool embed_mean_sub = false;
  // IntactKV (methods.md §6): the FP K/V cache of a pivot prefix, computed by the
  // transformed FP model and kept unquantized in front of every sequence. Needs the
  // native format; evaluated sequences must begin with the prefix.
  bool intactkv = false;
  std::vector<int32_t> intactkv_prefix;  // empty = [config.bos_token_id]
  // IntactKV "+Cal" (methods.md §6.4, intactkv.h calibrate_intactkv): the prefix
  // K/V become the only trainable parameters, trained on the calibration data so
  // that every decoder layer's output matches the FP model's (AdamW at
  // intactkv_cal_lr, 160 steps of 16 sequences by default). Needs intactkv and some
  // quantizer on. Calibration sequences that do not begin with the prefix get
  // their first P tokens replaced by it (the IntactKV paper's protocol).
  bool intactkv_cal = false;
  int64_t intactkv_cal_steps = 160;
  double intactkv_cal_lr = 2e-4;
  // Reconstruction (worker/calib/cbq.h): JSON keys "reconstruction", "cbq_window",
  // "cbq_overlap", "cbq_parallel", "cbq_epochs", "lora_rank", "cfp". Weight solver
  // "lora-rounding" needs a reconstruction; "rtn" with a reconstruction learns step
  // sizes only (rank 0).
  // With a reconstruction the training minibatch is cali_bsz sequences and the
  // activation / K/V clip ratios are learned (a_clip / kv_clip are not used); the
  // transform (any) is applied first and stays fixed, its online parts included
  // (FlatQuant: its trained transforms and LWC-clamped weights; its LAC clips are
  // re-learned). weight_solver gptq and w_mse_clip make no sense with one (the
  // reconstruction learns step sizes and rounding itself): validate() rejects them.
  Reconstruction reconstruction = Reconstruction::kNone;
  int64_t cbq_window = 2, cbq_overlap = 1;  // blocks per window, shared with the next
  bool cbq_parallel = false;                // every window on FP inputs (independent windows)
  int64_t cbq_epochs = 20;
  int64_t lora_rank = 16;
  bool cfp = true;  // coarse-to-fine preprocessing (§7.3)
  GptqOptions gptq;
  uint64_t seed = 0;
  int64_t batch = 8;  // sequences per forward batch (memory only)

  // Rejects combinations that make no sense, naming the field and why
  // ("spinquant needs a_bits or kv_bits < 16 or w_bits < 16", bits out of range,
  // an intactkv_prefix without intactkv, a negative prefix id, intactkv_cal without
  // intactkv or without any quantizer on, intactkv_cal_steps < 1, ...).
  Status validate() const;
  // The checks that need the model's shapes: group sizes dividing every linear's
  // input (H, n_h·d, I), Hadamard sizes (QuaRot/SpinQuant: H, I, n_h, d), Kronecker
  // factorizations (FlatQuant: decompose_dim of H and I), IntactKV prefix ids (or
  // bos_token_id) inside the vocabulary. kInvalidInput naming the field.
  Status validate_for(const ModelConfig& c) const;
  nlohmann::json to_json() const;
  // True iff every transform folds into the weights offline (weight-only, not
  // FlatQuant): no online Hadamard / Kronecker factor is needed.
  bool transforms_fold() const;
  // True iff nothing has to run online and nothing beyond weights is stored
  // (transforms_fold() and no IntactKV cache): the result can be written as GPTQ /
  // compressed-tensors. A weight-only reconstruction folds completely too (its
  // symmetric codes and fp16 scales are GPTQ-writable).
  bool folds_completely() const;
  // The IntactKV prefix: intactkv_prefix, or [c.bos_token_id] when empty.
  std::vector<int32_t> intactkv_prefix_for(const ModelConfig& c) const;
};

const char* transform_name(Transform t);  // "none" | "smoothquant" | ...
Result<Transform> parse_transform(const std::string& s);
const char* weight_solver_str(WeightSolver s);  // "rtn" | "gptq" | "lora-rounding"
Result<WeightSolver> parse_weight_solver(const std::string& s);
const char* reconstruction_str(Reconstruction r);  // "none" | "block" | "cbq"
Result<Reconstruction> parse_reconstruction(const std::string& s);
// Reads the recipe object of a job spec / the CLI's JSON form; unknown keys are an error.
Result<CalibRecipe> recipe_from_json(const nlohmann::json& j);

}  // namespace qcal::calib

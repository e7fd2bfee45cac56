// The calibration pipelines (methods.md §1, §3, §4, §5): from an FP model and
// calibration sequences to a NativeModel (or, when everything folds, an FP model
// with folded transforms that worker/engine then quantizes to GPTQ /
// compressed-tensors).
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/data.h"
#include "worker/calib/cbq.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/native.h"
#include "worker/calib/recipe.h"

namespace qcal::calib {

struct CalibLayerReport {
  int64_t layer = 0;
  double loss_first = 0, loss_last = 0;  // FlatQuant MSE at the first / last step
  double seconds = 0;
};
struct CalibReport {
  std::vector<CalibLayerReport> layers;
  std::vector<double> spin_loss;                  // SpinQuant CE per step
  std::vector<CbqWindowReport> windows;           // reconstruction: one per window, in order
  std::optional<IntactKvCalReport> intactkv_cal;  // recipe intactkv_cal: the "+Cal" training
  double seconds = 0;
  nlohmann::json to_json() const;
};
using CalibProgress = std::function<void(const std::string& stage, int64_t i, int64_t n)>;

// ---- Building blocks shared by the methods (all in float64, cast once).
// §0.4: folds input/post norm γ into q/k/v and gate/up, final norm into lm_head
// (γ := 1). Optional embedding row-mean subtraction.
void fold_norms(FpModel& m, bool embed_mean_sub);
// Residual-stream rotation R1 (H×H, x → x·R1): embed ← E·R1, input-side linears
// W ← W·R1, output-side (o, down) W ← R1ᵀ·W, lm_head ← W·R1. Norms must be folded.
void rotate_residual(FpModel& m, const std::vector<double>& R1);
// Per-head rotation R2 (d×d) of layer l: v output side and o input side (I ⊗ R2).
void rotate_heads(BlockWeightsT<float>& w, const ModelConfig& c, const std::vector<double>& R2);
// SmoothQuant (§1): act_max per channel of the q/k/v and gate/up inputs → s; folds
// γ/s into the norms and diag(s) into the consumers.
void smooth_layer(BlockWeightsT<float>& w, const std::vector<float>& attn_act_max,
                  const std::vector<float>& mlp_act_max, double alpha);

// SpinQuant (§4, spinquant.cc): learns R1 (H×H) and R2 (per layer, d×d) on a
// norm-folded model by Cayley SGD through the fake-quantized network (R3/R4 fixed
// Hadamards, identity STE; trained at W16 when the weight solver is GPTQ).
// calibrate() then folds them like QuaRot's random Hadamards.
Status spinquant_learn(const FpModel& folded, const TokenSequences& calib, const CalibRecipe& r,
                       std::vector<double>* R1, std::vector<std::vector<double>>* R2,
                       CalibReport* report);

// The BlockQuantSpec a recipe uses during calibration and in the native model.
BlockQuantSpec block_quant_spec(const CalibRecipe& r, const ModelConfig& c, bool training);

// ---- Reconstruction (CBQ windows / per block) as resumable steps: the service runs
// cbq_prepare in its capture task, one cbq window per task (cbq.h cbq_run_window on
// the state that the previous window task saved), and cbq_finish in assemble.
// calibrate() runs the same three steps in one process, so both give identical bits.
struct CbqSetup {
  // Transformed FP model the windows train (deployed form: offline transforms folded;
  // CFP is applied by each window to its blocks, cbq.h).
  FpModel model;
  std::vector<NativeLayer> online;  // per layer: online transforms / quantizer settings to keep
  int64_t N = 0, T = 0;             // calibration sequences × tokens
  std::vector<float> x0;            // (N·T, H) layer-0 inputs
};
// Everything before the first window (load, transform, CFP, layer-0 inputs).
Result<CbqSetup> cbq_prepare(const FpModel& fp, const TokenSequences& calib, const CalibRecipe& r,
                             CalibReport* report);
// The CbqOptions a recipe implies (window/overlap 1/0 for Reconstruction::kBlock).
// For a recipe that keeps transforms online (QuaRot/SpinQuant with quantized
// activations or K/V, FlatQuant) these options have needs_online set and no
// transforms: cbq_run_window refuses them; use the overload with the setup.
CbqOptions cbq_options(const CalibRecipe& r, const ModelConfig& c);
// The same with the setup's online transforms (CbqOptions::online): what every
// window must run with.
CbqOptions cbq_options(const CalibRecipe& r, const CbqSetup& s);
// One window task: runs window state->next_window of the recipe's plan on copies of
// the setup's FP blocks (cbq_run_window with cbq_options(r, s)); the setup is not
// modified. calibrate() runs exactly this in a loop.
Status cbq_run_setup_window(const CbqSetup& s, const CalibRecipe& r, CbqState* state,
                            std::vector<CbqLayerResult>* finalized, CbqWindowReport* report);
// The quantized NativeModel from the setup and every finalized layer's result.
// With intactkv it attaches the FP prefix cache; with intactkv_cal it then trains it
// on `calib` (the job's calibration sequences, as cbq_prepare got them; required
// then, else kInvalidInput), recording the losses in `report` (may be null) and
// calling `progress` ("intactkv-cal", step, steps).
Result<NativeModel> cbq_finish(const CbqSetup& setup, const std::vector<CbqLayerResult>& layers,
                               const CalibRecipe& r, const TokenSequences* calib,
                               CalibReport* report, const CalibProgress& progress = nullptr);
// The same without calibration data (recipes without intactkv_cal).
Result<NativeModel> cbq_finish(const CbqSetup& setup, const std::vector<CbqLayerResult>& layers,
                               const CalibRecipe& r);
// Persistence for the service's tasks (a directory each; atomic; checksummed by the
// artifact store around them). Loading validates sizes against the recipe/model.
Status save_cbq_setup(const CbqSetup& s, const std::string& dir);
Result<CbqSetup> load_cbq_setup(const std::string& dir);
Status save_cbq_state(const CbqState& s, const std::vector<CbqLayerResult>& finalized,
                      const std::string& path);
Result<CbqState> load_cbq_state(const std::string& path, std::vector<CbqLayerResult>* finalized);

// ---- IntactKV "+Cal" on a recipe's calibration data: the sequences of `calib` with
// their first P tokens replaced by `prefix` where they do not begin with it (the
// IntactKV paper's protocol; P must be shorter than seqlen), and how many were changed.
TokenSequences intactkv_cal_data(const TokenSequences& calib, const std::vector<int32_t>& prefix,
                                 int64_t* replaced);

// ---- The whole pipeline: FP model → calibrated, quantized NativeModel.
// With intactkv_cal the attached IntactKV cache is trained ("+Cal") on intactkv_cal_data
// of calib right after it is attached (progress stage "intactkv-cal"; losses in
// report->intactkv_cal).
Result<NativeModel> calibrate(const FpModel& fp, const TokenSequences& calib, const CalibRecipe& r,
                              CalibReport* report, const CalibProgress& progress = nullptr);

// `qcal quantize --method ...`: loads `model_dir`, calibrates, writes `out_dir` as a
// native checkpoint, or (folds_completely) as `format` (gptq | compressed-tensors)
// through worker/engine's writers.
Result<CalibReport> calibrate_to_dir(const std::string& model_dir, const TokenSequences& calib,
                                     const CalibRecipe& r, const std::string& out_dir,
                                     const std::string& format, bool overwrite,
                                     const CalibProgress& progress = nullptr);

}  // namespace qcal::calib

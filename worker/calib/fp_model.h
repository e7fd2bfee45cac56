// A whole LLaMA-family model in memory as fp32 blocks (the tiny fixtures and
// the calibration pipelines; a 70B model goes through the layer-streaming
// paths of worker/engine instead), with HF I/O and the differentiable
// whole-model forward/backward used to train the fixtures and by SpinQuant.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/data.h"
#include "common/model_config.h"
#include "common/status.h"
#include "common/tensor.h"
#include "worker/calib/qblock.h"

namespace qcal::calib {

struct FpModel {
  ModelConfig config;
  std::vector<float> embed;       // (V, H)
  std::vector<float> final_norm;  // (H)
  std::vector<float> lm_head;     // (V, H); equals embed when tied (kept as a copy)
  std::vector<BlockWeightsT<float>> layers;
};

// Reads an FP HF checkpoint directory (any dtype) into fp32.
Result<FpModel> load_fp_model(const std::string& dir);
// Writes an HF checkpoint (config.json + model.safetensors, dtype = config.torch_dtype),
// atomically (staging dir, then rename). Tied models write only embed_tokens.
Status write_fp_model(const FpModel& m, const std::string& dir, bool overwrite);

// Logits (B·T, V) of B sequences of T tokens through `layers` (each with its own
// transforms / quantizers when given: nullptrs = FP). Used by tests and SpinQuant.
struct LayerPlan {
  const BlockTransformsT<float>* t = nullptr;
  const BlockQuantSpec* q = nullptr;
  const BlockClipT<float>* clip = nullptr;
};
std::vector<float> fp_model_logits(const FpModel& m, const int32_t* tokens, int64_t B, int64_t T,
                                   const std::vector<LayerPlan>* plans = nullptr);

// Mean next-token cross-entropy of B sequences and, when `grads` is non-null, the
// gradient of every weight (same layout as FpModel, accumulated). Tied models sum
// the embedding and lm_head gradients into both copies. With `d_embed_out`/`plans`
// SpinQuant reads the gradients it chains into R1/R2 (see spinquant.h).
struct FpModelGrads {
  std::vector<float> embed, final_norm, lm_head;
  std::vector<BlockGradsT<float>> layers;
};
double fp_model_loss(const FpModel& m, const int32_t* tokens, int64_t B, int64_t T,
                     FpModelGrads* grads, const std::vector<LayerPlan>* plans = nullptr);

// Whole-model folds (methods.md §0.4, §3; SpinQuant's learning works on the whole
// model): input/post norm γ into q/k/v and gate/up, final norm into lm_head (γ := 1),
// optional embedding row-mean subtraction; the residual rotation R1 (H×H, x → x·R1)
// on the embedding, every linear and lm_head. Norms must be folded first.
void fold_norms(FpModel& m, bool embed_mean_sub);
void rotate_residual(FpModel& m, const std::vector<double>& R1);

}  // namespace qcal::calib

// The numerics of the method registry's rows (common/method_registry.h): one
// file per method under worker/calib/methods/, registered by name with
// QCAL_REGISTER_TRANSFORM / QCAL_REGISTER_WEIGHT_SOLVER (the files are linked
// whole, so registering needs no other file). The pipeline's tasks
// (worker/calib/pipeline.h) call them; a method never sees the task DAG, the
// store or Redis.
//
// A transform says what it needs captured (its registry row), how it fits one
// block (a block task, on FP inputs) or the whole model (learn), and what the
// block deploys as: which parts fold into the weights and which stay online.
// A weight solver rounds a deployed block's linears. Reconstructions (block,
// cbq) are the windows of worker/calib/cbq.h, run by the pipeline.
//
// Thread safety: methods are stateless singletons; calls are independent.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/data.h"
#include "common/model_config.h"
#include "common/recipe.h"
#include "common/status.h"
#include "worker/calib/activations.h"
#include "worker/calib/block.h"

namespace qcal::calib {

// In-place sum of n doubles across the ranks of a worker group (data parallel). An
// empty function is a single rank.
using SumFn = std::function<Status(double* data, int64_t n)>;
using SumFloatFn = std::function<Status(float* data, int64_t n)>;
using ProgressFn = std::function<void(const std::string& stage, int64_t i, int64_t n)>;

// Everything a block's method call sees.
struct BlockInputs {
  const ModelConfig* c = nullptr;
  const Recipe* r = nullptr;
  int64_t layer = 0;
  const BlockWeightsT<float>* w = nullptr;  // the checkpoint's FP weights of the block
  const ActStats* stats = nullptr;          // the capture's statistics (rows needing them)
  const ActivationSource* x = nullptr;      // FP inputs X_l (all N sequences)
  const ActivationSource* y = nullptr;      // FP outputs X_{l+1}
  const Fitted* global = nullptr;           // a whole-model fit (spinquant's rotations)
  // The transform's residual rotation R1 (residual_rotation(), computed once per task),
  // or null / empty when it has none.
  const std::vector<double>* R1 = nullptr;
  // Data parallel: this rank's index and the group size; every minibatch is split
  // over the ranks and `sum` adds their partial sums (gradients, losses, Hessians).
  int rank = 0, ranks = 1;
  SumFn sum;
  SumFloatFn sum_f;  // the same for fp32 buffers (GPTQ's Hessians); and the sequence counts
  std::function<bool()> should_stop;  // polled per training step (may be empty)
  ProgressFn progress;                // may be empty
};

// The model and data a whole-model fit (spinquant) sees.
struct WholeModelInputs {
  std::string model_dir;
  const TokenSequences* calib = nullptr;
  const Recipe* r = nullptr;
  ProgressFn progress;
  // Data parallel, as BlockInputs: each step's sequences split over the ranks.
  int rank = 0, ranks = 1;
  SumFn sum;
};

class TransformMethod {
 public:
  virtual ~TransformMethod() = default;
  // Whole-model learning before the blocks (rows with whole_model), e.g. SpinQuant's
  // rotations. The default has nothing to learn.
  virtual Result<Fitted> learn(const WholeModelInputs& in, nlohmann::json* report) const;
  // A block task's fit (rows with block_task) on in.x → in.y; the default fits nothing.
  virtual Result<Fitted> fit(const BlockInputs& in, nlohmann::json* report) const;
  // The deployed block (weights off: dl.q quantizes activations / K / V only) from the
  // checkpoint's weights in.w, fit()'s result `fitted` (empty when none) and in.global.
  virtual Result<Deployed> deploy(const BlockInputs& in, const Fitted& fitted) const = 0;
  // The residual rotation R1 (H×H, row-major, fp64; x → x·R1) the transform applies to
  // the embeddings, lm_head and every residual activation, or empty.
  virtual std::vector<double> residual_rotation(const ModelConfig& c, const Recipe& r,
                                                const Fitted* global) const;
  // True iff the final RMSNorm's γ is folded into lm_head (γ := 1; rotating transforms).
  virtual bool folds_final_norm() const { return false; }
};

class WeightSolverMethod {
 public:
  virtual ~WeightSolverMethod() = default;
  // Whether round() reads the block's inputs (GPTQ's Hessians).
  virtual bool needs_inputs() const = 0;
  // Rounds the seven linears of `dl` (weights dl.w.w, quantizers dl.q for the inputs);
  // `x` the block's inputs in its residual basis (null when !needs_inputs()). Fills `out`
  // and replaces dl.w.w[p] by the dequantized weights. Errors name the layer and linear.
  virtual Status round(const BlockInputs& in, Deployed& dl, const ActivationSource* x,
                       std::array<QuantizedLinear, kNumProj>* out,
                       nlohmann::json* report) const = 0;
};

// The implementations by registry name; nullptr when none is linked.
const TransformMethod* transform_method(const std::string& name);
const WeightSolverMethod* weight_solver_method(const std::string& name);

// Registration (one line at the end of a method's file).
bool register_transform(const std::string& name, const TransformMethod* m);
bool register_weight_solver(const std::string& name, const WeightSolverMethod* m);
#define QCAL_REGISTER_TRANSFORM(name, Type)                                                   \
  namespace {                                                                                 \
  const Type kTransformImpl;                                                                  \
  const bool kTransformRegistered = ::qcal::calib::register_transform(name, &kTransformImpl); \
  }
#define QCAL_REGISTER_WEIGHT_SOLVER(name, Type)                                             \
  namespace {                                                                               \
  const Type kSolverImpl;                                                                   \
  const bool kSolverRegistered = ::qcal::calib::register_weight_solver(name, &kSolverImpl); \
  }

// The weight quantizer of a recipe (bits, group, sym, mse clip) as the engine's QuantSpec.
QuantSpec weight_spec(const Recipe& r);

// Linear p (kProjNames order) of a block's row-major weights W as an
// [out, in] tensor (a copy), what the engine's solvers take.
Tensor proj_tensor(const ModelConfig& c, const std::vector<float>& W, int p);

// Runs `qb` over every sequence of `src` in micro-batches of `batch` sequences,
// reading each from the source; `sink` (may be null) receives the outputs in order;
// `hook` sees each linear's input.
Status stream_block(const QBlock<float>& qb, const ActivationSource& src, ActivationSink* sink,
                    int64_t batch, const LinearInputHook& hook = nullptr);

}  // namespace qcal::calib

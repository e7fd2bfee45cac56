// One decoder block as it moves through the pipeline (issue #10): its
// activation statistics from the FP capture, its deployed form (what the
// transform makes of it), the result a block task hands to assemble
// (qcal.block v1), and the fp64 arrays a method's fitted transform is stored
// as. Shared by every method file (worker/calib/methods/) and the pipeline's
// tasks (worker/calib/pipeline.h).
//
// Letters: H hidden, I intermediate, n_h / n_kv heads, d head dim, K = n_kv·d,
// P the IntactKV prefix length.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/recipe.h"
#include "common/status.h"
#include "worker/calib/native.h"
#include "worker/calib/qblock.h"
#include "worker/engine/quantizer.h"

namespace qcal::calib {

// Per-channel running max |x| (initialized at 1e-5, FlatQuant's convention) of the
// inputs of q (= k, v), gate (= up) and down of one FP block over the calibration set.
struct ActStats {
  std::vector<float> attn, mlp, down;  // (H), (H), (I)
  void init(int64_t H, int64_t I);
  // Folds in the input of linear `proj` (a kProjNames entry): x (rows, in).
  void update(const std::string& proj, const float* x, int64_t rows, int64_t in);
  // Element-wise max with another shard's statistics (data-parallel capture).
  void merge(const ActStats& o);
};

// The deployed form of a layer: the effective weights the inference engine multiplies
// with (every offline transform folded in float64 and cast once), the norms with their
// diagonals folded, the online, activation-side transforms only (a1/a2, u1/u2, d1/d2,
// po, pk/pk_it), and the activation / K / V quantizers with fixed clip ratios (weights
// off). A QBlock<float> over it computes what native_logits computes (up to the
// integer kernels' rounding).
struct Deployed {
  BlockWeightsT<float> w;
  BlockTransformsT<float> online;
  BlockQuantSpec q;
};

// The deployed weights of `w` under transforms `t` (float64; the "_it" matrices act on
// the weights, the others on activations) and the weight quantizer spec `wq` + `clip`
// (FlatQuant's LWC is baked in: the clamp to the learned range). dl.q is left off.
Deployed deploy_block(const ModelConfig& c, const BlockWeightsT<float>& w,
                      const BlockTransformsT<double>& t, const BlockQuantSpec& wq,
                      const BlockClipT<double>& clip);
// The same, taking `w` (its buffers become dl.w): no copy of the block is held.
Deployed deploy_block(const ModelConfig& c, BlockWeightsT<float>&& w,
                      const BlockTransformsT<double>& t, const BlockQuantSpec& wq,
                      const BlockClipT<double>& clip);
// The BlockQuantSpec a recipe uses during calibration (training: learned clips) and in
// the deployed model.
BlockQuantSpec block_quant_spec(const Recipe& r, const ModelConfig& c, bool training);
// The act/K/V quantizers of the deployed form: the recipe's, weights off, learned
// clips (LAC) turned into their fixed ratios sigmoid(β) (`lac` may be null: ratio 1).
BlockQuantSpec deployed_spec(const Recipe& r, const ModelConfig& c, const BlockClipT<double>* lac);
NativeActQuant native_act(const FakeQuantSpec& s);

// ---- Per-block pieces of the whole-model folds (QuaRot / SpinQuant, methods.md §0.4,
// §3): input/post norm γ into the columns of q/k/v and gate/up (γ := 1); the residual
// rotation R1 (H×H, x → x·R1): input-side linears W ← W·R1, output-side (o, down)
// W ← R1ᵀ·W; the per-head rotation R2 (d×d) of V's output and o's input.
void fold_block_norms(BlockWeightsT<float>& w, const ModelConfig& c);
void rotate_block(BlockWeightsT<float>& w, const ModelConfig& c, const std::vector<double>& R1);
void rotate_heads(BlockWeightsT<float>& w, const ModelConfig& c, const std::vector<double>& R2);
// SmoothQuant (§1): act_max per channel of the q/k/v and gate/up inputs → s; folds
// γ/s into the norms and diag(s) into the consumers.
void smooth_layer(BlockWeightsT<float>& w, const std::vector<float>& attn_act_max,
                  const std::vector<float>& mlp_act_max, double alpha);

// The FP K/V (P, K) each of `xp` (P, H: the prefix's hidden states entering the block,
// in the block's residual basis) through the deployed block with every quantizer off:
// K after RoPE (positions 0..P−1) and P_k, V as the attention reads it — IntactKV's
// cache entries for this layer (methods.md §6).
void prefix_kv(const ModelConfig& c, const Deployed& dl, const float* xp, int64_t P,
               std::vector<float>* k, std::vector<float>* v);

// Engine codes (unsigned, zero 2^(b−1), symmetric) → the native signed codes and (out, G)
// scales. w_group −1 or the group size.
PackedWeight to_packed(const QuantizedLinear& q, int64_t w_group);

// ---- What a block task hands to assemble: one layer, quantized (qcal.block v1).
struct BlockResult {
  int64_t layer = -1;
  int w_bits = 16;
  // w_bits < 16: the seven linears in the engine's format (quantizer.h). w_bits 16:
  // their deployed float weights in `fw`.
  std::array<QuantizedLinear, kNumProj> q;
  std::array<std::vector<float>, kNumProj> fw;
  std::vector<float> input_norm, post_norm;  // (H), diagonals folded
  std::array<std::vector<float>, 3> bias;    // q, k, v (transformed); empty when absent
  BlockTransformsT<float> online;            // activation side only (NativeLayer::online)
  std::array<NativeActQuant, kNumProj> act;
  NativeActQuant k, v;
  std::vector<float> prefix_k, prefix_v;             // IntactKV: (P, K) each, or empty
  nlohmann::json report = nlohmann::json::object();  // the task's per-layer numbers
};
// A NativeLayer of the result (symmetric codes packed; `w_group` −1 or the group size).
NativeLayer native_layer_of(const BlockResult& b, int64_t w_group);
// The result of a deployed block whose linears are `ql` (w_bits < 16) or float (w_bits 16).
BlockResult block_result(int64_t layer, const Deployed& dl,
                         const std::array<QuantizedLinear, kNumProj>* ql, int w_bits);
// Atomic (temporary file, fsync, rename). Loading checks every shape against `c`.
Status save_block_result(const BlockResult& b, const ModelConfig& c, const std::string& path);
Result<BlockResult> load_block_result(const std::string& path, const ModelConfig& c);

// What a block result's file declares, read from its metadata and tensor list
// only (no tensor data is copied): what the streaming assemble must know of
// every layer before it writes (worker/pipeline.cc).
struct BlockResultDecl {
  int64_t layer = -1;
  int w_bits = 16;
  // w_bits < 16: each linear's out/in features, spec and act_order; no codes,
  // scales, zeros or g_idx.
  std::array<QuantizedLinear, kNumProj> q;
  // The declaration native_layer_of(b) satisfies (the online transforms of
  // NativeLayer::online present, with their sides; 0 = not square).
  NativeLayerDecl native;
  int64_t prefix_rows = 0;  // IntactKV: P of prefix_k / prefix_v (0 = absent)
};
// Errors as load_block_result's for the metadata (kCorrupt naming the file and
// field); the tensor values are checked when the result is loaded.
Result<BlockResultDecl> load_block_decl(const std::string& path, const ModelConfig& c);

// ---- A method's fitted state: named fp64 arrays and a JSON object, stored as one
// safetensors file (qcal.fitted v1). Small (FlatQuant: the Kronecker factors,
// diagonals and clips of one block; SpinQuant: R1 and every R2). `bytes`: named byte
// arrays beside them (U8 tensors; CBQ's carried GPTQ codes), listed in the metadata's
// "bytes" (absent in files that have none).
struct Fitted {
  std::map<std::string, std::vector<double>> arrays;
  std::map<std::string, std::vector<uint8_t>> bytes;
  nlohmann::json meta = nlohmann::json::object();
  const std::vector<double>& at(const std::string& name) const;  // aborts when absent
  bool has(const std::string& name) const { return arrays.count(name) > 0; }
};
Status save_fitted(const Fitted& f, const std::string& path);
Result<Fitted> load_fitted(const std::string& path);
// ActStats as a Fitted ("attn", "mlp", "down") and back (sizes checked against c).
Fitted stats_to_fitted(const ActStats& s);
Result<ActStats> stats_from_fitted(const Fitted& f, const ModelConfig& c);

}  // namespace qcal::calib

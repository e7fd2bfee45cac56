// A differentiable LLaMA decoder block with transforms and fake quantization at
// every quantization point: the training graph of FlatQuant (methods.md §5.2),
// which also expresses QuaRot (fixed Hadamards), SpinQuant (R2 per head, R3, R4)
// and SmoothQuant (a diagonal), and the FP block when everything is off.
//
// Forward (one block, B sequences × T tokens, x (B·T, H)):
//   h  = RMSNorm(x; input_norm)
//   h̃  = kron((h ⊙ ca); a1, a2)                             [attn input slot]
//   W̃q = kron_rows(W_q ⊙ 1/ca; a1_it, a2_it), same for k, v  (input side of the weights)
//   W̃v per KV head block Wb (d, H) ← pvᵀ·Wb;  b̃v per head ← bv·pv  (output side)
//   q/k/v = fq_act[q|k|v](h̃) · fq_w[q|k|v](W̃)ᵀ + bias
//   RoPE(q), RoPE(k)  (positions 0..T−1 per sequence; P..P+T−1 with a prefix)
//   q per head ← q_h·pk_it;  k per head ← k_h·pk;  k ← fq_k(k);  v ← fq_v(v)
//   a  = attention(q, k, v)                         (causal, GQA; after the
//        unquantized prefix K/V of set_prefix when there is one)
//   ã  = kron(a; po, identity)  (P_oᵀ X per token over [n_h, d] heads)
//   W̃o = kron_rows(W_o; po_it, pv_it)
//   x  = x + fq_act[o](ã)·fq_w[o](W̃o)ᵀ
//   m  = RMSNorm(x; post_norm);  m̃ = kron(m ⊙ cu; u1, u2)
//   gate/up = fq_act[gate|up](m̃) · fq_w[gate|up](kron_rows(W ⊙ 1/cu; u1_it, u2_it))ᵀ
//   z  = silu(gate) ⊙ up;  z̃ = kron(z ⊙ cd; d1, d2)
//   x  = x + fq_act[down](z̃) · fq_w[down](kron_rows(W_down ⊙ 1/cd; d1_it, d2_it))ᵀ
// Every weight fake quantizer is preceded by nothing else: LWC is the weight
// quantizer's ClipMode::kLearned with lwc_range (kernels/grad.h).
// An empty matrix / vector means identity / absent. The "_it" matrices are the
// inverse transposes the caller supplies (for orthogonal transforms, the same
// matrix); the block never inverts anything, so the parameterization (param.h)
// owns the exactness of P·P⁻¹.
//
// Backward returns the gradient of everything the callers learn: the input x
// (for multi-block windows and whole-model training), every transform matrix and
// diagonal, the clip parameters, and (if asked) the weights, biases, norms and the
// IntactKV prefix K/V (set_prefix: an unquantized cache in front of every
// sequence, whose positions then start at P).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "kernels/grad.h"
#include "worker/engine/model.h"

namespace qcal::calib {

// The seven linears in kProjNames order.
enum Proj { kQ = 0, kK, kV, kO, kGate, kUp, kDown, kNumProj };
// Output / input features of linear p (HF [out, in]).
inline int64_t proj_out(const ModelConfig& c, int p) {
  switch (p) {
    case kQ: return c.q_dim();
    case kK:
    case kV: return c.kv_dim();
    case kO:
    case kDown: return c.hidden_size;
    default: return c.intermediate_size;
  }
}
inline int64_t proj_in(const ModelConfig& c, int p) {
  if (p == kO) return c.q_dim();
  if (p == kDown) return c.intermediate_size;
  return c.hidden_size;
}

template <typename T>
struct BlockWeightsT {
  std::vector<T> input_norm, post_norm;    // (H)
  std::array<std::vector<T>, kNumProj> w;  // HF [out, in]
  std::array<std::vector<T>, 3> bias;      // q, k, v; empty when absent
};
// Moves the tensors' data (pass an rvalue: a block is not held twice).
BlockWeightsT<float> to_block_weights(LayerWeights w);
LayerWeights to_layer_weights(const BlockWeightsT<float>& w, const ModelConfig& c);
template <typename T, typename U>
BlockWeightsT<T> cast_weights(const BlockWeightsT<U>& w);

// Transform matrices (row-major, square) and diagonals. Empty = identity.
template <typename T>
struct BlockTransformsT {
  std::vector<T> a1, a2, a1_it, a2_it, ca;  // attention input, H = n(a1)·n(a2)
  std::vector<T> u1, u2, u1_it, u2_it, cu;  // MLP input, H
  std::vector<T> d1, d2, d1_it, d2_it, cd;  // down_proj input, I = n(d1)·n(d2)
  std::vector<T> po, po_it;                 // across heads (n_h)
  std::vector<T> pv, pv_it;                 // per head on V (d)
  std::vector<T> pk, pk_it;                 // per head on K (pk) and Q (pk_it) (d)
};

// Quantizer configuration. act[p] quantizes the input of linear p; w[p] its weight.
struct BlockQuantSpec {
  std::array<FakeQuantSpec, kNumProj> act;
  std::array<FakeQuantSpec, kNumProj> w;
  FakeQuantSpec k, v;  // K/V cache (group = head dim)
  bool any_on() const;
};

// Clip parameters β (ClipMode::kLearned): act/k/v: 2 scalars each (max, min);
// weights: (max, min) per row·group. Sized by init_clip_params.
template <typename T>
struct BlockClipT {
  std::array<std::vector<T>, kNumProj> act_max, act_min;  // 1 element each (or empty)
  std::array<std::vector<T>, kNumProj> w_max, w_min;      // rows·G each (or empty)
  std::vector<T> k_max, k_min, v_max, v_min;              // 1 element each (or empty)
};
// Sizes every learned-clip vector for `q` and `c`, filled with `init` (FlatQuant: 4.0).
template <typename T>
BlockClipT<T> init_clip_params(const BlockQuantSpec& q, const ModelConfig& c, T init);
// The same clip parameters in another precision (the fp64 masters → the float block).
template <typename T, typename U>
BlockClipT<T> cast_clip(const BlockClipT<U>& c) {
  auto cv = [](const std::vector<U>& v) { return std::vector<T>(v.begin(), v.end()); };
  BlockClipT<T> r;
  for (int p = 0; p < kNumProj; ++p) {
    r.act_max[p] = cv(c.act_max[p]);
    r.act_min[p] = cv(c.act_min[p]);
    r.w_max[p] = cv(c.w_max[p]);
    r.w_min[p] = cv(c.w_min[p]);
  }
  r.k_max = cv(c.k_max);
  r.k_min = cv(c.k_min);
  r.v_max = cv(c.v_max);
  r.v_min = cv(c.v_min);
  return r;
}

template <typename T>
struct BlockGradsT {
  std::vector<T> dx;      // (B·T, H)
  BlockTransformsT<T> t;  // same shapes as the transforms (empty where identity)
  BlockClipT<T> clip;
  BlockWeightsT<T> w;  // only when BackwardOptions::weights
  // Only when BackwardOptions::prefix and the block has a prefix: the gradient at
  // the prefix K / V (P, n_kv·d) each, summed over the B sequences.
  std::vector<T> prefix_k, prefix_v;
};

struct BackwardOptions {
  bool input = true;       // dx
  bool transforms = true;  // dt
  bool clip = true;        // dclip
  bool weights = false;    // dw (+ biases, norms)
  bool prefix = false;     // the prefix K/V (set_prefix), into BlockGradsT::prefix_k / _v
};

// Everything the backward needs; opaque to callers.
template <typename T>
struct BlockTape;
// Frees a tape (std::unique_ptr<BlockTape<T>> calls it: the type is incomplete here).
template <typename T>
void destroy_tape(BlockTape<T>* tape);

}  // namespace qcal::calib

namespace std {
template <typename T>
struct default_delete<qcal::calib::BlockTape<T>> {
  void operator()(qcal::calib::BlockTape<T>* p) const { qcal::calib::destroy_tape(p); }
};
}  // namespace std

namespace qcal::calib {

template <typename T>
class QBlock {
 public:
  QBlock(const ModelConfig& c, const BlockWeightsT<T>* w, const BlockTransformsT<T>* t,
         const BlockQuantSpec* q, const BlockClipT<T>* clip);
  ~QBlock();
  // y (B·T, H) from x (B·T, H). With a tape, saves what backward needs.
  // `hook` sees each linear's (transformed, act-fake-quantized) input, as GPTQ needs.
  // `round_tape`: see RoundTape (finite-difference tests only).
  void forward(const T* x, T* y, int64_t B, int64_t T_, BlockTape<T>* tape = nullptr,
               const LinearInputHook& hook = nullptr, RoundTape<T>* round_tape = nullptr) const;
  // dy (B·T, H) → grads (accumulated into g's transform/clip/weight entries, which
  // are sized on first use; dx overwritten).
  void backward(const BlockTape<T>& tape, const T* dy, BlockGradsT<T>* g,
                const BackwardOptions& opt = {}) const;
  // An IntactKV prefix (methods.md §6) in front of every sequence: k / v (P, n_kv·d)
  // in the cache basis (K after RoPE at positions 0..P−1 and P_k; V as the
  // attention reads it), never quantized. With a prefix the sequence's RoPE
  // positions start at P and every query also attends to the P prefix keys
  // (prefix_attention_fwd). The block keeps the pointers: the arrays must stay
  // alive and unchanged from a forward to its backward. P = 0 (or null k) removes
  // it; without a prefix the block computes exactly what it did before.
  void set_prefix(const T* k, const T* v, int64_t P);
  int64_t prefix_len() const { return prefix_P_; }
  // The effective weights the forward uses for linear p: transformed, LWC-clipped and
  // fake-quantized (what reparameterization would store), (out, in).
  std::vector<T> effective_weight(int p, bool quantized) const;
  // The effective bias of q/k/v (v: per-head transformed). Empty when absent.
  std::vector<T> effective_bias(int p) const;

 private:
  const ModelConfig& c_;
  const BlockWeightsT<T>* w_;
  const BlockTransformsT<T>* t_;
  const BlockQuantSpec* q_;
  const BlockClipT<T>* clip_;
  const T* prefix_k_ = nullptr;
  const T* prefix_v_ = nullptr;
  int64_t prefix_P_ = 0;
};

template <typename T>
std::unique_ptr<BlockTape<T>> make_tape();

}  // namespace qcal::calib

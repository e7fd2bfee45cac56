// The LLaMA-family model (llama, mistral, qwen2) on the CPU in fp32: one
// decoder block's forward (with hooks at every linear input), and a model
// that reads its weights a layer at a time from a ModelDir (FP, GPTQ or
// compressed-tensors; quantized weights are dequantized on load).
//
// Letters: B sequences, T tokens per sequence, H hidden, I intermediate,
// V vocab. Activations are (B*T, H) row-major, sequence-major.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/data.h"
#include "common/model_dir.h"
#include "common/tensor.h"

namespace qcal {

// fp32 weights of one decoder block, HF orientation [out, in].
struct LayerWeights {
  Tensor input_norm;              // (H)
  Tensor q, k, v, o;              // (n_h*d, H), (n_kv*d, H), (n_kv*d, H), (H, n_h*d)
  Tensor q_bias, k_bias, v_bias;  // (n_h*d), (n_kv*d), (n_kv*d); empty when absent
  Tensor post_norm;               // (H)
  Tensor gate, up, down;          // (I, H), (I, H), (H, I)

  // By kProjNames entry ("self_attn.q_proj", ...). Aborts on an unknown name.
  Tensor& proj(const std::string& name);
  const Tensor& proj(const std::string& name) const;
};

// Called with the input of a linear layer just before its matmul.
// `proj` is a kProjNames entry; x is (rows, in).
using LinearInputHook =
    std::function<void(const std::string& proj, const float* x, int64_t rows, int64_t in)>;

// One decoder block over B sequences of T tokens, in place on x (B*T, H).
// Positions restart at 0 for each sequence. Multithreaded through the BLAS.
void block_forward(const ModelConfig& c, const LayerWeights& w, float* x, int64_t B, int64_t T,
                   const LinearInputHook& hook = nullptr);

// Embedding rows read between two drops of the embedding's mapped pages: each
// scattered row also maps up to 64 KiB of neighbours (the kernel's fault-around),
// so at most this many · (row + 64 KiB) of the table is resident at once.
inline constexpr int64_t kEmbedReleaseRows = 32;

class LlamaModel {
 public:
  // Opens an FP or quantized (GPTQ / compressed-tensors) checkpoint.
  static Result<std::unique_ptr<LlamaModel>> open(const std::string& dir);
  const ModelConfig& config() const { return dir_->config(); }
  const ModelDir& dir() const { return *dir_; }
  // Reads (and dequantizes) layer `l`'s weights.
  Result<LayerWeights> load_layer(int64_t l) const;
  // x (B*T, H) = embedding rows of the tokens (reads only those rows).
  Result<Tensor> embed(const TokenSequences& seqs, int64_t first, int64_t count) const;
  // x (n, H) = embedding rows of ids[0..n), read from the mapped file, whose
  // pages are dropped every kEmbedReleaseRows rows. kInvalidInput for an id
  // outside [0, V) (naming its index) or an embedding of the wrong shape or dtype.
  Status embed_rows(const int32_t* ids, int64_t n, float* x) const;
  // In place: final RMSNorm of x (rows, H); then logits (rows, V) = x · lm_headᵀ.
  // Loads the whole lm_head (V, H) in fp32 on first use and keeps it.
  Result<Tensor> logits(const Tensor& x) const;
  // γ (H) of the final RMSNorm.
  Result<Tensor> final_norm() const;
  // out (n, H) = rows [v0, v0 + n) of lm_head (the embedding when tied) in fp32,
  // read from the mapped file (pages dropped again). A quantized lm_head is
  // dequantized whole on first use and kept (as logits() keeps it).
  // kInvalidInput for a range outside [0, V) or a tensor of the wrong shape.
  Status lm_head_rows(int64_t v0, int64_t n, float* out) const;

 private:
  std::unique_ptr<ModelDir> dir_;
  mutable Tensor final_norm_, lm_head_;  // loaded on first use
};

// Runs sequences [first, first+count) through the whole model, layer-major
// (each layer's weights are loaded once and freed), and returns the logits
// (count*T, V). Memory: activations (count*T, H) plus one layer.
Result<Tensor> model_logits(const LlamaModel& m, const TokenSequences& seqs, int64_t first,
                            int64_t count);

// Scalar fp64 reference of the whole model for one sequence (tests only; small
// models): logits (T, V) as doubles. Reads weights through `m`.
Result<std::vector<double>> model_logits_ref(const LlamaModel& m, const int32_t* tokens, int64_t T);

}  // namespace qcal

// The streaming evaluator's tunables and its peak-memory estimate, from shapes
// alone: the coordinator's planner links this without the numerics. The
// evaluator itself is worker/engine/eval.h (evaluate_stream).
//
// Letters: b sequences per batch (min(batch, sequences)), T seqlen, P IntactKV
// prefix tokens, N = b·T rows, Nq = b·(T − P) rows the evaluated model runs,
// H hidden, I intermediate, Q = n_h·d, K = n_kv·d, V vocab, C = min(head_rows,
// V) lm_head rows per chunk, R = min(N, max(1, tile_floats / C)) rows per
// logits tile.
//
// What evaluate_stream holds at its peak (bytes; the eval tokens themselves,
// S·T·4, are the caller's and not counted):
//   activations  (Nq + N)·H·4          the residual streams of the model and of
//                                      the FP reference (N·H·4 without one)
//   + the larger of the two stages that follow each other:
//   layer        one decoder layer as loaded, plus the mapped file pages of the
//                tensor being converted:
//                  float (HF FP)       params·4 + largest projection in the file dtype
//                  packed (GPTQ / CT)  params·4 + largest projection's codes
//                                      (O·I bytes) + packed words (O·I·bits/8)
//                  native              packed codes + scales, plus, at
//                                      a_bits 16, every projection dequantized
//                                      to fp32 (the fake-quantized path); the
//                                      online transforms' Kronecker factors (a
//                                      few MiB) are not counted
//                plus the forward workspace of one group of ≥ 512 rows
//                (n = min(b, ceil(512/T))·T rows):
//                  float / packed      n·(H + max(2Q + 2K, 2I))·4 + attention
//                                      scores min(T, 256)·T·4
//                  native              n·(2H + 2Q + 2K + 2I)·4 + Kronecker
//                                      scratch 2·n·max(H, I)·4 + activation
//                                      codes n·max(H, Q, I)·5 (a_bits < 16) +
//                                      prefix and new K/V 2·(P + T)·K·4 +
//                                      scores T·(P + T)·4
//                with an FP reference, the larger of its layer and the model's.
//   vocab        per model: the lm_head chunk C·H·4 plus one chunk of its file
//                pages C·H·(dtype bytes), the logits tile R·C·4; the stored
//                IntactKV prefix logits P·C·4; per-row statistics N·80.
// The estimate is checked against the measured peak RSS of evaluations in
// tests/unit/test_eval_memory.cc (±25%).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/model_config.h"

namespace qcal {

// Tunables of the streaming evaluator (worker/engine/eval.h evaluate_stream).
struct EvalOptions {
  int64_t batch = 8;         // sequences per forward batch (≥ 1)
  int64_t head_rows = 8192;  // lm_head rows (vocabulary entries) per chunk (≥ 1)
  // Logits per model held at once (≥ 1): a chunk is scored in tiles of
  // max(1, tile_floats / head_rows) rows.
  int64_t tile_floats = int64_t{1} << 22;
};

// How the evaluated model's block weights are stored.
enum class EvalWeights {
  kFloat,   // HF checkpoint with float weights (the FP model itself)
  kPacked,  // HF GPTQ / compressed-tensors: packed integers, dequantized on load
  kNative,  // the native qcal checkpoint (docs/NATIVE_FORMAT.md)
};

struct EvalShape {
  ModelConfig config;  // the evaluated model; torch_dtype = the file's float dtype
  EvalWeights weights = EvalWeights::kFloat;
  int w_bits = 4;        // kPacked / kNative
  int64_t w_group = -1;  // kPacked / kNative; −1 = per output channel
  // kNative: activation bits of the linears; < 16 means inputs quantized per
  // token, so the integer GEMM reads the packed weights as they are.
  int a_bits = 16;
  bool with_fp = true;    // an FP reference model of the same shapes (stored in torch_dtype)
  int64_t sequences = 1;  // evaluation sequences (the batch is at most this many)
  int64_t seqlen = 2048;  // T
  int64_t prefix = 0;     // IntactKV prefix tokens P (kNative), < seqlen
  EvalOptions options;
};

struct EvalMemory {
  uint64_t activations = 0;  // residual streams of both models
  uint64_t layer = 0;        // layer stage: weights as loaded + forward workspace
  uint64_t vocab = 0;        // vocabulary stage: lm_head chunks + logits tiles + statistics
  uint64_t peak() const { return activations + (layer > vocab ? layer : vocab); }
  // {"activations", a} and the larger stage as {"layer", l} or {"vocab", v}:
  // parts whose sum is peak() (the planner's MemoryEstimate parts).
  std::vector<std::pair<std::string, uint64_t>> parts() const;
};

// The estimate above. Non-positive sizes count as 1 (the evaluator refuses them
// before allocating anything).
EvalMemory estimate_eval_memory(const EvalShape& s);

}  // namespace qcal

// The streaming evaluator's peak-memory estimate (see eval_memory.h). Each term
// mirrors an allocation of worker/engine/eval.cc (evaluate_stream), model.cc
// (block_forward, LlamaModel::load_layer), qformats.cc (read_quantized_linear)
// or worker/calib/native.cc (native_block, NativeCheckpoint).
#include "common/eval_memory.h"

#include <algorithm>

#include "common/dtype.h"

namespace qcal {

namespace {

using u64 = uint64_t;

u64 pos(int64_t v) { return v > 0 ? static_cast<u64>(v) : 1; }

// Bytes of one packed native row of `in` codes (two per byte up to 4 bits).
u64 native_row_bytes(int bits, u64 in) { return bits <= 4 ? (in + 1) / 2 : in; }
u64 groups(int64_t group, u64 in) {
  return group > 0 ? (in + static_cast<u64>(group) - 1) / static_cast<u64>(group) : 1;
}

struct Dims {
  u64 H, I, Q, K, V, d;
  u64 proj_out[7], proj_in[7];
  u64 params;    // one layer: seven projections, two norms, q/k/v bias
  u64 max_proj;  // elements of the largest projection
};

Dims dims(const ModelConfig& c) {
  Dims d{};
  d.H = pos(c.hidden_size);
  d.I = pos(c.intermediate_size);
  d.d = pos(c.head_dim);
  d.Q = pos(c.num_attention_heads) * d.d;
  d.K = pos(c.num_key_value_heads) * d.d;
  d.V = pos(c.vocab_size);
  const u64 out[7] = {d.Q, d.K, d.K, d.H, d.I, d.I, d.H};
  const u64 in[7] = {d.H, d.H, d.H, d.Q, d.H, d.H, d.I};
  for (int p = 0; p < 7; ++p) {
    d.proj_out[p] = out[p];
    d.proj_in[p] = in[p];
    d.params += out[p] * in[p];
    d.max_proj = std::max(d.max_proj, out[p] * in[p]);
  }
  d.params += 2 * d.H + (c.attention_bias ? d.Q + 2 * d.K : 0);
  return d;
}

// Rows of one forward group: sequences in groups of >= 512 rows.
u64 group_rows(u64 b, u64 T) { return std::min(b, std::max<u64>(1, (512 + T - 1) / T)) * T; }

// An HF model's layer: LayerWeights in fp32, then the larger of what loading
// one projection adds and block_forward's workspace.
u64 hf_layer(const Dims& d, EvalWeights w, int w_bits, int64_t w_group, u64 file_dtype, u64 b,
             u64 T) {
  const u64 weights = d.params * 4;
  u64 load = d.max_proj * file_dtype;  // the mapped pages of the tensor being converted
  if (w == EvalWeights::kPacked) {
    // read_quantized_linear: one byte per code, the mapped packed words, fp32
    // scales and int32 zeros per (group, row), g_idx.
    load = 0;
    for (int p = 0; p < 7; ++p) {
      const u64 out = d.proj_out[p], in = d.proj_in[p];
      load = std::max(load, out * in + out * in * static_cast<u64>(w_bits) / 8 +
                                groups(w_group, in) * out * 8 + in * 4);
    }
  }
  const u64 n = group_rows(b, T);
  const u64 arena = n * (d.H + std::max(2 * d.Q + 2 * d.K, 2 * d.I)) * 4;
  const u64 attn = std::min<u64>(T, 256) * T * 4 + T * d.d * 4;  // scores, RoPE tables
  return weights + std::max(load, arena + attn);
}

// A native layer: packed codes and scales (or fp32 weights), the dequantized
// copies of the fake-quantized path, and native_block's buffers.
u64 native_layer(const Dims& d, int w_bits, int64_t w_group, int a_bits, u64 b, u64 Tq, u64 P) {
  u64 weights = 2 * d.H * 4;
  for (int p = 0; p < 7; ++p) {
    const u64 out = d.proj_out[p], in = d.proj_in[p];
    weights += w_bits >= 16 ? out * in * 4
                            : out * native_row_bytes(w_bits, in) + out * groups(w_group, in) * 4;
  }
  // Weight-quantized linears whose input is not quantized per token run on the
  // dequantized fp32 weight.
  if (w_bits < 16 && a_bits >= 16) weights += d.params * 4;
  weights += 2 * P * d.K * 4;  // the layer's prefix K/V
  const u64 n = group_rows(b, Tq), S = P + Tq, max_in = std::max({d.H, d.Q, d.I});
  u64 work = n * (2 * d.H + 2 * d.Q + 2 * d.K + 2 * d.I) * 4;  // h, o, q, att, k, v, gate, up
  work += 2 * n * std::max(d.H, d.I) * 4;                      // Kronecker transform scratch
  if (a_bits < 16) work += n * max_in * (1 + 4);               // codes, fake-quantized input
  work += 2 * S * d.K * 4 + Tq * S * 4 + Tq * d.d * 4;         // prefix ; new K/V, scores, RoPE
  return weights + work;
}

}  // namespace

std::vector<std::pair<std::string, uint64_t>> EvalMemory::parts() const {
  if (layer >= vocab) return {{"activations", activations}, {"layer", layer}};
  return {{"activations", activations}, {"vocab", vocab}};
}

EvalMemory estimate_eval_memory(const EvalShape& s) {
  const Dims d = dims(s.config);
  const u64 T = std::max<u64>(2, pos(s.seqlen));
  const u64 P = std::min<u64>(s.prefix > 0 ? static_cast<u64>(s.prefix) : 0, T - 1);
  const u64 b = std::min(pos(s.options.batch), pos(s.sequences));
  const u64 N = b * T, Nq = b * (T - P);
  const u64 file_dtype = dtype_size(s.config.torch_dtype);
  const bool native = s.weights == EvalWeights::kNative;

  EvalMemory m;
  m.activations = Nq * d.H * 4 + (s.with_fp ? N * d.H * 4 : 0) + (P > 0 ? Nq * 4 : 0);

  const u64 q_layer = native ? native_layer(d, s.w_bits, s.w_group, s.a_bits, b, T - P, P)
                             : hf_layer(d, s.weights, s.w_bits, s.w_group, file_dtype, b, T);
  const u64 fp_layer = s.with_fp ? hf_layer(d, EvalWeights::kFloat, 16, -1, file_dtype, b, T) : 0;
  m.layer = std::max(q_layer, fp_layer);

  const u64 C = std::min(pos(s.options.head_rows), d.V);
  const u64 R = std::max<u64>(1, std::min(N, pos(s.options.tile_floats) / C));
  const u64 models = s.with_fp ? 2 : 1;
  const u64 chunk_file = C * d.H * (native ? 4 : file_dtype);  // pages of the chunk being read
  m.vocab = models * (C * d.H * 4 + R * C * 4) + chunk_file + P * C * 4 + N * 80;
  return m;
}

}  // namespace qcal

#include "common/memory_model.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common/safetensors.h"

namespace qcal {

namespace {
constexpr uint64_t kF = 4;  // bytes per fp32
uint64_t u(int64_t v) { return v > 0 ? static_cast<uint64_t>(v) : 0; }
// Elements of the block's largest linear (gate / up / down, or q / o).
uint64_t largest_linear(const MemCtx& m) { return std::max(sat_mul(m.I, m.H), sat_mul(m.Q, m.H)); }
// The process itself: code, libraries, BLAS buffers, allocator slack.

// The streaming assemble (worker/pipeline.cc run_assemble) holds, never at once, one
// block result or one block of head rows. `block`: a result being loaded and written
// (its file's pages and the copy: codes a byte each, scales and zeros, norms and
// biases; the written form replaces the file's pages). `rows`: a block of kHeadRows
// embedding / lm_head rows in fp32 (the grid of its rotation) and the writer's piece
// (kWriteChunkBytes of fp32 rows, or of a copied tensor). `rotate`: the fp64 copies
// the rotation by R1 makes of a block of head rows.
constexpr uint64_t kHeadRows = 4096;  // worker/pipeline.cc kHeadRows
struct AssemblePhases {
  uint64_t block = 0, rows = 0, rotate = 0;
};
AssemblePhases assemble_phases(const MemCtx& m) {
  AssemblePhases a;
  const uint64_t groups =
      m.linear_params / std::max<uint64_t>(1, m.w_group_cols > 0 ? m.w_group_cols : m.max_in);
  a.block = sat_mul(sat_add(sat_add(m.linear_params, sat_mul(groups, 8)),
                            sat_mul(m.block_params - m.linear_params, kF)),
                    2);
  const uint64_t head = sat_mul(std::min(m.V, kHeadRows), m.H);
  a.rows = sat_add(sat_mul(head, kF), std::min(sat_mul(sat_mul(m.V, m.H), kF), kWriteChunkBytes));
  a.rotate = sat_mul(head, 16);
  return a;
}
}  // namespace

uint64_t sat_mul(uint64_t a, uint64_t b) {
  if (a == 0 || b == 0) return 0;
  if (a > std::numeric_limits<uint64_t>::max() / b) return std::numeric_limits<uint64_t>::max();
  return a * b;
}
uint64_t sat_add(uint64_t a, uint64_t b) {
  const uint64_t s = a + b;
  return s < a ? std::numeric_limits<uint64_t>::max() : s;
}

std::string mem_phase_of(const std::string& part) {
  const size_t slash = part.find('/');
  return slash == std::string::npos ? std::string() : part.substr(0, slash);
}

uint64_t mem_peak(const std::vector<MemPart>& parts) {
  uint64_t held = 0;
  std::vector<std::pair<std::string, uint64_t>> phases;
  for (const auto& [name, bytes] : parts) {
    const std::string ph = mem_phase_of(name);
    if (ph.empty()) {
      held = sat_add(held, bytes);
      continue;
    }
    auto it =
        std::find_if(phases.begin(), phases.end(), [&](const auto& p) { return p.first == ph; });
    if (it == phases.end()) {
      phases.push_back({ph, bytes});
    } else {
      it->second = sat_add(it->second, bytes);
    }
  }
  uint64_t most = 0;
  for (const auto& [ph, bytes] : phases) most = std::max(most, bytes);
  return sat_add(held, most);
}

MemCtx mem_ctx(const ModelConfig& c) {
  MemCtx m;
  m.L = u(c.num_hidden_layers);
  m.H = u(c.hidden_size);
  m.I = u(c.intermediate_size);
  m.Q = u(c.q_dim());
  m.K = u(c.kv_dim());
  m.V = u(c.vocab_size);
  m.n_heads = u(c.num_attention_heads);
  m.n_kv = u(c.num_key_value_heads);
  m.head_dim = u(c.head_dim);
  m.linear_params =
      sat_add(sat_add(sat_mul(2 * m.Q, m.H), sat_mul(2 * m.K, m.H)), sat_mul(3 * m.I, m.H));
  m.block_params = m.linear_params + 2 * m.H + (c.attention_bias ? m.Q + 2 * m.K : 0);
  m.max_in = std::max({m.H, m.Q, m.I});
  return m;
}

uint64_t block_forward_bytes(const MemCtx& m, uint64_t tokens, bool quantized) {
  // h, h̃, q, k, v, attention out, o, gate, up, z per token; one sequence's scores.
  uint64_t per_token = 4 * m.H + 3 * m.Q + 3 * m.K + 3 * m.I;
  // q/k/v/gate/up inputs (5·H), the transformed h̃ and m̃, o's and down's inputs, z̃.
  if (quantized) per_token += 7 * m.H + m.Q + 2 * m.I;
  return sat_add(sat_mul(sat_mul(tokens, per_token), kF),
                 sat_mul(sat_mul(m.n_heads, sat_mul(m.T, m.T)), kF));
}

uint64_t block_train_bytes(const MemCtx& m, uint64_t tokens, bool transformed_weights) {
  // The tape (qblock.cc BlockTape): x, h, h̃, x1, m, m̃ (H); q (×2), a, ã (Q);
  // k (×3), v (×2) (K); gate, up, z, z̃ (I); the act-quantized inputs of the seven
  // linears; and the probabilities (n_h, T, T) per sequence.
  const uint64_t per_token = 8 * m.H + 5 * m.Q + 6 * m.K + 6 * m.I;
  const uint64_t seqs = m.T > 0 ? (tokens + m.T - 1) / m.T : 0;
  uint64_t b = sat_mul(sat_mul(tokens, per_token), kF);
  b = sat_add(b, sat_mul(sat_mul(seqs, sat_mul(m.n_heads, sat_mul(m.T, m.T))), kF));
  // The backward's gradients of the same activations (dx of every stage, reused).
  b = sat_add(b, sat_mul(sat_mul(tokens, 2 * m.H + m.Q + 2 * m.I), kF));
  // Weights (qblock.cc weight_forward): the fake-quantized copy W4 and, when transforms
  // act on the weights, the transformed W3 (otherwise W3 is the caller's weights). The
  // weight path's row chunks (the dW chunk, its swap buffer and the diagonal's rows:
  // qblock.cc chunk_rows, about 4M elements each) are reused across linears. Measured
  // (tests/unit/test_memory_model.cc, h1024w: weights dominate): these copies, not the
  // four this term used to count.
  b = sat_add(b, sat_mul(sat_mul(m.linear_params, transformed_weights ? 2 : 1), kF));
  b = sat_add(b, sat_mul(sat_mul(std::min<uint64_t>(largest_linear(m), uint64_t{1} << 22), 3), kF));
  return b;
}

// One deploy of a block (worker/calib/block.cc deploy_block): the fp64 copy of the
// block and, for one linear at a time, the effective weight's two fp64 stages
// (QBlock::effective_weight; its fp32 conversion comes after the first is freed).
uint64_t deploy_block_bytes(const MemCtx& m) {
  return sat_add(sat_mul(m.block_params, 8), sat_mul(largest_linear(m), 16));
}

void memory_terms_core(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  const uint64_t mt = sat_mul(m.micro, m.T);
  const uint64_t block = sat_mul(m.block_params, kF);
  parts->push_back({"process", kProcessBaseBytes});
  if (task == "embed") {
    parts->push_back({"tokens", sat_mul(sat_mul(m.N, m.T), 4)});
    parts->push_back({"activations", sat_mul(sat_mul(mt, m.H), kF)});
    // Embedding rows read through the mmap: the pages of the (V, H) bf16 table that
    // N·T uniformly drawn tokens touch, table·(1 − e^(−tokens / pages)) (rows of
    // H < 2048 share a page; measured with the file cached; real text, drawing
    // frequent tokens, touches fewer).
    const double table = static_cast<double>(sat_mul(m.V, sat_mul(m.H, 2)));
    const double pages = std::max(1.0, table / 4096.0);
    const double touched =
        table * (1.0 - std::exp(-static_cast<double>(sat_mul(m.N, m.T)) / pages));
    parts->push_back({"embeddings", static_cast<uint64_t>(std::min(table, touched))});
  } else if (task == "capture") {
    parts->push_back({"weights", block});
    parts->push_back({"activations", sat_mul(sat_mul(2 * mt, m.H), kF)});
    parts->push_back({"forward", block_forward_bytes(m, mt)});
  } else if (task == "transform") {
    parts->push_back({"weights", block});
    parts->push_back(
        {"activations", sat_mul(sat_mul(sat_mul(4, m.train_micro), m.T), sat_mul(m.H, kF))});
  } else if (task == "quantize") {
    // Held through the task: the deployed weights. Deploying: the checkpoint's block
    // while the deployed one is built (freed after). Rounding: the deployed FP copy
    // (the output check, IntactKV's prefix), the codes (a byte each) and the block
    // result's copy of them (a solver's phases repeat these: see memory_terms_gptq).
    parts->push_back({"weights", block});
    parts->push_back({"deploy/checkpoint", block});
    parts->push_back({"round/fp copy", block});
    parts->push_back({"round/codes", sat_mul(m.linear_params, 2)});
  } else if (task == "cbq-window") {
    const uint64_t k = std::max<uint64_t>(1, m.window);
    // Deploying a block: the checkpoint's block while its deployed copy is built, beside
    // the blocks of the window deployed before it (the method's deploy terms add its
    // working copies). Training: per block the deployed weights (the FP targets, the
    // IntactKV prefix), the CFP base and Ŵ, and per linear the weight gradient (LoRA's
    // V0 and step sizes are per row·group or rank-sized). Measured (h1024w: weights
    // dominate) 4.7–5.1 block copies per block with the tape's W4 (memory_terms_cbq).
    parts->push_back({"deploy/checkpoint", block});
    parts->push_back({"deploy/blocks before", sat_mul(k - 1, block)});
    parts->push_back(
        {"train/weights", sat_mul(k, sat_add(sat_mul(block, 3), sat_mul(m.linear_params, kF)))});
    const uint64_t chunk = sat_mul(sat_mul(m.train_micro, m.T), sat_mul(m.H, kF));
    parts->push_back({"train/activations", sat_mul(chunk, k + 6)});
  } else if (task == "assemble") {
    // One block result, or the head rows beyond its bytes (the phases never overlap).
    const AssemblePhases a = assemble_phases(m);
    parts->push_back({"block", a.block});
    parts->push_back({"rows", a.rows > a.block ? a.rows - a.block : 0});
  }
}

void memory_terms_rotation(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  if (task == "assemble") {
    // R1 (H×H) in fp64, and what the rotation's fp64 copies add to the head rows'
    // phase beyond the larger of the two phases (memory_terms_core).
    const AssemblePhases a = assemble_phases(m);
    const uint64_t without = std::max(a.block, a.rows);
    const uint64_t with = std::max(a.block, sat_add(a.rows, a.rotate));
    parts->push_back({"rotation", sat_add(sat_mul(sat_mul(m.H, m.H), 8), with - without)});
    return;
  }
  // R1 (H×H) in fp64; deploying a block: deploy_block's fp64 copy (the rotated fp32
  // copy becomes the deployed weights).
  if (task == "quantize" || task == "cbq-window") {
    parts->push_back({"rotation", sat_mul(sat_mul(m.H, m.H), 8)});
    parts->push_back({"deploy/rotation", deploy_block_bytes(m)});
  } else if (task == "transform") {
    parts->push_back({"rotation", sat_mul(sat_mul(m.H, m.H), 8)});
  }
}

void memory_terms_spinquant(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  memory_terms_rotation(m, task, parts);
  if (task != "learn") return;
  // The whole model in fp32 three times (base, rotated copy, gradients), its tape for a
  // batch of spin_bsz sequences through every layer, and R1 with its gradient in fp64.
  const uint64_t model = sat_mul(sat_add(sat_mul(m.L, m.block_params), sat_mul(2 * m.V, m.H)), kF);
  parts->push_back({"model", sat_mul(model, 3)});
  parts->push_back(
      {"tape", sat_mul(m.L, block_train_bytes(m, sat_mul(m.train_micro, m.T), false))});
  parts->push_back({"logits", sat_mul(sat_mul(sat_mul(m.train_micro, m.T), m.V), 2 * kF)});
  parts->push_back({"rotation", sat_mul(sat_mul(m.H, m.H), 3 * 8)});
}

void memory_terms_flatquant(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  if (task == "transform") {
    const uint64_t tokens = sat_mul(m.train_micro, m.T);
    parts->push_back({"training", block_train_bytes(m, tokens, true)});
    // Measured (tests/unit/test_memory_model.cc): its backward also holds the
    // probabilities' and the scores' gradients, (n_h, T, T) each per sequence.
    const uint64_t seqs = m.T > 0 ? (tokens + m.T - 1) / m.T : 0;
    parts->push_back(
        {"attention grads", sat_mul(sat_mul(seqs, sat_mul(m.n_heads, sat_mul(m.T, m.T))), 2 * kF)});
  }
  // The fp64 reparameterization of a block (deploy_block).
  if (task == "quantize" || task == "cbq-window")
    parts->push_back({"deploy/reparameterization", deploy_block_bytes(m)});
}

void memory_terms_gptq(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  // cbq-window: gptq with a reconstruction rounds each fresh block of the window with
  // GPTQ first (cbq.h CbqOptions::gptq_init), one block's Hessians at a time: one fp32
  // Hessian per linear of the largest true-sequential group and the solver's buffers.
  if (task == "cbq-window") {
    const uint64_t groups = std::max({sat_mul(3 * m.H, m.H), sat_mul(m.Q, m.Q), sat_mul(m.I, m.I)});
    parts->push_back({"hessian", sat_mul(groups, kF)});
    parts->push_back({"solver", sat_mul(sat_mul(m.max_in, m.max_in), 16)});
    return;
  }
  if (task != "quantize") return;
  const uint64_t mt = sat_mul(m.micro, m.T);
  // Streaming the block for a group's Hessians: the micro-batch in and out, the
  // forward's working set, one fp32 Hessian sum per linear of the largest
  // true-sequential group (q/k/v: 3·H², o: Q², gate/up: 2·H², down: I²).
  // Each phase also holds the deployed FP copy and the codes of the linears done.
  const uint64_t fp_copy = sat_mul(m.block_params, kF);
  const uint64_t group = std::max({sat_mul(3 * m.H, m.H), sat_mul(m.Q, m.Q), sat_mul(m.I, m.I)});
  parts->push_back({"stream/fp copy", fp_copy});
  parts->push_back({"stream/codes", m.linear_params});
  parts->push_back({"stream/activations", sat_mul(sat_mul(2 * mt, m.H), kF)});
  const bool aq = m.a_bits < 16;
  parts->push_back({"stream/forward", block_forward_bytes(m, mt, aq)});
  parts->push_back({"stream/hessian", sat_mul(group, kF)});
  // Solving the widest linear (worker/engine/gptq.h): H with its fp64 factor, then the
  // factor with the fp32 U (12·in²), the solver's copy of W and its codes; for q the
  // Hessians of k and v wait.
  const uint64_t down = sat_add(sat_mul(sat_mul(m.I, m.I), 12), sat_mul(sat_mul(m.I, m.H), 6));
  const uint64_t q =
      sat_add(sat_mul(sat_mul(m.H, m.H), 12 + 2 * kF), sat_mul(sat_mul(m.Q, m.H), 6));
  parts->push_back({"solve/fp copy", fp_copy});
  parts->push_back({"solve/codes", m.linear_params});
  parts->push_back({"solve/solver", std::max(down, q)});
  // The output check: the input, quantized and FP outputs of a micro-batch, and a forward.
  parts->push_back({"check/fp copy", fp_copy});
  parts->push_back({"check/codes", sat_mul(m.linear_params, 2)});
  parts->push_back({"check/activations", sat_mul(sat_mul(3 * mt, m.H), kF)});
  parts->push_back({"check/forward", block_forward_bytes(m, mt, aq)});
}

void memory_terms_cbq(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  if (task != "cbq-window") return;
  const uint64_t k = std::max<uint64_t>(1, m.window);
  const uint64_t tokens = sat_mul(m.train_micro, m.T);
  parts->push_back({"train/training", sat_mul(k, block_train_bytes(m, tokens, false))});
  if (m.gptq_start) {
    // GPTQ's codes, a byte per weight (cbq.h CbqBlockParams::cell): the window's blocks,
    // the carried block read from the previous window and the one written for the next.
    parts->push_back({"train/gptq codes", sat_mul(k + 2, m.linear_params)});
  }
  if (m.head && m.V > 0) {
    // The logit loss (cbq.cc head_loss_acc): the FP final norm and lm_head, and per chunk
    // of rc ≤ max(1, 2^22 / V) rows two logit arrays and four normalized / gradient rows.
    parts->push_back({"head", sat_mul(sat_add(sat_mul(m.V, m.H), m.H), kF)});
    const uint64_t rc = std::max<uint64_t>(1, std::min(tokens, (uint64_t{1} << 22) / m.V));
    parts->push_back({"train/head logits", sat_mul(rc, sat_mul(sat_add(2 * m.V, 4 * m.H), kF))});
  }
}

void memory_terms_intactkv(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts) {
  if (task == "learn") {
    // +Cal: the float weights of the quantized model and of its FP twin (measured by
    // tests/unit/test_memory_model.cc: four fp32 copies of the model at the peak, not
    // the two these need), one sequence's residual streams through every layer and one
    // layer's tape.
    const uint64_t model =
        sat_mul(sat_add(sat_mul(m.L, m.block_params), sat_mul(2 * m.V, m.H)), kF);
    parts->push_back({"model", sat_mul(model, 4)});
    parts->push_back({"streams", sat_mul(sat_mul(m.L + 1, m.T), sat_mul(m.H, kF))});
    parts->push_back({"tape", block_train_bytes(m, m.T, false)});
  }
}

}  // namespace qcal

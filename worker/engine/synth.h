// Deterministic synthetic LLaMA-architecture checkpoints in HF format
// (`qcal synth`), with optional function-preserving outlier injection, which
// also applies to an existing checkpoint (inject_outliers, `qcal inject-outliers`).
//
// Letters: H hidden, I intermediate, V vocab, L layers, n_h query heads,
// n_kv key/value heads, d head_dim. Weights are HF orientation [out, in].
//
// ---- Random streams (what makes a file reproducible) ----
// Every tensor has its own stream, so a tensor's values depend only on the
// seed, its name and its own shape, never on the shapes or order of others:
//   key(name)      = FNV-1a-64 over the 8 little-endian bytes of `seed`
//                    followed by the bytes of `name`;
//   row_seed(r)    = mix64(key(name) ^ mix64(r)), mix64 = the SplitMix64 step;
//   element (r, c) = the c-th draw of Rng(row_seed(r)) (common/rng.h),
// where a 1-D tensor is one row. Rows are generated in parallel; the bits do
// not depend on the thread count. Outlier channels and the prior direction
// below use the same scheme with the pseudo-names "qcal.synth.outliers.norm",
// ".up", ".v" and "qcal.synth.prior_direction".
//
// ---- Initialization (keeps the residual stream O(1) through any depth and
// gives a non-trivial function, so that quantization damage is measurable) ----
//   q/k/v/gate/up_proj   N(0, 1/in)                 (outputs have unit variance)
//   o_proj, down_proj    N(0, 1/in) / sqrt(2L)      (2L residual adds stay O(1))
//   q/k/v bias (qwen2)   N(0, 0.2²)
//   input/post-attention/final RMSNorm γ   U[0.9, 1.1]  (never trivially 1)
// Untied embeddings (the default):
//   embed_tokens[t] = ε_t + sqrt(H)·u        ε_t ~ N(0, I_H) projected ⊥ u
//   lm_head[t]      = (kSynthLogitScale·sqrt(2/H))·r_t + (b_t / P)·u
//                     r_t ~ N(0, I_H) projected ⊥ u, P = sqrt(H / 2.4)
// where u is a fixed random unit vector and b_t = −kSynthZipfExponent·ln(t+1)
// (centered over the vocab). The embeddings share a constant component along
// u, which the residual stream carries to the final norm (there x·u ≈ P at
// every position: 2.4 = token part 1 + prior part 1 + ~0.4 from the blocks),
// so lm_head adds the log-prior b_t of the Zipf law that synth_tokens()
// samples: the model "knows" the unigram distribution, and its perplexity on
// synth_tokens() data is well below V (measured: V = 257 → ~110, 1024 → ~165,
// 4096 → ~350, 8192 → ~420), while the context-dependent part of the logits
// has standard deviation ≈ kSynthLogitScale (measured 1.6).
// Tied embeddings: one matrix cannot carry a prior without letting every
// position predict its own token, so embed_tokens ~ N(0, 1/H) and the logits
// are the plain context part (std ≈ 1); their perplexity on Zipf data is
// about V or more (V = 1024 → ~1600): use them for format coverage, not for
// quality numbers.
//
// ---- Outlier injection (OutlierOptions) ----
// One set of channels per kind, drawn without replacement from the seed and
// shared by every layer (as real outlier channels are). All rescaling is done
// in fp64 before rounding to the storage dtype, and every factor α on one side
// of a product is undone by 1/α on the other, so the function is unchanged:
//   norm: γ_j ×α in input_layernorm and post_attention_layernorm; columns j
//         of q/k/v_proj (after the first) and gate/up_proj (after the second) ÷α.
//         The RMSNorm outputs (inputs of q/k/v/gate/up) get outlier channels.
//   up:   up_proj row j ×α; down_proj column j ÷α. Input of down_proj.
//   v:    v_proj row j ×α (and v bias j); for j = g·d + p (KV head g,
//         position p) o_proj column h·d + p ÷α for every query head h with
//         h / (n_h / n_kv) == g. Input of o_proj.
// In F32 storage the logits match the original to float rounding (measured
// max |Δ| = 3e-7 · max |logit|). In F16/BF16 the rescaled weights round
// differently from the unscaled ones (BF16: up to ~0.4% per weight), so the
// function is preserved only to storage precision (measured for BF16,
// α = 20: max |Δ| = 5e-4 · max |logit|).
// Tensors that no injection touches are bit-identical to the uninjected model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/model_config.h"
#include "common/status.h"

namespace qcal {

// The Zipf exponent s of synth_tokens(): p(t) ∝ (t+1)^-s. Also the exponent of
// the log-prior built into untied synthetic models.
inline constexpr double kSynthZipfExponent = 1.2;
// Standard deviation of the context-dependent part of untied models' logits.
inline constexpr double kSynthLogitScale = 1.5;

struct OutlierOptions {
  // Number of channels to scale in each place (0 = off), and the factor α.
  int64_t norm_channels = 0;  // input/post-attention RMSNorm γ ×α, next projections' columns ÷α
  int64_t up_channels = 0;    // up_proj rows ×α, down_proj columns ÷α
  int64_t v_channels = 0;  // v_proj rows ×α, matching o_proj columns ÷α (all heads of the group)
  double alpha = 20.0;
  bool any() const { return norm_channels > 0 || up_channels > 0 || v_channels > 0; }
};

struct SynthOptions {
  ModelConfig config;  // shapes; torch_dtype is the storage dtype
  uint64_t seed = 1;
  OutlierOptions outliers;
  uint64_t max_shard_bytes = 2ull << 30;
  bool overwrite = false;
};

// Writes config.json, model.safetensors (or shards + index) and
// generation_config.json to `out_dir`, atomically. Weights are drawn from a
// fixed-seed generator with scales that keep activations O(1) through depth;
// the same options give byte-identical files. Tensors are generated and
// written one at a time (memory stays at one tensor).
//
// Config defaults: num_key_value_heads 0 means n_h; head_dim 0 means H / n_h.
// config.json states both explicitly. Tensors are laid out in model order
// (embed, layer 0 .. L-1, norm, lm_head); above `max_shard_bytes` they are
// split greedily into `model-0000k-of-0000n.safetensors` (a tensor larger than
// the limit gets a shard of its own) listed in `model.safetensors.index.json`.
// Every shard's metadata holds {"format": "pt", "qcal.synth": <seed, α and
// the injected channels as JSON>}.
//
// Errors: kInvalidInput for bad options (the message names the field: unknown
// model_type, non-positive sizes, heads not dividing hidden without head_dim,
// kv heads not dividing heads, odd head_dim, storage dtype not
// float32/float16/bfloat16, token ids outside the vocab, more outlier channels
// than the dimension has, α not positive and finite, max_shard_bytes 0) and
// when `out_dir` exists and !overwrite; kIoError from the filesystem. On error
// nothing appears at `out_dir` and the staging directory is removed.
// Thread safety: concurrent calls are safe for distinct `out_dir`s. Uses up
// to blas_threads() threads for generation; peak memory is the largest
// tensor in fp32 (embed_tokens / lm_head: V·H·4 bytes) plus small buffers.
Status synth_model(const SynthOptions& opts, const std::string& out_dir);

// The channels synth_model() injects for `opts`, each list sorted ascending:
// norm in [0, H), up in [0, I), v in [0, n_kv·d). Empty lists when off.
// Same validation and errors as synth_model().
struct OutlierChannels {
  std::vector<int64_t> norm;
  std::vector<int64_t> up;
  std::vector<int64_t> v;
};
Result<OutlierChannels> synth_outlier_channels(const SynthOptions& opts);

// The channels of `opts` for a model of (resolved) config `c`, drawn from
// `seed` exactly as synth_model() draws them (so a synthetic model and its
// injection share them). kInvalidInput as synth_model() for bad counts / α.
Result<OutlierChannels> outlier_channels(const ModelConfig& c, const OutlierOptions& opts,
                                         uint64_t seed);

// `qcal inject-outliers`: writes to `out_dir` (atomically, like synth_model)
// the FP checkpoint at `in_dir` with the outlier injection above applied:
// the channels of outlier_channels(config, opts, seed), the same factors as
// synth_model() (one definition serves both), each rescaled tensor read as
// fp32, multiplied in fp64 and rounded once to its own storage dtype.
// Tensors no injection touches are copied byte for byte (as are tensors the
// recipe does not know); config.json and the other non-weight files of the
// input are copied; the output is one model.safetensors unless the input was
// sharded (then shards of ≤ 2 GiB). Shard metadata: {"format": "pt",
// "qcal.outliers": {seed, α and the channels as JSON}}.
// Injecting into synth_model(seed, no outliers) reproduces synth_model(seed,
// opts) up to one extra rounding per rescaled weight (F32: ≤ 1 ulp).
// Errors: kInvalidInput for a quantized or incomplete input, no channels
// requested, bad counts / α, `out_dir` existing without `overwrite`;
// kNotFound / kCorrupt from reading the input; kIoError from the filesystem.
// On error nothing appears at `out_dir`. Memory: one tensor in fp32.
Status inject_outliers(const std::string& in_dir, const OutlierOptions& opts, uint64_t seed,
                       const std::string& out_dir, bool overwrite = false);

// Random token stream (for demos and tests): `count` ids in [0, vocab), with
// a Zipf-like skew so that frequent tokens exist: independent draws with
// p(t) ∝ (t+1)^-kSynthZipfExponent (token 0 is the most frequent). Stream:
// Rng(mix64(FNV-1a-64(seed bytes ‖ "qcal.synth.tokens"))). Empty when
// count <= 0 or vocab <= 0. Memory: O(vocab) for the CDF table.
std::vector<int32_t> synth_tokens(int64_t count, int64_t vocab, uint64_t seed);

}  // namespace qcal

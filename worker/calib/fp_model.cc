// The whole FP model in memory (fp_model.h): HF I/O through the engine's
// LlamaModel and the safetensors writer, and the differentiable whole-model
// forward / backward built from calib::QBlock<float>.
//
// Letters: B sequences, T tokens per sequence, N = B·T rows, H hidden,
// V vocab, L layers. Gradients follow kernels/grad.h: parameter gradients
// accumulate (+=); activation gradients are overwritten.
#include "worker/calib/fp_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <utility>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/safetensors.h"
#include "kernels/grad.h"
#include "worker/engine/model.h"

namespace qcal::calib {

namespace {

// Removes the staging directory unless it was published.
struct StagingGuard {
  std::string path;
  ~StagingGuard() {
    std::error_code ec;
    if (!path.empty()) std::filesystem::remove_all(path, ec);
  }
};

Status check_size(const std::string& what, const std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) != n)
    return invalid_input("write_fp_model: " + what + " has " + std::to_string(v.size()) +
                         " values, the config implies " + std::to_string(n));
  return Status::ok();
}

// (N, H) rows of the embedding for the tokens.
void embed_rows(const FpModel& m, const int32_t* tokens, int64_t N, float* x) {
  const int64_t H = m.config.hidden_size, V = m.config.vocab_size;
  for (int64_t r = 0; r < N; ++r) {
    QCAL_CHECK(tokens[r] >= 0 && tokens[r] < V);
    std::copy_n(m.embed.data() + static_cast<int64_t>(tokens[r]) * H, H, x + r * H);
  }
}

// The block of layer l under its plan (nullptrs = FP: empty transforms,
// quantizers off, no clip parameters).
struct PlannedBlock {
  static inline const BlockTransformsT<float> kNoTransforms{};
  static inline const BlockQuantSpec kNoQuant{};
  static inline const BlockClipT<float> kNoClip{};
  QBlock<float> block;
  PlannedBlock(const FpModel& m, int64_t l, const std::vector<LayerPlan>* plans)
      : block(m.config, &m.layers[static_cast<size_t>(l)], t_of(plans, l), q_of(plans, l),
              clip_of(plans, l)) {}
  static const LayerPlan* plan(const std::vector<LayerPlan>* plans, int64_t l) {
    return plans ? &(*plans)[static_cast<size_t>(l)] : nullptr;
  }
  static const BlockTransformsT<float>* t_of(const std::vector<LayerPlan>* plans, int64_t l) {
    const LayerPlan* p = plan(plans, l);
    return p && p->t ? p->t : &kNoTransforms;
  }
  static const BlockQuantSpec* q_of(const std::vector<LayerPlan>* plans, int64_t l) {
    const LayerPlan* p = plan(plans, l);
    return p && p->q ? p->q : &kNoQuant;
  }
  static const BlockClipT<float>* clip_of(const std::vector<LayerPlan>* plans, int64_t l) {
    const LayerPlan* p = plan(plans, l);
    return p && p->clip ? p->clip : &kNoClip;
  }
};

void check_model(const FpModel& m, const std::vector<LayerPlan>* plans) {
  const ModelConfig& c = m.config;
  QCAL_CHECK(static_cast<int64_t>(m.layers.size()) == c.num_hidden_layers);
  QCAL_CHECK(static_cast<int64_t>(m.embed.size()) == c.vocab_size * c.hidden_size);
  QCAL_CHECK(static_cast<int64_t>(m.lm_head.size()) == c.vocab_size * c.hidden_size);
  QCAL_CHECK(static_cast<int64_t>(m.final_norm.size()) == c.hidden_size);
  QCAL_CHECK(!plans || static_cast<int64_t>(plans->size()) == c.num_hidden_layers);
}

void accumulate(std::vector<float>* dst, const std::vector<float>& src) {
  if (dst->empty()) dst->assign(src.size(), 0.0f);
  QCAL_CHECK(dst->size() == src.size());
  for (size_t i = 0; i < src.size(); ++i) (*dst)[i] += src[i];
}

}  // namespace

// ---------------------------------------------------------------- I/O

Result<FpModel> load_fp_model(const std::string& dir) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> lm, LlamaModel::open(dir));
  const ModelDir& md = lm->dir();
  if (md.quantization_config())
    return invalid_input(dir + " is a quantized checkpoint; load_fp_model reads FP models");
  QCAL_RETURN_IF_ERROR(md.validate_fp_model());
  FpModel m;
  m.config = md.config();
  const ModelConfig& c = m.config;
  const std::vector<int64_t> vh = {c.vocab_size, c.hidden_size};
  QCAL_ASSIGN_OR_RETURN(Tensor embed, md.read_f32("model.embed_tokens.weight", vh));
  QCAL_ASSIGN_OR_RETURN(Tensor norm, md.read_f32("model.norm.weight", {c.hidden_size}));
  m.embed = std::move(embed.data);
  m.final_norm = std::move(norm.data);
  if (c.tie_word_embeddings) {
    m.lm_head = m.embed;
  } else {
    QCAL_ASSIGN_OR_RETURN(Tensor head, md.read_f32("lm_head.weight", vh));
    m.lm_head = std::move(head.data);
  }
  m.layers.reserve(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    QCAL_ASSIGN_OR_RETURN(LayerWeights w, lm->load_layer(l));
    m.layers.push_back(to_block_weights(std::move(w)));
  }
  return m;
}

Status write_fp_model(const FpModel& m, const std::string& dir, bool overwrite) {
  const ModelConfig& c = m.config;
  if (dir.empty()) return invalid_input("write_fp_model: output directory is empty");
  if (!is_float_dtype(c.torch_dtype))
    return invalid_input(std::string("write_fp_model: torch_dtype ") + dtype_name(c.torch_dtype) +
                         " is not a float storage dtype");
  // The config must parse back (sizes, heads, ...).
  QCAL_ASSIGN_OR_RETURN(ModelConfig parsed, parse_model_config(c.to_json(), "write_fp_model"));
  (void)parsed;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  QCAL_RETURN_IF_ERROR(check_size("embed", m.embed, V * H));
  QCAL_RETURN_IF_ERROR(check_size("final_norm", m.final_norm, H));
  if (!c.tie_word_embeddings) QCAL_RETURN_IF_ERROR(check_size("lm_head", m.lm_head, V * H));
  if (static_cast<int64_t>(m.layers.size()) != c.num_hidden_layers)
    return invalid_input("write_fp_model: " + std::to_string(m.layers.size()) +
                         " layers, the config says " + std::to_string(c.num_hidden_layers));

  // Every tensor in model order (embed, layers, norm, lm_head), as synth_model lays them out.
  struct Entry {
    std::string name;
    std::vector<int64_t> shape;
    const std::vector<float>* data;
  };
  std::vector<Entry> entries;
  entries.push_back({"model.embed_tokens.weight", {V, H}, &m.embed});
  const char* const bias_names[3] = {"self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                     "self_attn.v_proj.bias"};
  const bool bias = !m.layers.empty() && !m.layers[0].bias[0].empty();
  if (c.attention_bias && !bias)
    return invalid_input("write_fp_model: the config has attention_bias but the layers have none");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const BlockWeightsT<float>& w = m.layers[static_cast<size_t>(l)];
    const std::string p = layer_prefix(l);
    QCAL_RETURN_IF_ERROR(check_size(p + "input_layernorm", w.input_norm, H));
    QCAL_RETURN_IF_ERROR(check_size(p + "post_attention_layernorm", w.post_norm, H));
    entries.push_back({p + "input_layernorm.weight", {H}, &w.input_norm});
    for (int j = 0; j < kNumProj; ++j) {
      const std::vector<int64_t> shape = proj_shape(c, kProjNames[j]);
      QCAL_RETURN_IF_ERROR(check_size(p + kProjNames[j], w.w[j], shape[0] * shape[1]));
      entries.push_back({p + kProjNames[j] + ".weight", shape, &w.w[j]});
      if (j < 3 && bias) {
        QCAL_RETURN_IF_ERROR(check_size(p + bias_names[j], w.bias[j], shape[0]));
        entries.push_back({p + bias_names[j], {shape[0]}, &w.bias[j]});
      }
      if (j == kO) entries.push_back({p + "post_attention_layernorm.weight", {H}, &w.post_norm});
    }
  }
  entries.push_back({"model.norm.weight", {H}, &m.final_norm});
  if (!c.tie_word_embeddings) entries.push_back({"lm_head.weight", {V, H}, &m.lm_head});

  if (path_exists(dir) && !overwrite)
    return invalid_input(dir + " already exists (pass overwrite to replace it)");
  QCAL_ASSIGN_OR_RETURN(std::string staging, make_staging_dir(dir));
  StagingGuard guard{staging};
  {
    SafetensorsWriter w(join_path(staging, "model.safetensors"));
    w.set_metadata("format", "pt");
    for (const Entry& e : entries) w.add(e.name, c.torch_dtype, e.shape);
    QCAL_RETURN_IF_ERROR(w.begin());
    for (const Entry& e : entries)
      QCAL_RETURN_IF_ERROR(w.write_f32(e.data->data(), e.data->size()));
    QCAL_RETURN_IF_ERROR(w.finish());
  }
  const nlohmann::json cj = c.to_json();
  QCAL_RETURN_IF_ERROR(write_file_atomic(join_path(staging, "config.json"), cj.dump(2) + "\n"));
  nlohmann::json gj = {{"_from_model_config", true},
                       {"bos_token_id", c.bos_token_id},
                       {"eos_token_id", c.eos_token_id}};
  QCAL_RETURN_IF_ERROR(
      write_file_atomic(join_path(staging, "generation_config.json"), gj.dump(2) + "\n"));
  QCAL_RETURN_IF_ERROR(publish_dir(staging, dir, overwrite));
  guard.path.clear();  // renamed into place
  return Status::ok();
}

// ---------------------------------------------------------------- forward

// The whole forward of B sequences of T tokens: x the last block's output (N, H), y
// its normalized form, inv_rms the final norm's 1/rms per row, logits (N, V). With
// `tapes`, one per block (what a backward needs).
struct ModelForward {
  std::vector<float> x, y, inv_rms, logits;
};
ModelForward model_forward(const FpModel& m, const int32_t* tokens, int64_t B, int64_t T,
                           const std::vector<LayerPlan>* plans,
                           std::vector<std::unique_ptr<BlockTape<float>>>* tapes) {
  check_model(m, plans);
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, N = B * T;
  ModelForward f;
  f.x.resize(static_cast<size_t>(N * H));
  f.y.resize(f.x.size());
  embed_rows(m, tokens, N, f.x.data());
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    PlannedBlock pb(m, l, plans);
    if (tapes) tapes->push_back(make_tape<float>());
    pb.block.forward(f.x.data(), f.y.data(), B, T, tapes ? tapes->back().get() : nullptr);
    std::swap(f.x, f.y);
  }
  f.inv_rms.resize(static_cast<size_t>(N));
  rmsnorm_fwd<float>(f.y.data(), f.x.data(), m.final_norm.data(), N, H,
                     static_cast<float>(c.rms_norm_eps), f.inv_rms.data());
  f.logits.resize(static_cast<size_t>(N * V));
  gemm_t(false, true, N, V, H, 1.0f, f.y.data(), H, m.lm_head.data(), H, 0.0f, f.logits.data(), V);
  return f;
}

std::vector<float> fp_model_logits(const FpModel& m, const int32_t* tokens, int64_t B, int64_t T,
                                   const std::vector<LayerPlan>* plans) {
  return model_forward(m, tokens, B, T, plans, nullptr).logits;
}

// ---------------------------------------------------------------- loss and backward

double fp_model_loss(const FpModel& m, const int32_t* tokens, int64_t B, int64_t T,
                     FpModelGrads* grads, const std::vector<LayerPlan>* plans) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, N = B * T, L = c.num_hidden_layers;
  QCAL_CHECK(B > 0 && T > 1);

  // Forward, with a tape per block when a backward follows.
  std::vector<std::unique_ptr<BlockTape<float>>> tapes;
  const ModelForward f = model_forward(m, tokens, B, T, plans, grads ? &tapes : nullptr);
  const std::vector<float>&x = f.x, &y = f.y, &inv_rms = f.inv_rms, &logits = f.logits;
  // Row s·T + t predicts token t + 1 of sequence s; the last row of each is not scored.
  std::vector<int32_t> targets(static_cast<size_t>(N));
  for (int64_t s = 0; s < B; ++s)
    for (int64_t t = 0; t < T; ++t)
      targets[static_cast<size_t>(s * T + t)] = t + 1 < T ? tokens[s * T + t + 1] : -1;
  std::vector<float> dlogits(grads ? logits.size() : 0);
  const double loss = cross_entropy_fwd_bwd<float>(logits.data(), targets.data(), N, V,
                                                   grads ? dlogits.data() : nullptr);
  if (!grads) return loss;

  // Head: logits = y · lm_headᵀ.
  std::vector<float> d_head(static_cast<size_t>(V * H), 0.0f);  // (V, H)
  gemm_t(true, false, V, H, N, 1.0f, dlogits.data(), V, y.data(), H, 0.0f, d_head.data(), H);
  std::vector<float> dy(static_cast<size_t>(N * H));  // (N, H) d(normalized)
  gemm_t(false, false, N, H, V, 1.0f, dlogits.data(), V, m.lm_head.data(), H, 0.0f, dy.data(), H);
  if (grads->final_norm.empty()) grads->final_norm.assign(static_cast<size_t>(H), 0.0f);
  std::vector<float> dx(static_cast<size_t>(N * H));
  rmsnorm_bwd<float>(dx.data(), grads->final_norm.data(), dy.data(), x.data(), m.final_norm.data(),
                     inv_rms.data(), N, H);

  // Blocks, last to first; layers[l].dx is left holding the gradient of block l's
  // input, so layers[0].dx is the gradient of the embedding output (B·T, H).
  if (static_cast<int64_t>(grads->layers.size()) < L) grads->layers.resize(static_cast<size_t>(L));
  BackwardOptions opt;
  opt.input = true;
  opt.transforms = plans != nullptr;
  opt.clip = plans != nullptr;
  opt.weights = true;
  for (int64_t l = L - 1; l >= 0; --l) {
    PlannedBlock pb(m, l, plans);
    BlockGradsT<float>& g = grads->layers[static_cast<size_t>(l)];
    pb.block.backward(*tapes[static_cast<size_t>(l)], dx.data(), &g, opt);
    tapes[static_cast<size_t>(l)].reset();
    QCAL_CHECK(g.dx.size() == dx.size());
    std::copy(g.dx.begin(), g.dx.end(), dx.begin());
  }

  // Embedding: scatter-add the rows.
  std::vector<float> d_embed(static_cast<size_t>(V * H), 0.0f);
  for (int64_t r = 0; r < N; ++r) {
    float* dst = d_embed.data() + static_cast<int64_t>(tokens[r]) * H;
    const float* src = dx.data() + r * H;
    for (int64_t j = 0; j < H; ++j) dst[j] += src[j];
  }
  if (c.tie_word_embeddings) {
    // One matrix in two places: both copies get the sum.
    for (size_t i = 0; i < d_embed.size(); ++i) d_embed[i] += d_head[i];
    d_head = d_embed;
  }
  accumulate(&grads->embed, d_embed);
  accumulate(&grads->lm_head, d_head);
  return loss;
}

namespace {
using Vec = std::vector<double>;
Vec to_dv(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }
// A (rows, n) ← A·M (M n×n), in float64, cast back once.
void right_mul(std::vector<float>& A, int64_t rows, int64_t n, const Vec& M) {
  Vec a = to_dv(A), out(static_cast<size_t>(rows * n));
  gemm_t(false, false, rows, n, n, 1.0, a.data(), n, M.data(), n, 0.0, out.data(), n);
  A.assign(out.begin(), out.end());
}
// A (n, cols) ← Mᵀ·A (M n×n), in float64, cast back once.
void left_mul_t(std::vector<float>& A, int64_t n, int64_t cols, const Vec& M) {
  Vec a = to_dv(A), out(static_cast<size_t>(n * cols));
  gemm_t(true, false, n, cols, n, 1.0, M.data(), n, a.data(), cols, 0.0, out.data(), cols);
  A.assign(out.begin(), out.end());
}
void scale_cols(std::vector<float>& W, int64_t n, const Vec& s) {
  const int64_t rows = static_cast<int64_t>(W.size()) / n;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float& w = W[static_cast<size_t>(r * n + j)];
      w = static_cast<float>(static_cast<double>(w) * s[static_cast<size_t>(j)]);
    }
}
bool all_ones(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return x == 1.0f; });
}
}  // namespace

void fold_norms(FpModel& m, bool embed_mean_sub) {
  const int64_t H = m.config.hidden_size;
  for (auto& w : m.layers) {
    const Vec gi = to_dv(w.input_norm), gp = to_dv(w.post_norm);
    for (int p : {kQ, kK, kV}) scale_cols(w.w[p], H, gi);
    for (int p : {kGate, kUp}) scale_cols(w.w[p], H, gp);
    std::fill(w.input_norm.begin(), w.input_norm.end(), 1.0f);
    std::fill(w.post_norm.begin(), w.post_norm.end(), 1.0f);
  }
  scale_cols(m.lm_head, H, to_dv(m.final_norm));
  std::fill(m.final_norm.begin(), m.final_norm.end(), 1.0f);
  if (embed_mean_sub) {
    const int64_t V = static_cast<int64_t>(m.embed.size()) / H;
    for (int64_t v = 0; v < V; ++v) {
      float* e = m.embed.data() + v * H;
      double mean = 0.0;
      for (int64_t j = 0; j < H; ++j) mean += e[j];
      mean /= static_cast<double>(H);
      for (int64_t j = 0; j < H; ++j) e[j] = static_cast<float>(e[j] - mean);
    }
  }
  // lm_head (a copy when tied) no longer equals the embedding.
  m.config.tie_word_embeddings = false;
}

void rotate_residual(FpModel& m, const std::vector<double>& R1) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size;
  QCAL_CHECK(static_cast<int64_t>(R1.size()) == H * H);
  QCAL_CHECK(all_ones(m.final_norm));
  right_mul(m.embed, static_cast<int64_t>(m.embed.size()) / H, H, R1);
  right_mul(m.lm_head, static_cast<int64_t>(m.lm_head.size()) / H, H, R1);
  for (auto& w : m.layers) {
    QCAL_CHECK(all_ones(w.input_norm) && all_ones(w.post_norm));  // fold_norms first
    for (int p : {kQ, kK, kV, kGate, kUp})
      right_mul(w.w[p], static_cast<int64_t>(w.w[p].size()) / H, H, R1);
    for (int p : {kO, kDown}) left_mul_t(w.w[p], H, static_cast<int64_t>(w.w[p].size()) / H, R1);
  }
  m.config.tie_word_embeddings = false;
}

}  // namespace qcal::calib

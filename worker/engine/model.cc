// The LLaMA-family decoder (methods.md §11.1) in fp32 on the CPU, and its
// scalar fp64 reference. Letters: B sequences, T tokens per sequence, N = B*T
// rows, H hidden, I intermediate, V vocab, n_h / n_kv heads, d head dim,
// Q = n_h*d, K = n_kv*d.
#include "worker/engine/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/dtype.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "worker/engine/qformats.h"

namespace qcal {

// ---------------------------------------------------------------- LayerWeights

Tensor& LayerWeights::proj(const std::string& name) {
  if (name == "self_attn.q_proj") return q;
  if (name == "self_attn.k_proj") return k;
  if (name == "self_attn.v_proj") return v;
  if (name == "self_attn.o_proj") return o;
  if (name == "mlp.gate_proj") return gate;
  if (name == "mlp.up_proj") return up;
  if (name == "mlp.down_proj") return down;
  QCAL_CHECK_MSG(false, ("unknown projection " + name).c_str());
  return q;  // unreachable
}

const Tensor& LayerWeights::proj(const std::string& name) const {
  return const_cast<LayerWeights*>(this)->proj(name);
}

// ---------------------------------------------------------------- block forward

namespace {

void check_layer_shapes(const ModelConfig& c, const LayerWeights& w) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  QCAL_CHECK(c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0);
  QCAL_CHECK(w.input_norm.numel() == H && w.post_norm.numel() == H);
  QCAL_CHECK(w.q.numel() == Q * H && w.k.numel() == K * H && w.v.numel() == K * H);
  QCAL_CHECK(w.o.numel() == H * Q);
  QCAL_CHECK(w.gate.numel() == I * H && w.up.numel() == I * H && w.down.numel() == H * I);
  QCAL_CHECK(w.q_bias.data.empty() || w.q_bias.data.size() == static_cast<size_t>(Q));
  QCAL_CHECK(w.k_bias.data.empty() || w.k_bias.data.size() == static_cast<size_t>(K));
  QCAL_CHECK(w.v_bias.data.empty() || w.v_bias.data.size() == static_cast<size_t>(K));
}

const float* bias_ptr(const Tensor& b) { return b.data.empty() ? nullptr : b.ptr(); }

}  // namespace

void block_forward(const ModelConfig& c, const LayerWeights& w, float* x, int64_t B, int64_t T,
                   const LinearInputHook& hook) {
  check_layer_shapes(c, w);
  if (B <= 0 || T <= 0) return;
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  const int64_t n_h = c.num_attention_heads, n_kv = c.num_key_value_heads, d = c.head_dim;
  const float eps = static_cast<float>(c.rms_norm_eps);

  // A hook must see each linear's input for all rows at once; without one,
  // sequences go through in groups of >= 512 rows to bound the workspace.
  const int64_t per = hook ? B : std::min(B, std::max<int64_t>(1, (512 + T - 1) / T));
  const int64_t rows_max = per * T;
  // One arena: xn (rows, H), then either the attention buffers q (rows, Q),
  // k (rows, K), v (rows, K), att (rows, Q), or the MLP's gate/up (rows, I) each.
  const int64_t tail = std::max(2 * Q + 2 * K, 2 * I);
  std::vector<float> arena(static_cast<size_t>(rows_max * (H + tail)));

  for (int64_t b0 = 0; b0 < B; b0 += per) {
    const int64_t nb = std::min(per, B - b0), N = nb * T;
    float* xs = x + b0 * T * H;  // (N, H) this group's residual stream
    float* xn = arena.data();
    float* q = xn + N * H;
    float* k = q + N * Q;
    float* v = k + N * K;
    float* att = v + N * K;

    // Attention half.
    rmsnorm_forward(xn, xs, w.input_norm.ptr(), N, H, eps);
    if (hook) {
      hook("self_attn.q_proj", xn, N, H);
      hook("self_attn.k_proj", xn, N, H);
      hook("self_attn.v_proj", xn, N, H);
    }
    linear_forward(q, xn, w.q.ptr(), bias_ptr(w.q_bias), N, H, Q);
    linear_forward(k, xn, w.k.ptr(), bias_ptr(w.k_bias), N, H, K);
    linear_forward(v, xn, w.v.ptr(), bias_ptr(w.v_bias), N, H, K);
    for (int64_t s = 0; s < nb; ++s) {
      rope_forward(q + s * T * Q, T, n_h, d, 0, c.rope_theta);
      rope_forward(k + s * T * K, T, n_kv, d, 0, c.rope_theta);
      attention_forward(att + s * T * Q, q + s * T * Q, k + s * T * K, v + s * T * K, T, n_h, n_kv,
                        d);
    }
    if (hook) hook("self_attn.o_proj", att, N, Q);
    // xs += att · W_oᵀ (the residual add folded into the GEMM's beta).
    sgemm(false, true, N, H, Q, 1.0f, att, Q, w.o.ptr(), Q, 1.0f, xs, H);

    // MLP half.
    float* gate = xn + N * H;
    float* up = gate + N * I;
    rmsnorm_forward(xn, xs, w.post_norm.ptr(), N, H, eps);
    if (hook) {
      hook("mlp.gate_proj", xn, N, H);
      hook("mlp.up_proj", xn, N, H);
    }
    linear_forward(gate, xn, w.gate.ptr(), nullptr, N, H, I);
    linear_forward(up, xn, w.up.ptr(), nullptr, N, H, I);
    swiglu_forward(gate, gate, up, N * I);
    if (hook) hook("mlp.down_proj", gate, N, I);
    sgemm(false, true, N, H, I, 1.0f, gate, I, w.down.ptr(), I, 1.0f, xs, H);
  }
}

// ---------------------------------------------------------------- LlamaModel

namespace {

std::string shape_mismatch(const std::string& dir, const std::string& name,
                           const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  return dir + ": tensor " + name + " has shape " + shape_str(got) + ", config implies " +
         shape_str(want);
}

// The final norm γ (H) and lm_head (V, H): the embedding when tied.
Status read_head(const ModelDir& dir, Tensor* norm, Tensor* head) {
  const ModelConfig& c = dir.config();
  const std::vector<int64_t> vh = {c.vocab_size, c.hidden_size};
  if (norm->data.empty()) {
    QCAL_ASSIGN_OR_RETURN(*norm, dir.read_f32("model.norm.weight", {c.hidden_size}));
  }
  if (head->data.empty()) {
    if (c.tie_word_embeddings) {
      QCAL_ASSIGN_OR_RETURN(*head, dir.read_f32("model.embed_tokens.weight", vh));
    } else {
      QCAL_ASSIGN_OR_RETURN(Tensor t, read_linear_weight(dir, "lm_head"));
      if (t.shape != vh) return invalid_input(shape_mismatch(dir.dir(), "lm_head", t.shape, vh));
      *head = std::move(t);
    }
  }
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<LlamaModel>> LlamaModel::open(const std::string& dir) {
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<ModelDir> md, ModelDir::open(dir));
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->dir_ = std::move(md);
  return m;
}

Result<LayerWeights> LlamaModel::load_layer(int64_t l) const {
  const ModelConfig& c = config();
  if (l < 0 || l >= c.num_hidden_layers)
    return invalid_input(dir_->dir() + ": layer " + std::to_string(l) + " out of range [0, " +
                         std::to_string(c.num_hidden_layers) + ")");
  const std::string p = layer_prefix(l);
  LayerWeights w;
  QCAL_ASSIGN_OR_RETURN(w.input_norm,
                        dir_->read_f32(p + "input_layernorm.weight", {c.hidden_size}));
  QCAL_ASSIGN_OR_RETURN(w.post_norm,
                        dir_->read_f32(p + "post_attention_layernorm.weight", {c.hidden_size}));
  for (const char* name : kProjNames) {
    QCAL_ASSIGN_OR_RETURN(Tensor t, read_linear_weight(*dir_, p + name));
    const std::vector<int64_t> want = proj_shape(c, name);
    if (t.shape != want) return invalid_input(shape_mismatch(dir_->dir(), p + name, t.shape, want));
    w.proj(name) = std::move(t);
    // The quantized readers decode straight from the mapping: drop its pages (as
    // read_f32 does), so walking the layers keeps one layer resident.
    for (const char* part : {".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed",
                             ".weight_scale", ".weight_zero_point", ".weight_g_idx"}) {
      const SafetensorsFile* file = nullptr;
      if (const TensorInfo* ti = dir_->find(p + name + part, &file)) file->release(*ti);
    }
  }
  // q/k/v biases: required when the config says so (qwen2), read when present.
  struct Bias {
    const char* name;
    Tensor* t;
    int64_t n;
  };
  for (const Bias& b : {Bias{"self_attn.q_proj.bias", &w.q_bias, c.q_dim()},
                        Bias{"self_attn.k_proj.bias", &w.k_bias, c.kv_dim()},
                        Bias{"self_attn.v_proj.bias", &w.v_bias, c.kv_dim()}}) {
    const std::string name = p + b.name;
    if (c.attention_bias || dir_->has(name)) {
      QCAL_ASSIGN_OR_RETURN(*b.t, dir_->read_f32(name, {b.n}));
    }
  }
  return w;
}

namespace {

// The float matrix `name` of shape (rows, cols) in `dir`, and the file that holds it.
Result<const TensorInfo*> float_matrix(const ModelDir& dir, const std::string& name, int64_t rows,
                                       int64_t cols, const SafetensorsFile** file) {
  const TensorInfo* ti = dir.find(name, file);
  if (!ti) return not_found(dir.dir() + ": missing tensor " + name);
  if (ti->shape != std::vector<int64_t>{rows, cols})
    return invalid_input(shape_mismatch(dir.dir(), name, ti->shape, {rows, cols}));
  if (!is_float_dtype(ti->dtype))
    return invalid_input(dir.dir() + ": tensor " + name + " has non-float dtype " +
                         dtype_name(ti->dtype));
  return ti;
}

}  // namespace

Result<Tensor> LlamaModel::embed(const TokenSequences& seqs, int64_t first, int64_t count) const {
  const int64_t H = config().hidden_size, V = config().vocab_size, T = seqs.seqlen;
  if (first < 0 || count < 0 || first + count > seqs.count())
    return invalid_input("sequences [" + std::to_string(first) + ", " +
                         std::to_string(first + count) + ") out of range [0, " +
                         std::to_string(seqs.count()) + ")");
  for (int64_t s = 0; s < count; ++s) {
    const int32_t* tok = seqs.seq(first + s);
    for (int64_t t = 0; t < T; ++t)
      if (tok[t] < 0 || tok[t] >= V)
        return invalid_input("token id " + std::to_string(tok[t]) + " at sequence " +
                             std::to_string(first + s) + " position " + std::to_string(t) +
                             " out of range [0, " + std::to_string(V) + ")");
  }
  Tensor x({count * T, H});
  QCAL_RETURN_IF_ERROR(embed_rows(seqs.seq(first), count * T, x.ptr()));
  return x;
}

Status LlamaModel::embed_rows(const int32_t* ids, int64_t n, float* x) const {
  const ModelConfig& c = config();
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const SafetensorsFile* file = nullptr;
  QCAL_ASSIGN_OR_RETURN(const TensorInfo* ti,
                        float_matrix(*dir_, "model.embed_tokens.weight", V, H, &file));
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= V)
      return invalid_input("token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                           " out of range [0, " + std::to_string(V) + ")");
  const std::string_view raw = file->raw(*ti);
  const size_t row_bytes = static_cast<size_t>(H) * dtype_size(ti->dtype);
  for (int64_t i = 0; i < n; ++i) {
    to_f32(ti->dtype, raw.data() + static_cast<size_t>(ids[i]) * row_bytes, x + i * H,
           static_cast<size_t>(H));
    // Every touched row maps its page-cache neighbours too (the kernel's fault-around,
    // 64 KiB): drop them every kEmbedReleaseRows rows, or scattered rows would map
    // much of the table.
    if ((i + 1) % kEmbedReleaseRows == 0 || i + 1 == n) file->release(*ti);
  }
  return Status::ok();
}

Result<Tensor> LlamaModel::final_norm() const {
  return dir_->read_f32("model.norm.weight", {config().hidden_size});
}

Status LlamaModel::lm_head_rows(int64_t v0, int64_t n, float* out) const {
  const ModelConfig& c = config();
  const int64_t H = c.hidden_size, V = c.vocab_size;
  if (v0 < 0 || n < 0 || v0 + n > V)
    return invalid_input("lm_head rows [" + std::to_string(v0) + ", " + std::to_string(v0 + n) +
                         ") out of range [0, " + std::to_string(V) + ")");
  if (!c.tie_word_embeddings && dir_->quantization_config() &&
      (dir_->has("lm_head.qweight") || dir_->has("lm_head.weight_packed"))) {
    // A quantized lm_head: dequantized whole once (logits() keeps the same copy).
    QCAL_RETURN_IF_ERROR(read_head(*dir_, &final_norm_, &lm_head_));
    std::memcpy(out, lm_head_.ptr() + v0 * H, static_cast<size_t>(n * H) * sizeof(float));
    return Status::ok();
  }
  const char* name = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  const SafetensorsFile* file = nullptr;
  QCAL_ASSIGN_OR_RETURN(const TensorInfo* ti, float_matrix(*dir_, name, V, H, &file));
  const size_t row_bytes = static_cast<size_t>(H) * dtype_size(ti->dtype);
  to_f32(ti->dtype, file->raw(*ti).data() + static_cast<size_t>(v0) * row_bytes, out,
         static_cast<size_t>(n * H));
  file->release(*ti);
  return Status::ok();
}

Result<Tensor> LlamaModel::logits(const Tensor& x) const {
  const ModelConfig& c = config();
  const int64_t H = c.hidden_size, V = c.vocab_size;
  if (x.ndim() != 2 || x.dim(1) != H)
    return invalid_input("logits: activations have shape " + shape_str(x.shape) +
                         ", expected [rows, " + std::to_string(H) + "]");
  QCAL_RETURN_IF_ERROR(read_head(*dir_, &final_norm_, &lm_head_));
  const int64_t rows = x.dim(0);
  std::vector<float> xn(static_cast<size_t>(rows * H));  // (rows, H)
  rmsnorm_forward(xn.data(), x.ptr(), final_norm_.ptr(), rows, H,
                  static_cast<float>(c.rms_norm_eps));
  Tensor out({rows, V});
  linear_forward(out.ptr(), xn.data(), lm_head_.ptr(), nullptr, rows, H, V);
  return out;
}

Result<Tensor> model_logits(const LlamaModel& m, const TokenSequences& seqs, int64_t first,
                            int64_t count) {
  const ModelConfig& c = m.config();
  QCAL_ASSIGN_OR_RETURN(Tensor x, m.embed(seqs, first, count));  // (count*T, H)
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    QCAL_ASSIGN_OR_RETURN(LayerWeights w, m.load_layer(l));
    block_forward(c, w, x.ptr(), count, seqs.seqlen);
  }
  return m.logits(x);
}

// ---------------------------------------------------------------- fp64 reference

namespace {

std::vector<double> to_f64(const Tensor& t) { return {t.data.begin(), t.data.end()}; }

// y (T, O) = x (T, I) · W (O, I)ᵀ + b, all in double.
void linear_ref(double* y, const double* x, const Tensor& W, const Tensor& b, int64_t T, int64_t I,
                int64_t O) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o) {
      double acc = b.data.empty() ? 0.0 : static_cast<double>(b.data[o]);
      for (int64_t i = 0; i < I; ++i) acc += x[t * I + i] * static_cast<double>(W.data[o * I + i]);
      y[t * O + o] = acc;
    }
}

// One block in fp64 on one sequence, in place on x (T, H).
void block_ref(const ModelConfig& c, const LayerWeights& w, double* x, int64_t T) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  std::vector<double> xn(T * H), q(T * Q), k(T * K), v(T * K), att(T * Q), g(T * I), u(T * I),
      y(T * H);
  const std::vector<double> g1 = to_f64(w.input_norm), g2 = to_f64(w.post_norm);
  rmsnorm_forward_ref(xn.data(), x, g1.data(), T, H, c.rms_norm_eps);
  linear_ref(q.data(), xn.data(), w.q, w.q_bias, T, H, Q);
  linear_ref(k.data(), xn.data(), w.k, w.k_bias, T, H, K);
  linear_ref(v.data(), xn.data(), w.v, w.v_bias, T, H, K);
  rope_forward_ref(q.data(), T, c.num_attention_heads, c.head_dim, 0, c.rope_theta);
  rope_forward_ref(k.data(), T, c.num_key_value_heads, c.head_dim, 0, c.rope_theta);
  attention_forward_ref(att.data(), q.data(), k.data(), v.data(), T, c.num_attention_heads,
                        c.num_key_value_heads, c.head_dim);
  linear_ref(y.data(), att.data(), w.o, Tensor(), T, Q, H);
  for (int64_t i = 0; i < T * H; ++i) x[i] += y[i];
  rmsnorm_forward_ref(xn.data(), x, g2.data(), T, H, c.rms_norm_eps);
  linear_ref(g.data(), xn.data(), w.gate, Tensor(), T, H, I);
  linear_ref(u.data(), xn.data(), w.up, Tensor(), T, H, I);
  swiglu_forward_ref(g.data(), g.data(), u.data(), T * I);
  linear_ref(y.data(), g.data(), w.down, Tensor(), T, I, H);
  for (int64_t i = 0; i < T * H; ++i) x[i] += y[i];
}

}  // namespace

Result<std::vector<double>> model_logits_ref(const LlamaModel& m, const int32_t* tokens,
                                             int64_t T) {
  const ModelConfig& c = m.config();
  const int64_t H = c.hidden_size, V = c.vocab_size;
  TokenSequences one;
  one.seqlen = T;
  one.tokens.assign(tokens, tokens + T);
  QCAL_ASSIGN_OR_RETURN(Tensor e, m.embed(one, 0, 1));
  std::vector<double> x = to_f64(e);  // (T, H)
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    QCAL_ASSIGN_OR_RETURN(LayerWeights w, m.load_layer(l));
    block_ref(c, w, x.data(), T);
  }
  Tensor norm, head;
  QCAL_RETURN_IF_ERROR(read_head(m.dir(), &norm, &head));
  const std::vector<double> gn = to_f64(norm);
  std::vector<double> xn(T * H), out(T * V);
  rmsnorm_forward_ref(xn.data(), x.data(), gn.data(), T, H, c.rms_norm_eps);
  linear_ref(out.data(), xn.data(), head, Tensor(), T, H, V);
  return out;
}

}  // namespace qcal

// IntactKV (methods.md §6, §11.8): FP prefix cache, its evaluation protocol, and
// the attention-sink diagnostic. See intactkv.h.
//
// Letters: L layers, P prefix tokens, T tokens per sequence, S sequences, N rows
// (sequences × tokens), V vocab, H hidden, Q = n_h·d, K = n_kv·d.
#include "worker/calib/intactkv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>

#include "common/model_dir.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"

namespace qcal::calib {

namespace {

bool quant_off(const NativeActQuant& a) { return a.bits >= 16; }

std::string ids_str(const int32_t* ids, int64_t n) {
  std::string s = n == 1 ? "" : "[";
  for (int64_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return n == 1 ? s : s + "]";
}

std::string prefix_str(const std::vector<int32_t>& p) {
  std::string s = "[";
  for (size_t i = 0; i < p.size(); ++i) s += (i ? ", " : "") + std::to_string(p[i]);
  return s + "]";
}

// The shape fields both models of attach_intactkv must share.
Status check_same_shape(const ModelConfig& a, const ModelConfig& b) {
  auto field = [](const char* name, double x, double y) -> Status {
    if (x == y) return Status::ok();
    return invalid_input(std::string("IntactKV: the FP model's ") + name + " " + std::to_string(y) +
                         " differs from the quantized model's " + std::to_string(x));
  };
  QCAL_RETURN_IF_ERROR(field("hidden_size", a.hidden_size, b.hidden_size));
  QCAL_RETURN_IF_ERROR(field("intermediate_size", a.intermediate_size, b.intermediate_size));
  QCAL_RETURN_IF_ERROR(field("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers));
  QCAL_RETURN_IF_ERROR(field("num_attention_heads", a.num_attention_heads, b.num_attention_heads));
  QCAL_RETURN_IF_ERROR(field("num_key_value_heads", a.num_key_value_heads, b.num_key_value_heads));
  QCAL_RETURN_IF_ERROR(field("head_dim", a.head_dim, b.head_dim));
  QCAL_RETURN_IF_ERROR(field("vocab_size", a.vocab_size, b.vocab_size));
  QCAL_RETURN_IF_ERROR(field("rope_theta", a.rope_theta, b.rope_theta));
  return Status::ok();
}

// The members of BlockTransformsT that act online in a NativeLayer.
constexpr std::vector<float> BlockTransformsT<float>::*kOnlineMembers[] = {
    &BlockTransformsT<float>::a1, &BlockTransformsT<float>::a2, &BlockTransformsT<float>::u1,
    &BlockTransformsT<float>::u2, &BlockTransformsT<float>::d1, &BlockTransformsT<float>::d2,
    &BlockTransformsT<float>::po, &BlockTransformsT<float>::pk, &BlockTransformsT<float>::pk_it};
constexpr const char* kOnlineNames[] = {"a1", "a2", "u1", "u2", "d1", "d2", "po", "pk", "pk_it"};

Status check_fp_twin(const NativeModel& q, const NativeModel& fp) {
  QCAL_RETURN_IF_ERROR(check_same_shape(q.config, fp.config));
  const int64_t L = q.config.num_hidden_layers;
  if (static_cast<int64_t>(q.layers.size()) != L || static_cast<int64_t>(fp.layers.size()) != L)
    return invalid_input("IntactKV: a model holds a number of layers other than its config's " +
                         std::to_string(L));
  if (fp.w_bits < 16)
    return invalid_input("IntactKV: the FP model has " + std::to_string(fp.w_bits) +
                         "-bit weights; it needs float weights (w_bits 16, see fp_view)");
  if (!fp.intact_prefix.empty())
    return invalid_input("IntactKV: the FP model carries an IntactKV prefix of its own");
  for (int64_t l = 0; l < L; ++l) {
    const NativeLayer& y = fp.layers[l];
    const std::string where = "IntactKV: FP model layer " + std::to_string(l) + ": ";
    for (int p = 0; p < kNumProj; ++p)
      if (!quant_off(y.act[p]))
        return invalid_input(where + "the " + kProjNames[p] + " input quantizer is on (" +
                             std::to_string(y.act[p].bits) + " bits); every quantizer must be off");
    if (!quant_off(y.k) || !quant_off(y.v))
      return invalid_input(where + "the K/V cache quantizer is on; every quantizer must be off");
    for (size_t i = 0; i < std::size(kOnlineMembers); ++i)
      if (y.online.*kOnlineMembers[i] != q.layers[l].online.*kOnlineMembers[i])
        return invalid_input(where + "online transform " + kOnlineNames[i] +
                             " differs from the quantized model's (the prefix cache would be in "
                             "another basis)");
  }
  return Status::ok();
}

// Σ over heads, queries t = 1..T−1 and sequences of the attention probability on
// key 0, from the normalized block input xn (nb·T, H) of layer weights w.
double sink_mass(const ModelConfig& c, const LayerWeights& w, const float* xn, int64_t nb,
                 int64_t T) {
  const int64_t H = c.hidden_size, Q = c.q_dim(), K = c.kv_dim(), N = nb * T;
  const int64_t n_h = c.num_attention_heads, n_kv = c.num_key_value_heads, d = c.head_dim;
  const int64_t rep = n_h / n_kv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> q(static_cast<size_t>(N * Q)), k(static_cast<size_t>(N * K));
  std::vector<float> sc(static_cast<size_t>(T * T));  // (T, T) scores of one head
  linear_forward(q.data(), xn, w.q.ptr(), w.q_bias.data.empty() ? nullptr : w.q_bias.ptr(), N, H,
                 Q);
  linear_forward(k.data(), xn, w.k.ptr(), w.k_bias.data.empty() ? nullptr : w.k_bias.ptr(), N, H,
                 K);
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    float* qb = q.data() + b * T * Q;
    float* kb = k.data() + b * T * K;
    rope_forward(qb, T, n_h, d, 0, c.rope_theta);
    rope_forward(kb, T, n_kv, d, 0, c.rope_theta);
    for (int64_t h = 0; h < n_h; ++h) {
      sgemm(false, true, T, T, d, scale, qb + h * d, Q, kb + (h / rep) * d, K, 0.0f, sc.data(), T);
      for (int64_t t = 1; t < T; ++t) {
        const float* row = sc.data() + t * T;
        const float mx = *std::max_element(row, row + t + 1);
        double sum = 0.0;
        for (int64_t j = 0; j <= t; ++j) sum += std::exp(static_cast<double>(row[j] - mx));
        total += std::exp(static_cast<double>(row[0] - mx)) / sum;
      }
    }
  }
  return total;
}

}  // namespace

NativeModel fp_view(const NativeModel& m) {
  QCAL_CHECK_MSG(m.w_bits >= 16, "fp_view: the model has quantized weights (w_bits < 16)");
  NativeModel f;
  f.config = m.config;
  f.recipe = m.recipe;
  f.w_bits = 16;
  f.w_group = -1;
  f.embed = m.embed;
  f.final_norm = m.final_norm;
  f.lm_head = m.lm_head;
  f.layers.reserve(m.layers.size());
  for (const NativeLayer& y : m.layers) {
    NativeLayer z;
    z.input_norm = y.input_norm;
    z.post_norm = y.post_norm;
    for (int p = 0; p < kNumProj; ++p) {
      const std::vector<int64_t> sh = proj_shape(m.config, kProjNames[p]);
      QCAL_CHECK_MSG(static_cast<int64_t>(y.fw[p].size()) == sh[0] * sh[1],
                     "fp_view: a layer lacks its float weights");
      z.fw[p] = y.fw[p];
    }
    z.bias = y.bias;
    z.online = y.online;  // act, k, v default to bits 16 (off)
    f.layers.push_back(std::move(z));
  }
  return f;
}

Status attach_intactkv(NativeModel& quantized, const NativeModel& fp_transformed,
                       const std::vector<int32_t>& prefix) {
  const ModelConfig& c = quantized.config;
  const int64_t P = static_cast<int64_t>(prefix.size()), V = c.vocab_size;
  if (P == 0) return invalid_input("IntactKV: the prefix is empty");
  for (int64_t i = 0; i < P; ++i)
    if (prefix[i] < 0 || prefix[i] >= V)
      return invalid_input("IntactKV: prefix token " + std::to_string(i) + " = " +
                           std::to_string(prefix[i]) + " is outside the vocabulary [0, " +
                           std::to_string(V) + ")");
  QCAL_RETURN_IF_ERROR(check_fp_twin(quantized, fp_transformed));
  // FP prefix forward (no prefix cache of its own: positions 0..P−1), every
  // quantizer off, so the captured entries are the FP K (post-RoPE, post-P_k) and V.
  NativeKvCapture cap;
  std::vector<float> logits = native_logits(fp_transformed, prefix.data(), 1, P, &cap);
  for (float v : logits)
    if (!std::isfinite(v)) return invalid_input("IntactKV: the FP prefix logits are not finite");
  quantized.intact_prefix = prefix;
  quantized.intact_k = std::move(cap.k);
  quantized.intact_v = std::move(cap.v);
  quantized.intact_logits = std::move(logits);
  return Status::ok();
}

Result<EvalResult> evaluate_native(const NativeModel& m, const TokenSequences& data,
                                   const LlamaModel* fp, int64_t batch) {
  const ModelConfig& c = m.config;
  const int64_t V = c.vocab_size, T = data.seqlen, S = data.count();
  const int64_t P = static_cast<int64_t>(m.intact_prefix.size());
  if (fp && fp->config().vocab_size != V)
    return invalid_input("FP model vocab " + std::to_string(fp->config().vocab_size) +
                         " differs from the model's " + std::to_string(V));
  if (P > 0) {
    if (P >= T)
      return invalid_input("IntactKV prefix of " + std::to_string(P) +
                           " tokens leaves nothing of sequences of " + std::to_string(T));
    for (int64_t s = 0; s < S; ++s) {
      const int32_t* seq = data.seq(s);
      if (!std::equal(seq, seq + P, m.intact_prefix.begin()))
        return invalid_input("IntactKV needs every sequence to begin with the prefix " +
                             prefix_str(m.intact_prefix) + "; sequence " + std::to_string(s) +
                             " begins with " + ids_str(seq, P));
    }
  }
  BatchLogits model_fn = [&](int64_t s0, int64_t nb) -> Result<Tensor> {
    Tensor t({nb * T, V});
    if (P == 0) {
      t.data = native_logits(m, data.seq(s0), nb, T);
      return t;
    }
    // tokens[P:] of each sequence after the FP prefix cache; positions 0..P−1 take
    // the stored FP prefix logits.
    const int64_t Tr = T - P;
    std::vector<int32_t> rest(static_cast<size_t>(nb * Tr));
    for (int64_t b = 0; b < nb; ++b)
      std::copy(data.seq(s0 + b) + P, data.seq(s0 + b) + T, rest.begin() + b * Tr);
    const std::vector<float> out = native_logits(m, rest.data(), nb, Tr);  // (nb·Tr, V)
    for (int64_t b = 0; b < nb; ++b) {
      float* dst = t.ptr() + b * T * V;
      std::memcpy(dst, m.intact_logits.data(), static_cast<size_t>(P * V) * sizeof(float));
      std::memcpy(dst + P * V, out.data() + b * Tr * V,
                  static_cast<size_t>(Tr * V) * sizeof(float));
    }
    return t;
  };
  BatchLogits fp_fn = [&](int64_t s0, int64_t nb) -> Result<Tensor> {
    return model_logits(*fp, data, s0, nb);
  };
  return evaluate_logits(model_fn, fp ? &fp_fn : nullptr, data, V, batch);
}

Result<std::vector<double>> attention_sink_share(const LlamaModel& m, const TokenSequences& data,
                                                 int64_t max_seqs) {
  const ModelConfig& c = m.config();
  const int64_t T = data.seqlen, H = c.hidden_size, L = c.num_hidden_layers;
  const int64_t S = max_seqs > 0 ? std::min(max_seqs, data.count()) : data.count();
  if (T < 2)
    return invalid_input("attention_sink_share needs seqlen >= 2, got " + std::to_string(T));
  if (S < 1) return invalid_input("attention_sink_share: the data holds no sequence");
  QCAL_ASSIGN_OR_RETURN(Tensor x, m.embed(data, 0, S));  // (S·T, H)
  // Sequences go through block_forward in groups of >= 512 rows (its hook sees a
  // whole call's rows at once).
  const int64_t per = std::min(S, std::max<int64_t>(1, (512 + T - 1) / T));
  std::vector<double> share(static_cast<size_t>(L), 0.0);
  for (int64_t l = 0; l < L; ++l) {
    QCAL_ASSIGN_OR_RETURN(LayerWeights w, m.load_layer(l));
    double mass = 0.0;
    for (int64_t b0 = 0; b0 < S; b0 += per) {
      const int64_t nb = std::min(per, S - b0);
      LinearInputHook hook = [&](const std::string& proj, const float* xn, int64_t, int64_t) {
        if (proj == kProjNames[0]) mass += sink_mass(c, w, xn, nb, T);
      };
      block_forward(c, w, x.ptr() + b0 * T * H, nb, T, hook);
    }
    share[static_cast<size_t>(l)] = mass / static_cast<double>(S * c.num_attention_heads * (T - 1));
  }
  return share;
}

}  // namespace qcal::calib

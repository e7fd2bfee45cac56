// Perplexity, and KL / top-1 agreement against an FP model (see eval.h): the
// streaming evaluator and the materializing reference it is tested against.
// Letters: B sequences in a batch, T seqlen, P IntactKV prefix, Tq = T − P tokens
// the model runs per sequence, N = B·T rows (positions), Nq = B·Tq, H hidden,
// V vocab, C lm_head rows of a chunk, R rows of a logits tile.
#include "worker/engine/eval.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace qcal {

nlohmann::json EvalResult::to_json() const {
  nlohmann::json j = {{"ppl", ppl}, {"nll", nll}, {"tokens", tokens}, {"sequences", sequences}};
  if (kl) j["kl"] = *kl;
  if (top1_agree) j["top1_agree"] = *top1_agree;
  if (fp_ppl) j["fp_ppl"] = *fp_ppl;
  return j;
}

namespace {

int64_t argmax(const float* row, int64_t V) {
  return std::max_element(row, row + V) - row;  // first of equal maxima
}

// KL(p_fp ‖ p) = Σ_v p_fp (log p_fp − log p) in double, and whether the argmaxes
// agree, for rows [0, R) of the log-probabilities lp (model) and lf (FP).
void compare_rows(const float* lp, const float* lf, int64_t R, int64_t V, double* kl,
                  uint8_t* agree) {
  auto run = [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const float* p = lp + r * V;
      const float* f = lf + r * V;
      double s = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        const double lfv = f[v];
        s += std::exp(lfv) * (lfv - static_cast<double>(p[v]));
      }
      kl[r] = s;
      agree[r] = argmax(p, V) == argmax(f, V);
    }
  };
  parallel_for(R, 4 * V, run);
}

// Accumulates NLL, and against FP log-probabilities KL and top-1 agreement, over
// rows of log-softmaxed logits; the one scoring rule of every evaluate*().
class Scorer {
 public:
  Scorer(const TokenSequences& data, int64_t V, bool with_fp) : data_(data), V_(V), fp_(with_fp) {}
  // lp / lf: (R, V) log-probabilities of rows [r0, r0+R) of sequences starting at s0.
  void add(const float* lp, const float* lf, int64_t s0, int64_t r0, int64_t R) {
    const int64_t T = data_.seqlen;
    if (fp_) {
      kl_row_.resize(static_cast<size_t>(R));
      agree_row_.resize(static_cast<size_t>(R));
      compare_rows(lp, lf, R, V_, kl_row_.data(), agree_row_.data());
    }
    for (int64_t i = 0; i < R; ++i) {
      const int64_t r = r0 + i, b = r / T, t = r % T;
      if (t == T - 1) continue;  // the last position predicts nothing inside the sequence
      const int32_t next = data_.seq(s0 + b)[t + 1];
      nll_sum_ -= lp[i * V_ + next];
      if (fp_) {
        fp_nll_sum_ -= lf[i * V_ + next];
        kl_sum_ += kl_row_[static_cast<size_t>(i)];
        agree_sum_ += agree_row_[static_cast<size_t>(i)];
      }
    }
  }
  EvalResult result() const {
    EvalResult res;
    res.sequences = data_.count();
    res.tokens = res.sequences * (data_.seqlen - 1);
    const double n = static_cast<double>(res.tokens);
    res.nll = nll_sum_ / n;
    res.ppl = std::exp(res.nll);
    if (fp_) {
      res.kl = kl_sum_ / n;
      res.top1_agree = static_cast<double>(agree_sum_) / n;
      res.fp_ppl = std::exp(fp_nll_sum_ / n);
    }
    return res;
  }

 private:
  const TokenSequences& data_;
  int64_t V_;
  bool fp_;
  double nll_sum_ = 0.0, fp_nll_sum_ = 0.0, kl_sum_ = 0.0;
  int64_t agree_sum_ = 0;
  std::vector<double> kl_row_;
  std::vector<uint8_t> agree_row_;
};

Status check_eval_inputs(const TokenSequences& data, int64_t batch) {
  if (data.seqlen < 2)
    return invalid_input("evaluation needs seqlen >= 2, got " + std::to_string(data.seqlen));
  if (data.count() < 1) return invalid_input("evaluation data holds no sequence");
  if (batch < 1)
    return invalid_input("evaluation batch must be >= 1, got " + std::to_string(batch));
  return Status::ok();
}

// ---------------------------------------------------------------- streaming

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

Status check_tokens(const TokenSequences& data, int64_t V) {
  for (int64_t s = 0; s < data.count(); ++s) {
    const int32_t* tok = data.seq(s);
    for (int64_t t = 0; t < data.seqlen; ++t)
      if (tok[t] < 0 || tok[t] >= V)
        return invalid_input("token id " + std::to_string(tok[t]) + " at sequence " +
                             std::to_string(s) + " position " + std::to_string(t) +
                             " out of range [0, " + std::to_string(V) + ")");
  }
  return Status::ok();
}

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Online statistics of one scored position over the vocabulary, for the model
// (z) and the FP reference (z_fp): running maxima m (the largest logit so far,
// which every sum is relative to), Σ exp(z − m), the next token's logit, the
// first index of the maximum, and for KL a = Σ exp(z_fp − m_fp)·(z_fp − z).
struct RowStats {
  double m = kNegInf, s = 0, target = kNaN;
  int64_t arg = -1;
  double mf = kNegInf, sf = 0, a = 0, target_f = kNaN;
  int64_t arg_f = -1;
};

// Largest entry of z[0..n) and the first index holding it (NaN never compares
// greater; an all-NaN chunk gives −inf and −1, and its NaN reaches the sums).
float chunk_max(const float* z, int64_t n, int64_t* at) {
  float mx = -std::numeric_limits<float>::infinity();
  *at = -1;
  for (int64_t i = 0; i < n; ++i)
    if (z[i] > mx) {
      mx = z[i];
      *at = i;
    }
  return mx;
}

// Folds columns [v0, v0 + n) of one position into r: z (n) the model's logits,
// zf (n) the FP model's (null without one), `next` the target token.
void update_row(RowStats& r, const float* z, const float* zf, int64_t v0, int64_t n, int32_t next) {
  int64_t at;
  const float cm = chunk_max(z, n, &at);
  if (cm > r.m) {
    r.s *= std::exp(r.m - cm);  // running-max rescaling; exp(−inf) = 0 on the first chunk
    r.m = cm;
    r.arg = v0 + at;
  }
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(z[i]) - r.m);
  r.s += s;
  if (next >= v0 && next < v0 + n) r.target = z[next - v0];
  if (!zf) return;
  const float cf = chunk_max(zf, n, &at);
  if (cf > r.mf) {
    const double k = std::exp(r.mf - cf);
    r.sf *= k;
    r.a *= k;
    r.mf = cf;
    r.arg_f = v0 + at;
  }
  double sf = 0.0, a = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double f = zf[i], e = std::exp(f - r.mf);
    sf += e;
    a += e * (f - static_cast<double>(z[i]));
  }
  r.sf += sf;
  r.a += a;
  if (next >= v0 && next < v0 + n) r.target_f = zf[next - v0];
}

// Sums over scored positions, in position order.
struct Totals {
  double nll = 0, fp_nll = 0, kl = 0;
  int64_t agree = 0;
  void add(const RowStats& r, bool with_fp) {
    const double lse = r.m + std::log(r.s);
    nll += lse - r.target;
    if (!with_fp) return;
    const double lse_f = r.mf + std::log(r.sf);
    fp_nll += lse_f - r.target_f;
    // KL(p_fp ‖ p) = Σ p_fp (z_fp − z) − lse_fp + lse: exactly 0 when z_fp == z.
    kl += r.a / r.sf + (lse - lse_f);
    agree += r.arg == r.arg_f;
  }
};

// Runs `m`'s layers on x (B·T, H) and applies its final norm γ in place.
Status run_layers(const EvalModel& m, const std::vector<float>& gamma, float* x, int64_t B,
                  int64_t T) {
  const ModelConfig& c = m.config();
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    QCAL_RETURN_IF_ERROR(m.forward_layer(l, x, B, T));
  rmsnorm_forward(x, x, gamma.data(), B * T, c.hidden_size, static_cast<float>(c.rms_norm_eps));
  return Status::ok();
}

Result<std::vector<float>> final_norm_of(const EvalModel& m) {
  QCAL_ASSIGN_OR_RETURN(std::vector<float> g, m.final_norm());
  if (static_cast<int64_t>(g.size()) != m.config().hidden_size)
    return internal_error("final norm of " + std::to_string(g.size()) +
                          " entries, the config says hidden " +
                          std::to_string(m.config().hidden_size));
  return g;
}

}  // namespace

const std::vector<int32_t>& EvalModel::prefix() const {
  static const std::vector<int32_t> kNone;
  return kNone;
}

Status EvalModel::prefix_logits(int64_t, int64_t, int64_t, float*) const {
  return internal_error("prefix_logits: the model has no IntactKV prefix");
}

std::unique_ptr<EvalModel> LlamaEvalModel::owning(std::unique_ptr<LlamaModel> m) {
  auto e = std::make_unique<LlamaEvalModel>(*m);
  e->owned_ = std::move(m);
  return e;
}

Status LlamaEvalModel::embed(const int32_t* ids, int64_t n, float* x) const {
  return m_->embed_rows(ids, n, x);
}

Status LlamaEvalModel::forward_layer(int64_t l, float* x, int64_t B, int64_t T) const {
  QCAL_ASSIGN_OR_RETURN(LayerWeights w, m_->load_layer(l));
  block_forward(m_->config(), w, x, B, T);
  return Status::ok();
}

Result<std::vector<float>> LlamaEvalModel::final_norm() const {
  QCAL_ASSIGN_OR_RETURN(Tensor g, m_->final_norm());
  return std::move(g.data);
}

Status LlamaEvalModel::head_rows(int64_t v0, int64_t n, float* out) const {
  return m_->lm_head_rows(v0, n, out);
}

Status check_intactkv_prefix(const std::vector<int32_t>& prefix, const TokenSequences& data) {
  const int64_t P = static_cast<int64_t>(prefix.size()), T = data.seqlen;
  if (P >= T)
    return invalid_input("IntactKV prefix of " + std::to_string(P) +
                         " tokens leaves nothing of sequences of " + std::to_string(T));
  for (int64_t s = 0; s < data.count(); ++s) {
    const int32_t* seq = data.seq(s);
    if (!std::equal(seq, seq + P, prefix.begin()))
      return invalid_input("IntactKV needs every sequence to begin with the prefix " +
                           prefix_str(prefix) + "; sequence " + std::to_string(s) +
                           " begins with " + ids_str(seq, P));
  }
  return Status::ok();
}

Result<EvalResult> evaluate_stream(const EvalModel& model, const EvalModel* fp,
                                   const TokenSequences& data, const EvalOptions& o) {
  QCAL_RETURN_IF_ERROR(check_eval_inputs(data, o.batch));
  if (o.head_rows < 1)
    return invalid_input("evaluation head_rows must be >= 1, got " + std::to_string(o.head_rows));
  if (o.tile_floats < 1)
    return invalid_input("evaluation tile_floats must be >= 1, got " +
                         std::to_string(o.tile_floats));
  const ModelConfig& c = model.config();
  const int64_t V = c.vocab_size, H = c.hidden_size, T = data.seqlen, S = data.count();
  if (fp && fp->config().vocab_size != V)
    return invalid_input("FP model vocab " + std::to_string(fp->config().vocab_size) +
                         " differs from the model's " + std::to_string(V));
  if (fp && !fp->prefix().empty())
    return invalid_input("the FP reference model carries an IntactKV prefix of its own");
  QCAL_RETURN_IF_ERROR(check_tokens(data, V));
  const std::vector<int32_t>& prefix = model.prefix();
  const int64_t P = static_cast<int64_t>(prefix.size()), Tq = T - P;
  if (P > 0) QCAL_RETURN_IF_ERROR(check_intactkv_prefix(prefix, data));
  const int64_t Hf = fp ? fp->config().hidden_size : 0;
  QCAL_ASSIGN_OR_RETURN(const std::vector<float> gq, final_norm_of(model));
  std::vector<float> gf;
  if (fp) {
    QCAL_ASSIGN_OR_RETURN(gf, final_norm_of(*fp));
  }
  const int64_t B = std::min(o.batch, S);
  const int64_t C = std::min(o.head_rows, V);
  const int64_t R = std::max<int64_t>(1, std::min(B * T, o.tile_floats / C));
  // Rows of the model's activations before position r of the batch (the prefix
  // positions have none): the model rows of a tile of positions are contiguous.
  auto qrow = [&](int64_t r) { return (r / T) * Tq + std::max<int64_t>(0, r % T - P); };

  Totals sum;
  std::vector<int32_t> ids;  // (nb·Tq) the tokens the model runs, with a prefix
  for (int64_t s0 = 0; s0 < S; s0 += B) {
    const int64_t nb = std::min(B, S - s0), N = nb * T, Nq = nb * Tq;
    // Layer stage: the model on tokens[P:] of each sequence, then the FP model.
    const int32_t* qids = data.seq(s0);
    if (P > 0) {
      ids.resize(static_cast<size_t>(Nq));
      for (int64_t b = 0; b < nb; ++b)
        std::copy(data.seq(s0 + b) + P, data.seq(s0 + b) + T, ids.begin() + b * Tq);
      qids = ids.data();
    }
    std::vector<float> xq(static_cast<size_t>(Nq * H));  // (Nq, H)
    QCAL_RETURN_IF_ERROR(model.embed(qids, Nq, xq.data()));
    QCAL_RETURN_IF_ERROR(run_layers(model, gq, xq.data(), nb, Tq));
    std::vector<float> xf(static_cast<size_t>(fp ? N * Hf : 0));  // (N, Hf)
    if (fp) {
      QCAL_RETURN_IF_ERROR(fp->embed(data.seq(s0), N, xf.data()));
      QCAL_RETURN_IF_ERROR(run_layers(*fp, gf, xf.data(), nb, T));
    }

    // Vocabulary stage: chunks of C lm_head rows, tiles of R positions.
    std::vector<RowStats> stats(static_cast<size_t>(N));
    std::vector<float> wq(static_cast<size_t>(C * H)), zq(static_cast<size_t>(R * C));
    std::vector<float> wf(static_cast<size_t>(fp ? C * Hf : 0)), zf(fp ? zq.size() : 0);
    std::vector<float> pl(static_cast<size_t>(P * C));  // (P, n) stored prefix logits
    for (int64_t v0 = 0; v0 < V; v0 += C) {
      const int64_t n = std::min(C, V - v0);
      QCAL_RETURN_IF_ERROR(model.head_rows(v0, n, wq.data()));
      if (fp) QCAL_RETURN_IF_ERROR(fp->head_rows(v0, n, wf.data()));
      for (int64_t p = 0; p < P; ++p)
        QCAL_RETURN_IF_ERROR(model.prefix_logits(p, v0, n, pl.data() + p * n));
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t r1 = std::min(N, r0 + R), qa = qrow(r0), qb = qrow(r1);
        if (qb > qa)
          sgemm(false, true, qb - qa, n, H, 1.0f, xq.data() + qa * H, H, wq.data(), H, 0.0f,
                zq.data(), n);
        if (fp)
          sgemm(false, true, r1 - r0, n, Hf, 1.0f, xf.data() + r0 * Hf, Hf, wf.data(), Hf, 0.0f,
                zf.data(), n);
        parallel_for(r1 - r0, n * (fp ? 16 : 8), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t r = r0 + i, t = r % T;
            if (t == T - 1) continue;  // the last position predicts nothing inside the sequence
            const float* z = t < P ? pl.data() + t * n : zq.data() + (qrow(r) - qa) * n;
            update_row(stats[static_cast<size_t>(r)], z, fp ? zf.data() + i * n : nullptr, v0, n,
                       data.seq(s0 + r / T)[t + 1]);
          }
        });
      }
    }
    for (int64_t r = 0; r < N; ++r)
      if (r % T != T - 1) sum.add(stats[static_cast<size_t>(r)], fp != nullptr);
  }

  EvalResult res;
  res.sequences = S;
  res.tokens = S * (T - 1);
  const double n = static_cast<double>(res.tokens);
  res.nll = sum.nll / n;
  res.ppl = std::exp(res.nll);
  if (fp) {
    res.kl = sum.kl / n;
    res.top1_agree = static_cast<double>(sum.agree) / n;
    res.fp_ppl = std::exp(sum.fp_nll / n);
  }
  return res;
}

Result<EvalResult> evaluate(const LlamaModel& model, const TokenSequences& data,
                            const LlamaModel* fp_model, int64_t batch) {
  const LlamaEvalModel q(model);
  std::optional<LlamaEvalModel> f;
  if (fp_model) f.emplace(*fp_model);
  EvalOptions o;
  o.batch = batch;
  return evaluate_stream(q, f ? &*f : nullptr, data, o);
}

Result<EvalResult> evaluate_logits(const BatchLogits& model, const BatchLogits* fp,
                                   const TokenSequences& data, int64_t V, int64_t batch) {
  QCAL_RETURN_IF_ERROR(check_eval_inputs(data, batch));
  const int64_t T = data.seqlen, S = data.count();
  Scorer scorer(data, V, fp != nullptr);
  for (int64_t s0 = 0; s0 < S; s0 += batch) {
    const int64_t nb = std::min(batch, S - s0), N = nb * T;
    QCAL_ASSIGN_OR_RETURN(Tensor lp, model(s0, nb));
    if (lp.numel() != N * V)
      return internal_error("evaluate_logits: model returned " + shape_str(lp.shape) +
                            " logits for " + std::to_string(N) + " rows of vocab " +
                            std::to_string(V));
    log_softmax_rows(lp.ptr(), N, V);
    Tensor lf;
    if (fp) {
      QCAL_ASSIGN_OR_RETURN(lf, (*fp)(s0, nb));
      if (lf.numel() != N * V)
        return internal_error("evaluate_logits: FP logits have the wrong shape");
      log_softmax_rows(lf.ptr(), N, V);
    }
    scorer.add(lp.ptr(), fp ? lf.ptr() : nullptr, s0, 0, N);
  }
  return scorer.result();
}

}  // namespace qcal

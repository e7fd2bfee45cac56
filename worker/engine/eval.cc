// Perplexity, and KL / top-1 agreement against an FP model (see eval.h).
// Letters: B sequences in a batch, T seqlen, H hidden, V vocab, R rows of a
// logits chunk.
#include "worker/engine/eval.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

// Log-softmaxed logits (R, V) of rows [r0, r0+R) of the activations x (B*T, H).
Result<Tensor> log_probs(const LlamaModel& m, const Tensor& x, int64_t r0, int64_t R) {
  const int64_t H = x.dim(1);
  Tensor chunk({R, H});
  std::memcpy(chunk.ptr(), x.ptr() + r0 * H, static_cast<size_t>(R * H) * sizeof(float));
  QCAL_ASSIGN_OR_RETURN(Tensor lp, m.logits(chunk));
  log_softmax_rows(lp.ptr(), R, lp.dim(1));
  return lp;
}

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

}  // namespace

Result<EvalResult> evaluate(const LlamaModel& model, const TokenSequences& data,
                            const LlamaModel* fp_model, int64_t batch) {
  const ModelConfig& c = model.config();
  const int64_t T = data.seqlen, S = data.count(), V = c.vocab_size;
  QCAL_RETURN_IF_ERROR(check_eval_inputs(data, batch));
  if (fp_model && fp_model->config().vocab_size != V)
    return invalid_input("FP model vocab " + std::to_string(fp_model->config().vocab_size) +
                         " differs from the model's " + std::to_string(V));
  const int64_t L =
      std::max(c.num_hidden_layers, fp_model ? fp_model->config().num_hidden_layers : int64_t{0});
  // Logits are produced R rows at a time: at most ~64 Mi floats per model.
  const int64_t max_rows = std::max<int64_t>(1, (int64_t{1} << 26) / V);

  Scorer scorer(data, V, fp_model != nullptr);
  for (int64_t s0 = 0; s0 < S; s0 += batch) {
    const int64_t nb = std::min(batch, S - s0), N = nb * T;
    QCAL_ASSIGN_OR_RETURN(Tensor x, model.embed(data, s0, nb));  // (N, H)
    Tensor xf;                                                   // (N, H_fp)
    if (fp_model) {
      QCAL_ASSIGN_OR_RETURN(xf, fp_model->embed(data, s0, nb));
    }
    for (int64_t l = 0; l < L; ++l) {
      if (l < c.num_hidden_layers) {
        QCAL_ASSIGN_OR_RETURN(LayerWeights w, model.load_layer(l));
        block_forward(c, w, x.ptr(), nb, T);
      }
      if (fp_model && l < fp_model->config().num_hidden_layers) {
        QCAL_ASSIGN_OR_RETURN(LayerWeights w, fp_model->load_layer(l));
        block_forward(fp_model->config(), w, xf.ptr(), nb, T);
      }
    }
    for (int64_t r0 = 0; r0 < N; r0 += max_rows) {
      const int64_t R = std::min(max_rows, N - r0);
      QCAL_ASSIGN_OR_RETURN(Tensor lp, log_probs(model, x, r0, R));  // (R, V)
      Tensor lf;                                                     // (R, V)
      if (fp_model) {
        QCAL_ASSIGN_OR_RETURN(lf, log_probs(*fp_model, xf, r0, R));
      }
      scorer.add(lp.ptr(), fp_model ? lf.ptr() : nullptr, s0, r0, R);
    }
  }
  return scorer.result();
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

// transform "spinquant" (methods.md §4): R1 (residual stream, H×H) and R2 (per
// layer, d×d) learned by Cayley SGD on the Stiefel manifold through the
// fake-quantized model (identity straight-through estimators, §0.2), next-token
// cross-entropy on the calibration sequences. R3 (FWHT on Q/K after RoPE) and R4
// (Hadamard before down_proj) are fixed Hadamards, as in QuaRot. The learning
// needs the whole model's backward: it runs in one process (the "spinquant" task,
// which the planner refuses for models that do not fit a worker); the blocks are
// then deployed, each in its own task, like QuaRot's with the learned rotations.
//
// Where qcal departs from the reference (docs/SPINQUANT.md has the measurements):
// learning starts from exactly QuaRot's rotations and deploys QuaRot's online
// cross-head Hadamard on o_proj's input, so 0 steps are QuaRot bit for bit; the
// weights are fake-quantized (RTN) in training even when GPTQ follows; and the last
// spin_holdout calibration sequences score the rotations during the run, the
// best-scoring ones (the initialization included) being kept, so learning that does
// not help on held-out data falls back to QuaRot.
//
// Each step rotates a copy of the norm-folded model by the current R1 (what
// SpinQuant's QuantizeLinear does on the fly in fp64), runs the whole model with
// R2 as the per-head V/O transform of every block, and chains the weight
// gradients back to R1:  W = W0·R1 (q,k,v,gate,up, lm_head, embedding) gives
// ∂R1 += W0ᵀ·∂W;  W = R1ᵀ·W0 (o, down) gives ∂R1 += W0·∂Wᵀ. R2 enters the block
// twice (pv on the V output side, pv_it on the o input side; equal because R2 is
// orthogonal), so ∂R2 = ∂pv + ∂pv_it.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/rng.h"
#include "kernels/grad.h"
#include "kernels/hadamard.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/methods/rotation.h"
#include "worker/calib/param.h"

namespace qcal::calib {
namespace {

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }
std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// dR (H×H) += Aᵀ·B for A, B (rows, H) (the input-side chain W = W0·R1).
void add_at_b(std::vector<double>& dR, const std::vector<float>& A, const std::vector<float>& B,
              int64_t rows, int64_t H) {
  std::vector<double> a = to_double(A), b = to_double(B);
  gemm_t(true, false, H, H, rows, 1.0, a.data(), H, b.data(), H, 1.0, dR.data(), H);
}
// dR (H×H) += A·Bᵀ for A, B (H, cols) (the output-side chain W = R1ᵀ·W0).
void add_a_bt(std::vector<double>& dR, const std::vector<float>& A, const std::vector<float>& B,
              int64_t H, int64_t cols) {
  std::vector<double> a = to_double(A), b = to_double(B);
  gemm_t(false, true, H, H, cols, 1.0, a.data(), cols, b.data(), cols, 1.0, dR.data(), H);
}

// SpinQuant's training graph for one recipe: the fixed online parts exactly as
// deploy_rotated deploys them (R4 and the cross-head Hadamard unless the recipe
// folds everything, R3 when K is quantized) and the recipe's quantizers with the
// identity STE and fixed clips, weights included (RTN at w_bits) whatever the final
// weight solver. The reference trains at W16 when GPTQ follows (§4.2, §10.4); here
// the W16-trained rotations landed behind QuaRot + GPTQ on the real model, the
// W4-trained ones never did (docs/SPINQUANT.md).
struct TrainGraph {
  std::vector<BlockTransformsT<float>> tf;
  std::vector<BlockClipT<float>> clips;
  BlockQuantSpec qs;
  std::vector<LayerPlan> plans;

  TrainGraph(const ModelConfig& c, const Recipe& r) {
    const int64_t L = c.num_hidden_layers;
    qs = block_quant_spec(r, c, /*training=*/true);
    auto identity_ste = [](FakeQuantSpec& s) {
      s.ste = Ste::kIdentity;
      s.clip = ClipMode::kFixed;
    };
    for (auto& s : qs.act) identity_ste(s);
    for (auto& s : qs.w) identity_ste(s);
    identity_ste(qs.k);
    identity_ste(qs.v);
    std::vector<double> hl, hr;
    const bool fold = r.transforms_fold();
    if (!fold) hadamard_kron_factors(c.intermediate_size, &hl, &hr);
    tf.resize(static_cast<size_t>(L));
    clips.resize(static_cast<size_t>(L));
    for (auto& t : tf) {
      if (!fold) {
        t.d1 = to_float(hl);
        t.d2 = to_float(hr);
        t.d1_it = t.d1;
        t.d2_it = t.d2;
        t.po = to_float(hadamard_matrix(c.num_attention_heads));
        t.po_it = t.po;
      }
      if (r.kv_bits() < 16) {
        t.pk = to_float(hadamard_matrix(c.head_dim));
        t.pk_it = t.pk;
      }
    }
    plans.resize(static_cast<size_t>(L));
    for (size_t l = 0; l < plans.size(); ++l) plans[l] = {&tf[l], &qs, &clips[l]};
  }
  // The model rotated by R1 with R2 as every block's V/O transform (fp32 copies).
  FpModel rotated(const FpModel& base, const std::vector<double>& R1,
                  const std::vector<std::vector<double>>& R2) {
    FpModel m = base;
    rotate_residual(m, R1);
    for (size_t l = 0; l < tf.size(); ++l) {
      tf[l].pv = to_float(R2[l]);
      tf[l].pv_it = tf[l].pv;
    }
    return m;
  }
};

// Cross-entropy of each sequence [first, first + n) of `seqs` through the graph
// (no gradients).
std::vector<double> heldout_losses(TrainGraph& g, const FpModel& base,
                                   const std::vector<double>& R1,
                                   const std::vector<std::vector<double>>& R2,
                                   const TokenSequences& seqs, int64_t first, int64_t n) {
  const FpModel m = g.rotated(base, R1, R2);
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t s = 0; s < n; ++s)
    out[static_cast<size_t>(s)] =
        fp_model_loss(m, seqs.seq(first + s), 1, seqs.seqlen, nullptr, &g.plans);
  return out;
}

// The learning loop (fp64 Stiefel masters R1, R2 in place). The last spin_holdout
// calibration sequences are held out: the rotations are scored on them before the
// first step (the QuaRot initialization), every tenth of the run and after the
// last step; the best-scoring rotations among those significantly better than the
// initialization are kept, else the initialization, so the result is never worse
// than QuaRot's on held-out data of the training objective (report: spin_heldout
// [{step, loss, significant}], spin_kept_step, spin_fallback = the initialization
// was kept).
//
// Data parallel (rank of ranks, `sum` adding doubles across them; empty: one rank):
// each step's B sequences and the held-out ones are split over the ranks; the loss and
// ∂R1, ∂R2, each weighted by the rank's share of the sequences, are summed before the
// Stiefel step, so every rank takes the same step (one rank: the arithmetic is that of
// the single-process loop, unchanged).
Status spinquant_learn(const FpModel& folded, const TokenSequences& calib, const Recipe& r,
                       std::vector<double>* R1, std::vector<std::vector<double>>* R2,
                       nlohmann::json* report, const ProgressFn& progress, int rank, int ranks,
                       const SumFn& sum) {
  const ModelConfig& c = folded.config;
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim;
  const int64_t L = c.num_hidden_layers, V = c.vocab_size;
  if (calib.count() < 1) return invalid_input("spinquant: no calibration sequences");
  QCAL_ASSIGN_OR_RETURN(int64_t kh, hadamard_k(H));
  QCAL_ASSIGN_OR_RETURN(int64_t kd, hadamard_k(d));
  QCAL_ASSIGN_OR_RETURN(int64_t ki, hadamard_k(I));
  (void)kh, (void)kd, (void)ki;

  // Initialization: exactly QuaRot's rotations (R1 = the seeded random Hadamard, R2 =
  // the Hadamard of order d in every layer), so that 0 steps deploy QuaRot bit for
  // bit. The reference draws R2 as a random Hadamard too; the sign diagonal is one
  // of the things Cayley SGD can learn.
  *R1 = random_hadamard_matrix(H, r.seed());
  R2->assign(static_cast<size_t>(L), hadamard_matrix(d));

  const FpModel& base = folded;
  TrainGraph graph(c, r);

  const int64_t steps = r.i("spin_steps");
  const int64_t held = std::min<int64_t>(r.i("spin_holdout"), calib.count() - 1);
  const int64_t ntrain = calib.count() - held;
  const int64_t B = std::min<int64_t>(r.i("spin_bsz"), ntrain), T = calib.seqlen;
  const int64_t every = std::max<int64_t>(1, steps / 10);
  std::vector<double> best_R1 = *R1;
  std::vector<std::vector<double>> best_R2 = *R2;
  double best = 0.0;
  int64_t best_step = 0;
  std::vector<double> init;  // per held-out sequence, at step 0
  const bool parallel = ranks > 1 && sum;
  auto score = [&](int64_t step) -> Status {
    if (held <= 0) return Status::ok();
    std::vector<double> ls;
    if (parallel) {
      // This rank's share of the held-out sequences; the others' entries are 0 here.
      const int64_t h0 = held * rank / ranks, h1 = held * (rank + 1) / ranks;
      ls.assign(static_cast<size_t>(held), 0.0);
      const std::vector<double> part =
          heldout_losses(graph, base, *R1, *R2, calib, ntrain + h0, h1 - h0);
      std::copy(part.begin(), part.end(), ls.begin() + h0);
      QCAL_RETURN_IF_ERROR(sum(ls.data(), held));
    } else {
      ls = heldout_losses(graph, base, *R1, *R2, calib, ntrain, held);
    }
    double h = 0.0;
    for (double x : ls) h += x / static_cast<double>(held);
    bool significant = false;
    if (step == 0) {
      init = ls;
      best = h;
    } else {
      // Kept only when better than the initialization by more than noise: the mean
      // per-sequence gain must exceed twice its standard error (and 1e-6 relative,
      // float noise: with the quantizers off every rotation scores the same).
      double gain = 0.0, var = 0.0;
      for (size_t i = 0; i < ls.size(); ++i) gain += (init[i] - ls[i]) / static_cast<double>(held);
      for (size_t i = 0; i < ls.size(); ++i) {
        const double e = init[i] - ls[i] - gain;
        var += e * e / static_cast<double>(std::max<int64_t>(held - 1, 1));
      }
      const double se = std::sqrt(var / static_cast<double>(held));
      significant = std::isfinite(h) && gain > 2.0 * se && gain > 1e-6 * std::fabs(best);
      if (significant && h < best) {
        best = h, best_step = step;
        best_R1 = *R1, best_R2 = *R2;
      }
    }
    if (report)
      (*report)["spin_heldout"].push_back(
          {{"step", step}, {"loss", h}, {"significant", significant}});
    LOG_INFO << "spinquant: held-out loss " << h << " after " << step << " steps"
             << (significant ? " (significantly below the start)" : "");
    return Status::ok();
  };
  QCAL_RETURN_IF_ERROR(score(0));

  Rng rng(r.seed() ^ 0x5e1f5e1full);
  std::vector<int32_t> tokens(static_cast<size_t>(B * T));
  int64_t next_seq = 0;
  // One step; the rotated copy and its gradients are freed before the scoring.
  auto train_step = [&](int64_t step) -> Status {
    for (int64_t b = 0; b < B; ++b) {  // fixed order, cycling (the reference does not shuffle)
      const int32_t* s = calib.seq(next_seq);
      std::copy(s, s + T, tokens.begin() + b * T);
      next_seq = (next_seq + 1) % ntrain;
    }
    // This rank's sequences of the step (all of them on one rank).
    const int64_t s0 = parallel ? B * rank / ranks : 0, s1 = parallel ? B * (rank + 1) / ranks : B;
    std::vector<double> dR1(static_cast<size_t>(H * H), 0.0);
    std::vector<std::vector<double>> dR2(static_cast<size_t>(L),
                                         std::vector<double>(static_cast<size_t>(d * d), 0.0));
    double loss = 0.0;
    if (s1 > s0) {
      FpModel m = graph.rotated(base, *R1, *R2);
      FpModelGrads g;
      loss = fp_model_loss(m, tokens.data() + s0 * T, s1 - s0, T, &g, &graph.plans);
      // ∂R1 from every rotated weight of the model (W0 = the unrotated base weights).
      add_at_b(dR1, base.embed, g.embed, V, H);
      add_at_b(dR1, base.lm_head, g.lm_head, V, H);
      for (int64_t l = 0; l < L; ++l) {
        const auto& w0 = base.layers[static_cast<size_t>(l)].w;
        const auto& dw = g.layers[static_cast<size_t>(l)].w.w;
        for (int p : {kQ, kK, kV, kGate, kUp}) {
          const int64_t rows = static_cast<int64_t>(w0[p].size()) / H;
          add_at_b(dR1, w0[p], dw[p], rows, H);
        }
        for (int p : {kO, kDown}) {
          const int64_t cols = static_cast<int64_t>(w0[p].size()) / H;
          add_a_bt(dR1, w0[p], dw[p], H, cols);
        }
        const auto& gt = g.layers[static_cast<size_t>(l)].t;
        std::vector<double>& d2 = dR2[static_cast<size_t>(l)];
        for (size_t i = 0; i < d2.size(); ++i) {
          if (!gt.pv.empty()) d2[i] += gt.pv[i];
          if (!gt.pv_it.empty()) d2[i] += gt.pv_it[i];
        }
      }
    }
    if (parallel) {
      // The mean over the step's sequences: each rank's mean weighted by its share.
      const double w = static_cast<double>(s1 - s0) / static_cast<double>(B);
      std::vector<SumSpan> spans = {{&loss, 1}, {dR1.data(), dR1.size()}};
      for (auto& d2 : dR2) spans.push_back({d2.data(), d2.size()});
      for (const SumSpan& sp : spans)
        for (size_t i = 0; i < sp.n; ++i) sp.data[i] *= w;
      QCAL_RETURN_IF_ERROR(sum_spans(sum, spans));
    }
    if (!std::isfinite(loss))
      return invalid_input("spinquant: step " + std::to_string(step) + ": loss is " +
                           std::to_string(loss) + " (lower --spin-lr)");
    if (report) (*report)["spin_loss"].push_back(loss);
    if (progress) progress("spinquant", step, steps);
    const double lr = cosine_lr(r.f("spin_lr"), 0.0, step, steps);
    stiefel_sgd_step(*R1, dR1, H, lr, rng.below(101) == 0);
    for (int64_t l = 0; l < L; ++l)
      stiefel_sgd_step((*R2)[static_cast<size_t>(l)], dR2[static_cast<size_t>(l)], d, lr,
                       rng.below(101) == 0);
    if (step % 10 == 0 || step + 1 == steps)
      LOG_INFO << "spinquant: step " << step << " loss " << loss << " lr " << lr;
    return Status::ok();
  };
  for (int64_t step = 0; step < steps; ++step) {
    QCAL_RETURN_IF_ERROR(train_step(step));
    if ((step + 1) % every == 0 || step + 1 == steps) QCAL_RETURN_IF_ERROR(score(step + 1));
  }
  if (held > 0) {
    *R1 = std::move(best_R1);
    *R2 = std::move(best_R2);
  }
  if (report && held > 0) {
    (*report)["spin_kept_step"] = best_step;
    (*report)["spin_fallback"] = steps > 0 && best_step == 0;
  }
  if (held > 0 && steps > 0 && best_step == 0)
    LOG_WARN << "spinquant: the learned rotations do not beat the initial (QuaRot) ones on "
                "the held-out sequences; keeping the initial rotations";
  return Status::ok();
}

class SpinQuant : public TransformMethod {
 public:
  Result<Fitted> learn(const WholeModelInputs& in, nlohmann::json* report) const override {
    const Recipe& r = *in.r;
    QCAL_ASSIGN_OR_RETURN(FpModel m, load_fp_model(in.model_dir));
    fold_norms(m, r.b("embed_mean_sub"));
    std::vector<double> R1;
    std::vector<std::vector<double>> R2;
    QCAL_RETURN_IF_ERROR(
        spinquant_learn(m, *in.calib, r, &R1, &R2, report, in.progress, in.rank, in.ranks, in.sum));
    Fitted f;
    f.arrays["R1"] = std::move(R1);
    for (size_t l = 0; l < R2.size(); ++l) f.arrays["R2." + std::to_string(l)] = std::move(R2[l]);
    return f;
  }
  Result<Deployed> deploy(const BlockInputs& in, const Fitted&) const override {
    const std::string r2 = "R2." + std::to_string(in.layer);
    if (!in.global || !in.global->has("R1") || !in.global->has(r2))
      return internal_error("spinquant: layer " + std::to_string(in.layer) +
                            " has no learned rotations");
    const std::vector<double>& R1 = in.R1 ? *in.R1 : in.global->at("R1");
    return deploy_rotated(in, R1, in.global->at(r2), /*heads_online=*/true);
  }
  std::vector<double> residual_rotation(const ModelConfig&, const Recipe&,
                                        const Fitted* global) const override {
    if (!global || !global->has("R1")) return {};
    return global->at("R1");
  }
  bool folds_final_norm() const override { return true; }
};

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_TRANSFORM("spinquant", qcal::calib::SpinQuant)

// transform "flatquant" (methods.md §5): per block, learned Kronecker affine
// transforms P = U·diag(σ)·Vᵀ (a1/a2 on the attention input, u1/u2 on the MLP
// input, d1/d2 on down's input, po across heads, pv on V, pk on K/Q), diagonal
// smoothing (ca, cu, cd), learnable weight clipping (LWC) and activation
// clipping (LAC), trained on the block's FP inputs to reproduce its FP outputs
// (§5.3: MSE / stopgrad(MSE), AdamW, cosine schedule). Blocks are independent:
// each is one "flatquant-LLLL" task reading X_l and X_{l+1} from the capture in
// minibatches. The fit is the fp64 parameters (a few MB); deploy() rebuilds the
// transforms and reparameterizes in float64 (§5.4): the weight-side transforms
// and the LWC clamp fold into the weights, the activation side stays online.
// flat_fold (weight-only) learns only what folds (the diagonals, pv, LWC): nothing
// stays online and the result is a plain checkpoint (GPTQ / compressed-tensors).
//
// Data parallel: each minibatch's sequences are split over the ranks; the loss's
// SSE and every gradient are summed across them (SumFn) before the step, so a
// group computes what one rank computes, up to summation order. With one rank
// and a minibatch that fits one micro-batch the arithmetic is exactly that of a
// single forward/backward of the minibatch.
#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common/clock.h"
#include "common/log.h"
#include "common/rng.h"
#include "worker/calib/method.h"
#include "worker/calib/param.h"

namespace qcal::calib {
namespace {

using Vec = std::vector<double>;
Vec to_d(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

// Factor slots: a1 a2 u1 u2 d1 d2 po pv pk.
constexpr int kNumFactors = 9;
const char* const kFactorNames[kNumFactors] = {"a1", "a2", "u1", "u2", "d1",
                                               "d2", "po", "pv", "pk"};
template <typename T>
std::vector<T>& slot_p(BlockTransformsT<T>& t, int i) {
  switch (i) {
    case 0: return t.a1;
    case 1: return t.a2;
    case 2: return t.u1;
    case 3: return t.u2;
    case 4: return t.d1;
    case 5: return t.d2;
    case 6: return t.po;
    case 7: return t.pv;
    default: return t.pk;
  }
}
template <typename T>
std::vector<T>& slot_it(BlockTransformsT<T>& t, int i) {
  switch (i) {
    case 0: return t.a1_it;
    case 1: return t.a2_it;
    case 2: return t.u1_it;
    case 3: return t.u2_it;
    case 4: return t.d1_it;
    case 5: return t.d2_it;
    case 6: return t.po_it;
    case 7: return t.pv_it;
    default: return t.pk_it;
  }
}
const char* const kDiagNames[3] = {"ca", "cu", "cd"};
template <typename T>
std::vector<T>& slot_diag(BlockTransformsT<T>& t, int i) {
  return i == 0 ? t.ca : (i == 1 ? t.cu : t.cd);
}

// FP64 master parameters of one layer. Not movable once registered with AdamW.
struct FlatParams {
  std::array<SvdFactor, kNumFactors> f;  // n == 0: absent
  std::array<Vec, 3> diag;               // empty: absent
  BlockClipT<double> clip;
};

template <typename T>
void materialize(const FlatParams& fp, BlockTransformsT<T>* t) {
  for (int i = 0; i < kNumFactors; ++i) {
    if (fp.f[i].n == 0) continue;
    Vec P, Pit;
    fp.f[i].materialize(&P, &Pit);
    slot_p(*t, i).assign(P.begin(), P.end());
    slot_it(*t, i).assign(Pit.begin(), Pit.end());
  }
  for (int i = 0; i < 3; ++i) slot_diag(*t, i).assign(fp.diag[i].begin(), fp.diag[i].end());
}

// sq-style diagonal (§5.1): c_j = max(w_j^(1−α) / a_j^α, 1e-5), w_j = max |W_ij| over the
// rows of every linear in `projs`.
Vec diag_init(const BlockWeightsT<float>& w, std::initializer_list<int> projs, int64_t n,
              const std::vector<float>& act_max, double alpha) {
  Vec wmax(static_cast<size_t>(n), 0.0);
  for (int p : projs) {
    const auto& W = w.w[p];
    const int64_t rows = static_cast<int64_t>(W.size()) / n;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j)
        wmax[static_cast<size_t>(j)] =
            std::max(wmax[static_cast<size_t>(j)],
                     std::fabs(static_cast<double>(W[static_cast<size_t>(r * n + j)])));
  }
  Vec c(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    const double a = act_max[static_cast<size_t>(j)];
    c[static_cast<size_t>(j)] =
        std::max(std::pow(wmax[static_cast<size_t>(j)], 1.0 - alpha) / std::pow(a, alpha), 1e-5);
  }
  return c;
}

bool finite_all(const Vec& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

// The clip parameters by name (LAC: one β per quantizer in *_max, *_min tied; LWC: a
// (max, min) pair per row·group).
template <typename C, typename F>
void for_each_clip(C& clip, F&& f) {
  for (int p = 0; p < kNumProj; ++p) {
    const std::string n = kProjNames[p];
    f("act_max." + n, clip.act_max[p]);
    f("w_max." + n, clip.w_max[p]);
    f("w_min." + n, clip.w_min[p]);
  }
  f("k_max", clip.k_max);
  f("v_max", clip.v_max);
}

void tie_lac(BlockClipT<double>& c) {
  for (int p = 0; p < kNumProj; ++p)
    if (!c.act_max[p].empty()) c.act_min[p] = c.act_max[p];
  if (!c.k_max.empty()) c.k_min = c.k_max;
  if (!c.v_max.empty()) c.v_min = c.v_max;
}

Fitted to_fitted(const FlatParams& fp) {
  Fitted out;
  for (int i = 0; i < kNumFactors; ++i) {
    if (fp.f[i].n == 0) continue;
    const std::string n = kFactorNames[i];
    out.arrays[n + ".u_raw"] = fp.f[i].u_raw;
    out.arrays[n + ".v_raw"] = fp.f[i].v_raw;
    out.arrays[n + ".sigma"] = fp.f[i].sigma;
  }
  for (int i = 0; i < 3; ++i)
    if (!fp.diag[i].empty()) out.arrays[kDiagNames[i]] = fp.diag[i];
  for_each_clip(fp.clip, [&](const std::string& n, const Vec& v) {
    if (!v.empty()) out.arrays["clip." + n] = v;
  });
  return out;
}

Result<std::unique_ptr<FlatParams>> from_fitted(const Fitted& f, int64_t layer) {
  auto fp = std::make_unique<FlatParams>();
  const std::string at = "flatquant: layer " + std::to_string(layer) + ": ";
  for (int i = 0; i < kNumFactors; ++i) {
    const std::string n = kFactorNames[i];
    if (!f.has(n + ".sigma")) continue;
    SvdFactor& s = fp->f[i];
    s.sigma = f.at(n + ".sigma");
    s.n = static_cast<int64_t>(s.sigma.size());
    if (!f.has(n + ".u_raw") || !f.has(n + ".v_raw") ||
        f.at(n + ".u_raw").size() != static_cast<size_t>(s.n * s.n) ||
        f.at(n + ".v_raw").size() != static_cast<size_t>(s.n * s.n))
      return corrupt(at + "factor " + n + " is incomplete");
    s.u_raw = f.at(n + ".u_raw");
    s.v_raw = f.at(n + ".v_raw");
  }
  for (int i = 0; i < 3; ++i)
    if (f.has(kDiagNames[i])) fp->diag[i] = f.at(kDiagNames[i]);
  for_each_clip(fp->clip, [&](const std::string& n, Vec& v) {
    if (f.has("clip." + n)) v = f.at("clip." + n);
  });
  tie_lac(fp->clip);
  return fp;
}

class FlatQuant : public TransformMethod {
 public:
  Result<Fitted> fit(const BlockInputs& in, nlohmann::json* report) const override;
  Result<Deployed> deploy(const BlockInputs& in, const Fitted& fitted) const override;
};

Result<Fitted> FlatQuant::fit(const BlockInputs& in, nlohmann::json* report) const {
  const ModelConfig& c = *in.c;
  const Recipe& r = *in.r;
  const int64_t l = in.layer;
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim,
                nh = c.num_attention_heads;
  if (!in.x || !in.y || !in.stats)
    return internal_error("flatquant: layer " + std::to_string(l) +
                          " needs FP inputs, targets and statistics");
  const BlockWeightsT<float>& w = *in.w;
  const ActStats& st = *in.stats;
  const int64_t N = in.x->sequences(), T = in.x->seqlen();
  if (in.y->sequences() != N || in.y->seqlen() != T || in.x->width() != H || in.y->width() != H)
    return invalid_input("flatquant: layer " + std::to_string(l) +
                         ": inputs and targets do not have the same N x T x H");
  // flat_fold (weight-only): only V's per-head transform pv, whose two sides are v's
  // output rows and o's input columns, folds into quantized weights; the Kronecker
  // pairs and po would stay online.
  const bool fold = r.flat_fold();
  std::pair<int64_t, int64_t> hdims{0, 0}, idims{0, 0};
  if (!fold) {
    QCAL_ASSIGN_OR_RETURN(hdims, decompose_dim(H));
    QCAL_ASSIGN_OR_RETURN(idims, decompose_dim(I));
  }
  Rng rng(r.seed() * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull * static_cast<uint64_t>(l + 1));

  auto params = std::make_unique<FlatParams>();
  FlatParams& fp = *params;
  const int64_t sizes[kNumFactors] = {hdims.first,
                                      hdims.second,
                                      hdims.first,
                                      hdims.second,
                                      idims.first,
                                      idims.second,
                                      fold ? 0 : nh,
                                      d,
                                      r.kv_bits() < 16 ? d : 0};
  for (int i = 0; i < kNumFactors; ++i)
    if (sizes[i] > 0) fp.f[i] = SvdFactor::init_random(sizes[i], rng);
  if (r.b("add_diag")) {
    const double alpha = r.f("diag_alpha");
    fp.diag[0] = diag_init(w, {kQ, kK, kV}, H, st.attn, alpha);
    fp.diag[1] = diag_init(w, {kGate, kUp}, H, st.mlp, alpha);
    fp.diag[2] = diag_init(w, {kDown}, I, st.down, alpha);
  }
  const BlockQuantSpec spec = block_quant_spec(r, c, /*training=*/true);
  fp.clip = init_clip_params<double>(spec, c, 4.0);

  // Parameter groups (§5.3): transforms + diagonals at flat_lr, clips at 10×, both
  // cosine-annealed to the same absolute eta_min.
  AdamW opt_t, opt_c;
  for (int i = 0; i < kNumFactors; ++i) {
    if (fp.f[i].n == 0) continue;
    opt_t.add(&fp.f[i].u_raw);
    opt_t.add(&fp.f[i].v_raw);
    opt_t.add(&fp.f[i].sigma);
  }
  for (int i = 0; i < 3; ++i)
    if (!fp.diag[i].empty()) opt_t.add(&fp.diag[i]);
  // LAC: one β per quantizer (the native kernels take one clip ratio for both signs),
  // kept in *_max and copied to *_min; LWC: a (max, min) pair per row·group.
  for (int p = 0; p < kNumProj; ++p)
    if (!fp.clip.act_max[p].empty()) opt_c.add(&fp.clip.act_max[p]);
  if (!fp.clip.k_max.empty()) opt_c.add(&fp.clip.k_max);
  if (!fp.clip.v_max.empty()) opt_c.add(&fp.clip.v_max);
  for (int p = 0; p < kNumProj; ++p) {
    if (!fp.clip.w_max[p].empty()) opt_c.add(&fp.clip.w_max[p]);
    if (!fp.clip.w_min[p].empty()) opt_c.add(&fp.clip.w_min[p]);
  }
  tie_lac(fp.clip);

  const int64_t bsz = std::min(r.i("cali_bsz"), N);
  const int64_t nb = (N + bsz - 1) / bsz;
  const int64_t total = r.i("epochs") * nb;
  const double flat_lr = r.f("flat_lr");
  const double eta_min = flat_lr * 1e-3;  // 5e-6 at the default 5e-3
  const int64_t micro = std::max<int64_t>(1, std::min(r.batch(), bsz));
  const int ranks = std::max(1, in.ranks);
  std::vector<float> xb(static_cast<size_t>(micro * T * H)), yb(xb.size()), out(xb.size()),
      dy(xb.size());
  const std::string where = "flatquant: layer " + std::to_string(l) + " step ";
  auto lose = [](double v) { return std::isnan(v) ? std::string("NaN") : std::string("inf"); };
  double loss_first = 0, loss_last = 0;
  const double t0 = steady_seconds();

  for (int64_t step = 0; step < total; ++step) {
    if (in.should_stop && in.should_stop())
      return unavailable("flatquant: layer " + std::to_string(l) + " stopped at step " +
                         std::to_string(step) + " of " + std::to_string(total));
    const int64_t j = step % nb, b0 = j * bsz, B = std::min(bsz, N - b0);
    // This rank's part of the minibatch.
    const int64_t r0 = b0 + B * in.rank / ranks, r1 = b0 + B * (in.rank + 1) / ranks;
    // One forward/backward of the whole minibatch on one rank: the gradient of
    // MSE/stopgrad(MSE) directly (the exact arithmetic of the single-process trainer);
    // otherwise the gradient of SSE/n, summed over micro-batches and ranks, then / MSE.
    const bool single = ranks == 1 && r1 - r0 <= micro;
    BlockTransformsT<float> tf;
    materialize(fp, &tf);
    const BlockClipT<float> cf = cast_clip<float>(fp.clip);
    QBlock<float> qb(c, &w, &tf, &spec, &cf);
    const double n = static_cast<double>(B * T * H);
    BlockGradsT<float> g;
    BackwardOptions bo;
    bo.input = false;
    bo.transforms = true;
    bo.clip = true;
    bo.weights = false;
    double sse = 0.0;
    for (int64_t m0 = r0; m0 < r1; m0 += micro) {
      const int64_t mb = std::min(micro, r1 - m0);
      const int64_t e = mb * T * H;
      QCAL_RETURN_IF_ERROR(in.x->read(m0, mb, xb.data()));
      QCAL_RETURN_IF_ERROR(in.y->read(m0, mb, yb.data()));
      auto tape = make_tape<float>();
      qb.forward(xb.data(), out.data(), mb, T, tape.get());
      double s = 0.0;
      for (int64_t i = 0; i < e; ++i) {
        const double d2 =
            static_cast<double>(out[static_cast<size_t>(i)]) - yb[static_cast<size_t>(i)];
        s += d2 * d2;
      }
      sse += s;
      double k;
      if (single) {
        const double loss = sse / n;
        if (!std::isfinite(loss))
          return internal_error(where + std::to_string(step) + ": loss is " + lose(loss));
        if (loss == 0.0) break;
        k = 2.0 / (n * loss);  // d(MSE / stopgrad(MSE)) / d out = 2 (out − y) / (n · MSE)
      } else {
        k = 2.0 / n;  // d(SSE / n) / d out
      }
      for (int64_t i = 0; i < e; ++i)
        dy[static_cast<size_t>(i)] = static_cast<float>(
            k * (static_cast<double>(out[static_cast<size_t>(i)]) - yb[static_cast<size_t>(i)]));
      qb.backward(*tape, dy.data(), &g, bo);
    }

    // Gradients as fp64, in a fixed order: transforms (raw P / P⁻ᵀ), diagonals, clips.
    std::vector<Vec*> flat;
    std::vector<Vec> gp(kNumFactors), git(kNumFactors), gd(3);
    for (int i = 0; i < kNumFactors; ++i) {
      if (fp.f[i].n == 0) continue;
      gp[i] = to_d(slot_p(g.t, i));
      git[i] = to_d(slot_it(g.t, i));
      // Empty = zero (SvdFactor::backward takes either); sized for the rank sum.
      const size_t nn = static_cast<size_t>(fp.f[i].n * fp.f[i].n);
      if (!single && gp[i].empty()) gp[i].assign(nn, 0.0);
      if (!single && git[i].empty()) git[i].assign(nn, 0.0);
      flat.push_back(&gp[i]);
      flat.push_back(&git[i]);
    }
    for (int i = 0; i < 3; ++i) {
      if (fp.diag[i].empty()) continue;
      gd[i] = to_d(slot_diag(g.t, i));
      if (!single && gd[i].empty()) gd[i].assign(fp.diag[i].size(), 0.0);
      flat.push_back(&gd[i]);
    }
    BlockClipT<double> gc;
    {
      const BlockClipT<float>& s = g.clip;
      auto tied = [](const std::vector<float>& a, const std::vector<float>& b2) {
        Vec t(1, 0.0);
        if (!a.empty()) t[0] += a[0];
        if (!b2.empty()) t[0] += b2[0];
        return t;
      };
      auto sized = [single](const std::vector<float>& a, size_t want) {
        Vec t = to_d(a);
        if (!single && t.empty()) t.assign(want, 0.0);
        return t;
      };
      for (int p = 0; p < kNumProj; ++p) {
        if (!fp.clip.act_max[p].empty()) gc.act_max[p] = tied(s.act_max[p], s.act_min[p]);
        if (!fp.clip.w_max[p].empty()) gc.w_max[p] = sized(s.w_max[p], fp.clip.w_max[p].size());
        if (!fp.clip.w_min[p].empty()) gc.w_min[p] = sized(s.w_min[p], fp.clip.w_min[p].size());
      }
      if (!fp.clip.k_max.empty()) gc.k_max = tied(s.k_max, s.k_min);
      if (!fp.clip.v_max.empty()) gc.v_max = tied(s.v_max, s.v_min);
    }
    for (int p = 0; p < kNumProj; ++p)
      for (Vec* v : {&gc.act_max[p], &gc.w_max[p], &gc.w_min[p]})
        if (!v->empty()) flat.push_back(v);
    for (Vec* v : {&gc.k_max, &gc.v_max})
      if (!v->empty()) flat.push_back(v);
    double loss = sse / n;
    if (!single) {
      // Sum the partial SSE and gradients across the ranks, then divide by the MSE.
      if (in.sum && ranks > 1) {
        std::vector<SumSpan> spans = {{&sse, 1}};
        for (Vec* v : flat) spans.push_back({v->data(), v->size()});
        QCAL_RETURN_IF_ERROR(sum_spans(in.sum, spans));
        loss = sse / n;
      }
      if (!std::isfinite(loss))
        return internal_error(where + std::to_string(step) + ": loss is " + lose(loss));
      if (loss > 0.0) {
        const double inv = 1.0 / loss;
        for (Vec* v : flat)
          for (double& x : *v) x *= inv;
      }
    }
    if (step == 0) loss_first = loss;
    loss_last = loss;
    if (loss == 0.0) continue;  // exact already: no gradient (and MSE/MSE is undefined)

    std::vector<Vec> gt, gcl;
    for (int i = 0; i < kNumFactors; ++i) {
      if (fp.f[i].n == 0) continue;
      Vec du, dv, ds;
      fp.f[i].backward(gp[i], git[i], &du, &dv, &ds);
      for (Vec* v : {&du, &dv, &ds})
        if (!finite_all(*v))
          return internal_error(where + std::to_string(step) + ": gradient of " + kFactorNames[i] +
                                " is not finite");
      gt.push_back(std::move(du));
      gt.push_back(std::move(dv));
      gt.push_back(std::move(ds));
    }
    for (int i = 0; i < 3; ++i) {
      if (fp.diag[i].empty()) continue;
      if (!finite_all(gd[i]))
        return internal_error(where + std::to_string(step) + ": gradient of " + kDiagNames[i] +
                              " is not finite");
      gt.push_back(std::move(gd[i]));
    }
    // Order of opt_c: act (LAC) per linear, k, v, then LWC (max, min) per linear.
    for (int p = 0; p < kNumProj; ++p)
      if (!fp.clip.act_max[p].empty()) gcl.push_back(gc.act_max[p]);
    if (!fp.clip.k_max.empty()) gcl.push_back(gc.k_max);
    if (!fp.clip.v_max.empty()) gcl.push_back(gc.v_max);
    for (int p = 0; p < kNumProj; ++p) {
      if (!fp.clip.w_max[p].empty()) gcl.push_back(gc.w_max[p]);
      if (!fp.clip.w_min[p].empty()) gcl.push_back(gc.w_min[p]);
    }
    for (const Vec& v : gcl)
      if (!finite_all(v))
        return internal_error(where + std::to_string(step) +
                              ": gradient of a clip parameter is not finite");
    opt_t.step(gt, cosine_lr(flat_lr, eta_min, step, total));
    opt_c.step(gcl, cosine_lr(10.0 * flat_lr, eta_min, step, total));
    tie_lac(fp.clip);
    if (in.progress && (step % std::max<int64_t>(1, total / 8) == 0 || step + 1 == total))
      in.progress("flatquant", step, total);
  }
  BlockTransformsT<double> td;
  materialize(fp, &td);
  for (int i = 0; i < kNumFactors; ++i)
    if (!finite_all(slot_p(td, i)) || !finite_all(slot_it(td, i)))
      return internal_error("flatquant: layer " + std::to_string(l) + ": transform " +
                            kFactorNames[i] + " is not finite after training");
  if (report) {
    (*report)["loss_first"] = loss_first;
    (*report)["loss_last"] = loss_last;
    (*report)["steps"] = total;
    (*report)["seconds"] = steady_seconds() - t0;
  }
  LOG_INFO << "flatquant: layer " << l << " loss " << loss_first << " -> " << loss_last;
  return to_fitted(fp);
}

Result<Deployed> FlatQuant::deploy(const BlockInputs& in, const Fitted& fitted) const {
  const ModelConfig& c = *in.c;
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<FlatParams> fp, from_fitted(fitted, in.layer));
  if (fp->f[7].n == 0 || (fp->f[0].n == 0) != in.r->flat_fold())  // pv, a1
    return internal_error("flatquant: layer " + std::to_string(in.layer) +
                          " has no trained transform of this recipe's kind");
  BlockTransformsT<double> td;
  materialize(*fp, &td);
  for (int i = 0; i < kNumFactors; ++i)
    if (!finite_all(slot_p(td, i)) || !finite_all(slot_it(td, i)))
      return internal_error("flatquant: layer " + std::to_string(in.layer) + ": transform " +
                            kFactorNames[i] + " is not finite");
  // Reparameterize in float64 (§5.4): effective weights with the LWC clamp baked in —
  // except for flat_fold with GPTQ weights, where GPTQ picks each row's range itself
  // (babyllama W4A16, KL on held-out text: clamp baked 0.0258, not baked 0.0212, LWC
  // off 0.0209, GPTQ alone 0.0235).
  BlockQuantSpec spec = block_quant_spec(*in.r, c, /*training=*/true);
  if (in.r->flat_fold() && in.r->gptq())
    for (int p = 0; p < kNumProj; ++p) {
      spec.w[p].clip = ClipMode::kFixed;  // the learned w_max / w_min are then not read
      spec.w[p].lwc_range = false;
    }
  Deployed dl = deploy_block(c, *in.w, td, spec, fp->clip);
  dl.q = deployed_spec(*in.r, c, &fp->clip);
  return dl;
}

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_TRANSFORM("flatquant", qcal::calib::FlatQuant)

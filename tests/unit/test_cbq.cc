// labels: unit
// CBQ (worker/calib/cbq.h): float64 finite-difference checks of the LoRA-Rounding
// quantizer (step sizes, A1, A2 with floor held fixed through a RoundTape), of the
// L_com regularizer and of the window loss; hardening; CFP on injected weight and
// activation outliers (and a Gaussian-only tensor left alone); the window plan and
// the explicit window state; and, on a 4-layer synthetic LLaMA with outlier
// channels (H 64), W2A16 g32: CBQ windows (2, overlap 1) vs plain RTN vs per-block
// reconstruction (k = 1), final-output MSE vs FP on held-out tokens.
// QCAL_CBQ_SWEEP=1 runs the ablation grid behind the constants in cbq.h (slow).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common/model_dir.h"
#include "common/rng.h"
#include "tests/unit/test_util.h"
#include "worker/calib/cbq.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/qblock.h"
#include "worker/engine/quantizer.h"
#include "worker/engine/synth.h"

namespace qcal::calib {
namespace {

std::vector<double> gaussian(size_t n, Rng& rng, double sd = 1.0) {
  std::vector<double> v(n);
  for (auto& x : v) x = rng.normal() * sd;
  return v;
}

// ---------------------------------------------------------------- LoRA-Rounding FD

struct LoraCase {
  LoraRoundSpec spec;
  int64_t R = 6, C = 10;
  std::vector<double> W, c, m;  // weight, loss weights (L = Σ m ⊙ (c ⊙ Ŵ + ½ Ŵ²))
  int clamped = 0;
  bool hard = false;  // straight-through hard forward
  LoraRoundParams<double> p;
};

LoraCase make_case(int rank, int64_t group, uint64_t seed, bool hard = false) {
  LoraCase k;
  k.hard = hard;
  k.spec.bits = 3;
  k.spec.group = group;
  k.spec.rank = rank;
  Rng rng(seed);
  k.W = gaussian(static_cast<size_t>(k.R * k.C), rng, 0.5);
  k.c = gaussian(k.W.size(), rng);
  std::vector<double> s = lora_round_init_scale(k.spec, k.W.data(), k.R, k.C);
  // Move every step size off absmax/qmax (where the absmax element sits exactly on the
  // clamp's kink) and shrink some so the clamp is active for a few elements.
  for (auto& v : s) v *= 0.5 + 0.6 * rng.uniform();
  k.p = lora_round_init(k.spec, k.W.data(), k.R, k.C, s, LoraInit::kResidual, seed);
  // Move A2 off zero so every path carries gradient.
  for (auto& a : k.p.a2) a = rng.normal() * 0.7;
  // The straight-through surrogate has a kink where the pre-clamp q = floor(v) + h
  // (round(v) without rounding parameters) lands exactly on a grid bound (always, for
  // an element that rounds to the bound; with h clipped to exactly 0 or 1): the
  // analytic gradient takes the inside side there (PyTorch's clamp passes the
  // gradient at the bound), central differences average both sides. Such elements
  // get loss weight 0; strictly clamped ones stay (k.clamped counts them).
  const int64_t G = k.spec.groups(k.C), gc = k.spec.group_cols(k.C);
  const int64_t r = rank > 0 ? static_cast<int64_t>(k.p.a1.size()) / k.R : 0;
  k.m.assign(k.W.size(), 1.0);
  for (int64_t i = 0; i < k.R; ++i)
    for (int64_t j = 0; j < k.C; ++j) {
      const double v = k.W[i * k.C + j] / k.p.scale[i * G + j / gc];
      double q = r > 0 ? std::floor(v) : std::nearbyint(v);
      if (r > 0) {
        double V = k.p.v0[i * k.C + j];
        for (int64_t t = 0; t < r; ++t) V += k.p.a1[i * r + t] * k.p.a2[t * k.C + j];
        const double h = std::clamp(1.2 / (1.0 + std::exp(-V)) - 0.1, 0.0, 1.0);
        q += hard ? (h >= 0.5 ? 1.0 : 0.0) : h;
      }
      if (q == k.spec.qmin() || q == k.spec.qmax()) k.m[i * k.C + j] = 0.0;
      if (q < k.spec.qmin() || q > k.spec.qmax()) ++k.clamped;
    }
  return k;
}

double lora_loss(const LoraCase& k, const LoraRoundParams<double>& p, RoundTape<double>* tape,
                 std::vector<double>* dw = nullptr) {
  std::vector<double> w(k.W.size());
  lora_round_fwd(k.spec, p, k.W.data(), k.R, k.C, w.data(), k.hard, tape);
  double L = 0;
  if (dw) dw->resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    L += k.m[i] * (k.c[i] * w[i] + 0.5 * w[i] * w[i]);
    if (dw) (*dw)[i] = k.m[i] * (k.c[i] + w[i]);
  }
  return L;
}

// Max relative error of analytic vs central finite differences over a parameter.
double fd_check(const LoraCase& k, std::vector<double> LoraRoundParams<double>::*field,
                const std::vector<double>& analytic, const RoundTape<double>& rec) {
  double worst = 0;
  const std::vector<double>& base = k.p.*field;
  EXPECT_EQ(analytic.size(), base.size());
  for (size_t i = 0; i < base.size(); ++i) {
    const double h = 1e-6 * std::max(1.0, std::fabs(base[i]));
    LoraRoundParams<double> pp = k.p, pm = k.p;
    (pp.*field)[i] += h;
    (pm.*field)[i] -= h;
    RoundTape<double> t1 = rec, t2 = rec;
    t1.mode = t2.mode = RoundTape<double>::Mode::kReplay;
    t1.pos = t2.pos = 0;
    const double fd = (lora_loss(k, pp, &t1) - lora_loss(k, pm, &t2)) / (2 * h);
    const double err = std::fabs(fd - analytic[i]) / std::max(1.0, std::fabs(fd));
    if (err > 1e-6 && std::getenv("QCAL_CBQ_DEBUG"))
      std::printf("  [%zu] fd %.9g analytic %.9g\n", i, fd, analytic[i]);
    worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : std::max(worst, err);
  }
  return worst;
}

TEST(CbqLoraRound, FiniteDifferenceScaleA1A2) {
  for (bool hard : {false, true})
    for (int64_t group : {int64_t{-1}, int64_t{5}, int64_t{4}}) {
      LoraCase k = make_case(/*rank=*/2, group, 3 + static_cast<uint64_t>(group + 1), hard);
      RoundTape<double> rec;
      std::vector<double> dw;
      lora_loss(k, k.p, &rec, &dw);
      ASSERT_EQ(rec.offsets.size(), k.W.size() * (hard ? 2 : 1));
      LoraRoundGrads<double> g;
      lora_round_bwd(k.spec, k.p, k.W.data(), k.R, k.C, dw.data(), &g, hard);
      EXPECT_GT(k.clamped, 0);  // the clamp is exercised
      int masked = 0;
      for (double m : k.m) masked += m == 0.0;
      EXPECT_LT(masked, static_cast<int>(k.W.size()) / 3);
      const double es = fd_check(k, &LoraRoundParams<double>::scale, g.scale, rec);
      const double e1 = fd_check(k, &LoraRoundParams<double>::a1, g.a1, rec);
      const double e2 = fd_check(k, &LoraRoundParams<double>::a2, g.a2, rec);
      std::printf("lora-round FD (%s, group %lld): scale %.2e  A1 %.2e  A2 %.2e\n",
                  hard ? "hard STE" : "soft", static_cast<long long>(group), es, e1, e2);
      EXPECT_LT(es, 1e-6);
      EXPECT_LT(e1, 1e-6);
      EXPECT_LT(e2, 1e-6);
    }
}

TEST(CbqLoraRound, FiniteDifferenceNoRoundingParams) {
  LoraCase k = make_case(/*rank=*/0, 5, 21);
  EXPECT_TRUE(k.p.a1.empty());
  EXPECT_GT(k.clamped, 0);
  RoundTape<double> rec;
  std::vector<double> dw;
  lora_loss(k, k.p, &rec, &dw);
  LoraRoundGrads<double> g;
  lora_round_bwd(k.spec, k.p, k.W.data(), k.R, k.C, dw.data(), &g);
  const double es = fd_check(k, &LoraRoundParams<double>::scale, g.scale, rec);
  std::printf("round-only FD: scale %.2e\n", es);
  EXPECT_LT(es, 1e-6);
}

TEST(CbqLoraRound, FiniteDifferenceRegularizer) {
  LoraCase k = make_case(3, -1, 9);
  const double beta = 3.7, weight = 0.3;
  LoraRoundGrads<double> g;
  const double r0 = lora_round_reg(k.spec, k.p, k.R, k.C, beta, weight, &g);
  EXPECT_GT(r0, 0.0);
  EXPECT_LE(r0, static_cast<double>(k.R * k.C));
  double worst = 0;
  for (auto field : {&LoraRoundParams<double>::a1, &LoraRoundParams<double>::a2}) {
    const std::vector<double>& an = field == &LoraRoundParams<double>::a1 ? g.a1 : g.a2;
    for (size_t i = 0; i < (k.p.*field).size(); ++i) {
      const double h = 1e-6;
      LoraRoundParams<double> pp = k.p, pm = k.p;
      (pp.*field)[i] += h;
      (pm.*field)[i] -= h;
      const double fd = weight *
                        (lora_round_reg(k.spec, pp, k.R, k.C, beta, 0,
                                        static_cast<LoraRoundGrads<double>*>(nullptr)) -
                         lora_round_reg(k.spec, pm, k.R, k.C, beta, 0,
                                        static_cast<LoraRoundGrads<double>*>(nullptr))) /
                        (2 * h);
      const double err = std::fabs(fd - an[i]) / std::max(1.0, std::fabs(fd));
      worst = std::isnan(err) ? 1e9 : std::max(worst, err);
    }
  }
  std::printf("regularizer FD: %.2e\n", worst);
  EXPECT_LT(worst, 1e-6);
  // At h ∈ {0, 1} the regularizer vanishes; at h = 0.5 it is 1 per element.
  LoraRoundParams<double> far = k.p;
  far.v0.assign(far.v0.size(), 10.0);
  std::fill(far.a2.begin(), far.a2.end(), 0.0);
  EXPECT_EQ(
      lora_round_reg(k.spec, far, k.R, k.C, beta, 0, static_cast<LoraRoundGrads<double>*>(nullptr)),
      0.0);
  far.v0.assign(far.v0.size(), 0.0);
  EXPECT_NEAR(
      lora_round_reg(k.spec, far, k.R, k.C, beta, 0, static_cast<LoraRoundGrads<double>*>(nullptr)),
      static_cast<double>(k.R * k.C), 1e-9);
}

TEST(CbqLoraRound, HardeningGivesGridCodes) {
  for (int bits : {2, 3, 4}) {
    LoraCase k = make_case(2, 4, 40 + static_cast<uint64_t>(bits));
    k.spec.bits = bits;
    k.p.scale = lora_round_init_scale(k.spec, k.W.data(), k.R, k.C);
    for (size_t i = 0; i < k.p.scale.size(); i += 2) k.p.scale[i] *= 0.7;
    const std::vector<int8_t> q = lora_round_codes(k.spec, k.p, k.W.data(), k.R, k.C);
    std::vector<double> w(k.W.size());
    lora_round_fwd(k.spec, k.p, k.W.data(), k.R, k.C, w.data(), /*hard=*/true);
    const int64_t G = k.spec.groups(k.C), gc = k.spec.group_cols(k.C);
    for (int64_t r = 0; r < k.R; ++r)
      for (int64_t c = 0; c < k.C; ++c) {
        const size_t e = static_cast<size_t>(r * k.C + c);
        ASSERT_GE(q[e], k.spec.qmin());
        ASSERT_LE(q[e], k.spec.qmax());
        const double s = k.p.scale[static_cast<size_t>(r * G + c / gc)];
        EXPECT_EQ(w[e], s * q[e]);
        // floor or floor + 1 of W/s (before the clamp).
        const double fl = std::floor(k.W[e] / s);
        const double qq = std::clamp<double>(q[e], k.spec.qmin(), k.spec.qmax());
        EXPECT_TRUE(qq == std::clamp<double>(fl, k.spec.qmin(), k.spec.qmax()) ||
                    qq == std::clamp<double>(fl + 1, k.spec.qmin(), k.spec.qmax()));
      }
  }
  // kResidual init with A2 = 0 hardens to round-to-nearest.
  LoraCase k = make_case(2, -1, 77);
  k.p =
      lora_round_init(k.spec, k.W.data(), k.R, k.C,
                      lora_round_init_scale(k.spec, k.W.data(), k.R, k.C), LoraInit::kResidual, 1);
  const std::vector<int8_t> q = lora_round_codes(k.spec, k.p, k.W.data(), k.R, k.C);
  for (int64_t r = 0; r < k.R; ++r)
    for (int64_t c = 0; c < k.C; ++c) {
      const double v = k.W[r * k.C + c] / k.p.scale[r];
      EXPECT_EQ(q[r * k.C + c],
                std::clamp<double>(std::nearbyint(v), k.spec.qmin(), k.spec.qmax()));
    }
  // ... and its soft weights equal W.
  std::vector<double> w(k.W.size());
  lora_round_fwd(k.spec, k.p, k.W.data(), k.R, k.C, w.data());
  double werr = 0;
  for (size_t i = 0; i < w.size(); ++i) werr = std::max(werr, std::fabs(w[i] - k.W[i]));
  EXPECT_LT(werr, 1e-6);
}

// ---------------------------------------------------------------- window loss FD

TEST(CbqWindowLoss, FiniteDifference) {
  Rng rng(5);
  const int64_t rows = 3, H = 7;
  const std::vector<double> a = gaussian(rows * H, rng, 1.5), b0 = gaussian(rows * H, rng, 1.5);
  std::vector<double> d(b0.size());
  double mse = 0, kl = 0;
  const double e = window_loss(a.data(), b0.data(), rows, H, d.data(), &mse, &kl);
  EXPECT_NEAR(e, mse + kl, 1e-12);
  EXPECT_GT(kl, 0.0);
  double worst = 0;
  for (size_t i = 0; i < b0.size(); ++i) {
    std::vector<double> bp = b0, bm = b0;
    bp[i] += 1e-6;
    bm[i] -= 1e-6;
    const double fd = (window_loss(a.data(), bp.data(), rows, H, static_cast<double*>(nullptr)) -
                       window_loss(a.data(), bm.data(), rows, H, static_cast<double*>(nullptr))) /
                      2e-6;
    worst = std::max(worst, std::fabs(fd - d[i]));
  }
  std::printf("window loss FD: %.2e\n", worst);
  EXPECT_LT(worst, 1e-8);
  // Zero at the target.
  EXPECT_NEAR(window_loss(a.data(), a.data(), rows, H, static_cast<double*>(nullptr)), 0.0, 1e-15);
}

TEST(CbqHeadLoss, FiniteDifferenceAndAccumulates) {
  Rng rng(6);
  const int64_t rows = 3, H = 6, V = 9;
  const double eps = 1e-5, scale = 0.7;
  const std::vector<double> gamma = gaussian(H, rng, 1.0), W = gaussian(V * H, rng, 1.0);
  const std::vector<double> a = gaussian(rows * H, rng, 1.5), b0 = gaussian(rows * H, rng, 1.5);
  auto kl_at = [&](const std::vector<double>& b) {
    double s = 0;
    head_loss_acc(gamma.data(), W.data(), V, eps, a.data(), b.data(), rows, H,
                  static_cast<double*>(nullptr), 0.0, &s);
    return s;
  };
  // d starts non-zero: the head's gradient is added to what is there.
  const std::vector<double> d0 = gaussian(rows * H, rng, 1.0);
  std::vector<double> d = d0;
  double kl = 0;
  head_loss_acc(gamma.data(), W.data(), V, eps, a.data(), b0.data(), rows, H, d.data(), scale, &kl);
  EXPECT_GT(kl, 0.0);
  EXPECT_NEAR(kl, kl_at(b0), 1e-12);
  double worst = 0;
  for (size_t i = 0; i < b0.size(); ++i) {
    std::vector<double> bp = b0, bm = b0;
    bp[i] += 1e-6;
    bm[i] -= 1e-6;
    const double fd = (kl_at(bp) - kl_at(bm)) / 2e-6;
    ASSERT_TRUE(std::isfinite(d[i]));
    worst = std::max(worst, std::fabs(scale * fd - (d[i] - d0[i])));
  }
  std::printf("head loss FD: %.2e\n", worst);
  EXPECT_LT(worst, 1e-8);
  EXPECT_NEAR(kl_at(a), 0.0, 1e-14);  // zero at the target
  // In chunks of 2 rows: the same sums and gradient.
  std::vector<double> dc = d0;
  double klc = 0;
  head_loss_acc(gamma.data(), W.data(), V, eps, a.data(), b0.data(), rows, H, dc.data(), scale,
                &klc, 2 * V);
  EXPECT_NEAR(klc, kl, 1e-13);
  for (size_t i = 0; i < d.size(); ++i) EXPECT_NEAR(dc[i], d[i], 1e-13) << i;
}

// ---------------------------------------------------------------- CFP

TEST(CbqCfp, GaussianWeightsAreLeftAlone) {
  Rng rng(11);
  int64_t truncated = 0, rows_total = 0;
  for (int64_t C : {int64_t{64}, int64_t{256}, int64_t{4096}}) {
    const int64_t R = C == 4096 ? 64 : 512;
    std::vector<float> W(static_cast<size_t>(R * C));
    for (auto& w : W) w = static_cast<float>(rng.normal() * 0.02);
    const std::vector<float> W0 = W;
    truncated += cfp_truncate_weights(W.data(), R, C, 1.5, 16.0);
    rows_total += R;
    if (truncated == 0) {
      EXPECT_EQ(W, W0);
    }
  }
  std::printf("CFP: %lld weights truncated in %lld Gaussian rows\n",
              static_cast<long long>(truncated), static_cast<long long>(rows_total));
  EXPECT_EQ(truncated, 0);
}

TEST(CbqCfp, TruncatesInjectedWeightOutliers) {
  Rng rng(12);
  const int64_t R = 32, C = 128;
  std::vector<double> W = gaussian(static_cast<size_t>(R * C), rng, 0.02);
  struct Inj {
    int64_t r, c;
    double v;
  };
  const std::vector<Inj> inj = {{3, 7, 0.4}, {3, 90, -0.35}, {17, 0, 0.5}, {30, 127, -0.6}};
  for (const Inj& i : inj) W[i.r * C + i.c] = i.v;
  std::vector<double> max_inlier(R, 0);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      bool injected = false;
      for (const Inj& i : inj) injected |= (i.r == r && i.c == c);
      if (!injected) max_inlier[r] = std::max(max_inlier[r], std::fabs(W[r * C + c]));
    }
  const std::vector<double> W0 = W;
  EXPECT_EQ(cfp_truncate_weights(W.data(), R, C, 1.5, 16.0), static_cast<int64_t>(inj.size()));
  for (const Inj& i : inj)
    EXPECT_DOUBLE_EQ(W[i.r * C + i.c], i.v > 0 ? max_inlier[i.r] : -max_inlier[i.r]);
  for (size_t e = 0; e < W.size(); ++e) {
    bool injected = false;
    for (const Inj& i : inj) injected |= static_cast<size_t>(i.r * C + i.c) == e;
    if (!injected) {
      EXPECT_EQ(W[e], W0[e]);
    }
  }
}

TEST(CbqCfp, DetectsActivationOutlierChannels) {
  Rng rng(13);
  const int64_t tokens = 256, H = 64;
  const std::vector<int64_t> outl = {5, 40, 41};
  std::vector<double> cmax(H, 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < H; ++j) {
      double x = rng.normal();
      if (std::find(outl.begin(), outl.end(), j) != outl.end()) x *= 20.0;
      cmax[j] = std::max(cmax[j], std::fabs(x));
    }
  std::vector<int64_t> found;
  const std::vector<double> s = cfp_act_scales(cmax, 1.5, 16.0, 0.5, &found);
  EXPECT_EQ(found, outl);
  double max_in = 0;
  for (int64_t j = 0; j < H; ++j)
    if (std::find(outl.begin(), outl.end(), j) == outl.end()) max_in = std::max(max_in, cmax[j]);
  for (int64_t j = 0; j < H; ++j) {
    if (std::find(outl.begin(), outl.end(), j) == outl.end()) {
      EXPECT_EQ(s[j], 1.0);
    } else {
      EXPECT_NEAR(s[j], std::sqrt(cmax[j] / max_in), 1e-12);
    }
  }
  // No outlier channels: all scales 1.
  std::vector<double> flat(H);
  for (int64_t j = 0; j < H; ++j) flat[j] = 3.0 + 0.3 * rng.uniform();
  std::vector<int64_t> none;
  const std::vector<double> s1 = cfp_act_scales(flat, 1.5, 16.0, 0.5, &none);
  EXPECT_TRUE(none.empty());
  for (double v : s1) EXPECT_EQ(v, 1.0);
}

// ---------------------------------------------------------------- plan

TEST(CbqPlan, Windows) {
  auto str = [](const std::vector<CbqWindow>& p) {
    std::ostringstream s;  // (a "(" + std::string temporary trips GCC 12's -Wrestrict)
    for (const CbqWindow& w : p)
      s << "(" << w.first << "," << w.last << ";" << w.finalize_last << ")";
    return s.str();
  };
  EXPECT_EQ(str(cbq_plan(4, 2, 1)), "(0,1;0)(1,2;1)(2,3;3)");
  EXPECT_EQ(str(cbq_plan(4, 1, 0)), "(0,0;0)(1,1;1)(2,2;2)(3,3;3)");
  EXPECT_EQ(str(cbq_plan(4, 3, 1)), "(0,2;1)(2,3;3)");
  EXPECT_EQ(str(cbq_plan(5, 2, 0)), "(0,1;1)(2,3;3)(4,4;4)");
  EXPECT_EQ(str(cbq_plan(1, 2, 1)), "(0,0;0)");
  EXPECT_TRUE(cbq_plan(4, 2, 2).empty());
}

// ---------------------------------------------------------------- synthetic model

constexpr int64_t kT = 32;

struct Fixture {
  testing::TempDir dir{"qcal_cbq_"};
  FpModel fp;
  std::vector<float> x_calib, x_eval;  // layer-0 inputs
  int64_t n_calib = 16, n_eval = 8;
  std::vector<float> y_eval;  // FP final hidden states on the eval set
};

std::vector<float> embed(const FpModel& m, const std::vector<int32_t>& tok) {
  const int64_t H = m.config.hidden_size;
  std::vector<float> x(tok.size() * static_cast<size_t>(H));
  for (size_t i = 0; i < tok.size(); ++i)
    std::copy(m.embed.begin() + tok[i] * H, m.embed.begin() + (tok[i] + 1) * H,
              x.begin() + static_cast<int64_t>(i) * H);
  return x;
}

// Final hidden states of the chain of `layers` (each with its quantizer spec).
std::vector<float> run_model(const ModelConfig& c, const std::vector<BlockWeightsT<float>>& layers,
                             const std::vector<BlockQuantSpec>* specs, const std::vector<float>& x0,
                             int64_t N) {
  static const BlockTransformsT<float> kNoT;
  static const BlockQuantSpec kNoQ;
  static const BlockClipT<float> kNoC;
  std::vector<float> x = x0, y(x.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    QBlock<float> qb(c, &layers[l], &kNoT, specs ? &(*specs)[l] : &kNoQ, &kNoC);
    qb.forward(x.data(), y.data(), N, kT);
    x.swap(y);
  }
  return x;
}

double mse(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    s += d * d;
  }
  return a.empty() ? 0 : s / static_cast<double>(a.size());
}

Fixture& fx() {
  static Fixture* f = [] {
    auto* f = new Fixture;
    SynthOptions o;
    o.config = qcal::testing::small_config(192, 256, 4);
    const ModelConfig& c = o.config;
    o.seed = 7;
    o.outliers.norm_channels = 2;
    o.outliers.up_channels = 2;
    o.outliers.v_channels = 2;
    o.outliers.alpha = 20;
    const std::string dir = f->dir.sub("m");
    if (!synth_model(o, dir).is_ok()) std::abort();
    auto fp = load_fp_model(dir);
    if (!fp.is_ok()) std::abort();
    f->fp = std::move(fp).value();
    f->x_calib = embed(f->fp, synth_tokens(f->n_calib * kT, c.vocab_size, 11));
    f->x_eval = embed(f->fp, synth_tokens(f->n_eval * kT, c.vocab_size, 12));
    f->y_eval = run_model(f->fp.config, f->fp.layers, nullptr, f->x_eval, f->n_eval);
    return f;
  }();
  return *f;
}

// The deployed quantizer spec of a CBQ layer (clip ratios fixed at the learned values).
BlockQuantSpec deployed_spec(const CbqOptions& o, const ModelConfig& c, const CbqLayerResult* r) {
  CbqOptions fixed = o;
  fixed.learn_act_clip = false;
  BlockQuantSpec q = fixed.block_spec(c);
  if (r) {
    for (int p = 0; p < kNumProj; ++p) q.act[p].clip_ratio = r->act_clip[p];
    q.k.clip_ratio = r->k_clip;
    q.v.clip_ratio = r->v_clip;
  }
  return q;
}

// RTN (engine quantizer) of every linear, with the options' act/KV quantizers.
double rtn_mse(const CbqOptions& o) {
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  std::vector<BlockWeightsT<float>> layers = f.fp.layers;
  QuantSpec qs;
  qs.bits = o.w_bits;
  qs.group_size = o.w_group;
  for (auto& l : layers)
    for (int p = 0; p < kNumProj; ++p) {
      const auto shape = proj_shape(c, kProjNames[p]);
      Tensor W({shape[0], shape[1]});
      W.data = l.w[p];
      l.w[p] = fake_quantize(W, qs).data;
    }
  std::vector<BlockQuantSpec> specs(layers.size(), deployed_spec(o, c, nullptr));
  return mse(run_model(c, layers, &specs, f.x_eval, f.n_eval), f.y_eval);
}

struct CbqRun {
  double mse = 0, seconds = 0;
  std::vector<CbqWindowReport> windows;
};

CbqRun run_cbq(const CbqOptions& o, bool verbose) {
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  std::vector<BlockWeightsT<float>> layers = f.fp.layers;
  auto res = cbq_calibrate(c, layers, f.x_calib, f.n_calib, kT, o, [&](const CbqWindowReport& r) {
    if (!verbose) return;
    std::printf(
        "  window %lld (%lld..%lld): loss %.4e -> %.4e, hard %.4e -> "
        "%.4e, %lld steps, %.2f s\n",
        static_cast<long long>(r.window), static_cast<long long>(r.first),
        static_cast<long long>(r.last), r.loss_first, r.loss_last, r.loss_hard_init, r.loss_hard,
        static_cast<long long>(r.steps), r.seconds);
  });
  EXPECT_TRUE(res.is_ok()) << res.status().to_string();
  CbqRun out;
  if (!res.is_ok()) return out;
  const CbqResult& r = res.value();
  EXPECT_EQ(r.layers.size(), layers.size());
  std::vector<BlockQuantSpec> specs;
  for (size_t l = 0; l < layers.size(); ++l) {
    specs.push_back(deployed_spec(o, c, &r.layers[l]));
    // The codes dequantize to exactly the returned weights.
    for (int p = 0; p < kNumProj; ++p)
      EXPECT_EQ(r.layers[l].q[p].dequantize().data, layers[l].w[p]) << "layer " << l << " " << p;
  }
  out.mse = mse(run_model(c, layers, &specs, f.x_eval, f.n_eval), f.y_eval);
  if (verbose) {
    int64_t trunc = 0, chans = 0;
    for (const CbqLayerResult& l : r.layers) {
      for (int64_t t : l.cfp_truncated) trunc += t;
      for (const auto& ch : l.outlier_channels) chans += static_cast<int64_t>(ch.size());
    }
    std::printf("  CFP: %lld weights truncated, %lld activation outlier channels smoothed\n",
                static_cast<long long>(trunc), static_cast<long long>(chans));
  }
  out.seconds = r.seconds;
  out.windows = r.windows;
  return out;
}

CbqOptions w2_options() {
  CbqOptions o;
  o.w_bits = 2;
  o.w_group = 32;
  return o;
}

// `o` with learning rates that wreck the rounding (training ends above its start).
CbqOptions wrecking(CbqOptions o) {
  o.lr_lora = 50.0;
  o.lr_scale = 2.0;
  return o;
}

TEST(CbqSynth, W2A16WindowsBeatRtn) {
  const CbqOptions o = w2_options();
  const double rtn = rtn_mse(o);
  std::printf("W2A16 g32: RTN final-output MSE %.4e\n", rtn);
  std::printf("CBQ window 2 overlap 1:\n");
  const CbqRun cbq = run_cbq(o, true);
  CbqOptions pb = o;
  pb.window = 1;
  pb.overlap = 0;
  std::printf("per-block reconstruction (k = 1):\n");
  const CbqRun blk = run_cbq(pb, true);
  std::printf("final-output MSE vs FP: RTN %.4e  CBQ(2,1) %.4e (%.2f s)  per-block %.4e (%.2f s)\n",
              rtn, cbq.mse, cbq.seconds, blk.mse, blk.seconds);
  ASSERT_EQ(cbq.windows.size(), 3u);
  ASSERT_EQ(blk.windows.size(), 4u);
  for (const auto& w : cbq.windows) {
    EXPECT_TRUE(std::isfinite(w.loss_last));
    EXPECT_LT(w.loss_hard, w.loss_hard_init) << "window " << w.window;
  }
  EXPECT_LT(cbq.mse, rtn);
  EXPECT_LT(blk.mse, rtn);
}

TEST(CbqSynth, W4A4WindowsBeatRtn) {
  // Per-channel 4-bit weights, 4-bit per-token activations, no rotation: the injected
  // activation outlier channels (2 per norm, 2 on the down input) make RTN poor; CFP
  // smooths them and the learned activation clips and step sizes train with the rest.
  CbqOptions o;
  o.w_bits = 4;
  o.a_bits = 4;
  o.epochs = 10;
  const double rtn = rtn_mse(o);
  std::printf("W4A4 (per channel, per token): RTN final-output MSE %.4e\nCBQ window 2 overlap 1:\n",
              rtn);
  Fixture& f = fx();
  std::vector<BlockWeightsT<float>> layers = f.fp.layers;
  auto res = cbq_calibrate(f.fp.config, layers, f.x_calib, f.n_calib, kT, o, nullptr);
  ASSERT_TRUE(res.is_ok()) << res.status().to_string();
  std::vector<BlockQuantSpec> specs;
  for (const CbqLayerResult& l : res.value().layers) {
    specs.push_back(deployed_spec(o, f.fp.config, &l));
    EXPECT_EQ(l.outlier_channels[0].size(), 2u) << "layer " << l.layer;  // attention input
    EXPECT_EQ(l.outlier_channels[1].size(), 2u) << "layer " << l.layer;  // MLP input
    for (double r : l.act_clip) {
      EXPECT_GT(r, 0.5);
      EXPECT_LE(r, 1.0);
    }
  }
  for (const auto& w : res.value().windows)
    std::printf("  window %lld: loss %.4e -> %.4e, hard %.4e -> %.4e, %.2f s\n",
                static_cast<long long>(w.window), w.loss_first, w.loss_last, w.loss_hard_init,
                w.loss_hard, w.seconds);
  const double cbq = mse(run_model(f.fp.config, layers, &specs, f.x_eval, f.n_eval), f.y_eval);
  std::printf("final-output MSE vs FP: RTN %.4e  CBQ(2,1) %.4e\n", rtn, cbq);
  EXPECT_LT(cbq, rtn);
}

TEST(CbqSynth, LogitLossInTheLastWindowLowersTheLogitKl) {
  // CbqOptions::head: only the window that ends the model changes (the earlier windows'
  // reports are bit-identical), its losses include the head's KL, and the model's
  // next-token KL on held-out sequences ends lower than with the block-output loss alone.
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o;
  o.w_bits = 4;
  o.a_bits = 4;
  o.epochs = 4;
  auto head = std::make_shared<CbqHead>();
  head->norm = f.fp.final_norm;
  head->lm_head = f.fp.lm_head;
  auto logit_kl = [&](const CbqOptions& opt, std::vector<CbqWindowReport>* reports) {
    std::vector<BlockWeightsT<float>> layers = f.fp.layers;
    auto res = cbq_calibrate(c, layers, f.x_calib, f.n_calib, kT, opt, nullptr);
    EXPECT_TRUE(res.is_ok()) << res.status().to_string();
    if (!res.is_ok()) return 0.0;
    *reports = res->windows;
    std::vector<BlockQuantSpec> specs;
    for (const CbqLayerResult& l : res->layers) specs.push_back(deployed_spec(opt, c, &l));
    const std::vector<float> y = run_model(c, layers, &specs, f.x_eval, f.n_eval);
    double s = 0;
    const int64_t rows = f.n_eval * kT;
    head_loss_acc(head->norm.data(), head->lm_head.data(), c.vocab_size, c.rms_norm_eps,
                  f.y_eval.data(), y.data(), rows, c.hidden_size, static_cast<float*>(nullptr), 0.0,
                  &s);
    return s / static_cast<double>(rows);
  };
  std::vector<CbqWindowReport> ra, rb;
  const double kl_plain = logit_kl(o, &ra);
  CbqOptions oh = o;
  oh.head = head;
  const double kl_head = logit_kl(oh, &rb);
  std::printf(
      "held-out next-token KL: block-output loss %.4e, + logit loss in the last window "
      "%.4e\n",
      kl_plain, kl_head);
  ASSERT_EQ(ra.size(), rb.size());
  ASSERT_GE(ra.size(), 2u);
  for (size_t w = 0; w + 1 < ra.size(); ++w) {
    EXPECT_EQ(ra[w].loss_hard_init, rb[w].loss_hard_init) << "window " << w;
    EXPECT_EQ(ra[w].loss_hard, rb[w].loss_hard) << "window " << w;
  }
  EXPECT_GT(rb.back().loss_hard_init, ra.back().loss_hard_init);  // + the head's KL
  EXPECT_TRUE(std::isfinite(kl_head));
  EXPECT_LT(kl_head, kl_plain);
  // A head of the wrong size is refused, naming the window.
  CbqOptions bad = oh;
  auto small = std::make_shared<CbqHead>(*head);
  small->lm_head.pop_back();
  bad.head = small;
  std::vector<BlockWeightsT<float>> layers = f.fp.layers;
  auto res = cbq_calibrate(c, layers, f.x_calib, f.n_calib, kT, bad, nullptr);
  ASSERT_FALSE(res.is_ok());
  EXPECT_EQ(res.status().code(), Code::kInvalidInput);
  EXPECT_NE(res.status().message().find("head"), std::string::npos) << res.status().message();
}

TEST(CbqSynth, WindowStateResumes) {
  // Window by window through the explicit state equals cbq_calibrate in one go.
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o = w2_options();
  o.epochs = 2;
  std::vector<BlockWeightsT<float>> a = f.fp.layers, b = f.fp.layers;
  auto ra = cbq_calibrate(c, a, f.x_calib, f.n_calib, kT, o, nullptr);
  ASSERT_TRUE(ra.is_ok()) << ra.status().to_string();
  const std::vector<CbqWindow> plan = cbq_plan(c.num_hidden_layers, o.window, o.overlap);
  CbqState st = cbq_initial_state(f.x_calib, o);
  std::vector<CbqLayerResult> fin;
  // The first window in a "task" of its own; then resume the rest through cbq_calibrate.
  std::vector<BlockWeightsT<float>*> wl = {&b[0], &b[1]};
  ASSERT_TRUE(cbq_run_window(c, o, plan, f.n_calib, kT, wl, &st, &fin, nullptr).is_ok());
  EXPECT_EQ(st.next_window, 1);
  ASSERT_EQ(st.carried.size(), 1u);
  EXPECT_EQ(st.carried[0].layer, 1);
  EXPECT_EQ(fin.size(), 1u);
  EXPECT_EQ(b[1].w[kQ], f.fp.layers[1].w[kQ]);  // the carried block keeps its FP weights
  // A state that does not match the plan is refused and left unchanged.
  CbqState wrong = st;
  wrong.carried.clear();
  std::vector<BlockWeightsT<float>*> wl2 = {&b[1], &b[2]};
  EXPECT_EQ(cbq_run_window(c, o, plan, f.n_calib, kT, wl2, &wrong, &fin, nullptr).code(),
            Code::kInvalidInput);
  EXPECT_EQ(wrong.next_window, 1);
  auto rb = cbq_calibrate(c, b, f.x_calib, f.n_calib, kT, o, nullptr, &st);
  ASSERT_TRUE(rb.is_ok());
  for (size_t l = 0; l < a.size(); ++l)
    for (int p = 0; p < kNumProj; ++p) EXPECT_EQ(a[l].w[p], b[l].w[p]) << l << " " << p;
}

TEST(CbqSynth, GptqInitStartsAtGptqAndKeepBestNeverEndsWorse) {
  // gptq_init: the windows start from GPTQ's rounding (hardened loss below RTN's start
  // on the same inputs), and with keep_best no window ends above its start.
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o = w2_options();
  o.epochs = 2;
  o.v0_follows_scale = true;
  std::vector<BlockWeightsT<float>> a = f.fp.layers, b = f.fp.layers;
  auto rtn = cbq_calibrate(c, a, f.x_calib, f.n_calib, kT, o, nullptr);
  o.gptq_init = true;
  if (const char* m = std::getenv("QCAL_CBQ_GPTQ_MARGIN")) o.gptq_margin = std::atof(m);
  if (const char* e = std::getenv("QCAL_CBQ_GPTQ_EPOCHS")) o.epochs = std::atoi(e);
  auto gq = cbq_calibrate(c, b, f.x_calib, f.n_calib, kT, o, nullptr);
  ASSERT_TRUE(rtn.is_ok() && gq.is_ok()) << gq.status().to_string();
  const CbqWindowReport &w0r = rtn->windows[0], &w0g = gq->windows[0];
  std::printf("W2A16 g32 window 0 hardened start: RTN %.4e, GPTQ %.4e; end %.4e / %.4e\n",
              w0r.loss_hard_init, w0g.loss_hard_init, w0r.loss_hard, w0g.loss_hard);
  EXPECT_FALSE(w0r.gptq_init);
  EXPECT_TRUE(w0g.gptq_init);
  EXPECT_LT(w0g.loss_hard_init, 0.8 * w0r.loss_hard_init);
  for (const auto& w : gq->windows) {
    EXPECT_TRUE(std::isfinite(w.loss_hard));
    EXPECT_LE(w.loss_hard, w.loss_hard_init * 1.001) << "window " << w.window;
  }
  // A learning rate that wrecks the rounding: the initial parameters are kept.
  std::vector<BlockWeightsT<float>> d = f.fp.layers;
  auto rb = cbq_calibrate(c, d, f.x_calib, f.n_calib, kT, wrecking(o), nullptr);
  ASSERT_TRUE(rb.is_ok()) << rb.status().to_string();
  bool any = false;
  for (const auto& w : rb->windows) {
    any = any || w.reverted;
    if (w.reverted) {
      EXPECT_GT(w.loss_hard_trained, w.loss_hard_init) << "window " << w.window;
    }
    EXPECT_LE(w.loss_hard, w.loss_hard_init * 1.001) << "window " << w.window;
  }
  EXPECT_TRUE(any);
}

TEST(CbqSynth, GptqStartIsCarriedToTheNextWindow) {
  // With nothing learned (learning rates 0), a block that the next window finalizes
  // ends with the codes GPTQ gave it in the window that started it: the carried state
  // holds GPTQ's step sizes and codes, and the next window rebuilds its base from them
  // (before, it restarted from round to nearest of the unmoved weights).
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o = w2_options();
  o.epochs = 1;
  o.v0_follows_scale = true;
  o.gptq_init = true;
  o.lr_scale = o.lr_lora = o.lr_act = 0.0;
  std::vector<BlockWeightsT<float>> b = f.fp.layers;
  const std::vector<CbqWindow> plan = cbq_plan(c.num_hidden_layers, o.window, o.overlap);
  CbqState st = cbq_initial_state(f.x_calib, o);
  std::vector<CbqLayerResult> fin;
  std::vector<BlockWeightsT<float>*> w0 = {&b[0], &b[1]};
  ASSERT_TRUE(cbq_run_window(c, o, plan, f.n_calib, kT, w0, &st, &fin, nullptr).is_ok());
  ASSERT_EQ(st.carried.size(), 1u);
  const CbqBlockParams carried = st.carried[0];
  ASSERT_EQ(carried.layer, 1);
  std::vector<BlockWeightsT<float>*> w1 = {&b[1], &b[2]};
  ASSERT_TRUE(cbq_run_window(c, o, plan, f.n_calib, kT, w1, &st, &fin, nullptr).is_ok());
  ASSERT_EQ(fin.size(), 2u);
  ASSERT_EQ(fin[1].layer, 1);
  for (int p = 0; p < kNumProj; ++p) {
    ASSERT_FALSE(carried.cell[p].empty()) << kProjNames[p];
    const QuantizedLinear& ql = fin[1].q[p];
    ASSERT_EQ(ql.q.size(), carried.cell[p].size()) << kProjNames[p];
    ASSERT_EQ(carried.s0[p].size(), ql.scales.size()) << kProjNames[p];
    int64_t differ = 0;
    for (size_t e = 0; e < ql.q.size(); ++e) differ += ql.q[e] != carried.cell[p][e];
    EXPECT_EQ(differ, 0) << kProjNames[p] << ": codes that left GPTQ's cell";
  }
  // A carried GPTQ start of the wrong size is refused, naming the layer.
  CbqState st2 = cbq_initial_state(f.x_calib, o);
  std::vector<BlockWeightsT<float>> d = f.fp.layers;
  std::vector<BlockWeightsT<float>*> d0 = {&d[0], &d[1]}, d1 = {&d[1], &d[2]};
  ASSERT_TRUE(cbq_run_window(c, o, plan, f.n_calib, kT, d0, &st2, nullptr, nullptr).is_ok());
  st2.carried[0].cell[kQ].pop_back();
  const Status bad = cbq_run_window(c, o, plan, f.n_calib, kT, d1, &st2, nullptr, nullptr);
  EXPECT_EQ(bad.code(), Code::kInvalidInput);
  EXPECT_NE(bad.message().find("carried GPTQ start of layer 1"), std::string::npos)
      << bad.message();
}

TEST(CbqSynth, HoldoutKeepsTheEpochWithTheLowestHeldOutLoss) {
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o = w2_options();
  o.epochs = 3;
  o.holdout = 4;
  std::vector<BlockWeightsT<float>> a = f.fp.layers;
  auto r = cbq_calibrate(c, a, f.x_calib, f.n_calib, kT, o, nullptr);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  for (const CbqWindowReport& w : r->windows) {
    EXPECT_EQ(w.holdout, 4);
    ASSERT_EQ(w.holdout_losses.size(), 3u) << "window " << w.window;
    double lowest = w.loss_holdout_init;
    int64_t at = 0;
    for (size_t e = 0; e < w.holdout_losses.size(); ++e) {
      ASSERT_TRUE(std::isfinite(w.holdout_losses[e]));
      if (w.holdout_losses[e] < lowest) {
        lowest = w.holdout_losses[e];
        at = static_cast<int64_t>(e) + 1;
      }
    }
    EXPECT_EQ(w.loss_holdout, lowest) << "window " << w.window;
    EXPECT_EQ(w.best_epoch, at) << "window " << w.window;
    EXPECT_EQ(w.reverted, at == 0) << "window " << w.window;
    EXPECT_LT(w.loss_holdout, w.loss_holdout_init) << "W2 RTN start: training helps";
  }
  // Training 12 sequences instead of 16: one step fewer per epoch (bsz 4).
  EXPECT_EQ(r->windows[0].steps, 3 * 3);
  // A learning rate that wrecks the rounding: every window keeps its start.
  std::vector<BlockWeightsT<float>> d = f.fp.layers;
  auto rw = cbq_calibrate(c, d, f.x_calib, f.n_calib, kT, wrecking(o), nullptr);
  ASSERT_TRUE(rw.is_ok()) << rw.status().to_string();
  bool any = false;
  for (const CbqWindowReport& w : rw->windows) any = any || w.best_epoch == 0;
  EXPECT_TRUE(any);
  // Nothing left to train on is refused, naming the option.
  CbqOptions all = o;
  all.holdout = f.n_calib;
  std::vector<BlockWeightsT<float>> e = f.fp.layers;
  auto ra = cbq_calibrate(c, e, f.x_calib, f.n_calib, kT, all, nullptr);
  ASSERT_FALSE(ra.is_ok());
  EXPECT_NE(ra.status().message().find("cbq_holdout 16 leaves no training sequences"),
            std::string::npos)
      << ra.status().to_string();
}

TEST(CbqSynth, IntactKvPrefixIsChecked) {
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o = w2_options();
  o.prefix_len = 1;
  EXPECT_EQ(o.validate(c).code(), Code::kInvalidInput);  // no K/V
  o.prefix_k.assign(static_cast<size_t>(c.num_hidden_layers), std::vector<float>(3, 0.0f));
  o.prefix_v = o.prefix_k;
  const Status s = o.validate(c);
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_NE(s.message().find("prefix K/V of layer 0"), std::string::npos) << s.to_string();
  o.prefix_len = 0;
  EXPECT_EQ(o.validate(c).code(), Code::kInvalidInput);  // K/V without a length
}

TEST(CbqSynth, NonFiniteIsReportedWithWindowAndStep) {
  Fixture& f = fx();
  CbqOptions o = w2_options();
  o.epochs = 1;
  std::vector<BlockWeightsT<float>> layers = f.fp.layers;
  std::vector<float> x = f.x_calib;
  x[5] = std::numeric_limits<float>::quiet_NaN();
  auto r = cbq_calibrate(f.fp.config, layers, x, f.n_calib, kT, o, nullptr);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kInternal);
  EXPECT_NE(r.status().to_string().find("window 0 (layers 0..1) step 0"), std::string::npos)
      << r.status().to_string();
}

TEST(CbqSynth, StopsWithinAWindowAndLeavesTheStateUnchanged) {
  // should_stop is polled before every step: the window ends at the step it says
  // so, the state and the blocks are untouched, and without it the same window runs.
  Fixture& f = fx();
  const ModelConfig& c = f.fp.config;
  CbqOptions o = w2_options();
  o.epochs = 2;
  int polls = 0;
  o.should_stop = [&polls] { return ++polls > 3; };
  const std::vector<CbqWindow> plan = cbq_plan(c.num_hidden_layers, o.window, o.overlap);
  CbqState st = cbq_initial_state(f.x_calib, o);
  std::vector<BlockWeightsT<float>> b = f.fp.layers;
  std::vector<BlockWeightsT<float>*> wl = {&b[0], &b[1]};
  std::vector<CbqLayerResult> fin;
  Status s = cbq_run_window(c, o, plan, f.n_calib, kT, wl, &st, &fin, nullptr);
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find("window 0 stopped at step 3"), std::string::npos) << s.to_string();
  EXPECT_EQ(polls, 4);
  EXPECT_EQ(st.next_window, 0);
  EXPECT_TRUE(st.carried.empty());
  EXPECT_TRUE(fin.empty());
  EXPECT_EQ(b[0].w[kQ], f.fp.layers[0].w[kQ]);
  o.should_stop = [] { return false; };
  ASSERT_TRUE(cbq_run_window(c, o, plan, f.n_calib, kT, wl, &st, &fin, nullptr).is_ok());
  EXPECT_EQ(st.next_window, 1);
}

// ---------------------------------------------------------------- ablation (QCAL_CBQ_SWEEP=1)

TEST(CbqSweep, Ablation) {
  if (!std::getenv("QCAL_CBQ_SWEEP")) GTEST_SKIP() << "set QCAL_CBQ_SWEEP=1";
  struct Cfg {
    std::string name;
    CbqOptions o;
  };
  std::vector<Cfg> cfgs;
  const std::string which = std::getenv("QCAL_CBQ_SWEEP");
  auto add = [&](const std::string& n, CbqOptions o) { cfgs.push_back({n, o}); };
  CbqOptions base = w2_options();
  if (which == "w4a4") {
    base.w_bits = 4;
    base.w_group = -1;
    base.a_bits = 4;
  }
  std::printf("RTN %.4e\n", rtn_mse(base));
  add("default", base);
  {
    CbqOptions o = base;
    o.window = 1;
    o.overlap = 0;
    add("per-block", o);
    o = base;
    o.lora_rounding = false;
    add("no-lora", o);
    o = base;
    o.hard_ste = false;
    add("soft", o);
    o = base;
    o.hard_ste = false;
    o.lora_rounding = false;
    add("soft-no-lora", o);
    o = base;
    o.init = LoraInit::kHalf;
    add("init-half", o);
    o = base;
    o.init = LoraInit::kSvd;
    add("init-svd", o);
    o = base;
    o.rank = 4;
    add("rank4", o);
    o = base;
    o.rank = 8;
    add("rank8", o);
    o = base;
    o.rank = 32;
    add("rank32", o);
    o = base;
    o.reg_lambda = 0;
    add("lambda0", o);
    o = base;
    o.reg_lambda = 0.1;
    add("lambda0.1", o);
    o = base;
    o.epochs = 60;
    add("epochs60", o);
    o = base;
    o.lr_scale = 3e-2;
    add("lr_s3e-2", o);
    o = base;
    o.lr_scale = 3e-3;
    add("lr_s3e-3", o);
    o = base;
    o.lr_lora = 5e-3;
    add("lr_l5e-3", o);
    o = base;
    o.lr_lora = 5e-2;
    add("lr_l5e-2", o);
    o = base;
    o.lr_act = 3e-2;
    add("lr_a3e-2", o);
    o = base;
    o.parallel = true;
    add("parallel", o);
    o = base;
    o.aug_loss = true;
    add("aug", o);
    o = base;
    o.cfp = false;
    add("no-cfp", o);
    o = base;
    o.window = 3;
    o.overlap = 2;
    add("win3o2", o);
    if (base.a_bits < 16) {
      o = base;
      o.cfp_act_alpha = 1.0;
      add("alpha1", o);
      o = base;
      o.learn_act_clip = false;
      add("fixed-act-clip", o);
    }
  }
  for (const Cfg& cfg : cfgs) {
    const CbqRun r = run_cbq(cfg.o, false);
    double hard0 = 0, hard1 = 0;
    for (const auto& w : r.windows) {
      hard0 += w.loss_hard_init;
      hard1 += w.loss_hard;
    }
    std::printf("%-16s mse %.4e  Σhard %.4e -> %.4e  %.2f s\n", cfg.name.c_str(), r.mse, hard0,
                hard1, r.seconds);
  }
}

}  // namespace
}  // namespace qcal::calib

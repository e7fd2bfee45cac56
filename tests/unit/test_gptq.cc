// GPTQ: Hessian accumulation, Cholesky, and the solver against RTN, against
// itself (block sizes) and against an independent fp64 reference written here.
// Letters: T tokens, O output features, I input features.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "worker/engine/gptq.h"

namespace qcal {
namespace {

// X (T, I) = Z · M with Z, M standard normal (M scaled by 1/√I) and a per-channel
// scale: strongly correlated inputs with a spread of channel magnitudes.
Tensor correlated_inputs(uint64_t seed, int64_t T, int64_t I) {
  Rng rng(seed);
  Tensor Z({T, I}), M({I, I}), X({T, I});
  for (auto& v : Z.data) v = static_cast<float>(rng.normal());
  const double s = 1.0 / std::sqrt(static_cast<double>(I));
  for (auto& v : M.data) v = static_cast<float>(s * rng.normal());
  for (int64_t c = 0; c < I; ++c) {
    const float chan = static_cast<float>(std::exp(0.5 * rng.normal()));
    for (int64_t r = 0; r < I; ++r) M.at(r, c) *= chan;
  }
  sgemm(false, false, T, I, I, 1.0f, Z.ptr(), I, M.ptr(), I, 0.0f, X.ptr(), I);
  return X;
}

Tensor random_weight(uint64_t seed, int64_t O, int64_t I) {
  Rng rng(seed);
  Tensor W({O, I});
  for (auto& v : W.data) v = static_cast<float>(0.02 * rng.normal());
  for (int k = 0; k < O; ++k) W.data[rng.below(W.data.size())] *= 6.0f;  // a few outliers
  return W;
}

// H from X in sequences of 256 tokens.
Tensor hessian_of(const Tensor& X) {
  HessianAccumulator acc(X.dim(1));
  const int64_t T = X.dim(0), I = X.dim(1);
  for (int64_t t0 = 0; t0 < T; t0 += 256) {
    acc.add_batch(X.ptr() + t0 * I, std::min<int64_t>(256, T - t0), 1);
  }
  return acc.hessian();
}

// ‖X Wᵀ − X Ŵᵀ‖², fp64.
double layer_error(const Tensor& X, const Tensor& W, const Tensor& What) {
  const int64_t T = X.dim(0), I = X.dim(1), O = W.dim(0);
  Tensor D({O, I});
  for (size_t k = 0; k < D.data.size(); ++k) D.data[k] = W.data[k] - What.data[k];
  std::vector<double> Dd(D.data.begin(), D.data.end());
  double s = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const float* x = X.ptr() + t * I;
    for (int64_t o = 0; o < O; ++o) {
      const double* d = Dd.data() + o * I;
      double y = 0.0;
      for (int64_t i = 0; i < I; ++i) y += x[i] * d[i];
      s += y * y;
    }
  }
  return s;
}

void expect_all_finite(const GptqResult& r) {
  EXPECT_TRUE(std::isfinite(r.loss));
  for (float s : r.qlinear.scales) ASSERT_TRUE(std::isfinite(s));
  const Tensor D = r.qlinear.dequantize();
  for (float v : D.data) ASSERT_TRUE(std::isfinite(v));
  const int maxq = r.qlinear.spec.maxq();
  for (uint8_t q : r.qlinear.q) ASSERT_LE(q, maxq);
  for (int32_t z : r.qlinear.zeros) ASSERT_TRUE(z >= 0 && z <= maxq);
}

double frac_equal(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  size_t eq = 0;
  for (size_t k = 0; k < a.size(); ++k) eq += a[k] == b[k];
  return static_cast<double>(eq) / static_cast<double>(a.size());
}

// One synthetic layer shared by the solver tests: T = 2048, O = 64, I = 256.
struct Layer {
  Tensor X, W, H;
};
const Layer& layer() {
  static const Layer l = [] {
    Layer r;
    r.X = correlated_inputs(11, 2048, 256);
    r.W = random_weight(12, 64, 256);
    r.H = hessian_of(r.X);
    return r;
  }();
  return l;
}

// ---------------------------------------------------------------------------
// An independent fp64 GPTQ (methods.md §2.2) with no blocks and no lazy
// updates: every column's error is applied to all later columns at once.
// ---------------------------------------------------------------------------

// Lower Cholesky factor, fp64, unblocked. Returns false if not PD.
bool chol_ref(std::vector<double>& A, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double d = A[j * n + j];
    for (int64_t k = 0; k < j; ++k) d -= A[j * n + k] * A[j * n + k];
    if (!(d > 0.0)) return false;
    d = std::sqrt(d);
    A[j * n + j] = d;
    for (int64_t i = j + 1; i < n; ++i) {
      double s = A[i * n + j];
      for (int64_t k = 0; k < j; ++k) s -= A[i * n + k] * A[j * n + k];
      A[i * n + j] = s / d;
    }
    for (int64_t c = j + 1; c < n; ++c) A[j * n + c] = 0.0;
  }
  return true;
}

std::vector<uint8_t> gptq_ref_codes(const Tensor& W, const Tensor& H, const QuantSpec& spec,
                                    double percdamp, bool act_order, bool static_groups) {
  const int64_t O = W.dim(0), I = W.dim(1);
  const int maxq = spec.maxq();
  const int64_t gs = spec.group_size == -1 ? I : spec.group_size;
  std::vector<double> Wd(W.data.begin(), W.data.end());
  std::vector<double> Hd(H.data.begin(), H.data.end());
  std::vector<QParam> params(static_cast<size_t>(O * ((I + gs - 1) / gs)));  // (G, O)
  // The clip search weighs column c's error by H_cc (a dead input by 1).
  std::vector<double> cw(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) cw[i] = H.at(i, i) == 0.0f ? 1.0 : H.at(i, i);
  if (spec.group_size == -1) {
    for (int64_t o = 0; o < O; ++o) params[o] = find_qparam(W.ptr() + o * I, I, spec, cw.data());
  }
  for (int64_t i = 0; i < I; ++i) {
    if (Hd[i * I + i] == 0.0) {
      Hd[i * I + i] = 1.0;
      for (int64_t o = 0; o < O; ++o) Wd[o * I + i] = 0.0;
    }
  }
  if (static_groups) {
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t g = 0; g * gs < I; ++g) {
        std::vector<float> v;
        for (int64_t c = g * gs; c < std::min(I, g * gs + gs); ++c) v.push_back(Wd[o * I + c]);
        params[g * O + o] =
            find_qparam(v.data(), static_cast<int64_t>(v.size()), spec, cw.data() + g * gs);
      }
    }
  }
  std::vector<int64_t> perm(I);
  std::iota(perm.begin(), perm.end(), 0);
  if (act_order) {
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return Hd[a * I + a] > Hd[b * I + b]; });
  }
  std::vector<double> Wp(Wd.size()), Hp(Hd.size());
  for (int64_t o = 0; o < O; ++o)
    for (int64_t j = 0; j < I; ++j) Wp[o * I + j] = Wd[o * I + perm[j]];
  for (int64_t r = 0; r < I; ++r)
    for (int64_t c = 0; c < I; ++c) Hp[r * I + c] = Hd[perm[r] * I + perm[c]];
  double mean = 0.0;
  for (int64_t i = 0; i < I; ++i) mean += Hp[i * I + i];
  mean /= I;
  for (int64_t i = 0; i < I; ++i) Hp[i * I + i] += percdamp * mean;
  // H⁻¹ = L⁻ᵀ L⁻¹, then U = (chol(H⁻¹))ᵀ.
  EXPECT_TRUE(chol_ref(Hp, I));
  std::vector<double> Li(I * I, 0.0);  // L⁻¹, lower
  for (int64_t c = 0; c < I; ++c) {
    for (int64_t r = c; r < I; ++r) {
      double s = r == c ? 1.0 : 0.0;
      for (int64_t k = c; k < r; ++k) s -= Hp[r * I + k] * Li[k * I + c];
      Li[r * I + c] = s / Hp[r * I + r];
    }
  }
  std::vector<double> Hinv(I * I, 0.0);
  for (int64_t r = 0; r < I; ++r)
    for (int64_t c = 0; c < I; ++c) {
      double s = 0.0;
      for (int64_t k = std::max(r, c); k < I; ++k) s += Li[k * I + r] * Li[k * I + c];
      Hinv[r * I + c] = s;
    }
  EXPECT_TRUE(chol_ref(Hinv, I));
  auto U = [&](int64_t r, int64_t c) { return Hinv[c * I + r]; };  // upper = lowerᵀ

  std::vector<uint8_t> codes(O * I);
  for (int64_t j = 0; j < I; ++j) {
    for (int64_t o = 0; o < O; ++o) {
      int64_t g = 0;
      if (static_groups) {
        g = perm[j] / gs;
      } else if (spec.group_size != -1) {
        g = j / gs;
        if (j % gs == 0) {
          std::vector<float> v;
          std::vector<double> vw;
          for (int64_t c = j; c < std::min(I, j + gs); ++c) {
            v.push_back(Wp[o * I + c]);
            vw.push_back(cw[perm[c]]);
          }
          params[g * O + o] =
              find_qparam(v.data(), static_cast<int64_t>(v.size()), spec, vw.data());
        }
      }
      const QParam p = params[g * O + o];
      const double w = Wp[o * I + j];
      const int32_t q = quantize_code(static_cast<float>(w), p, maxq);
      codes[o * I + perm[j]] = static_cast<uint8_t>(q);
      const double err = (w - dequantize_code(q, p)) / U(j, j);
      for (int64_t c = j + 1; c < I; ++c) Wp[o * I + c] -= err * U(j, c);
    }
  }
  return codes;
}

// ---------------------------------------------------------------------------

TEST(Hessian, MatchesFp64SumAndMerges) {
  const int64_t I = 48;
  Rng rng(5);
  const std::vector<int64_t> rows = {37, 50, 1, 0};
  const std::vector<int64_t> seqs = {1, 2, 1, 1};
  std::vector<Tensor> batches;
  for (int64_t r : rows) {
    Tensor X({r, I});
    for (auto& v : X.data) v = static_cast<float>(rng.normal() + 0.3);
    batches.push_back(std::move(X));
  }
  HessianAccumulator all(I), a(I), b(I);
  EXPECT_EQ(all.hessian().data, std::vector<float>(I * I, 0.0f));  // nsamples 0 → zeros
  std::vector<double> ref(I * I, 0.0);
  for (size_t k = 0; k < batches.size(); ++k) {
    all.add_batch(batches[k].ptr(), rows[k], seqs[k]);
    (k % 2 ? b : a).add_batch(batches[k].ptr(), rows[k], seqs[k]);
    for (int64_t t = 0; t < rows[k]; ++t)
      for (int64_t r = 0; r < I; ++r)
        for (int64_t c = 0; c < I; ++c)
          ref[r * I + c] += static_cast<double>(batches[k].at(t, r)) * batches[k].at(t, c);
  }
  EXPECT_EQ(all.nsamples(), 5);
  a.merge(b);
  EXPECT_EQ(a.nsamples(), 5);
  const Tensor H = all.hessian();
  const Tensor Hm = a.hessian();
  double worst = 0.0;
  for (int64_t k = 0; k < I * I; ++k) {
    const double want = 2.0 / 5.0 * ref[k];
    const double tol = 1e-5 + 1e-5 * std::fabs(want);  // fp32 sums of 88 terms
    worst =
        std::max({worst, std::fabs(H.data[k] - want) / tol, std::fabs(Hm.data[k] - want) / tol});
  }
  std::printf("Hessian vs fp64: max error %.3f of the budget\n", worst);
  EXPECT_LE(worst, 1.0);
  for (int64_t r = 0; r < I; ++r)
    for (int64_t c = 0; c < I; ++c) ASSERT_EQ(H.at(r, c), H.at(c, r));
  const std::vector<float>& raw = all.raw_sum();
  EXPECT_FLOAT_EQ(raw[3 * I + 7], raw[7 * I + 3]);
}

TEST(Cholesky, ReconstructsAndDetectsNonPd) {
  const int64_t n = 70;
  Rng rng(9);
  std::vector<double> B(n * n), A(n * n, 0.0);
  for (auto& v : B) v = rng.normal();
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t k = 0; k < n; ++k) A[r * n + c] += B[r * n + k] * B[c * n + k];
      if (r == c) A[r * n + c] += 1.0;
    }
  std::vector<double> L = A;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = r + 1; c < n; ++c) L[r * n + c] = -123.0;  // upper is not read
  ASSERT_TRUE(cholesky_lower(L.data(), n));
  double worst = 0.0;
  for (int64_t r = 0; r < n; ++r) {
    EXPECT_GT(L[r * n + r], 0.0);
    for (int64_t c = 0; c < n; ++c) {
      if (c > r) {
        ASSERT_EQ(L[r * n + c], 0.0);
      }
      double s = 0.0;
      for (int64_t k = 0; k < n; ++k) s += L[r * n + k] * L[c * n + k];
      worst =
          std::max(worst, std::fabs(s - A[r * n + c]) / (1e-12 * (1.0 + std::fabs(A[r * n + c]))));
    }
  }
  EXPECT_LE(worst, 1000.0);                        // ≤ 1e-9 relative
  std::vector<double> bad = {1.0, 2.0, 2.0, 1.0};  // eigenvalues 3, −1
  EXPECT_FALSE(cholesky_lower(bad.data(), 2));
  std::vector<double> neg = {-1.0};
  EXPECT_FALSE(cholesky_lower(neg.data(), 1));
}

class GptqVsRtn : public ::testing::TestWithParam<std::tuple<bool, int64_t, int>> {};

TEST_P(GptqVsRtn, LayerErrorClearlyLower) {
  const auto [sym, gs, bits] = GetParam();
  const Layer& L = layer();
  QuantSpec spec;
  spec.sym = sym;
  spec.group_size = gs;
  spec.bits = bits;
  auto r = gptq_quantize(L.W, L.H, spec, GptqOptions{});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  expect_all_finite(*r);
  EXPECT_FALSE(r->fell_back_to_rtn);
  EXPECT_TRUE(r->warnings.empty());
  const double e_gptq = layer_error(L.X, L.W, r->qlinear.dequantize());
  const double e_rtn = layer_error(L.X, L.W, fake_quantize(L.W, spec));
  std::printf("%s g%lld w%d: GPTQ/RTN layer error %.4g / %.4g = %.3f\n", sym ? "sym" : "asym",
              static_cast<long long>(gs), bits, e_gptq, e_rtn, e_gptq / e_rtn);
  EXPECT_LE(e_gptq, 0.8 * e_rtn);
}

INSTANTIATE_TEST_SUITE_P(SymGroupBits, GptqVsRtn,
                         ::testing::Combine(::testing::Bool(), ::testing::Values(128, -1),
                                            ::testing::Values(4, 3)));

// Issue #14, the textbook measurement: on the same Hessian, GPTQ with the full
// symmetric grid (2·absmax/(2^b − 1), all 2^b codes) against the narrow one
// (absmax/(2^(b−1) − 1)). The step shrinks by (2^b − 2)/(2^b − 1) (14/15 at 4 bits),
// so the error of the unclipped weights by about its square (0.87).
TEST(Gptq, FullGridBeatsNarrowOnTheSameHessian) {
  const Layer& L = layer();
  for (int bits : {4, 3}) {
    for (int64_t gs : {int64_t{128}, int64_t{-1}}) {
      for (int variant = 0; variant < 2; ++variant) {
        QuantSpec full;
        full.bits = bits;
        full.group_size = gs;
        QuantSpec narrow = full;
        narrow.narrow = true;
        GptqOptions opts;
        opts.act_order = variant == 1;
        opts.static_groups = variant == 1;
        auto rf = gptq_quantize(L.W, L.H, full, opts);
        auto rn = gptq_quantize(L.W, L.H, narrow, opts);
        ASSERT_TRUE(rf.is_ok() && rn.is_ok());
        expect_all_finite(*rf);
        expect_all_finite(*rn);
        const double ef = layer_error(L.X, L.W, rf->qlinear.dequantize());
        const double en = layer_error(L.X, L.W, rn->qlinear.dequantize());
        std::printf("w%d g%lld%s: GPTQ layer error full / narrow grid %.4g / %.4g = %.3f\n", bits,
                    static_cast<long long>(gs), opts.act_order ? " act_order+static" : "", ef, en,
                    ef / en);
        EXPECT_LE(ef, 0.95 * en) << "bits " << bits << " gs " << gs << " variant " << variant;
        // Both grids use zero 2^(b−1); only the scales differ, by about 14/15 (7/15 at 3 bits).
        for (int32_t z : rf->qlinear.zeros) ASSERT_EQ(z, 1 << (bits - 1));
      }
    }
  }
}

// The MSE clip search inside GPTQ: static groups and per-channel parameters are the
// searched ones of the original columns, each column's error weighted by H_cc;
// per-group parameters the searched ones of the error-updated columns (checked
// against the fp64 reference in MatchesFp64Reference). The search trades range for
// resolution, so on a layer with outliers it must not be worse than GPTQ on the
// plain range by more than noise.
TEST(Gptq, MseClipSearchesTheGroupParameters) {
  const Layer& L = layer();
  for (int64_t gs : {int64_t{64}, int64_t{-1}}) {
    QuantSpec plain;
    plain.group_size = gs;
    QuantSpec mse = plain;
    mse.mse_clip = true;
    GptqOptions opts;
    opts.static_groups = true;
    auto rm = gptq_quantize(L.W, L.H, mse, opts);
    auto rp = gptq_quantize(L.W, L.H, plain, opts);
    ASSERT_TRUE(rm.is_ok() && rp.is_ok());
    const int64_t O = L.W.dim(0), I = L.W.dim(1);
    std::vector<double> diag(static_cast<size_t>(I));
    for (int64_t i = 0; i < I; ++i) diag[i] = L.H.at(i, i) == 0.0f ? 1.0 : L.H.at(i, i);
    const int64_t g = gs == -1 ? I : gs;
    int64_t shrunk = 0;
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t c0 = 0; c0 < I; c0 += g) {
        const QParam want = find_qparam(L.W.ptr() + o * I + c0, g, mse, diag.data() + c0);
        const QParam pl = find_qparam(L.W.ptr() + o * I + c0, g, plain);
        ASSERT_EQ(rm->qlinear.scales[(c0 / g) * O + o], want.scale);
        ASSERT_EQ(rm->qlinear.zeros[(c0 / g) * O + o], want.zero);
        shrunk += want.scale < pl.scale;
      }
    }
    EXPECT_GT(shrunk, 0) << "the search never clipped: the test layer has no outliers?";
    const double em = layer_error(L.X, L.W, rm->qlinear.dequantize());
    const double ep = layer_error(L.X, L.W, rp->qlinear.dequantize());
    std::printf(
        "g%lld static: GPTQ layer error with / without MSE clip %.4g / %.4g = %.3f "
        "(%lld of %lld ranges shrunk)\n",
        static_cast<long long>(gs), em, ep, em / ep, static_cast<long long>(shrunk),
        static_cast<long long>(O * ((I + g - 1) / g)));
    EXPECT_LE(em, 1.05 * ep);
  }
}

TEST(Gptq, ActOrderAndStaticGroupsBeatRtn) {
  const Layer& L = layer();
  for (int64_t gs : {64, 128}) {
    QuantSpec spec;
    spec.group_size = gs;
    spec.sym = false;
    const double e_rtn = layer_error(L.X, L.W, fake_quantize(L.W, spec));
    for (int variant = 0; variant < 3; ++variant) {
      GptqOptions opts;
      opts.act_order = variant != 1;
      opts.static_groups = variant != 0;
      auto r = gptq_quantize(L.W, L.H, spec, opts);
      ASSERT_TRUE(r.is_ok());
      expect_all_finite(*r);
      const double e = layer_error(L.X, L.W, r->qlinear.dequantize());
      std::printf("g%lld act_order %d static %d: GPTQ/RTN %.3f\n", static_cast<long long>(gs),
                  opts.act_order, opts.static_groups, e / e_rtn);
      EXPECT_LE(e, 0.8 * e_rtn);
      // g_idx: static groups keep i / gs; act-order alone permutes it.
      const auto& g_idx = r->qlinear.g_idx;
      std::vector<int> count(r->qlinear.num_groups(), 0);
      for (int32_t g : g_idx) ++count[g];
      for (int c : count) EXPECT_EQ(c, gs);
      bool trivial = true;
      for (int64_t i = 0; i < 256; ++i) trivial &= g_idx[i] == i / gs;
      EXPECT_EQ(trivial, opts.static_groups);
      EXPECT_EQ(r->qlinear.act_order, !trivial);
    }
  }
}

TEST(Gptq, BlocksizeDoesNotChangeTheMath) {
  const Layer& L = layer();
  for (int64_t gs : {128, 48, -1}) {
    for (bool act : {false, true}) {
      QuantSpec spec;
      spec.group_size = gs;
      GptqOptions opts;
      opts.act_order = act;
      opts.blocksize = 128;
      auto ref = gptq_quantize(L.W, L.H, spec, opts);
      ASSERT_TRUE(ref.is_ok());
      for (int64_t bs : {1, 7, 32, 256}) {
        opts.blocksize = bs;
        auto r = gptq_quantize(L.W, L.H, spec, opts);
        ASSERT_TRUE(r.is_ok());
        const double eq = frac_equal(r->qlinear.q, ref->qlinear.q);
        if (eq < 1.0) {
          std::printf("g%lld act %d blocksize %lld vs 128: %.5f of codes equal\n",
                      static_cast<long long>(gs), act, static_cast<long long>(bs), eq);
        }
        EXPECT_GE(eq, 0.999) << "gs " << gs << " blocksize " << bs;
        EXPECT_NEAR(r->loss, ref->loss, 1e-3 * ref->loss);
      }
    }
  }
}

TEST(Gptq, MatchesFp64Reference) {
  // Small layer so the O(I³) reference is instant; blocks of 16 with groups of 24
  // put group boundaries mid-block and groups across blocks.
  const Tensor X = correlated_inputs(21, 512, 96);
  const Tensor W = random_weight(22, 24, 96);
  const Tensor H = hessian_of(X);
  int64_t total = 0, differ = 0;
  // Grids: symmetric full, symmetric narrow, asymmetric, symmetric full + MSE clip.
  for (int grid = 0; grid < 4; ++grid) {
    for (int64_t gs : {24, 32, -1}) {
      for (int variant = 0; variant < 3; ++variant) {
        QuantSpec spec;
        spec.sym = grid != 2;
        spec.narrow = grid == 1;
        spec.mse_clip = grid == 3;
        spec.group_size = gs;
        GptqOptions opts;
        opts.blocksize = 16;
        opts.act_order = variant >= 1;
        opts.static_groups = variant == 2;
        auto r = gptq_quantize(W, H, spec, opts);
        ASSERT_TRUE(r.is_ok());
        const std::vector<uint8_t> want =
            gptq_ref_codes(W, H, spec, opts.percdamp, opts.act_order, opts.static_groups);
        int64_t d = 0;
        for (size_t k = 0; k < want.size(); ++k) {
          if (want[k] != r->qlinear.q[k]) {
            ++d;
            EXPECT_LE(std::abs(want[k] - r->qlinear.q[k]), 1) << "not an off-by-one";
          }
        }
        total += static_cast<int64_t>(want.size());
        differ += d;
      }
    }
  }
  // fp32 vs fp64 error feedback can move a value across a rounding boundary;
  // such a flip then changes that row's later updates slightly. Allow 0.5%.
  std::printf("fast solver vs fp64 reference: %lld of %lld codes differ\n",
              static_cast<long long>(differ), static_cast<long long>(total));
  EXPECT_LE(differ, total / 200);
}

TEST(Gptq, DequantizeEqualsSolverQ) {
  const Layer& L = layer();
  for (int variant = 0; variant < 4; ++variant) {
    QuantSpec spec;
    spec.group_size = variant == 3 ? -1 : 64;
    spec.sym = variant % 2 == 0;
    GptqOptions opts;
    opts.act_order = variant >= 1;
    opts.static_groups = variant == 2;
    opts.keep_solver_q = true;
    auto r = gptq_quantize(L.W, L.H, spec, opts);
    ASSERT_TRUE(r.is_ok());
    const Tensor D = r->qlinear.dequantize();
    ASSERT_EQ(r->solver_q.shape, D.shape);
    EXPECT_EQ(std::memcmp(D.ptr(), r->solver_q.ptr(), D.data.size() * sizeof(float)), 0)
        << "variant " << variant;
  }
}

TEST(Gptq, LossIsTheDampedObjective) {
  // Σ (w − q)²/d²/2 = ½ tr(ΔW (H + damp·I) ΔWᵀ) (the error feedback makes ΔW = E·U).
  const Layer& L = layer();
  QuantSpec spec;
  GptqOptions opts;
  auto r = gptq_quantize(L.W, L.H, spec, opts);
  ASSERT_TRUE(r.is_ok());
  const int64_t O = 64, I = 256;
  double mean = 0.0;
  for (int64_t i = 0; i < I; ++i) mean += L.H.at(i, i);
  const double damp = opts.percdamp * mean / I;
  const Tensor D = r->qlinear.dequantize();
  double obj = 0.0;
  for (int64_t o = 0; o < O; ++o) {
    std::vector<double> d(I);
    for (int64_t i = 0; i < I; ++i) d[i] = static_cast<double>(L.W.at(o, i)) - D.at(o, i);
    for (int64_t a = 0; a < I; ++a)
      for (int64_t b = 0; b < I; ++b) obj += d[a] * (L.H.at(a, b) + (a == b ? damp : 0.0)) * d[b];
  }
  obj *= 0.5;
  EXPECT_NEAR(r->loss, obj, 1e-3 * obj);
}

TEST(Gptq, DeadAndDuplicatedColumns) {
  Tensor X = correlated_inputs(31, 1024, 128);
  for (int64_t t = 0; t < 1024; ++t) {
    X.at(t, 5) = 0.0f;        // dead input
    X.at(t, 77) = 0.0f;       // dead input
    X.at(t, 9) = X.at(t, 8);  // duplicate: H singular but not dead
  }
  const Tensor W = random_weight(32, 32, 128);
  const Tensor H = hessian_of(X);
  for (bool act : {false, true}) {
    QuantSpec spec;
    spec.group_size = 32;
    GptqOptions opts;
    opts.act_order = act;
    opts.percdamp = 0.0;  // the duplicate alone makes H singular: RTN, or GPTQ if rounding helps
    testing::internal::CaptureStderr();
    auto r0 = gptq_quantize(W, H, spec, opts);
    testing::internal::GetCapturedStderr();
    ASSERT_TRUE(r0.is_ok());
    expect_all_finite(*r0);
    if (r0->fell_back_to_rtn) {
      EXPECT_EQ(r0->profile.factor_attempts, 1);  // no retries when there is no damping to scale
    }
    opts.percdamp = 0.01;
    auto r = gptq_quantize(W, H, spec, opts);
    ASSERT_TRUE(r.is_ok());
    expect_all_finite(*r);
    EXPECT_FALSE(r->fell_back_to_rtn);
    EXPECT_TRUE(r->warnings.empty());
    const Tensor D = r->qlinear.dequantize();
    for (int64_t o = 0; o < 32; ++o) {
      EXPECT_EQ(D.at(o, 5), 0.0f);
      EXPECT_EQ(D.at(o, 77), 0.0f);
    }
    const double e = layer_error(X, W, D);
    const double e_rtn = layer_error(X, W, fake_quantize(W, spec));
    EXPECT_LE(e, 0.8 * e_rtn);
  }
}

// H with an injected negative diagonal entry (row and column otherwise zero):
// PD only once damp > 1e-4·mean(diag).
Tensor not_pd_hessian() {
  Tensor H = layer().H;
  const int64_t I = H.dim(0);
  double mean = 0.0;
  for (int64_t i = 0; i < I; ++i) mean += H.at(i, i);
  mean /= I;
  for (int64_t i = 0; i < I; ++i) H.at(3, i) = H.at(i, 3) = 0.0f;
  H.at(3, 3) = static_cast<float>(-1e-4 * mean);
  return H;
}

TEST(Gptq, NonPdHessianRetriesWithMoreDamping) {
  const Layer& L = layer();
  const Tensor H = not_pd_hessian();
  QuantSpec spec;
  GptqOptions opts;
  opts.percdamp = 1e-6;  // 1e-6, 1e-5, 1e-4 fail; 1e-3 succeeds
  testing::internal::CaptureStderr();
  auto r = gptq_quantize(L.W, H, spec, opts);
  const std::string log = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(r.is_ok());
  expect_all_finite(*r);
  EXPECT_FALSE(r->fell_back_to_rtn);
  EXPECT_EQ(r->profile.factor_attempts, 4);
  EXPECT_EQ(r->warnings.size(), 3u);
  EXPECT_NEAR(r->percdamp_used, 1e-3, 1e-12);
  EXPECT_NE(log.find("Cholesky failed"), std::string::npos) << log;
  EXPECT_NE(log.find("[64, 256]"), std::string::npos) << log;
  EXPECT_NE(log.find("retrying with percdamp 0.001"), std::string::npos) << log;
}

TEST(Gptq, FallsBackToRtnWhenDampingDoesNotHelp) {
  const Layer& L = layer();
  const Tensor H = not_pd_hessian();
  QuantSpec spec;
  GptqOptions opts;
  opts.percdamp = 1e-6;
  opts.max_damp_retries = 1;
  testing::internal::CaptureStderr();
  auto r = gptq_quantize(L.W, H, spec, opts);
  const std::string log = testing::internal::GetCapturedStderr();
  ASSERT_TRUE(r.is_ok());
  expect_all_finite(*r);
  EXPECT_TRUE(r->fell_back_to_rtn);
  EXPECT_EQ(r->percdamp_used, 0.0);
  EXPECT_EQ(r->warnings.size(), 3u);  // two failures + the fallback
  EXPECT_NE(log.find("falling back to RTN"), std::string::npos) << log;
  auto rtn = rtn_quantize(L.W, spec);
  ASSERT_TRUE(rtn.is_ok());
  EXPECT_EQ(r->qlinear.q, rtn->q);
  EXPECT_EQ(r->qlinear.scales, rtn->scales);
}

// The overload that takes the Hessian (and releases it once factored) gives the same
// result bit for bit, also through damping retries and the RTN fallback (which read H
// again before the release).
TEST(Gptq, TakingTheHessianGivesTheSameResult) {
  const Layer& L = layer();
  struct Case {
    Tensor H;
    double percdamp;
    int retries;
  };
  const Case cases[] = {{L.H, 0.01, 3}, {not_pd_hessian(), 1e-6, 4}, {not_pd_hessian(), 1e-6, 1}};
  for (const Case& c : cases) {
    QuantSpec spec;
    GptqOptions opts;
    opts.act_order = true;
    opts.percdamp = c.percdamp;
    opts.max_damp_retries = c.retries;
    testing::internal::CaptureStderr();
    auto ref = gptq_quantize(L.W, c.H, spec, opts);
    Tensor owned = c.H;
    auto r = gptq_quantize(L.W, std::move(owned), spec, opts);
    testing::internal::GetCapturedStderr();
    ASSERT_TRUE(ref.is_ok() && r.is_ok());
    EXPECT_EQ(r->qlinear.q, ref->qlinear.q);
    EXPECT_EQ(r->qlinear.scales, ref->qlinear.scales);
    EXPECT_EQ(r->qlinear.g_idx, ref->qlinear.g_idx);
    EXPECT_EQ(r->loss, ref->loss);
    EXPECT_TRUE(std::isfinite(r->loss));
    EXPECT_EQ(r->fell_back_to_rtn, ref->fell_back_to_rtn);
    EXPECT_EQ(r->percdamp_used, ref->percdamp_used);
  }
}

TEST(Gptq, RejectsBadInput) {
  const Layer& L = layer();
  QuantSpec spec;
  GptqOptions opts;
  Tensor Hsmall({8, 8});
  EXPECT_EQ(gptq_quantize(L.W, Hsmall, spec, opts).status().code(), Code::kInvalidInput);
  Tensor Hnan = L.H;
  Hnan.at(2, 1) = std::nanf("");
  EXPECT_EQ(gptq_quantize(L.W, Hnan, spec, opts).status().code(), Code::kInvalidInput);
  opts.blocksize = 0;
  EXPECT_EQ(gptq_quantize(L.W, L.H, spec, opts).status().code(), Code::kInvalidInput);
  opts.blocksize = 128;
  opts.percdamp = -1.0;
  EXPECT_EQ(gptq_quantize(L.W, L.H, spec, opts).status().code(), Code::kInvalidInput);
  opts.percdamp = 0.01;
  spec.group_size = 0;
  EXPECT_EQ(gptq_quantize(L.W, L.H, spec, opts).status().code(), Code::kInvalidInput);
}

}  // namespace
}  // namespace qcal

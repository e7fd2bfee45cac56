// Quantizer grids, rounding, fp16 scales, MSE clip search and RTN groups
// (worker/engine/quantizer.h, methods.md §0.1). Letters: O rows, I columns.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/dtype.h"
#include "common/rng.h"
#include "worker/engine/quantizer.h"

namespace qcal {
namespace {

std::vector<float> normal_row(Rng& rng, int64_t n, double sigma) {
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = static_cast<float>(sigma * rng.normal());
  return x;
}

Tensor normal_matrix(uint64_t seed, int64_t O, int64_t I, double sigma) {
  Rng rng(seed);
  Tensor W({O, I});
  for (auto& v : W.data) v = static_cast<float>(sigma * rng.normal());
  return W;
}

double norm24(const float* x, int64_t n, QParam p, int maxq) {
  double e = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const float d = dequantize_code(quantize_code(x[j], p, maxq), p) - x[j];
    e += std::pow(std::fabs(static_cast<double>(d)), 2.4);
  }
  return e;
}

bool is_f16(float s) { return round_to_dtype(s, DType::kF16) == s; }

// Straightforward transcription of the reference clip search (QuaRot
// WeightQuantizer with mse): 80 shrink factors, first strict minimum, no pruning.
QParam ref_clip_params(const std::vector<float>& x, const QuantSpec& spec) {
  float lo = 0.0f, hi = 0.0f;
  for (float v : x) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (!spec.sym && lo == 0.0f && hi == 0.0f) {
    lo = -1.0f;
    hi = 1.0f;
  }
  const int maxq = spec.maxq();
  auto fin = [](float s) { return round_to_dtype(std::max(s, 1e-5f), DType::kF16); };
  QParam best_p;
  double best = std::numeric_limits<double>::infinity();
  for (int i = 0; i < 80; ++i) {
    const float p = static_cast<float>(1.0 - i / 100.0);
    const float l = p * lo, h = p * hi;
    QParam c;
    if (spec.sym) {
      // AutoGPTQ: scale = 2·xmax/maxq, zero (maxq+1)/2; QuaRot (narrow): xmax/(maxq/2).
      const int half = 1 << (spec.bits - 1);
      const float xmax = std::max(-l, h);
      c.scale = fin(spec.narrow ? xmax / static_cast<float>(half - 1)
                                : 2.0f * xmax / static_cast<float>(maxq));
      c.zero = half;
    } else {
      c.scale = fin((h - l) / static_cast<float>(maxq));
      c.zero = static_cast<int32_t>(
          std::clamp(std::nearbyint(-l / c.scale), 0.0f, static_cast<float>(maxq)));
    }
    const double e = norm24(x.data(), static_cast<int64_t>(x.size()), c, maxq);
    if (e < best) {
      best = e;
      best_p = c;
    }
  }
  return best_p;
}

TEST(QuantSpec, Validate) {
  QuantSpec s;
  EXPECT_TRUE(s.validate().is_ok());
  for (int b : {2, 3, 4, 8}) {
    s.bits = b;
    EXPECT_TRUE(s.validate().is_ok()) << b;
  }
  s.bits = 5;
  EXPECT_EQ(s.validate().code(), Code::kInvalidInput);
  s.bits = 4;
  s.group_size = 0;
  EXPECT_EQ(s.validate().code(), Code::kInvalidInput);
  s.group_size = -2;
  EXPECT_EQ(s.validate().code(), Code::kInvalidInput);
  s.group_size = -1;
  EXPECT_TRUE(s.validate().is_ok());
}

TEST(Quantizer, RoundsHalfToEven) {
  // Scale 1 exactly: absmax 7.5 on the full symmetric 4-bit grid (2·7.5/15, zero 8).
  // +7.5 rounds to 8 and clips to code 15 (7); −7.5 rounds to −8, code 0.
  const std::vector<float> x = {7.5f, 0.5f, 1.5f, 2.5f, 3.5f, -0.5f, -1.5f, -2.5f, -3.5f, -7.5f};
  QuantSpec spec;
  spec.sym = true;
  const QParam p = find_qparam(x.data(), static_cast<int64_t>(x.size()), spec);
  ASSERT_EQ(p.scale, 1.0f);
  ASSERT_EQ(p.zero, 8);
  const std::vector<int32_t> want = {15, 8, 10, 10, 12, 8, 6, 6, 4, 0};
  for (size_t k = 0; k < x.size(); ++k) {
    EXPECT_EQ(quantize_code(x[k], p, 15), want[k]) << "x = " << x[k];
  }
  // The narrow grid puts absmax 7 on scale 1 (7/7): ±7 → codes 15 and 1.
  QuantSpec narrow = spec;
  narrow.narrow = true;
  const std::vector<float> y = {7.0f, -7.0f, 2.5f};
  const QParam pn = find_qparam(y.data(), 3, narrow);
  ASSERT_EQ(pn.scale, 1.0f);
  ASSERT_EQ(pn.zero, 8);
  EXPECT_EQ(quantize_code(7.0f, pn, 15), 15);
  EXPECT_EQ(quantize_code(-7.0f, pn, 15), 1);
  EXPECT_EQ(quantize_code(2.5f, pn, 15), 10);
  // Asymmetric specs ignore `narrow`.
  QuantSpec asym_n;
  asym_n.sym = false;
  asym_n.narrow = true;
  QuantSpec asym_f = asym_n;
  asym_f.narrow = false;
  EXPECT_EQ(find_qparam(y.data(), 3, asym_n).scale, find_qparam(y.data(), 3, asym_f).scale);
  // Asymmetric zero: −xmin/scale = 7.5 rounds to 8; 6.5 rounds to 6.
  EXPECT_EQ(quantize_code(0.5f, QParam{1.0f, 3}, 15), 3);
  EXPECT_EQ(quantize_code(-4.5f, QParam{1.0f, 3}, 15), 0);  // −4 + 3 → clamped
  const std::vector<float> a = {-7.5f, 7.5f};               // scale 1, zero 7.5 → 8
  QuantSpec asym;
  asym.sym = false;
  EXPECT_EQ(find_qparam(a.data(), 2, asym).zero, 8);
  const std::vector<float> b = {-6.5f, 8.5f};  // scale 1, zero 6.5 → 6
  EXPECT_EQ(find_qparam(b.data(), 2, asym).zero, 6);
  // NaN maps to code 0.
  EXPECT_EQ(quantize_code(std::numeric_limits<float>::quiet_NaN(), p, 15), 0);
}

enum class Grid { kFull, kNarrow, kAsym };
const char* grid_name(Grid g) {
  return g == Grid::kFull ? "sym" : g == Grid::kNarrow ? "sym narrow" : "asym";
}

class GridTest : public ::testing::TestWithParam<std::tuple<int, Grid>> {};

TEST_P(GridTest, CodesZerosAndErrors) {
  const auto [bits, grid] = GetParam();
  const bool sym = grid != Grid::kAsym;
  QuantSpec spec;
  spec.bits = bits;
  spec.sym = sym;
  spec.narrow = grid == Grid::kNarrow;
  spec.group_size = -1;
  const int maxq = spec.maxq();
  const int half = 1 << (bits - 1);
  Rng rng(1000 + bits * 3 + static_cast<int>(grid));
  double worst_budget = 0.0;
  std::vector<int64_t> code_count(static_cast<size_t>(maxq + 1), 0);
  for (int row = 0; row < 200; ++row) {
    // Rows of very different magnitudes, some one-signed.
    const double sigma = std::pow(10.0, -4.0 + 6.0 * rng.uniform());
    std::vector<float> x = normal_row(rng, 64, sigma);
    if (row % 5 == 1) {
      for (auto& v : x) v = std::fabs(v);
    }
    if (row % 5 == 2) {
      for (auto& v : x) v = -std::fabs(v);
    }
    const QParam p = find_qparam(x.data(), 64, spec);
    ASSERT_TRUE(is_f16(p.scale)) << p.scale;
    ASSERT_GE(p.scale, 1e-5f);
    ASSERT_GE(p.zero, 0);
    ASSERT_LE(p.zero, maxq);
    if (sym) {
      ASSERT_EQ(p.zero, half);
      // The scale is the exact one rounded to fp16 (or clamped to 1e-5).
      float absmax = 0.0f;
      for (float v : x) absmax = std::max(absmax, std::fabs(v));
      const float exact = grid == Grid::kNarrow ? absmax / static_cast<float>(half - 1)
                                                : 2.0f * absmax / static_cast<float>(maxq);
      ASSERT_EQ(p.scale, round_to_dtype(std::max(exact, 1e-5f), DType::kF16));
    }
    // 0 is on the grid and round-trips exactly.
    EXPECT_EQ(dequantize_code(quantize_code(0.0f, p, maxq), p), 0.0f);
    const float grid_lo = dequantize_code(0, p);
    const float grid_hi = dequantize_code(maxq, p);
    EXPECT_LE(grid_lo, 0.0f);
    EXPECT_GE(grid_hi, 0.0f);
    for (float v : x) {
      const int32_t q = quantize_code(v, p, maxq);
      ASSERT_GE(q, 0);
      ASSERT_LE(q, maxq);
      ++code_count[static_cast<size_t>(q)];
      const double err = std::fabs(static_cast<double>(dequantize_code(q, p)) - v);
      // Inside the grid: half a step (plus fp32 rounding of x/scale). Outside it
      // (the range end: the full grid's positive end by design, or any end after
      // the scale was rounded to fp16): half a step (the end's offset, or the
      // asymmetric zero's rounding) plus the fp16 rounding of the scale, relative
      // error 2^-11 (2^-25 / scale for subnormal scales, spacing 2^-24), times the
      // steps from the zero to the end: |x| / scale (symmetric), up to maxq
      // (asymmetric, where the zero is computed from the rounded scale).
      const bool inside = v >= grid_lo && v <= grid_hi;
      const double f16_rel = std::max(0x1p-11, 0x1p-25 / p.scale);
      const double span = sym ? std::fabs(v) : maxq * static_cast<double>(p.scale);
      const double budget = inside ? 0.5 * p.scale * (1 + 1e-6) + 1e-7 * std::fabs(v)
                                   : 0.5 * p.scale + span * f16_rel * 1.01;
      ASSERT_LE(err, budget) << "x " << v << " scale " << p.scale << " zero " << p.zero;
      worst_budget = std::max(worst_budget, err / budget);
    }
  }
  std::printf("bits %d %s: max error used %.5f of the budget\n", bits, grid_name(grid),
              worst_budget);
  // The full grid uses every code, both ends included; RTN on the narrow grid never
  // reaches code 0 (−absmax is code 1).
  EXPECT_GT(code_count[static_cast<size_t>(maxq)], 0);
  if (grid == Grid::kNarrow) {
    EXPECT_EQ(code_count[0], 0);
  } else {
    EXPECT_GT(code_count[0], 0);
  }
}

INSTANTIATE_TEST_SUITE_P(BitsAndGrid, GridTest,
                         ::testing::Combine(::testing::Values(2, 3, 4, 8),
                                            ::testing::Values(Grid::kFull, Grid::kNarrow,
                                                              Grid::kAsym)));

TEST(Quantizer, AllZeroRows) {
  const std::vector<float> z(32, 0.0f);
  for (int bits : {2, 3, 4, 8}) {
    for (bool sym : {true, false}) {
      QuantSpec spec;
      spec.bits = bits;
      spec.sym = sym;
      for (bool mse : {false, true}) {
        spec.mse_clip = mse;
        const QParam p = find_qparam(z.data(), 32, spec);
        EXPECT_TRUE(std::isfinite(p.scale));
        EXPECT_GE(p.scale, 1e-5f);
        if (sym) {
          EXPECT_EQ(p.scale, round_to_dtype(1e-5f, DType::kF16));
        } else {
          // Range [−1, 1].
          EXPECT_EQ(p.scale, round_to_dtype(2.0f / spec.maxq(), DType::kF16));
        }
        EXPECT_EQ(dequantize_code(quantize_code(0.0f, p, spec.maxq()), p), 0.0f);
      }
    }
  }
  Tensor W({3, 16}, 0.0f);
  QuantSpec spec;
  spec.group_size = 8;
  const Tensor Wq = fake_quantize(W, spec);
  for (float v : Wq.data) EXPECT_EQ(v, 0.0f);
}

TEST(Quantizer, ScalesAreFp16AndClamped) {
  QuantSpec spec;
  for (bool sym : {true, false}) {
    spec.sym = sym;
    // Tiny: below the 1e-5 clamp.
    std::vector<float> tiny = {1e-9f, -2e-9f, 3e-9f};
    QParam p = find_qparam(tiny.data(), 3, spec);
    EXPECT_EQ(p.scale, round_to_dtype(1e-5f, DType::kF16));
    EXPECT_GE(p.scale, 1e-5f);
    // Huge: the scale would overflow fp16, it is capped at 65504.
    std::vector<float> huge = {1e9f, -1e9f};
    p = find_qparam(huge.data(), 2, spec);
    EXPECT_EQ(p.scale, 65504.0f);
    // Ordinary values: representable in fp16 and close to the exact scale.
    std::vector<float> x = {0.123456f, -0.0654321f, 0.01f};
    p = find_qparam(x.data(), 3, spec);
    EXPECT_TRUE(is_f16(p.scale));
    const float exact = sym ? 2.0f * 0.123456f / 15.0f : (0.123456f + 0.0654321f) / 15.0f;
    EXPECT_NEAR(p.scale, exact, exact * 0x1p-11);
  }
}

TEST(Quantizer, MseClipMatchesReferenceAndNeverWorse) {
  Rng rng(7);
  for (int bits : {2, 3, 4, 8}) {
    for (Grid grid : {Grid::kFull, Grid::kNarrow, Grid::kAsym}) {
      const bool sym = grid != Grid::kAsym;
      QuantSpec plain;
      plain.bits = bits;
      plain.sym = sym;
      plain.narrow = grid == Grid::kNarrow;
      QuantSpec mse = plain;
      mse.mse_clip = true;
      int improved = 0;
      for (int row = 0; row < 60; ++row) {
        std::vector<float> x = normal_row(rng, 128, 0.02);
        // Heavy tails: a few outliers make clipping worthwhile.
        for (int k = 0; k < 3; ++k) x[rng.below(128)] *= 8.0f;
        if (row % 3 == 0) x[rng.below(128)] = 0.5f;
        const QParam pp = find_qparam(x.data(), 128, plain);
        const QParam pm = find_qparam(x.data(), 128, mse);
        const double ep = norm24(x.data(), 128, pp, plain.maxq());
        const double em = norm24(x.data(), 128, pm, plain.maxq());
        ASSERT_LE(em, ep) << "bits " << bits << " " << grid_name(grid);
        if (em < ep) ++improved;
        const QParam pr = ref_clip_params(x, mse);
        ASSERT_EQ(pm.scale, pr.scale)
            << "bits " << bits << " " << grid_name(grid) << " row " << row;
        ASSERT_EQ(pm.zero, pr.zero);
        EXPECT_TRUE(is_f16(pm.scale));
      }
      if (bits <= 4) {
        EXPECT_GT(improved, 30) << "clip search rarely helps?";
      }
    }
  }
}

TEST(Rtn, PerChannelEqualsOneGroupAndGroupsHelp) {
  const Tensor W = normal_matrix(3, 16, 256, 0.05);
  QuantSpec pc;
  pc.group_size = -1;
  QuantSpec whole = pc;
  whole.group_size = 256;
  QuantSpec bigger = pc;
  bigger.group_size = 1000;
  auto a = rtn_quantize(W, pc);
  auto b = rtn_quantize(W, whole);
  auto c = rtn_quantize(W, bigger);
  ASSERT_TRUE(a.is_ok() && b.is_ok() && c.is_ok());
  EXPECT_EQ(a->num_groups(), 1);
  EXPECT_EQ(a->q, b->q);
  EXPECT_EQ(a->scales, b->scales);
  EXPECT_EQ(a->zeros, c->zeros);
  EXPECT_EQ(a->q, c->q);
  for (int32_t g : a->g_idx) EXPECT_EQ(g, 0);
  EXPECT_FALSE(a->act_order);

  QuantSpec g32 = pc;
  g32.group_size = 32;
  auto d = rtn_quantize(W, g32);
  ASSERT_TRUE(d.is_ok());
  EXPECT_EQ(d->num_groups(), 8);
  EXPECT_EQ(d->scales.size(), 8u * 16u);
  for (int64_t i = 0; i < 256; ++i) EXPECT_EQ(d->g_idx[i], i / 32);
  auto sq = [&](const Tensor& Wq) {
    double s = 0.0;
    for (size_t k = 0; k < W.data.size(); ++k) s += std::pow(W.data[k] - Wq.data[k], 2);
    return s;
  };
  const double e_pc = sq(a->dequantize());
  const double e_g = sq(d->dequantize());
  std::printf("RTN 4-bit sym squared error: per channel %.4g, group 32 %.4g\n", e_pc, e_g);
  EXPECT_LT(e_g, 0.8 * e_pc);
}

TEST(Rtn, PartialLastGroupAndDequantizeFormula) {
  const Tensor W = normal_matrix(4, 5, 100, 1.0);
  for (bool sym : {true, false}) {
    QuantSpec spec;
    spec.group_size = 32;
    spec.sym = sym;
    spec.bits = 3;
    auto r = rtn_quantize(W, spec);
    ASSERT_TRUE(r.is_ok());
    const QuantizedLinear& ql = *r;
    ASSERT_EQ(ql.num_groups(), 4);  // 32 + 32 + 32 + 4
    EXPECT_EQ(ql.g_idx[95], 2);
    EXPECT_EQ(ql.g_idx[96], 3);
    EXPECT_EQ(ql.g_idx[99], 3);
    const Tensor D = ql.dequantize();
    for (int64_t o = 0; o < 5; ++o) {
      const QParam last = find_qparam(W.ptr() + o * 100 + 96, 4, spec);
      EXPECT_EQ(ql.scales[3 * 5 + o], last.scale);
      EXPECT_EQ(ql.zeros[3 * 5 + o], last.zero);
      for (int64_t i = 0; i < 100; ++i) {
        const int64_t g = i / 32;
        const QParam p{ql.scales[g * 5 + o], ql.zeros[g * 5 + o]};
        const int32_t q = quantize_code(W.at(o, i), p, spec.maxq());
        ASSERT_EQ(ql.q[o * 100 + i], q);
        ASSERT_EQ(D.at(o, i), p.scale * static_cast<float>(q - p.zero));
      }
    }
    const Tensor F = fake_quantize(W, spec);
    EXPECT_EQ(std::memcmp(F.ptr(), D.ptr(), D.data.size() * sizeof(float)), 0);
  }
}

TEST(Rtn, RejectsBadInput) {
  QuantSpec spec;
  Tensor v({8});
  EXPECT_EQ(rtn_quantize(v, spec).status().code(), Code::kInvalidInput);
  Tensor e({0, 8});
  EXPECT_EQ(rtn_quantize(e, spec).status().code(), Code::kInvalidInput);
  Tensor W({2, 8}, 1.0f);
  W.at(1, 3) = std::numeric_limits<float>::infinity();
  const Status s = rtn_quantize(W, spec).status();
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_NE(s.message().find("[1, 3]"), std::string::npos) << s.message();
  W.at(1, 3) = 0.0f;
  spec.bits = 6;
  EXPECT_EQ(rtn_quantize(W, spec).status().code(), Code::kInvalidInput);
}

}  // namespace
}  // namespace qcal

// labels: unit
// Integer kernels (kernels/qgemm.h): the fast activation quantizer and every
// integer GEMM kernel the CPU runs (scalar, SSE2, AVX2, AVX-512 VNNI) equal
// their scalar references bit for bit on fresh random inputs; the references
// themselves are checked against fp64 arithmetic and hand-worked values.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/qgemm.h"

namespace qcal {
namespace {

std::vector<float> random_floats(int64_t n, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = static_cast<float>(scale * rng.normal());
  return x;
}

std::vector<int8_t> random_codes(int64_t n, int bits, uint64_t seed) {
  Rng rng(seed);
  const int lo = -(1 << (bits - 1)), span = 1 << bits;
  std::vector<int8_t> c(static_cast<size_t>(n));
  for (int8_t& v : c) v = static_cast<int8_t>(lo + static_cast<int>(rng.below(span)));
  return c;
}

int64_t groups_of(int64_t cols, int64_t group) {
  return group > 0 ? (cols + group - 1) / group : 1;
}

// Restores QCAL_QGEMM_ISA at scope exit.
class IsaOverride {
 public:
  explicit IsaOverride(const char* isa) {
    if (const char* e = std::getenv("QCAL_QGEMM_ISA")) saved_ = e, had_ = true;
    ::setenv("QCAL_QGEMM_ISA", isa, 1);
  }
  ~IsaOverride() {
    if (had_)
      ::setenv("QCAL_QGEMM_ISA", saved_.c_str(), 1);
    else
      ::unsetenv("QCAL_QGEMM_ISA");
  }

 private:
  std::string saved_;
  bool had_ = false;
};

// The kernels this CPU can run, best last.
std::vector<std::string> runnable_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"scalar", "sse2", "avx2", "avx512vnni"}) {
    IsaOverride o(isa);
    if (std::string(qgemm_isa()) == isa) out.push_back(isa);
  }
  return out;
}

TEST(QuantizeActSym, FastEqualsReference) {
  uint64_t seed = 1;
  int cases = 0;
  for (int bits : {2, 3, 4, 8})
    for (float clip : {1.0f, 0.9f})
      for (int64_t group : {-1, 16, 7, 128})
        for (int64_t cols : {1, 7, 37, 128, 300}) {
          const int64_t rows = 5, G = groups_of(cols, group);
          std::vector<float> x = random_floats(rows * cols, ++seed, 3.0);
          for (int64_t c = 0; c < cols; ++c)
            x[static_cast<size_t>(2 * cols + c)] = 0.0f;  // zero row
          std::vector<int8_t> q(x.size()), qr(x.size());
          std::vector<float> s(static_cast<size_t>(rows * G)), sr(s.size());
          quantize_act_sym(x.data(), rows, cols, bits, clip, group, q.data(), s.data());
          quantize_act_sym_ref(x.data(), rows, cols, bits, clip, group, qr.data(), sr.data());
          ASSERT_EQ(q, qr) << "bits " << bits << " clip " << clip << " group " << group << " cols "
                           << cols;
          ASSERT_EQ(0, std::memcmp(s.data(), sr.data(), s.size() * sizeof(float)));
          for (int64_t g = 0; g < G; ++g) EXPECT_EQ(s[static_cast<size_t>(2 * G + g)], 1.0f);
          const int qmax = (1 << (bits - 1)) - 1;
          double worst = 0.0;  // |x − s·q| / s, ≤ 1/2 without clipping
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) {
              const int code = q[static_cast<size_t>(r * cols + c)];
              ASSERT_GE(code, -qmax - 1);
              ASSERT_LE(code, qmax);
              const float sc = s[static_cast<size_t>(r * G + (group > 0 ? c / group : 0))];
              const double e = std::fabs(x[static_cast<size_t>(r * cols + c)] - sc * code) / sc;
              if (clip == 1.0f) worst = std::max(worst, e);
            }
          EXPECT_LE(worst, 0.5 + 1e-5);
          ++cases;
        }
  std::printf("quantize_act_sym: %d shapes, fast == reference\n", cases);
}

TEST(QuantizeActSym, RoundsHalfToEven) {
  // absmax 7 with 4 bits and clip 1 gives s = 1: the codes are rint(x).
  const float x[] = {2.5f, -3.5f, 0.5f, 1.5f, -0.5f, 7.0f, -6.5f, 4.49f};
  const int8_t want[] = {2, -4, 0, 2, 0, 7, -6, 4};
  int8_t q[8], qr[8];
  float s = 0, sr = 0;
  quantize_act_sym(x, 1, 8, 4, 1.0f, -1, q, &s);
  quantize_act_sym_ref(x, 1, 8, 4, 1.0f, -1, qr, &sr);
  EXPECT_EQ(s, 1.0f);
  EXPECT_EQ(sr, 1.0f);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(q[i], want[i]) << i;
    EXPECT_EQ(qr[i], want[i]) << i;
  }
}

TEST(QuantizeAsym, RoundTripErrorWithinHalfStep) {
  uint64_t seed = 50;
  for (int bits : {2, 4, 8})
    for (int64_t group : {-1, 32, 10})
      for (int64_t cols : {1, 9, 64, 130}) {
        const int64_t rows = 4, G = groups_of(cols, group);
        std::vector<float> x = random_floats(rows * cols, ++seed, 2.0);
        for (int64_t c = 0; c < cols; ++c) {
          x[static_cast<size_t>(cols + c)] = 0.0f;  // all zero
          x[static_cast<size_t>(2 * cols + c)] =
              std::fabs(x[static_cast<size_t>(2 * cols + c)]);  // ≥ 0
        }
        std::vector<uint8_t> q(x.size());
        std::vector<float> s(static_cast<size_t>(rows * G)), z(s.size()), xd(x.size());
        quantize_asym(x.data(), rows, cols, bits, 1.0f, group, q.data(), s.data(), z.data());
        dequantize_asym(q.data(), s.data(), z.data(), rows, cols, group, xd.data());
        double worst = 0.0;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const size_t i = static_cast<size_t>(r * cols + c);
            ASSERT_LE(q[i], (1 << bits) - 1);
            const size_t gi = static_cast<size_t>(r * G + (group > 0 ? c / group : 0));
            ASSERT_GT(s[gi], 0.0f);
            ASSERT_EQ(z[gi], std::rint(z[gi]));
            const double e = std::fabs(static_cast<double>(xd[i]) - x[i]) / s[gi];
            ASSERT_FALSE(std::isnan(e));
            worst = std::max(worst, e);
          }
        EXPECT_LE(worst, 0.5 + 1e-4) << "bits " << bits << " group " << group << " cols " << cols;
        for (int64_t g = 0; g < G; ++g) {
          EXPECT_EQ(s[static_cast<size_t>(G + g)], 1.0f);  // zero row: s = 1, z = 0
          EXPECT_EQ(z[static_cast<size_t>(G + g)], 0.0f);
          EXPECT_EQ(z[static_cast<size_t>(2 * G + g)], 0.0f);  // non-negative row: xmin = 0
        }
      }
}

TEST(QuantizeAsym, HandWorkedValues) {
  // xmin −1, xmax 2, 2 bits: s = 1, z = 1, q = rint(x) + 1 clamped to [0, 3].
  const float x[] = {-1.0f, 2.0f, 0.4f, 0.5f, 1.5f};
  uint8_t q[5];
  float s, z;
  quantize_asym(x, 1, 5, 2, 1.0f, -1, q, &s, &z);
  EXPECT_EQ(s, 1.0f);
  EXPECT_EQ(z, 1.0f);
  const uint8_t want[] = {0, 3, 1, 1, 3};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(q[i], want[i]) << i;
}

TEST(PackWeight, RoundTripAndNibbleOrder) {
  uint64_t seed = 70;
  for (int bits : {2, 3, 4, 5, 8})
    for (int64_t in : {1, 2, 7, 33, 64, 100})
      for (int64_t group : {-1, 4}) {
        const int64_t out = 5, G = groups_of(in, group);
        const std::vector<int8_t> codes = random_codes(out * in, bits, ++seed);
        const std::vector<float> scales = random_floats(out * G, ++seed);
        const PackedWeight w = pack_weight(codes.data(), scales.data(), out, in, bits, group);
        EXPECT_EQ(w.bits, bits);
        EXPECT_EQ(w.out, out);
        EXPECT_EQ(w.in, in);
        EXPECT_EQ(w.scales, scales);
        EXPECT_EQ(static_cast<int64_t>(w.data.size()), bits <= 4 ? out * ((in + 1) / 2) : out * in);
        std::vector<int8_t> row(static_cast<size_t>(in));
        for (int64_t o = 0; o < out; ++o) {
          unpack_row(w, o, row.data());
          for (int64_t i = 0; i < in; ++i)
            ASSERT_EQ(row[static_cast<size_t>(i)], codes[static_cast<size_t>(o * in + i)])
                << "bits " << bits << " in " << in << " o " << o << " i " << i;
        }
      }
  // Low nibble = even column: (−1, 2, −8) → bytes 0x2F, 0x08.
  const int8_t c[] = {-1, 2, -8};
  const float s = 1.0f;
  const PackedWeight w = pack_weight(c, &s, 1, 3, 4);
  ASSERT_EQ(w.data.size(), 2u);
  EXPECT_EQ(w.data[0], 0x2F);
  EXPECT_EQ(w.data[1], 0x08);
  EXPECT_EQ(w.group, -1);
}

struct GemmCase {
  int bits;
  int64_t rows, in, out, group;
  bool bias;
};

// Checks the reference against fp64: y ≈ sx·Σ_g sw·Σ xq·wq (+ bias).
void expect_ref_matches_fp64(const std::vector<int8_t>& xq, const std::vector<float>& sx,
                             const std::vector<int8_t>& wq, const std::vector<float>& sw,
                             const std::vector<float>& bias, const GemmCase& c,
                             const std::vector<float>& y) {
  const int64_t G = groups_of(c.in, c.group);
  double worst = 0.0;
  for (int64_t t = 0; t < c.rows; ++t)
    for (int64_t o = 0; o < c.out; ++o) {
      double s = 0.0, mag = 0.0;
      for (int64_t i = 0; i < c.in; ++i) {
        const int64_t g = c.group > 0 ? i / c.group : 0;
        const double p = double(sw[static_cast<size_t>(o * G + g)]) *
                         xq[static_cast<size_t>(t * c.in + i)] *
                         wq[static_cast<size_t>(o * c.in + i)];
        s += p;
        mag += std::fabs(p);
      }
      double want = sx[static_cast<size_t>(t)] * s;
      const double scale = std::fabs(sx[static_cast<size_t>(t)]) * mag + 1e-30;
      if (c.bias) want += bias[static_cast<size_t>(o)];
      const double e = std::fabs(y[static_cast<size_t>(t * c.out + o)] - want) / (scale + 1.0);
      ASSERT_FALSE(std::isnan(e));
      worst = std::max(worst, e);
    }
  EXPECT_LE(worst, 1e-5);
}

TEST(Qgemm, EveryKernelEqualsReference) {
  const std::vector<std::string> isas = runnable_isas();
  ASSERT_FALSE(isas.empty());
  std::string names;
  for (const auto& s : isas) names += s + " ";
  std::printf("qgemm kernels on this CPU: %s\n", names.c_str());
  const GemmCase cases[] = {
      {4, 1, 1, 1, -1, false},      {4, 5, 37, 3, -1, true},     {8, 13, 300, 70, -1, true},
      {4, 13, 300, 70, 50, true},   {8, 7, 256, 65, 128, false}, {4, 9, 256, 130, 32, true},
      {8, 3, 129, 64, 32, true},    {3, 6, 100, 17, 7, false},   {8, 64, 512, 256, -1, true},
      {4, 64, 512, 256, 128, true},
  };
  uint64_t seed = 90;
  for (const GemmCase& c : cases) {
    const int64_t G = groups_of(c.in, c.group);
    const std::vector<int8_t> xq = random_codes(c.rows * c.in, c.bits, ++seed);
    const std::vector<int8_t> wq = random_codes(c.out * c.in, c.bits, ++seed);
    std::vector<float> sx = random_floats(c.rows, ++seed, 0.1),
                       sw = random_floats(c.out * G, ++seed, 0.01);
    const std::vector<float> bias = random_floats(c.out, ++seed);
    const PackedWeight w = pack_weight(wq.data(), sw.data(), c.out, c.in, c.bits, c.group);
    const float* b = c.bias ? bias.data() : nullptr;
    std::vector<float> ref(static_cast<size_t>(c.rows * c.out));
    qgemm_ref(xq.data(), sx.data(), c.rows, w, b, ref.data());
    expect_ref_matches_fp64(xq, sx, wq, sw, bias, c, ref);
    for (const std::string& isa : isas) {
      IsaOverride o(isa.c_str());
      std::vector<float> y(ref.size(), NAN);
      qgemm(xq.data(), sx.data(), c.rows, w, b, y.data());
      ASSERT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * sizeof(float)))
          << isa << ": bits " << c.bits << " rows " << c.rows << " in " << c.in << " out " << c.out
          << " group " << c.group;
    }
  }
}

TEST(Qgemm, ExtremeCodesAccumulateExactly) {
  // All −128 · −128 products: 300 · 16384 per output, exact in int32.
  const int64_t rows = 5, in = 300, out = 6;
  std::vector<int8_t> xq(static_cast<size_t>(rows * in), -128),
      wq(static_cast<size_t>(out * in), -128);
  wq[0] = 127;  // one different product in output 0
  const std::vector<float> sx(static_cast<size_t>(rows), 1.0f), sw(static_cast<size_t>(out), 1.0f);
  const PackedWeight w = pack_weight(wq.data(), sw.data(), out, in, 8);
  for (const std::string& isa : runnable_isas()) {
    IsaOverride o(isa.c_str());
    std::vector<float> y(static_cast<size_t>(rows * out));
    qgemm(xq.data(), sx.data(), rows, w, nullptr, y.data());
    for (int64_t t = 0; t < rows; ++t) {
      EXPECT_EQ(y[static_cast<size_t>(t * out)], 299.0f * 16384.0f - 128.0f * 127.0f) << isa;
      for (int64_t o2 = 1; o2 < out; ++o2)
        EXPECT_EQ(y[static_cast<size_t>(t * out + o2)], 300.0f * 16384.0f) << isa;
    }
  }
}

TEST(Qgemm, QuantizedLinearApproximatesFloat) {
  // 8-bit activations and weights: y ≈ x·Wᵀ within a few percent of its scale.
  const int64_t T = 8, I = 256, O = 32;
  const std::vector<float> x = random_floats(T * I, 123), wf = random_floats(O * I, 124);
  std::vector<int8_t> xq(x.size()), wq(wf.size());
  std::vector<float> sx(static_cast<size_t>(T)), sw(static_cast<size_t>(O));
  quantize_act_sym(x.data(), T, I, 8, 1.0f, -1, xq.data(), sx.data());
  quantize_act_sym(wf.data(), O, I, 8, 1.0f, -1, wq.data(), sw.data());
  const PackedWeight w = pack_weight(wq.data(), sw.data(), O, I, 8);
  std::vector<float> y(static_cast<size_t>(T * O));
  qgemm(xq.data(), sx.data(), T, w, nullptr, y.data());
  double err = 0.0, norm = 0.0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o) {
      double s = 0.0;
      for (int64_t i = 0; i < I; ++i)
        s += double(x[static_cast<size_t>(t * I + i)]) * wf[static_cast<size_t>(o * I + i)];
      err += (y[static_cast<size_t>(t * O + o)] - s) * (y[static_cast<size_t>(t * O + o)] - s);
      norm += s * s;
    }
  const double rel = std::sqrt(err / norm);
  std::printf("W8A8 linear vs fp64: relative error %.4f\n", rel);
  EXPECT_LT(rel, 0.02);
}

}  // namespace
}  // namespace qcal

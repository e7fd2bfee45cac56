// labels: gpu
// The device ops of kernels/cuda_ops.h against their CPU references: the fp64
// instantiation of kernels/grad.h (rmsnorm, rope, attention, swiglu, kron),
// sgemm_ref (kernels/gemm.h), the engine's own fp32 fake quantizer (grad.h
// fake_quant_*<float>: rounding decisions must be compared at the same
// precision) and adamw_step_ref (bit for bit). Inputs are fresh random numbers
// each run (the seed is printed; QCAL_TEST_SEED=<n> repeats a run), with row
// widths that are not multiples of any tile (172, 11008, 14336, 28672) and NaN
// inputs, which must reach every output that depends on them.
//
// Tolerances, per element, written once per kind of op below:
//   |got − ref| ≤ abs·max|ref| + rel·|ref|
// A NaN in got where ref has none (or the reverse) fails. Every comparison
// prints its worst element and the share of the budget it used.
//
// Without a GPU every device test skips (GTEST_SKIP with the probe's reason);
// the tests that need none (the stubs' kUnavailable, adamw_step_ref against the
// engine's AdamW) run everywhere.
// Letters: T tokens, C channels, n_h / n_kv heads, d head dim, P prefix keys,
// G groups per row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/cuda_ops.h"
#include "kernels/device.h"
#include "kernels/gemm.h"
#include "kernels/grad.h"
#ifndef QCAL_GPU_CHECK_STANDALONE
#include "worker/calib/param.h"
#endif

namespace qcal::cuda {
namespace {

using VecF = std::vector<float>;
using VecD = std::vector<double>;

// ---------------------------------------------------------------- tolerances

struct Tol {
  double abs;  // times max|ref|
  double rel;  // times |ref|
};
// fp32 element-wise chains of a few roundings (rmsnorm y, swiglu, rope).
constexpr Tol kElementwise{2e-7, 2e-6};
// fp32 with one fp64-accumulated reduction per row (rmsnorm dx, dgamma).
constexpr Tol kRowReduce{1e-6, 1e-5};
// fp32 GEMM chains with K up to a few thousand (gemm, kron, attention).
constexpr Tol kGemm{2e-6, 2e-5};
constexpr Tol kAttention{1e-5, 1e-4};

const float kNaN = std::numeric_limits<float>::quiet_NaN();

uint64_t test_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("QCAL_TEST_SEED"))
      return static_cast<uint64_t>(std::strtoull(s, nullptr, 10));
    return (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  }();
  return seed;
}

// Fresh inputs per test: the run seed mixed with a per-call counter.
Rng fresh_rng() {
  static uint64_t calls = 0;
  return Rng(test_seed() + 0x9e3779b97f4a7c15ull * ++calls);
}

VecF randn(Rng& rng, int64_t n, double scale = 1.0, double shift = 0.0) {
  VecF v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(shift + scale * rng.normal());
  return v;
}

VecD to_d(const VecF& v) { return VecD(v.begin(), v.end()); }

// ---------------------------------------------------------------- comparison

::testing::AssertionResult close(const std::string& what, const VecF& got, const VecD& ref, Tol t) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " elements, reference " << ref.size();
  }
  double maxref = 0.0;
  for (double r : ref)
    if (std::isfinite(r)) maxref = std::max(maxref, std::fabs(r));
  double worst_share = 0.0, worst_diff = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool gn = std::isnan(got[i]), rn = std::isnan(ref[i]);
    if (gn || rn) {
      if (gn && rn) continue;  // propagated as the reference does
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << got[i]
                                           << ", reference " << ref[i] << " (NaN mismatch)";
    }
    if (std::isinf(ref[i]) || std::isinf(got[i])) {
      if (got[i] == ref[i]) continue;
      return ::testing::AssertionFailure()
             << what << ": element " << i << " is " << got[i] << ", reference " << ref[i];
    }
    const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double budget = t.abs * maxref + t.rel * std::fabs(ref[i]);
    const double share = budget > 0.0 ? diff / budget : (diff > 0.0 ? INFINITY : 0.0);
    if (share > worst_share || i == 0) {
      worst_share = share;
      worst_diff = diff;
      worst = i;
    }
  }
  std::printf("[cuda_ops] %-48s max |Δ| %.3g (element %zu), %.1f%% of budget\n", what.c_str(),
              worst_diff, worst, 100.0 * worst_share);
  if (worst_share > 1.0) {
    return ::testing::AssertionFailure()
           << what << ": element " << worst << " is " << got[worst] << ", reference " << ref[worst]
           << ": |Δ| " << worst_diff << " is " << worst_share << "× the budget (abs " << t.abs
           << "·" << maxref << " + rel " << t.rel << "·|ref|)";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult close(const std::string& what, const VecF& got, const VecF& ref, Tol t) {
  return close(what, got, to_d(ref), t);
}

// ---------------------------------------------------------------- device plumbing

// Failures of the plumbing throw: GoogleTest reports the message as a failure.
void must(const Status& s) {
  if (!s.is_ok()) throw std::runtime_error(s.to_string());
}
template <typename T>
T must(Result<T> r) {
  if (!r.is_ok()) throw std::runtime_error(r.status().to_string());
  return std::move(r).value();
}

template <typename T>
DeviceArray<T> up(const std::vector<T>& v) {
  return must(DeviceArray<T>::from_host(v));
}
template <typename T>
std::vector<T> down(const DeviceArray<T>& a) {
  return must(a.to_host());
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda_available(&why)) GTEST_SKIP() << why;
    ctx_ = must(CudaContext::create());
    std::printf("[cuda_ops] device %s, seed %llu (QCAL_TEST_SEED repeats it)\n",
                ctx_->device_name().c_str(), static_cast<unsigned long long>(test_seed()));
  }
  CudaContext& ctx() { return *ctx_; }
  std::unique_ptr<CudaContext> ctx_;
};

// ---------------------------------------------------------------- no GPU

TEST(CudaOpsNoGpu, ContextAndArraysAreUnavailable) {
  std::string why;
  if (cuda_available(&why)) GTEST_SKIP() << "a GPU is present";
  auto c = CudaContext::create();
  ASSERT_FALSE(c.is_ok());
  EXPECT_EQ(c.status().code(), Code::kUnavailable) << c.status().to_string();
  auto a = DeviceArray<float>::zeros(16);
  ASSERT_FALSE(a.is_ok());
  EXPECT_EQ(a.status().code(), Code::kUnavailable) << a.status().to_string();
}

TEST(CudaOpsRef, AdamWRefMatchesEngineAdamW) {
#ifdef QCAL_GPU_CHECK_STANDALONE
  GTEST_SKIP() << "the standalone GPU check does not link the calibration engine";
#else
  Rng rng = fresh_rng();
  const int64_t n = 1031;
  VecD p(n), g(n);
  for (auto& x : p) x = rng.normal();
  std::vector<double> engine_p = p, m(n, 0.0), v(n, 0.0);
  calib::AdamWOptions o;
  o.weight_decay = 0.05;
  calib::AdamW opt(o);
  opt.add(&engine_p, 10.0);
  AdamWStep s;
  s.beta1 = o.beta1;
  s.beta2 = o.beta2;
  s.eps = o.eps;
  s.weight_decay = o.weight_decay;
  for (int64_t t = 1; t <= 4; ++t) {
    for (auto& x : g) x = rng.normal() * 1e-2;
    const double lr = 3e-3 / static_cast<double>(t);
    opt.step({g}, lr);
    s.lr = lr * 10.0;
    s.t = t;
    adamw_step_ref(p.data(), m.data(), v.data(), g.data(), n, s);
    ASSERT_EQ(0, std::memcmp(p.data(), engine_p.data(), n * sizeof(double))) << "step " << t;
  }
#endif
}

// ---------------------------------------------------------------- argument checks

TEST_F(CudaOps, BadShapesAreInvalidInput) {
  auto buf = must(DeviceArray<float>::zeros(4096));
  float* b = buf.data();
  EXPECT_EQ(gemm(ctx(), false, false, 4, 4, 8, 1.f, b, 4, b, 4, 0.f, b, 4).code(),
            Code::kInvalidInput);  // lda 4 < K 8
  EXPECT_EQ(gemm(ctx(), false, false, -1, 4, 4, 1.f, b, 4, b, 4, 0.f, b, 4).code(),
            Code::kInvalidInput);
  EXPECT_EQ(rope_fwd(ctx(), b, 4, 2, 7, 0, 10000.0).code(), Code::kInvalidInput);  // odd d
  EXPECT_EQ(rope_fwd(ctx(), b, 4, 2, 8, 0, 0.0).code(), Code::kInvalidInput);
  EXPECT_EQ(attention_fwd(ctx(), b, b, nullptr, nullptr, 0, b, b, 4, 6, 4, 8, b).code(),
            Code::kInvalidInput);  // 6 % 4
  EXPECT_EQ(attention_fwd(ctx(), b, b, nullptr, nullptr, 2, b, b, 4, 4, 4, 8, b).code(),
            Code::kInvalidInput);  // P without pk / pv
  EXPECT_EQ(kron_fwd(ctx(), b, b, b, b, -2, 4, 4).code(), Code::kInvalidInput);
  FakeQuantSpec s;
  s.bits = 1;  // symmetric needs 2
  EXPECT_EQ(fake_quant_fwd(ctx(), s, b, b, 4, 8, nullptr, nullptr, 0, nullptr).code(),
            Code::kInvalidInput);
  s.bits = 4;
  s.clip = ClipMode::kLearned;
  EXPECT_EQ(fake_quant_fwd(ctx(), s, b, b, 4, 8, b, b, 3, nullptr).code(),
            Code::kInvalidInput);  // n_beta neither 1 nor rows·G
  EXPECT_EQ(fake_quant_fwd(ctx(), s, b, b, 4, 8, nullptr, nullptr, 1, nullptr).code(),
            Code::kInvalidInput);
  s.clip = ClipMode::kFixed;
  DeviceFakeQuantSaved saved;
  must(fake_quant_fwd(ctx(), s, b, b, 4, 8, nullptr, nullptr, 0, &saved));
  EXPECT_EQ(
      fake_quant_bwd(ctx(), s, b, nullptr, nullptr, b, b, 8, 8, nullptr, nullptr, 0, saved).code(),
      Code::kInvalidInput);  // saved from a 4-row forward
  AdamWStep st;
  st.t = 0;
  auto pd = must(DeviceArray<double>::zeros(4));
  EXPECT_EQ(adamw_step(ctx(), pd.data(), pd.data(), pd.data(), pd.data(), 4, st).code(),
            Code::kInvalidInput);
  // Sizes of 0 are no-ops.
  EXPECT_TRUE(rmsnorm_fwd(ctx(), b, b, b, 0, 172, 1e-5f, b).is_ok());
  EXPECT_TRUE(swiglu_fwd(ctx(), b, b, b, 0).is_ok());
  EXPECT_TRUE(kron_fwd(ctx(), b, b, b, b, 0, 4, 4).is_ok());
  must(ctx().synchronize());
}

// ---------------------------------------------------------------- GEMM

TEST_F(CudaOps, GemmMatchesReference) {
  Rng rng = fresh_rng();
  struct Case {
    int64_t M, N, K;
  };
  for (Case c : {Case{37, 53, 29}, Case{1, 172, 333}, Case{130, 64, 2048}, Case{64, 1, 1}}) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        const int64_t lda = (ta ? c.M : c.K) + 3, ldb = (tb ? c.K : c.N) + 1, ldc = c.N + 5;
        const VecF A = randn(rng, (ta ? c.K : c.M) * lda), B = randn(rng, (tb ? c.N : c.K) * ldb);
        VecF C = randn(rng, c.M * ldc);
        VecF want = C;
        sgemm_ref(ta, tb, c.M, c.N, c.K, 0.5f, A.data(), lda, B.data(), ldb, -1.5f, want.data(),
                  ldc);
        auto dA = up(A), dB = up(B), dC = up(C);
        must(gemm(ctx(), ta, tb, c.M, c.N, c.K, 0.5f, dA.data(), lda, dB.data(), ldb, -1.5f,
                  dC.data(), ldc));
        const std::string what = "gemm " + std::to_string(c.M) + "x" + std::to_string(c.N) + "x" +
                                 std::to_string(c.K) + (ta ? " Aᵀ" : "") + (tb ? " Bᵀ" : "");
        EXPECT_TRUE(close(what, down(dC), want, kGemm));
      }
    }
  }
}

TEST_F(CudaOps, GemmStridedBatchedSharesAStrideZeroMatrix) {
  Rng rng = fresh_rng();
  const int64_t M = 17, N = 33, K = 19, batch = 5;
  const VecF A = randn(rng, M * K), B = randn(rng, batch * K * N);
  VecF want(static_cast<size_t>(batch * M * N));
  for (int64_t b = 0; b < batch; ++b)
    sgemm_ref(false, false, M, N, K, 1.f, A.data(), K, B.data() + b * K * N, N, 0.f,
              want.data() + b * M * N, N);
  auto dA = up(A), dB = up(B);
  auto dC = must(DeviceArray<float>::zeros(batch * M * N));
  must(gemm_strided_batched(ctx(), false, false, M, N, K, 1.f, dA.data(), K, 0, dB.data(), N, K * N,
                            0.f, dC.data(), N, M * N, batch));
  EXPECT_TRUE(close("gemm_strided_batched shared A", down(dC), want, kGemm));
}

TEST_F(CudaOps, GemmPropagatesNaN) {
  Rng rng = fresh_rng();
  const int64_t M = 9, N = 11, K = 300;
  VecF A = randn(rng, M * K);
  const VecF B = randn(rng, K * N);
  A[4 * K + 123] = kNaN;
  auto dA = up(A), dB = up(B);
  auto dC = must(DeviceArray<float>::zeros(M * N));
  must(gemm(ctx(), false, false, M, N, K, 1.f, dA.data(), K, dB.data(), N, 0.f, dC.data(), N));
  const VecF C = down(dC);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      EXPECT_EQ(std::isnan(C[i * N + j]), i == 4)
          << "C(" << i << ", " << j << ") = " << C[i * N + j];
}

// ---------------------------------------------------------------- RMSNorm

TEST_F(CudaOps, RmsNormMatchesReference) {
  for (int64_t C : {int64_t{172}, int64_t{4096}, int64_t{11008}, int64_t{14336}, int64_t{28672}}) {
    Rng rng = fresh_rng();
    const int64_t rows = 7;
    const VecF x = randn(rng, rows * C, 2.0, 0.3), gamma = randn(rng, C, 0.5, 1.0),
               dy = randn(rng, rows * C), dgamma0 = randn(rng, C);
    const float eps = 1e-5f;
    VecD y_ref(rows * C), inv_ref(rows), dx_ref(rows * C), dgamma_ref = to_d(dgamma0);
    qcal::rmsnorm_fwd<double>(y_ref.data(), to_d(x).data(), to_d(gamma).data(), rows, C, eps,
                              inv_ref.data());
    qcal::rmsnorm_bwd<double>(dx_ref.data(), dgamma_ref.data(), to_d(dy).data(), to_d(x).data(),
                              to_d(gamma).data(), inv_ref.data(), rows, C);

    auto dx_in = up(x), dg = up(gamma), ddy = up(dy), ddgamma = up(dgamma0);
    auto dyv = must(DeviceArray<float>::zeros(rows * C)),
         dinv = must(DeviceArray<float>::zeros(rows)),
         ddx = must(DeviceArray<float>::zeros(rows * C));
    must(rmsnorm_fwd(ctx(), dyv.data(), dx_in.data(), dg.data(), rows, C, eps, dinv.data()));
    must(rmsnorm_bwd(ctx(), ddx.data(), ddgamma.data(), ddy.data(), dx_in.data(), dg.data(),
                     dinv.data(), rows, C));
    const std::string tag = " C=" + std::to_string(C);
    EXPECT_TRUE(close("rmsnorm_fwd y" + tag, down(dyv), y_ref, kElementwise));
    EXPECT_TRUE(close("rmsnorm_fwd inv_rms" + tag, down(dinv), inv_ref, kElementwise));
    EXPECT_TRUE(close("rmsnorm_bwd dx" + tag, down(ddx), dx_ref, kRowReduce));
    EXPECT_TRUE(close("rmsnorm_bwd dgamma (+=)" + tag, down(ddgamma), dgamma_ref, kRowReduce));

    // In place (y aliases x) gives the same y.
    auto inplace = up(x);
    must(rmsnorm_fwd(ctx(), inplace.data(), inplace.data(), dg.data(), rows, C, eps, dinv.data()));
    EXPECT_TRUE(close("rmsnorm_fwd in place" + tag, down(inplace), y_ref, kElementwise));
  }
}

TEST_F(CudaOps, RmsNormPropagatesNaN) {
  Rng rng = fresh_rng();
  const int64_t rows = 5, C = 11008;
  VecF x = randn(rng, rows * C);
  const VecF gamma = randn(rng, C, 0.5, 1.0);
  VecF dy = randn(rng, rows * C);
  x[2 * C + 77] = kNaN;
  dy[3 * C + 5000] = kNaN;
  VecD y_ref(rows * C), inv_ref(rows), dx_ref(rows * C), dgamma_ref(C, 0.0);
  qcal::rmsnorm_fwd<double>(y_ref.data(), to_d(x).data(), to_d(gamma).data(), rows, C, 1e-5,
                            inv_ref.data());
  qcal::rmsnorm_bwd<double>(dx_ref.data(), dgamma_ref.data(), to_d(dy).data(), to_d(x).data(),
                            to_d(gamma).data(), inv_ref.data(), rows, C);
  auto dxv = up(x), dg = up(gamma), ddy = up(dy);
  auto dyv = must(DeviceArray<float>::zeros(rows * C)),
       dinv = must(DeviceArray<float>::zeros(rows)),
       ddx = must(DeviceArray<float>::zeros(rows * C)), ddg = must(DeviceArray<float>::zeros(C));
  must(rmsnorm_fwd(ctx(), dyv.data(), dxv.data(), dg.data(), rows, C, 1e-5f, dinv.data()));
  must(rmsnorm_bwd(ctx(), ddx.data(), ddg.data(), ddy.data(), dxv.data(), dg.data(), dinv.data(),
                   rows, C));
  // Row 2 is NaN throughout (y, inv_rms, dx); dgamma is NaN everywhere row 2
  // reaches (every column) and at column 5000; everything else matches.
  EXPECT_TRUE(close("rmsnorm_fwd y with NaN", down(dyv), y_ref, kElementwise));
  EXPECT_TRUE(close("rmsnorm_bwd dx with NaN", down(ddx), dx_ref, kRowReduce));
  EXPECT_TRUE(close("rmsnorm_bwd dgamma with NaN", down(ddg), dgamma_ref, kRowReduce));
  const VecF y = down(dyv);
  EXPECT_TRUE(std::isnan(y[2 * C]) && std::isnan(y[3 * C - 1]));
  EXPECT_FALSE(std::isnan(y[C]));
}

// ---------------------------------------------------------------- RoPE

TEST_F(CudaOps, RopeMatchesReference) {
  struct Case {
    int64_t T, heads, d, pos0;
    double theta;
  };
  for (Case c : {Case{33, 5, 128, 100, 10000.0}, Case{7, 3, 6, 0, 10000.0},
                 Case{129, 8, 64, 4000, 500000.0}}) {
    Rng rng = fresh_rng();
    const VecF x = randn(rng, c.T * c.heads * c.d);
    VecD fwd_ref = to_d(x), bwd_ref = to_d(x);
    qcal::rope_fwd<double>(fwd_ref.data(), c.T, c.heads, c.d, c.pos0, c.theta);
    qcal::rope_bwd<double>(bwd_ref.data(), c.T, c.heads, c.d, c.pos0, c.theta);
    auto a = up(x), b = up(x);
    must(rope_fwd(ctx(), a.data(), c.T, c.heads, c.d, c.pos0, c.theta));
    must(rope_bwd(ctx(), b.data(), c.T, c.heads, c.d, c.pos0, c.theta));
    const std::string tag = " T=" + std::to_string(c.T) + " d=" + std::to_string(c.d) +
                            " pos0=" + std::to_string(c.pos0);
    EXPECT_TRUE(close("rope_fwd" + tag, down(a), fwd_ref, kElementwise));
    EXPECT_TRUE(close("rope_bwd" + tag, down(b), bwd_ref, kElementwise));
  }
}

TEST_F(CudaOps, RopePropagatesNaN) {
  Rng rng = fresh_rng();
  const int64_t T = 9, heads = 4, d = 128;
  VecF x = randn(rng, T * heads * d);
  x[(3 * heads + 2) * d + 10] = kNaN;  // t 3, head 2, pair (10, 74)
  VecD ref = to_d(x);
  qcal::rope_fwd<double>(ref.data(), T, heads, d, 17, 10000.0);
  auto a = up(x);
  must(rope_fwd(ctx(), a.data(), T, heads, d, 17, 10000.0));
  const VecF got = down(a);
  EXPECT_TRUE(close("rope_fwd with NaN", got, ref, kElementwise));
  int64_t nans = 0;
  for (float v : got) nans += std::isnan(v);
  EXPECT_EQ(nans, 2);  // exactly the rotated pair
}

// ---------------------------------------------------------------- SwiGLU

TEST_F(CudaOps, SwigluMatchesReference) {
  for (int64_t C : {int64_t{172}, int64_t{11008}, int64_t{14336}, int64_t{28672}}) {
    Rng rng = fresh_rng();
    const int64_t n = 3 * C;
    const VecF g = randn(rng, n, 3.0), u = randn(rng, n), dout = randn(rng, n);
    VecD out_ref(n), dg_ref(n), du_ref(n);
    qcal::swiglu_fwd<double>(out_ref.data(), to_d(g).data(), to_d(u).data(), n);
    qcal::swiglu_bwd<double>(dg_ref.data(), du_ref.data(), to_d(dout).data(), to_d(g).data(),
                             to_d(u).data(), n);
    auto dg_in = up(g), du_in = up(u), ddout = up(dout);
    auto out = must(DeviceArray<float>::zeros(n)), dg = must(DeviceArray<float>::zeros(n)),
         du = must(DeviceArray<float>::zeros(n));
    must(swiglu_fwd(ctx(), out.data(), dg_in.data(), du_in.data(), n));
    must(swiglu_bwd(ctx(), dg.data(), du.data(), ddout.data(), dg_in.data(), du_in.data(), n));
    const std::string tag = " n=3x" + std::to_string(C);
    EXPECT_TRUE(close("swiglu_fwd" + tag, down(out), out_ref, kElementwise));
    EXPECT_TRUE(close("swiglu_bwd dg" + tag, down(dg), dg_ref, kElementwise));
    EXPECT_TRUE(close("swiglu_bwd du" + tag, down(du), du_ref, kElementwise));
  }
}

TEST_F(CudaOps, SwigluPropagatesNaN) {
  Rng rng = fresh_rng();
  const int64_t n = 14336;
  VecF g = randn(rng, n), u = randn(rng, n), dout = randn(rng, n);
  g[100] = kNaN;
  u[200] = kNaN;
  dout[300] = kNaN;
  VecD out_ref(n), dg_ref(n), du_ref(n);
  qcal::swiglu_fwd<double>(out_ref.data(), to_d(g).data(), to_d(u).data(), n);
  qcal::swiglu_bwd<double>(dg_ref.data(), du_ref.data(), to_d(dout).data(), to_d(g).data(),
                           to_d(u).data(), n);
  auto dg_in = up(g), du_in = up(u), ddout = up(dout);
  auto out = must(DeviceArray<float>::zeros(n)), dg = must(DeviceArray<float>::zeros(n)),
       du = must(DeviceArray<float>::zeros(n));
  must(swiglu_fwd(ctx(), out.data(), dg_in.data(), du_in.data(), n));
  must(swiglu_bwd(ctx(), dg.data(), du.data(), ddout.data(), dg_in.data(), du_in.data(), n));
  EXPECT_TRUE(close("swiglu_fwd with NaN", down(out), out_ref, kElementwise));
  EXPECT_TRUE(close("swiglu_bwd dg with NaN", down(dg), dg_ref, kElementwise));
  EXPECT_TRUE(close("swiglu_bwd du with NaN", down(du), du_ref, kElementwise));
  EXPECT_TRUE(std::isnan(down(out)[100]) && std::isnan(down(out)[200]));
}

// ---------------------------------------------------------------- attention

struct AttnCase {
  int64_t T, n_h, n_kv, d, P;
};

std::string attn_tag(const AttnCase& c) {
  return " T=" + std::to_string(c.T) + " heads " + std::to_string(c.n_h) + "/" +
         std::to_string(c.n_kv) + " d=" + std::to_string(c.d) + " P=" + std::to_string(c.P);
}

TEST_F(CudaOps, AttentionMatchesReference) {
  for (AttnCase c :
       {AttnCase{77, 4, 2, 16, 0}, AttnCase{130, 6, 3, 64, 5}, AttnCase{33, 8, 1, 128, 0},
        AttnCase{1, 2, 2, 8, 3}, AttnCase{200, 4, 4, 32, 0}}) {
    Rng rng = fresh_rng();
    const int64_t qs = c.n_h * c.d, ks = c.n_kv * c.d, S = c.P + c.T;
    const VecF q = randn(rng, c.T * qs, 0.7), k = randn(rng, c.T * ks, 0.7),
               v = randn(rng, c.T * ks), pk = randn(rng, std::max<int64_t>(c.P, 1) * ks, 0.7),
               pv = randn(rng, std::max<int64_t>(c.P, 1) * ks), dout = randn(rng, c.T * qs),
               dpk0 = randn(rng, std::max<int64_t>(c.P, 1) * ks),
               dpv0 = randn(rng, std::max<int64_t>(c.P, 1) * ks);
    VecD out_ref(c.T * qs), probs_ref(c.n_h * c.T * S), dq_ref(c.T * qs), dk_ref(c.T * ks),
        dv_ref(c.T * ks), dpk_ref = to_d(dpk0), dpv_ref = to_d(dpv0);
    const VecD qd = to_d(q), kd = to_d(k), vd = to_d(v), pkd = to_d(pk), pvd = to_d(pv);
    qcal::prefix_attention_fwd<double>(out_ref.data(), qd.data(), pkd.data(), pvd.data(), c.P,
                                       kd.data(), vd.data(), c.T, c.n_h, c.n_kv, c.d,
                                       probs_ref.data());
    qcal::prefix_attention_bwd<double>(
        dq_ref.data(), c.P ? dpk_ref.data() : nullptr, c.P ? dpv_ref.data() : nullptr,
        dk_ref.data(), dv_ref.data(), to_d(dout).data(), qd.data(), pkd.data(), pvd.data(), c.P,
        kd.data(), vd.data(), probs_ref.data(), c.T, c.n_h, c.n_kv, c.d);

    auto dq_in = up(q), dk_in = up(k), dv_in = up(v), dpk_in = up(pk), dpv_in = up(pv),
         ddout = up(dout), ddpk = up(dpk0), ddpv = up(dpv0);
    // Outputs start as NaN: the ops must overwrite them.
    auto out = up(VecF(c.T * qs, kNaN)), probs = up(VecF(c.n_h * c.T * S, kNaN)),
         dq = up(VecF(c.T * qs, kNaN)), dk = up(VecF(c.T * ks, kNaN)),
         dv = up(VecF(c.T * ks, kNaN));
    must(attention_fwd(ctx(), out.data(), dq_in.data(), dpk_in.data(), dpv_in.data(), c.P,
                       dk_in.data(), dv_in.data(), c.T, c.n_h, c.n_kv, c.d, probs.data()));
    must(attention_bwd(ctx(), dq.data(), c.P ? ddpk.data() : nullptr, c.P ? ddpv.data() : nullptr,
                       dk.data(), dv.data(), ddout.data(), dq_in.data(), dpk_in.data(),
                       dpv_in.data(), c.P, dk_in.data(), dv_in.data(), probs.data(), c.T, c.n_h,
                       c.n_kv, c.d));
    const std::string tag = attn_tag(c);
    EXPECT_TRUE(close("attention_fwd out" + tag, down(out), out_ref, kAttention));
    EXPECT_TRUE(close("attention_fwd probs" + tag, down(probs), probs_ref, kAttention));
    EXPECT_TRUE(close("attention_bwd dq" + tag, down(dq), dq_ref, kAttention));
    EXPECT_TRUE(close("attention_bwd dk" + tag, down(dk), dk_ref, kAttention));
    EXPECT_TRUE(close("attention_bwd dv" + tag, down(dv), dv_ref, kAttention));
    if (c.P > 0) {
      EXPECT_TRUE(close("attention_bwd dpk (+=)" + tag, down(ddpk), dpk_ref, kAttention));
      EXPECT_TRUE(close("attention_bwd dpv (+=)" + tag, down(ddpv), dpv_ref, kAttention));
    }
  }
}

TEST_F(CudaOps, AttentionPropagatesNaN) {
  // NaN in q row 5 of head 1: exactly out row 5 of head 1 is NaN. NaN in k row
  // 9 of KV head 0: out rows ≥ 9 of heads 0 and 1 (which read KV head 0) are NaN,
  // rows < 9 are not (the masked scores are never read).
  const AttnCase c{24, 4, 2, 16, 0};
  Rng rng = fresh_rng();
  const int64_t qs = c.n_h * c.d, ks = c.n_kv * c.d;
  VecF q = randn(rng, c.T * qs), k = randn(rng, c.T * ks), v = randn(rng, c.T * ks);
  q[5 * qs + 1 * c.d + 3] = kNaN;
  k[9 * ks + 0 * c.d + 7] = kNaN;
  VecD out_ref(c.T * qs), probs_ref(c.n_h * c.T * c.T);
  qcal::attention_fwd<double>(out_ref.data(), to_d(q).data(), to_d(k).data(), to_d(v).data(), c.T,
                              c.n_h, c.n_kv, c.d, probs_ref.data());
  auto dq_in = up(q), dk_in = up(k), dv_in = up(v);
  auto out = must(DeviceArray<float>::zeros(c.T * qs)),
       probs = must(DeviceArray<float>::zeros(c.n_h * c.T * c.T));
  must(attention_fwd(ctx(), out.data(), dq_in.data(), nullptr, nullptr, 0, dk_in.data(),
                     dv_in.data(), c.T, c.n_h, c.n_kv, c.d, probs.data()));
  const VecF got = down(out);
  EXPECT_TRUE(close("attention_fwd with NaN", got, out_ref, kAttention));
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t h = 0; h < c.n_h; ++h) {
      const bool want_nan = (t == 5 && h == 1) || (t >= 9 && h < 2);
      EXPECT_EQ(std::isnan(got[t * qs + h * c.d]), want_nan) << "row " << t << " head " << h;
    }
}

// ---------------------------------------------------------------- Kronecker

TEST_F(CudaOps, KronMatchesReference) {
  struct Case {
    int64_t rows, n1, n2;
    bool L, R;
  };
  // 11008 = 86·128 and 28672 = 112·256 (the LLaMA intermediate widths' splits).
  for (Case c :
       {Case{5, 3, 5, true, true}, Case{9, 86, 128, true, true}, Case{4, 64, 128, true, false},
        Case{6, 12, 20, false, true}, Case{3, 112, 256, true, true}, Case{2, 7, 9, false, false}}) {
    Rng rng = fresh_rng();
    const int64_t N = c.rows * c.n1 * c.n2;
    const VecF x = randn(rng, N), dy = randn(rng, N), L = randn(rng, c.n1 * c.n1, 0.2),
               R = randn(rng, c.n2 * c.n2, 0.2), dL0 = randn(rng, c.n1 * c.n1),
               dR0 = randn(rng, c.n2 * c.n2);
    VecD y_ref(N), dx_ref(N), dL_ref = to_d(dL0), dR_ref = to_d(dR0), work(2 * N);
    const VecD Ld = to_d(L), Rd = to_d(R);
    const double* Lp = c.L ? Ld.data() : nullptr;
    const double* Rp = c.R ? Rd.data() : nullptr;
    qcal::kron_fwd<double>(y_ref.data(), to_d(x).data(), Lp, Rp, c.rows, c.n1, c.n2, work.data());
    qcal::kron_bwd<double>(dx_ref.data(), dL_ref.data(), dR_ref.data(), to_d(dy).data(),
                           to_d(x).data(), Lp, Rp, c.rows, c.n1, c.n2, work.data());
    auto dx_in = up(x), ddy = up(dy), dLm = up(L), dRm = up(R), ddL = up(dL0), ddR = up(dR0);
    auto y = must(DeviceArray<float>::zeros(N)), dx = must(DeviceArray<float>::zeros(N));
    const float* Lg = c.L ? dLm.data() : nullptr;
    const float* Rg = c.R ? dRm.data() : nullptr;
    must(kron_fwd(ctx(), y.data(), dx_in.data(), Lg, Rg, c.rows, c.n1, c.n2));
    must(kron_bwd(ctx(), dx.data(), ddL.data(), ddR.data(), ddy.data(), dx_in.data(), Lg, Rg,
                  c.rows, c.n1, c.n2));
    const std::string tag = " rows=" + std::to_string(c.rows) + " " + std::to_string(c.n1) + "x" +
                            std::to_string(c.n2) + (c.L ? " L" : "") + (c.R ? " R" : "");
    EXPECT_TRUE(close("kron_fwd y" + tag, down(y), y_ref, kGemm));
    EXPECT_TRUE(close("kron_bwd dx" + tag, down(dx), dx_ref, kGemm));
    EXPECT_TRUE(close("kron_bwd dL (+=)" + tag, down(ddL), dL_ref, kGemm));
    EXPECT_TRUE(close("kron_bwd dR (+=)" + tag, down(ddR), dR_ref, kGemm));
  }
}

TEST_F(CudaOps, KronPropagatesNaN) {
  Rng rng = fresh_rng();
  const int64_t rows = 4, n1 = 8, n2 = 16, N = rows * n1 * n2;
  VecF x = randn(rng, N);
  x[2 * n1 * n2 + 37] = kNaN;
  const VecF L = randn(rng, n1 * n1, 0.3), R = randn(rng, n2 * n2, 0.3);
  VecD y_ref(N), work(N);
  qcal::kron_fwd<double>(y_ref.data(), to_d(x).data(), to_d(L).data(), to_d(R).data(), rows, n1, n2,
                         work.data());
  auto dx_in = up(x), dL = up(L), dR = up(R);
  auto y = must(DeviceArray<float>::zeros(N));
  must(kron_fwd(ctx(), y.data(), dx_in.data(), dL.data(), dR.data(), rows, n1, n2));
  const VecF got = down(y);
  EXPECT_TRUE(close("kron_fwd with NaN", got, y_ref, kGemm));
  for (int64_t t = 0; t < rows; ++t) EXPECT_EQ(std::isnan(got[t * n1 * n2]), t == 2) << "row " << t;
}

// ---------------------------------------------------------------- fake quant

struct FqCase {
  std::string name;
  FakeQuantSpec spec;
  int64_t rows, cols;
  bool lwc;  // learned β per (row, group); else one shared β when kLearned
};

FakeQuantSpec make_spec(int bits, bool sym, int64_t group, Ste ste, ClipMode clip, double ratio,
                        bool lwc_range, double min_scale) {
  FakeQuantSpec s;
  s.bits = bits;
  s.sym = sym;
  s.group = group;
  s.ste = ste;
  s.clip = clip;
  s.clip_ratio = ratio;
  s.lwc_range = lwc_range;
  s.min_scale = min_scale;
  return s;
}

std::vector<FqCase> fq_cases() {
  std::vector<FqCase> cs;
  // FlatQuant activations: per token, sym, learned LAC (one β pair).
  for (int64_t C : {int64_t{172}, int64_t{11008}, int64_t{14336}, int64_t{28672}})
    cs.push_back({"per-token LAC C=" + std::to_string(C),
                  make_spec(4, true, -1, Ste::kLsq, ClipMode::kLearned, 1.0, false, 0.0), 5, C,
                  false});
  // FlatQuant weights: per output channel, asym, learned LWC, lwc_range, 1e-5 floor.
  cs.push_back({"per-channel LWC asym",
                make_spec(4, false, -1, Ste::kLsq, ClipMode::kLearned, 1.0, true, 1e-5), 12, 4096,
                true});
  cs.push_back({"per-group 128 LWC asym (partial last group)",
                make_spec(3, false, 128, Ste::kLsq, ClipMode::kLearned, 1.0, true, 1e-5), 6, 1000,
                true});
  // KV cache: per head (group = d), asym, fixed clip 0.95 (QuaRot kv_clip).
  cs.push_back({"per-head k/v asym clip 0.95",
                make_spec(4, false, 128, Ste::kLsq, ClipMode::kFixed, 0.95, false, 0.0), 9, 4 * 128,
                false});
  cs.push_back({"per-head sym 8-bit d=64",
                make_spec(8, true, 64, Ste::kLsq, ClipMode::kFixed, 1.0, false, 0.0), 17, 8 * 64,
                false});
  // SpinQuant activations: identity STE, clip 0.9.
  cs.push_back({"per-token identity STE clip 0.9",
                make_spec(8, true, -1, Ste::kIdentity, ClipMode::kFixed, 0.9, false, 0.0), 7, 14336,
                false});
  cs.push_back({"2-bit sym per-token",
                make_spec(2, true, -1, Ste::kLsq, ClipMode::kFixed, 1.0, false, 0.0), 4, 172,
                false});
  cs.push_back({"off (16 bits)",
                make_spec(16, true, -1, Ste::kLsq, ClipMode::kFixed, 1.0, false, 0.0), 3, 172,
                false});
  return cs;
}

// Forward outputs equal the CPU's float results, except "flips": an element
// whose x/s lies within rounding of a .5 boundary may land one step s away
// when the two scales differ in the last bit (sigmoid's exp). Flipped groups
// are reported and left out of the backward comparison.
struct FqForwardCheck {
  int64_t flips = 0;
  std::vector<char> group_flipped;
};

::testing::AssertionResult fq_forward_equal(const std::string& what, const VecF& got,
                                            const VecF& ref, const VecF& scale, int64_t rows,
                                            int64_t cols, int64_t gs, FqForwardCheck* out) {
  const int64_t G = (cols + gs - 1) / gs;
  out->group_flipped.assign(static_cast<size_t>(rows * G), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      const int64_t grp = r * G + c / gs;
      if (std::isnan(got[i]) != std::isnan(ref[i]))
        return ::testing::AssertionFailure() << what << ": element (" << r << ", " << c << ") is "
                                             << got[i] << ", CPU " << ref[i];
      if (std::isnan(got[i])) continue;
      const double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
      if (diff <= 1e-6 * std::fabs(ref[i])) continue;
      const double s = scale[grp];
      if (std::fabs(diff - s) <= 1e-5 * s) {
        ++out->flips;
        out->group_flipped[grp] = 1;
        continue;
      }
      return ::testing::AssertionFailure()
             << what << ": element (" << r << ", " << c << ") is " << got[i] << ", CPU " << ref[i]
             << " (scale " << s << ")";
    }
  std::printf("[cuda_ops] %-48s equal to the CPU's float results, %lld one-step flips\n",
              what.c_str(), static_cast<long long>(out->flips));
  if (out->flips * 1000 > rows * cols)
    return ::testing::AssertionFailure()
           << what << ": " << out->flips << " flips in " << rows * cols << " elements (over 0.1%)";
  return ::testing::AssertionSuccess();
}

TEST_F(CudaOps, FakeQuantMatchesCpu) {
  for (const FqCase& c : fq_cases()) {
    SCOPED_TRACE(c.name);
    Rng rng = fresh_rng();
    const FakeQuantSpec& s = c.spec;
    const int64_t gs = s.group > 0 ? s.group : c.cols, G = (c.cols + gs - 1) / gs;
    const int64_t n = c.rows * c.cols,
                  n_beta = s.clip == ClipMode::kLearned ? (c.lwc ? c.rows * G : 1) : 0;
    // Rows of very different magnitudes, some one-signed; a few outliers.
    VecF x(static_cast<size_t>(n));
    for (int64_t r = 0; r < c.rows; ++r) {
      const double mag = std::pow(10.0, -3.0 + 4.0 * rng.uniform());
      const double shift = (r % 3 == 1) ? 2.5 * mag : 0.0;
      for (int64_t j = 0; j < c.cols; ++j)
        x[r * c.cols + j] =
            static_cast<float>(shift + mag * rng.normal() * (rng.uniform() < 0.01 ? 8.0 : 1.0));
    }
    const VecF dy = randn(rng, n);
    VecF bmax(std::max<int64_t>(n_beta, 1)), bmin(bmax.size());
    for (size_t i = 0; i < bmax.size(); ++i) {
      bmax[i] = static_cast<float>(2.0 + 2.0 * rng.normal());
      bmin[i] = static_cast<float>(2.0 + 2.0 * rng.normal());
    }
    const VecF dbmax0 = randn(rng, bmax.size()), dbmin0 = randn(rng, bmax.size());
    const float* bmax_h = n_beta ? bmax.data() : nullptr;
    const float* bmin_h = n_beta ? bmin.data() : nullptr;

    // CPU (the engine's float path).
    VecF y_ref(n), dx_ref(n), dbmax_ref = dbmax0, dbmin_ref = dbmin0;
    FakeQuantSaved<float> sv;
    qcal::fake_quant_fwd<float>(s, y_ref.data(), x.data(), c.rows, c.cols, bmax_h, bmin_h, n_beta,
                                &sv);
    qcal::fake_quant_bwd<float>(s, dx_ref.data(), dbmax_ref.data(), dbmin_ref.data(), dy.data(),
                                x.data(), c.rows, c.cols, bmax_h, bmin_h, n_beta, sv);

    // Device.
    auto dxin = up(x), ddy = up(dy), dbmax = up(bmax), dbmin = up(bmin), ddbmax = up(dbmax0),
         ddbmin = up(dbmin0);
    auto y = up(VecF(n, kNaN)), dx = up(VecF(n, kNaN));
    DeviceFakeQuantSaved dsv;
    const float* bmax_d = n_beta ? dbmax.data() : nullptr;
    const float* bmin_d = n_beta ? dbmin.data() : nullptr;
    must(fake_quant_fwd(ctx(), s, y.data(), dxin.data(), c.rows, c.cols, bmax_d, bmin_d, n_beta,
                        &dsv));
    must(fake_quant_bwd(ctx(), s, dx.data(), ddbmax.data(), ddbmin.data(), ddy.data(), dxin.data(),
                        c.rows, c.cols, bmax_d, bmin_d, n_beta, dsv));
    const VecF got_y = down(y), got_dx = down(dx);
    if (!s.on()) {
      EXPECT_EQ(0, std::memcmp(got_y.data(), x.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(got_dx.data(), dy.data(), n * sizeof(float)));
      continue;
    }
    const VecF scale = down(dsv.scale);
    FqForwardCheck fc;
    EXPECT_TRUE(
        fq_forward_equal("fake_quant_fwd " + c.name, got_y, y_ref, scale, c.rows, c.cols, gs, &fc));
    EXPECT_TRUE(close("fake_quant_fwd scale " + c.name, scale, sv.scale, Tol{0.0, 1e-6}));
    EXPECT_TRUE(
        close("fake_quant_fwd raw_max " + c.name, down(dsv.raw_max), sv.raw_max, Tol{0.0, 0.0}));
    EXPECT_TRUE(
        close("fake_quant_fwd raw_min " + c.name, down(dsv.raw_min), sv.raw_min, Tol{0.0, 0.0}));
    EXPECT_EQ(down(dsv.amax_at), sv.amax_at);
    EXPECT_EQ(down(dsv.amin_at), sv.amin_at);
    if (!s.sym) {
      EXPECT_TRUE(close("fake_quant_fwd zero " + c.name, down(dsv.zero), sv.zero, Tol{0.0, 0.0}));
    }

    // Backward, on the groups whose forward agreed.
    VecF gdx, rdx;
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t j = 0; j < c.cols; ++j)
        if (!fc.group_flipped[r * G + j / gs]) {
          gdx.push_back(got_dx[r * c.cols + j]);
          rdx.push_back(dx_ref[r * c.cols + j]);
        }
    EXPECT_TRUE(close("fake_quant_bwd dx " + c.name, gdx, rdx, kRowReduce));
    if (n_beta > 0) {
      VecF gmax = down(ddbmax), gmin = down(ddbmin), rmax = dbmax_ref, rmin = dbmin_ref;
      if (fc.flips > 0 && n_beta == 1) {
        std::printf("[cuda_ops] %s: LAC dbeta not compared (forward flips)\n", c.name.c_str());
      } else {
        if (n_beta > 1) {  // drop flipped groups
          VecF a, b, e, f;
          for (int64_t i = 0; i < n_beta; ++i)
            if (!fc.group_flipped[i]) {
              a.push_back(gmax[i]);
              b.push_back(rmax[i]);
              e.push_back(gmin[i]);
              f.push_back(rmin[i]);
            }
          gmax = a;
          rmax = b;
          gmin = e;
          rmin = f;
        }
        EXPECT_TRUE(close("fake_quant_bwd dbeta_max (+=) " + c.name, gmax, rmax, kRowReduce));
        EXPECT_TRUE(close("fake_quant_bwd dbeta_min (+=) " + c.name, gmin, rmin, kRowReduce));
      }
    }
  }
}

TEST_F(CudaOps, FakeQuantInPlaceEqualsOutOfPlace) {
  Rng rng = fresh_rng();
  const FakeQuantSpec s = make_spec(4, true, 128, Ste::kLsq, ClipMode::kFixed, 1.0, false, 0.0);
  const int64_t rows = 6, cols = 1000;
  const VecF x = randn(rng, rows * cols);
  auto a = up(x), b = up(x);
  auto y = must(DeviceArray<float>::zeros(rows * cols));
  must(fake_quant_fwd(ctx(), s, y.data(), a.data(), rows, cols, nullptr, nullptr, 0, nullptr));
  must(fake_quant_fwd(ctx(), s, b.data(), b.data(), rows, cols, nullptr, nullptr, 0, nullptr));
  const VecF p = down(y), q = down(b);
  EXPECT_EQ(0, std::memcmp(p.data(), q.data(), p.size() * sizeof(float)));
}

TEST_F(CudaOps, FakeQuantPropagatesNaN) {
  // A NaN in row 1 makes row 1's whole group NaN on the device (the CPU makes
  // at least that element NaN); the other rows equal the CPU; the LAC β
  // gradient, a sum over all groups, is NaN.
  Rng rng = fresh_rng();
  const FakeQuantSpec s = make_spec(4, true, -1, Ste::kLsq, ClipMode::kLearned, 1.0, false, 0.0);
  const int64_t rows = 4, cols = 11008;
  VecF x = randn(rng, rows * cols);
  x[1 * cols + 4321] = kNaN;
  const VecF dy = randn(rng, rows * cols);
  const VecF bmax{1.5f}, bmin{2.0f};
  VecF y_ref(rows * cols);
  FakeQuantSaved<float> sv;
  qcal::fake_quant_fwd<float>(s, y_ref.data(), x.data(), rows, cols, bmax.data(), bmin.data(), 1,
                              &sv);
  auto dxin = up(x), ddy = up(dy), dbmax = up(bmax), dbmin = up(bmin);
  auto y = must(DeviceArray<float>::zeros(rows * cols)),
       dx = must(DeviceArray<float>::zeros(rows * cols));
  auto g1 = up(VecF{0.f}), g2 = up(VecF{0.f});
  DeviceFakeQuantSaved dsv;
  must(fake_quant_fwd(ctx(), s, y.data(), dxin.data(), rows, cols, dbmax.data(), dbmin.data(), 1,
                      &dsv));
  must(fake_quant_bwd(ctx(), s, dx.data(), g1.data(), g2.data(), ddy.data(), dxin.data(), rows,
                      cols, dbmax.data(), dbmin.data(), 1, dsv));
  const VecF got = down(y);
  EXPECT_TRUE(std::isnan(y_ref[1 * cols + 4321]));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float g = got[r * cols + c], w = y_ref[r * cols + c];
      if (r == 1) {
        ASSERT_TRUE(std::isnan(g)) << "(1, " << c << ") = " << g;
      } else {
        ASSERT_EQ(g, w) << "(" << r << ", " << c << ")";
      }
    }
  EXPECT_TRUE(std::isnan(down(g1)[0]));
  EXPECT_TRUE(std::isnan(down(g2)[0]));
}

// ---------------------------------------------------------------- AdamW

TEST_F(CudaOps, AdamWEqualsReferenceBitForBit) {
  Rng rng = fresh_rng();
  const int64_t n = 100003;
  VecD p(n), m(n, 0.0), v(n, 0.0), g(n);
  for (auto& x : p) x = rng.normal();
  auto dp = up(p), dm = up(m), dv = up(v);
  AdamWStep s;
  s.weight_decay = 0.01;
  for (int64_t t = 1; t <= 3; ++t) {
    for (auto& x : g) x = 1e-3 * rng.normal();
    if (t == 3) g[777] = std::numeric_limits<double>::quiet_NaN();
    s.t = t;
    s.lr = 5e-3 * t;
    adamw_step_ref(p.data(), m.data(), v.data(), g.data(), n, s);
    auto dg = up(g);
    must(adamw_step(ctx(), dp.data(), dm.data(), dv.data(), dg.data(), n, s));
    const VecD gp = down(dp), gm = down(dm), gv = down(dv);
    int64_t differ = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool same = (std::isnan(gp[i]) && std::isnan(p[i])) ||
                        (std::memcmp(&gp[i], &p[i], sizeof(double)) == 0 &&
                         std::memcmp(&gm[i], &m[i], sizeof(double)) == 0 &&
                         std::memcmp(&gv[i], &v[i], sizeof(double)) == 0);
      differ += !same;
    }
    EXPECT_EQ(differ, 0) << "step " << t;
    if (t == 3) {
      EXPECT_TRUE(std::isnan(gp[777]));
      EXPECT_FALSE(std::isnan(gp[776]));
    }
  }
}

}  // namespace
}  // namespace qcal::cuda

// labels: gpu
// The CUDA RTN fake-quant kernel (kernels/quant_cuda.h) against the CPU
// reference `fake_quantize` (worker/engine/quantizer.h): bit-exact.
// Letters: R rows, C columns.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/device.h"
#include "kernels/quant_cuda.h"
#include "worker/engine/quantizer.h"

namespace qcal {
namespace {

TEST(QuantCuda, RejectsBadArgumentsEverywhere) {
  std::vector<float> x(8, 1.0f);
  EXPECT_EQ(fake_quantize_rows_cuda(x.data(), x.data(), 2, 4, 5, 4, true, false).code(),
            Code::kInvalidInput);
  EXPECT_EQ(fake_quantize_rows_cuda(x.data(), x.data(), 2, 4, 4, 0, true, false).code(),
            Code::kInvalidInput);
  EXPECT_EQ(fake_quantize_rows_cuda(x.data(), x.data(), -1, 4, 4, 4, true, false).code(),
            Code::kInvalidInput);
}

TEST(QuantCuda, UnavailableWithoutGpu) {
  std::string why;
  if (cuda_available(&why)) GTEST_SKIP() << "a GPU is present";
  std::vector<float> x(8, 1.0f);
  const Status s = fake_quantize_rows_cuda(x.data(), x.data(), 2, 4, 4, 4, true, false);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();
}

TEST(QuantCuda, MatchesCpuFakeQuantizeExactly) {
  std::string why;
  if (!cuda_available(&why)) GTEST_SKIP() << why;
  Rng rng(42);
  const int64_t R = 96, C = 1000;  // C not a multiple of the group sizes below
  Tensor W({R, C});
  for (int64_t r = 0; r < R; ++r) {
    const double sigma = std::pow(10.0, -6.0 + 7.0 * rng.uniform());
    for (int64_t c = 0; c < C; ++c) W.at(r, c) = static_cast<float>(sigma * rng.normal());
  }
  for (int64_t c = 0; c < C; ++c) W.at(5, c) = 0.0f;                   // all-zero row
  for (int64_t c = 0; c < C; ++c) W.at(6, c) = std::fabs(W.at(6, c));  // one-signed
  for (int64_t c = 0; c < C; ++c) W.at(7, c) = 0.25f * static_cast<float>(c % 17 - 8);  // .5 ties
  for (int bits : {2, 3, 4, 8}) {
    for (int grid = 0; grid < 3; ++grid) {  // symmetric full, symmetric narrow, asymmetric
      const bool sym = grid < 2, narrow = grid == 1;
      for (int64_t gs : {int64_t{-1}, int64_t{128}, int64_t{100}, int64_t{32}, int64_t{4096}}) {
        QuantSpec spec;
        spec.bits = bits;
        spec.sym = sym;
        spec.narrow = narrow;
        spec.group_size = gs;
        const Tensor want = fake_quantize(W, spec);
        std::vector<float> got(W.data.size());
        const Status s = fake_quantize_rows_cuda(W.ptr(), got.data(), R, C, bits, gs, sym, narrow);
        ASSERT_TRUE(s.is_ok()) << s.to_string();
        int64_t differ = 0;
        for (size_t k = 0; k < got.size(); ++k) {
          differ += std::memcmp(&got[k], &want.data[k], sizeof(float)) != 0;
        }
        EXPECT_EQ(differ, 0) << "bits " << bits << " sym " << sym << " narrow " << narrow << " gs "
                             << gs;
      }
    }
  }
}

}  // namespace
}  // namespace qcal

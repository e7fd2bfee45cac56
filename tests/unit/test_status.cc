#include <gtest/gtest.h>

#include <cmath>

#include "common/dtype.h"
#include "common/status.h"

namespace qcal {

Result<int> half(int x) {
  if (x % 2) return invalid_input("odd: " + std::to_string(x));
  return x / 2;
}

Status use_half(int x, int* out) {
  QCAL_ASSIGN_OR_RETURN(*out, half(x));
  return Status::ok();
}

TEST(Status, ResultCarriesValueOrError) {
  int v = 0;
  EXPECT_TRUE(use_half(8, &v).is_ok());
  EXPECT_EQ(v, 4);
  Status s = use_half(3, &v);
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_EQ(s.to_string(), "INVALID_INPUT: odd: 3");
  EXPECT_EQ(s.with_context("f").message(), "f: odd: 3");
}

TEST(DType, HalfRoundTripAndRounding) {
  // Every finite half value survives f16 -> f32 -> f16.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;  // NaN payloads
    float f = f16_to_f32(static_cast<uint16_t>(h));
    ASSERT_EQ(f32_to_f16(f), h) << std::hex << h;
  }
  // Ties go to even: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
  EXPECT_EQ(f32_to_f16(1.0f + 0x1.0p-11f), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.0f + 3 * 0x1.0p-11f), 0x3c02);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_FLOAT_EQ(f16_to_f32(0x0001), 0x1.0p-24f);
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1.0p-8f), 0x3f80);  // tie to even
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * 0x1.0p-8f), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

}  // namespace qcal

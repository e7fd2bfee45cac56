// labels: gpu
// The NCCL all-reduce used by GPU rank groups. Without a GPU (or without
// CUDA) it must refuse cleanly so the rank group keeps its MPI path; with one,
// a single-rank communicator's sum is the identity.
#include <gtest/gtest.h>

#include <vector>

#include "kernels/device.h"
#include "kernels/nccl_reduce.h"

namespace qcal {

TEST(Nccl, UnavailableWithoutGpu) {
  std::string why;
  if (cuda_available(&why)) GTEST_SKIP() << "a GPU is present";
  auto id = nccl_unique_id();
  ASSERT_FALSE(id.is_ok());
  EXPECT_EQ(id.status().code(), Code::kUnavailable);
  auto c = NcclAllReduce::create(std::string(128, '\0'), 0, 1);
  ASSERT_FALSE(c.is_ok());
  EXPECT_EQ(c.status().code(), Code::kUnavailable);
}

TEST(Nccl, SingleRankSumIsIdentity) {
  std::string why;
  if (!cuda_available(&why)) GTEST_SKIP() << why;
  auto id = nccl_unique_id();
  ASSERT_TRUE(id.is_ok()) << id.status().to_string();
  auto c = NcclAllReduce::create(*id, 0, 1);
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  std::vector<float> v(100003);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.5f * static_cast<float>(i) - 7.0f;
  std::vector<float> want = v;
  ASSERT_TRUE((*c)->sum(v.data(), static_cast<int64_t>(v.size())).is_ok());
  EXPECT_EQ(v, want);
}

}  // namespace qcal

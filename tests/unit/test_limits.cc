// Bounded work (issue #11): every numeric field of a job spec has a cap
// (common/limits.h) enforced by the parser, the calibration recipe's options
// have theirs (their method registry rows), and the planner's estimates cannot
// wrap around (common/checked_math.h, common/memory_guard.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>

#include "common/checked_math.h"
#include "common/job_spec.h"
#include "common/limits.h"
#include "common/method_registry.h"
#include "common/memory_guard.h"
#include "common/recipe.h"

namespace qcal {
namespace {

using nlohmann::json;

json base() {
  return {{"model", "/m"}, {"calib", {{"path", "/c.jsonl"}}}, {"output", {{"path", "/o"}}}};
}

void expect_refused(const json& j, const std::string& field, const std::string& needle) {
  auto s = parse_job_spec(j);
  ASSERT_FALSE(s.is_ok()) << j.dump();
  EXPECT_EQ(s.status().code(), Code::kInvalidInput);
  EXPECT_EQ(s.status().message().rfind(field, 0), 0u) << s.status().message();
  EXPECT_NE(s.status().message().find(needle), std::string::npos) << s.status().message();
}

TEST(Limits, EveryCapIsEnforcedAtTheEdgeAndOneBeyond) {
  struct Case {
    const char* field;
    std::function<void(json&, double)> set;
    double max;
  } cases[] = {
      {"calib.nsamples", [](json& j, double v) { j["calib"]["nsamples"] = int64_t(v); },
       double(limits::kMaxSequences)},
      {"calib.seqlen", [](json& j, double v) { j["calib"]["seqlen"] = int64_t(v); },
       double(limits::kMaxSeqlen)},
      {"eval.nsamples",
       [](json& j, double v) {
         j["eval"] = {{"path", "/e.jsonl"}, {"nsamples", int64_t(v)}};
       },
       double(limits::kMaxSequences)},
      {"eval.seqlen",
       [](json& j, double v) {
         j["eval"] = {{"path", "/e.jsonl"}, {"seqlen", int64_t(v)}};
       },
       double(limits::kMaxSeqlen)},
      {"recipe.group_size",
       [](json& j, double v) {
         j["recipe"] = {{"group_size", int64_t(v)}};
       },
       find_option("w_group")->max},
      {"recipe.window",
       [](json& j, double v) {
         j["recipe"] = {{"window", int64_t(v)}};
       },
       find_option("blocks_per_task")->max},
      {"recipe.damp",
       [](json& j, double v) {
         j["recipe"] = {{"damp", v}};
       },
       find_option("gptq.percdamp")->max},
      {"gate.max_kl",
       [](json& j, double v) {
         j["gate"] = {{"max_kl", v}};
       },
       limits::kMaxGateValue},
      {"gate.max_ppl_increase",
       [](json& j, double v) {
         j["gate"] = {{"max_ppl_increase", v}};
       },
       limits::kMaxGateValue},
  };
  for (const auto& c : cases) {
    json ok = base();
    c.set(ok, c.max);
    EXPECT_TRUE(parse_job_spec(ok).is_ok()) << c.field << " at its cap";
    json over = base();
    c.set(over, c.max == std::floor(c.max) && c.max > 1 ? c.max + 1 : c.max * 1.5);
    expect_refused(over, c.field, "must be");
  }
  // The value: nsamples near 2^62.
  json j = base();
  j["eval"] = {{"path", "/e.jsonl"}, {"nsamples", int64_t{1} << 62}};
  expect_refused(j, "eval.nsamples", "must be at most 1048576");
  // Infinity and NaN are refused, not capped.
  j = base();
  j["gate"] = {{"max_kl", std::numeric_limits<double>::infinity()}};
  expect_refused(j, "gate.max_kl", "must be at most");
}

TEST(Limits, LabelsAndPaths) {
  json j = base();
  for (size_t i = 0; i <= limits::kMaxLabels; ++i) j["labels"]["k" + std::to_string(i)] = "v";
  expect_refused(j, "labels", "at most 32");
  j = base();
  j["labels"] = {{std::string(limits::kMaxLabelKeyBytes + 1, 'k'), "v"}};
  expect_refused(j, "labels", "1 to 63 characters");
  j = base();
  j["labels"] = {{"bad key", "v"}};
  expect_refused(j, "labels", "characters of");
  j = base();
  j["labels"] = {{"team", std::string(limits::kMaxLabelValueBytes + 1, 'v')}};
  expect_refused(j, "labels.team", "longer than 256 bytes");
  j = base();
  j["labels"] = {{"team", "a\x1b[2Jb"}};
  expect_refused(j, "labels.team", "control characters");
  j = base();
  j["labels"] = {{"team.name/x-y_z", std::string(limits::kMaxLabelValueBytes, 'v')}};
  EXPECT_TRUE(parse_job_spec(j).is_ok());
  j = base();
  j["model"] = "/" + std::string(limits::kMaxPathBytes, 'm');
  expect_refused(j, "model", "longer than 4096 bytes");
}

TEST(Limits, RecipeOptionsHaveCaps) {
  // The FlatQuant epochs 1e9: refused as the value is read (the registry's range).
  auto r = recipe_from_json({{"transform", "flatquant"}, {"a_bits", 4}, {"epochs", 1000000000}});
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_NE(r.status().message().find("recipe.epochs: must be in [0, 1000]"), std::string::npos)
      << r.status().message();
  struct Case {
    json recipe;
    const char* needle;
  } cases[] = {
      {{{"a_bits", 4}, {"cali_bsz", 100000}}, "cali_bsz: must be in [1, 4096]"},
      {{{"a_bits", 4}, {"batch", 100000}}, "batch: must be in [1, 4096]"},
      {{{"transform", "spinquant"}, {"a_bits", 4}, {"spin_steps", 100000000}}, "spin_steps"},
      {{{"a_bits", 4}, {"flat_lr", 1e9}}, "flat_lr: must be in ["},
      {{{"a_bits", 4}, {"w_group", 1 << 20}}, "w_group"},
      {{{"weight_solver", "gptq"}, {"gptq", {{"blocksize", 1 << 20}}}}, "gptq.blocksize"},
  };
  for (const auto& c : cases) {
    auto rr = recipe_from_json(c.recipe);
    ASSERT_FALSE(rr.is_ok()) << c.recipe.dump();
    EXPECT_EQ(rr.status().code(), Code::kInvalidInput) << c.recipe.dump();
    EXPECT_NE(rr.status().message().find(c.needle), std::string::npos) << rr.status().message();
  }
  // The defaults are inside every cap.
  EXPECT_TRUE(recipe_from_json({{"a_bits", 4}})->validate().is_ok());
}

TEST(Limits, CheckedArithmeticNamesTheOverflow) {
  CheckedU64 x = CheckedU64(uint64_t{1} << 62) * 2048 * 4;
  EXPECT_TRUE(x.overflowed());
  EXPECT_EQ(x.error(), "4611686018427387904 x 2048 overflows 64 bits");
  EXPECT_EQ(x.value(), UINT64_MAX);
  CheckedU64 y = CheckedU64(1000) * 1000 + 5;
  EXPECT_FALSE(y.overflowed());
  EXPECT_EQ(y.value(), 1000005u);
  EXPECT_TRUE((CheckedU64(UINT64_MAX) + 1).overflowed());
}

TEST(Limits, MemoryGuardRefusesEstimatesThatWouldWrap) {
  ModelConfig c;
  c.hidden_size = 4 << 20;  // the largest widths model_config.cc accepts
  c.intermediate_size = 4 << 20;
  c.num_hidden_layers = 1024;
  c.num_attention_heads = 64;
  c.num_key_value_heads = 8;
  c.head_dim = 64;
  c.vocab_size = 4 << 20;
  JobSpec s;
  s.calib.seqlen = limits::kMaxSeqlen;
  Status st = check_estimate_range(s, c, limits::kMaxSequences, 0, 8);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_NE(st.message().find("overflows 64 bits"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("calib.nsamples 1048576"), std::string::npos) << st.message();
  // A 70B-sized job is nowhere near.
  ModelConfig l70;
  l70.hidden_size = 8192;
  l70.intermediate_size = 28672;
  l70.num_hidden_layers = 80;
  l70.num_attention_heads = 64;
  l70.num_key_value_heads = 8;
  l70.head_dim = 128;
  l70.vocab_size = 128256;
  s.calib.seqlen = 2048;
  EXPECT_TRUE(check_estimate_range(s, l70, 128, 0, 8).is_ok());
}

}  // namespace
}  // namespace qcal

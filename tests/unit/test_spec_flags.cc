// labels: unit
// `qcal submit` / `qcal quantize` flags → JobSpec JSON (api/spec_flags.h): every
// recipe flag comes from the method registry and sets its key, the aliases and
// earlier spellings map onto the one recipe, the coordinator's parser accepts the
// result, and bad combinations are refused naming the flag.
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "api/spec_flags.h"
#include "common/job_spec.h"
#include "common/method_registry.h"

namespace qcal {
namespace {

using nlohmann::json;

// The flags `qcal submit` declares for the spec (cmd_service.cc).
Flags submit_flags(const std::vector<std::string>& extra) {
  Flags f(spec_valued_flags(), spec_boolean_flags());
  std::vector<std::string> args = {"--model", "/m", "--calib", "/c", "--out", "/o"};
  args.insert(args.end(), extra.begin(), extra.end());
  Status s = f.parse(args);
  EXPECT_TRUE(s.is_ok()) << s.message();
  return f;
}

Result<json> spec_of(const std::vector<std::string>& extra) {
  return job_spec_json_from_flags(submit_flags(extra));
}

// The parsed spec (the coordinator's view) of flags that must be accepted.
JobSpec accepted(const std::vector<std::string>& extra) {
  auto r = spec_of(extra);
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  if (!r.is_ok()) return {};
  auto js = parse_job_spec(*r);
  EXPECT_TRUE(js.is_ok()) << js.status().message();
  return js.is_ok() ? *js : JobSpec{};
}

// Expects job_spec_json_from_flags to fail with kInvalidInput containing `words`.
void expect_error(const std::vector<std::string>& extra, const std::string& words) {
  auto r = spec_of(extra);
  ASSERT_FALSE(r.is_ok()) << "accepted: " << r.value().dump();
  EXPECT_EQ(r.status().code(), Code::kInvalidInput) << r.status().message();
  EXPECT_NE(r.status().message().find(words), std::string::npos)
      << "'" << r.status().message() << "' lacks '" << words << "'";
}

TEST(SpecFlags, EveryRegistryOptionHasItsFlag) {
  size_t with_flag = 0;
  for (const MethodRow& row : method_registry())
    for (const OptionSpec& o : row.options) {
      if (!o.flag.empty()) {
        ++with_flag;
        const auto& set = o.type == OptType::kBool ? spec_boolean_flags() : spec_valued_flags();
        EXPECT_EQ(set.count(o.flag), 1u) << o.flag;
      }
      if (!o.neg_flag.empty()) {
        EXPECT_EQ(spec_boolean_flags().count(o.neg_flag), 1u) << o.neg_flag;
      }
      EXPECT_TRUE(!o.flag.empty() || !o.neg_flag.empty() || o.key == "add_diag") << o.key;
    }
  EXPECT_GT(with_flag, 30u);
  for (const char* k : {"method", "window", "overlap", "format", "max-shard-mb", "labels"})
    EXPECT_EQ(spec_valued_flags().count(k), 1u) << k;
  for (const auto& k : spec_valued_flags()) EXPECT_EQ(spec_boolean_flags().count(k), 0u) << k;
}

// The brief's example: FlatQuant W4A4KV4 + CBQ windows of 2 + IntactKV.
TEST(SpecFlags, FlatQuantCbqIntactKv) {
  // clang-format off
  const std::vector<std::string> args = {
      "--method", "flatquant", "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4",
      "--reconstruction", "cbq", "--cbq-window", "2", "--intactkv"};
  // clang-format on
  auto r = spec_of(args);
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const json& rec = (*r)["recipe"];
  EXPECT_FALSE(rec.contains("method"));
  EXPECT_EQ(rec["transform"], "flatquant");
  EXPECT_EQ(rec["weight_solver"], "rtn");  // a transform's default
  EXPECT_FALSE(rec.contains("w_group"));             // per channel
  const JobSpec s = accepted(args);
  EXPECT_EQ(s.recipe.transform(), "flatquant");
  EXPECT_EQ(s.recipe.reconstruction(), "cbq");
  EXPECT_EQ(s.recipe.i("cbq_window"), 2);
  EXPECT_EQ(s.recipe.i("cbq_overlap"), 1);
  EXPECT_TRUE(s.recipe.intactkv());
  EXPECT_EQ(s.recipe.w_group(), -1);
  EXPECT_EQ(s.output.format, "auto");
  EXPECT_EQ(*output_format(s), "native");
}

TEST(SpecFlags, MethodAliasesAndDefaultSolvers) {
  struct Case {
    std::vector<std::string> args;
    const char* transform;
    const char* solver;
    int64_t group;
  };
  // clang-format off
  const std::vector<Case> cases = {
      {{}, "none", "gptq", 128},                                    // the weight-only default
      {{"--method", "rtn"}, "none", "rtn", 128},
      {{"--method", "rtn", "--a-bits", "8"}, "none", "rtn", -1},
      {{"--method", "gptq", "--kv-bits", "4"}, "none", "gptq", -1},
      {{"--weight-solver", "gptq", "--group-size", "64"}, "none", "gptq", 64},
      {{"--method", "lora-rounding", "--reconstruction", "block"}, "none", "lora-rounding", -1},
      {{"--reconstruction", "cbq"}, "none", "lora-rounding", -1},
      {{"--method", "smoothquant", "--a-bits", "8"}, "smoothquant", "rtn", -1},
      {{"--method", "quarot", "--a-bits", "4", "--weight-solver", "gptq"}, "quarot", "gptq", -1},
      {{"--method", "quarot", "--weight-solver", "gptq"}, "quarot", "gptq", -1},
      {{"--method", "flatquant", "--a-bits", "4"}, "flatquant", "rtn", -1},
      {{"--intactkv"}, "none", "gptq", -1},
  };
  // clang-format on
  for (const auto& c : cases) {
    SCOPED_TRACE(c.args.empty() ? "(none)" : c.args[0] + " " + c.args[1]);
    const JobSpec s = accepted(c.args);
    EXPECT_EQ(s.recipe.transform(), c.transform);
    EXPECT_EQ(s.recipe.weight_solver(), c.solver);
    EXPECT_EQ(s.recipe.w_group(), c.group);
  }
}

// Every recipe flag reaches its key with its value.
TEST(SpecFlags, EveryRecipeFlag) {
  // clang-format off
  const std::vector<std::string> args = {
      "--method", "flatquant", "--w-bits", "3", "--a-bits", "8", "--kv-bits", "6",
      "--a-clip", "0.9", "--kv-clip", "0.95", "--alpha", "0.7", "--epochs", "3",
      "--flat-lr", "0.01", "--cali-bsz", "2", "--diag-alpha", "0.5", "--spin-steps", "7",
      "--spin-lr", "0.5", "--spin-bsz", "2", "--seed", "5", "--intactkv",
      "--intactkv-prefix", "1,5,9", "--reconstruction", "block", "--cbq-window", "3",
      "--cbq-overlap", "0", "--cbq-epochs", "3", "--lora-rank", "4", "--no-lwc", "--no-lac",
      "--no-diag", "--cbq-parallel", "--no-cfp", "--group-size", "32",
      "--damp", "0.05", "--blocksize", "64", "--act-order", "--static-groups", "--batch", "4",
      "--format", "native", "--sym", "--nsamples", "16", "--seqlen", "64", "--overwrite",
      "--priority", "high", "--labels", "a=1", "--eval-data", "/e", "--max-kl", "0.5",
      "--max-shard-mb", "64"};
  // clang-format on
  // The mapping (recipe_json_from_flags does not validate; dotted keys nested).
  auto rj = recipe_json_from_flags(submit_flags(args));
  ASSERT_TRUE(rj.is_ok()) << rj.status().message();
  const json want = json::parse(R"({
    "transform": "flatquant", "weight_solver": "rtn", "w_bits": 3, "w_group": 32,
    "a_bits": 8, "a_clip": 0.9, "kv_bits": 6, "kv_clip": 0.95,
    "sq_alpha": 0.7, "epochs": 3, "cali_bsz": 2, "flat_lr": 0.01, "lwc": false, "lac": false,
    "add_diag": false, "diag_alpha": 0.5, "spin_steps": 7, "spin_lr": 0.5, "spin_bsz": 2,
    "intactkv": true, "intactkv_prefix": [1, 5, 9],
    "gptq": {"percdamp": 0.05, "blocksize": 64, "act_order": true, "static_groups": true},
    "seed": 5, "batch": 4, "reconstruction": "block",
    "cbq_window": 3, "cbq_overlap": 0, "mode": "parallel", "cbq_epochs": 3, "lora_rank": 4,
    "cfp": false, "w_sym": true})");
  EXPECT_EQ(*rj, want);
  // As a job, the options of methods the recipe does not run are refused, naming a flag.
  auto bad = spec_of(args);
  ASSERT_FALSE(bad.is_ok());
  EXPECT_NE(bad.status().message().find(
                "--blocksize: an option of weight_solver gptq, but the recipe's weight_solver is rtn"),
            std::string::npos)
      << bad.status().message();
  // Without them the job is accepted and the coordinator reads back the same recipe.
  std::vector<std::string> ok;
  const std::set<std::string> drop = {"--alpha",  "--spin-steps", "--spin-lr",    "--spin-bsz",
                                      "--damp",   "--blocksize",  "--lora-rank"};
  for (size_t k = 0; k < args.size(); ++k) {
    if (drop.count(args[k])) {
      ++k;
      continue;
    }
    if (args[k] == "--act-order" || args[k] == "--static-groups") continue;
    ok.push_back(args[k]);
  }
  auto r = spec_of(ok);
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ((*r)["calib"], json({{"path", "/c"}, {"nsamples", 16}, {"seqlen", 64}}));
  EXPECT_EQ((*r)["eval"], json({{"path", "/e"}, {"seqlen", 64}}));
  EXPECT_EQ((*r)["output"],
            json({{"path", "/o"}, {"format", "native"}, {"overwrite", true}, {"max_shard_mb", 64}}));
  EXPECT_EQ((*r)["priority"], "high");
  EXPECT_EQ((*r)["labels"], json({{"a", "1"}}));
  EXPECT_EQ((*r)["gate"], json({{"max_kl", 0.5}}));
  auto js = parse_job_spec(*r);
  ASSERT_TRUE(js.is_ok()) << js.status().message();
  EXPECT_EQ(js->recipe.ids("intactkv_prefix"), (std::vector<int32_t>{1, 5, 9}));
  EXPECT_EQ(js->recipe.i("cbq_epochs"), 3);
  EXPECT_EQ(js->recipe.batch(), 4);
  EXPECT_TRUE(js->recipe.parallel());
}

TEST(SpecFlags, EarlierWeightOnlySpellings) {
  const JobSpec s = accepted({"--method", "gptq", "--w-bits", "8", "--group-size", "-1", "--asym",
                              "--act-order", "--static-groups", "--damp", "0.05", "--mse-clip",
                              "--no-true-sequential", "--mode", "parallel", "--window", "2",
                              "--overlap", "0", "--seed", "9", "--format", "compressed-tensors"});
  EXPECT_EQ(s.recipe.weight_solver(), "gptq");
  EXPECT_EQ(s.recipe.w_bits(), 8);
  EXPECT_EQ(s.recipe.w_group(), -1);
  EXPECT_FALSE(s.recipe.w_sym());
  EXPECT_TRUE(s.recipe.b("gptq.act_order"));
  EXPECT_TRUE(s.recipe.b("w_mse_clip"));
  EXPECT_FALSE(s.recipe.b("gptq.true_sequential"));
  EXPECT_TRUE(s.recipe.parallel());
  EXPECT_EQ(s.recipe.i("blocks_per_task"), 2);
  EXPECT_EQ(s.recipe.seed(), 9u);
  EXPECT_EQ(*output_format(s), "compressed-tensors");
}

TEST(SpecFlags, Errors) {
  // gptq with a reconstruction: LoRA-Rounding started from GPTQ's solution (issue #12).
  for (const JobSpec& s : {accepted({"--reconstruction", "cbq", "--weight-solver", "gptq"}),
                           accepted({"--method", "gptq", "--reconstruction", "cbq"})}) {
    EXPECT_EQ(s.recipe.weight_solver(), "gptq");
    EXPECT_EQ(s.recipe.reconstruction(), "cbq");
  }
  expect_error({"--method", "quarot", "--a-bits", "5"}, "--a-bits");
  expect_error({"--method", "lora-rounding"}, "reconstruction");
  expect_error({"--method", "smoothquant", "--weight-solver", "lora-rounding"}, "reconstruction");
  expect_error({"--method", "gptq", "--weight-solver", "rtn", "--a-bits", "4"},
               "--weight-solver rtn contradicts --method gptq");
  expect_error({"--method", "frob", "--a-bits", "4"}, "frob");
  expect_error({"--intactkv-prefix", "1,2", "--a-bits", "4"}, "without intactkv");
  expect_error({"--intactkv", "--intactkv-prefix", "1,x"}, "comma-separated");
  expect_error({"--method", "quarot", "--a-bits", "4", "--asym"}, "asymmetric");
  expect_error({"--method", "quarot", "--a-bits", "4", "--sym", "--asym"}, "exclusive");
  expect_error({"--seed", "-3"}, "--seed");
  expect_error({"--method", "flatquant", "--epochs", "1000000000"}, "--epochs: must be in");
  expect_error({"--reconstruction", "cbq", "--cbq-window", "two"}, "--cbq-window");
  expect_error({"--reconstruction", "cbq", "--window", "2"}, "--cbq-window");
  expect_error({"--method", "gptq", "--overlap", "1"}, "--cbq-overlap");
  expect_error({"--mode", "sequential", "--cbq-parallel"}, "contradicts");
  // The output format, checked as the planner will (output_format).
  expect_error({"--method", "flatquant", "--a-bits", "4", "--format", "compressed-tensors"},
               "--format: compressed-tensors");
  expect_error({"--method", "quarot", "--intactkv", "--format", "gptq"}, "IntactKV");
  expect_error({"--method", "quarot", "--a-bits", "4", "--format", "exl2"}, "--format");
  // The rest of the spec, as the coordinator parses it.
  expect_error({"--method", "quarot", "--a-bits", "4", "--seqlen", "1"}, "calib.seqlen");
  expect_error({"--eval-seqlen", "64"}, "--eval-seqlen needs --eval-data");
}

}  // namespace
}  // namespace qcal

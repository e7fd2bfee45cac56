// labels: unit
// `qcal submit`'s flags → JobSpec JSON (api/spec_flags.h): the calibration
// recipe flags of `qcal quantize` (same code path: recipe_from_flags), the
// coordinator's parser accepting the result as a calibration recipe, the errors
// for bad combinations, and weight-only specs byte-identical to before.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "api/calib_cli.h"
#include "api/spec_flags.h"
#include "common/job_spec.h"
#include "worker/calib/recipe.h"
#include "worker/engine/recipe.h"

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

// Expects job_spec_json_from_flags to fail with kInvalidInput containing `words`.
void expect_error(const std::vector<std::string>& extra, const std::string& words) {
  auto r = spec_of(extra);
  ASSERT_FALSE(r.is_ok()) << "accepted: " << r.value().dump();
  EXPECT_EQ(r.status().code(), Code::kInvalidInput) << r.status().message();
  EXPECT_NE(r.status().message().find(words), std::string::npos)
      << "'" << r.status().message() << "' lacks '" << words << "'";
}

// The spec the coordinator parses; asserts it is a calibration recipe and
// that the engine reads back exactly what recipe_from_flags built.
calib::CalibRecipe accepted_calibration(const json& spec, const Flags& f) {
  auto js = parse_job_spec(spec);
  EXPECT_TRUE(js.is_ok()) << js.status().message();
  if (!js.is_ok()) return {};
  EXPECT_TRUE(js->recipe.calibration());
  auto r = calib_recipe_from_spec(*js);
  EXPECT_TRUE(r.is_ok()) << r.status().message();
  if (!r.is_ok()) return {};
  auto direct = recipe_from_flags(f);
  EXPECT_TRUE(direct.is_ok()) << direct.status().message();
  if (direct.is_ok()) {
    EXPECT_EQ(r->to_json(), direct->to_json());
  }
  return *r;
}

TEST(SpecFlags, DeclaresEveryQuantizeRecipeFlag) {
  for (const auto& k : calib_valued_flags()) EXPECT_EQ(spec_valued_flags().count(k), 1u) << k;
  for (const auto& k : calib_bool_flags()) EXPECT_EQ(spec_boolean_flags().count(k), 1u) << k;
  for (const char* k : {"blocksize", "batch", "window", "overlap", "mode", "seed", "format"})
    EXPECT_EQ(spec_valued_flags().count(k), 1u) << k;
  // The service's blocks per task and CBQ's window are two flags.
  EXPECT_EQ(spec_valued_flags().count("cbq-window"), 1u);
  EXPECT_EQ(spec_valued_flags().count("cbq-overlap"), 1u);
  for (const auto& k : spec_valued_flags()) EXPECT_EQ(spec_boolean_flags().count(k), 0u) << k;
}

// The brief's example: FlatQuant W4A4KV4 + CBQ windows of 2 + IntactKV.
TEST(SpecFlags, FlatQuantCbqIntactKv) {
  // clang-format off
  const std::vector<std::string> args = {
      "--method", "flatquant", "--w-bits", "4", "--a-bits", "4", "--kv-bits", "4",
      "--reconstruction", "cbq", "--cbq-window", "2", "--intactkv"};
  // clang-format on
  Flags f = submit_flags(args);
  auto r = job_spec_json_from_flags(f);
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const json& spec = *r;
  EXPECT_EQ(spec["model"], "/m");
  EXPECT_EQ(spec["calib"], json({{"path", "/c"}}));
  EXPECT_EQ(spec["output"], json({{"path", "/o"}}));  // format: the parser's auto
  const json& rec = spec["recipe"];
  // Built from recipe_from_flags(f).to_json(), every key present; no "method" alias.
  EXPECT_EQ(rec, recipe_from_flags(f)->to_json());
  EXPECT_FALSE(rec.contains("method"));
  EXPECT_EQ(rec["transform"], "flatquant");
  EXPECT_EQ(rec["weight_solver"], "rtn");
  EXPECT_EQ(rec["w_bits"], 4);
  EXPECT_EQ(rec["a_bits"], 4);
  EXPECT_EQ(rec["kv_bits"], 4);
  EXPECT_EQ(rec["w_group"], -1);
  EXPECT_EQ(rec["reconstruction"], "cbq");
  EXPECT_EQ(rec["cbq_window"], 2);
  EXPECT_EQ(rec["cbq_overlap"], 1);
  EXPECT_EQ(rec["intactkv"], true);
  EXPECT_EQ(rec["intactkv_prefix"], json::array());
  for (const char* k : {"window", "overlap", "mode", "group_size", "sym", "true_sequential"})
    EXPECT_FALSE(rec.contains(k)) << k;

  calib::CalibRecipe c = accepted_calibration(spec, f);
  EXPECT_EQ(c.transform, calib::Transform::kFlatQuant);
  EXPECT_EQ(c.weight_solver, calib::WeightSolver::kRtn);
  EXPECT_EQ(c.reconstruction, calib::Reconstruction::kCbq);
  EXPECT_EQ(c.cbq_window, 2);
  EXPECT_EQ(c.a_bits, 4);
  EXPECT_EQ(c.kv_bits, 4);
  EXPECT_TRUE(c.intactkv);
  auto js = parse_job_spec(spec);
  ASSERT_TRUE(js.is_ok());
  EXPECT_EQ(js->recipe.method, "flatquant");
  EXPECT_EQ(js->output.format, "auto");
  auto fmt = calib_output_format(*js, c);
  ASSERT_TRUE(fmt.is_ok()) << fmt.status().message();
  EXPECT_EQ(*fmt, "native");
}

// --method names the transform or the weight solver, as for `qcal quantize`;
// the spec carries the resolved transform / weight_solver the parser displays.
TEST(SpecFlags, MethodAliases) {
  struct Case {
    std::vector<std::string> args;
    const char* transform;
    const char* solver;
    const char* display;  // JobSpec.recipe.method
  };
  // clang-format off
  const std::vector<Case> cases = {
      {{"--method", "rtn", "--a-bits", "8"}, "none", "rtn", "rtn"},
      {{"--method", "gptq", "--kv-bits", "4"}, "none", "gptq", "gptq"},
      {{"--method", "gptq", "--format", "native"}, "none", "gptq", "gptq"},
      {{"--weight-solver", "gptq"}, "none", "gptq", "gptq"},
      {{"--method", "lora-rounding", "--reconstruction", "block"}, "none", "lora-rounding",
       "lora-rounding"},
      {{"--reconstruction", "cbq"}, "none", "lora-rounding", "lora-rounding"},
      {{"--method", "smoothquant", "--a-bits", "8"}, "smoothquant", "rtn", "smoothquant"},
      {{"--method", "quarot", "--a-bits", "4", "--weight-solver", "gptq"}, "quarot", "gptq",
       "quarot"},
      {{"--method", "spinquant", "--w-bits", "4", "--spin-steps", "2"}, "spinquant", "rtn",
       "spinquant"},
      {{"--method", "flatquant", "--a-bits", "4"}, "flatquant", "rtn", "flatquant"},
      {{"--intactkv"}, "none", "gptq", "gptq"},
  };
  // clang-format on
  for (const auto& c : cases) {
    SCOPED_TRACE(c.args[0] + " " + c.args[1]);
    Flags f = submit_flags(c.args);
    auto r = job_spec_json_from_flags(f);
    ASSERT_TRUE(r.is_ok()) << r.status().message();
    EXPECT_FALSE((*r)["recipe"].contains("method"));
    EXPECT_EQ((*r)["recipe"]["transform"], c.transform);
    EXPECT_EQ((*r)["recipe"]["weight_solver"], c.solver);
    accepted_calibration(*r, f);
    auto js = parse_job_spec(*r);
    ASSERT_TRUE(js.is_ok());
    EXPECT_EQ(js->recipe.method, c.display);
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
      "--no-diag", "--embed-mean-sub", "--cbq-parallel", "--no-cfp", "--group-size", "32",
      "--damp", "0.05", "--blocksize", "64", "--act-order", "--static-groups", "--batch", "4",
      "--format", "native", "--sym", "--nsamples", "16", "--seqlen", "64", "--overwrite",
      "--priority", "high", "--labels", "a=1", "--eval-data", "/e", "--max-kl", "0.5"};
  // clang-format on
  Flags f = submit_flags(args);
  auto r = job_spec_json_from_flags(f);
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  const json want = json::parse(R"({
    "transform": "flatquant", "weight_solver": "rtn", "w_bits": 3, "w_group": 32,
    "w_mse_clip": false, "a_bits": 8, "a_clip": 0.9, "kv_bits": 6, "kv_clip": 0.95,
    "sq_alpha": 0.7, "epochs": 3, "cali_bsz": 2, "flat_lr": 0.01, "lwc": false, "lac": false,
    "add_diag": false, "diag_alpha": 0.5, "spin_steps": 7, "spin_lr": 0.5, "spin_bsz": 2,
    "embed_mean_sub": true, "intactkv": true, "intactkv_prefix": [1, 5, 9],
    "gptq": {"percdamp": 0.05, "blocksize": 64, "act_order": true, "static_groups": true},
    "seed": 5, "batch": 4, "reconstruction": "block", "cbq_window": 3, "cbq_overlap": 0,
    "cbq_parallel": true, "cbq_epochs": 3, "lora_rank": 4, "cfp": false})");
  // Every key named above, with that value (keys added to the schema later are
  // only required to be accepted).
  for (auto it = want.begin(); it != want.end(); ++it)
    EXPECT_EQ((*r)["recipe"][it.key()], it.value()) << it.key();
  EXPECT_EQ((*r)["calib"], json({{"path", "/c"}, {"nsamples", 16}, {"seqlen", 64}}));
  EXPECT_EQ((*r)["eval"], json({{"path", "/e"}, {"seqlen", 64}}));
  EXPECT_EQ((*r)["output"], json({{"path", "/o"}, {"format", "native"}, {"overwrite", true}}));
  EXPECT_EQ((*r)["priority"], "high");
  EXPECT_EQ((*r)["labels"], json({{"a", "1"}}));
  EXPECT_EQ((*r)["gate"], json({{"max_kl", 0.5}}));
  calib::CalibRecipe c = accepted_calibration(*r, f);
  EXPECT_EQ(c.intactkv_prefix, (std::vector<int32_t>{1, 5, 9}));
  EXPECT_EQ(c.gptq.blocksize, 64);
  EXPECT_EQ(c.batch, 4);
}

TEST(SpecFlags, CalibrationErrors) {
  // Validation of recipe_from_flags / CalibRecipe::validate, as `qcal quantize`.
  expect_error({"--reconstruction", "cbq", "--weight-solver", "gptq"}, "discard gptq");
  expect_error({"--method", "gptq", "--reconstruction", "cbq"}, "discard gptq");
  expect_error({"--method", "quarot", "--a-bits", "5"}, "a_bits");
  expect_error({"--method", "lora-rounding"}, "reconstruction");
  expect_error({"--method", "smoothquant", "--weight-solver", "lora-rounding"}, "reconstruction");
  expect_error({"--method", "gptq", "--weight-solver", "rtn", "--a-bits", "4"},
               "--weight-solver rtn contradicts --method gptq");
  expect_error({"--method", "frob", "--a-bits", "4"}, "frob");
  expect_error({"--intactkv-prefix", "1,2", "--a-bits", "4"}, "--intactkv-prefix needs --intactkv");
  expect_error({"--intactkv", "--intactkv-prefix", "1,x"}, "comma-separated");
  expect_error({"--method", "quarot", "--a-bits", "4", "--asym"}, "symmetrically");
  expect_error({"--method", "quarot", "--a-bits", "4", "--sym", "--asym"}, "exclusive");
  expect_error({"--method", "quarot", "--a-bits", "4", "--seed", "-3"}, "flag --seed: must be ≥ 0");
  expect_error({"--reconstruction", "cbq", "--cbq-window", "two"}, "--cbq-window");
  // The weight-only DAG's knobs are not CBQ's.
  expect_error({"--reconstruction", "cbq", "--window", "2"}, "use --cbq-window");
  expect_error({"--reconstruction", "cbq", "--overlap", "1"}, "use --cbq-overlap");
  expect_error({"--method", "flatquant", "--a-bits", "4", "--mode", "parallel"}, "--cbq-parallel");
  expect_error({"--method", "flatquant", "--a-bits", "4", "--no-true-sequential"},
               "always true-sequential");
  // The output format, checked as the planner will (calib_output_format).
  expect_error({"--reconstruction", "cbq", "--format", "gptq"},
               "--format gptq: a reconstruction recipe writes the native format");
  expect_error({"--method", "flatquant", "--a-bits", "4", "--format", "compressed-tensors"},
               "--format compressed-tensors: this recipe leaves transforms");
  expect_error({"--method", "quarot", "--intactkv", "--format", "gptq"}, "IntactKV prefix cache");
  expect_error({"--method", "quarot", "--a-bits", "4", "--format", "exl2"}, "output.format");
  // The rest of the spec, as the coordinator parses it.
  expect_error({"--method", "quarot", "--a-bits", "4", "--seqlen", "1"}, "calib.seqlen");
}

TEST(SpecFlags, CalibrationOnlyFlagsRefusedForWeightOnly) {
  for (const auto& k : calib_valued_flags()) {
    if (k == "seed" || k == "a-bits" || k == "kv-bits") continue;
    Flags f(spec_valued_flags(), spec_boolean_flags());
    ASSERT_TRUE(f.parse({"--model", "/m", "--calib", "/c", "--out", "/o", "--method", "gptq",
                         "--" + k, "1"})
                    .is_ok());
    if (wants_calibration(f)) continue;  // a reconstruction flag: a calibration recipe
    auto r = job_spec_json_from_flags(f);
    ASSERT_FALSE(r.is_ok()) << k << ": " << r.value().dump();
    EXPECT_NE(r.status().message().find("--" + k + " applies to calibration recipes"),
              std::string::npos)
        << r.status().message();
  }
  for (const auto& k : calib_bool_flags()) {
    Flags f(spec_valued_flags(), spec_boolean_flags());
    ASSERT_TRUE(
        f.parse({"--model", "/m", "--calib", "/c", "--out", "/o", "--method", "rtn", "--" + k})
            .is_ok());
    if (wants_calibration(f)) continue;
    auto r = job_spec_json_from_flags(f);
    ASSERT_FALSE(r.is_ok()) << k << ": " << r.value().dump();
    EXPECT_NE(r.status().message().find("--" + k + " applies to calibration recipes"),
              std::string::npos)
        << r.status().message();
  }
  expect_error({"--blocksize", "64"}, "--blocksize applies to calibration recipes");
  expect_error({"--batch", "4"}, "--batch applies to calibration recipes");
  expect_error({"--method", "rtn", "--alpha", "0.5"}, "--alpha applies to calibration recipes");
  expect_error({"--no-lwc"}, "--no-lwc applies to calibration recipes");
}

// Weight-only specs are exactly what `qcal submit` produced before the recipe
// flags (goldens from that build's --dry-run, paths already absolute).
TEST(SpecFlags, WeightOnlyUnchanged) {
  struct Case {
    std::vector<std::string> args;
    const char* golden;
  };
  const std::vector<Case> cases = {
      {{}, R"({"calib":{"path":"/c"},"model":"/m","output":{"path":"/o"}})"},
      {{"--method",
        "rtn",
        "--w-bits",
        "8",
        "--group-size",
        "-1",
        "--asym",
        "--act-order",
        "--static-groups",
        "--damp",
        "0.05",
        "--mse-clip",
        "--no-true-sequential",
        "--mode",
        "parallel",
        "--window",
        "2",
        "--overlap",
        "1",
        "--seed",
        "9",
        "--nsamples",
        "64",
        "--seqlen",
        "256",
        "--eval-data",
        "/e",
        "--eval-nsamples",
        "16",
        "--format",
        "compressed-tensors",
        "--overwrite",
        "--max-ppl-increase",
        "0.05",
        "--max-kl",
        "0.1",
        "--priority",
        "low",
        "--labels",
        "team=infra,run=3"},
       R"({"calib":{"nsamples":64,"path":"/c","seqlen":256},"eval":{"nsamples":16,"path":"/e",)"
       R"("seqlen":256},"gate":{"max_kl":0.1,"max_ppl_increase":0.05},"labels":{"run":"3",)"
       R"("team":"infra"},"model":"/m","output":{"format":"compressed-tensors","overwrite":true,)"
       R"("path":"/o"},"priority":"low","recipe":{"act_order":true,"damp":0.05,"group_size":-1,)"
       R"("method":"rtn","mode":"parallel","mse_clip":true,"overlap":1,"seed":9,)"
       R"("static_groups":true,"sym":false,"true_sequential":false,"w_bits":8,"window":2}})"},
      {{"--method", "gptq", "--w-bits", "3", "--sym", "--window", "4", "--seqlen", "128",
        "--eval-data", "/e"},
       R"({"calib":{"path":"/c","seqlen":128},"eval":{"path":"/e","seqlen":128},"model":"/m",)"
       R"("output":{"path":"/o"},"recipe":{"method":"gptq","sym":true,"w_bits":3,"window":4}})"},
      // --a-bits / --kv-bits 16 are unquantized: still weight-only, nothing added.
      {{"--method", "gptq", "--a-bits", "16", "--kv-bits", "16"},
       R"({"calib":{"path":"/c"},"model":"/m","output":{"path":"/o"},"recipe":{"method":"gptq"}})"},
  };
  for (const auto& c : cases) {
    auto r = spec_of(c.args);
    ASSERT_TRUE(r.is_ok()) << r.status().message();
    EXPECT_EQ(r->dump(), c.golden);
    auto js = parse_job_spec(*r);
    ASSERT_TRUE(js.is_ok()) << js.status().message();
    EXPECT_FALSE(js->recipe.calibration());
  }
  // Range checks stay the coordinator's for weight-only specs.
  auto bits5 = spec_of({"--w-bits", "5"});
  ASSERT_TRUE(bits5.is_ok());
  EXPECT_EQ(bits5->dump(),
            R"({"calib":{"path":"/c"},"model":"/m","output":{"path":"/o"},"recipe":{"w_bits":5}})");
  expect_error({"--sym", "--asym"}, "--sym and --asym are exclusive");
  expect_error({"--seed", "-1"}, "flag --seed: must be ≥ 0 (got -1)");
}

}  // namespace
}  // namespace qcal

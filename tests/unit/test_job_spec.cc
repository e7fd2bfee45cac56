// Job spec parsing and validation (pure: no Redis).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "common/job_spec.h"
#include "common/method_registry.h"

namespace qcal {
namespace {

using nlohmann::json;

json minimal() {
  return {{"model", "/models/llama"},
          {"calib", {{"path", "/data/calib.jsonl"}}},
          {"output", {{"path", "/out/llama-w4"}}}};
}

json full() {
  return json::parse(R"({
    "model": "/models/llama",
    "recipe": {"method": "gptq", "w_bits": 8, "group_size": -1, "sym": false,
               "act_order": true, "static_groups": true, "damp": 0.05,
               "mse_clip": true, "true_sequential": false,
               "mode": "parallel", "window": 4, "overlap": 0, "seed": 9007199254740992},
    "calib": {"path": "/data/calib.jsonl", "nsamples": 64, "seqlen": 512},
    "eval":  {"path": "/data/eval.jsonl", "nsamples": 0, "seqlen": 1024},
    "output": {"path": "/out/llama-w8", "format": "compressed-tensors", "overwrite": true},
    "gate": {"max_ppl_increase": 0.05, "max_kl": 0.1},
    "priority": "high",
    "labels": {"team": "infra", "run": "nightly"}
  })");
}

// Expects parse failure with kInvalidInput and a message starting with `path`.
void expect_error(const json& j, const std::string& path, const std::string& also = "") {
  auto r = parse_job_spec(j);
  ASSERT_FALSE(r.is_ok()) << "accepted: " << j.dump();
  EXPECT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_EQ(r.status().message().rfind(path + ":", 0), 0u)
      << "message '" << r.status().message() << "' does not name " << path;
  if (!also.empty()) {
    EXPECT_NE(r.status().message().find(also), std::string::npos) << r.status().message();
  }
}

TEST(JobSpec, MinimalGetsEveryDefault) {
  auto r = parse_job_spec(minimal());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const JobSpec& s = *r;
  EXPECT_EQ(s.model, "/models/llama");
  // No recipe: the earlier weight-only default, GPTQ W4 g128, in the one recipe.
  EXPECT_EQ(s.recipe.weight_solver(), "gptq");
  EXPECT_EQ(s.recipe.transform(), "none");
  EXPECT_EQ(s.recipe.w_bits(), 4);
  EXPECT_EQ(s.recipe.w_group(), 128);
  EXPECT_TRUE(s.recipe.w_sym());
  EXPECT_FALSE(s.recipe.parallel());
  EXPECT_EQ(s.recipe.i("blocks_per_task"), 1);
  EXPECT_EQ(s.calib.nsamples, 128);
  EXPECT_EQ(s.calib.seqlen, 2048);
  EXPECT_FALSE(s.eval.has_value());
  EXPECT_EQ(s.output.format, "auto");
  EXPECT_EQ(*output_format(s), "gptq");  // everything folds
  EXPECT_FALSE(s.gate.max_kl.has_value());
  EXPECT_EQ(s.priority, Priority::kNormal);
  EXPECT_TRUE(s.labels.empty());

  json j = s.to_json();
  EXPECT_EQ(j["recipe"]["gptq"]["percdamp"], 0.01);
  EXPECT_EQ(j["recipe"]["gptq"]["true_sequential"], true);
  EXPECT_EQ(j["recipe"]["seed"], 0);
  EXPECT_EQ(j["priority"], "normal");
  EXPECT_TRUE(j["eval"].is_null());
  EXPECT_TRUE(j["gate"]["max_kl"].is_null());
  EXPECT_TRUE(j["labels"].is_object());
  EXPECT_EQ(j["output"]["overwrite"], false);
  EXPECT_EQ(j["output"]["max_shard_mb"], 2048);
}

TEST(JobSpec, FullSpecRoundTrips) {
  auto r = parse_job_spec(full());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.seed(), 9007199254740992ull);
  EXPECT_EQ(r->recipe.w_group(), -1);
  EXPECT_FALSE(r->recipe.w_sym());
  EXPECT_TRUE(r->recipe.b("gptq.act_order"));
  EXPECT_EQ(r->recipe.f("gptq.percdamp"), 0.05);
  EXPECT_EQ(r->recipe.i("blocks_per_task"), 4);
  EXPECT_TRUE(r->recipe.parallel());
  ASSERT_TRUE(r->eval.has_value());
  EXPECT_EQ(r->eval->nsamples, 0);
  EXPECT_EQ(r->eval->seqlen, 1024);
  EXPECT_EQ(*r->gate.max_kl, 0.1);
  EXPECT_EQ(r->priority, Priority::kHigh);
  EXPECT_EQ(r->labels.at("run"), "nightly");
  // The full form (the one recipe, every key) parses back to the same thing.
  json out = r->to_json();
  EXPECT_EQ(out["recipe"], r->recipe.to_json());
  auto again = parse_job_spec(out);
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->to_json(), out);
  auto from_min = parse_job_spec(parse_job_spec(minimal())->to_json());
  ASSERT_TRUE(from_min.is_ok()) << from_min.status().to_string();
  EXPECT_EQ(from_min->to_json(), parse_job_spec(minimal())->to_json());
}

TEST(JobSpec, EvalDefaultsToAllSamples) {
  json j = minimal();
  j["eval"] = {{"path", "/e"}};
  auto r = parse_job_spec(j);
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->eval->nsamples, 0);
  EXPECT_EQ(r->eval->seqlen, 2048);
}

TEST(JobSpec, IntegralFloatsAreIntegers) {
  json j = minimal();
  j["recipe"] = {{"w_bits", 3.0}, {"group_size", 64.0}};
  auto r = parse_job_spec(j);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.w_bits(), 3);
  EXPECT_EQ(r->recipe.w_group(), 64);
  j["recipe"]["w_bits"] = 3.5;
  expect_error(j, "recipe.w_bits", "integer");
}

TEST(JobSpec, EachInvalidFieldIsNamed) {
  struct Case {
    json patch;  // merged into minimal()
    std::string path, also;
  };
  const std::vector<Case> cases = {
      {{{"recipe", {{"w_bits", 5}}}}, "recipe.w_bits", "2, 3, 4, 8 or 16 (got 5)"},
      {{{"recipe", {{"w_bits", "4"}}}}, "recipe.w_bits", "integer"},
      {{{"recipe", {{"group_size", 0}}}}, "recipe.group_size", "got 0"},
      {{{"recipe", {{"group_size", -2}}}}, "recipe.group_size", ""},
      {{{"recipe", {{"method", "awq"}}}}, "recipe.method", "awq"},
      {{{"recipe", {{"mode", "fast"}}}}, "recipe.mode", "sequential, parallel"},
      {{{"recipe", {{"window", 0}}}}, "recipe.window", ""},
      {{{"recipe", {{"window", 2}, {"overlap", 1}}}}, "recipe.overlap", "cbq_overlap"},
      {{{"recipe", {{"damp", -1}}}}, "recipe.damp", ""},
      {{{"recipe", {{"damp", "x"}}}}, "recipe.damp", "number"},
      {{{"recipe", {{"sym", 1}}}}, "recipe.sym", "true or false"},
      {{{"recipe", {{"seed", -1}}}}, "recipe.seed", ""},
      {{{"recipe", {{"seed", 18446744073709551615ull}}}}, "recipe.seed", "must be in"},
      {{{"recipe", 4}}, "recipe", "object"},
      {{{"calib", {{"path", "/c"}, {"nsamples", 0}}}}, "calib.nsamples", "at least 1"},
      {{{"calib", {{"path", "/c"}, {"seqlen", 1}}}}, "calib.seqlen", "at least 2"},
      {{{"calib", {{"path", nullptr}, {"nsamples", 4}}}}, "calib.path", "required"},
      {{{"calib", {{"path", ""}}}}, "calib.path", "empty"},
      {{{"eval", {{"path", "/e"}, {"nsamples", -1}}}}, "eval.nsamples", ""},
      {{{"eval", {{"nsamples", 4}}}}, "eval.path", "required"},
      {{{"output", {{"path", "/o"}, {"format", "awq"}}}}, "output.format", ""},
      {{{"output", {{"path", "/o"}, {"overwrite", "yes"}}}}, "output.overwrite", ""},
      {{{"output", {{"path", "/o"}, {"max_shard_mb", 0}}}}, "output.max_shard_mb", ""},
      {{{"output", {{"path", "/o"}, {"format", "compressed-tensors"}}},
        {"recipe", {{"w_bits", 3}}}},
       "output.format",
       "4 or 8"},
      {{{"gate", {{"max_kl", -0.1}}}}, "gate.max_kl", ">= 0"},
      {{{"gate", {{"max_ppl_increase", "5%"}}}}, "gate.max_ppl_increase", "number"},
      {{{"priority", "urgent"}}, "priority", "high, normal or low"},
      {{{"labels", {{"team", 3}}}}, "labels.team", "string"},
      {{{"labels", json::array()}}, "labels", "object"},
      {{{"model", ""}}, "model", "empty"},
      {{{"model", 7}}, "model", "string"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.patch.dump());
    json j = minimal();
    j.merge_patch(c.patch);
    expect_error(j, c.path, c.also);
  }
  json j = minimal();
  j.erase("model");
  expect_error(j, "model", "required");
  j = minimal();
  j.erase("output");
  expect_error(j, "output.path", "required");
  j = minimal();
  j.erase("calib");
  expect_error(j, "calib.path", "required");
  auto arr = parse_job_spec(json::array());
  EXPECT_EQ(arr.status().code(), Code::kInvalidInput);
}

TEST(JobSpec, UnknownKeysAreRejectedWithTheirPath) {
  json j = minimal();
  j["modle"] = "/typo";
  expect_error(j, "modle", "unknown key");
  j = minimal();
  j["recipe"] = {{"w_bit", 4}};
  expect_error(j, "recipe.w_bit", "unknown recipe key");
  j = minimal();
  j["calib"]["samples"] = 4;
  expect_error(j, "calib.samples", "unknown key");
  j = minimal();
  j["gate"] = {{"max_ppl", 0.1}};
  expect_error(j, "gate.max_ppl", "unknown key");
  j = minimal();
  j["output"]["fmt"] = "gptq";
  expect_error(j, "output.fmt", "unknown key");
}

// ---- The one recipe (issue #10): the registry's keys; the earlier weight-only form maps.

json with_recipe(const json& recipe) {
  json j = minimal();
  j["recipe"] = recipe;
  return j;
}

TEST(JobSpec, RecipeRoundTripsThroughTheStoredForm) {
  const json cbq = {{"weight_solver", "lora-rounding"},
                    {"w_bits", 2},
                    {"w_group", 32},
                    {"reconstruction", "cbq"},
                    {"cbq_window", 2},
                    {"cbq_overlap", 1},
                    {"cbq_epochs", 3}};
  auto r = parse_job_spec(with_recipe(cbq));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.weight_solver(), "lora-rounding");
  EXPECT_EQ(r->recipe.display_name(), "lora-rounding");
  EXPECT_EQ(r->recipe.w_bits(), 2);
  EXPECT_EQ(r->recipe.w_group(), 32);
  EXPECT_EQ(r->recipe.i("cbq_window"), 2);
  EXPECT_EQ(r->recipe.i("cbq_epochs"), 3);
  EXPECT_EQ(*output_format(*r), "gptq");  // a weight-only reconstruction folds
  json j = r->to_json();
  for (auto it = cbq.begin(); it != cbq.end(); ++it) EXPECT_EQ(j["recipe"][it.key()], it.value());
  auto again = parse_job_spec(j);
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->to_json(), j);
}

TEST(JobSpec, TheWeightOnlyFormMapsOntoTheOneRecipe) {
  auto r = parse_job_spec(with_recipe({{"method", "gptq"},
                                       {"w_bits", 3},
                                       {"group_size", 64},
                                       {"sym", false},
                                       {"damp", 0.05},
                                       {"act_order", true},
                                       {"true_sequential", false},
                                       {"window", 2}}));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.weight_solver(), "gptq");
  EXPECT_EQ(r->recipe.w_group(), 64);
  EXPECT_FALSE(r->recipe.w_sym());
  EXPECT_EQ(r->recipe.f("gptq.percdamp"), 0.05);
  EXPECT_TRUE(r->recipe.b("gptq.act_order"));
  EXPECT_FALSE(r->recipe.b("gptq.true_sequential"));
  EXPECT_EQ(r->recipe.i("blocks_per_task"), 2);
  // {"w_bits": 4} alone is the weight-only form: GPTQ with groups of 128.
  r = parse_job_spec(with_recipe({{"w_bits", 4}, {"seed", 3}}));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->recipe.weight_solver(), "gptq");
  EXPECT_EQ(r->recipe.w_group(), 128);
  // A key only the one recipe has: its defaults (rtn, per channel).
  r = parse_job_spec(with_recipe({{"w_group", 64}}));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->recipe.weight_solver(), "rtn");
  r = parse_job_spec(with_recipe({{"a_bits", 8}}));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->recipe.w_group(), -1);
  EXPECT_EQ(*output_format(*r), "native");
}

TEST(JobSpec, MethodIsTheClisAlias) {
  auto r = parse_job_spec(with_recipe({{"method", "flatquant"}, {"a_bits", 4}, {"kv_bits", 4}}));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.transform(), "flatquant");
  EXPECT_FALSE(r->to_json()["recipe"].contains("method"));
  r = parse_job_spec(with_recipe({{"method", "gptq"}, {"a_bits", 8}}));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.weight_solver(), "gptq");
  EXPECT_EQ(r->recipe.a_bits(), 8);
  // Agreeing twice is fine; contradicting is not.
  EXPECT_TRUE(
      parse_job_spec(with_recipe({{"method", "quarot"}, {"transform", "quarot"}, {"a_bits", 4}}))
          .is_ok());
  expect_error(with_recipe({{"method", "gptq"}, {"weight_solver", "rtn"}, {"a_bits", 8}}),
               "recipe.method", "disagrees with weight_solver");
  expect_error(with_recipe({{"method", "quarot"}, {"transform", "flatquant"}}), "recipe.method",
               "disagrees");
  expect_error(with_recipe({{"method", "awq"}, {"a_bits", 8}}), "recipe.method", "flatquant");
  expect_error(with_recipe({{"method", 3}, {"a_bits", 8}}), "recipe.method", "string");
}

TEST(JobSpec, WeightOnlyKeysInTheOneRecipeNameTheirCounterpart) {
  expect_error(with_recipe({{"a_bits", 4}, {"group_size", 128}}), "recipe.group_size",
               "use w_group");
  expect_error(with_recipe({{"reconstruction", "cbq"}, {"window", 2}}), "recipe.window",
               "cbq_window");
  expect_error(with_recipe({{"reconstruction", "cbq"}, {"overlap", 1}}), "recipe.overlap",
               "cbq_overlap");
  expect_error(with_recipe({{"method", "quarot"}, {"damp", 0.1}}), "recipe.damp", "gptq.percdamp");
  expect_error(with_recipe({{"a_bitz", 4}}), "recipe.a_bitz", "unknown recipe key");
}

TEST(JobSpec, OutputFormats) {
  json j = with_recipe({{"a_bits", 8}});
  for (const char* f : {"auto", "native"}) {
    j["output"]["format"] = f;
    auto r = parse_job_spec(j);
    ASSERT_TRUE(r.is_ok()) << f << ": " << r.status().to_string();
    EXPECT_EQ(r->output.format, f);
    EXPECT_EQ(*output_format(*r), "native");
  }
  // Quantized activations stay online: no GPTQ / compressed-tensors.
  for (const char* f : {"gptq", "compressed-tensors"}) {
    j["output"]["format"] = f;
    expect_error(j, "output.format", "online");
  }
  j["output"]["format"] = "awq";
  expect_error(j, "output.format", "auto, native, gptq or compressed-tensors");
  // Weight-only recipes write any of them; asymmetric ones not native.
  json w = minimal();
  w["output"]["format"] = "native";
  EXPECT_TRUE(parse_job_spec(w).is_ok());
  w["recipe"] = {{"sym", false}};
  expect_error(w, "output.format", "symmetric");
  EXPECT_EQ(parse_job_spec(minimal())->output.format, "auto");
}

// FlatQuant's flat_fold: weight-only, only what folds is learned, so the recipe folds
// completely (auto writes GPTQ, on the full grid like plain GPTQ); refused where
// activations or K/V are quantized, or without flatquant.
TEST(JobSpec, FoldedFlatQuantIsWrittenAsAPlainCheckpoint) {
  json j = with_recipe({{"transform", "flatquant"}, {"flat_fold", true}, {"w_bits", 4}});
  auto r = parse_job_spec(j);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_TRUE(r->recipe.folds_completely());
  EXPECT_FALSE(r->recipe.keeps_online());
  EXPECT_FALSE(r->recipe.narrow_grid());
  EXPECT_EQ(*output_format(*r), "gptq");
  for (const char* f : {"gptq", "compressed-tensors", "native"}) {
    j["output"]["format"] = f;
    EXPECT_TRUE(parse_job_spec(j).is_ok()) << f;
  }
  // Without flat_fold FlatQuant keeps its Kronecker transforms online.
  json online = with_recipe({{"transform", "flatquant"}, {"w_bits", 4}});
  EXPECT_TRUE(parse_job_spec(online)->recipe.keeps_online());
  EXPECT_EQ(*output_format(*parse_job_spec(online)), "native");
  EXPECT_TRUE(parse_job_spec(online)->recipe.narrow_grid());
  // The full grid only with flat_fold; asymmetric weights too (they need GPTQ's format).
  EXPECT_TRUE(
      parse_job_spec(
          with_recipe({{"transform", "flatquant"}, {"flat_fold", true}, {"w_grid", "full"}}))
          .is_ok());
  expect_error(with_recipe({{"transform", "flatquant"}, {"w_grid", "full"}}), "recipe.w_grid",
               "flat_fold");
  json asym = with_recipe({{"transform", "flatquant"}, {"flat_fold", true}, {"w_sym", false}});
  asym["output"]["format"] = "gptq";
  EXPECT_TRUE(parse_job_spec(asym).is_ok());
  expect_error(with_recipe({{"transform", "flatquant"}, {"flat_fold", true}, {"a_bits", 4}}),
               "recipe.flat_fold", "a4");
  expect_error(with_recipe({{"transform", "flatquant"}, {"flat_fold", true}, {"kv_bits", 4}}),
               "recipe.flat_fold", "weight-only");
  expect_error(with_recipe({{"transform", "quarot"}, {"flat_fold", true}}), "recipe.flat_fold",
               "flatquant");
}

// The recipe's own checks, named under "recipe." (what POST /v1/jobs answers with 400).
TEST(JobSpec, NonsenseRecipesAreRefusedNamingTheField) {
  struct Case {
    json recipe;
    std::string field, also;
  };
  const std::vector<Case> cases = {
      {{{"a_bits", 5}}, "recipe.a_bits", "got 5"},
      {{{"a_bits", "4"}}, "recipe.a_bits", "integer"},
      {{{"kv_bits", 1}}, "recipe.kv_bits", ""},
      {{{"w_bits", 5}, {"a_bits", 8}}, "recipe.w_bits", ""},
      {{{"transform", "awq"}}, "recipe.transform", "awq"},
      {{{"weight_solver", "adaround"}, {"a_bits", 8}}, "recipe.weight_solver", "adaround"},
      {{{"w_group", 0}, {"a_bits", 8}}, "recipe.w_group", ""},
      {{{"a_clip", 1.5}, {"a_bits", 8}}, "recipe.a_clip", ""},
      {{{"epochs", 1000000000}, {"transform", "flatquant"}}, "recipe.epochs", "[0, 1000]"},
      {{{"intactkv_prefix", {1}}}, "recipe.intactkv_prefix", "without intactkv"},
      {{{"intactkv", true}, {"intactkv_prefix", {-1}}}, "recipe.intactkv_prefix[0]", ""},
      {{{"reconstruction", "global"}}, "recipe.reconstruction", "global"},
      {{{"gptq", {{"blocksize", 0}}}, {"a_bits", 8}}, "recipe.gptq.blocksize", ""},
      {{{"gptq", {{"damp", 0.1}}}, {"a_bits", 8}}, "recipe.gptq.damp", "unknown recipe key"},
      {{{"w_bits", 16}, {"a_bits", 16}, {"kv_bits", 16}},
       "recipe.w_bits, a_bits, kv_bits",
       "nothing to quantize"},
      {{{"weight_solver", "lora-rounding"}, {"a_bits", 8}},
       "recipe.weight_solver",
       "reconstruction"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.recipe.dump());
    expect_error(with_recipe(c.recipe), c.field, c.also);
  }
}

// Every key of the registry is a recipe key the spec accepts, with its default.
TEST(JobSpec, RecipeKeysAreTheRegistrys) {
  const json full_recipe = Recipe().to_json();
  size_t keys = 0;
  for (const MethodRow& row : method_registry()) keys += row.options.size();
  size_t seen = 0;
  for (auto it = full_recipe.begin(); it != full_recipe.end(); ++it)
    seen += it->is_object() ? it->size() : 1;
  EXPECT_EQ(seen, keys);
  json r = full_recipe;
  r["a_bits"] = 8;
  auto s = parse_job_spec(with_recipe(r));
  ASSERT_TRUE(s.is_ok()) << s.status().to_string();
  EXPECT_EQ(s->recipe.to_json(), r);
}

TEST(JobSpec, PriorityNames) {
  EXPECT_STREQ(priority_name(Priority::kHigh), "high");
  EXPECT_STREQ(priority_name(Priority::kNormal), "normal");
  EXPECT_STREQ(priority_name(Priority::kLow), "low");
}

}  // namespace
}  // namespace qcal

// GPTQ's column order when the recipe does not say: act-order with static groups for
// weight-only recipes, the stored order when activations or the KV cache are
// quantized; what the user gives is kept; the resolved values survive the round trip.
TEST(JobSpec, GptqColumnOrderDefaultsByRecipe) {
  auto order = [](const nlohmann::json& j) {
    auto r = qcal::recipe_from_json(j);
    EXPECT_TRUE(r.is_ok()) << r.status().message();
    if (!r.is_ok()) return std::string("?");
    auto again = qcal::recipe_from_json(r->to_json());
    EXPECT_TRUE(again.is_ok());
    EXPECT_EQ(again->b("gptq.act_order"), r->b("gptq.act_order"));
    return std::string(r->b("gptq.act_order") ? "act" : "stored") +
           (r->b("gptq.static_groups") ? "+static" : "");
  };
  EXPECT_EQ(order({{"weight_solver", "gptq"}, {"w_bits", 4}}), "act+static");
  EXPECT_EQ(order({{"method", "gptq"}, {"w_bits", 4}}), "act+static");  // the earlier form
  EXPECT_EQ(order({{"transform", "quarot"}, {"weight_solver", "gptq"}}), "act+static");
  EXPECT_EQ(order({{"transform", "quarot"}, {"weight_solver", "gptq"}, {"a_bits", 4}}), "stored");
  EXPECT_EQ(order({{"weight_solver", "gptq"}, {"kv_bits", 4}}), "stored");
  EXPECT_EQ(order({{"weight_solver", "gptq"}, {"a_bits", 4}, {"gptq", {{"act_order", true}}}}),
            "act");
  // Not a GPTQ recipe: the options keep their defaults (and are not refused).
  EXPECT_EQ(order({{"transform", "quarot"}, {"weight_solver", "rtn"}, {"a_bits", 4}}),
            "act+static");
}

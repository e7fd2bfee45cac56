// Job spec parsing and validation (pure: no Redis).
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "common/job_spec.h"
#include "worker/calib/recipe.h"
#include "worker/engine/recipe.h"

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
    "recipe": {"method": "rtn", "w_bits": 8, "group_size": -1, "sym": false,
               "act_order": true, "static_groups": true, "damp": 0.05,
               "mse_clip": true, "true_sequential": false,
               "mode": "parallel", "window": 4, "overlap": 1, "seed": 18446744073709551615},
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
  EXPECT_EQ(s.recipe.method, "gptq");
  EXPECT_EQ(s.recipe.w_bits, 4);
  EXPECT_EQ(s.recipe.group_size, 128);
  EXPECT_TRUE(s.recipe.sym);
  EXPECT_EQ(s.recipe.mode, "sequential");
  EXPECT_EQ(s.recipe.window, 1);
  EXPECT_EQ(s.calib.nsamples, 128);
  EXPECT_EQ(s.calib.seqlen, 2048);
  EXPECT_FALSE(s.eval.has_value());
  EXPECT_EQ(s.output.format, "gptq");
  EXPECT_FALSE(s.gate.max_kl.has_value());
  EXPECT_EQ(s.priority, Priority::kNormal);
  EXPECT_TRUE(s.labels.empty());

  json j = s.to_json();
  EXPECT_EQ(j["recipe"]["damp"], 0.01);
  EXPECT_EQ(j["recipe"]["true_sequential"], true);
  EXPECT_EQ(j["recipe"]["seed"], 0);
  EXPECT_EQ(j["priority"], "normal");
  EXPECT_TRUE(j["eval"].is_null());
  EXPECT_TRUE(j["gate"]["max_kl"].is_null());
  EXPECT_TRUE(j["labels"].is_object());
  EXPECT_EQ(j["output"]["overwrite"], false);
}

TEST(JobSpec, FullSpecRoundTrips) {
  auto r = parse_job_spec(full());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->recipe.seed, 18446744073709551615ull);
  EXPECT_EQ(r->recipe.group_size, -1);
  ASSERT_TRUE(r->eval.has_value());
  EXPECT_EQ(r->eval->nsamples, 0);
  EXPECT_EQ(r->eval->seqlen, 1024);
  EXPECT_EQ(*r->gate.max_kl, 0.1);
  EXPECT_EQ(r->priority, Priority::kHigh);
  EXPECT_EQ(r->labels.at("run"), "nightly");
  json out = r->to_json();
  EXPECT_EQ(out, full());
  // The full form parses back to the same thing (what the store keeps).
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
  EXPECT_EQ(r->recipe.w_bits, 3);
  j["recipe"]["w_bits"] = 3.5;
  expect_error(j, "recipe.w_bits", "integer");
}

TEST(JobSpec, EachInvalidFieldIsNamed) {
  struct Case {
    json patch;  // merged into minimal()
    std::string path, also;
  };
  const std::vector<Case> cases = {
      {{{"recipe", {{"w_bits", 5}}}}, "recipe.w_bits", "must be one of 2, 3, 4, 8 (got 5)"},
      {{{"recipe", {{"w_bits", "4"}}}}, "recipe.w_bits", "integer"},
      {{{"recipe", {{"group_size", 0}}}}, "recipe.group_size", "got 0"},
      {{{"recipe", {{"group_size", -2}}}}, "recipe.group_size", ""},
      {{{"recipe", {{"method", "awq"}}}}, "recipe.method", "rtn or gptq"},
      {{{"recipe", {{"mode", "fast"}}}}, "recipe.mode", "sequential or parallel"},
      {{{"recipe", {{"window", 0}}}}, "recipe.window", ""},
      {{{"recipe", {{"window", 2}, {"overlap", 2}}}}, "recipe.overlap", ""},
      {{{"recipe", {{"overlap", -1}}}}, "recipe.overlap", ""},
      {{{"recipe", {{"damp", 0}}}}, "recipe.damp", "positive"},
      {{{"recipe", {{"damp", "x"}}}}, "recipe.damp", "number"},
      {{{"recipe", {{"sym", 1}}}}, "recipe.sym", "true or false"},
      {{{"recipe", {{"seed", -1}}}}, "recipe.seed", ""},
      {{{"recipe", 4}}, "recipe", "object"},
      {{{"calib", {{"path", "/c"}, {"nsamples", 0}}}}, "calib.nsamples", "at least 1"},
      {{{"calib", {{"path", "/c"}, {"seqlen", 1}}}}, "calib.seqlen", "at least 2"},
      {{{"calib", {{"path", nullptr}, {"nsamples", 4}}}}, "calib.path", "required"},
      {{{"calib", {{"path", ""}}}}, "calib.path", "empty"},
      {{{"eval", {{"path", "/e"}, {"nsamples", -1}}}}, "eval.nsamples", ""},
      {{{"eval", {{"nsamples", 4}}}}, "eval.path", "required"},
      {{{"output", {{"path", "/o"}, {"format", "awq"}}}}, "output.format", ""},
      {{{"output", {{"path", "/o"}, {"overwrite", "yes"}}}}, "output.overwrite", ""},
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
  expect_error(j, "recipe.w_bit", "unknown key");
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

// ---- Calibration recipes (issue #5 part 3: one recipe schema for the CLI and the API).

json with_recipe(const json& recipe) {
  json j = minimal();
  j["recipe"] = recipe;
  return j;
}

TEST(JobSpec, CalibrationRecipeIsKeptAndRoundTrips) {
  const json cbq = {{"weight_solver", "lora-rounding"},
                    {"w_bits", 2},
                    {"w_group", 32},
                    {"reconstruction", "cbq"},
                    {"cbq_window", 2},
                    {"cbq_overlap", 1},
                    {"cbq_epochs", 3}};
  auto r = parse_job_spec(with_recipe(cbq));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  ASSERT_TRUE(r->recipe.calibration());
  EXPECT_EQ(*r->recipe.calib, cbq);
  EXPECT_EQ(r->recipe.method, "lora-rounding");  // display name
  EXPECT_EQ(r->recipe.w_bits, 2);
  EXPECT_EQ(r->output.format, "auto");  // the calibration default
  json j = r->to_json();
  EXPECT_EQ(j["recipe"], cbq);
  auto again = parse_job_spec(j);
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->to_json(), j);

  // The engine reads the same object.
  auto cr = calib_recipe_from_spec(*r);
  ASSERT_TRUE(cr.is_ok()) << cr.status().to_string();
  EXPECT_EQ(cr->weight_solver, calib::WeightSolver::kLoraRounding);
  EXPECT_EQ(cr->reconstruction, calib::Reconstruction::kCbq);
  EXPECT_EQ(cr->w_bits, 2);
  EXPECT_EQ(cr->w_group, 32);
  EXPECT_EQ(cr->cbq_window, 2);
  EXPECT_EQ(cr->cbq_overlap, 1);
  EXPECT_EQ(cr->cbq_epochs, 3);

  // Weight-only specs stay weight-only and the engine refuses to read them as calibration.
  auto w = parse_job_spec(full());
  ASSERT_TRUE(w.is_ok());
  EXPECT_FALSE(w->recipe.calibration());
  EXPECT_EQ(calib_recipe_from_spec(*w).status().code(), Code::kInvalidInput);
}

TEST(JobSpec, WhatMakesACalibrationRecipe) {
  struct Case {
    json recipe;
    bool calibration;
  };
  const std::vector<Case> cases = {
      {{{"method", "gptq"}, {"w_bits", 4}, {"group_size", 128}}, false},
      {{{"w_bits", 4}, {"seed", 3}}, false},  // keys both schemas have
      {{{"method", "quarot"}}, true},         // a transform as method
      {{{"transform", "smoothquant"}, {"w_bits", 8}, {"a_bits", 8}}, true},
      {{{"a_bits", 4}}, true},
      {{{"kv_bits", 4}}, true},
      {{{"reconstruction", "block"}}, true},
      {{{"intactkv", true}, {"method", "rtn"}}, true},
      {{{"w_group", 64}}, true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.recipe.dump());
    auto r = parse_job_spec(with_recipe(c.recipe));
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    EXPECT_EQ(r->recipe.calibration(), c.calibration);
  }
}

TEST(JobSpec, MethodIsTheClisAlias) {
  auto r = parse_job_spec(with_recipe({{"method", "flatquant"}, {"a_bits", 4}, {"kv_bits", 4}}));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ((*r->recipe.calib)["transform"], "flatquant");
  EXPECT_FALSE(r->recipe.calib->contains("method"));
  EXPECT_EQ(r->recipe.method, "flatquant");

  r = parse_job_spec(with_recipe({{"method", "gptq"}, {"a_bits", 8}}));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ((*r->recipe.calib)["weight_solver"], "gptq");
  auto cr = calib_recipe_from_spec(*r);
  ASSERT_TRUE(cr.is_ok()) << cr.status().to_string();
  EXPECT_EQ(cr->weight_solver, calib::WeightSolver::kGptq);
  EXPECT_EQ(cr->a_bits, 8);
  // Agreeing twice is fine; contradicting is not.
  EXPECT_TRUE(
      parse_job_spec(with_recipe({{"method", "quarot"}, {"transform", "quarot"}, {"a_bits", 4}}))
          .is_ok());
  expect_error(with_recipe({{"method", "gptq"}, {"weight_solver", "rtn"}, {"a_bits", 8}}),
               "recipe.weight_solver", "contradicts recipe.method 'gptq'");
  expect_error(with_recipe({{"method", "quarot"}, {"transform", "flatquant"}}), "recipe.transform",
               "contradicts");
  expect_error(with_recipe({{"method", "awq"}, {"a_bits", 8}}), "recipe.method", "flatquant");
  expect_error(with_recipe({{"method", 3}, {"a_bits", 8}}), "recipe.method", "string");
}

TEST(JobSpec, WeightOnlyKeysInACalibrationRecipeNameTheirCounterpart) {
  expect_error(with_recipe({{"a_bits", 4}, {"group_size", 128}}), "recipe.group_size",
               "use w_group");
  expect_error(with_recipe({{"reconstruction", "cbq"}, {"window", 2}}), "recipe.window",
               "use cbq_window");
  expect_error(with_recipe({{"reconstruction", "cbq"}, {"overlap", 1}}), "recipe.overlap",
               "because of reconstruction");
  expect_error(with_recipe({{"method", "quarot"}, {"damp", 0.1}}), "recipe.damp", "gptq.percdamp");
  // Neither schema's key: a typo, listing both.
  expect_error(with_recipe({{"a_bitz", 4}}), "recipe.a_bitz", "calibration recipes: transform");
}

TEST(JobSpec, OutputFormatsOfTheTwoForms) {
  json j = with_recipe({{"a_bits", 8}});
  for (const char* f : {"auto", "native", "gptq", "compressed-tensors"}) {
    j["output"]["format"] = f;
    auto r = parse_job_spec(j);
    ASSERT_TRUE(r.is_ok()) << f << ": " << r.status().to_string();
    EXPECT_EQ(r->output.format, f);
  }
  j["output"]["format"] = "awq";
  expect_error(j, "output.format", "auto, native, gptq or compressed-tensors");
  json w = minimal();
  w["output"]["format"] = "native";
  expect_error(w, "output.format", "calibration recipes");
  EXPECT_EQ(parse_job_spec(minimal())->output.format, "gptq");  // unchanged default
}

// The engine's checks, named under "recipe." (what POST /v1/jobs answers with 400).
TEST(JobSpec, NonsenseCalibrationRecipesAreRefusedNamingTheField) {
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
      {{{"intactkv_prefix", {1}}}, "recipe.intactkv_prefix", "without intactkv"},
      {{{"intactkv", true}, {"intactkv_prefix", {-1}}}, "recipe.intactkv_prefix", ""},
      {{{"reconstruction", "global"}}, "recipe.reconstruction", "global"},
      {{{"gptq", {{"blocksize", 0}}}, {"a_bits", 8}}, "recipe.gptq.blocksize", ""},
      {{{"gptq", {{"damp", 0.1}}}, {"a_bits", 8}}, "recipe.gptq.damp", "unknown key"},
      {{{"w_bits", 16}, {"a_bits", 16}, {"kv_bits", 16}}, "recipe.w_bits", "nothing to quantize"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.recipe.dump());
    auto s = parse_job_spec(with_recipe(c.recipe));
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();  // the key set is fine
    auto r = calib_recipe_from_spec(*s);
    ASSERT_FALSE(r.is_ok());
    EXPECT_EQ(r.status().code(), Code::kInvalidInput);
    EXPECT_EQ(r.status().message().rfind(c.field, 0), 0u) << r.status().message();
    if (!c.also.empty()) {
      EXPECT_NE(r.status().message().find(c.also), std::string::npos) << r.status().message();
    }
  }
}

// The job spec's key list is the calibration schema's: every key CalibRecipe writes
// is accepted, and every key accepted is one it writes.
TEST(JobSpec, CalibrationKeysAreTheEnginesSchema) {
  std::set<std::string> engine;
  const json full_recipe = calib::CalibRecipe{}.to_json();
  for (auto it = full_recipe.begin(); it != full_recipe.end(); ++it) engine.insert(it.key());
  const std::set<std::string> ours(calib_recipe_keys().begin(), calib_recipe_keys().end());
  EXPECT_EQ(ours, engine);
  // A recipe written by the engine (every default) is a calibration spec that reads back.
  json r = full_recipe;
  r["a_bits"] = 8;
  auto s = parse_job_spec(with_recipe(r));
  ASSERT_TRUE(s.is_ok()) << s.status().to_string();
  EXPECT_TRUE(s->recipe.calibration());
  auto cr = calib_recipe_from_spec(*s);
  ASSERT_TRUE(cr.is_ok()) << cr.status().to_string();
  EXPECT_EQ(cr->to_json(), r);
}

TEST(JobSpec, PriorityNames) {
  EXPECT_STREQ(priority_name(Priority::kHigh), "high");
  EXPECT_STREQ(priority_name(Priority::kNormal), "normal");
  EXPECT_STREQ(priority_name(Priority::kLow), "low");
}

}  // namespace
}  // namespace qcal

// Job spec parsing and validation (pure: no Redis).
#include <gtest/gtest.h>

#include <string>

#include "common/job_spec.h"

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

TEST(JobSpec, PriorityNames) {
  EXPECT_STREQ(priority_name(Priority::kHigh), "high");
  EXPECT_STREQ(priority_name(Priority::kNormal), "normal");
  EXPECT_STREQ(priority_name(Priority::kLow), "low");
}

}  // namespace
}  // namespace qcal

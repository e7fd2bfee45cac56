// labels: unit
// The assemble task (worker/pipeline.cc run_assemble, through run_task) on
// inputs drawn from common/rng.h: block results (qcal.block v1), SpinQuant's
// rotations, the IntactKV prefix states and +Cal's trained cache, next to a
// generated BF16 checkpoint. Its output is byte-identical to what the
// whole-model assemble wrote before it streamed (golden digests recorded from
// that build, issue #10 part 2): native QuaRot W4A4KV4 with IntactKV (FP and
// +Cal; and with a vocabulary of 70000, above one block of head rows and one
// piece of lm_head rows for the prefix logits), native FlatQuant W4A4KV4, GPTQ QuaRot W4A16
// (folds), weight-only GPTQ (act-order), compressed-tensors SpinQuant W8 (tied, mean-subtracted
// embedding: untied on output) and weight-only asymmetric compressed-tensors.
//
// No input comes from calibration, so the digests change only when assemble's
// output does. The recipe each output records (qcal_quant.json "recipe",
// config.json / quantize_config.json "qcal_recipe") is checked to equal the
// job's recipe and then left out of the digest, so that a new recipe option
// elsewhere does not move it; everything else is digested byte for byte (JSON
// files are first checked to be exactly their own dump(2) + "\n").
//
// Letters: L layers, H hidden, I intermediate, V vocab, P IntactKV prefix
// length, K = n_kv·d.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/job_spec.h"
#include "common/model_dir.h"
#include "common/output_manifest.h"
#include "common/plan.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "tests/unit/assemble_fixture.h"
#include "tests/unit/test_util.h"
#include "worker/artifacts.h"
#include "worker/calib/block.h"
#include "worker/tasks.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace qcal::assemble_fixture;
using qcal::testing::TempDir;

// Native outputs are written layer by layer; GPTQ / compressed-tensors modules in
// the order of their names as strings (layers 0, 1, 10, 2, ...): 11 layers there.
int64_t layers_of(const std::string& format) { return format == "native" ? 3 : 11; }

// ---------------------------------------------------------------- the checkpoint

struct Source {
  bool bias = false;  // q/k/v bias
  bool tied = false;  // no lm_head.weight
  int64_t layers = 3;
  int64_t vocab = 128;
};

ModelConfig source_config(const Source& s) {
  ModelConfig c = qcal::testing::small_config(128, s.vocab, s.layers);
  c.attention_bias = s.bias;
  c.tie_word_embeddings = s.tied;
  c.torch_dtype = DType::kBF16;
  return c;
}

struct Case {
  const char* name;
  Source source;
  json recipe;  // the job's recipe (parse_job_spec form)
  const char* format;
  bool act_order = false;   // the block results' linears
  bool online = false;      // online transforms and act/KV quantizers in the blocks
  const char* golden = "";  // digest of the whole-model assemble's output
};

// ---------------------------------------------------------------- the digest

// Replaces every member "recipe" / "qcal_recipe" of `j` by "<recipe>" after checking
// it equals `recipe`; counts the replacements.
int strip_recipe(json* j, const json& recipe) {
  if (!j->is_object()) return 0;
  int n = 0;
  for (auto it = j->begin(); it != j->end(); ++it) {
    if (it.key() == "recipe" || it.key() == "qcal_recipe") {
      EXPECT_EQ(it.value(), recipe) << it.key();
      it.value() = "<recipe>";
      ++n;
    } else {
      n += strip_recipe(&it.value(), recipe);
    }
  }
  return n;
}

// SHA-256 of the lines "<file> <sha256>\n" over the output's files in name order
// (the publishing manifest and generation_config.json aside); JSON files that
// record the recipe are digested with it replaced (`recipes`: how many must).
// `listing` receives the lines.
std::string output_digest(const std::string& dir, const json& recipe, int want_recipes,
                          std::string* listing) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != kOutputManifestName &&
        e.path().filename() != "generation_config.json")
      files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  std::string lines;
  int recipes = 0;
  for (const std::string& f : files) {
    auto bytes = read_file(join_path(dir, f));
    EXPECT_TRUE(bytes.is_ok()) << f;
    if (!bytes.is_ok()) continue;
    std::string body = *bytes;
    if (f.ends_with(".json")) {
      json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
      EXPECT_FALSE(j.is_discarded()) << f;
      const int n = strip_recipe(&j, recipe);
      if (n > 0) {
        auto again = json::parse(body);
        EXPECT_EQ(body, again.dump(2) + "\n") << f << " is not its own dump(2)";
        body = j.dump(2) + "\n";
        recipes += n;
      }
    }
    lines += f + " " + sha256_hex(body) + "\n";
  }
  EXPECT_EQ(recipes, want_recipes) << "files recording the recipe";
  if (listing) *listing = lines;
  return sha256_hex(lines);
}

// ---------------------------------------------------------------- the cases

const Case kCases[] = {
    {"native_quarot_w4a4kv4_intactkv",
     {},
     {{"transform", "quarot"},
      {"w_bits", 4},
      {"a_bits", 4},
      {"kv_bits", 4},
      {"intactkv", true},
      {"intactkv_prefix", {1, 5}}},
     "native",
     false,
     true,
     "771e7889995cdad2ce5974ac295c0126eb14e106a2f7d6a633e29b72742d3408"},
    {"native_quarot_w4a4kv4_intactkv_cal_meansub_tied",
     {false, true},
     {{"transform", "quarot"},
      {"w_bits", 4},
      {"w_group", 32},
      {"a_bits", 4},
      {"kv_bits", 4},
      {"intactkv", true},
      {"intactkv_cal", true},
      {"embed_mean_sub", true}},
     "native",
     false,
     true,
     "11876c7e86c3ef13e458147e32f1ac03dc2266d712cf93e4ee6bc7fc6308c6cc"},
    // A vocabulary above one block of head rows (4096) and one piece of prefix-logit
    // rows (65536 at hidden 64): the head rows on their grid, lm_head by pieces.
    {"native_quarot_w4a4kv4_intactkv_vocab70000",
     {false, false, 3, 70000},
     {{"transform", "quarot"}, {"w_bits", 4}, {"a_bits", 4}, {"kv_bits", 4}, {"intactkv", true}},
     "native",
     false,
     true,
     "16ff4fc0ec5633458e7dee0ba34e84075069264c0bad3d83a7a547903968272c"},
    {"native_flatquant_w4a4kv4_bias",
     {true, false},
     {{"transform", "flatquant"}, {"w_bits", 4}, {"a_bits", 4}, {"kv_bits", 4}},
     "native",
     false,
     true,
     "49a7dc772fb68731e4743f262bd336c3e60a82499577d4fc9d34c32a33382b30"},
    {"gptq_quarot_w4a16_bias",
     {true, false},
     // GPTQ's column order as when the digests were recorded (the defaults are now
     // act-order with static groups, which the output's quantization_config names).
     {{"transform", "quarot"},
      {"weight_solver", "gptq"},
      {"w_bits", 4},
      {"w_group", 32},
      {"gptq", {{"act_order", false}, {"static_groups", false}}}},
     "gptq",
     false,
     false,
     "5cb9ffb89bdc9bea1280194f7155b5c38f256bbb1b0e35ff7df14316db1285ed"},
    {"gptq_weight_only_act_order",
     {},
     {{"weight_solver", "gptq"},
      {"w_bits", 4},
      {"w_group", 32},
      {"gptq", {{"act_order", true}, {"static_groups", false}}}},
     "gptq",
     true,
     false,
     "0682b699c312756e0e659444be7689252bb40d3b70f2ace90fa9a4fb332b37c8"},
    {"ct_spinquant_w8_tied_meansub",
     {false, true},
     {{"transform", "spinquant"}, {"w_bits", 8}, {"embed_mean_sub", true}},
     "compressed-tensors",
     false,
     false,
     "6c0601917ab20dfaa6b49ee0c465a7593f847d47d86b601a0e055c74045adce8"},
    {"ct_weight_only_asym",
     {true, false},
     {{"weight_solver", "rtn"}, {"w_bits", 4}, {"w_group", 32}, {"w_sym", false}},
     "compressed-tensors",
     false,
     false,
     "2a7757556034928149a5ea4628179e624bfe54165d49ca9fbb2d702f58484f5e"},
};

class AssembleGolden : public ::testing::TestWithParam<Case> {};

TEST_P(AssembleGolden, OutputEqualsTheWholeModelAssemble) {
  const Case& k = GetParam();
  TempDir tmp("qcal_asm_");
  Source src = k.source;
  src.layers = layers_of(k.format);
  const ModelConfig c = source_config(src);
  write_source(tmp.sub("model"), c);
  ASSERT_TRUE(write_file_atomic(tmp.sub("calib.jsonl"), "{\"tokens\": [1, 2, 3]}\n").is_ok());
  const std::string out = tmp.sub("out");
  json sj = {{"model", tmp.sub("model")},
             {"recipe", k.recipe},
             {"calib", {{"path", tmp.sub("calib.jsonl")}, {"seqlen", 4}}},
             {"output", {{"path", out}, {"format", k.format}}}};
  auto spec = parse_job_spec(sj);
  ASSERT_TRUE(spec.is_ok()) << spec.status().to_string();
  const Recipe& r = spec->recipe;
  ASSERT_TRUE(r.validate_for(c, true).is_ok());

  ArtifactStore store(tmp.sub("store"));
  TaskContext ctx;
  ctx.job_id = "job";
  ctx.spec = *spec;
  ctx.store = &store;
  ctx.task.id = plan::kAssemble;
  ctx.task.type = plan::kAssemble;
  ctx.task.params = {{"format", k.format}};
  ctx.deps = make_inputs(BlockStyle{k.act_order, k.online}, r, c, &store, &ctx.task.deps);
  auto res = run_task(ctx);
  ASSERT_TRUE(res.is_ok()) << res.status().to_string();
  EXPECT_EQ((*res)["output"], out);
  EXPECT_EQ((*res)["format"], k.format);
  EXPECT_EQ((*res)["layers"], c.num_hidden_layers);

  std::string listing;
  // native: qcal_quant.json; GPTQ: config.json and quantize_config.json;
  // compressed-tensors records none.
  const std::string fmt = k.format;
  const int want_recipes = fmt == "native" ? 1 : fmt == "gptq" ? 2 : 0;
  const std::string got = output_digest(out, r.to_json(), want_recipes, &listing);
  EXPECT_EQ(got, k.golden) << k.name << " files:\n" << listing;
}

INSTANTIATE_TEST_SUITE_P(Formats, AssembleGolden, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace qcal

// The planner on LLaMA-3-70B- and LLaMA-3.1-405B-shaped checkpoints (issue #10,
// the first "Done means"): sparse files with real safetensors headers and an
// index, their data ftruncate'd (no disk used; nothing is read), planned for
// 128 × 2048 calibration tokens on workers of 80 GiB. Every layer-wise recipe is
// accepted with every task's estimate ≤ 64 GiB (the row of docs/PERFORMANCE.md
// "70B / 405B plans" printed per recipe); the whole-model tasks (SpinQuant,
// IntactKV+Cal) are refused with the numbers.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "common/model_dir.h"
#include "common/plan.h"
#include "common/planner.h"
#include "tests/unit/test_util.h"

namespace qcal {
namespace {

using nlohmann::json;

constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kMiB = 1ull << 20;
constexpr int64_t kCalibSeqs = 128, kCalibT = 2048;

struct Shape {
  const char* name;
  int64_t L, H, I, heads, kv_heads, V, shards;
};
constexpr Shape k70B = {"70B", 80, 8192, 28672, 64, 8, 128256, 28};
constexpr Shape k405B = {"405B", 126, 16384, 53248, 128, 8, 128256, 191};

// Writes config.json, `shards` safetensors files (bf16; header real, data a hole)
// and model.safetensors.index.json.
void write_sparse_checkpoint(const Shape& s, const std::string& dir) {
  ModelConfig c;
  c.hidden_size = s.H;
  c.intermediate_size = s.I;
  c.num_hidden_layers = s.L;
  c.num_attention_heads = s.heads;
  c.num_key_value_heads = s.kv_heads;
  c.head_dim = s.H / s.heads;
  c.vocab_size = s.V;
  c.max_position_embeddings = 131072;
  c.rope_theta = 500000.0;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 128000;
  c.eos_token_id = 128001;
  c.torch_dtype = DType::kBF16;
  std::ofstream(dir + "/config.json") << c.to_json().dump(2);

  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;
  tensors.push_back({"model.embed_tokens.weight", {s.V, s.H}});
  for (int64_t l = 0; l < s.L; ++l) {
    const std::string p = layer_prefix(l);
    tensors.push_back({p + "input_layernorm.weight", {s.H}});
    tensors.push_back({p + "post_attention_layernorm.weight", {s.H}});
    for (const char* proj : kProjNames)
      tensors.push_back({p + proj + ".weight", proj_shape(c, proj)});
  }
  tensors.push_back({"model.norm.weight", {s.H}});
  tensors.push_back({"lm_head.weight", {s.V, s.H}});

  // Contiguous runs of tensors per shard, about equal in count.
  json weight_map = json::object();
  const size_t per =
      (tensors.size() + static_cast<size_t>(s.shards) - 1) / static_cast<size_t>(s.shards);
  for (int64_t k = 0; k < s.shards; ++k) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05lld-of-%05lld.safetensors",
                  static_cast<long long>(k + 1), static_cast<long long>(s.shards));
    json header = json::object();
    uint64_t off = 0;
    for (size_t i = static_cast<size_t>(k) * per; i < std::min(tensors.size(), (k + 1) * per);
         ++i) {
      uint64_t n = 2;
      for (int64_t d : tensors[i].second) n *= static_cast<uint64_t>(d);
      header[tensors[i].first] = {
          {"dtype", "BF16"}, {"shape", tensors[i].second}, {"data_offsets", {off, off + n}}};
      weight_map[tensors[i].first] = fname;
      off += n;
    }
    header["__metadata__"] = {{"format", "pt"}};
    std::string h = header.dump();
    h.append((8 - h.size() % 8) % 8, ' ');
    const std::string path = dir + "/" + fname;
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr) << path;
    const uint64_t len = h.size();
    unsigned char le[8];
    for (int b = 0; b < 8; ++b) le[b] = static_cast<unsigned char>(len >> (8 * b));
    ASSERT_EQ(std::fwrite(le, 1, 8, f), 8u);
    ASSERT_EQ(std::fwrite(h.data(), 1, h.size(), f), h.size());
    ASSERT_EQ(std::fclose(f), 0);
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(8 + len + off)), 0) << path;
  }
  std::ofstream(dir + "/model.safetensors.index.json")
      << json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump();
}

struct Case {
  const char* name;
  json recipe;
};
const Case kFlatGptq = {
    "FlatQuant W4A4KV4 + GPTQ",
    {{"transform", "flatquant"}, {"weight_solver", "gptq"}, {"a_bits", 4}, {"kv_bits", 4}}};
const Case kFlatCbq = {"FlatQuant + CBQ(2,1) + IntactKV W4A4KV4",
                       {{"transform", "flatquant"},
                        {"reconstruction", "cbq"},
                        {"cbq_window", 2},
                        {"cbq_overlap", 1},
                        {"intactkv", true},
                        {"a_bits", 4},
                        {"kv_bits", 4}}};
const Case kGptq = {"GPTQ W4 g128", {{"weight_solver", "gptq"}, {"w_group", 128}}};
const Case kQuaRot = {"QuaRot W4A4KV4", {{"transform", "quarot"}, {"a_bits", 4}, {"kv_bits", 4}}};

class PlanLarge : public ::testing::Test {
 public:
  static void SetUpTestSuite() {
    tmp_ = new qcal::testing::TempDir("qcal_plan_large_");
    for (const Shape* s : {&k70B, &k405B}) {
      const std::string dir = tmp_->sub(s->name);
      ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
      write_sparse_checkpoint(*s, dir);
    }
    // 128 × 2048 tokens (u32, a hole too: the planner reads only its size).
    const std::string calib = tmp_->sub("calib.u32");
    std::fclose(std::fopen(calib.c_str(), "wb"));
    ASSERT_EQ(::truncate(calib.c_str(), kCalibSeqs * kCalibT * 4), 0);
  }
  static void TearDownTestSuite() { delete tmp_; }

  static JobSpec spec(const Shape& s, const json& recipe) {
    JobSpec j;
    j.model = tmp_->sub(s.name);
    auto r = recipe_from_json(recipe);
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    if (r.is_ok()) j.recipe = *r;
    j.calib = {tmp_->sub("calib.u32"), kCalibSeqs, kCalibT};
    j.output.path = tmp_->sub(std::string("out-") + s.name);
    return j;
  }
  static PlannerLimits limits() {
    PlannerLimits l;
    l.worker_memory_bytes = 80 * kGiB;
    return l;
  }
  static qcal::testing::TempDir* tmp_;
};
qcal::testing::TempDir* PlanLarge::tmp_ = nullptr;

TEST_F(PlanLarge, TheCheckpointsHaveTheirShapes) {
  auto d70 = ModelDir::open(tmp_->sub("70B"));
  ASSERT_TRUE(d70.is_ok()) << d70.status().to_string();
  EXPECT_TRUE((*d70)->validate_fp_model().is_ok());
  // 70.6 B parameters in bf16.
  EXPECT_NEAR(static_cast<double>((*d70)->total_bytes()) / 2e9, 70.55, 0.05);
  auto d405 = ModelDir::open(tmp_->sub("405B"));
  ASSERT_TRUE(d405.is_ok()) << d405.status().to_string();
  EXPECT_NEAR(static_cast<double>((*d405)->total_bytes()) / 2e9, 405.85, 0.1);
}

// Plans `c` for `s` on 80 GiB workers, prints its row of the doc table and returns it.
Plan plan_row(const Shape& s, const Case& c) {
  auto plan = plan_job(PlanLarge::spec(s, c.recipe), PlanLarge::limits());
  EXPECT_TRUE(plan.is_ok()) << s.name << " " << c.name << ": " << plan.status().to_string();
  if (!plan.is_ok()) return Plan{};
  const json& sum = plan->summary;
  const std::string peak = sum["peak"]["task"].get<std::string>();
  std::printf("| %s | %s | %lld | %lld | %s %s | %s |\n", s.name, c.name,
              static_cast<long long>(sum["tasks"].get<int64_t>()),
              static_cast<long long>(sum["critical_path"].get<int64_t>()), peak.c_str(),
              format_bytes(sum["peak"]["bytes"].get<uint64_t>()).c_str(),
              format_bytes(sum["store_bytes"].get<uint64_t>()).c_str());
  std::printf("    %s: %s\n", peak.c_str(), sum["estimates"][peak].dump().c_str());
  std::fflush(stdout);
  EXPECT_EQ(sum["tasks"].get<size_t>(), plan->tasks.size());
  return std::move(plan).value();
}

// The tasks of `p` whose estimate exceeds 64 GiB.
std::vector<std::string> over_64(const Plan& p) {
  std::vector<std::string> ids;
  for (const TaskDef& t : p.tasks)
    if (t.mem_bytes > 64 * kGiB) ids.push_back(t.id);
  return ids;
}

TEST_F(PlanLarge, LayerWiseRecipesFitWith64GiBTasks) {
  std::printf("| model | recipe | tasks | critical path (tasks) | peak task | store |\n");
  for (const Shape* s : {&k70B, &k405B})
    for (const Case* c : {&kGptq, &kFlatGptq, &kQuaRot}) {
      const Plan p = plan_row(*s, *c);
      EXPECT_EQ(over_64(p), std::vector<std::string>{}) << s->name << " " << c->name;
      EXPECT_GE(p.summary["peak"]["bytes"].get<uint64_t>(), 1 * kGiB);
    }
  const Plan cbq = plan_row(k70B, kFlatCbq);
  EXPECT_EQ(over_64(cbq), std::vector<std::string>{});
  EXPECT_EQ(cbq.summary["windows"].get<int64_t>(), 79);
  // With the logit loss the last window also holds the FP head (lm_head 128256 × 8192 in
  // fp32, 3.9 GiB), and only the last window does.
  Case logit = kFlatCbq;
  logit.recipe["cbq_logit_loss"] = 1.0;
  const Plan lp = plan_row(k70B, logit);
  EXPECT_EQ(over_64(lp), std::vector<std::string>{});
  const json& est = lp.summary["estimates"];
  const uint64_t last = est["cbq-window-0078"]["total"].get<uint64_t>();
  const uint64_t last_plain = cbq.summary["estimates"]["cbq-window-0078"]["total"].get<uint64_t>();
  std::printf("70B last window: %.1f GiB with the logit loss, %.1f GiB without\n",
              static_cast<double>(last) / kGiB, static_cast<double>(last_plain) / kGiB);
  EXPECT_GE(last - last_plain, 128256ull * 8192 * 4);
  EXPECT_LT(last - last_plain, 128256ull * 8192 * 4 + 256 * kMiB);
  EXPECT_EQ(est["cbq-window-0000"]["total"], cbq.summary["estimates"]["cbq-window-0000"]["total"]);
}

// 405B FlatQuant: a block's transform task holds its linears three times in fp32 (the
// checkpoint's, the transformed W3 and the fake-quantized W4: 35.6 GiB at 405B) beside
// the training's activations, under 64 GiB.
TEST_F(PlanLarge, FlatQuantOf405BTransformTasksFit) {
  const Plan p = plan_row(k405B, kFlatGptq);
  const json& e = p.summary["estimates"]["flatquant-0000"];
  std::printf("405B flatquant-0000: %s\n", e.dump().c_str());
  EXPECT_GT(e["total"].get<uint64_t>(), 36 * kGiB);
  EXPECT_LE(e["total"].get<uint64_t>(), 64 * kGiB);
}

// 405B CBQ(2, 1): refused with the numbers (a window's fp32 copies of each block: the
// deployed weights, the CFP base, Ŵ and the weight gradients), naming the window that
// fits the workers.
TEST_F(PlanLarge, CbqOf405BIsRefusedWithTheNumbers) {
  auto plan = plan_job(spec(k405B, kFlatCbq.recipe), limits());
  ASSERT_FALSE(plan.is_ok());
  EXPECT_EQ(plan.status().code(), Code::kResourceExhausted);
  const std::string& m = plan.status().message();
  std::printf("405B %s: %s\n", kFlatCbq.name, m.c_str());
  EXPECT_EQ(m.rfind("cbq-window-0000 needs ", 0), 0u) << m;
  EXPECT_NE(m.find("train/weights "), std::string::npos) << m;
  EXPECT_NE(m.find("but workers have 80.0 GiB"), std::string::npos) << m;
  EXPECT_NE(m.find("lower recipe.cbq_window (a one-block window needs "), std::string::npos) << m;
}

TEST_F(PlanLarge, WholeModelTasksAreRefusedWithTheNumbers) {
  for (const Shape* s : {&k70B, &k405B}) {
    auto spin = plan_job(spec(*s, {{"transform", "spinquant"}, {"a_bits", 4}}), limits());
    ASSERT_FALSE(spin.is_ok()) << s->name;
    EXPECT_EQ(spin.status().code(), Code::kResourceExhausted);
    std::printf("%s spinquant: %s\n", s->name, spin.status().message().c_str());
    EXPECT_NE(spin.status().message().find("spinquant needs "), std::string::npos);
    EXPECT_NE(spin.status().message().find("but workers have 80.0 GiB"), std::string::npos);
    EXPECT_NE(spin.status().message().find("learns over the whole model"), std::string::npos);

    auto cal = plan_job(spec(*s, {{"transform", "flatquant"},
                                  {"intactkv", true},
                                  {"intactkv_cal", true},
                                  {"a_bits", 4},
                                  {"kv_bits", 4}}),
                        limits());
    ASSERT_FALSE(cal.is_ok()) << s->name;
    EXPECT_EQ(cal.status().code(), Code::kResourceExhausted);
    std::printf("%s intactkv-cal: %s\n", s->name, cal.status().message().c_str());
    EXPECT_NE(cal.status().message().find("intactkv-cal needs "), std::string::npos);
    EXPECT_NE(cal.status().message().find("model "), std::string::npos);
  }
  std::fflush(stdout);
}

}  // namespace
}  // namespace qcal

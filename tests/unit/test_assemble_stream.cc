// labels: unit
// The assemble task (worker/pipeline.cc run_assemble, through run_task) on
// inputs drawn from common/rng.h: block results (qcal.block v1), SpinQuant's
// rotations, the IntactKV prefix states and +Cal's trained cache, next to a
// generated BF16 checkpoint. Its output is byte-identical to what the
// whole-model assemble wrote before it streamed (golden digests recorded from
// that build, issue #10 part 2): native QuaRot W4A4KV4 with IntactKV (FP and
// +Cal), native FlatQuant W4A4KV4, GPTQ QuaRot W4A16 (folds), weight-only
// GPTQ (act-order), compressed-tensors SpinQuant W8 (tied, mean-subtracted
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
#include "tests/unit/test_util.h"
#include "worker/artifacts.h"
#include "worker/calib/block.h"
#include "worker/tasks.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using qcal::testing::TempDir;

// Native outputs are written layer by layer; GPTQ / compressed-tensors modules in
// the order of their names as strings (layers 0, 1, 10, 2, ...): 11 layers there.
int64_t layers_of(const std::string& format) { return format == "native" ? 3 : 11; }

// FNV-1a-64 of `seed` then `name`: one random stream per tensor.
uint64_t stream_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto feed = [&](unsigned char b) { h = (h ^ b) * 0x100000001b3ull; };
  for (int i = 0; i < 8; ++i) feed(static_cast<unsigned char>(seed >> (8 * i)));
  for (char ch : name) feed(static_cast<unsigned char>(ch));
  return h;
}

std::vector<float> normal_values(uint64_t seed, const std::string& name, int64_t n, double mean,
                                 double sd) {
  Rng rng(stream_seed(seed, name));
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(mean + sd * rng.normal());
  return v;
}

// ---------------------------------------------------------------- the checkpoint

struct Source {
  bool bias = false;  // q/k/v bias
  bool tied = false;  // no lm_head.weight
  int64_t layers = 3;
};

ModelConfig source_config(const Source& s) {
  ModelConfig c = qcal::testing::small_config(128, 128, s.layers);
  c.attention_bias = s.bias;
  c.tie_word_embeddings = s.tied;
  c.torch_dtype = DType::kBF16;
  return c;
}

// config.json, model.safetensors (BF16, model order), generation_config.json,
// tokenizer.json.
void write_source(const std::string& dir, const ModelConfig& c) {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  t.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = layer_prefix(l);
    t.push_back({p + "input_layernorm.weight", {H}});
    t.push_back({p + "post_attention_layernorm.weight", {H}});
    for (int k = 0; k < 7; ++k) {
      const std::vector<int64_t> s = proj_shape(c, kProjNames[k]);
      t.push_back({p + kProjNames[k] + ".weight", s});
      if (k < 3 && c.attention_bias) t.push_back({p + kProjNames[k] + ".bias", {s[0]}});
    }
  }
  t.push_back({"model.norm.weight", {H}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {V, H}});
  SafetensorsWriter w(join_path(dir, "model.safetensors"));
  w.set_metadata("format", "pt");
  for (const auto& [name, shape] : t) w.add(name, c.torch_dtype, shape);
  ASSERT_TRUE(w.begin().is_ok());
  for (const auto& [name, shape] : t) {
    const bool norm = name.ends_with("norm.weight");
    const std::vector<float> v =
        normal_values(11, name, Tensor::count(shape), norm ? 1.0 : 0.0, norm ? 0.2 : 0.05);
    ASSERT_TRUE(w.write_f32(v.data(), v.size()).is_ok()) << name;
  }
  ASSERT_TRUE(w.finish().is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "config.json"), c.to_json().dump(2) + "\n").is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "generation_config.json"),
                                R"({"bos_token_id": 1, "eos_token_id": 2})")
                  .is_ok());
  ASSERT_TRUE(write_file_atomic(join_path(dir, "tokenizer.json"),
                                R"({"version": "1.0", "model": {"type": "BPE"}})")
                  .is_ok());
}

// ---------------------------------------------------------------- the inputs

// Which online transforms a case's blocks carry, with their sides.
std::map<std::string, int64_t> online_of(const std::string& transform, const ModelConfig& c,
                                         bool online) {
  if (!online) return {};
  if (transform == "quarot")
    return {{"po", c.num_attention_heads},
            {"d1", c.intermediate_size},
            {"pk", c.head_dim},
            {"pk_it", c.head_dim}};
  if (transform == "flatquant")
    return {{"a1", 8}, {"a2", 8},  {"u1", 8},          {"u2", 8},
            {"d1", 8}, {"d2", 16}, {"pk", c.head_dim}, {"pk_it", c.head_dim}};
  return {};
}

void set_online(calib::BlockTransformsT<float>* t, const std::string& name, std::vector<float> m) {
  if (name == "a1") t->a1 = std::move(m);
  if (name == "a2") t->a2 = std::move(m);
  if (name == "u1") t->u1 = std::move(m);
  if (name == "u2") t->u2 = std::move(m);
  if (name == "d1") t->d1 = std::move(m);
  if (name == "d2") t->d2 = std::move(m);
  if (name == "po") t->po = std::move(m);
  if (name == "pk") t->pk = std::move(m);
  if (name == "pk_it") t->pk_it = std::move(m);
}

// A consistent quantized linear (O, I) of its own stream: codes in [0, 2^b − 1],
// fp16-representable scales, zeros 2^(b−1) when symmetric, g_idx permuted groups
// under act-order.
QuantizedLinear make_linear(int64_t O, int64_t I, const QuantSpec& spec, bool act_order,
                            uint64_t seed, const std::string& name) {
  Rng rng(stream_seed(seed, name));
  QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec = spec;
  q.act_order = act_order;
  const int64_t gs = spec.group_size > 0 && spec.group_size < I ? spec.group_size : I;
  const int64_t G = (I + gs - 1) / gs;
  const int maxq = (1 << spec.bits) - 1;
  q.q.resize(static_cast<size_t>(O * I));
  for (auto& v : q.q) v = static_cast<uint8_t>(rng.below(static_cast<uint64_t>(maxq) + 1));
  q.scales.resize(static_cast<size_t>(G * O));
  for (auto& s : q.scales)
    s = round_to_dtype(static_cast<float>(1e-3 + 0.05 * rng.uniform()), DType::kF16);
  q.zeros.resize(static_cast<size_t>(G * O));
  for (auto& z : q.zeros)
    z = spec.sym ? (1 << (spec.bits - 1))
                 : static_cast<int32_t>(rng.below(static_cast<uint64_t>(maxq) + 1));
  q.g_idx.resize(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) q.g_idx[i] = static_cast<int32_t>(i / gs);
  if (act_order)
    for (int64_t i = I - 1; i > 0; --i)
      std::swap(q.g_idx[i], q.g_idx[rng.below(static_cast<uint64_t>(i) + 1)]);
  return q;
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

calib::NativeActQuant act_quant(int bits, bool sym, int64_t group, float clip) {
  calib::NativeActQuant a;
  a.bits = bits;
  a.sym = sym;
  a.group = group;
  a.clip = clip;
  return a;
}

// Block result l of a case: its linears at the recipe's bits / group / symmetry,
// norms, biases, online transforms and quantizers, and the FP prefix K/V.
calib::BlockResult make_block(const Case& k, const Recipe& r, const ModelConfig& c, int64_t l) {
  const uint64_t seed = 100 + static_cast<uint64_t>(l);
  calib::BlockResult b;
  b.layer = l;
  b.w_bits = r.w_bits();
  QuantSpec spec;
  spec.bits = r.w_bits();
  spec.group_size = r.w_group() > 0 ? r.w_group() : -1;
  spec.sym = r.w_sym();
  for (int p = 0; p < calib::kNumProj; ++p) {
    const std::vector<int64_t> s = proj_shape(c, kProjNames[p]);
    b.q[p] = make_linear(s[0], s[1], spec, k.act_order, seed, kProjNames[p]);
  }
  const int64_t H = c.hidden_size, K = c.kv_dim();
  b.input_norm = normal_values(seed, "input_norm", H, 1.0, 0.3);
  b.post_norm = normal_values(seed, "post_norm", H, 1.0, 0.3);
  if (c.attention_bias) {
    b.bias[0] = normal_values(seed, "q_bias", c.q_dim(), 0.0, 0.1);
    b.bias[1] = normal_values(seed, "k_bias", K, 0.0, 0.1);
    b.bias[2] = normal_values(seed, "v_bias", K, 0.0, 0.1);
  }
  for (const auto& [name, side] : online_of(r.transform(), c, k.online))
    set_online(&b.online, name, normal_values(seed, "online." + name, side * side, 0.0, 0.2));
  if (k.online) {
    for (int p = 0; p < calib::kNumProj; ++p) b.act[p] = act_quant(r.a_bits(), true, -1, 0.9f);
    b.k = act_quant(r.kv_bits(), false, c.head_dim, 0.95f);
    b.v = act_quant(r.kv_bits(), false, c.head_dim, 1.0f);
  }
  if (r.intactkv()) {
    const int64_t P = static_cast<int64_t>(r.intactkv_prefix_for(c).size());
    b.prefix_k = normal_values(seed, "prefix_k", P * K, 0.0, 1.0);
    b.prefix_v = normal_values(seed, "prefix_v", P * K, 0.0, 1.0);
  }
  b.report = {{"layer", l}};
  return b;
}

// ArtifactRef of a file already under the store.
ArtifactRef ref_of(const ArtifactStore& store, const std::string& rel) {
  auto d = sha256_file(store.absolute(rel));
  EXPECT_TRUE(d.is_ok()) << d.status().to_string();
  return ArtifactRef{rel, d.is_ok() ? d->sha256 : std::string(64, '0'), d.is_ok() ? d->bytes : 0};
}

// Writes every input the assemble of `k` reads into `store`; returns the results of
// its deps by task id, and the deps in `deps`.
std::map<std::string, json> make_inputs(const Case& k, const Recipe& r, const ModelConfig& c,
                                        ArtifactStore* store, std::vector<std::string>* deps) {
  std::map<std::string, json> results;
  const int64_t L = c.num_hidden_layers, H = c.hidden_size, K = c.kv_dim();
  for (int64_t l = 0; l < L; ++l) {
    const std::string id = plan::numbered(plan::kQuantize, l);
    const std::string rel =
        task_artifact_path("job", id, 1, plan::block_artifact(l) + ".safetensors");
    fs::create_directories(fs::path(store->absolute(rel)).parent_path());
    EXPECT_TRUE(calib::save_block_result(make_block(k, r, c, l), c, store->absolute(rel)).is_ok());
    results[id] = {{"artifacts", {{plan::block_artifact(l), ref_of(*store, rel).to_json()}}}};
    deps->push_back(id);
  }
  if (r.transform() == "spinquant") {
    calib::Fitted f;
    const std::vector<float> R1 = normal_values(7, "R1", H * H, 0.0, 0.125);
    f.arrays["R1"] = std::vector<double>(R1.begin(), R1.end());
    for (int64_t l = 0; l < L; ++l) {
      const std::string n = "R2." + std::to_string(l);
      const std::vector<float> R2 = normal_values(7, n, c.head_dim * c.head_dim, 0.0, 0.25);
      f.arrays[n] = std::vector<double>(R2.begin(), R2.end());
    }
    const std::string rel = task_artifact_path("job", "spinquant", 1, "rotations.safetensors");
    fs::create_directories(fs::path(store->absolute(rel)).parent_path());
    EXPECT_TRUE(calib::save_fitted(f, store->absolute(rel)).is_ok());
    results["spinquant"] = {{"artifacts", {{"rotations", ref_of(*store, rel).to_json()}}}};
    deps->push_back("spinquant");
  }
  if (r.intactkv()) {
    const int64_t P = static_cast<int64_t>(r.intactkv_prefix_for(c).size());
    if (r.b("intactkv_cal")) {
      calib::Fitted f;
      for (int64_t l = 0; l < L; ++l)
        for (const char* kv : {"k.", "v."}) {
          const std::string n = kv + std::to_string(l);
          const std::vector<float> v = normal_values(9, n, P * K, 0.0, 1.0);
          f.arrays[n] = std::vector<double>(v.begin(), v.end());
        }
      const std::string rel = task_artifact_path("job", "intactkv-cal", 1, "prefix_kv.safetensors");
      fs::create_directories(fs::path(store->absolute(rel)).parent_path());
      EXPECT_TRUE(calib::save_fitted(f, store->absolute(rel)).is_ok());
      results["intactkv-cal"] = {{"artifacts", {{"prefix_kv", ref_of(*store, rel).to_json()}}}};
      deps->push_back("intactkv-cal");
    }
    const std::string id = plan::numbered(plan::kCapture, L - 1);
    auto w =
        store->create_activations(task_artifact_path("job", id, 1, "prefix.safetensors"), 1, P, H);
    EXPECT_TRUE(w.is_ok());
    const std::vector<float> x = normal_values(13, "prefix", P * H, 0.0, 2.0);
    EXPECT_TRUE((*w)->append(x.data(), 1).is_ok());
    auto ref = (*w)->finish();
    EXPECT_TRUE(ref.is_ok());
    results[id] = {{"artifacts", {{"prefix", ref->to_json()}}}};
    deps->push_back(id);
  }
  return results;
}

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
    {"native_flatquant_w4a4kv4_bias",
     {true, false},
     {{"transform", "flatquant"}, {"w_bits", 4}, {"a_bits", 4}, {"kv_bits", 4}},
     "native",
     false,
     true,
     "49a7dc772fb68731e4743f262bd336c3e60a82499577d4fc9d34c32a33382b30"},
    {"gptq_quarot_w4a16_bias",
     {true, false},
     {{"transform", "quarot"}, {"weight_solver", "gptq"}, {"w_bits", 4}, {"w_group", 32}},
     "gptq",
     false,
     false,
     "5cb9ffb89bdc9bea1280194f7155b5c38f256bbb1b0e35ff7df14316db1285ed"},
    {"gptq_weight_only_act_order",
     {},
     {{"weight_solver", "gptq"}, {"w_bits", 4}, {"w_group", 32}, {"gptq", {{"act_order", true}}}},
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
  ctx.deps = make_inputs(k, r, c, &store, &ctx.task.deps);
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

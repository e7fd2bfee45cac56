// The LLaMA block and model against fp64 references built from the `*_ref`
// kernels. Tolerance: |got − ref| ≤ atol + rtol·|ref|, NaN fails; the max
// difference and budget share are printed. Letters: B sequences, T tokens,
// N = B*T, H hidden, I intermediate, V vocab, Q = n_h*d, K = n_kv*d.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "kernels/ops.h"
#include "tests/unit/test_util.h"
#include "worker/engine/model.h"

namespace qcal {
namespace {

struct Tol {
  double atol, rtol;
};

::testing::AssertionResult close(const std::string& what, const float* got, const double* ref,
                                 size_t n, Tol tol) {
  double max_diff = 0.0, max_share = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(got[i]) || std::isnan(ref[i]))
      return ::testing::AssertionFailure() << what << ": NaN at " << i;
    const double diff = std::fabs(got[i] - ref[i]);
    const double share = diff / (tol.atol + tol.rtol * std::fabs(ref[i]));
    max_diff = std::max(max_diff, diff);
    if (share > max_share) max_share = share, worst = i;
  }
  std::printf("  %-44s n=%-7zu max|diff|=%.3g  budget used %.1f%%\n", what.c_str(), n, max_diff,
              100.0 * max_share);
  if (max_share > 1.0)
    return ::testing::AssertionFailure()
           << what << ": max |diff| " << max_diff << "; at " << worst << " got " << got[worst]
           << " ref " << ref[worst] << " uses " << 100.0 * max_share << "% of the budget";
  return ::testing::AssertionSuccess();
}

ModelConfig tiny_config(const std::string& type = "llama") {
  ModelConfig c = qcal::testing::small_config(128, 97);
  c.model_type = type;
  c.attention_bias = type == "qwen2";
  c.rope_theta = type == "qwen2" ? 1e6 : 1e4;
  return c;
}

Tensor rand_tensor(Rng& rng, std::vector<int64_t> shape, double scale, double mean = 0.0) {
  Tensor t(std::move(shape));
  for (float& x : t.data) x = static_cast<float>(mean + scale * rng.normal());
  return t;
}

LayerWeights random_layer(const ModelConfig& c, Rng& rng, bool bias) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  LayerWeights w;
  w.input_norm = rand_tensor(rng, {H}, 0.1, 1.0);
  w.post_norm = rand_tensor(rng, {H}, 0.1, 1.0);
  w.q = rand_tensor(rng, {Q, H}, 1.0 / std::sqrt(H));
  w.k = rand_tensor(rng, {K, H}, 1.0 / std::sqrt(H));
  w.v = rand_tensor(rng, {K, H}, 1.0 / std::sqrt(H));
  w.o = rand_tensor(rng, {H, Q}, 1.0 / std::sqrt(Q));
  w.gate = rand_tensor(rng, {I, H}, 1.0 / std::sqrt(H));
  w.up = rand_tensor(rng, {I, H}, 1.0 / std::sqrt(H));
  w.down = rand_tensor(rng, {H, I}, 1.0 / std::sqrt(I));
  if (bias) {
    w.q_bias = rand_tensor(rng, {Q}, 0.5);
    w.k_bias = rand_tensor(rng, {K}, 0.5);
    w.v_bias = rand_tensor(rng, {K}, 0.5);
  }
  return w;
}

std::vector<double> f64(const float* p, size_t n) { return {p, p + n}; }

// y (T, O) = x (T, I) · W (O, I)ᵀ + b in double.
std::vector<double> lin(const std::vector<double>& x, const Tensor& W, const Tensor& b, int64_t T,
                        int64_t I, int64_t O) {
  std::vector<double> y(T * O);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o) {
      double acc = b.data.empty() ? 0.0 : b.data[o];
      for (int64_t i = 0; i < I; ++i) acc += x[t * I + i] * static_cast<double>(W.data[o * I + i]);
      y[t * O + o] = acc;
    }
  return y;
}

// The fp64 block on one sequence x (T, H), written from the reference kernels,
// with the inputs of the linears kept for the hook test.
struct RefBlock {
  std::vector<double> xn1;  // (T, H) input of q/k/v
  std::vector<double> att;  // (T, Q) input of o
  std::vector<double> xn2;  // (T, H) input of gate/up
  std::vector<double> act;  // (T, I) input of down
  std::vector<double> out;  // (T, H)
};

RefBlock ref_block(const ModelConfig& c, const LayerWeights& w, std::vector<double> x, int64_t T) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  RefBlock r;
  auto g1 = f64(w.input_norm.ptr(), H), g2 = f64(w.post_norm.ptr(), H);
  r.xn1.resize(T * H);
  rmsnorm_forward_ref(r.xn1.data(), x.data(), g1.data(), T, H, c.rms_norm_eps);
  auto q = lin(r.xn1, w.q, w.q_bias, T, H, Q);
  auto k = lin(r.xn1, w.k, w.k_bias, T, H, K);
  auto v = lin(r.xn1, w.v, w.v_bias, T, H, K);
  rope_forward_ref(q.data(), T, c.num_attention_heads, c.head_dim, 0, c.rope_theta);
  rope_forward_ref(k.data(), T, c.num_key_value_heads, c.head_dim, 0, c.rope_theta);
  r.att.resize(T * Q);
  attention_forward_ref(r.att.data(), q.data(), k.data(), v.data(), T, c.num_attention_heads,
                        c.num_key_value_heads, c.head_dim);
  auto o = lin(r.att, w.o, Tensor(), T, Q, H);
  for (int64_t i = 0; i < T * H; ++i) x[i] += o[i];
  r.xn2.resize(T * H);
  rmsnorm_forward_ref(r.xn2.data(), x.data(), g2.data(), T, H, c.rms_norm_eps);
  auto g = lin(r.xn2, w.gate, Tensor(), T, H, I);
  auto u = lin(r.xn2, w.up, Tensor(), T, H, I);
  r.act.resize(T * I);
  swiglu_forward_ref(r.act.data(), g.data(), u.data(), T * I);
  auto d = lin(r.act, w.down, Tensor(), T, I, H);
  for (int64_t i = 0; i < T * H; ++i) x[i] += d[i];
  r.out = std::move(x);
  return r;
}

// ---------------------------------------------------------------- block

TEST(Block, ForwardMatchesFp64Block) {
  struct Case {
    const char* name;
    ModelConfig c;
    bool bias;
    int64_t B, T;
  };
  ModelConfig gqa = tiny_config();
  gqa.hidden_size = 256, gqa.num_attention_heads = 8, gqa.num_key_value_heads = 2,
  gqa.head_dim = 64, gqa.intermediate_size = 384, gqa.rope_theta = 5e5;
  std::vector<Case> cases = {{"llama B=3 T=11", tiny_config(), false, 3, 11},
                             {"qwen2 bias B=2 T=17", tiny_config("qwen2"), true, 2, 17},
                             {"gqa 8/2 d=64 B=2 T=33", gqa, false, 2, 33},
                             {"grouped rows B=5 T=130", tiny_config(), false, 5, 130},
                             {"one token B=4 T=1", tiny_config(), true, 4, 1}};
  Rng rng(11);
  for (const Case& k : cases) {
    const ModelConfig& c = k.c;
    const int64_t H = c.hidden_size;
    LayerWeights w = random_layer(c, rng, k.bias);
    Tensor x = rand_tensor(rng, {k.B * k.T, H}, 1.0);
    std::vector<double> ref(x.data.size());
    for (int64_t b = 0; b < k.B; ++b) {
      RefBlock r = ref_block(c, w, f64(x.ptr() + b * k.T * H, k.T * H), k.T);
      std::copy(r.out.begin(), r.out.end(), ref.begin() + b * k.T * H);
    }
    Tensor y = x;
    block_forward(c, w, y.ptr(), k.B, k.T);
    EXPECT_TRUE(
        close(std::string("block ") + k.name, y.ptr(), ref.data(), ref.size(), {1e-5, 1e-5}));
    // With a hook (all rows in one group) the result is the same function.
    Tensor yh = x;
    int calls = 0;
    block_forward(c, w, yh.ptr(), k.B, k.T,
                  [&](const std::string&, const float*, int64_t, int64_t) { ++calls; });
    EXPECT_EQ(calls, 7);
    EXPECT_TRUE(
        close(std::string("block+hook ") + k.name, yh.ptr(), ref.data(), ref.size(), {1e-5, 1e-5}));
  }
}

TEST(Block, HookReceivesEachLinearInput) {
  const ModelConfig c = tiny_config("qwen2");
  const int64_t B = 2, T = 9, H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim();
  Rng rng(12);
  LayerWeights w = random_layer(c, rng, true);
  Tensor x = rand_tensor(rng, {B * T, H}, 1.0);
  struct Call {
    std::string proj;
    const float* ptr;
    std::vector<float> x;
    int64_t rows, in;
  };
  std::vector<Call> calls;
  Tensor y = x;
  block_forward(c, w, y.ptr(), B, T,
                [&](const std::string& proj, const float* p, int64_t rows, int64_t in) {
                  calls.push_back({proj, p, std::vector<float>(p, p + rows * in), rows, in});
                });
  ASSERT_EQ(calls.size(), 7u);
  for (int i = 0; i < 7; ++i) {
    EXPECT_EQ(calls[i].proj, kProjNames[i]);
    EXPECT_EQ(calls[i].rows, B * T);
    EXPECT_EQ(calls[i].in, calls[i].proj == "self_attn.o_proj" ? Q
                           : calls[i].proj == "mlp.down_proj"  ? I
                                                               : H);
  }
  // q, k, v see the same normed input, bit for bit what rmsnorm_forward gives.
  std::vector<float> xn(B * T * H);
  rmsnorm_forward(xn.data(), x.ptr(), w.input_norm.ptr(), B * T, H,
                  static_cast<float>(c.rms_norm_eps));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(calls[i].ptr, calls[0].ptr);
    EXPECT_EQ(calls[i].x, xn) << calls[i].proj;
  }
  EXPECT_EQ(calls[4].ptr, calls[5].ptr);  // gate and up share their input
  EXPECT_EQ(calls[4].x, calls[5].x);
  // o, gate/up and down inputs against the fp64 block's intermediates.
  std::vector<double> att, xn2, act;
  for (int64_t b = 0; b < B; ++b) {
    RefBlock r = ref_block(c, w, f64(x.ptr() + b * T * H, T * H), T);
    att.insert(att.end(), r.att.begin(), r.att.end());
    xn2.insert(xn2.end(), r.xn2.begin(), r.xn2.end());
    act.insert(act.end(), r.act.begin(), r.act.end());
  }
  const Tol tol{1e-5, 1e-5};
  EXPECT_TRUE(close("hook o_proj input", calls[3].x.data(), att.data(), att.size(), tol));
  EXPECT_TRUE(close("hook gate_proj input", calls[4].x.data(), xn2.data(), xn2.size(), tol));
  EXPECT_TRUE(close("hook down_proj input", calls[6].x.data(), act.data(), act.size(), tol));
}

TEST(Block, ProjByName) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // the kernels' worker threads exist
  LayerWeights w;
  w.proj("mlp.up_proj") = Tensor({2, 3}, 1.0f);
  EXPECT_EQ(w.up.numel(), 6);
  const LayerWeights& cw = w;
  EXPECT_EQ(&cw.proj("mlp.up_proj"), &w.up);
  EXPECT_EQ(&w.proj("self_attn.k_proj"), &w.k);
  EXPECT_DEATH(w.proj("mlp.nope"), "unknown projection");
}

// ---------------------------------------------------------------- model on disk

struct NamedTensor {
  std::string name;
  Tensor t;
};

// Every tensor of an FP checkpoint of `c`, random with a fixed seed.
std::vector<NamedTensor> model_tensors(const ModelConfig& c, uint64_t seed) {
  Rng rng(seed);
  const int64_t H = c.hidden_size, V = c.vocab_size;
  std::vector<NamedTensor> ts;
  ts.push_back({"model.embed_tokens.weight", rand_tensor(rng, {V, H}, 1.0)});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights w = random_layer(c, rng, c.attention_bias);
    const std::string p = layer_prefix(l);
    ts.push_back({p + "input_layernorm.weight", w.input_norm});
    for (const char* name : kProjNames) {
      ts.push_back({p + name + ".weight", w.proj(name)});
      const std::string n = name;
      if (n == "self_attn.q_proj" && c.attention_bias) ts.push_back({p + n + ".bias", w.q_bias});
      if (n == "self_attn.k_proj" && c.attention_bias) ts.push_back({p + n + ".bias", w.k_bias});
      if (n == "self_attn.v_proj" && c.attention_bias) ts.push_back({p + n + ".bias", w.v_bias});
    }
    ts.push_back({p + "post_attention_layernorm.weight", w.post_norm});
  }
  ts.push_back({"model.norm.weight", rand_tensor(rng, {H}, 0.1, 1.0)});
  if (!c.tie_word_embeddings)
    ts.push_back({"lm_head.weight", rand_tensor(rng, {V, H}, 1.0 / std::sqrt(H))});
  return ts;
}

Status write_model(const std::string& dir, const ModelConfig& c,
                   const std::vector<NamedTensor>& ts) {
  std::filesystem::create_directories(dir);
  QCAL_RETURN_IF_ERROR(write_file_atomic(join_path(dir, "config.json"), c.to_json().dump(2)));
  SafetensorsWriter w(join_path(dir, "model.safetensors"));
  for (const auto& t : ts) w.add(t.name, c.torch_dtype, t.t.shape);
  QCAL_RETURN_IF_ERROR(w.begin());
  for (const auto& t : ts) QCAL_RETURN_IF_ERROR(w.write_f32(t.t.ptr(), t.t.data.size()));
  return w.finish();
}

class ModelFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qcal_test_model_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  std::string root_;
};

TokenSequences random_tokens(int64_t count, int64_t T, int64_t V, uint64_t seed) {
  Rng rng(seed);
  TokenSequences s;
  s.seqlen = T;
  for (int64_t i = 0; i < count * T; ++i) s.tokens.push_back(static_cast<int32_t>(rng.below(V)));
  return s;
}

TEST_F(ModelFiles, ModelLogitsMatchFp64Reference) {
  struct Variant {
    const char* name;
    ModelConfig c;
  };
  ModelConfig tied = tiny_config();
  tied.tie_word_embeddings = true;
  tied.torch_dtype = DType::kBF16;  // also exercises the row-wise embedding read
  std::vector<Variant> variants = {{"llama", tiny_config()},
                                   {"qwen2 (q/k/v bias)", tiny_config("qwen2")},
                                   {"llama tied bf16", tied}};
  for (const Variant& v : variants) {
    const std::string dir = join_path(root_, v.name);
    ASSERT_TRUE(write_model(dir, v.c, model_tensors(v.c, 21)).is_ok());
    auto m = LlamaModel::open(dir);
    ASSERT_TRUE(m.is_ok()) << m.status().to_string();
    const LlamaModel& model = **m;
    EXPECT_EQ(model.config().attention_bias, v.c.attention_bias);
    const int64_t T = 13, count = 3, V = v.c.vocab_size;
    TokenSequences seqs = random_tokens(count + 1, T, V, 5);
    auto logits = model_logits(model, seqs, 1, count);  // skips sequence 0
    ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
    ASSERT_EQ(logits->shape, (std::vector<int64_t>{count * T, V}));
    std::vector<double> ref;
    for (int64_t s = 1; s <= count; ++s) {
      auto r = model_logits_ref(model, seqs.seq(s), T);
      ASSERT_TRUE(r.is_ok()) << r.status().to_string();
      ref.insert(ref.end(), r->begin(), r->end());
    }
    double scale = 0.0;
    for (double x : ref) scale = std::max(scale, std::fabs(x));
    EXPECT_TRUE(close(std::string("model_logits ") + v.name, logits->ptr(), ref.data(), ref.size(),
                      {1e-4 * scale, 1e-4}));
  }
}

TEST_F(ModelFiles, EmbedReadsTokenRowsAndRejectsBadIds) {
  ModelConfig c = tiny_config();
  auto ts = model_tensors(c, 3);
  ASSERT_TRUE(write_model(root_ + "/m", c, ts).is_ok());
  auto m = LlamaModel::open(root_ + "/m");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  TokenSequences s;
  s.seqlen = 3;
  s.tokens = {5, 0, 96, 7, 7, 1};
  auto x = (*m)->embed(s, 1, 1);
  ASSERT_TRUE(x.is_ok());
  ASSERT_EQ(x->shape, (std::vector<int64_t>{3, c.hidden_size}));
  const Tensor& e = ts[0].t;  // (V, H)
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t h = 0; h < c.hidden_size; ++h) EXPECT_EQ(x->at(t, h), e.at(s.tokens[3 + t], h));
  s.tokens[4] = 97;
  auto bad = (*m)->embed(s, 0, 2);
  EXPECT_EQ(bad.status().code(), Code::kInvalidInput);
  EXPECT_NE(bad.status().message().find("token id 97"), std::string::npos)
      << bad.status().message();
  EXPECT_EQ((*m)->embed(s, 1, 2).status().code(), Code::kInvalidInput);  // past the end
  EXPECT_EQ((*m)->load_layer(2).status().code(), Code::kInvalidInput);
  EXPECT_EQ((*m)->logits(Tensor({3, 5})).status().code(), Code::kInvalidInput);
}

TEST_F(ModelFiles, LoadLayerChecksShapesAndPresence) {
  ModelConfig c = tiny_config("qwen2");
  auto ts = model_tensors(c, 4);
  auto bad_shape = ts, missing_bias = ts;
  for (auto& t : bad_shape)
    if (t.name == "model.layers.1.mlp.up_proj.weight") t.t = Tensor({c.intermediate_size, 8});
  std::erase_if(missing_bias, [](const NamedTensor& t) {
    return t.name == "model.layers.0.self_attn.k_proj.bias";
  });
  ASSERT_TRUE(write_model(root_ + "/shape", c, bad_shape).is_ok());
  ASSERT_TRUE(write_model(root_ + "/bias", c, missing_bias).is_ok());

  auto m = LlamaModel::open(root_ + "/shape");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_TRUE((*m)->load_layer(0).is_ok());
  auto l1 = (*m)->load_layer(1);
  EXPECT_EQ(l1.status().code(), Code::kInvalidInput);
  EXPECT_NE(l1.status().message().find("mlp.up_proj"), std::string::npos) << l1.status().message();

  auto mb = LlamaModel::open(root_ + "/bias");
  ASSERT_TRUE(mb.is_ok()) << mb.status().to_string();
  auto l0 = (*mb)->load_layer(0);
  EXPECT_EQ(l0.status().code(), Code::kNotFound);
  EXPECT_NE(l0.status().message().find("k_proj.bias"), std::string::npos) << l0.status().message();

  EXPECT_EQ(LlamaModel::open(root_ + "/absent").status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace qcal

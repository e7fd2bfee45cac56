// labels: unit
// calib::QBlock<double> against golden values from an independent float64
// PyTorch autograd implementation of the qblock.h forward (tools/golden_block.py;
// its docstring documents the fixture format, the block and the two cases):
//   quant: W4 per-row sym + LWC, A4 per-token sym + LAC, K/V 4-bit asym per head
//          + LAC, every transform (random invertible P and independent P_it),
//          every diagonal;
//   fp:    the same transforms with every quantizer off.
// Compared: the output y, and the gradient of sum(y ⊙ G) w.r.t. x, every
// transform, diagonal, clip parameter, weight, bias and norm; the effective
// (transformed, clipped, fake-quantized) weights and v bias. Error per tensor =
// max|got − ref| / max(max|ref|, 1e-3) (relative to the tensor's scale), bound
// 1e-9. The floor makes it an absolute 1e-12 for tensors that are 0 in exact
// arithmetic: in the FP case the diagonals' gradients (x ⊙ c against W ⊙ 1/c
// cancel) are rounding noise, ~1e-15, on both sides.
// The FP case is also checked against the engine's fp32 block_forward with the
// untransformed weights, which pins the golden script's conventions (RoPE, GQA).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/model_config.h"
#include "kernels/grad.h"
#include "worker/calib/qblock.h"
#include "worker/engine/model.h"

namespace qcal::calib {
namespace {

constexpr double kTol = 1e-9;
constexpr double kScaleFloor = 1e-3;
const char* const kProj[kNumProj] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                     "gate_proj", "up_proj", "down_proj"};

struct Arr {
  std::vector<int64_t> shape;
  std::vector<double> data;
};

class Fixture {
 public:
  // Returns "" or an error message.
  std::string load(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      return "cannot open " + path + " (generate it with: /usr/bin/python3 tools/golden_block.py)";
    }
    std::vector<char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    size_t pos = 0;
    auto take = [&](void* dst, size_t n) {
      if (pos + n > buf.size()) return false;
      std::memcpy(dst, buf.data() + pos, n);
      pos += n;
      return true;
    };
    char magic[8];
    uint32_t version = 0, count = 0;
    if (!take(magic, 8) || std::memcmp(magic, "QCALGOLD", 8) != 0) {
      return path + ": bad magic (not a QCALGOLD fixture)";
    }
    if (!take(&version, 4) || version != 1) {
      return path + ": unsupported version " + std::to_string(version) + " (expected 1)";
    }
    if (!take(&count, 4)) return path + ": truncated header";
    for (uint32_t i = 0; i < count; ++i) {
      uint32_t len = 0, ndim = 0;
      if (!take(&len, 4) || len > 256) return path + ": bad name length";
      std::string name(len, '\0');
      if (!take(name.data(), len) || !take(&ndim, 4) || ndim > 8) {
        return path + ": truncated at tensor " + std::to_string(i);
      }
      Arr a;
      a.shape.resize(ndim);
      int64_t n = 1;
      for (uint32_t d = 0; d < ndim; ++d) {
        if (!take(&a.shape[d], 8) || a.shape[d] < 0) return path + ": bad dims of " + name;
        n *= a.shape[d];
      }
      a.data.resize(static_cast<size_t>(n));
      if (!take(a.data.data(), static_cast<size_t>(n) * 8)) return path + ": truncated " + name;
      t_[name] = std::move(a);
    }
    if (pos != buf.size()) return path + ": trailing bytes";
    return "";
  }
  bool has(const std::string& name) const { return t_.count(name) != 0; }
  const std::vector<double>& operator[](const std::string& name) const {
    auto it = t_.find(name);
    if (it == t_.end()) {
      ADD_FAILURE() << "fixture has no tensor " << name;
      static const std::vector<double> empty;
      return empty;
    }
    return it->second.data;
  }

 private:
  std::map<std::string, Arr> t_;
};

// Every transform field, by the fixture's name.
using TField = std::vector<double> BlockTransformsT<double>::*;
const std::pair<const char*, TField> kTransformFields[] = {
    {"a1", &BlockTransformsT<double>::a1},       {"a2", &BlockTransformsT<double>::a2},
    {"a1_it", &BlockTransformsT<double>::a1_it}, {"a2_it", &BlockTransformsT<double>::a2_it},
    {"ca", &BlockTransformsT<double>::ca},       {"u1", &BlockTransformsT<double>::u1},
    {"u2", &BlockTransformsT<double>::u2},       {"u1_it", &BlockTransformsT<double>::u1_it},
    {"u2_it", &BlockTransformsT<double>::u2_it}, {"cu", &BlockTransformsT<double>::cu},
    {"d1", &BlockTransformsT<double>::d1},       {"d2", &BlockTransformsT<double>::d2},
    {"d1_it", &BlockTransformsT<double>::d1_it}, {"d2_it", &BlockTransformsT<double>::d2_it},
    {"cd", &BlockTransformsT<double>::cd},       {"po", &BlockTransformsT<double>::po},
    {"po_it", &BlockTransformsT<double>::po_it}, {"pv", &BlockTransformsT<double>::pv},
    {"pv_it", &BlockTransformsT<double>::pv_it}, {"pk", &BlockTransformsT<double>::pk},
    {"pk_it", &BlockTransformsT<double>::pk_it},
};

// The clip vectors of BlockClipT by fixture name ("act_max.q_proj", "k_min", ...).
std::vector<std::pair<std::string, std::vector<double>*>> clip_fields(BlockClipT<double>* c) {
  std::vector<std::pair<std::string, std::vector<double>*>> out;
  for (int p = 0; p < kNumProj; ++p) {
    const std::string s = kProj[p];
    out.emplace_back("act_max." + s, &c->act_max[p]);
    out.emplace_back("act_min." + s, &c->act_min[p]);
    out.emplace_back("w_max." + s, &c->w_max[p]);
    out.emplace_back("w_min." + s, &c->w_min[p]);
  }
  out.emplace_back("k_max", &c->k_max);
  out.emplace_back("k_min", &c->k_min);
  out.emplace_back("v_max", &c->v_max);
  out.emplace_back("v_min", &c->v_min);
  return out;
}

std::vector<std::pair<std::string, std::vector<double>*>> weight_fields(BlockWeightsT<double>* w) {
  std::vector<std::pair<std::string, std::vector<double>*>> out;
  out.emplace_back("input_norm", &w->input_norm);
  out.emplace_back("post_norm", &w->post_norm);
  for (int p = 0; p < kNumProj; ++p) out.emplace_back(kProj[p], &w->w[p]);
  out.emplace_back("q_bias", &w->bias[0]);
  out.emplace_back("k_bias", &w->bias[1]);
  out.emplace_back("v_bias", &w->bias[2]);
  return out;
}

// Records max|got − ref| / max(max|ref|, kScaleFloor) per tensor; an empty `got` counts as zeros
// (the contract leaves untouched gradients empty). NaN fails.
class Comparer {
 public:
  void check(const std::string& what, const std::vector<double>& got,
             const std::vector<double>& ref) {
    if (!got.empty() && got.size() != ref.size()) {
      ADD_FAILURE() << what << ": size " << got.size() << ", golden " << ref.size();
      return;
    }
    double diff = 0.0, scale = 0.0;
    size_t worst = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double g = got.empty() ? 0.0 : got[i];
      if (std::isnan(g) || std::isnan(ref[i])) {
        ADD_FAILURE() << what << ": NaN at " << i;
        return;
      }
      if (std::fabs(g - ref[i]) > diff) {
        diff = std::fabs(g - ref[i]);
        worst = i;
      }
      scale = std::max(scale, std::fabs(ref[i]));
    }
    const double rel = diff / std::max(scale, kScaleFloor);
    std::printf("  %-26s n=%4zu  max|ref|=%9.3e  rel.err=%9.3e%s\n", what.c_str(), ref.size(),
                scale, rel, rel > kTol ? "  <-- MISMATCH" : "");
    if (rel > kTol) {
      ADD_FAILURE() << what << ": relative error " << rel << " > " << kTol << " (element " << worst
                    << ": got " << (got.empty() ? 0.0 : got[worst]) << ", golden " << ref[worst]
                    << ")";
    }
    if (rel > max_rel_) {
      max_rel_ = rel;
      max_what_ = what;
    }
  }
  void summary(const char* name) const {
    std::printf("%s: max relative error %.3e (%s)\n", name, max_rel_, max_what_.c_str());
  }

 private:
  double max_rel_ = 0.0;
  std::string max_what_;
};

class QBlockGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string err =
        fx_.load(std::string(QCAL_SOURCE_DIR) + "/tests/fixtures/golden_block.bin");
    ASSERT_EQ(err, "") << err;
    const std::vector<double>& cfg = fx_["config"];
    ASSERT_EQ(cfg.size(), 9u);
    c_.hidden_size = static_cast<int64_t>(cfg[0]);
    c_.num_attention_heads = static_cast<int64_t>(cfg[1]);
    c_.num_key_value_heads = static_cast<int64_t>(cfg[2]);
    c_.head_dim = static_cast<int64_t>(cfg[3]);
    c_.intermediate_size = static_cast<int64_t>(cfg[4]);
    B_ = static_cast<int64_t>(cfg[5]);
    T_ = static_cast<int64_t>(cfg[6]);
    c_.rope_theta = cfg[7];
    c_.rms_norm_eps = cfg[8];
    c_.num_hidden_layers = 1;
    c_.vocab_size = 32;
    c_.attention_bias = true;
    for (auto& [name, v] : weight_fields(&w_)) *v = fx_["w." + name];
    for (const auto& [name, f] : kTransformFields) t_.*f = fx_[std::string("t.") + name];
  }

  BlockQuantSpec quant_spec() const {
    BlockQuantSpec q;
    for (int p = 0; p < kNumProj; ++p) {
      FakeQuantSpec a;  // A4 per-token sym, LAC
      a.bits = 4;
      a.sym = true;
      a.group = -1;
      a.ste = Ste::kLsq;
      a.clip = ClipMode::kLearned;
      q.act[p] = a;
      FakeQuantSpec w = a;  // W4 per-row sym, LWC
      w.lwc_range = true;
      w.min_scale = 1e-5;
      q.w[p] = w;
    }
    FakeQuantSpec kv;  // 4-bit asym per (token, head), LAC
    kv.bits = 4;
    kv.sym = false;
    kv.group = c_.head_dim;
    kv.ste = Ste::kLsq;
    kv.clip = ClipMode::kLearned;
    q.k = kv;
    q.v = kv;
    return q;
  }

  // Runs forward + backward and compares everything stored under `case_name`.
  void run_case(const std::string& cs, const BlockQuantSpec& q, const BlockClipT<double>& clip,
                bool with_clip) {
    const int64_t N = B_ * T_, H = c_.hidden_size;
    QBlock<double> blk(c_, &w_, &t_, &q, &clip);
    const std::vector<double>& x = fx_["x"];
    const std::vector<double>& G = fx_["G"];
    ASSERT_EQ(x.size(), static_cast<size_t>(N * H));
    std::vector<double> y(static_cast<size_t>(N * H));
    auto tape = make_tape<double>();
    blk.forward(x.data(), y.data(), B_, T_, tape.get());
    BlockGradsT<double> g;
    BackwardOptions opt;
    opt.input = opt.transforms = opt.weights = true;
    opt.clip = with_clip;
    blk.backward(*tape, G.data(), &g, opt);

    Comparer cmp;
    std::printf("%s case:\n", cs.c_str());
    cmp.check("y", y, fx_[cs + ".y"]);
    cmp.check("dx", g.dx, fx_[cs + ".dx"]);
    for (const auto& [name, f] : kTransformFields) {
      cmp.check(std::string("dt.") + name, g.t.*f, fx_[cs + ".dt." + name]);
    }
    for (auto& [name, v] : weight_fields(&g.w))
      cmp.check("dw." + name, *v, fx_[cs + ".dw." + name]);
    if (with_clip) {
      for (auto& [name, v] : clip_fields(&g.clip)) {
        cmp.check("dclip." + name, *v, fx_[cs + ".dclip." + name]);
      }
      for (int p = 0; p < kNumProj; ++p) {
        cmp.check(std::string("weff.") + kProj[p], blk.effective_weight(p, true),
                  fx_[cs + ".weff." + kProj[p]]);
      }
      cmp.check("beff.v_proj", blk.effective_bias(kV), fx_[cs + ".beff.v_proj"]);
    }
    cmp.summary(cs.c_str());
  }

  Fixture fx_;
  ModelConfig c_;
  int64_t B_ = 0, T_ = 0;
  BlockWeightsT<double> w_;
  BlockTransformsT<double> t_;
};

TEST_F(QBlockGolden, QuantizedMatchesAutograd) {
  const BlockQuantSpec q = quant_spec();
  BlockClipT<double> clip = init_clip_params<double>(q, c_, 4.0);
  for (auto& [name, v] : clip_fields(&clip)) {
    const std::vector<double>& ref = fx_["clip." + name];
    ASSERT_EQ(v->size(), ref.size()) << "init_clip_params size of " << name;
    *v = ref;
  }
  run_case("quant", q, clip, /*with_clip=*/true);
}

TEST_F(QBlockGolden, UnquantizedMatchesAutograd) {
  const BlockQuantSpec q;  // every quantizer off
  const BlockClipT<double> clip;
  run_case("fp", q, clip, /*with_clip=*/false);
}

// The golden FP output against the engine's fp32 block with the untransformed
// weights (P·P_it⁻ᵀ = I): pins the script's RoPE / GQA / norm conventions to the
// engine's.
TEST_F(QBlockGolden, GoldenFpMatchesEngineBlock) {
  const int64_t N = B_ * T_, H = c_.hidden_size;
  auto tensor = [&](const std::string& name, std::vector<int64_t> shape) {
    Tensor t(std::move(shape));
    const std::vector<double>& v = fx_["w." + name];
    EXPECT_EQ(v.size(), static_cast<size_t>(t.numel())) << name;
    for (size_t i = 0; i < v.size() && i < t.data.size(); ++i) t.data[i] = static_cast<float>(v[i]);
    return t;
  };
  const int64_t Q = c_.q_dim(), KV = c_.kv_dim(), I = c_.intermediate_size;
  LayerWeights lw;
  lw.input_norm = tensor("input_norm", {H});
  lw.post_norm = tensor("post_norm", {H});
  lw.q = tensor("q_proj", {Q, H});
  lw.k = tensor("k_proj", {KV, H});
  lw.v = tensor("v_proj", {KV, H});
  lw.o = tensor("o_proj", {H, Q});
  lw.gate = tensor("gate_proj", {I, H});
  lw.up = tensor("up_proj", {I, H});
  lw.down = tensor("down_proj", {H, I});
  lw.q_bias = tensor("q_bias", {Q});
  lw.k_bias = tensor("k_bias", {KV});
  lw.v_bias = tensor("v_bias", {KV});
  const std::vector<double>& x = fx_["x"];
  std::vector<float> xf(x.begin(), x.end());
  block_forward(c_, lw, xf.data(), B_, T_);
  const std::vector<double> got(xf.begin(), xf.end());
  const std::vector<double>& ref = fx_["fp.y"];
  ASSERT_EQ(ref.size(), static_cast<size_t>(N * H));
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i]));
    diff = std::max(diff, std::fabs(got[i] - ref[i]));
    scale = std::max(scale, std::fabs(ref[i]));
  }
  std::printf("golden fp.y vs engine fp32 block_forward: rel.err %.3e\n", diff / scale);
  EXPECT_LT(diff / scale, 1e-5);
}

}  // namespace
}  // namespace qcal::calib

// labels: unit
// QBlock (worker/calib/qblock.h): the whole block's backward against float64
// central finite differences for every gradient (quantizers off, and on through
// RoundTape record/replay), the transform-only block against the FP
// block_forward, float against double, the linear-input hook and the effective
// weights. Letters: B sequences, T tokens, N = B·T, H hidden, I intermediate,
// Q = n_h·d.
//
// Kinks. The replayed STE surrogate is piecewise smooth: an element whose integer
// code sits exactly on a grid bound (and whose v moves) has different one-sided
// slopes, and a central difference across it measures their mean, not the
// torch.clamp gradient. At 4 bits a block has dozens of such elements, so the
// quantized finite-difference check runs the same FlatQuant configuration
// (sym per-token LAC activations, LWC sym per-row weights with lwc_range,
// asym per-head LAC K/V, kLsq) on a finer grid and a seed whose record point has
// no kink (found by comparing one-sided differences); every check also reports
// the one-sided gap so a kink cannot pass silently. 4-bit is covered by the
// float-vs-double, hook and effective-weight tests.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/model_dir.h"
#include "common/rng.h"
#include "kernels/grad.h"
#include "worker/calib/qblock.h"
#include "worker/engine/model.h"

namespace qcal::calib {
namespace {

using Vec = std::vector<double>;

ModelConfig tiny_config(bool bias) {
  ModelConfig c;
  c.model_type = bias ? "qwen2" : "llama";
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 32;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.attention_bias = bias;
  return c;
}

Vec randn(Rng& rng, size_t n, double scale = 1.0, double mean = 0.0) {
  Vec v(n);
  for (double& e : v) e = mean + scale * rng.normal();
  return v;
}

double dot(const Vec& a, const Vec& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double norm2(const Vec& a) { return std::sqrt(dot(a, a)); }
double max_abs(const Vec& a) {
  double m = 0.0;
  for (double v : a) m = std::max(m, std::fabs(v));
  return m;
}

BlockWeightsT<double> random_weights(const ModelConfig& c, Rng& rng) {
  BlockWeightsT<double> w;
  w.input_norm = randn(rng, c.hidden_size, 0.2, 1.0);
  w.post_norm = randn(rng, c.hidden_size, 0.2, 1.0);
  for (int p = 0; p < kNumProj; ++p) {
    const auto s = proj_shape(c, kProjNames[p]);
    w.w[p] = randn(rng, s[0] * s[1], 1.0 / std::sqrt(static_cast<double>(s[1])));
    if (c.attention_bias && p <= kV) w.bias[p] = randn(rng, s[0], 0.3);
  }
  return w;
}

// Random orthogonal (n, n): modified Gram-Schmidt on a Gaussian matrix.
Vec orthogonal(int64_t n, Rng& rng) {
  Vec a = randn(rng, n * n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      double d = 0.0;
      for (int64_t k = 0; k < n; ++k) d += a[i * n + k] * a[j * n + k];
      for (int64_t k = 0; k < n; ++k) a[i * n + k] -= d * a[j * n + k];
    }
    double s = 0.0;
    for (int64_t k = 0; k < n; ++k) s += a[i * n + k] * a[i * n + k];
    for (int64_t k = 0; k < n; ++k) a[i * n + k] /= std::sqrt(s);
  }
  return a;
}

// P = U diag(σ) Vᵀ and its exact inverse transpose U diag(1/σ) Vᵀ; σ = 1 makes P
// orthogonal (P⁻ᵀ = P).
void factor(int64_t n, Rng& rng, bool orth, Vec* P, Vec* P_it) {
  const Vec U = orthogonal(n, rng), V = orthogonal(n, rng);
  Vec s(n, 1.0);
  if (!orth)
    for (double& e : s) e = std::exp(0.4 * rng.normal());
  P->assign(n * n, 0.0);
  P_it->assign(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < n; ++k) {
        (*P)[i * n + j] += U[i * n + k] * s[k] * V[j * n + k];
        (*P_it)[i * n + j] += U[i * n + k] / s[k] * V[j * n + k];
      }
}

Vec positive_diag(Rng& rng, int64_t n) {
  Vec c = randn(rng, n, 0.3);
  for (double& e : c) e = std::exp(e);
  return c;
}

// Exact-inverse transforms: the block is then the FP block.
BlockTransformsT<double> inverse_transforms(const ModelConfig& c, Rng& rng, bool orth) {
  BlockTransformsT<double> t;
  factor(4, rng, orth, &t.a1, &t.a1_it);
  factor(4, rng, orth, &t.a2, &t.a2_it);
  factor(4, rng, orth, &t.u1, &t.u1_it);
  factor(4, rng, orth, &t.u2, &t.u2_it);
  factor(4, rng, orth, &t.d1, &t.d1_it);
  factor(6, rng, orth, &t.d2, &t.d2_it);
  factor(c.num_attention_heads, rng, orth, &t.po, &t.po_it);
  factor(c.head_dim, rng, orth, &t.pv, &t.pv_it);
  factor(c.head_dim, rng, orth, &t.pk, &t.pk_it);
  t.ca = positive_diag(rng, c.hidden_size);
  t.cu = positive_diag(rng, c.hidden_size);
  t.cd = positive_diag(rng, c.intermediate_size);
  return t;
}

// Independent random matrices for every entry (the finite-difference test: the
// block never relies on P⁻ᵀ being an inverse).
BlockTransformsT<double> free_transforms(const ModelConfig& c, Rng& rng) {
  auto m = [&](int64_t n) {
    Vec a = randn(rng, n * n, 0.3 / std::sqrt(static_cast<double>(n)));
    for (int64_t i = 0; i < n; ++i) a[i * n + i] += 1.0;
    return a;
  };
  BlockTransformsT<double> t;
  t.a1 = m(4), t.a2 = m(4), t.a1_it = m(4), t.a2_it = m(4);
  t.u1 = m(4), t.u2 = m(4), t.u1_it = m(4), t.u2_it = m(4);
  t.d1 = m(4), t.d2 = m(6), t.d1_it = m(4), t.d2_it = m(6);
  t.po = m(c.num_attention_heads), t.po_it = m(c.num_attention_heads);
  t.pv = m(c.head_dim), t.pv_it = m(c.head_dim), t.pk = m(c.head_dim), t.pk_it = m(c.head_dim);
  t.ca = positive_diag(rng, c.hidden_size);
  t.cu = positive_diag(rng, c.hidden_size);
  t.cd = positive_diag(rng, c.intermediate_size);
  return t;
}

// FlatQuant's W·A·KV quantizers at `bits`.
BlockQuantSpec flat_spec(const ModelConfig& c, int bits) {
  FakeQuantSpec a;
  a.bits = bits;
  a.sym = true;
  a.group = -1;
  a.ste = Ste::kLsq;
  a.clip = ClipMode::kLearned;
  FakeQuantSpec w = a;
  w.lwc_range = true;
  w.min_scale = 1e-5;
  FakeQuantSpec kv = a;
  kv.sym = false;
  kv.group = c.head_dim;
  BlockQuantSpec q;
  q.act.fill(a);
  q.w.fill(w);
  q.k = q.v = kv;
  return q;
}

// Clip parameters: every β different, σ(β) in about [0.6, 0.9].
BlockClipT<double> random_clip(const BlockQuantSpec& q, const ModelConfig& c, Rng& rng) {
  BlockClipT<double> b = init_clip_params<double>(q, c, 4.0);
  auto fill = [&](Vec& v) {
    for (double& e : v) e = 1.4 + 0.4 * rng.normal();
  };
  for (int p = 0; p < kNumProj; ++p) {
    fill(b.act_max[p]), fill(b.act_min[p]), fill(b.w_max[p]), fill(b.w_min[p]);
  }
  fill(b.k_max), fill(b.k_min), fill(b.v_max), fill(b.v_min);
  return b;
}

template <typename T>
std::vector<T> as(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <typename T>
Vec f64(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}

BlockTransformsT<float> to_float(const BlockTransformsT<double>& t) {
  BlockTransformsT<float> o;
  using BT = BlockTransformsT<double>;
  using BF = BlockTransformsT<float>;
  const std::pair<Vec BT::*, std::vector<float> BF::*> m[] = {
      {&BT::a1, &BF::a1},       {&BT::a2, &BF::a2},       {&BT::a1_it, &BF::a1_it},
      {&BT::a2_it, &BF::a2_it}, {&BT::ca, &BF::ca},       {&BT::u1, &BF::u1},
      {&BT::u2, &BF::u2},       {&BT::u1_it, &BF::u1_it}, {&BT::u2_it, &BF::u2_it},
      {&BT::cu, &BF::cu},       {&BT::d1, &BF::d1},       {&BT::d2, &BF::d2},
      {&BT::d1_it, &BF::d1_it}, {&BT::d2_it, &BF::d2_it}, {&BT::cd, &BF::cd},
      {&BT::po, &BF::po},       {&BT::po_it, &BF::po_it}, {&BT::pv, &BF::pv},
      {&BT::pv_it, &BF::pv_it}, {&BT::pk, &BF::pk},       {&BT::pk_it, &BF::pk_it}};
  for (const auto& [src, dst] : m) o.*dst = as<float>(t.*src);
  return o;
}

BlockClipT<float> to_float(const BlockClipT<double>& c) {
  BlockClipT<float> o;
  for (int p = 0; p < kNumProj; ++p) {
    o.act_max[p] = as<float>(c.act_max[p]), o.act_min[p] = as<float>(c.act_min[p]);
    o.w_max[p] = as<float>(c.w_max[p]), o.w_min[p] = as<float>(c.w_min[p]);
  }
  o.k_max = as<float>(c.k_max), o.k_min = as<float>(c.k_min);
  o.v_max = as<float>(c.v_max), o.v_min = as<float>(c.v_min);
  return o;
}

// Every learned tensor, by name: (value, gradient) pairs of a problem and its grads.
struct Param {
  std::string name;
  Vec* value;
  Vec* grad;
};

template <typename T>
std::vector<std::pair<std::string, std::vector<T> BlockTransformsT<T>::*>> transform_members() {
  using BT = BlockTransformsT<T>;
  return {{"a1", &BT::a1},       {"a2", &BT::a2},       {"a1_it", &BT::a1_it},
          {"a2_it", &BT::a2_it}, {"ca", &BT::ca},       {"u1", &BT::u1},
          {"u2", &BT::u2},       {"u1_it", &BT::u1_it}, {"u2_it", &BT::u2_it},
          {"cu", &BT::cu},       {"d1", &BT::d1},       {"d2", &BT::d2},
          {"d1_it", &BT::d1_it}, {"d2_it", &BT::d2_it}, {"cd", &BT::cd},
          {"po", &BT::po},       {"po_it", &BT::po_it}, {"pv", &BT::pv},
          {"pv_it", &BT::pv_it}, {"pk", &BT::pk},       {"pk_it", &BT::pk_it}};
}

// The same list for float grads vs double grads (float-vs-double test).
template <typename T>
std::vector<std::pair<std::string, const std::vector<T>*>> grad_list(const BlockGradsT<T>& g) {
  std::vector<std::pair<std::string, const std::vector<T>*>> out;
  out.push_back({"dx", &g.dx});
  for (const auto& [n, m] : transform_members<T>()) out.push_back({n, &(g.t.*m)});
  for (int p = 0; p < kNumProj; ++p) {
    const std::string pn = kProjNames[p];
    out.push_back({"act_max " + pn, &g.clip.act_max[p]});
    out.push_back({"act_min " + pn, &g.clip.act_min[p]});
    out.push_back({"w_max " + pn, &g.clip.w_max[p]});
    out.push_back({"w_min " + pn, &g.clip.w_min[p]});
    out.push_back({"W " + pn, &g.w.w[p]});
    if (p < 3) out.push_back({"bias " + pn, &g.w.bias[p]});
  }
  out.push_back({"k_max", &g.clip.k_max});
  out.push_back({"k_min", &g.clip.k_min});
  out.push_back({"v_max", &g.clip.v_max});
  out.push_back({"v_min", &g.clip.v_min});
  out.push_back({"input_norm", &g.w.input_norm});
  out.push_back({"post_norm", &g.w.post_norm});
  return out;
}

// A block, an input and a loss L = Σ y ⊙ r, in float64.
struct Problem {
  ModelConfig c;
  int64_t B = 2, T = 5;
  BlockWeightsT<double> w;
  BlockTransformsT<double> t;
  BlockQuantSpec q;
  BlockClipT<double> clip;
  Vec x, r;
  int64_t P = 0;              // IntactKV prefix (set_prefix) when > 0
  Vec pk, pv;                 // (P, n_kv·d) each
  mutable double labs = 0.0;  // Σ |y ⊙ r| at the last grads() (the roundoff scale of L)

  double loss(RoundTape<double>* tape) const {
    QBlock<double> blk(c, &w, &t, &q, &clip);
    if (P > 0) blk.set_prefix(pk.data(), pv.data(), P);
    Vec y(x.size());
    if (tape) {
      tape->mode = RoundTape<double>::Mode::kReplay;
      tape->pos = 0;
    }
    blk.forward(x.data(), y.data(), B, T, nullptr, nullptr, tape);
    if (tape) {
      EXPECT_EQ(tape->pos, tape->offsets.size());
    }
    return dot(y, r);
  }
  // Records the rounding offsets and returns every gradient of L.
  BlockGradsT<double> grads(RoundTape<double>* tape, BackwardOptions opt = {}) const {
    QBlock<double> blk(c, &w, &t, &q, &clip);
    if (P > 0) blk.set_prefix(pk.data(), pv.data(), P);
    auto tp = make_tape<double>();
    Vec y(x.size());
    if (tape) {
      tape->mode = RoundTape<double>::Mode::kRecord;
      tape->offsets.clear();
    }
    blk.forward(x.data(), y.data(), B, T, tp.get(), nullptr, tape);
    labs = 0.0;
    for (size_t i = 0; i < y.size(); ++i) labs += std::fabs(y[i] * r[i]);
    BlockGradsT<double> g;
    blk.backward(*tp, r.data(), &g, opt);
    return g;
  }

  std::vector<Param> params(BlockGradsT<double>& g) {
    std::vector<Param> ps;
    ps.push_back({"x", &x, &g.dx});
    for (const auto& [n, m] : transform_members<double>()) ps.push_back({n, &(t.*m), &(g.t.*m)});
    for (int p = 0; p < kNumProj; ++p) {
      const std::string pn = kProjNames[p];
      ps.push_back({"act_max " + pn, &clip.act_max[p], &g.clip.act_max[p]});
      ps.push_back({"act_min " + pn, &clip.act_min[p], &g.clip.act_min[p]});
      ps.push_back({"w_max " + pn, &clip.w_max[p], &g.clip.w_max[p]});
      ps.push_back({"w_min " + pn, &clip.w_min[p], &g.clip.w_min[p]});
      ps.push_back({"W " + pn, &w.w[p], &g.w.w[p]});
      if (p < 3) ps.push_back({"bias " + pn, &w.bias[p], &g.w.bias[p]});
    }
    ps.push_back({"k_max", &clip.k_max, &g.clip.k_max});
    ps.push_back({"k_min", &clip.k_min, &g.clip.k_min});
    ps.push_back({"v_max", &clip.v_max, &g.clip.v_max});
    ps.push_back({"v_min", &clip.v_min, &g.clip.v_min});
    ps.push_back({"input_norm", &w.input_norm, &g.w.input_norm});
    ps.push_back({"post_norm", &w.post_norm, &g.w.post_norm});
    ps.push_back({"prefix_k", &pk, &g.prefix_k});
    ps.push_back({"prefix_v", &pv, &g.prefix_v});
    std::vector<Param> out;
    for (const Param& p : ps)
      if (!p.value->empty()) out.push_back(p);
    return out;
  }
};

Problem make_problem(uint64_t seed, bool bias, int bits) {
  Rng rng(seed);
  Problem pb;
  pb.c = tiny_config(bias);
  pb.w = random_weights(pb.c, rng);
  pb.t = free_transforms(pb.c, rng);
  pb.q = bits < 16 ? flat_spec(pb.c, bits) : BlockQuantSpec{};
  pb.clip = random_clip(pb.q, pb.c, rng);
  pb.x = randn(rng, pb.B * pb.T * pb.c.hidden_size);
  pb.r = randn(rng, pb.x.size());
  return pb;
}

// The same with an IntactKV prefix of P entries (random K/V at the scale of the
// block's own K/V).
Problem make_prefix_problem(uint64_t seed, bool bias, int bits, int64_t P) {
  Problem pb = make_problem(seed, bias, bits);
  Rng rng(seed + 1000);
  pb.P = P;
  pb.pk = randn(rng, P * pb.c.kv_dim());
  pb.pv = randn(rng, P * pb.c.kv_dim());
  return pb;
}

// Central and one-sided differences of L along `dir` on `value`.
struct Fd {
  double central, gap;  // gap = |D+ − D−| (a kink shows up here)
};
Fd fd_along(Problem& pb, Vec* value, const Vec& dir, double eps, RoundTape<double>* tape) {
  const Vec v0 = *value;
  auto at = [&](double s) {
    for (size_t i = 0; i < v0.size(); ++i) (*value)[i] = v0[i] + s * dir[i];
    return pb.loss(tape);
  };
  const double lp = at(eps), lm = at(-eps), l0 = at(0.0);
  *value = v0;
  return {(lp - lm) / (2 * eps), std::fabs((lp - l0) - (l0 - lm)) / eps};
}

// Checks every gradient of `pb`: a random unit projection of each tensor and up
// to 40 single entries, relative to the tensor's gradient scale. The bound is
// 1e-6 plus the central difference's roundoff, 1e-14·Σ|y ⊙ r| / (ε·scale), which
// matters only for the few clip parameters with a tiny gradient.
void check_all(Problem& pb, RoundTape<double>* tape, const std::string& label) {
  const double kEps = 1e-5, kTol = 1e-6;
  BackwardOptions opt;
  opt.weights = true;
  opt.prefix = pb.P > 0;
  BlockGradsT<double> g = pb.grads(tape, opt);
  const double labs = pb.labs;
  auto bound = [&](double scale) { return kTol + 1e-14 * labs / (kEps * scale); };
  Rng rng(7);
  double worst_dir = 0.0, worst_entry = 0.0;
  std::string worst_dir_name, worst_entry_name;
  int n_entries = 0, n_tensors = 0;
  for (const Param& p : pb.params(g)) {
    SCOPED_TRACE(label + " " + p.name);
    ASSERT_EQ(p.grad->size(), p.value->size()) << "gradient missing or mis-sized";
    for (double v : *p.grad) ASSERT_TRUE(std::isfinite(v));
    const double gnorm = norm2(*p.grad), gmax = max_abs(*p.grad);
    if (gmax == 0.0) {  // e.g. a β_min whose clip never sets the scale: FD must agree
      const Fd f = fd_along(pb, p.value, randn(rng, p.value->size()), kEps, tape);
      EXPECT_LT(std::fabs(f.central), 1e-9) << "zero gradient, nonzero fd";
      std::printf("  %-34s %s: gradient exactly 0 (fd %.1e)\n", label.c_str(), p.name.c_str(),
                  f.central);
      continue;
    }
    // Random unit direction.
    Vec dir = randn(rng, p.value->size());
    const double dn = norm2(dir);
    for (double& e : dir) e /= dn;
    const Fd f = fd_along(pb, p.value, dir, kEps, tape);
    const double an = dot(*p.grad, dir);
    const double scale = gnorm * norm2(dir);
    const double err = std::fabs(f.central - an) / scale;
    EXPECT_LT(err, bound(scale)) << "fd " << f.central << " analytic " << an << " one-sided gap "
                                 << f.gap;
    if (err > worst_dir) worst_dir = err, worst_dir_name = p.name;
    ++n_tensors;
    // Single entries: all of a small tensor, a sample of a large one.
    const size_t n = p.value->size();
    const size_t take = std::min<size_t>(n, 40);
    for (size_t k = 0; k < take; ++k) {
      const size_t i = n <= 40 ? k : static_cast<size_t>(rng.below(n));
      Vec e(n, 0.0);
      e[i] = 1.0;
      const Fd fe = fd_along(pb, p.value, e, kEps, tape);
      const double ee = std::fabs(fe.central - (*p.grad)[i]) / gmax;
      EXPECT_LT(ee, bound(gmax)) << "entry " << i << " fd " << fe.central << " analytic "
                                 << (*p.grad)[i] << " one-sided gap " << fe.gap;
      if (ee > worst_entry) worst_entry = ee, worst_entry_name = p.name;
      ++n_entries;
    }
  }
  std::printf("  %-26s %d tensors, %d entries: max rel err projection %.2e (%s), entry %.2e (%s)\n",
              label.c_str(), n_tensors, n_entries, worst_dir, worst_dir_name.c_str(), worst_entry,
              worst_entry_name.c_str());
}

// True when the record point of `pb` has no kink along a random joint direction
// of every parameter (the one-sided differences agree).
bool kink_free(Problem& pb, RoundTape<double>* tape) {
  BackwardOptions opt;
  opt.weights = true;
  opt.prefix = pb.P > 0;
  BlockGradsT<double> g = pb.grads(tape, opt);
  Rng rng(11);
  const double eps = 1e-7;
  std::vector<Vec> v0, dir;
  const std::vector<Param> ps = pb.params(g);
  size_t n = 0;
  for (const Param& p : ps) n += p.value->size();
  double gn = 0.0;  // |g|
  for (const Param& p : ps) {
    v0.push_back(*p.value);
    dir.push_back(randn(rng, p.value->size(), 1.0 / std::sqrt(static_cast<double>(n))));
    gn += dot(*p.grad, *p.grad);
  }
  gn = std::sqrt(gn);
  auto at = [&](double s) {
    for (size_t k = 0; k < ps.size(); ++k)
      for (size_t i = 0; i < v0[k].size(); ++i) (*ps[k].value)[i] = v0[k][i] + s * dir[k][i];
    return pb.loss(tape);
  };
  const double lp = at(eps), lm = at(-eps), l0 = at(0.0);
  for (size_t k = 0; k < ps.size(); ++k) *ps[k].value = v0[k];
  // Smooth: the gap is ε·dirᵀ∇²L·dir (~1e-7·|g|); a kink leaves an O(1) share.
  const double dp = (lp - l0) / eps, dm = (l0 - lm) / eps;
  return std::fabs(dp - dm) < 1e-5 * gn;
}

TEST(QBlockFd, QuantizersOff) {
  for (bool bias : {false, true}) {
    Problem pb = make_problem(bias ? 2 : 1, bias, 16);
    check_all(pb, nullptr, bias ? "quant off, qwen2 bias" : "quant off, llama");
  }
}

TEST(QBlockFd, QuantizersOnSurrogate) {
  // FlatQuant's quantizers on a fine grid (see the file comment), at the first
  // seed whose record point is kink-free.
  for (bool bias : {false, true}) {
    const int bits = 10;
    int seed = 0;
    Problem pb;
    RoundTape<double> tape;
    for (seed = 1; seed <= 40; ++seed) {
      pb = make_problem(100 + seed, bias, bits);
      if (kink_free(pb, &tape)) break;
    }
    ASSERT_LE(seed, 40) << "no kink-free seed";
    std::printf("  (bits %d, seed %d)\n", bits, 100 + seed);
    check_all(pb, &tape, bias ? "quant on, qwen2 bias" : "quant on, llama");
  }
}

// Same gradients with every chunking of the weight path (rows of W4, P_v heads).
TEST(QBlock, ChunkedWeightPathMatches) {
  Problem pb = make_problem(5, true, 4);
  BackwardOptions opt;
  opt.weights = true;
  RoundTape<double> tape;
  const BlockGradsT<double> g0 = pb.grads(&tape, opt);
  ::setenv("QCAL_QBLOCK_CHUNK_ELEMS", "40", 1);  // 2 rows of 16 (4 for v: one head)
  RoundTape<double> tape2;
  const BlockGradsT<double> g1 = pb.grads(&tape2, opt);
  ::unsetenv("QCAL_QBLOCK_CHUNK_ELEMS");
  ASSERT_EQ(tape.offsets.size(), tape2.offsets.size());
  for (size_t i = 0; i < tape.offsets.size(); ++i)
    EXPECT_NEAR(tape.offsets[i], tape2.offsets[i], 1e-9);
  const auto l0 = grad_list(g0), l1 = grad_list(g1);
  for (size_t k = 0; k < l0.size(); ++k) {
    ASSERT_EQ(l0[k].second->size(), l1[k].second->size()) << l0[k].first;
    for (size_t i = 0; i < l0[k].second->size(); ++i)
      EXPECT_NEAR((*l0[k].second)[i], (*l1[k].second)[i],
                  1e-12 * std::max(1.0, max_abs(*l0[k].second)))
          << l0[k].first;
  }
}

// Backward options select what is computed; gradients accumulate across calls.
TEST(QBlock, OptionsAndAccumulation) {
  Problem pb = make_problem(6, false, 4);
  RoundTape<double> tape;
  BackwardOptions all;
  all.weights = true;
  const BlockGradsT<double> ga = pb.grads(&tape, all);
  BlockGradsT<double> gd = pb.grads(&tape);  // defaults: no weights
  EXPECT_TRUE(gd.w.w[kQ].empty());
  EXPECT_TRUE(gd.w.input_norm.empty());
  EXPECT_EQ(gd.dx, ga.dx);
  EXPECT_EQ(gd.t.a1, ga.t.a1);
  EXPECT_EQ(gd.clip.w_max[kDown], ga.clip.w_max[kDown]);
  BackwardOptions only_clip;
  only_clip.input = only_clip.transforms = false;
  const BlockGradsT<double> gc = pb.grads(&tape, only_clip);
  EXPECT_TRUE(gc.dx.empty());
  EXPECT_TRUE(gc.t.a1.empty());
  EXPECT_TRUE(gc.t.ca.empty());
  for (int p = 0; p < kNumProj; ++p) {
    EXPECT_EQ(gc.clip.w_max[p], ga.clip.w_max[p]) << p;
    EXPECT_EQ(gc.clip.act_min[p], ga.clip.act_min[p]) << p;
  }
  // A second backward on the same tape doubles the accumulated entries.
  QBlock<double> blk(pb.c, &pb.w, &pb.t, &pb.q, &pb.clip);
  auto tp = make_tape<double>();
  Vec y(pb.x.size());
  blk.forward(pb.x.data(), y.data(), pb.B, pb.T, tp.get());
  BlockGradsT<double> g2;
  blk.backward(*tp, pb.r.data(), &g2);
  const Vec once = g2.t.pv, dx = g2.dx;
  blk.backward(*tp, pb.r.data(), &g2);
  for (size_t i = 0; i < once.size(); ++i)
    EXPECT_NEAR(g2.t.pv[i], 2 * once[i], 1e-12 * std::max(1.0, std::fabs(once[i])));
  EXPECT_EQ(g2.dx, dx);  // dx is overwritten
}

// ---- transform-only block == FP block

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return num / den;
}

TEST(QBlock, TransformOnlyEqualsFpBlock) {
  for (bool bias : {false, true}) {
    const ModelConfig c = tiny_config(bias);
    Rng rng(bias ? 21 : 20);
    const BlockWeightsT<float> w = cast_weights<float>(random_weights(c, rng));
    const int64_t B = 2, T = 5, N = B * T;
    const std::vector<float> x = as<float>(randn(rng, N * c.hidden_size));
    std::vector<float> ref = x;
    block_forward(c, to_layer_weights(w, c), ref.data(), B, T);

    struct Case {
      const char* name;
      BlockTransformsT<float> t;
    };
    std::vector<Case> cases;
    cases.push_back({"empty transforms", {}});
    cases.push_back({"orthogonal + diagonals", to_float(inverse_transforms(c, rng, true))});
    cases.push_back({"U·diag(σ)·Vᵀ + diagonals", to_float(inverse_transforms(c, rng, false))});
    const BlockQuantSpec off;
    const BlockClipT<float> no_clip;
    for (const Case& k : cases) {
      QBlock<float> blk(c, &w, &k.t, &off, &no_clip);
      std::vector<float> y(x.size());
      blk.forward(x.data(), y.data(), B, T);
      const double e = rel_diff(y, ref);
      std::printf("  %-8s %-28s max|y − block_forward| / max|y| = %.2e\n", bias ? "qwen2" : "llama",
                  k.name, e);
      EXPECT_LT(e, 1e-5) << k.name;
      // In place (y == x) gives the same.
      std::vector<float> xi = x;
      blk.forward(xi.data(), xi.data(), B, T);
      EXPECT_LT(rel_diff(xi, y), 1e-7) << k.name;
    }
    // Null transforms / spec / clip are the FP block too.
    QBlock<float> plain(c, &w, nullptr, nullptr, nullptr);
    std::vector<float> y(x.size());
    plain.forward(x.data(), y.data(), B, T);
    EXPECT_LT(rel_diff(y, ref), 1e-5);
  }
}

// ---- float vs double (4-bit FlatQuant, transforms on)

TEST(QBlock, FloatMatchesDouble) {
  for (int bits : {16, 4}) {
    Problem pb = make_problem(31, true, bits);
    RoundTape<double> tape_d;
    BackwardOptions opt;
    opt.weights = true;
    QBlock<double> bd(pb.c, &pb.w, &pb.t, &pb.q, &pb.clip);
    auto td = make_tape<double>();
    Vec yd(pb.x.size());
    bd.forward(pb.x.data(), yd.data(), pb.B, pb.T, td.get(), nullptr, &tape_d);
    BlockGradsT<double> gd;
    bd.backward(*td, pb.r.data(), &gd, opt);

    // Float replays the double's rounding offsets, so both round identically.
    const BlockWeightsT<float> wf = cast_weights<float>(pb.w);
    const BlockTransformsT<float> tf = to_float(pb.t);
    const BlockClipT<float> cf = to_float(pb.clip);
    RoundTape<float> tape_f;
    tape_f.mode = RoundTape<float>::Mode::kReplay;
    tape_f.offsets = as<float>(tape_d.offsets);
    QBlock<float> bf(pb.c, &wf, &tf, &pb.q, &cf);
    auto tff = make_tape<float>();
    const std::vector<float> xf = as<float>(pb.x), rf = as<float>(pb.r);
    std::vector<float> yf(xf.size());
    bf.forward(xf.data(), yf.data(), pb.B, pb.T, tff.get(), nullptr, &tape_f);
    EXPECT_EQ(tape_f.pos, tape_f.offsets.size());
    BlockGradsT<float> gf;
    bf.backward(*tff, rf.data(), &gf, opt);

    double ey = 0.0;
    for (size_t i = 0; i < yd.size(); ++i) ey = std::max(ey, std::fabs(yf[i] - yd[i]));
    ey /= max_abs(yd);
    EXPECT_LT(ey, 2e-6);
    const auto ld = grad_list(gd);
    const auto lf = grad_list(gf);
    double worst = 0.0;
    std::string worst_name;
    for (size_t k = 0; k < ld.size(); ++k) {
      const Vec& a = *ld[k].second;
      const Vec b = f64(*lf[k].second);
      ASSERT_EQ(a.size(), b.size()) << ld[k].first;
      if (a.empty()) continue;
      double e = 0.0;
      for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
      e /= std::max(max_abs(a), 1e-30);
      EXPECT_LT(e, 1e-4) << ld[k].first;
      if (e > worst) worst = e, worst_name = ld[k].first;
    }
    std::printf("  bits %-2d float vs double: y %.2e, worst gradient %.2e (%s)\n", bits, ey, worst,
                worst_name.c_str());
  }
}

// ---- hook and effective weights (double block, 4-bit FlatQuant, transforms on)

// Y = Lᵀ X R per row (n1·n2 columns), scalar.
Vec kron_ref(const Vec& x, const Vec& L, const Vec& R, int64_t rows, int64_t n1, int64_t n2) {
  Vec y(x.size(), 0.0);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < n1; ++i)
      for (int64_t j = 0; j < n2; ++j) {
        double s = 0.0;
        for (int64_t a = 0; a < n1; ++a)
          for (int64_t b = 0; b < n2; ++b)
            s += L[a * n1 + i] * x[t * n1 * n2 + a * n2 + b] * R[b * n2 + j];
        y[t * n1 * n2 + i * n2 + j] = s;
      }
  return y;
}

Vec rmsnorm_scalar(const Vec& x, const Vec& g, int64_t rows, int64_t C, double eps) {
  Vec y(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t j = 0; j < C; ++j) ss += x[r * C + j] * x[r * C + j];
    const double inv = 1.0 / std::sqrt(ss / C + eps);
    for (int64_t j = 0; j < C; ++j) y[r * C + j] = g[j] * x[r * C + j] * inv;
  }
  return y;
}

// y (N, O) += x (N, I) · W (O, I)ᵀ
void add_linear(Vec* y, const Vec& x, const Vec& W, int64_t N, int64_t I, int64_t O) {
  for (int64_t t = 0; t < N; ++t)
    for (int64_t o = 0; o < O; ++o) {
      double s = 0.0;
      for (int64_t i = 0; i < I; ++i) s += x[t * I + i] * W[o * I + i];
      (*y)[t * O + o] += s;
    }
}

double max_rel(const Vec& a, const Vec& b) {
  double e = 0.0;
  for (size_t i = 0; i < a.size(); ++i) e = std::max(e, std::fabs(a[i] - b[i]));
  return e / std::max(max_abs(b), 1e-30);
}

TEST(QBlock, HookSeesQuantizedInputs) {
  Problem pb = make_problem(41, true, 4);
  const ModelConfig& c = pb.c;
  const int64_t N = pb.B * pb.T, H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim();
  std::vector<std::string> names;
  std::vector<Vec> ins;
  std::vector<std::pair<int64_t, int64_t>> shapes;
  LinearInputHook hook = [&](const std::string& proj, const float* x, int64_t rows, int64_t in) {
    names.push_back(proj);
    shapes.push_back({rows, in});
    ins.push_back(Vec(x, x + rows * in));
  };
  QBlock<double> blk(c, &pb.w, &pb.t, &pb.q, &pb.clip);
  Vec y(pb.x.size());
  blk.forward(pb.x.data(), y.data(), pb.B, pb.T, nullptr, hook);
  ASSERT_EQ(names.size(), 7u);
  for (int p = 0; p < kNumProj; ++p) {
    EXPECT_EQ(names[p], kProjNames[p]);
    EXPECT_EQ(shapes[p].first, N);
    EXPECT_EQ(shapes[p].second, p == kO ? Q : (p == kDown ? I : H));
  }
  // q/k/v: the transformed input norm output, each through its own LAC quantizer.
  auto quantized = [&](int p, const Vec& xt, int64_t cols) {
    Vec out(xt.size());
    FakeQuantSaved<double> sv;
    fake_quant_fwd(pb.q.act[p], out.data(), xt.data(), N, cols, pb.clip.act_max[p].data(),
                   pb.clip.act_min[p].data(), 1, &sv);
    return out;
  };
  auto input_side = [&](const Vec& h, const Vec& cdiag, const Vec& L, const Vec& R) {
    Vec hc = h;
    for (int64_t t = 0; t < N; ++t)
      for (int64_t j = 0; j < H; ++j) hc[t * H + j] *= cdiag[j];
    return kron_ref(hc, L, R, N, 4, 4);
  };
  const Vec ht = input_side(rmsnorm_scalar(pb.x, pb.w.input_norm, N, H, c.rms_norm_eps), pb.t.ca,
                            pb.t.a1, pb.t.a2);
  for (int p = kQ; p <= kV; ++p) {
    const double e = max_rel(ins[p], quantized(p, ht, H));
    std::printf("  hook %-18s vs scalar transform + fake_quant: %.2e\n", kProjNames[p], e);
    EXPECT_LT(e, 1e-6) << kProjNames[p];
  }
  EXPECT_GT(max_rel(ins[kQ], ins[kK]), 1e-3);  // each has its own clip parameters
  EXPECT_GT(max_rel(ins[kK], ins[kV]), 1e-3);
  // The residual after attention from the o input and o's effective weight, then
  // gate/up from it.
  Vec x1 = pb.x;
  add_linear(&x1, ins[kO], blk.effective_weight(kO, true), N, Q, H);
  const Vec mt = input_side(rmsnorm_scalar(x1, pb.w.post_norm, N, H, c.rms_norm_eps), pb.t.cu,
                            pb.t.u1, pb.t.u2);
  for (int p = kGate; p <= kUp; ++p) {
    const double e = max_rel(ins[p], quantized(p, mt, H));
    std::printf("  hook %-18s vs scalar transform + fake_quant: %.2e\n", kProjNames[p], e);
    EXPECT_LT(e, 1e-6) << kProjNames[p];
  }
  // The output from the down input and down's effective weight.
  Vec yr = x1;
  add_linear(&yr, ins[kDown], blk.effective_weight(kDown, true), N, I, H);
  const double ey = max_rel(yr, y);
  std::printf("  y vs x + o_in·W̃oᵀ + down_in·W̃downᵀ (effective weights): %.2e\n", ey);
  EXPECT_LT(ey, 1e-6);
  // The o input is on the 4-bit grid: per row at most 16 distinct values.
  for (int64_t t = 0; t < N; ++t) {
    Vec row(ins[kO].begin() + t * Q, ins[kO].begin() + (t + 1) * Q);
    std::sort(row.begin(), row.end());
    int distinct = 1;
    for (int64_t j = 1; j < Q; ++j) distinct += row[j] - row[j - 1] > 1e-6 * max_abs(row);
    EXPECT_LE(distinct, 16);
  }
}

TEST(QBlock, EffectiveWeightsAndBias) {
  Problem pb = make_problem(51, true, 4);
  const ModelConfig& c = pb.c;
  const int64_t H = c.hidden_size, K = c.kv_dim(), d = c.head_dim;
  QBlock<double> blk(c, &pb.w, &pb.t, &pb.q, &pb.clip);
  // v: P_vᵀ per head on kron_rows(W ⊙ 1/c_a; a1_it, a2_it); its bias b·P_v.
  Vec w1 = pb.w.w[kV];
  for (int64_t r = 0; r < K; ++r)
    for (int64_t j = 0; j < H; ++j) w1[r * H + j] /= pb.t.ca[j];
  const Vec w2 = kron_ref(w1, pb.t.a1_it, pb.t.a2_it, K, 4, 4);
  Vec w3(w2.size(), 0.0), b3(K, 0.0);
  for (int64_t h = 0; h < K / d; ++h)
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t k = 0; k < d; ++k) {
        for (int64_t j = 0; j < H; ++j)
          w3[(h * d + i) * H + j] += pb.t.pv[k * d + i] * w2[(h * d + k) * H + j];
        b3[h * d + i] += pb.w.bias[kV][h * d + k] * pb.t.pv[k * d + i];
      }
    }
  // Unquantized: LWC-clamped per row to [min·σ(β_min), max·σ(β_max)].
  const Vec wv = blk.effective_weight(kV, false);
  auto sig = [](double b) { return 1.0 / (1.0 + std::exp(-b)); };
  double e = 0.0;
  int clamped = 0;
  for (int64_t r = 0; r < K; ++r) {
    const auto first = w3.begin() + r * H, last = first + H;
    const double hi = *std::max_element(first, last) * sig(pb.clip.w_max[kV][r]);
    const double lo = *std::min_element(first, last) * sig(pb.clip.w_min[kV][r]);
    for (int64_t j = 0; j < H; ++j) {
      const double want = std::min(std::max(w3[r * H + j], lo), hi);
      clamped += want != w3[r * H + j];
      e = std::max(e, std::fabs(wv[r * H + j] - want));
    }
  }
  EXPECT_LT(e, 1e-12);
  EXPECT_GT(clamped, 0);
  const Vec bv = blk.effective_bias(kV);
  ASSERT_EQ(bv.size(), b3.size());
  for (int64_t i = 0; i < K; ++i) EXPECT_NEAR(bv[i], b3[i], 1e-12);
  EXPECT_EQ(blk.effective_bias(kQ), pb.w.bias[kQ]);
  EXPECT_TRUE(blk.effective_bias(kO).empty());
  // Quantized = plain per-row min/max RTN of the clamped weights (what
  // reparameterization then stores), for every linear.
  for (int p = 0; p < kNumProj; ++p) {
    const Vec clampedw = blk.effective_weight(p, false);
    const Vec qw = blk.effective_weight(p, true);
    const auto s = proj_shape(c, kProjNames[p]);
    FakeQuantSpec rtn;
    rtn.bits = 4;
    rtn.min_scale = 1e-5;
    Vec want(qw.size());
    FakeQuantSaved<double> sv;
    fake_quant_fwd(rtn, want.data(), clampedw.data(), s[0], s[1],
                   static_cast<const double*>(nullptr), static_cast<const double*>(nullptr), 0,
                   &sv);
    EXPECT_LT(max_rel(qw, want), 1e-12) << kProjNames[p];
  }
}

// ---- IntactKV prefix (set_prefix)

TEST(QBlockFd, PrefixQuantizersOff) {
  for (bool bias : {false, true}) {
    Problem pb = make_prefix_problem(bias ? 4 : 3, bias, 16, 2);
    check_all(pb, nullptr, bias ? "prefix, quant off, qwen2" : "prefix, quant off, llama");
  }
}

TEST(QBlockFd, PrefixQuantizersOnSurrogate) {
  // As QuantizersOnSurrogate, with a prefix of 3 (its entries are never quantized).
  for (bool bias : {false, true}) {
    const int bits = 10;
    int seed = 0;
    Problem pb;
    RoundTape<double> tape;
    for (seed = 1; seed <= 40; ++seed) {
      pb = make_prefix_problem(200 + seed, bias, bits, 3);
      if (kink_free(pb, &tape)) break;
    }
    ASSERT_LE(seed, 40) << "no kink-free seed";
    std::printf("  (bits %d, seed %d)\n", bits, 200 + seed);
    check_all(pb, &tape, bias ? "prefix, quant on, qwen2" : "prefix, quant on, llama");
  }
}

// With quantizers off, a block with the prefix cache of P tokens computes rows
// P.. of the same block run on [prefix tokens; sequence] (positions continue at P).
TEST(QBlock, PrefixEqualsLongerSequence) {
  for (bool bias : {false, true}) {
    const ModelConfig c = tiny_config(bias);
    Rng rng(bias ? 51 : 50);
    const BlockWeightsT<double> w = random_weights(c, rng);
    BlockTransformsT<double> t;
    Vec unused;
    factor(c.head_dim, rng, false, &t.pk, &unused);
    factor(c.head_dim, rng, false, &t.pk_it, &unused);  // any matrix: both runs use it
    const int64_t B = 2, T = 5, P = 3, H = c.hidden_size, K = c.kv_dim(), d = c.head_dim;
    const Vec xp = randn(rng, B * P * H), x = randn(rng, B * T * H);
    // The prefix cache of each sequence: K = RoPE(RMSNorm(xp)·Wkᵀ + bk)·P_k, V likewise
    // without RoPE (positions 0..P−1).
    QBlock<double> blk(c, &w, &t, nullptr, nullptr);
    Vec y_ref(B * T * H), y(B * T * H);
    for (int64_t b = 0; b < B; ++b) {
      const Vec xpb(xp.begin() + b * P * H, xp.begin() + (b + 1) * P * H);
      const Vec h = rmsnorm_scalar(xpb, w.input_norm, P, H, c.rms_norm_eps);
      Vec k(P * K, 0.0), v(P * K, 0.0);
      add_linear(&k, h, w.w[kK], P, H, K);
      add_linear(&v, h, w.w[kV], P, H, K);
      if (bias)
        for (int64_t i = 0; i < P; ++i)
          for (int64_t j = 0; j < K; ++j)
            k[i * K + j] += w.bias[1][j], v[i * K + j] += w.bias[2][j];
      rope_fwd(k.data(), P, c.num_key_value_heads, d, 0, c.rope_theta);
      Vec kc(P * K, 0.0);
      for (int64_t r = 0; r < P * c.num_key_value_heads; ++r)
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j) kc[r * d + j] += k[r * d + i] * t.pk[i * d + j];
      // One sequence [xp_b; x_b] without a prefix: rows P.. are the reference.
      Vec xl(xpb);
      xl.insert(xl.end(), x.begin() + b * T * H, x.begin() + (b + 1) * T * H);
      Vec yl(xl.size());
      blk.set_prefix(nullptr, nullptr, 0);
      blk.forward(xl.data(), yl.data(), 1, P + T);
      std::copy(yl.begin() + P * H, yl.end(), y_ref.begin() + b * T * H);
      blk.set_prefix(kc.data(), v.data(), P);
      EXPECT_EQ(blk.prefix_len(), P);
      blk.forward(x.data() + b * T * H, y.data() + b * T * H, 1, T);
    }
    const double e = max_rel(y, y_ref);
    std::printf("  %s: prefix block vs the longer sequence, max rel %.2e\n",
                bias ? "qwen2" : "llama", e);
    EXPECT_LT(e, 1e-12);
    // Negative control: the positions matter (a prefix of 0 length changes rows).
    blk.set_prefix(nullptr, nullptr, 0);
    EXPECT_EQ(blk.prefix_len(), 0);
    Vec y0(x.size());
    blk.forward(x.data(), y0.data(), B, T);
    EXPECT_GT(max_rel(y0, y_ref), 1e-3);
  }
}

// Without a prefix (never set, or cleared) the block is bit-identical; the prefix
// gradient is only produced when asked for and accumulates over sequences.
TEST(QBlock, PrefixOffIsUnchangedAndGradientsAccumulate) {
  Problem pb = make_prefix_problem(61, true, 4, 2);
  QBlock<double> a(pb.c, &pb.w, &pb.t, &pb.q, &pb.clip);
  QBlock<double> b(pb.c, &pb.w, &pb.t, &pb.q, &pb.clip);
  b.set_prefix(pb.pk.data(), pb.pv.data(), pb.P);
  b.set_prefix(pb.pk.data(), pb.pv.data(), 0);
  auto ta = make_tape<double>(), tb = make_tape<double>();
  Vec ya(pb.x.size()), yb(pb.x.size());
  a.forward(pb.x.data(), ya.data(), pb.B, pb.T, ta.get());
  b.forward(pb.x.data(), yb.data(), pb.B, pb.T, tb.get());
  EXPECT_EQ(ya, yb);
  BlockGradsT<double> ga, gb;
  BackwardOptions with_prefix;
  with_prefix.prefix = true;
  a.backward(*ta, pb.r.data(), &ga);
  b.backward(*tb, pb.r.data(), &gb, with_prefix);
  EXPECT_EQ(ga.dx, gb.dx);
  EXPECT_TRUE(gb.prefix_k.empty());  // no prefix, nothing to fill

  // With the prefix: not asked → empty; asked → the sum of the per-sequence gradients.
  QBlock<double> c(pb.c, &pb.w, &pb.t, &pb.q, &pb.clip);
  c.set_prefix(pb.pk.data(), pb.pv.data(), pb.P);
  auto tc = make_tape<double>();
  Vec yc(pb.x.size());
  c.forward(pb.x.data(), yc.data(), pb.B, pb.T, tc.get());
  BlockGradsT<double> g_no, g_all;
  c.backward(*tc, pb.r.data(), &g_no);
  EXPECT_TRUE(g_no.prefix_k.empty() && g_no.prefix_v.empty());
  c.backward(*tc, pb.r.data(), &g_all, with_prefix);
  ASSERT_EQ(g_all.prefix_k.size(), static_cast<size_t>(pb.P * pb.c.kv_dim()));
  const int64_t H = pb.c.hidden_size, n = pb.T * H;
  Vec sum_k(g_all.prefix_k.size(), 0.0), sum_v(sum_k.size(), 0.0);
  for (int64_t s = 0; s < pb.B; ++s) {
    auto t1 = make_tape<double>();
    Vec y1(n);
    c.forward(pb.x.data() + s * n, y1.data(), 1, pb.T, t1.get());
    BlockGradsT<double> g1;
    c.backward(*t1, pb.r.data() + s * n, &g1, with_prefix);
    for (size_t i = 0; i < sum_k.size(); ++i)
      sum_k[i] += g1.prefix_k[i], sum_v[i] += g1.prefix_v[i];
  }
  EXPECT_LT(max_rel(g_all.prefix_k, sum_k), 1e-12);
  EXPECT_LT(max_rel(g_all.prefix_v, sum_v), 1e-12);
  EXPECT_GT(max_abs(sum_k), 0.0);
}

}  // namespace
}  // namespace qcal::calib

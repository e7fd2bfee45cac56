#include "worker/calib/block.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "common/dtype.h"
#include "common/safetensors.h"
#include "kernels/gemm.h"
#include "kernels/grad.h"
#include "kernels/ops.h"

namespace qcal::calib {

namespace {

using Vec = std::vector<double>;
using nlohmann::json;

Vec to_d(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }
std::vector<float> to_f(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

// A (rows, n) ← A·M (M n×n), in float64, cast back once.
void right_mul(std::vector<float>& A, int64_t rows, int64_t n, const Vec& M) {
  Vec a = to_d(A), out(static_cast<size_t>(rows * n));
  gemm_t(false, false, rows, n, n, 1.0, a.data(), n, M.data(), n, 0.0, out.data(), n);
  A = to_f(out);
}
// A (n, cols) ← Mᵀ·A (M n×n), in float64, cast back once.
void left_mul_t(std::vector<float>& A, int64_t n, int64_t cols, const Vec& M) {
  Vec a = to_d(A), out(static_cast<size_t>(n * cols));
  gemm_t(true, false, n, cols, n, 1.0, M.data(), n, a.data(), cols, 0.0, out.data(), cols);
  A = to_f(out);
}
// Columns of W (rows, n) times s (n), in float64.
void scale_cols(std::vector<float>& W, int64_t n, const Vec& s) {
  const int64_t rows = static_cast<int64_t>(W.size()) / n;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float& w = W[static_cast<size_t>(r * n + j)];
      w = static_cast<float>(static_cast<double>(w) * s[static_cast<size_t>(j)]);
    }
}

double sigmoid(double b) { return 1.0 / (1.0 + std::exp(-b)); }

void update_max(std::vector<float>& m, const float* x, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j)
      m[static_cast<size_t>(j)] = std::max(m[static_cast<size_t>(j)], std::fabs(x[r * n + j]));
}

// ---- Persistence (safetensors with one JSON metadata entry; little-endian host).
struct StEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string_view bytes;
};
template <typename T>
std::string_view bytes_of(const std::vector<T>& v) {
  return {reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T)};
}
template <typename T>
DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  if constexpr (std::is_same_v<T, double>) return DType::kF64;
  if constexpr (std::is_same_v<T, uint8_t>) return DType::kU8;
  if constexpr (std::is_same_v<T, int32_t>) return DType::kI32;
  return DType::kI64;
}
template <typename T>
void add_vec(std::vector<StEntry>& e, std::string name, const std::vector<T>& v) {
  if (!v.empty())
    e.push_back({std::move(name), dtype_of<T>(), {static_cast<int64_t>(v.size())}, bytes_of(v)});
}
Status write_st(const std::string& path, const std::vector<StEntry>& entries,
                const std::string& meta_key, const json& meta) {
  SafetensorsWriter w(path);
  w.set_metadata(meta_key, meta.dump());
  for (const StEntry& e : entries) w.add(e.name, e.dtype, e.shape);
  QCAL_RETURN_IF_ERROR(w.begin());
  for (const StEntry& e : entries) QCAL_RETURN_IF_ERROR(w.write(e.bytes));
  return w.finish();
}
// Tensor `name` as a flat vector (absent: empty, or kCorrupt when want > 0); kCorrupt
// for another dtype or, with want ≥ 0, another element count.
template <typename T>
Result<std::vector<T>> read_vec(const SafetensorsFile& f, const std::string& name, int64_t want) {
  std::vector<T> v;
  const TensorInfo* t = f.find(name);
  if (!t) {
    if (want > 0) return corrupt(f.path() + ": tensor " + name + " is missing");
    return v;
  }
  if (t->dtype != dtype_of<T>())
    return corrupt(f.path() + ": tensor " + name + " is " + dtype_name(t->dtype) + ", expected " +
                   dtype_name(dtype_of<T>()));
  const std::string_view raw = f.raw(*t);
  v.resize(raw.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), raw.data(), v.size() * sizeof(T));
  if (want >= 0 && static_cast<int64_t>(v.size()) != want)
    return corrupt(f.path() + ": tensor " + name + " has " + std::to_string(v.size()) +
                   " elements, expected " + std::to_string(want));
  return v;
}
Result<json> read_meta(const SafetensorsFile& f, const std::string& key,
                       const std::string& format) {
  auto it = f.header().metadata.find(key);
  if (it == f.header().metadata.end())
    return corrupt(f.path() + ": no " + key + " metadata (not a " + format + " file)");
  json j = json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.value("format", "") != format || !j.contains("version") ||
      !j["version"].is_number_integer())
    return corrupt(f.path() + ": " + key + " metadata is not a " + format + " header");
  if (j["version"].get<int64_t>() != 1)
    return corrupt(f.path() + ": " + format + " version " + j["version"].dump() +
                   " (this build reads version 1)");
  return j;
}

template <typename T, typename F>
void for_each_transform(T& t, F&& f) {
  f("a1", t.a1), f("a2", t.a2), f("a1_it", t.a1_it), f("a2_it", t.a2_it), f("ca", t.ca);
  f("u1", t.u1), f("u2", t.u2), f("u1_it", t.u1_it), f("u2_it", t.u2_it), f("cu", t.cu);
  f("d1", t.d1), f("d2", t.d2), f("d1_it", t.d1_it), f("d2_it", t.d2_it), f("cd", t.cd);
  f("po", t.po), f("po_it", t.po_it), f("pv", t.pv), f("pv_it", t.pv_it);
  f("pk", t.pk), f("pk_it", t.pk_it);
}

int64_t side(const std::vector<float>& m) {
  if (m.empty()) return 1;
  const int64_t n = static_cast<int64_t>(m.size());
  const int64_t s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  return s * s == n ? s : -1;
}

Status check_online(const BlockTransformsT<float>& t, const ModelConfig& c, const std::string& at) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, d = c.head_dim,
                nh = c.num_attention_heads;
  auto pair = [&](const std::vector<float>& x, const std::vector<float>& y, int64_t n,
                  const char* what) -> Status {
    if (x.empty() && y.empty()) return Status::ok();
    const int64_t a = side(x), b = side(y);
    if (a < 0 || b < 0 || a * b != n)
      return corrupt(at + ": online " + what + " factors do not multiply to " + std::to_string(n));
    return Status::ok();
  };
  QCAL_RETURN_IF_ERROR(pair(t.a1, t.a2, H, "a1/a2"));
  QCAL_RETURN_IF_ERROR(pair(t.u1, t.u2, H, "u1/u2"));
  QCAL_RETURN_IF_ERROR(pair(t.d1, t.d2, I, "d1/d2"));
  const std::pair<const std::vector<float>*, int64_t> sq[] = {
      {&t.po, nh}, {&t.pk, d}, {&t.pk_it, d}};
  for (const auto& [m, n] : sq)
    if (!m->empty() && static_cast<int64_t>(m->size()) != n * n)
      return corrupt(at + ": an online head transform is not " + std::to_string(n) + "x" +
                     std::to_string(n));
  bool weight_side = false;
  for (const auto* v : {&t.a1_it, &t.a2_it, &t.u1_it, &t.u2_it, &t.d1_it, &t.d2_it, &t.po_it, &t.pv,
                        &t.pv_it, &t.ca, &t.cu, &t.cd})
    weight_side = weight_side || !v->empty();
  if (weight_side) return corrupt(at + ": a weight-side transform among the online ones");
  return Status::ok();
}

json act_json(const NativeActQuant& a) {
  return {{"bits", a.bits}, {"sym", a.sym}, {"group", a.group}, {"clip", a.clip}};
}
Result<NativeActQuant> act_from_json(const json& j, const std::string& at) {
  NativeActQuant a;
  if (!j.is_object() || !j.contains("bits") || !j["bits"].is_number_integer() ||
      !j.contains("sym") || !j["sym"].is_boolean() || !j.contains("group") ||
      !j["group"].is_number_integer() || !j.contains("clip") || !j["clip"].is_number())
    return corrupt(at + ": quantizer entry needs bits, sym, group, clip");
  a.bits = j["bits"].get<int>();
  a.sym = j["sym"].get<bool>();
  a.group = j["group"].get<int64_t>();
  a.clip = j["clip"].get<float>();
  if (a.bits < 2 || a.bits > 16 || !(a.clip > 0 && a.clip <= 1) || (a.group != -1 && a.group < 1))
    return corrupt(at + ": quantizer bits / group / clip out of range");
  return a;
}

constexpr const char* kBlockMeta = "qcal_block";
constexpr const char* kBlockFormat = "qcal.block";
constexpr const char* kFittedMeta = "qcal_fitted";
constexpr const char* kFittedFormat = "qcal.fitted";

}  // namespace

// ---------------------------------------------------------------- statistics

void ActStats::init(int64_t H, int64_t I) {
  attn.assign(static_cast<size_t>(H), 1e-5f);
  mlp.assign(static_cast<size_t>(H), 1e-5f);
  down.assign(static_cast<size_t>(I), 1e-5f);
}

void ActStats::update(const std::string& proj, const float* x, int64_t rows, int64_t in) {
  if (proj == kProjNames[kQ]) update_max(attn, x, rows, in);
  if (proj == kProjNames[kGate]) update_max(mlp, x, rows, in);
  if (proj == kProjNames[kDown]) update_max(down, x, rows, in);
}

void ActStats::merge(const ActStats& o) {
  auto mx = [](std::vector<float>& a, const std::vector<float>& b) {
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) a[i] = std::max(a[i], b[i]);
  };
  mx(attn, o.attn);
  mx(mlp, o.mlp);
  mx(down, o.down);
}

// ---------------------------------------------------------------- deployed form

Deployed deploy_block(const ModelConfig& c, const BlockWeightsT<float>& w,
                      const BlockTransformsT<double>& t, const BlockQuantSpec& wq,
                      const BlockClipT<double>& clip) {
  return deploy_block(c, BlockWeightsT<float>(w), t, wq, clip);
}

Deployed deploy_block(const ModelConfig& c, BlockWeightsT<float>&& w_in,
                      const BlockTransformsT<double>& t, const BlockQuantSpec& wq,
                      const BlockClipT<double>& clip) {
  Deployed dl;
  dl.w = std::move(w_in);
  const BlockWeightsT<float>& w = dl.w;  // its biases are read before they change
  const BlockWeightsT<double> wd = cast_weights<double>(w);
  QBlock<double> qb(c, &wd, &t, &wq, &clip);
  for (int p = 0; p < kNumProj; ++p) dl.w.w[p] = to_f(qb.effective_weight(p, /*quantized=*/false));
  for (int p = 0; p < 3; ++p)
    if (!w.bias[p].empty()) dl.w.bias[p] = to_f(qb.effective_bias(p));
  // Diagonals: x ⊙ c on the activation side goes into the norm γ (ca, cu), and into the
  // rows of W_up for cd (z ⊙ cd = silu(gate) ⊙ (up ⊙ cd)); a positive or negative row
  // scale commutes with per-row symmetric quantization (the grid is symmetric up to
  // the unused −2^(b−1) code and rounding is odd-symmetric).
  auto fold_diag = [](std::vector<float>& g, const Vec& cdiag) {
    for (size_t j = 0; j < g.size(); ++j)
      g[j] = static_cast<float>(static_cast<double>(g[j]) * cdiag[j]);
  };
  if (!t.ca.empty()) fold_diag(dl.w.input_norm, t.ca);
  if (!t.cu.empty()) fold_diag(dl.w.post_norm, t.cu);
  if (!t.cd.empty()) {
    Vec up = qb.effective_weight(kUp, false);
    const int64_t I = c.intermediate_size, H = c.hidden_size;
    for (int64_t i = 0; i < I; ++i)
      for (int64_t j = 0; j < H; ++j)
        up[static_cast<size_t>(i * H + j)] *= t.cd[static_cast<size_t>(i)];
    dl.w.w[kUp] = to_f(up);
  }
  dl.online.a1 = to_f(t.a1);
  dl.online.a2 = to_f(t.a2);
  dl.online.u1 = to_f(t.u1);
  dl.online.u2 = to_f(t.u2);
  dl.online.d1 = to_f(t.d1);
  dl.online.d2 = to_f(t.d2);
  dl.online.po = to_f(t.po);
  dl.online.pk = to_f(t.pk);
  dl.online.pk_it = to_f(t.pk_it);
  return dl;
}

BlockQuantSpec block_quant_spec(const Recipe& r, const ModelConfig& c, bool training) {
  const bool flat = r.transform() == "flatquant";
  const bool lac = flat && r.b("lac"), lwc = flat && r.b("lwc");
  const Ste ste = r.transform() == "spinquant" ? Ste::kIdentity : Ste::kLsq;
  BlockQuantSpec q;
  for (int p = 0; p < kNumProj; ++p) {
    FakeQuantSpec& a = q.act[p];
    a.bits = r.a_bits();
    a.sym = true;
    a.group = -1;
    a.ste = ste;
    a.clip = lac ? ClipMode::kLearned : ClipMode::kFixed;
    a.clip_ratio = lac ? 1.0 : r.f("a_clip");
    a.min_scale = 0.0;
    // Weights are quantized offline (RTN / GPTQ) outside training; the block then
    // sees the dequantized weights.
    FakeQuantSpec& wq = q.w[p];
    wq.bits = training ? r.w_bits() : 16;
    wq.sym = true;
    wq.group = r.w_group();
    wq.ste = ste;
    wq.clip = lwc ? ClipMode::kLearned : ClipMode::kFixed;
    wq.lwc_range = lwc;
    wq.clip_ratio = 1.0;
    wq.min_scale = 1e-5;
  }
  for (FakeQuantSpec* s : {&q.k, &q.v}) {
    s->bits = r.kv_bits();
    s->sym = false;
    s->group = c.head_dim;
    s->ste = ste;
    s->clip = lac ? ClipMode::kLearned : ClipMode::kFixed;
    s->clip_ratio = lac ? 1.0 : r.f("kv_clip");
    s->min_scale = 0.0;
  }
  return q;
}

BlockQuantSpec deployed_spec(const Recipe& r, const ModelConfig& c, const BlockClipT<double>* lac) {
  BlockQuantSpec q = block_quant_spec(r, c, /*training=*/false);
  auto fix = [](FakeQuantSpec& s, const Vec* beta) {
    if (s.clip != ClipMode::kLearned) return;
    s.clip = ClipMode::kFixed;
    float ratio = 1.0f;
    if (beta && !beta->empty()) ratio = std::max(static_cast<float>(sigmoid((*beta)[0])), 1e-6f);
    s.clip_ratio = ratio;
  };
  for (int p = 0; p < kNumProj; ++p) {
    q.w[p].bits = 16;
    fix(q.act[p], lac ? &lac->act_max[p] : nullptr);
  }
  fix(q.k, lac ? &lac->k_max : nullptr);
  fix(q.v, lac ? &lac->v_max : nullptr);
  return q;
}

NativeActQuant native_act(const FakeQuantSpec& s) {
  NativeActQuant a;
  a.bits = s.on() ? s.bits : 16;
  a.sym = s.sym;
  a.group = s.group > 0 ? s.group : -1;
  a.clip = static_cast<float>(s.clip_ratio);
  return a;
}

// ---------------------------------------------------------------- folds

void fold_block_norms(BlockWeightsT<float>& w, const ModelConfig& c) {
  const int64_t H = c.hidden_size;
  const Vec gi = to_d(w.input_norm), gp = to_d(w.post_norm);
  for (int p : {kQ, kK, kV}) scale_cols(w.w[p], H, gi);
  for (int p : {kGate, kUp}) scale_cols(w.w[p], H, gp);
  std::fill(w.input_norm.begin(), w.input_norm.end(), 1.0f);
  std::fill(w.post_norm.begin(), w.post_norm.end(), 1.0f);
}

void rotate_block(BlockWeightsT<float>& w, const ModelConfig& c, const std::vector<double>& R1) {
  const int64_t H = c.hidden_size;
  QCAL_CHECK(static_cast<int64_t>(R1.size()) == H * H);
  for (int p : {kQ, kK, kV, kGate, kUp})
    right_mul(w.w[p], static_cast<int64_t>(w.w[p].size()) / H, H, R1);
  for (int p : {kO, kDown}) left_mul_t(w.w[p], H, static_cast<int64_t>(w.w[p].size()) / H, R1);
}

void rotate_heads(BlockWeightsT<float>& w, const ModelConfig& c, const std::vector<double>& R2) {
  const int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_attention_heads,
                nkv = c.num_key_value_heads;
  QCAL_CHECK(static_cast<int64_t>(R2.size()) == d * d);
  // v: every KV head's (d, H) block of rows ← R2ᵀ·block; bias block ← b·R2.
  for (int64_t g = 0; g < nkv; ++g) {
    std::vector<float> blk(w.w[kV].begin() + g * d * H, w.w[kV].begin() + (g + 1) * d * H);
    left_mul_t(blk, d, H, R2);
    std::copy(blk.begin(), blk.end(), w.w[kV].begin() + g * d * H);
    if (!w.bias[kV].empty()) {
      std::vector<float> b(w.bias[kV].begin() + g * d, w.bias[kV].begin() + (g + 1) * d);
      right_mul(b, 1, d, R2);
      std::copy(b.begin(), b.end(), w.bias[kV].begin() + g * d);
    }
  }
  // o: every head's column block ← block·R2.
  const int64_t Q = nh * d;
  std::vector<float> blk(static_cast<size_t>(H * d));
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t i = 0; i < H; ++i)
      std::copy_n(w.w[kO].begin() + i * Q + h * d, d, blk.begin() + i * d);
    right_mul(blk, H, d, R2);
    for (int64_t i = 0; i < H; ++i)
      std::copy_n(blk.begin() + i * d, d, w.w[kO].begin() + i * Q + h * d);
  }
}

void smooth_layer(BlockWeightsT<float>& w, const std::vector<float>& attn_act_max,
                  const std::vector<float>& mlp_act_max, double alpha) {
  const int64_t H = static_cast<int64_t>(w.input_norm.size());
  auto smooth = [&](std::vector<float>& gamma, std::initializer_list<int> projs,
                    const std::vector<float>& act) {
    QCAL_CHECK(static_cast<int64_t>(act.size()) == H);
    Vec wmax(static_cast<size_t>(H), 0.0);
    for (int p : projs) {
      const int64_t rows = static_cast<int64_t>(w.w[p].size()) / H;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < H; ++j)
          wmax[static_cast<size_t>(j)] =
              std::max(wmax[static_cast<size_t>(j)],
                       std::fabs(static_cast<double>(w.w[p][static_cast<size_t>(r * H + j)])));
    }
    Vec s(static_cast<size_t>(H)), inv(static_cast<size_t>(H));
    for (int64_t j = 0; j < H; ++j) {
      const double wj = std::max(wmax[static_cast<size_t>(j)], 1e-5);
      const double aj = std::fabs(static_cast<double>(act[static_cast<size_t>(j)]));
      s[static_cast<size_t>(j)] = std::max(std::pow(aj, alpha) / std::pow(wj, 1.0 - alpha), 1e-5);
      inv[static_cast<size_t>(j)] = 1.0 / s[static_cast<size_t>(j)];
    }
    for (int64_t j = 0; j < H; ++j)
      gamma[static_cast<size_t>(j)] = static_cast<float>(
          static_cast<double>(gamma[static_cast<size_t>(j)]) * inv[static_cast<size_t>(j)]);
    for (int p : projs) scale_cols(w.w[p], H, s);
  };
  smooth(w.input_norm, {kQ, kK, kV}, attn_act_max);
  smooth(w.post_norm, {kGate, kUp}, mlp_act_max);
}

void prefix_kv(const ModelConfig& c, const Deployed& dl, const float* xp, int64_t P,
               std::vector<float>* k, std::vector<float>* v) {
  const int64_t H = c.hidden_size, K = c.kv_dim(), n_kv = c.num_key_value_heads, d = c.head_dim;
  std::vector<float> h(static_cast<size_t>(P * H)), tmp(h.size()), work(h.size());
  rmsnorm_forward(h.data(), xp, dl.w.input_norm.data(), P, H, static_cast<float>(c.rms_norm_eps));
  const BlockTransformsT<float>& t = dl.online;
  if (!t.a1.empty() || !t.a2.empty()) {
    const int64_t n1 = t.a1.empty() ? H / side(t.a2) : side(t.a1);
    kron_fwd<float>(tmp.data(), h.data(), t.a1.empty() ? nullptr : t.a1.data(),
                    t.a2.empty() ? nullptr : t.a2.data(), P, n1, H / n1, work.data());
    h.swap(tmp);
  }
  k->assign(static_cast<size_t>(P * K), 0.0f);
  v->assign(static_cast<size_t>(P * K), 0.0f);
  linear_forward(k->data(), h.data(), dl.w.w[kK].data(),
                 dl.w.bias[kK].empty() ? nullptr : dl.w.bias[kK].data(), P, H, K);
  linear_forward(v->data(), h.data(), dl.w.w[kV].data(),
                 dl.w.bias[kV].empty() ? nullptr : dl.w.bias[kV].data(), P, H, K);
  rope_forward(k->data(), P, n_kv, d, 0, c.rope_theta);
  if (!t.pk.empty()) {
    std::vector<float> o(k->size()), wk(k->size());
    kron_fwd<float>(o.data(), k->data(), nullptr, t.pk.data(), P * n_kv, 1, d, wk.data());
    k->swap(o);
  }
}

PackedWeight to_packed(const QuantizedLinear& q, int64_t w_group) {
  const int64_t O = q.out_features, I = q.in_features, G = q.num_groups();
  std::vector<int8_t> codes(static_cast<size_t>(O * I));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) {
      const int64_t g = q.g_idx[static_cast<size_t>(i)];
      codes[static_cast<size_t>(o * I + i)] =
          static_cast<int8_t>(static_cast<int32_t>(q.q[static_cast<size_t>(o * I + i)]) -
                              q.zeros[static_cast<size_t>(g * O + o)]);
    }
  std::vector<float> scales(static_cast<size_t>(O * G));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t g = 0; g < G; ++g)
      scales[static_cast<size_t>(o * G + g)] = q.scales[static_cast<size_t>(g * O + o)];
  return pack_weight(codes.data(), scales.data(), O, I, q.spec.bits, w_group > 0 ? w_group : -1);
}

// ---------------------------------------------------------------- block results

BlockResult block_result(int64_t layer, const Deployed& dl,
                         const std::array<QuantizedLinear, kNumProj>* ql, int w_bits) {
  BlockResult b;
  b.layer = layer;
  b.w_bits = ql ? w_bits : 16;
  b.input_norm = dl.w.input_norm;
  b.post_norm = dl.w.post_norm;
  for (int p = 0; p < kNumProj; ++p) {
    if (ql) {
      b.q[p] = (*ql)[p];
    } else {
      b.fw[p] = dl.w.w[p];
    }
    b.act[p] = native_act(dl.q.act[p]);
  }
  b.bias = dl.w.bias;
  b.online = dl.online;
  b.k = native_act(dl.q.k);
  b.v = native_act(dl.q.v);
  return b;
}

NativeLayer native_layer_of(const BlockResult& b, int64_t w_group) {
  NativeLayer y;
  y.input_norm = b.input_norm;
  y.post_norm = b.post_norm;
  for (int p = 0; p < kNumProj; ++p) {
    if (b.w_bits < 16) {
      y.qw[p] = to_packed(b.q[p], w_group);
    } else {
      y.fw[p] = b.fw[p];
    }
    y.act[p] = b.act[p];
  }
  y.bias = b.bias;
  y.online = b.online;
  y.k = b.k;
  y.v = b.v;
  return y;
}

Status save_block_result(const BlockResult& b, const ModelConfig& c, const std::string& path) {
  json meta = {{"format", kBlockFormat}, {"version", 1}, {"layer", b.layer}, {"w_bits", b.w_bits}};
  json act = json::array();
  for (int p = 0; p < kNumProj; ++p) act.push_back(act_json(b.act[p]));
  meta["act"] = act;
  meta["k"] = act_json(b.k);
  meta["v"] = act_json(b.v);
  meta["report"] = b.report;
  json lin = json::object();
  std::vector<StEntry> e;
  // Contiguous copies of int-typed fields: the entries point into them.
  std::array<std::vector<int32_t>, kNumProj> zeros, gidx;
  for (int p = 0; p < kNumProj; ++p) {
    const std::string n = kProjNames[p];
    if (b.w_bits < 16) {
      const QuantizedLinear& q = b.q[p];
      lin[n] = {{"out", q.out_features},   {"in", q.in_features},
                {"bits", q.spec.bits},     {"group_size", q.spec.group_size},
                {"sym", q.spec.sym},       {"mse_clip", q.spec.mse_clip},
                {"act_order", q.act_order}};
      add_vec(e, n + ".q", q.q);
      add_vec(e, n + ".scales", q.scales);
      zeros[p] = q.zeros;
      gidx[p] = q.g_idx;
      add_vec(e, n + ".zeros", zeros[p]);
      add_vec(e, n + ".g_idx", gidx[p]);
    } else {
      add_vec(e, n + ".weight", b.fw[p]);
    }
  }
  meta["linears"] = lin;
  add_vec(e, "input_norm", b.input_norm);
  add_vec(e, "post_norm", b.post_norm);
  const char* bias_names[3] = {"q_bias", "k_bias", "v_bias"};
  for (int i = 0; i < 3; ++i) add_vec(e, bias_names[i], b.bias[i]);
  json online = json::array();
  for_each_transform(b.online, [&](const char* name, const std::vector<float>& m) {
    if (m.empty()) return;
    online.push_back(name);
    add_vec(e, std::string("online.") + name, m);
  });
  meta["online"] = online;
  add_vec(e, "prefix_k", b.prefix_k);
  add_vec(e, "prefix_v", b.prefix_v);
  (void)c;
  return write_st(path, e, kBlockMeta, meta);
}

Result<BlockResult> load_block_result(const std::string& path, const ModelConfig& c) {
  auto opened = SafetensorsFile::open(path);
  if (!opened.is_ok()) return corrupt(opened.status().message());
  const SafetensorsFile& f = **opened;
  QCAL_ASSIGN_OR_RETURN(json meta, read_meta(f, kBlockMeta, kBlockFormat));
  BlockResult b;
  if (!meta.contains("layer") || !meta["layer"].is_number_integer() || !meta.contains("w_bits") ||
      !meta["w_bits"].is_number_integer() || !meta.contains("act") || !meta["act"].is_array() ||
      meta["act"].size() != kNumProj)
    return corrupt(path + ": qcal.block metadata lacks layer / w_bits / act");
  b.layer = meta["layer"].get<int64_t>();
  b.w_bits = meta["w_bits"].get<int>();
  if (b.layer < 0 || b.layer >= c.num_hidden_layers)
    return corrupt(path + ": layer " + std::to_string(b.layer) + " outside the model");
  const std::string at = path + " (layer " + std::to_string(b.layer) + ")";
  for (int p = 0; p < kNumProj; ++p) {
    QCAL_ASSIGN_OR_RETURN(b.act[p], act_from_json(meta["act"][p], at));
  }
  QCAL_ASSIGN_OR_RETURN(b.k, act_from_json(meta.value("k", json()), at));
  QCAL_ASSIGN_OR_RETURN(b.v, act_from_json(meta.value("v", json()), at));
  b.report = meta.value("report", json::object());
  const int64_t H = c.hidden_size, K = c.kv_dim();
  for (int p = 0; p < kNumProj; ++p) {
    const std::string n = kProjNames[p];
    const int64_t O = proj_out(c, p), I = proj_in(c, p);
    if (b.w_bits < 16) {
      const json& lj = meta["linears"][n];
      if (!lj.is_object()) return corrupt(at + ": no entry for " + n);
      QuantizedLinear& q = b.q[p];
      q.out_features = lj.value("out", int64_t{0});
      q.in_features = lj.value("in", int64_t{0});
      q.spec.bits = lj.value("bits", 0);
      q.spec.group_size = lj.value("group_size", int64_t{-1});
      q.spec.sym = lj.value("sym", true);
      q.spec.mse_clip = lj.value("mse_clip", false);
      q.act_order = lj.value("act_order", false);
      if (q.out_features != O || q.in_features != I || q.spec.bits != b.w_bits)
        return corrupt(at + ": " + n + " is not (" + std::to_string(O) + ", " + std::to_string(I) +
                       ") at " + std::to_string(b.w_bits) + " bits");
      const int64_t gc = q.spec.group_size > 0 && q.spec.group_size < I ? q.spec.group_size : I;
      const int64_t G = (I + gc - 1) / gc;
      QCAL_ASSIGN_OR_RETURN(q.q, read_vec<uint8_t>(f, n + ".q", O * I));
      QCAL_ASSIGN_OR_RETURN(q.scales, read_vec<float>(f, n + ".scales", G * O));
      QCAL_ASSIGN_OR_RETURN(q.zeros, read_vec<int32_t>(f, n + ".zeros", G * O));
      QCAL_ASSIGN_OR_RETURN(q.g_idx, read_vec<int32_t>(f, n + ".g_idx", I));
      const int maxq = (1 << q.spec.bits) - 1;
      for (uint8_t v : q.q)
        if (v > maxq) return corrupt(at + ": " + n + " has a code above " + std::to_string(maxq));
      for (int32_t z : q.zeros)
        if (z < 0 || z > maxq) return corrupt(at + ": " + n + " has a zero out of range");
      for (int32_t g : q.g_idx)
        if (g < 0 || g >= G) return corrupt(at + ": " + n + " has a g_idx out of range");
      for (float s : q.scales)
        if (!std::isfinite(s)) return corrupt(at + ": " + n + " has a non-finite scale");
    } else {
      QCAL_ASSIGN_OR_RETURN(b.fw[p], read_vec<float>(f, n + ".weight", O * I));
    }
  }
  QCAL_ASSIGN_OR_RETURN(b.input_norm, read_vec<float>(f, "input_norm", H));
  QCAL_ASSIGN_OR_RETURN(b.post_norm, read_vec<float>(f, "post_norm", H));
  const char* bias_names[3] = {"q_bias", "k_bias", "v_bias"};
  const int64_t bias_n[3] = {c.q_dim(), K, K};
  for (int i = 0; i < 3; ++i) {
    QCAL_ASSIGN_OR_RETURN(b.bias[i], read_vec<float>(f, bias_names[i], -1));
    if (!b.bias[i].empty() && static_cast<int64_t>(b.bias[i].size()) != bias_n[i])
      return corrupt(at + ": " + bias_names[i] + " has the wrong size");
  }
  Status st = Status::ok();
  for_each_transform(b.online, [&](const char* name, std::vector<float>& m) {
    if (!st.is_ok()) return;
    auto r = read_vec<float>(f, std::string("online.") + name, -1);
    if (!r.is_ok()) {
      st = r.status();
      return;
    }
    m = std::move(r).value();
  });
  QCAL_RETURN_IF_ERROR(st);
  QCAL_RETURN_IF_ERROR(check_online(b.online, c, at));
  QCAL_ASSIGN_OR_RETURN(b.prefix_k, read_vec<float>(f, "prefix_k", -1));
  QCAL_ASSIGN_OR_RETURN(b.prefix_v, read_vec<float>(f, "prefix_v", -1));
  if (b.prefix_k.size() != b.prefix_v.size() || b.prefix_k.size() % static_cast<size_t>(K) != 0)
    return corrupt(at + ": IntactKV prefix K/V sizes do not match");
  return b;
}

Result<BlockResultDecl> load_block_decl(const std::string& path, const ModelConfig& c) {
  auto opened = SafetensorsFile::open(path);
  if (!opened.is_ok()) return corrupt(opened.status().message());
  const SafetensorsFile& f = **opened;
  QCAL_ASSIGN_OR_RETURN(json meta, read_meta(f, kBlockMeta, kBlockFormat));
  BlockResultDecl d;
  if (!meta.contains("layer") || !meta["layer"].is_number_integer() || !meta.contains("w_bits") ||
      !meta["w_bits"].is_number_integer() || !meta.contains("act") || !meta["act"].is_array() ||
      meta["act"].size() != kNumProj)
    return corrupt(path + ": qcal.block metadata lacks layer / w_bits / act");
  d.layer = meta["layer"].get<int64_t>();
  d.w_bits = meta["w_bits"].get<int>();
  if (d.layer < 0 || d.layer >= c.num_hidden_layers)
    return corrupt(path + ": layer " + std::to_string(d.layer) + " outside the model");
  const std::string at = path + " (layer " + std::to_string(d.layer) + ")";
  for (int p = 0; p < kNumProj; ++p) {
    QCAL_ASSIGN_OR_RETURN(d.native.act[p], act_from_json(meta["act"][p], at));
  }
  QCAL_ASSIGN_OR_RETURN(d.native.k, act_from_json(meta.value("k", json()), at));
  QCAL_ASSIGN_OR_RETURN(d.native.v, act_from_json(meta.value("v", json()), at));
  if (d.w_bits < 16) {
    for (int p = 0; p < kNumProj; ++p) {
      const std::string n = kProjNames[p];
      const json* lj =
          meta.contains("linears") && meta["linears"].is_object() && meta["linears"].contains(n)
              ? &meta["linears"][n]
              : nullptr;
      if (!lj || !lj->is_object()) return corrupt(at + ": no entry for " + n);
      QuantizedLinear& q = d.q[p];
      q.out_features = lj->value("out", int64_t{0});
      q.in_features = lj->value("in", int64_t{0});
      q.spec.bits = lj->value("bits", 0);
      q.spec.group_size = lj->value("group_size", int64_t{-1});
      q.spec.sym = lj->value("sym", true);
      q.spec.mse_clip = lj->value("mse_clip", false);
      q.act_order = lj->value("act_order", false);
      const int64_t O = proj_out(c, p), I = proj_in(c, p);
      if (q.out_features != O || q.in_features != I || q.spec.bits != d.w_bits)
        return corrupt(at + ": " + n + " is not (" + std::to_string(O) + ", " + std::to_string(I) +
                       ") at " + std::to_string(d.w_bits) + " bits");
    }
  }
  // The tensor list: biases, the activation-side online transforms, the prefix.
  auto numel = [&](const std::string& name) -> int64_t {
    const TensorInfo* t = f.find(name);
    return t ? Tensor::count(t->shape) : 0;
  };
  const char* bias_names[3] = {"q_bias", "k_bias", "v_bias"};
  for (int i = 0; i < 3; ++i) d.native.bias[i] = numel(bias_names[i]) > 0;
  for (const char* name : {"a1", "a2", "u1", "u2", "d1", "d2", "po", "pk", "pk_it"}) {
    const int64_t n = numel(std::string("online.") + name);
    if (n == 0) continue;
    const int64_t s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
    d.native.online[name] = s * s == n ? s : 0;
  }
  const int64_t K = c.kv_dim(), pk = numel("prefix_k");
  if (pk != numel("prefix_v") || pk % K != 0)
    return corrupt(at + ": IntactKV prefix K/V sizes do not match");
  d.prefix_rows = pk / K;
  return d;
}

// ---------------------------------------------------------------- fitted state

const std::vector<double>& Fitted::at(const std::string& name) const {
  auto it = arrays.find(name);
  QCAL_CHECK_MSG(it != arrays.end(), "fitted state lacks an array the method needs");
  return it->second;
}

Status save_fitted(const Fitted& f, const std::string& path) {
  std::vector<StEntry> e;
  json names = json::array();
  for (const auto& [name, v] : f.arrays) {
    names.push_back({name, v.size()});
    add_vec(e, name, v);
  }
  json meta = {{"format", kFittedFormat}, {"version", 1}, {"meta", f.meta}, {"arrays", names}};
  if (!f.bytes.empty()) {
    json bnames = json::array();
    for (const auto& [name, v] : f.bytes) {
      if (f.arrays.count(name)) return invalid_input("fitted: " + name + " is both kinds");
      bnames.push_back({name, v.size()});
      add_vec(e, name, v);
    }
    meta["bytes"] = bnames;
  }
  return write_st(path, e, kFittedMeta, meta);
}

Result<Fitted> load_fitted(const std::string& path) {
  auto opened = SafetensorsFile::open(path);
  if (!opened.is_ok()) return corrupt(opened.status().message());
  const SafetensorsFile& f = **opened;
  QCAL_ASSIGN_OR_RETURN(json meta, read_meta(f, kFittedMeta, kFittedFormat));
  Fitted out;
  out.meta = meta.value("meta", json::object());
  if (!meta.contains("arrays") || !meta["arrays"].is_array())
    return corrupt(path + ": qcal.fitted metadata lacks its array list");
  for (const json& a : meta["arrays"]) {
    if (!a.is_array() || a.size() != 2 || !a[0].is_string() || !a[1].is_number_unsigned())
      return corrupt(path + ": bad array entry " + a.dump());
    const std::string name = a[0].get<std::string>();
    const int64_t n = a[1].get<int64_t>();
    QCAL_ASSIGN_OR_RETURN(out.arrays[name], read_vec<double>(f, name, n));
  }
  if (meta.contains("bytes")) {
    if (!meta["bytes"].is_array()) return corrupt(path + ": qcal.fitted \"bytes\" is not a list");
    for (const json& a : meta["bytes"]) {
      if (!a.is_array() || a.size() != 2 || !a[0].is_string() || !a[1].is_number_unsigned())
        return corrupt(path + ": bad byte-array entry " + a.dump());
      const std::string name = a[0].get<std::string>();
      QCAL_ASSIGN_OR_RETURN(out.bytes[name], read_vec<uint8_t>(f, name, a[1].get<int64_t>()));
    }
  }
  return out;
}

Fitted stats_to_fitted(const ActStats& s) {
  Fitted f;
  f.arrays["attn"] = Vec(s.attn.begin(), s.attn.end());
  f.arrays["mlp"] = Vec(s.mlp.begin(), s.mlp.end());
  f.arrays["down"] = Vec(s.down.begin(), s.down.end());
  return f;
}

Result<ActStats> stats_from_fitted(const Fitted& f, const ModelConfig& c) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const std::pair<const char*, int64_t> want[] = {{"attn", H}, {"mlp", H}, {"down", I}};
  for (const auto& [n, size] : want)
    if (!f.has(n) || static_cast<int64_t>(f.at(n).size()) != size)
      return corrupt(std::string("activation statistics: '") + n +
                     "' missing or of the wrong size");
  ActStats s;
  s.attn = to_f(f.at("attn"));
  s.mlp = to_f(f.at("mlp"));
  s.down = to_f(f.at("down"));
  return s;
}

}  // namespace qcal::calib

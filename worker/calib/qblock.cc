// The differentiable decoder block of qblock.h: forward with an optional tape and
// the hand-written backward, built from the kernels/grad.h primitives.
//
// Letters: B sequences, T tokens each, N = B·T rows, H hidden, I intermediate,
// Q = n_h·d, K = n_kv·d; a weight is (R, C) = (out, in). Gradients into
// BlockGradsT accumulate (+=), except dx which is overwritten.
//
// Structure. Every input side is a "slot" x̃ = kron(x ⊙ c; L, R) with the weight
// side kron_rows(W ⊙ 1/c; L_it, R_it): attention (ca, a1, a2), o (no diagonal;
// po on the activation, po_it ⊗ pv_it on the weight), MLP (cu, u1, u2) and down
// (cd, d1, d2). The weight path of each linear is
//   W1 = W ⊙ 1/c → W2 = kron_rows(W1) → W3 (v: per-head P_vᵀ·W2) → W4 = fq_w(W3),
// computed in row chunks (the Kronecker kernels on L2-sized row blocks); the
// tape keeps W3 and W4 (and W2 for v with P_v): two transformed copies of the
// block's weights, plus the activations and the attention probabilities. The
// backward of the weight path runs in row chunks too: the chunk of
// dW4 = doutᵀ·x_q is one GEMM, then fq_w / P_v / kron_rows / the diagonal
// backwards, so no full-size weight-gradient buffer is needed unless the
// weights' own gradients are asked for.
//
// The tape points at the caller's weights where the path is the identity, so
// weights, transforms, spec and clip must not change between a forward and its
// backward. Forwards on distinct tapes may run concurrently.
#include "worker/calib/qblock.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/model_dir.h"
#include "common/status.h"

namespace qcal::calib {

// ---------------------------------------------------------------- small helpers

bool BlockQuantSpec::any_on() const {
  for (int p = 0; p < kNumProj; ++p)
    if (act[p].on() || w[p].on()) return true;
  return k.on() || v.on();
}

namespace {

template <typename T>
const T* ptr_or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

// Side of a square matrix with n elements (0 for an empty one).
int64_t side_of(size_t n) {
  const auto s = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(n))));
  QCAL_CHECK_MSG(static_cast<size_t>(s * s) == n, "qblock: transform matrix is not square");
  return s;
}

// A gradient entry, sized (zero-filled) on first use.
template <typename T>
T* grad_buf(std::vector<T>& g, size_t n) {
  if (g.empty()) g.assign(n, T(0));
  QCAL_CHECK_MSG(g.size() == n, "qblock: gradient entry has the wrong size");
  return g.data();
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  gemm_t(ta, tb, M, N, K, T(1), A, lda, B, ldb, beta, C, ldc);
}

// Rows per chunk of the weight path: about 4M elements, so the chunk's dW GEMM is
// large (QCAL_QBLOCK_CHUNK_ELEMS overrides it, for tests), a multiple of `align`.
int64_t chunk_rows(int64_t rows, int64_t cols, int64_t align) {
  int64_t budget = int64_t{1} << 22;
  if (const char* e = std::getenv("QCAL_QBLOCK_CHUNK_ELEMS")) budget = std::max(1LL, std::atoll(e));
  int64_t rc = std::max<int64_t>(1, budget / std::max<int64_t>(1, cols));
  rc = std::max(align, rc / align * align);
  return std::min(rc, rows);
}

// The Kronecker kernels transpose their operand twice; on row blocks of about
// 256K elements (L2-sized) that runs ~20% faster than on whole weights.
constexpr int64_t kKronBlockElems = int64_t{1} << 18;

int64_t kron_block_rows(int64_t cols) {
  return std::max<int64_t>(1, kKronBlockElems / std::max<int64_t>(1, cols));
}

// kron_fwd over `rows` rows in L2-sized blocks; work: kron_block_rows·n1·n2.
template <typename T>
void kron_rows_fwd(T* y, const T* x, const T* L, const T* R, int64_t rows, int64_t n1, int64_t n2,
                   T* work) {
  const int64_t n = n1 * n2, rb = kron_block_rows(n);
  for (int64_t r0 = 0; r0 < rows; r0 += rb)
    kron_fwd(y + r0 * n, x + r0 * n, L, R, std::min(rb, rows - r0), n1, n2, work);
}

// kron_bwd likewise (dL, dR accumulate over blocks); work: 2·kron_block_rows·n1·n2.
template <typename T>
void kron_rows_bwd(T* dx, T* dL, T* dR, const T* dy, const T* x, const T* L, const T* R,
                   int64_t rows, int64_t n1, int64_t n2, T* work) {
  const int64_t n = n1 * n2, rb = kron_block_rows(n);
  for (int64_t r0 = 0; r0 < rows; r0 += rb)
    kron_bwd(dx ? dx + r0 * n : nullptr, dL, dR, dy + r0 * n, x + r0 * n, L, R,
             std::min(rb, rows - r0), n1, n2, work);
}

template <typename T>
std::vector<T> reciprocals(const std::vector<T>& c) {
  std::vector<T> r(c.size());
  for (size_t j = 0; j < c.size(); ++j) r[j] = T(1) / c[j];
  return r;
}

template <typename T>
using TM = std::vector<T> BlockTransformsT<T>::*;

// One input side (see the file comment). Member pointers select the transform
// entries (null = none), so the same description addresses t and the gradients.
template <typename T>
struct Slot {
  TM<T> c = nullptr, L = nullptr, R = nullptr, L_it = nullptr, R_it = nullptr;
  int64_t n = 0, n1 = 1, n2 = 0;
  bool diag = false, akron = false, wkron = false;
};

template <typename T>
const std::vector<T>& get(const BlockTransformsT<T>& t, TM<T> m) {
  static const std::vector<T> kEmpty;
  return m ? t.*m : kEmpty;
}

template <typename T>
Slot<T> make_slot(const BlockTransformsT<T>& t, TM<T> c, TM<T> L, TM<T> R, TM<T> L_it, TM<T> R_it,
                  int64_t n, int64_t fixed_n1) {
  Slot<T> s;
  s.c = c, s.L = L, s.R = R, s.L_it = L_it, s.R_it = R_it, s.n = n;
  const auto& vc = get(t, c);
  const auto &vL = get(t, L), &vR = get(t, R), &vLi = get(t, L_it), &vRi = get(t, R_it);
  s.diag = !vc.empty();
  if (s.diag) QCAL_CHECK_MSG(static_cast<int64_t>(vc.size()) == n, "qblock: diagonal size");
  s.akron = !vL.empty() || !vR.empty();
  s.wkron = !vLi.empty() || !vRi.empty();
  int64_t n1 = fixed_n1;
  if (n1 == 0) {
    if (!vL.empty())
      n1 = side_of(vL.size());
    else if (!vLi.empty())
      n1 = side_of(vLi.size());
    else if (!vR.empty())
      n1 = n / side_of(vR.size());
    else if (!vRi.empty())
      n1 = n / side_of(vRi.size());
    else
      n1 = 1;
  }
  QCAL_CHECK_MSG(n1 > 0 && n % n1 == 0, "qblock: Kronecker factor does not divide the size");
  s.n1 = n1;
  s.n2 = n / n1;
  for (const auto* m : {&vL, &vLi})
    QCAL_CHECK_MSG(m->empty() || side_of(m->size()) == s.n1, "qblock: left factor size");
  for (const auto* m : {&vR, &vRi})
    QCAL_CHECK_MSG(m->empty() || side_of(m->size()) == s.n2, "qblock: right factor size");
  return s;
}

template <typename T>
const BlockTransformsT<T>& empty_transforms() {
  static const BlockTransformsT<T> kEmpty;
  return kEmpty;
}
const BlockQuantSpec& empty_spec() {
  static const BlockQuantSpec kOff;
  return kOff;
}
template <typename T>
const BlockClipT<T>& empty_clip() {
  static const BlockClipT<T> kEmpty;
  return kEmpty;
}

// β pointers of one quantizer (null for kFixed or off).
template <typename T>
struct Beta {
  const T* max = nullptr;
  const T* min = nullptr;
  int64_t n = 0;
};

template <typename T>
Beta<T> beta_of(const FakeQuantSpec& s, const std::vector<T>& mx, const std::vector<T>& mn,
                int64_t n_expected) {
  if (!s.on() || s.clip != ClipMode::kLearned) return {};
  QCAL_CHECK_MSG(!mx.empty() && mx.size() == mn.size(),
                 "qblock: learned clip parameters missing (init_clip_params)");
  const auto n = static_cast<int64_t>(mx.size());
  QCAL_CHECK_MSG(n == 1 || n == n_expected, "qblock: learned clip parameters have the wrong size");
  return {mx.data(), mn.data(), n};
}

// Groups per row as fake_quant_fwd counts them (the last one may be short).
int64_t groups_of(const FakeQuantSpec& s, int64_t cols) {
  return s.group > 0 ? (cols + s.group - 1) / s.group : 1;
}

// Rows [r0, r0 + nr) of a per-(row, group) FakeQuantSaved.
template <typename T>
void slice_saved(const FakeQuantSaved<T>& s, int64_t off, int64_t n, FakeQuantSaved<T>* o) {
  auto cut = [&](const auto& src, auto& dst) {
    if (src.empty()) {
      dst.clear();
      return;
    }
    QCAL_CHECK(static_cast<int64_t>(src.size()) >= off + n);
    dst.assign(src.begin() + off, src.begin() + off + n);
  };
  cut(s.scale, o->scale);
  cut(s.zero, o->zero);
  cut(s.amax_at, o->amax_at);
  cut(s.amin_at, o->amin_at);
  cut(s.raw_max, o->raw_max);
  cut(s.raw_min, o->raw_min);
}

template <typename T>
void call_hook(const LinearInputHook& hook, int p, const T* x, int64_t rows, int64_t cols,
               std::vector<float>* buf) {
  if (!hook) return;
  if constexpr (std::is_same_v<T, float>) {
    hook(kProjNames[p], x, rows, cols);
  } else {
    buf->resize(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows * cols; ++i) (*buf)[i] = static_cast<float>(x[i]);
    hook(kProjNames[p], buf->data(), rows, cols);
  }
}

}  // namespace

// ---------------------------------------------------------------- the tape

template <typename T>
struct BlockTape {
  BlockTape() = default;
  BlockTape(const BlockTape&) = delete;  // holds pointers into itself
  BlockTape& operator=(const BlockTape&) = delete;

  struct Lin {
    std::vector<T> w2, w3, w4;  // v with P_v: kron output; transformed; fake-quantized
    const T* w2p = nullptr;     // W2 (v with P_v only)
    const T* w3p = nullptr;     // pre-quant weight (R, C): w3 or the caller's weight
    const T* w4p = nullptr;     // weight of the GEMM: w4 or w3p
    FakeQuantSaved<T> wsaved;
    std::vector<T> bias;       // v with P_v: transformed bias
    const T* biasp = nullptr;  // null when absent
    std::vector<T> xq;         // act-quantized input (N, C); empty = shared input
    const T* xin = nullptr;    // the GEMM's input
    const T* xpre = nullptr;   // the act quantizer's input
    FakeQuantSaved<T> asaved;
  };

  int64_t B = 0, T_ = 0, N = 0;
  bool valid = false;
  int64_t P = 0;  // the prefix the forward ran with (QBlock::set_prefix)
  const T* pk = nullptr;
  const T* pv = nullptr;
  std::array<Lin, kNumProj> lin;
  std::vector<T> x, inv1, h, ht;         // (N,H), (N), (N,H), (N,H)
  const T* htp = nullptr;                // h̃: ht or h
  std::vector<T> q_rope, q_att;          // (N,Q)
  std::vector<T> k_rope, k_post, k_att;  // (N,K)
  std::vector<T> v_pre, v_att;           // (N,K)
  const T *qa = nullptr, *kp = nullptr, *ka = nullptr, *va = nullptr;
  FakeQuantSaved<T> ksaved, vsaved;
  std::vector<T> probs;  // (B, n_h, T, P + T)
  std::vector<T> a, at;  // (N,Q)
  const T* atp = nullptr;
  std::vector<T> x1, inv2, m, mt;  // (N,H), (N), (N,H), (N,H)
  const T* mtp = nullptr;
  std::vector<T> gate, up, z, zt;  // (N,I)
  const T* ztp = nullptr;

  // Scratch reused across calls (forward and backward).
  mutable std::vector<T> s_diag, s_work, s_wc, s_dres, s_tH, s_tH2, s_dI[5], s_dQ[3], s_dK[4],
      s_w[2];
  mutable std::vector<float> s_hook;
  mutable FakeQuantSaved<T> s_saved;
};

template <typename T>
void destroy_tape(BlockTape<T>* tape) {
  delete tape;
}

template <typename T>
std::unique_ptr<BlockTape<T>> make_tape() {
  return std::unique_ptr<BlockTape<T>>(new BlockTape<T>());
}

// ---------------------------------------------------------------- the engine

namespace {

// Everything the forward and backward read, with defaults for null pointers.
template <typename T>
struct Ctx {
  const ModelConfig& c;
  const BlockWeightsT<T>& w;
  const BlockTransformsT<T>& t;
  const BlockQuantSpec& q;
  const BlockClipT<T>& clip;
  int64_t H, I, Q, K, nh, nkv, d;
  std::array<Slot<T>, 4> slots;  // attention, o, MLP, down

  Ctx(const ModelConfig& cfg, const BlockWeightsT<T>* w_, const BlockTransformsT<T>* t_,
      const BlockQuantSpec* q_, const BlockClipT<T>* clip_)
      : c(cfg),
        w(*w_),
        t(t_ ? *t_ : empty_transforms<T>()),
        q(q_ ? *q_ : empty_spec()),
        clip(clip_ ? *clip_ : empty_clip<T>()),
        H(cfg.hidden_size),
        I(cfg.intermediate_size),
        Q(cfg.q_dim()),
        K(cfg.kv_dim()),
        nh(cfg.num_attention_heads),
        nkv(cfg.num_key_value_heads),
        d(cfg.head_dim) {
    using BT = BlockTransformsT<T>;
    slots[0] = make_slot<T>(t, &BT::ca, &BT::a1, &BT::a2, &BT::a1_it, &BT::a2_it, H, 0);
    slots[1] = make_slot<T>(t, nullptr, &BT::po, nullptr, &BT::po_it, &BT::pv_it, Q, nh);
    slots[2] = make_slot<T>(t, &BT::cu, &BT::u1, &BT::u2, &BT::u1_it, &BT::u2_it, H, 0);
    slots[3] = make_slot<T>(t, &BT::cd, &BT::d1, &BT::d2, &BT::d1_it, &BT::d2_it, I, 0);
    for (const auto* m : {&t.pv, &t.pv_it, &t.pk, &t.pk_it})
      QCAL_CHECK_MSG(m->empty() || side_of(m->size()) == d, "qblock: per-head transform size");
    for (int p = 0; p < kNumProj; ++p)
      QCAL_CHECK_MSG(static_cast<int64_t>(w.w[p].size()) == rows(p) * cols(p),
                     "qblock: weight has the wrong size");
    QCAL_CHECK(static_cast<int64_t>(w.input_norm.size()) == H);
    QCAL_CHECK(static_cast<int64_t>(w.post_norm.size()) == H);
    for (int p = 0; p < 3; ++p)
      QCAL_CHECK(w.bias[p].empty() || static_cast<int64_t>(w.bias[p].size()) == rows(p));
  }

  int64_t rows(int p) const {
    switch (p) {
      case kQ: return Q;
      case kK:
      case kV: return K;
      case kGate:
      case kUp: return I;
      default: return H;
    }
  }
  int64_t cols(int p) const { return p == kO ? Q : (p == kDown ? I : H); }
  const Slot<T>& slot(int p) const {
    if (p <= kV) return slots[0];
    if (p == kO) return slots[1];
    if (p == kDown) return slots[3];
    return slots[2];
  }
  bool pvv(int p) const { return p == kV && !t.pv.empty(); }
  Beta<T> wbeta(int p) const {
    return beta_of(q.w[p], clip.w_max[p], clip.w_min[p], rows(p) * groups_of(q.w[p], cols(p)));
  }
  Beta<T> abeta(int p) const { return beta_of(q.act[p], clip.act_max[p], clip.act_min[p], 1); }
};

// ---- weight path forward: fills lt.w3p / w4p / biasp.
template <typename T>
void weight_forward(const Ctx<T>& cx, int p, typename BlockTape<T>::Lin& lt, const BlockTape<T>& tp,
                    RoundTape<T>* rt) {
  const int64_t R = cx.rows(p), C = cx.cols(p), d = cx.d;
  const Slot<T>& sl = cx.slot(p);
  const T* W = cx.w.w[p].data();
  const bool pvv = cx.pvv(p);
  const std::vector<T> inv_c = reciprocals(get(cx.t, sl.c));
  const T* Lit = ptr_or_null(get(cx.t, sl.L_it));
  const T* Rit = ptr_or_null(get(cx.t, sl.R_it));
  const T* pv = ptr_or_null(cx.t.pv);

  lt.w2p = nullptr;
  if (sl.diag || sl.wkron || pvv) {
    lt.w3.resize(static_cast<size_t>(R * C));
    const bool pre = sl.diag || sl.wkron;  // W2 differs from W
    if (pvv && pre)
      lt.w2.resize(static_cast<size_t>(R * C));
    else
      lt.w2.clear();
    const int64_t rc = chunk_rows(R, C, pvv ? d : 1);
    for (int64_t r0 = 0; r0 < R; r0 += rc) {
      const int64_t nr = std::min(rc, R - r0);
      const T* src = W + r0 * C;
      T* kdst = pre ? (pvv ? lt.w2.data() : lt.w3.data()) + r0 * C : nullptr;
      if (sl.diag) {
        T* dd = sl.wkron ? grow(tp.s_wc, static_cast<size_t>(nr * C)) : kdst;
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t j = 0; j < C; ++j) dd[i * C + j] = src[i * C + j] * inv_c[j];
        src = dd;
      }
      if (sl.wkron) {
        kron_rows_fwd(kdst, src, Lit, Rit, nr, sl.n1, sl.n2,
                      grow(tp.s_work, static_cast<size_t>(kron_block_rows(C) * C)));
      }
      if (pvv) {
        const T* w2c = pre ? lt.w2.data() + r0 * C : W + r0 * C;
        for (int64_t hh = 0; hh < nr / d; ++hh)
          gemm<T>(true, false, d, C, d, pv, d, w2c + hh * d * C, C, T(0),
                  lt.w3.data() + (r0 + hh * d) * C, C);
      }
    }
    lt.w2p = pvv ? (pre ? lt.w2.data() : W) : nullptr;
    lt.w3p = lt.w3.data();
  } else {
    lt.w3.clear();
    lt.w2.clear();
    lt.w3p = W;
  }

  const FakeQuantSpec& ws = cx.q.w[p];
  if (ws.on()) {
    lt.w4.resize(static_cast<size_t>(R * C));
    const Beta<T> b = cx.wbeta(p);
    fake_quant_fwd(ws, lt.w4.data(), lt.w3p, R, C, b.max, b.min, b.n, &lt.wsaved, rt);
    lt.w4p = lt.w4.data();
  } else {
    lt.w4.clear();
    lt.w4p = lt.w3p;
  }

  lt.biasp = nullptr;
  lt.bias.clear();
  if (p <= kV && !cx.w.bias[p].empty()) {
    if (pvv) {
      lt.bias.resize(static_cast<size_t>(R));
      // b̃_h = b_h · P_v per KV head (a row vector times (d, d)).
      gemm<T>(false, false, R / d, d, d, cx.w.bias[p].data(), d, pv, d, T(0), lt.bias.data(), d);
      lt.biasp = lt.bias.data();
    } else {
      lt.biasp = cx.w.bias[p].data();
    }
  }
}

// ---- activation-side transform x̃ = kron(x ⊙ c; L, R) of (N, n); returns x̃
// (`out`, or `in` itself when the slot is the identity).
template <typename T>
const T* act_transform_fwd(const Ctx<T>& cx, const Slot<T>& sl, const T* in, int64_t N,
                           std::vector<T>& out, const BlockTape<T>& tp) {
  if (!sl.diag && !sl.akron) {
    out.clear();
    return in;
  }
  const int64_t n = sl.n;
  out.resize(static_cast<size_t>(N * n));
  const T* src = in;
  if (sl.diag) {
    const std::vector<T>& c = get(cx.t, sl.c);
    T* dd = sl.akron ? grow(tp.s_diag, static_cast<size_t>(N * n)) : out.data();
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < n; ++j) dd[r * n + j] = in[r * n + j] * c[j];
    src = dd;
  }
  if (sl.akron)
    kron_rows_fwd(out.data(), src, ptr_or_null(get(cx.t, sl.L)), ptr_or_null(get(cx.t, sl.R)), N,
                  sl.n1, sl.n2, grow(tp.s_work, static_cast<size_t>(kron_block_rows(n) * n)));
  return out.data();
}

// Backward of act_transform_fwd: gradient at `in` from dxt, in `buf` (or dxt itself
// when the slot is the identity). Accumulates dL, dR, dc.
template <typename T>
const T* act_transform_bwd(const Ctx<T>& cx, const Slot<T>& sl, const T* dxt, const T* in,
                           int64_t N, std::vector<T>& buf, const BlockTape<T>& tp,
                           BlockGradsT<T>* g, const BackwardOptions& opt) {
  if (!sl.diag && !sl.akron) return dxt;
  const int64_t n = sl.n;
  T* dx = grow(buf, static_cast<size_t>(N * n));
  const T* cur = dxt;
  const std::vector<T>* c = sl.diag ? &get(cx.t, sl.c) : nullptr;
  if (sl.akron) {
    const T* xin = in;
    if (sl.diag) {
      T* dd = grow(tp.s_diag, static_cast<size_t>(N * n));
      for (int64_t r = 0; r < N; ++r)
        for (int64_t j = 0; j < n; ++j) dd[r * n + j] = in[r * n + j] * (*c)[j];
      xin = dd;
    }
    const std::vector<T>& L = get(cx.t, sl.L);
    const std::vector<T>& R = get(cx.t, sl.R);
    T* dL = (opt.transforms && !L.empty()) ? grad_buf(g->t.*(sl.L), L.size()) : nullptr;
    T* dR = (opt.transforms && !R.empty()) ? grad_buf(g->t.*(sl.R), R.size()) : nullptr;
    kron_rows_bwd(dx, dL, dR, dxt, xin, ptr_or_null(L), ptr_or_null(R), N, sl.n1, sl.n2,
                  grow(tp.s_work, static_cast<size_t>(2 * kron_block_rows(n) * n)));
    cur = dx;
  }
  if (sl.diag) {
    if (opt.transforms) {
      T* dc = grad_buf(g->t.*(sl.c), static_cast<size_t>(n));
      for (int64_t r = 0; r < N; ++r)
        for (int64_t j = 0; j < n; ++j) dc[j] += in[r * n + j] * cur[r * n + j];
    }
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < n; ++j) dx[r * n + j] = cur[r * n + j] * (*c)[j];
  }
  return dx;
}

// ---- activation fake quantizer of linear p's input (N, C).
template <typename T>
const T* act_quant_fwd(const Ctx<T>& cx, int p, const T* x, int64_t N, int64_t C,
                       typename BlockTape<T>::Lin& lt, RoundTape<T>* rt) {
  lt.xpre = x;
  const FakeQuantSpec& s = cx.q.act[p];
  if (!s.on()) {
    lt.xq.clear();
    lt.xin = x;
    return x;
  }
  lt.xq.resize(static_cast<size_t>(N * C));
  const Beta<T> b = cx.abeta(p);
  fake_quant_fwd(s, lt.xq.data(), x, N, C, b.max, b.min, b.n, &lt.asaved, rt);
  lt.xin = lt.xq.data();
  return lt.xin;
}

// dx (N, C) of a learned-clip fake quantizer into `out` (or dy itself when off).
template <typename T>
const T* quant_bwd(const FakeQuantSpec& s, const Beta<T>& b, std::vector<T>& gmax,
                   std::vector<T>& gmin, const T* dy, const T* x, int64_t N, int64_t C,
                   const FakeQuantSaved<T>& saved, T* out, const BackwardOptions& opt) {
  if (!s.on()) return dy;
  T* dmax = nullptr;
  T* dmin = nullptr;
  if (opt.clip && b.max) {
    dmax = grad_buf(gmax, static_cast<size_t>(b.n));
    dmin = grad_buf(gmin, static_cast<size_t>(b.n));
  }
  fake_quant_bwd(s, out, dmax, dmin, dy, x, N, C, b.max, b.min, b.n, saved);
  return out;
}

// y (N, R) = x_in · W4ᵀ + bias.
template <typename T>
void linear_fwd(const Ctx<T>& cx, int p, const typename BlockTape<T>::Lin& lt, int64_t N, T* y) {
  const int64_t R = cx.rows(p), C = cx.cols(p);
  gemm<T>(false, true, N, R, C, lt.xin, C, lt.w4p, C, T(0), y, R);
  if (lt.biasp)
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < R; ++j) y[r * R + j] += lt.biasp[j];
}

// ---- weight path backward of linear p from dout (N, R) and its input (N, C).
template <typename T>
void weight_backward(const Ctx<T>& cx, int p, const BlockTape<T>& tp, const T* dout, int64_t N,
                     BlockGradsT<T>* g, const BackwardOptions& opt) {
  const typename BlockTape<T>::Lin& lt = tp.lin[p];
  const Slot<T>& sl = cx.slot(p);
  const FakeQuantSpec& ws = cx.q.w[p];
  const bool pvv = cx.pvv(p);
  const Beta<T> beta = cx.wbeta(p);
  const bool tr = opt.transforms && (sl.diag || sl.wkron || pvv);
  const bool clip = opt.clip && ws.on() && beta.max != nullptr;
  if (!tr && !clip && !opt.weights) return;

  const int64_t R = cx.rows(p), C = cx.cols(p), d = cx.d;
  const T* W = cx.w.w[p].data();
  const std::vector<T> inv_c = reciprocals(get(cx.t, sl.c));
  const std::vector<T>& Lit = get(cx.t, sl.L_it);
  const std::vector<T>& Rit = get(cx.t, sl.R_it);
  const int64_t G = groups_of(ws, C);
  // dW1 (the gradient at W ⊙ 1/c) is needed for dc and dW.
  const bool need_dw1 = opt.weights || (opt.transforms && sl.diag);
  T* dLit = (opt.transforms && !Lit.empty()) ? grad_buf(g->t.*(sl.L_it), Lit.size()) : nullptr;
  T* dRit = (opt.transforms && !Rit.empty()) ? grad_buf(g->t.*(sl.R_it), Rit.size()) : nullptr;
  T* dpv = (opt.transforms && pvv) ? grad_buf(g->t.pv, cx.t.pv.size()) : nullptr;
  T* dc = (opt.transforms && sl.diag) ? grad_buf(g->t.*(sl.c), static_cast<size_t>(C)) : nullptr;
  T* dW = opt.weights ? grad_buf(g->w.w[p], static_cast<size_t>(R * C)) : nullptr;
  T* dbmax = clip ? grad_buf(g->clip.w_max[p], static_cast<size_t>(beta.n)) : nullptr;
  T* dbmin = clip ? grad_buf(g->clip.w_min[p], static_cast<size_t>(beta.n)) : nullptr;
  // Σ_i W1_ij dW1_ij per column (dc_j −= it / c_j at the end).
  std::vector<T> colsum(dc ? static_cast<size_t>(C) : 0, T(0));

  const int64_t rc = chunk_rows(R, C, pvv ? d : 1);
  const size_t csz = static_cast<size_t>(rc * C);
  T* b0 = grow(tp.s_w[0], csz);
  T* b1 = grow(tp.s_w[1], csz);
  for (int64_t r0 = 0; r0 < R; r0 += rc) {
    const int64_t nr = std::min(rc, R - r0);
    // dW4 rows [r0, r0 + nr) = dout[:, r0:r0+nr]ᵀ · x_in.
    gemm<T>(true, false, nr, C, N, dout + r0, R, lt.xin, C, T(0), b0, C);
    T* cur = b0;
    T* other = b1;
    if (ws.on()) {
      const FakeQuantSaved<T>* sv = &lt.wsaved;
      if (nr != R) {
        slice_saved(lt.wsaved, r0 * G, nr * G, &tp.s_saved);
        sv = &tp.s_saved;
      }
      const int64_t boff = beta.n > 1 ? r0 * G : 0;
      const int64_t bn = beta.n > 1 ? nr * G : beta.n;
      fake_quant_bwd(ws, other, dbmax ? dbmax + boff : nullptr, dbmin ? dbmin + boff : nullptr, cur,
                     lt.w3p + r0 * C, nr, C, beta.max ? beta.max + boff : nullptr,
                     beta.min ? beta.min + boff : nullptr, bn, *sv);
      std::swap(cur, other);
    }
    if (!tr && !opt.weights) continue;  // only the clip parameters were wanted
    if (pvv) {
      // W3_h = P_vᵀ W2_h: dP_v += W2_h · dW3_hᵀ, dW2_h = P_v · dW3_h.
      for (int64_t hh = 0; hh < nr / d; ++hh) {
        const int64_t o = hh * d * C;
        if (dpv) gemm<T>(false, true, d, d, C, lt.w2p + r0 * C + o, C, cur + o, C, T(1), dpv, d);
        gemm<T>(false, false, d, C, d, cx.t.pv.data(), d, cur + o, C, T(0), other + o, C);
      }
      std::swap(cur, other);
    }
    const T* w1 = W + r0 * C;  // W1 = W ⊙ 1/c rows
    if (sl.diag && (sl.wkron || dc)) {
      T* wc = grow(tp.s_wc, csz);
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t j = 0; j < C; ++j) wc[i * C + j] = w1[i * C + j] * inv_c[j];
      w1 = wc;
    }
    if (sl.wkron) {
      if (!tr && !need_dw1) continue;
      kron_rows_bwd(need_dw1 ? other : static_cast<T*>(nullptr), dLit, dRit, cur, w1,
                    ptr_or_null(Lit), ptr_or_null(Rit), nr, sl.n1, sl.n2,
                    grow(tp.s_work, static_cast<size_t>(2 * kron_block_rows(C) * C)));
      if (!need_dw1) continue;
      std::swap(cur, other);
    }
    // cur = dW1 rows. W1 = W ⊙ 1/c: dc_j −= Σ_i W1_ij dW1_ij / c_j, dW = dW1 ⊙ 1/c.
    if (dc)
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t j = 0; j < C; ++j) colsum[j] += w1[i * C + j] * cur[i * C + j];
    if (dW) {
      T* dwr = dW + r0 * C;
      if (sl.diag) {
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t j = 0; j < C; ++j) dwr[i * C + j] += cur[i * C + j] * inv_c[j];
      } else {
        for (int64_t i = 0; i < nr * C; ++i) dwr[i] += cur[i];
      }
    }
  }
  if (dc)
    for (int64_t j = 0; j < C; ++j) dc[j] -= colsum[j] * inv_c[j];
}

// The sum over linears `ps` sharing the input x̃ (N, C) of fq_act_p⁻¹-backward of
// dout_p · W4_p, into dxt (N, C).
template <typename T>
void shared_input_bwd(const Ctx<T>& cx, const BlockTape<T>& tp, std::initializer_list<int> ps,
                      const T* const* douts, int64_t N, T* dxt, BlockGradsT<T>* g,
                      const BackwardOptions& opt) {
  bool first = true;
  int i = 0;
  for (int p : ps) {
    const T* dout = douts[i++];
    const int64_t R = cx.rows(p), C = cx.cols(p);
    const typename BlockTape<T>::Lin& lt = tp.lin[p];
    const FakeQuantSpec& s = cx.q.act[p];
    if (!s.on()) {
      gemm<T>(false, false, N, C, R, dout, R, lt.w4p, C, first ? T(0) : T(1), dxt, C);
    } else {
      T* t1 = grow(tp.s_tH, static_cast<size_t>(N * C));
      gemm<T>(false, false, N, C, R, dout, R, lt.w4p, C, T(0), t1, C);
      T* dst = first ? dxt : grow(tp.s_tH2, static_cast<size_t>(N * C));
      quant_bwd(s, cx.abeta(p), g->clip.act_max[p], g->clip.act_min[p], t1, lt.xpre, N, C,
                lt.asaved, dst, opt);
      if (!first)
        for (int64_t e = 0; e < N * C; ++e) dxt[e] += dst[e];
    }
    first = false;
  }
}

}  // namespace

// ---------------------------------------------------------------- QBlock

template <typename T>
QBlock<T>::QBlock(const ModelConfig& c, const BlockWeightsT<T>* w, const BlockTransformsT<T>* t,
                  const BlockQuantSpec* q, const BlockClipT<T>* clip)
    : c_(c), w_(w), t_(t), q_(q), clip_(clip) {
  QCAL_CHECK_MSG(w != nullptr, "QBlock: weights are required");
}

template <typename T>
QBlock<T>::~QBlock() = default;

template <typename T>
void QBlock<T>::set_prefix(const T* k, const T* v, int64_t P) {
  QCAL_CHECK_MSG(P >= 0, "QBlock::set_prefix: negative prefix length");
  if (P == 0 || k == nullptr) {
    prefix_k_ = prefix_v_ = nullptr;
    prefix_P_ = 0;
    return;
  }
  QCAL_CHECK_MSG(v != nullptr, "QBlock::set_prefix: K without V");
  prefix_k_ = k;
  prefix_v_ = v;
  prefix_P_ = P;
}

template <typename T>
void QBlock<T>::forward(const T* x, T* y, int64_t B, int64_t T_, BlockTape<T>* tape,
                        const LinearInputHook& hook, RoundTape<T>* round_tape) const {
  const Ctx<T> cx(c_, w_, t_, q_, clip_);
  const int64_t H = cx.H, I = cx.I, Q = cx.Q, K = cx.K, nh = cx.nh, nkv = cx.nkv, d = cx.d;
  const int64_t N = B * T_;
  const bool keep = tape != nullptr;
  std::unique_ptr<BlockTape<T>> local;
  if (!keep) {
    local = make_tape<T>();
    tape = local.get();
  }
  BlockTape<T>& tp = *tape;
  tp.valid = false;
  tp.B = B, tp.T_ = T_, tp.N = N;
  tp.P = prefix_P_, tp.pk = prefix_k_, tp.pv = prefix_v_;
  const int64_t P = prefix_P_;
  if (N <= 0) return;
  const T eps = static_cast<T>(c_.rms_norm_eps);
  RoundTape<T>* rt = round_tape;

  for (int p = 0; p < kNumProj; ++p) weight_forward(cx, p, tp.lin[p], tp, rt);

  // ---- attention
  if (keep) tp.x.assign(x, x + N * H);
  tp.h.resize(static_cast<size_t>(N * H));
  tp.inv1.resize(static_cast<size_t>(N));
  rmsnorm_fwd(tp.h.data(), x, w_->input_norm.data(), N, H, eps, tp.inv1.data());
  tp.htp = act_transform_fwd(cx, cx.slots[0], tp.h.data(), N, tp.ht, tp);
  for (int p = kQ; p <= kV; ++p) {
    act_quant_fwd(cx, p, tp.htp, N, H, tp.lin[p], rt);
    call_hook(hook, p, tp.lin[p].xin, N, H, &tp.s_hook);
  }
  tp.q_rope.resize(static_cast<size_t>(N * Q));
  tp.k_rope.resize(static_cast<size_t>(N * K));
  tp.v_pre.resize(static_cast<size_t>(N * K));
  linear_fwd(cx, kQ, tp.lin[kQ], N, tp.q_rope.data());
  linear_fwd(cx, kK, tp.lin[kK], N, tp.k_rope.data());
  linear_fwd(cx, kV, tp.lin[kV], N, tp.v_pre.data());
  for (int64_t s = 0; s < B; ++s) {
    rope_fwd(tp.q_rope.data() + s * T_ * Q, T_, nh, d, P, c_.rope_theta);
    rope_fwd(tp.k_rope.data() + s * T_ * K, T_, nkv, d, P, c_.rope_theta);
  }
  const BlockTransformsT<T>& t = cx.t;
  tp.qa = tp.q_rope.data();
  if (!t.pk_it.empty()) {
    tp.q_att.resize(static_cast<size_t>(N * Q));
    gemm<T>(false, false, N * nh, d, d, tp.q_rope.data(), d, t.pk_it.data(), d, T(0),
            tp.q_att.data(), d);
    tp.qa = tp.q_att.data();
  } else {
    tp.q_att.clear();
  }
  tp.kp = tp.k_rope.data();
  if (!t.pk.empty()) {
    tp.k_post.resize(static_cast<size_t>(N * K));
    gemm<T>(false, false, N * nkv, d, d, tp.k_rope.data(), d, t.pk.data(), d, T(0),
            tp.k_post.data(), d);
    tp.kp = tp.k_post.data();
  } else {
    tp.k_post.clear();
  }
  const BlockQuantSpec& qs = cx.q;
  tp.ka = tp.kp;
  if (qs.k.on()) {
    tp.k_att.resize(static_cast<size_t>(N * K));
    const Beta<T> b = beta_of(qs.k, cx.clip.k_max, cx.clip.k_min, 1);
    fake_quant_fwd(qs.k, tp.k_att.data(), tp.kp, N, K, b.max, b.min, b.n, &tp.ksaved, rt);
    tp.ka = tp.k_att.data();
  }
  tp.va = tp.v_pre.data();
  if (qs.v.on()) {
    tp.v_att.resize(static_cast<size_t>(N * K));
    const Beta<T> b = beta_of(qs.v, cx.clip.v_max, cx.clip.v_min, 1);
    fake_quant_fwd(qs.v, tp.v_att.data(), tp.v_pre.data(), N, K, b.max, b.min, b.n, &tp.vsaved, rt);
    tp.va = tp.v_att.data();
  }
  tp.a.resize(static_cast<size_t>(N * Q));
  const int64_t pstride = nh * T_ * (P + T_);
  tp.probs.resize(static_cast<size_t>((keep ? B : 1) * pstride));
  for (int64_t s = 0; s < B; ++s)
    prefix_attention_fwd(tp.a.data() + s * T_ * Q, tp.qa + s * T_ * Q, tp.pk, tp.pv, P,
                         tp.ka + s * T_ * K, tp.va + s * T_ * K, T_, nh, nkv, d,
                         tp.probs.data() + (keep ? s * pstride : 0));
  tp.atp = act_transform_fwd(cx, cx.slots[1], tp.a.data(), N, tp.at, tp);
  act_quant_fwd(cx, kO, tp.atp, N, Q, tp.lin[kO], rt);
  call_hook(hook, kO, tp.lin[kO].xin, N, Q, &tp.s_hook);
  if (y != x) std::memcpy(y, x, sizeof(T) * static_cast<size_t>(N * H));
  gemm<T>(false, true, N, H, Q, tp.lin[kO].xin, Q, tp.lin[kO].w4p, Q, T(1), y, H);

  // ---- MLP
  if (keep) tp.x1.assign(y, y + N * H);
  tp.m.resize(static_cast<size_t>(N * H));
  tp.inv2.resize(static_cast<size_t>(N));
  rmsnorm_fwd(tp.m.data(), y, w_->post_norm.data(), N, H, eps, tp.inv2.data());
  tp.mtp = act_transform_fwd(cx, cx.slots[2], tp.m.data(), N, tp.mt, tp);
  for (int p = kGate; p <= kUp; ++p) {
    act_quant_fwd(cx, p, tp.mtp, N, H, tp.lin[p], rt);
    call_hook(hook, p, tp.lin[p].xin, N, H, &tp.s_hook);
  }
  tp.gate.resize(static_cast<size_t>(N * I));
  tp.up.resize(static_cast<size_t>(N * I));
  tp.z.resize(static_cast<size_t>(N * I));
  linear_fwd(cx, kGate, tp.lin[kGate], N, tp.gate.data());
  linear_fwd(cx, kUp, tp.lin[kUp], N, tp.up.data());
  swiglu_fwd(tp.z.data(), tp.gate.data(), tp.up.data(), N * I);
  tp.ztp = act_transform_fwd(cx, cx.slots[3], tp.z.data(), N, tp.zt, tp);
  act_quant_fwd(cx, kDown, tp.ztp, N, I, tp.lin[kDown], rt);
  call_hook(hook, kDown, tp.lin[kDown].xin, N, I, &tp.s_hook);
  gemm<T>(false, true, N, H, I, tp.lin[kDown].xin, I, tp.lin[kDown].w4p, I, T(1), y, H);
  tp.valid = keep;
}

template <typename T>
void QBlock<T>::backward(const BlockTape<T>& tp, const T* dy, BlockGradsT<T>* g,
                         const BackwardOptions& opt) const {
  QCAL_CHECK_MSG(tp.valid, "QBlock::backward: the tape holds no forward");
  const Ctx<T> cx(c_, w_, t_, q_, clip_);
  const int64_t H = cx.H, I = cx.I, Q = cx.Q, K = cx.K, nh = cx.nh, nkv = cx.nkv, d = cx.d;
  const int64_t B = tp.B, T_ = tp.T_, N = tp.N;
  const BlockTransformsT<T>& t = cx.t;
  const BlockQuantSpec& qs = cx.q;
  const size_t nH = static_cast<size_t>(N * H), nI = static_cast<size_t>(N * I);
  const size_t nQ = static_cast<size_t>(N * Q), nK = static_cast<size_t>(N * K);

  T* dres = grow(tp.s_dres, nH);  // gradient at the residual stream (N, H)
  std::memcpy(dres, dy, sizeof(T) * nH);

  // ---- down_proj
  T* dzq = grow(tp.s_dI[0], nI);
  gemm<T>(false, false, N, I, H, dy, H, tp.lin[kDown].w4p, I, T(0), dzq, I);
  weight_backward(cx, kDown, tp, dy, N, g, opt);
  const T* dzt =
      quant_bwd(qs.act[kDown], cx.abeta(kDown), g->clip.act_max[kDown], g->clip.act_min[kDown], dzq,
                tp.ztp, N, I, tp.lin[kDown].asaved, grow(tp.s_dI[1], nI), opt);
  const T* dz = act_transform_bwd(cx, cx.slots[3], dzt, tp.z.data(), N, tp.s_dI[2], tp, g, opt);
  T* dgate = grow(tp.s_dI[3], nI);
  T* dup = grow(tp.s_dI[4], nI);
  swiglu_bwd(dgate, dup, dz, tp.gate.data(), tp.up.data(), N * I);

  // ---- gate / up
  weight_backward(cx, kGate, tp, dgate, N, g, opt);
  weight_backward(cx, kUp, tp, dup, N, g, opt);
  {
    T* dmt = grow(tp.s_dQ[0], nH);
    const T* douts[2] = {dgate, dup};
    shared_input_bwd(cx, tp, {kGate, kUp}, douts, N, dmt, g, opt);
    const T* dm = act_transform_bwd(cx, cx.slots[2], dmt, tp.m.data(), N, tp.s_dQ[1], tp, g, opt);
    T* tH = grow(tp.s_dQ[2], nH);
    T* dpost = opt.weights ? grad_buf(g->w.post_norm, static_cast<size_t>(H)) : nullptr;
    rmsnorm_bwd(tH, dpost, dm, tp.x1.data(), w_->post_norm.data(), tp.inv2.data(), N, H);
    for (size_t e = 0; e < nH; ++e) dres[e] += tH[e];
  }

  // ---- o_proj
  T* daq = grow(tp.s_dQ[0], std::max(nQ, nH));
  gemm<T>(false, false, N, Q, H, dres, H, tp.lin[kO].w4p, Q, T(0), daq, Q);
  weight_backward(cx, kO, tp, dres, N, g, opt);
  const T* dat = quant_bwd(qs.act[kO], cx.abeta(kO), g->clip.act_max[kO], g->clip.act_min[kO], daq,
                           tp.atp, N, Q, tp.lin[kO].asaved, grow(tp.s_dQ[1], nQ), opt);
  const T* da = act_transform_bwd(cx, cx.slots[1], dat, tp.a.data(), N, tp.s_dQ[2], tp, g, opt);

  // ---- attention
  T* dq = grow(tp.s_dI[0], nQ);
  T* dk = grow(tp.s_dK[0], nK);
  T* dv = grow(tp.s_dK[1], nK);
  const int64_t P = tp.P;
  const int64_t pstride = nh * T_ * (P + T_);
  T* dpk = opt.prefix && P > 0 ? grad_buf(g->prefix_k, static_cast<size_t>(P * K)) : nullptr;
  T* dpv = opt.prefix && P > 0 ? grad_buf(g->prefix_v, static_cast<size_t>(P * K)) : nullptr;
  for (int64_t s = 0; s < B; ++s)
    prefix_attention_bwd(dq + s * T_ * Q, dpk, dpv, dk + s * T_ * K, dv + s * T_ * K,
                         da + s * T_ * Q, tp.qa + s * T_ * Q, tp.pk, tp.pv, P, tp.ka + s * T_ * K,
                         tp.va + s * T_ * K, tp.probs.data() + s * pstride, T_, nh, nkv, d);
  {
    const Beta<T> b = beta_of(qs.v, cx.clip.v_max, cx.clip.v_min, 1);
    if (qs.v.on()) {
      T* o = grow(tp.s_dK[2], nK);
      quant_bwd(qs.v, b, g->clip.v_max, g->clip.v_min, dv, tp.v_pre.data(), N, K, tp.vsaved, o,
                opt);
      dv = o;
    }
  }
  if (qs.k.on()) {
    const Beta<T> b = beta_of(qs.k, cx.clip.k_max, cx.clip.k_min, 1);
    T* o = grow(tp.s_dK[3], nK);
    quant_bwd(qs.k, b, g->clip.k_max, g->clip.k_min, dk, tp.kp, N, K, tp.ksaved, o, opt);
    dk = o;
  }
  if (!t.pk.empty()) {
    // k_post = k_rope · P_k per head: dP_k += k_ropeᵀ dk_post, dk_rope = dk_post P_kᵀ.
    if (opt.transforms)
      gemm<T>(true, false, d, d, N * nkv, tp.k_rope.data(), d, dk, d, T(1),
              grad_buf(g->t.pk, t.pk.size()), d);
    T* o = (dk == tp.s_dK[0].data()) ? grow(tp.s_dK[3], nK) : tp.s_dK[0].data();
    gemm<T>(false, true, N * nkv, d, d, dk, d, t.pk.data(), d, T(0), o, d);
    dk = o;
  }
  if (!t.pk_it.empty()) {
    if (opt.transforms)
      gemm<T>(true, false, d, d, N * nh, tp.q_rope.data(), d, dq, d, T(1),
              grad_buf(g->t.pk_it, t.pk_it.size()), d);
    T* o = grow(tp.s_dI[1], nQ);
    gemm<T>(false, true, N * nh, d, d, dq, d, t.pk_it.data(), d, T(0), o, d);
    dq = o;
  }
  for (int64_t s = 0; s < B; ++s) {
    rope_bwd(dq + s * T_ * Q, T_, nh, d, P, c_.rope_theta);
    rope_bwd(dk + s * T_ * K, T_, nkv, d, P, c_.rope_theta);
  }

  // ---- q / k / v
  const T* douts[3] = {dq, dk, dv};
  for (int p = kQ; p <= kV; ++p) {
    if (w_->bias[p].empty()) continue;
    const int64_t R = cx.rows(p);
    const bool pvv = cx.pvv(p);
    const bool want_pv = opt.transforms && pvv;
    if (!opt.weights && !want_pv) continue;
    std::vector<T> db(static_cast<size_t>(R), T(0));  // gradient at the effective bias
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < R; ++j) db[j] += douts[p][r * R + j];
    if (!pvv) {
      if (opt.weights) {
        T* gb = grad_buf(g->w.bias[p], static_cast<size_t>(R));
        for (int64_t j = 0; j < R; ++j) gb[j] += db[j];
      }
      continue;
    }
    // b̃_h = b_h P_v: dP_v += Σ_h b_hᵀ db̃_h, db_h = db̃_h P_vᵀ.
    if (want_pv)
      gemm<T>(true, false, d, d, R / d, w_->bias[p].data(), d, db.data(), d, T(1),
              grad_buf(g->t.pv, t.pv.size()), d);
    if (opt.weights)
      gemm<T>(false, true, R / d, d, d, db.data(), d, t.pv.data(), d, T(1),
              grad_buf(g->w.bias[p], static_cast<size_t>(R)), d);
  }
  for (int p = kQ; p <= kV; ++p) weight_backward(cx, p, tp, douts[p], N, g, opt);
  T* dht = grow(tp.s_dQ[0], std::max(nQ, nH));
  shared_input_bwd(cx, tp, {kQ, kK, kV}, douts, N, dht, g, opt);
  const T* dh = act_transform_bwd(cx, cx.slots[0], dht, tp.h.data(), N, tp.s_dQ[1], tp, g, opt);
  if (!opt.input && !opt.weights) return;
  T* tH = grow(tp.s_dQ[2], std::max(nQ, nH));
  T* dgin = opt.weights ? grad_buf(g->w.input_norm, static_cast<size_t>(H)) : nullptr;
  rmsnorm_bwd(tH, dgin, dh, tp.x.data(), w_->input_norm.data(), tp.inv1.data(), N, H);
  if (opt.input) {
    g->dx.resize(nH);
    for (size_t e = 0; e < nH; ++e) g->dx[e] = dres[e] + tH[e];
  }
}

template <typename T>
std::vector<T> QBlock<T>::effective_weight(int p, bool quantized) const {
  QCAL_CHECK(p >= 0 && p < kNumProj);
  const Ctx<T> cx(c_, w_, t_, q_, clip_);
  BlockTape<T> tp;
  weight_forward<T>(cx, p, tp.lin[p], tp, nullptr);
  const int64_t R = cx.rows(p), C = cx.cols(p);
  typename BlockTape<T>::Lin& lt = tp.lin[p];
  const FakeQuantSpec& ws = cx.q.w[p];
  // The tape's own (R, C) weight is returned, not copied (a deploy of a 405B block's
  // down_proj holds 2 fp64 copies of it, not 4).
  lt.w2 = std::vector<T>();
  const bool w3_own = lt.w3p == lt.w3.data() && lt.w3.size() == static_cast<size_t>(R * C);
  if (quantized || !ws.on()) {
    if (lt.w4p == lt.w3p && w3_own) return std::move(lt.w3);
    return std::vector<T>(lt.w4p, lt.w4p + R * C);
  }
  std::vector<T> out = w3_own ? std::move(lt.w3) : std::vector<T>(lt.w3p, lt.w3p + R * C);
  if (!ws.lwc_range) return out;
  // LWC: clamp each (row, group) to [min·σ(β_min), max·σ(β_max)] (FlatQuant bakes it in).
  const Beta<T> b = cx.wbeta(p);
  const int64_t G = groups_of(ws, C), gs = ws.group > 0 ? ws.group : C;
  auto sig = [](T v) { return T(1) / (T(1) + std::exp(-v)); };
  for (int64_t r = 0; r < R; ++r)
    for (int64_t gi = 0; gi < G; ++gi) {
      T* e = out.data() + r * C + gi * gs;
      const int64_t n = std::min(gs, C - gi * gs);
      T mx = e[0], mn = e[0];
      for (int64_t j = 1; j < n; ++j) mx = std::max(mx, e[j]), mn = std::min(mn, e[j]);
      const int64_t bi = b.n > 1 ? r * G + gi : 0;
      const T cmax = b.max ? sig(b.max[bi]) : static_cast<T>(ws.clip_ratio);
      const T cmin = b.min ? sig(b.min[bi]) : static_cast<T>(ws.clip_ratio);
      const T hi = mx * cmax, lo = mn * cmin;
      for (int64_t j = 0; j < n; ++j) e[j] = std::min(std::max(e[j], lo), hi);
    }
  return out;
}

template <typename T>
std::vector<T> QBlock<T>::effective_bias(int p) const {
  if (p < 0 || p > kV || w_->bias[p].empty()) return {};
  const Ctx<T> cx(c_, w_, t_, q_, clip_);
  if (!cx.pvv(p)) return w_->bias[p];
  const int64_t R = cx.rows(p), d = cx.d;
  std::vector<T> out(static_cast<size_t>(R));
  gemm<T>(false, false, R / d, d, d, w_->bias[p].data(), d, cx.t.pv.data(), d, T(0), out.data(), d);
  return out;
}

// ---------------------------------------------------------------- conversions

BlockWeightsT<float> to_block_weights(LayerWeights w) {
  BlockWeightsT<float> b;
  b.input_norm = std::move(w.input_norm.data);
  b.post_norm = std::move(w.post_norm.data);
  for (int p = 0; p < kNumProj; ++p) b.w[p] = std::move(w.proj(kProjNames[p]).data);
  b.bias[0] = std::move(w.q_bias.data);
  b.bias[1] = std::move(w.k_bias.data);
  b.bias[2] = std::move(w.v_bias.data);
  return b;
}

LayerWeights to_layer_weights(const BlockWeightsT<float>& w, const ModelConfig& c) {
  LayerWeights l;
  auto make = [](std::vector<int64_t> shape, const std::vector<float>& data) {
    Tensor t(std::move(shape));
    QCAL_CHECK_MSG(static_cast<int64_t>(data.size()) == t.numel(),
                   "to_layer_weights: tensor size does not match the config");
    t.data = data;
    return t;
  };
  l.input_norm = make({c.hidden_size}, w.input_norm);
  l.post_norm = make({c.hidden_size}, w.post_norm);
  for (int p = 0; p < kNumProj; ++p)
    l.proj(kProjNames[p]) = make(proj_shape(c, kProjNames[p]), w.w[p]);
  Tensor* biases[3] = {&l.q_bias, &l.k_bias, &l.v_bias};
  for (int p = 0; p < 3; ++p)
    if (!w.bias[p].empty()) *biases[p] = make({proj_shape(c, kProjNames[p])[0]}, w.bias[p]);
  return l;
}

template <typename T, typename U>
BlockWeightsT<T> cast_weights(const BlockWeightsT<U>& w) {
  auto cv = [](const std::vector<U>& v) { return std::vector<T>(v.begin(), v.end()); };
  BlockWeightsT<T> o;
  o.input_norm = cv(w.input_norm);
  o.post_norm = cv(w.post_norm);
  for (int p = 0; p < kNumProj; ++p) o.w[p] = cv(w.w[p]);
  for (int p = 0; p < 3; ++p) o.bias[p] = cv(w.bias[p]);
  return o;
}

template <typename T>
BlockClipT<T> init_clip_params(const BlockQuantSpec& q, const ModelConfig& c, T init) {
  BlockClipT<T> b;
  auto learned = [](const FakeQuantSpec& s) { return s.on() && s.clip == ClipMode::kLearned; };
  for (int p = 0; p < kNumProj; ++p) {
    if (learned(q.act[p])) b.act_max[p] = b.act_min[p] = {init};
    if (learned(q.w[p])) {
      const std::vector<int64_t> shape = proj_shape(c, kProjNames[p]);
      const size_t n = static_cast<size_t>(shape[0] * groups_of(q.w[p], shape[1]));
      b.w_max[p].assign(n, init);
      b.w_min[p].assign(n, init);
    }
  }
  if (learned(q.k)) b.k_max = b.k_min = {init};
  if (learned(q.v)) b.v_max = b.v_min = {init};
  return b;
}

// ---------------------------------------------------------------- instantiations

template struct BlockTape<float>;
template struct BlockTape<double>;
template void destroy_tape<float>(BlockTape<float>*);
template void destroy_tape<double>(BlockTape<double>*);
template std::unique_ptr<BlockTape<float>> make_tape<float>();
template std::unique_ptr<BlockTape<double>> make_tape<double>();
template class QBlock<float>;
template class QBlock<double>;
template BlockWeightsT<float> cast_weights<float, float>(const BlockWeightsT<float>&);
template BlockWeightsT<float> cast_weights<float, double>(const BlockWeightsT<double>&);
template BlockWeightsT<double> cast_weights<double, float>(const BlockWeightsT<float>&);
template BlockWeightsT<double> cast_weights<double, double>(const BlockWeightsT<double>&);
template BlockClipT<float> init_clip_params<float>(const BlockQuantSpec&, const ModelConfig&,
                                                   float);
template BlockClipT<double> init_clip_params<double>(const BlockQuantSpec&, const ModelConfig&,
                                                     double);

}  // namespace qcal::calib

// labels: unit
// Calibration-training primitives (kernels/grad.h). Every backward is checked
// against float64 central finite differences of its own forward (fake quant:
// of the RoundTape surrogate); float against double; the float forwards
// against the fp64 references of kernels/ops.h; kron against an explicit
// (L ⊗ R) product; fake quant against a direct scalar transcription of
// methods.md §0.1 (bit-exact). Errors are normwise: max|got − ref| / max|ref|;
// a NaN anywhere fails. Letters: T tokens, C channels, n_h / n_kv heads, d head
// dim, G groups per row.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/grad.h"
#include "kernels/ops.h"

namespace qcal {
namespace {

using Vec = std::vector<double>;

Vec randn(Rng& rng, size_t n, double scale = 1.0, double shift = 0.0) {
  Vec v(n);
  // Rounded to float so the float and double runs see the same inputs.
  for (auto& x : v) x = static_cast<float>(shift + scale * rng.normal());
  return v;
}

template <typename T>
std::vector<T> as(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <typename T>
Vec f64(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}

double dot(const Vec& a, const Vec& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Worst normwise relative error seen per kind of check, printed at the end.
struct Worst {
  double fd = 0, f32 = 0, ref = 0;
  ~Worst() {
    std::printf("[worst] finite-difference %.3g  float-vs-double %.3g  float-vs-ref %.3g\n", fd,
                f32, ref);
  }
} g_worst;

// max|got − ref| / max|ref| ≤ tol; NaN and size mismatches fail, and so does an
// all-zero ref unless `zero_ok` (then got must be exactly zero too).
::testing::AssertionResult close(const std::string& what, const Vec& got, const Vec& ref,
                                 double tol, double* worst = nullptr, bool zero_ok = false) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs " << ref.size();
  double scale = 0.0, diff = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) || std::isnan(ref[i]))
      return ::testing::AssertionFailure() << what << ": NaN at " << i;
    scale = std::max(scale, std::fabs(ref[i]));
    if (std::fabs(got[i] - ref[i]) > diff) {
      diff = std::fabs(got[i] - ref[i]);
      at = i;
    }
  }
  if (!(scale > 0.0)) {
    if (zero_ok && diff == 0.0) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": reference is all zero, max |got| " << diff;
  }
  const double rel = diff / scale;
  std::printf("  %-58s n=%-4zu rel err %.3g\n", what.c_str(), got.size(), rel);
  if (worst) *worst = std::max(*worst, rel);
  if (rel > tol)
    return ::testing::AssertionFailure()
           << what << ": rel err " << rel << " > " << tol << " (worst at " << at << ": " << got[at]
           << " vs " << ref[at] << ")";
  return ::testing::AssertionSuccess();
}

bool all_finite(const Vec& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

// One op run: the forward output y and, when asked, the gradient of dot(w, y)
// with respect to every input (same order as the inputs).
struct OpRun {
  Vec y;
  std::vector<Vec> g;
};
using Op = std::function<OpRun(const std::vector<Vec>& in, const Vec& w, bool grads)>;

// Central differences of dot(w, op(in).y) against op's gradients, every
// element of every input.
void check_fd(const std::string& name, const Op& op, std::vector<Vec> in, const Vec& w,
              double tol = 1e-6, double h = 1e-5, const std::vector<std::string>& names = {},
              bool zero_ok = false) {
  const OpRun base = op(in, w, true);
  ASSERT_EQ(base.g.size(), in.size()) << name;
  ASSERT_TRUE(all_finite(base.y)) << name;
  for (size_t k = 0; k < in.size(); ++k) {
    Vec fd(in[k].size());
    for (size_t i = 0; i < in[k].size(); ++i) {
      const double keep = in[k][i];
      in[k][i] = keep + h;
      const double lp = dot(w, op(in, w, false).y);
      in[k][i] = keep - h;
      const double lm = dot(w, op(in, w, false).y);
      in[k][i] = keep;
      fd[i] = (lp - lm) / (2 * h);
    }
    const std::string what = name + " d" + (k < names.size() ? names[k] : "in" + std::to_string(k));
    EXPECT_TRUE(close(what, base.g[k], fd, tol, &g_worst.fd, zero_ok));
  }
}

// Directional central differences (for shapes too big for every element).
void check_fd_dirs(const std::string& name, const Op& op, std::vector<Vec> in, const Vec& w,
                   Rng& rng, int dirs, double tol, double h = 1e-5) {
  const OpRun base = op(in, w, true);
  for (size_t k = 0; k < in.size(); ++k) {
    Vec got(dirs), fd(dirs);
    for (int t = 0; t < dirs; ++t) {
      const Vec u = randn(rng, in[k].size());
      const Vec keep = in[k];
      for (size_t i = 0; i < u.size(); ++i) in[k][i] = keep[i] + h * u[i];
      const double lp = dot(w, op(in, w, false).y);
      for (size_t i = 0; i < u.size(); ++i) in[k][i] = keep[i] - h * u[i];
      const double lm = dot(w, op(in, w, false).y);
      in[k] = keep;
      fd[t] = (lp - lm) / (2 * h);
      got[t] = dot(base.g[k], u);
    }
    EXPECT_TRUE(close(name + " directional d" + std::to_string(k), got, fd, tol, &g_worst.fd));
  }
}

// Float and double runs of the same op on the same (float-representable) inputs.
void check_f32(const std::string& name, const Op& op32, const Op& op64, const std::vector<Vec>& in,
               const Vec& w, double tol = 2e-5, bool zero_ok = false) {
  const OpRun a = op32(in, w, true), b = op64(in, w, true);
  EXPECT_TRUE(close(name + " f32 y", a.y, b.y, tol, &g_worst.f32));
  for (size_t k = 0; k < b.g.size(); ++k)
    EXPECT_TRUE(
        close(name + " f32 d" + std::to_string(k), a.g[k], b.g[k], tol, &g_worst.f32, zero_ok));
}

// ---------------------------------------------------------------- op adapters

constexpr double kAcc = 0.25;  // accumulated gradients start here (checks "+=")

template <typename T>
Op rmsnorm_op(int64_t rows, int64_t C, double eps) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto x = as<T>(in[0]), gm = as<T>(in[1]);
    std::vector<T> y(x.size()), inv(rows);
    rmsnorm_fwd(y.data(), x.data(), gm.data(), rows, C, static_cast<T>(eps), inv.data());
    OpRun r{f64(y), {}};
    if (grads) {
      auto dy = as<T>(w);
      std::vector<T> dx(x.size()), dg(C, static_cast<T>(kAcc));
      rmsnorm_bwd(dx.data(), dg.data(), dy.data(), x.data(), gm.data(), inv.data(), rows, C);
      for (auto& v : dg) v -= static_cast<T>(kAcc);
      r.g = {f64(dx), f64(dg)};
    }
    return r;
  };
}

template <typename T>
Op rope_op(int64_t T_, int64_t heads, int64_t d, int64_t pos0, double theta) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto x = as<T>(in[0]);
    rope_fwd(x.data(), T_, heads, d, pos0, theta);
    OpRun r{f64(x), {}};
    if (grads) {
      auto dx = as<T>(w);
      rope_bwd(dx.data(), T_, heads, d, pos0, theta);
      r.g = {f64(dx)};
    }
    return r;
  };
}

template <typename T>
Op attention_op(int64_t T_, int64_t n_h, int64_t n_kv, int64_t d) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto q = as<T>(in[0]), k = as<T>(in[1]), v = as<T>(in[2]);
    std::vector<T> out(q.size()), probs(n_h * T_ * T_, std::numeric_limits<T>::quiet_NaN());
    attention_fwd(out.data(), q.data(), k.data(), v.data(), T_, n_h, n_kv, d, probs.data());
    OpRun r{f64(out), {}};
    if (grads) {
      auto dout = as<T>(w);
      // Start from NaN: dq, dk, dv must be overwritten, not accumulated.
      std::vector<T> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
      attention_bwd(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                    probs.data(), T_, n_h, n_kv, d);
      r.g = {f64(dq), f64(dk), f64(dv)};
    }
    return r;
  };
}

// Inputs q, pk, pv, k, v; gradients dq, dpk, dpv, dk, dv (dpk/dpv start at kAcc:
// accumulated; dq/dk/dv at NaN: overwritten).
template <typename T>
Op prefix_attention_op(int64_t P, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto q = as<T>(in[0]), pk = as<T>(in[1]), pv = as<T>(in[2]), k = as<T>(in[3]), v = as<T>(in[4]);
    std::vector<T> out(q.size()), probs(n_h * T_ * (P + T_), std::numeric_limits<T>::quiet_NaN());
    prefix_attention_fwd(out.data(), q.data(), pk.data(), pv.data(), P, k.data(), v.data(), T_, n_h,
                         n_kv, d, probs.data());
    OpRun r{f64(out), {}};
    if (grads) {
      auto dout = as<T>(w);
      std::vector<T> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
      std::vector<T> dpk(pk.size(), static_cast<T>(kAcc)), dpv(pv.size(), static_cast<T>(kAcc));
      prefix_attention_bwd(dq.data(), dpk.data(), dpv.data(), dk.data(), dv.data(), dout.data(),
                           q.data(), pk.data(), pv.data(), P, k.data(), v.data(), probs.data(), T_,
                           n_h, n_kv, d);
      for (auto& e : dpk) e -= static_cast<T>(kAcc);
      for (auto& e : dpv) e -= static_cast<T>(kAcc);
      r.g = {f64(dq), f64(dpk), f64(dpv), f64(dk), f64(dv)};
    }
    return r;
  };
}

template <typename T>
Op swiglu_op(int64_t n) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto g = as<T>(in[0]), u = as<T>(in[1]);
    std::vector<T> out(n);
    swiglu_fwd(out.data(), g.data(), u.data(), n);
    OpRun r{f64(out), {}};
    if (grads) {
      auto dout = as<T>(w);
      std::vector<T> dg(n), du(n);
      swiglu_bwd(dg.data(), du.data(), dout.data(), g.data(), u.data(), n);
      r.g = {f64(dg), f64(du)};
    }
    return r;
  };
}

// Inputs: x, then L if has_l, then R if has_r.
template <typename T>
Op kron_op(int64_t rows, int64_t n1, int64_t n2, bool has_l, bool has_r) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto x = as<T>(in[0]);
    std::vector<T> L, R;
    size_t k = 1;
    if (has_l) L = as<T>(in[k++]);
    if (has_r) R = as<T>(in[k++]);
    const T* Lp = has_l ? L.data() : nullptr;
    const T* Rp = has_r ? R.data() : nullptr;
    std::vector<T> y(x.size()), work(2 * x.size(), NAN);
    kron_fwd(y.data(), x.data(), Lp, Rp, rows, n1, n2, work.data());
    OpRun r{f64(y), {}};
    if (grads) {
      auto dy = as<T>(w);
      std::vector<T> dx(x.size(), NAN), dL(n1 * n1, static_cast<T>(kAcc)),
          dR(n2 * n2, static_cast<T>(kAcc));
      kron_bwd(dx.data(), dL.data(), dR.data(), dy.data(), x.data(), Lp, Rp, rows, n1, n2,
               work.data());
      for (auto& v : dL) v -= static_cast<T>(kAcc);
      for (auto& v : dR) v -= static_cast<T>(kAcc);
      r.g = {f64(dx)};
      if (has_l) r.g.push_back(f64(dL));
      if (has_r) r.g.push_back(f64(dR));
    }
    return r;
  };
}

int64_t groups_of(const FakeQuantSpec& s, int64_t cols) {
  return s.group > 0 ? (cols + s.group - 1) / s.group : 1;
}

// Inputs: x, then β_max and β_min for kLearned. With a tape: the gradient run
// records, the forward-only runs replay (the surrogate of the STE).
template <typename T>
Op fake_quant_op(const FakeQuantSpec& s, int64_t rows, int64_t cols, int64_t n_beta,
                 RoundTape<T>* tape) {
  return [=](const std::vector<Vec>& in, const Vec& w, bool grads) {
    auto x = as<T>(in[0]);
    const bool learned = s.clip == ClipMode::kLearned;
    std::vector<T> bmax, bmin;
    if (learned) {
      bmax = as<T>(in[1]);
      bmin = as<T>(in[2]);
    }
    const T* bx = learned ? bmax.data() : nullptr;
    const T* bn = learned ? bmin.data() : nullptr;
    if (tape) {
      if (grads) {
        tape->mode = RoundTape<T>::Mode::kRecord;
        tape->offsets.clear();
      } else {
        tape->mode = RoundTape<T>::Mode::kReplay;
        tape->pos = 0;
      }
    }
    std::vector<T> y(x.size());
    FakeQuantSaved<T> saved;
    fake_quant_fwd(s, y.data(), x.data(), rows, cols, bx, bn, n_beta, &saved, tape);
    if (tape && !grads) {
      EXPECT_EQ(tape->pos, tape->offsets.size());
    }
    OpRun r{f64(y), {}};
    if (grads) {
      auto dy = as<T>(w);
      std::vector<T> dx(x.size(), NAN), dbx(n_beta, static_cast<T>(kAcc)),
          dbn(n_beta, static_cast<T>(kAcc));
      fake_quant_bwd(s, dx.data(), dbx.data(), dbn.data(), dy.data(), x.data(), rows, cols, bx, bn,
                     n_beta, saved);
      r.g = {f64(dx)};
      if (learned) {
        for (auto& v : dbx) v -= static_cast<T>(kAcc);
        for (auto& v : dbn) v -= static_cast<T>(kAcc);
        r.g.push_back(f64(dbx));
        r.g.push_back(f64(dbn));
      }
    }
    return r;
  };
}

// ---------------------------------------------------------------- scalar fake quant

// methods.md §0.1 transcribed per (row, group), one element at a time. `code`
// (optional) gets round(x_c/s) + z before the clamp; `riding` marks elements
// whose x_c/s does not move with any input (the symmetric range-defining
// element with a fixed clip or a clamped LWC range), see FakeQuantFd.
template <typename T>
std::vector<T> fq_scalar(const FakeQuantSpec& s, const std::vector<T>& x, int64_t rows,
                         int64_t cols, const std::vector<T>& bmax, const std::vector<T>& bmin,
                         std::vector<T>* code = nullptr, std::vector<bool>* riding = nullptr) {
  std::vector<T> y(x.size());
  if (code) code->assign(x.size(), 0);
  if (riding) riding->assign(x.size(), false);
  const int64_t gs = s.group > 0 ? s.group : cols, G = groups_of(s, cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(cols, c0 + gs), idx = r * G + g;
      T mx = x[r * cols + c0], mn = mx;
      for (int64_t c = c0; c < c1; ++c) {
        mx = std::max(mx, x[r * cols + c]);
        mn = std::min(mn, x[r * cols + c]);
      }
      if (!s.lwc_range) {
        mx = std::max(mx, T(0));
        mn = std::min(mn, T(0));
      }
      T cmax = static_cast<T>(s.clip_ratio), cmin = cmax;
      if (s.clip == ClipMode::kLearned) {
        const size_t b = bmax.size() == 1 ? 0 : static_cast<size_t>(idx);
        cmax = T(1) / (T(1) + std::exp(-bmax[b]));
        cmin = T(1) / (T(1) + std::exp(-bmin[b]));
      }
      const T xmax = mx * cmax, xmin = mn * cmin;
      T sc, lo, hi;
      if (s.sym) {
        const T maxq = static_cast<T>((1 << (s.bits - 1)) - 1);
        sc = std::max(std::fabs(xmin), xmax) / maxq;
        lo = -maxq - 1;
        hi = maxq;
      } else {
        const T maxq = static_cast<T>((1 << s.bits) - 1);
        sc = (xmax - xmin) / maxq;
        lo = 0;
        hi = maxq;
      }
      if (sc < static_cast<T>(s.min_scale)) sc = static_cast<T>(s.min_scale);
      if (sc == T(0)) sc = T(1);
      const T z = s.sym ? T(0) : std::nearbyint(-xmin / sc);
      const bool fixed_or_lwc = s.clip == ClipMode::kFixed || s.lwc_range;
      for (int64_t c = c0; c < c1; ++c) {
        T xc = x[r * cols + c];
        if (s.lwc_range) xc = std::min(std::max(xc, xmin), xmax);
        const T q = std::nearbyint(xc / sc) + z;
        y[r * cols + c] = sc * (std::min(std::max(q, lo), hi) - z);
        if (code) (*code)[r * cols + c] = q;
        if (riding && s.sym && fixed_or_lwc) {
          const bool from_max = xmax >= std::fabs(xmin);
          const T xv = x[r * cols + c];
          const bool defines = from_max ? (xv == mx || xc == xmax) : (xv == mn || xc == xmin);
          (*riding)[r * cols + c] = defines;
        }
      }
    }
  }
  return y;
}

// Spec grid of the FD tests: sym/asym × bits 4/3 × group −1/4 × clip variants.
struct FqCase {
  FakeQuantSpec spec;
  int64_t n_beta;  // 0: kFixed
  std::string name;
};

std::vector<FqCase> fq_cases(int64_t rows, int64_t cols) {
  std::vector<FqCase> out;
  for (bool sym : {true, false})
    for (int bits : {4, 3})
      for (int64_t group : {int64_t{-1}, int64_t{4}})
        for (int clip : {0, 1, 2})  // fixed 0.9, learned 1 β, learned rows·G β
          for (bool lwc : {false, true}) {
            FakeQuantSpec s;
            s.bits = bits;
            s.sym = sym;
            s.group = group;
            s.lwc_range = lwc;
            s.clip = clip == 0 ? ClipMode::kFixed : ClipMode::kLearned;
            s.clip_ratio = clip == 0 ? 0.9 : 1.0;
            const int64_t nb = clip == 0 ? 0 : clip == 1 ? 1 : rows * groups_of(s, cols);
            const std::string name = std::string(sym ? "sym" : "asym") + " b" +
                                     std::to_string(bits) + " g" + std::to_string(group) +
                                     (clip == 0   ? " fixed0.9"
                                      : clip == 1 ? " lac(1β)"
                                                  : " lwc(rows·Gβ)") +
                                     (lwc ? " range" : "");
            out.push_back({s, nb, name});
          }
  return out;
}

// ---------------------------------------------------------------- tests

TEST(GradFd, RmsNorm) {
  Rng rng(11);
  const int64_t rows = 5, C = 12;
  const std::vector<Vec> in = {randn(rng, rows * C), randn(rng, C, 0.5, 1.0)};
  const Vec w = randn(rng, rows * C);
  check_fd("rmsnorm", rmsnorm_op<double>(rows, C, 1e-5), in, w, 1e-6, 1e-5, {"x", "gamma"});
  check_f32("rmsnorm", rmsnorm_op<float>(rows, C, 1e-5), rmsnorm_op<double>(rows, C, 1e-5), in, w);
}

TEST(GradFd, Rope) {
  Rng rng(12);
  const int64_t T_ = 5, heads = 3, d = 8;
  const std::vector<Vec> in = {randn(rng, T_ * heads * d)};
  const Vec w = randn(rng, in[0].size());
  check_fd("rope", rope_op<double>(T_, heads, d, 7, 1e4), in, w, 1e-6, 1e-5, {"x"});
  check_f32("rope", rope_op<float>(T_, heads, d, 7, 1e4), rope_op<double>(T_, heads, d, 7, 1e4), in,
            w);
}

TEST(GradFd, Attention) {
  Rng rng(13);
  struct Case {
    int64_t T, n_h, n_kv, d;
  };
  for (Case c : {Case{6, 4, 2, 4}, Case{6, 2, 2, 4}, Case{1, 2, 1, 4}}) {
    const std::vector<Vec> in = {randn(rng, c.T * c.n_h * c.d), randn(rng, c.T * c.n_kv * c.d),
                                 randn(rng, c.T * c.n_kv * c.d)};
    const Vec w = randn(rng, in[0].size());
    const std::string name = "attention T" + std::to_string(c.T) + " nh" + std::to_string(c.n_h) +
                             " nkv" + std::to_string(c.n_kv);
    // T = 1: one visible key, so dq = dk = 0 exactly.
    const bool zero_ok = c.T == 1;
    check_fd(name, attention_op<double>(c.T, c.n_h, c.n_kv, c.d), in, w, 1e-6, 1e-5,
             {"q", "k", "v"}, zero_ok);
    check_f32(name, attention_op<float>(c.T, c.n_h, c.n_kv, c.d),
              attention_op<double>(c.T, c.n_h, c.n_kv, c.d), in, w, 2e-5, zero_ok);
  }
}

TEST(GradFd, AttentionSeveralQueryBlocks) {
  // T = 300 spans three 128-row query blocks of the causal blocking.
  Rng rng(14);
  const int64_t T_ = 300, n_h = 2, n_kv = 1, d = 8;
  const std::vector<Vec> in = {randn(rng, T_ * n_h * d), randn(rng, T_ * n_kv * d),
                               randn(rng, T_ * n_kv * d)};
  const Vec w = randn(rng, in[0].size());
  check_fd_dirs("attention T300", attention_op<double>(T_, n_h, n_kv, d), in, w, rng, 3, 1e-6);
  check_f32("attention T300", attention_op<float>(T_, n_h, n_kv, d),
            attention_op<double>(T_, n_h, n_kv, d), in, w, 5e-5);
}

TEST(GradFd, PrefixAttention) {
  Rng rng(31);
  struct Case {
    int64_t P, T, n_h, n_kv, d;
  };
  for (Case c : {Case{1, 5, 4, 2, 4}, Case{3, 4, 2, 2, 4}, Case{2, 1, 2, 1, 4}}) {
    const int64_t Q = c.n_h * c.d, K = c.n_kv * c.d;
    const std::vector<Vec> in = {randn(rng, c.T * Q), randn(rng, c.P * K), randn(rng, c.P * K),
                                 randn(rng, c.T * K), randn(rng, c.T * K)};
    const Vec w = randn(rng, in[0].size());
    const std::string name = "prefix attention P" + std::to_string(c.P) + " T" +
                             std::to_string(c.T) + " nh" + std::to_string(c.n_h) + " nkv" +
                             std::to_string(c.n_kv);
    check_fd(name, prefix_attention_op<double>(c.P, c.T, c.n_h, c.n_kv, c.d), in, w, 1e-6, 1e-5,
             {"q", "pk", "pv", "k", "v"});
    check_f32(name, prefix_attention_op<float>(c.P, c.T, c.n_h, c.n_kv, c.d),
              prefix_attention_op<double>(c.P, c.T, c.n_h, c.n_kv, c.d), in, w, 2e-5);
  }
}

TEST(GradFd, PrefixAttentionSeveralQueryBlocks) {
  Rng rng(32);
  const int64_t P = 3, T_ = 300, n_h = 2, n_kv = 1, d = 8;
  const std::vector<Vec> in = {randn(rng, T_ * n_h * d), randn(rng, P * n_kv * d),
                               randn(rng, P * n_kv * d), randn(rng, T_ * n_kv * d),
                               randn(rng, T_ * n_kv * d)};
  const Vec w = randn(rng, in[0].size());
  check_fd_dirs("prefix attention P3 T300", prefix_attention_op<double>(P, T_, n_h, n_kv, d), in, w,
                rng, 3, 1e-6);
  check_f32("prefix attention P3 T300", prefix_attention_op<float>(P, T_, n_h, n_kv, d),
            prefix_attention_op<double>(P, T_, n_h, n_kv, d), in, w, 5e-5);
}

template <typename T>
void expect_prefix_zero_is_plain(Rng& rng, int64_t T_, int64_t n_h, int64_t n_kv, int64_t d) {
  const auto q = as<T>(randn(rng, T_ * n_h * d)), k = as<T>(randn(rng, T_ * n_kv * d)),
             v = as<T>(randn(rng, T_ * n_kv * d)), dout = as<T>(randn(rng, T_ * n_h * d));
  std::vector<T> o1(q.size()), o2(q.size()), p1(n_h * T_ * T_), p2(p1.size());
  attention_fwd(o1.data(), q.data(), k.data(), v.data(), T_, n_h, n_kv, d, p1.data());
  prefix_attention_fwd<T>(o2.data(), q.data(), nullptr, nullptr, 0, k.data(), v.data(), T_, n_h,
                          n_kv, d, p2.data());
  EXPECT_EQ(o1, o2);
  EXPECT_EQ(p1, p2);
  std::vector<T> dq1(q.size()), dk1(k.size()), dv1(v.size()), dq2(q.size()), dk2(k.size()),
      dv2(v.size());
  attention_bwd(dq1.data(), dk1.data(), dv1.data(), dout.data(), q.data(), k.data(), v.data(),
                p1.data(), T_, n_h, n_kv, d);
  prefix_attention_bwd<T>(dq2.data(), nullptr, nullptr, dk2.data(), dv2.data(), dout.data(),
                          q.data(), nullptr, nullptr, 0, k.data(), v.data(), p2.data(), T_, n_h,
                          n_kv, d);
  EXPECT_EQ(dq1, dq2);
  EXPECT_EQ(dk1, dk2);
  EXPECT_EQ(dv1, dv2);
}

TEST(GradForward, PrefixAttentionZeroPrefixIsAttention) {
  Rng rng(33);
  expect_prefix_zero_is_plain<float>(rng, 140, 4, 2, 8);
  expect_prefix_zero_is_plain<double>(rng, 9, 2, 1, 4);
}

TEST(GradForward, PrefixAttentionMatchesLongerCausalReference) {
  // Query t with a prefix of P is row P + t of causal attention over [pk; k] (the
  // first P query rows are unused), through the fp64 reference of kernels/ops.h.
  Rng rng(34);
  for (int64_t T_ : {7, 260}) {
    const int64_t P = 4, n_h = 4, n_kv = 2, d = 16, Q = n_h * d, K = n_kv * d, S = P + T_;
    const Vec q = randn(rng, T_ * Q, 0.5), pk = randn(rng, P * K, 0.5), pv = randn(rng, P * K),
              k = randn(rng, T_ * K, 0.5), v = randn(rng, T_ * K);
    Vec qf(S * Q, 0.0), kf = pk, vf = pv, ref(S * Q);
    std::copy(q.begin(), q.end(), qf.begin() + P * Q);
    kf.insert(kf.end(), k.begin(), k.end());
    vf.insert(vf.end(), v.begin(), v.end());
    attention_forward_ref(ref.data(), qf.data(), kf.data(), vf.data(), S, n_h, n_kv, d);
    ref.erase(ref.begin(), ref.begin() + P * Q);
    const auto q32 = as<float>(q), pk32 = as<float>(pk), pv32 = as<float>(pv), k32 = as<float>(k),
               v32 = as<float>(v);
    std::vector<float> out(q.size()), probs(n_h * T_ * S);
    prefix_attention_fwd(out.data(), q32.data(), pk32.data(), pv32.data(), P, k32.data(),
                         v32.data(), T_, n_h, n_kv, d, probs.data());
    EXPECT_TRUE(close("prefix_attention_fwd<float> vs ref T" + std::to_string(T_), f64(out), ref,
                      1e-5, &g_worst.ref));
    for (int64_t h = 0; h < n_h; ++h)
      for (int64_t t = 0; t < T_; ++t)
        for (int64_t j = P + t + 1; j < S; ++j) ASSERT_EQ(probs[(h * T_ + t) * S + j], 0.0f);
  }
}

TEST(GradFd, SwiGlu) {
  Rng rng(15);
  const int64_t n = 20;
  const std::vector<Vec> in = {randn(rng, n, 2.0), randn(rng, n)};
  const Vec w = randn(rng, n);
  check_fd("swiglu", swiglu_op<double>(n), in, w, 1e-6, 1e-5, {"g", "u"});
  check_f32("swiglu", swiglu_op<float>(n), swiglu_op<double>(n), in, w);
}

TEST(GradFd, Kron) {
  Rng rng(16);
  const int64_t rows = 5, n1 = 3, n2 = 4;
  for (int mode = 0; mode < 3; ++mode) {  // L and R, L only, R only
    const bool has_l = mode != 2, has_r = mode != 1;
    std::vector<Vec> in = {randn(rng, rows * n1 * n2)};
    std::vector<std::string> names = {"x"};
    if (has_l) in.push_back(randn(rng, n1 * n1)), names.push_back("L");
    if (has_r) in.push_back(randn(rng, n2 * n2)), names.push_back("R");
    const Vec w = randn(rng, rows * n1 * n2);
    const std::string name = std::string("kron") + (has_l ? " L" : "") + (has_r ? " R" : "");
    check_fd(name, kron_op<double>(rows, n1, n2, has_l, has_r), in, w, 1e-6, 1e-5, names);
    check_f32(name, kron_op<float>(rows, n1, n2, has_l, has_r),
              kron_op<double>(rows, n1, n2, has_l, has_r), in, w);
  }
}

TEST(GradFd, KronNullGradients) {
  // dx / dL / dR may each be null; the others are unchanged.
  Rng rng(17);
  const int64_t rows = 5, n1 = 3, n2 = 4, N = rows * n1 * n2;
  const Vec x = randn(rng, N), L = randn(rng, n1 * n1), R = randn(rng, n2 * n2), dy = randn(rng, N);
  std::vector<double> work(2 * N), dx0(N), dL0(n1 * n1, 0.0), dR0(n2 * n2, 0.0);
  kron_bwd(dx0.data(), dL0.data(), dR0.data(), dy.data(), x.data(), L.data(), R.data(), rows, n1,
           n2, work.data());
  std::vector<double> dL(n1 * n1, 0.0), dR(n2 * n2, 0.0), dx(N);
  kron_bwd<double>(nullptr, dL.data(), nullptr, dy.data(), x.data(), L.data(), R.data(), rows, n1,
                   n2, work.data());
  EXPECT_EQ(dL, dL0);
  kron_bwd<double>(nullptr, nullptr, dR.data(), dy.data(), x.data(), L.data(), R.data(), rows, n1,
                   n2, work.data());
  EXPECT_EQ(dR, dR0);
  kron_bwd<double>(dx.data(), nullptr, nullptr, dy.data(), x.data(), L.data(), R.data(), rows, n1,
                   n2, work.data());
  EXPECT_EQ(dx, dx0);
}

TEST(GradFd, CrossEntropy) {
  Rng rng(18);
  const int64_t rows = 6, V = 7;
  const std::vector<int32_t> tg = {3, -1, 0, 6, -1, 2};
  const Vec logits = randn(rng, rows * V, 2.0);
  // Direct: mean over scored rows of log Σ exp(l) − l_target.
  double want = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    if (tg[r] < 0) continue;
    double s = 0.0;
    for (int64_t j = 0; j < V; ++j) s += std::exp(logits[r * V + j]);
    want += std::log(s) - logits[r * V + tg[r]];
  }
  want /= 4.0;
  Vec dl(rows * V, NAN);
  const double got = cross_entropy_fwd_bwd(logits.data(), tg.data(), rows, V, dl.data());
  EXPECT_NEAR(got, want, 1e-12 * std::fabs(want));
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(dl[1 * V + j], 0.0);  // unscored rows
  // Finite differences of the returned loss.
  Vec l = logits, fd(rows * V);
  const double h = 1e-5;
  for (size_t i = 0; i < l.size(); ++i) {
    const double keep = l[i];
    l[i] = keep + h;
    const double lp = cross_entropy_fwd_bwd<double>(l.data(), tg.data(), rows, V, nullptr);
    l[i] = keep - h;
    const double lm = cross_entropy_fwd_bwd<double>(l.data(), tg.data(), rows, V, nullptr);
    l[i] = keep;
    fd[i] = (lp - lm) / (2 * h);
  }
  EXPECT_TRUE(close("cross-entropy dlogits", dl, fd, 1e-6, &g_worst.fd));
  // Float against double.
  const auto lf = as<float>(logits);
  std::vector<float> dlf(rows * V);
  const double gotf = cross_entropy_fwd_bwd(lf.data(), tg.data(), rows, V, dlf.data());
  EXPECT_NEAR(gotf, want, 1e-6 * std::fabs(want));
  EXPECT_TRUE(close("cross-entropy f32 dlogits", f64(dlf), dl, 2e-5, &g_worst.f32));
  // Nothing scored: loss 0, gradient 0, no NaN.
  const std::vector<int32_t> none(rows, -1);
  EXPECT_EQ(cross_entropy_fwd_bwd(logits.data(), none.data(), rows, V, dl.data()), 0.0);
  for (double v : dl) EXPECT_EQ(v, 0.0);
}

// The STE surrogate (RoundTape replay) is piecewise smooth, with kinks where an
// element's integer code round(v) + z sits exactly on a grid bound (torch.clamp
// passes the gradient there; the surrogate has different one-sided slopes).
// Such elements get loss weight 0, except the "riding" ones whose v cannot
// move (sym, range-defining element with a fixed clip or a clamped LWC range),
// which stay on the bound for every perturbation and so are smooth.
TEST(GradFd, FakeQuantLsq) {
  Rng rng(19);
  const int64_t rows = 5, cols = 12;
  int checked = 0, masked = 0, total = 0;
  for (const FqCase& fc : fq_cases(rows, cols)) {
    // Per-row offsets make the ranges asymmetric.
    Vec x(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      const double shift = 0.7 * rng.normal();
      for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = static_cast<float>(shift + rng.normal());
    }
    std::vector<Vec> in = {x};
    std::vector<std::string> names = {"x"};
    if (fc.n_beta > 0) {
      in.push_back(randn(rng, fc.n_beta, 0.5, 1.5));
      in.push_back(randn(rng, fc.n_beta, 0.5, 1.5));
      names.push_back("beta_max");
      names.push_back("beta_min");
    }
    std::vector<double> code;
    std::vector<bool> riding;
    fq_scalar<double>(fc.spec, x, rows, cols, fc.n_beta ? in[1] : Vec{}, fc.n_beta ? in[2] : Vec{},
                      &code, &riding);
    const double qlo = fc.spec.sym ? -std::ldexp(1.0, fc.spec.bits - 1) : 0.0;
    const double qhi =
        fc.spec.sym ? std::ldexp(1.0, fc.spec.bits - 1) - 1 : std::ldexp(1.0, fc.spec.bits) - 1;
    Vec w = randn(rng, x.size());
    for (size_t i = 0; i < w.size(); ++i) {
      if ((code[i] == qlo || code[i] == qhi) && !riding[i]) {
        w[i] = 0.0;
        ++masked;
      }
      ++total;
    }
    RoundTape<double> tape;
    check_fd("fq " + fc.name, fake_quant_op<double>(fc.spec, rows, cols, fc.n_beta, &tape), in, w,
             1e-6, 1e-6, names);
    check_f32("fq " + fc.name, fake_quant_op<float>(fc.spec, rows, cols, fc.n_beta, nullptr),
              fake_quant_op<double>(fc.spec, rows, cols, fc.n_beta, nullptr), in, w);
    ++checked;
  }
  std::printf("  %d fake-quant configurations, %d of %d elements masked as kinks\n", checked,
              masked, total);
  EXPECT_LT(masked, total / 3);
}

TEST(GradFd, FakeQuantMinScaleAndZeroRows) {
  // Weights' min_scale and all-zero rows (s == 0 → 1): finite, FD still holds.
  Rng rng(20);
  const int64_t rows = 4, cols = 8;
  for (bool sym : {true, false}) {
    FakeQuantSpec s;
    s.bits = 4;
    s.sym = sym;
    s.min_scale = 1e-5;
    s.clip = ClipMode::kLearned;
    s.lwc_range = true;
    Vec x = randn(rng, rows * cols);
    for (int64_t c = 0; c < cols; ++c) x[2 * cols + c] = 0.0;    // zero row
    for (int64_t c = 0; c < cols; ++c) x[3 * cols + c] *= 1e-7;  // s below min_scale
    const std::vector<Vec> in = {x, randn(rng, rows, 0.5, 1.5), randn(rng, rows, 0.5, 1.5)};
    Vec w = randn(rng, x.size());
    RoundTape<double> tape;
    const Op op = fake_quant_op<double>(s, rows, cols, rows, &tape);
    const OpRun base = op(in, w, true);
    EXPECT_TRUE(all_finite(base.y));
    for (const Vec& g : base.g) EXPECT_TRUE(all_finite(g));
    for (int64_t c = 0; c < cols; ++c) EXPECT_EQ(base.y[2 * cols + c], 0.0);
    // Only rows 0-1 carry weight: rows 2-3 are piecewise constant in x.
    for (int64_t i = 2 * cols; i < rows * cols; ++i) w[i] = 0.0;
    std::vector<double> code;
    std::vector<bool> riding;
    fq_scalar<double>(s, x, rows, cols, in[1], in[2], &code, &riding);
    for (size_t i = 0; i < w.size(); ++i)
      if ((code[i] == (sym ? -8 : 0) || code[i] == (sym ? 7 : 15)) && !riding[i]) w[i] = 0.0;
    check_fd(std::string("fq min_scale ") + (sym ? "sym" : "asym"), op, in, w, 1e-6, 1e-6,
             {"x", "beta_max", "beta_min"});
  }
}

TEST(GradFd, FakeQuantIdentitySte) {
  Rng rng(21);
  const int64_t rows = 5, cols = 12;
  for (const FqCase& fc : fq_cases(rows, cols)) {
    FakeQuantSpec s = fc.spec;
    s.ste = Ste::kIdentity;
    const Vec x = randn(rng, rows * cols);
    const Vec bx = randn(rng, std::max<int64_t>(fc.n_beta, 1), 0.5, 1.5);
    const Vec bn = randn(rng, std::max<int64_t>(fc.n_beta, 1), 0.5, 1.5);
    const Vec dy = randn(rng, x.size());
    const double* bxp = fc.n_beta ? bx.data() : nullptr;
    const double* bnp = fc.n_beta ? bn.data() : nullptr;
    Vec y(x.size());
    FakeQuantSaved<double> saved;
    RoundTape<double> tape;
    fake_quant_fwd(s, y.data(), x.data(), rows, cols, bxp, bnp, fc.n_beta, &saved, &tape);
    // The forward is the same quantizer as kLsq.
    EXPECT_EQ(y, fq_scalar<double>(fc.spec, x, rows, cols, bx, bn)) << fc.name;
    Vec dx(x.size(), NAN), dbx(bx.size(), 0.5), dbn(bn.size(), 0.5);
    fake_quant_bwd(s, dx.data(), fc.n_beta ? dbx.data() : nullptr, fc.n_beta ? dbn.data() : nullptr,
                   dy.data(), x.data(), rows, cols, bxp, bnp, fc.n_beta, saved);
    EXPECT_EQ(dx, dy) << fc.name;
    for (double v : dbx) EXPECT_EQ(v, 0.5);
    for (double v : dbn) EXPECT_EQ(v, 0.5);
  }
  // The replayed surrogate x + (fq(x) − x) has gradient exactly dy.
  FakeQuantSpec s;
  s.bits = 3;
  s.sym = false;
  s.group = 4;
  s.ste = Ste::kIdentity;
  s.clip_ratio = 0.9;
  const Vec x = randn(rng, rows * cols);
  RoundTape<double> tape;
  check_fd("fq identity-STE surrogate", fake_quant_op<double>(s, rows, cols, 0, &tape), {x},
           randn(rng, x.size()), 1e-9, 1e-6, {"x"});
}

// What finite differences cannot see: the conventions at the kinks, by hand.
TEST(GradFd, FakeQuantKinkConventions) {
  FakeQuantSpec s;
  s.bits = 4;  // sym, grid [−8, 7], clip 1
  FakeQuantSaved<double> saved;
  double y[3], dx[3];
  // s = 7/7 = 1. 6.8 rounds to 7 = qmax: on the bound, the gradient passes
  // (torch.clamp): dx = dy there, ds = round(v) − v = 0.2, into x[0] as ds/7.
  {
    const double x[3] = {7.0, 6.8, -1.2}, dy[3] = {0.0, 1.0, 0.0};
    fake_quant_fwd<double>(s, y, x, 1, 3, nullptr, nullptr, 0, &saved);
    fake_quant_bwd<double>(s, dx, nullptr, nullptr, dy, x, 1, 3, nullptr, nullptr, 0, saved);
    EXPECT_NEAR(dx[0], 0.2 / 7.0, 1e-15);
    EXPECT_EQ(dx[1], 1.0);
    EXPECT_EQ(dx[2], 0.0);
  }
  // xmax = |xmin| = 7: the scale gradient goes to the max (first on ties):
  // 3.2 → 3, ds = −0.2, dx[0] = −0.2/7, nothing to the min element.
  {
    const double x[3] = {7.0, -7.0, 3.2}, dy[3] = {0.0, 0.0, 1.0};
    fake_quant_fwd<double>(s, y, x, 1, 3, nullptr, nullptr, 0, &saved);
    fake_quant_bwd<double>(s, dx, nullptr, nullptr, dy, x, 1, 3, nullptr, nullptr, 0, saved);
    EXPECT_NEAR(dx[0], -0.2 / 7.0, 1e-15);
    EXPECT_EQ(dx[1], 0.0);
    EXPECT_EQ(dx[2], 1.0);
  }
  // Asym 2-bit over [−1, 2]: s = 1, z = 1, codes 0..3. −0.9 → code 0 = qmin (on
  // the bound: passes, ds = −1 − (−0.9) = −0.1); ds/3 goes +x[max], −x[min].
  {
    s.bits = 2;
    s.sym = false;
    const double x[3] = {2.0, -1.0, -0.9}, dy[3] = {0.0, 0.0, 1.0};
    fake_quant_fwd<double>(s, y, x, 1, 3, nullptr, nullptr, 0, &saved);
    EXPECT_EQ(saved.zero[0], 1.0);
    fake_quant_bwd<double>(s, dx, nullptr, nullptr, dy, x, 1, 3, nullptr, nullptr, 0, saved);
    EXPECT_NEAR(dx[0], -0.1 / 3.0, 1e-15);
    EXPECT_NEAR(dx[1], 0.1 / 3.0, 1e-15);
    EXPECT_EQ(dx[2], 1.0);
  }
}

TEST(GradFd, FakeQuantOff) {
  Rng rng(22);
  FakeQuantSpec s;  // bits 16
  const Vec x = randn(rng, 24), dy = randn(rng, 24);
  Vec y(24), dx(24);
  FakeQuantSaved<double> saved;
  RoundTape<double> tape;
  fake_quant_fwd<double>(s, y.data(), x.data(), 2, 12, nullptr, nullptr, 0, &saved, &tape);
  fake_quant_bwd<double>(s, dx.data(), nullptr, nullptr, dy.data(), x.data(), 2, 12, nullptr,
                         nullptr, 0, saved);
  EXPECT_EQ(y, x);
  EXPECT_EQ(dx, dy);
  EXPECT_TRUE(tape.offsets.empty());
}

// ---------------------------------------------------------------- forwards vs references

TEST(GradForward, FakeQuantMatchesScalarExactly) {
  Rng rng(23);
  const int64_t rows = 16, cols = 64;
  int n = 0;
  for (const FqCase& fc0 : fq_cases(rows, cols)) {
    for (double min_scale : {0.0, 1e-5}) {
      FqCase fc = fc0;
      fc.spec.min_scale = min_scale;
      if (fc.spec.group > 0) fc.spec.group = 16;
      const int64_t G = groups_of(fc.spec, cols);
      const int64_t nb = fc.n_beta > 1 ? rows * G : fc.n_beta;
      Vec x = randn(rng, rows * cols, 1.0);
      for (int64_t c = 0; c < cols; ++c) {
        x[0 * cols + c] = 0.0;                                                // zero row
        x[1 * cols + c] = std::fabs(x[1 * cols + c]);                         // all positive
        x[2 * cols + c] = -std::fabs(x[2 * cols + c]);                        // all negative
        x[3 * cols + c] = static_cast<double>(c % 15) - 7.0 + 0.5 * (c % 2);  // ties at .5
      }
      const Vec bx = nb ? randn(rng, nb, 1.0, 1.5) : Vec{},
                bn = nb ? randn(rng, nb, 1.0, 1.5) : Vec{};
      for (int prec = 0; prec < 2; ++prec) {
        auto run = [&](auto tag) {
          using T = decltype(tag);
          const auto xt = as<T>(x), bxt = as<T>(bx), bnt = as<T>(bn);
          std::vector<T> y(xt.size());
          FakeQuantSaved<T> saved;
          fake_quant_fwd(fc.spec, y.data(), xt.data(), rows, cols, nb ? bxt.data() : nullptr,
                         nb ? bnt.data() : nullptr, nb, &saved);
          const auto want = fq_scalar<T>(fc.spec, xt, rows, cols, bxt, bnt);
          EXPECT_EQ(y, want) << fc.name << " min_scale " << min_scale << " prec " << prec;
          EXPECT_TRUE(all_finite(f64(y)));
          // Replaying a recorded tape reproduces the forward bit for bit.
          RoundTape<T> tape;
          std::vector<T> y1(y.size()), y2(y.size());
          fake_quant_fwd(fc.spec, y1.data(), xt.data(), rows, cols, nb ? bxt.data() : nullptr,
                         nb ? bnt.data() : nullptr, nb, &saved, &tape);
          tape.mode = RoundTape<T>::Mode::kReplay;
          fake_quant_fwd(fc.spec, y2.data(), xt.data(), rows, cols, nb ? bxt.data() : nullptr,
                         nb ? bnt.data() : nullptr, nb, &saved, &tape);
          EXPECT_EQ(y1, y);
          EXPECT_EQ(y2, y);
        };
        if (prec == 0)
          run(float{});
        else
          run(double{});
      }
      ++n;
    }
  }
  std::printf("  %d configurations bit-exact (float and double)\n", n);
}

TEST(GradForward, FakeQuantRoundsHalfToEven) {
  // Sym 4-bit, absmax 7 → s = 1: 2.5 → 2, 1.5 → 2, −2.5 → −2, 0.5 → 0, 3.5 → 4.
  FakeQuantSpec s;
  s.bits = 4;
  const double x[6] = {7.0, 2.5, 1.5, -2.5, 0.5, 3.5};
  double y[6];
  fake_quant_fwd<double>(s, y, x, 1, 6, nullptr, nullptr, 0, nullptr);
  const double want[6] = {7.0, 2.0, 2.0, -2.0, 0.0, 4.0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(y[i], want[i]) << i;
  // Asym 2-bit over [−1, 2]: s = 1, z = 1, grid {−1, 0, 1, 2}; −3 clamps to −1.
  s.bits = 2;
  s.sym = false;
  const double xa[4] = {2.0, -1.0, 0.5, -0.5};
  double ya[4];
  fake_quant_fwd<double>(s, ya, xa, 1, 4, nullptr, nullptr, 0, nullptr);
  const double wa[4] = {2.0, -1.0, 0.0, -0.0};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ya[i], wa[i]) << i;
}

TEST(GradForward, KronMatchesDenseProduct) {
  Rng rng(24);
  const int64_t rows = 7, n1 = 4, n2 = 5, n = n1 * n2;
  const Vec x = randn(rng, rows * n), L = randn(rng, n1 * n1), R = randn(rng, n2 * n2);
  for (int mode = 0; mode < 4; ++mode) {
    const bool has_l = mode == 0 || mode == 1, has_r = mode == 0 || mode == 2;
    // K[(i,j),(k,l)] = L[i,k]·R[j,l]; y = x K.
    Vec ref(rows * n, 0.0);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t i = 0; i < n1; ++i)
        for (int64_t j = 0; j < n2; ++j)
          for (int64_t k = 0; k < n1; ++k)
            for (int64_t l = 0; l < n2; ++l) {
              const double lk = has_l ? L[i * n1 + k] : (i == k);
              const double rl = has_r ? R[j * n2 + l] : (j == l);
              ref[t * n + k * n2 + l] += x[t * n + i * n2 + j] * lk * rl;
            }
    Vec y(rows * n), work(2 * rows * n);
    kron_fwd(y.data(), x.data(), has_l ? L.data() : nullptr, has_r ? R.data() : nullptr, rows, n1,
             n2, work.data());
    EXPECT_TRUE(close("kron vs dense mode " + std::to_string(mode), y, ref, 1e-13, &g_worst.ref));
    std::vector<float> yf(rows * n), wf(2 * rows * n);
    const auto xf = as<float>(x), Lf = as<float>(L), Rf = as<float>(R);
    kron_fwd(yf.data(), xf.data(), has_l ? Lf.data() : nullptr, has_r ? Rf.data() : nullptr, rows,
             n1, n2, wf.data());
    EXPECT_TRUE(
        close("kron f32 vs dense mode " + std::to_string(mode), f64(yf), ref, 2e-6, &g_worst.ref));
  }
}

TEST(GradForward, FloatMatchesOpsReferences) {
  Rng rng(25);
  {  // RMSNorm
    const int64_t rows = 9, C = 100;
    const Vec x = randn(rng, rows * C, 3.0), g = randn(rng, C);
    Vec ref(x.size());
    rmsnorm_forward_ref(ref.data(), x.data(), g.data(), rows, C, 1e-5);
    const auto xf = as<float>(x), gf = as<float>(g);
    std::vector<float> y(x.size()), inv(rows);
    rmsnorm_fwd(y.data(), xf.data(), gf.data(), rows, C, 1e-5f, inv.data());
    EXPECT_TRUE(close("rmsnorm_fwd<float> vs ref", f64(y), ref, 1e-6, &g_worst.ref));
  }
  {  // RoPE
    const int64_t T_ = 33, heads = 3, d = 16, pos0 = 5;
    const Vec x = randn(rng, T_ * heads * d);
    Vec ref = x;
    rope_forward_ref(ref.data(), T_, heads, d, pos0, 5e5);
    auto xf = as<float>(x);
    rope_fwd(xf.data(), T_, heads, d, pos0, 5e5);
    EXPECT_TRUE(close("rope_fwd<float> vs ref", f64(xf), ref, 1e-6, &g_worst.ref));
    // rope_bwd undoes rope_fwd (the rotation is orthogonal).
    rope_bwd(xf.data(), T_, heads, d, pos0, 5e5);
    EXPECT_TRUE(close("rope_bwd(rope_fwd(x)) vs x", f64(xf), x, 1e-6, &g_worst.ref));
  }
  struct Case {
    int64_t T, n_h, n_kv, d;
  };
  for (Case c : {Case{17, 4, 2, 16}, Case{300, 4, 1, 32}}) {  // attention
    const Vec q = randn(rng, c.T * c.n_h * c.d, 0.5), k = randn(rng, c.T * c.n_kv * c.d, 0.5),
              v = randn(rng, c.T * c.n_kv * c.d);
    Vec ref(q.size());
    attention_forward_ref(ref.data(), q.data(), k.data(), v.data(), c.T, c.n_h, c.n_kv, c.d);
    const auto qf = as<float>(q), kf = as<float>(k), vf = as<float>(v);
    std::vector<float> out(q.size()), probs(c.n_h * c.T * c.T);
    attention_fwd(out.data(), qf.data(), kf.data(), vf.data(), c.T, c.n_h, c.n_kv, c.d,
                  probs.data());
    EXPECT_TRUE(close("attention_fwd<float> vs ref T" + std::to_string(c.T), f64(out), ref, 1e-5,
                      &g_worst.ref));
    // probs: rows sum to 1, zero above the diagonal.
    double worst = 0.0;
    for (int64_t h = 0; h < c.n_h; ++h)
      for (int64_t i = 0; i < c.T; ++i) {
        double s = 0.0;
        for (int64_t j = 0; j < c.T; ++j) {
          const float p = probs[(h * c.T + i) * c.T + j];
          if (j > i) {
            EXPECT_EQ(p, 0.0f);
          }
          s += p;
        }
        worst = std::max(worst, std::fabs(s - 1.0));
      }
    EXPECT_LT(worst, 1e-5);
  }
  {  // SwiGLU
    const int64_t n = 257;
    const Vec g = randn(rng, n, 3.0), u = randn(rng, n);
    Vec ref(n);
    swiglu_forward_ref(ref.data(), g.data(), u.data(), n);
    const auto gf = as<float>(g), uf = as<float>(u);
    std::vector<float> y(n);
    swiglu_fwd(y.data(), gf.data(), uf.data(), n);
    EXPECT_TRUE(close("swiglu_fwd<float> vs ref", f64(y), ref, 1e-6, &g_worst.ref));
  }
}

TEST(GradForward, LargerShapes) {
  // Big enough for the row loops to split across threads when QCAL_THREADS > 1.
  Rng rng(26);
  {  // LWC weights and LAC activations, bit-exact against the scalar transcription.
    const int64_t rows = 256, cols = 512;
    FakeQuantSpec w;
    w.bits = 4;
    w.clip = ClipMode::kLearned;
    w.lwc_range = true;
    w.min_scale = 1e-5;
    w.group = 128;
    FakeQuantSpec a;
    a.bits = 4;
    a.sym = false;
    a.clip = ClipMode::kLearned;
    for (const FakeQuantSpec& s : {w, a}) {
      const int64_t nb = s.lwc_range ? rows * groups_of(s, cols) : 1;
      const auto x = as<float>(randn(rng, rows * cols)), bx = as<float>(randn(rng, nb, 1.0, 2.0)),
                 bn = as<float>(randn(rng, nb, 1.0, 2.0));
      std::vector<float> y(x.size());
      FakeQuantSaved<float> saved;
      fake_quant_fwd(s, y.data(), x.data(), rows, cols, bx.data(), bn.data(), nb, &saved);
      EXPECT_EQ(y, fq_scalar<float>(s, x, rows, cols, bx, bn)) << (s.lwc_range ? "lwc" : "lac");
    }
  }
  {  // RMSNorm and Kronecker backward, float against double.
    const int64_t rows = 64, C = 1024;
    const std::vector<Vec> in = {randn(rng, rows * C), randn(rng, C, 0.5, 1.0)};
    check_f32("rmsnorm 64x1024", rmsnorm_op<float>(rows, C, 1e-5),
              rmsnorm_op<double>(rows, C, 1e-5), in, randn(rng, rows * C));
    const int64_t kr = 96, n1 = 16, n2 = 32;
    const std::vector<Vec> kin = {randn(rng, kr * n1 * n2), randn(rng, n1 * n1, 0.25),
                                  randn(rng, n2 * n2, 0.2)};
    check_f32("kron 96x(16,32)", kron_op<float>(kr, n1, n2, true, true),
              kron_op<double>(kr, n1, n2, true, true), kin, randn(rng, kr * n1 * n2));
  }
}

TEST(GradForward, CheckerRejectsNanAndOffsets) {
  // The comparison used above can fail.
  EXPECT_FALSE(close("nan", {1.0, NAN}, {1.0, 2.0}, 1e9));
  EXPECT_FALSE(close("nan ref", {1.0, 2.0}, {1.0, NAN}, 1e9));
  EXPECT_FALSE(close("off", {1.0, 2.1}, {1.0, 2.0}, 1e-3));
  EXPECT_FALSE(close("zero ref", {0.0}, {0.0}, 1.0));
}

}  // namespace
}  // namespace qcal

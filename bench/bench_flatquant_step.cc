// One FlatQuant calibration step (methods.md §5.2, §5.3) of a LLaMA-2-7B-shaped
// decoder block, float32 on the CPU: calib::QBlock<float> forward with a tape,
// the MSE loss gradient, and the backward to every transform, diagonal and clip
// parameter (the weights are frozen, as in FlatQuant; dx is not needed for
// layer-wise calibration and is not computed).
//
// Block: H 4096, I 11008, 32 heads (n_kv 32), d 128, no bias. Quantizers: W4
// per-row sym + LWC, A4 per-token sym + LAC (7 linears), K/V 4-bit asym per head +
// LAC. Transforms: Kronecker pairs 64×64 (attention and MLP inputs) and 86×128
// (down_proj input), P_o 32×32, P_v and P_k 128×128, each with its inverse
// transpose, and the diagonals c_a, c_u, c_d. Synthetic random weights.
//
// The timed part is the block's forward + loss + backward. Materializing P and
// P⁻ᵀ from their parameterization (Cayley / SVD, param.h) and the optimizer
// update are NOT timed: the matrices are inputs here, as they are to QBlock
// (their values are near-identity random matrices; P_it is not the exact inverse
// of P, which does not change the work).
//
// GEMM share: this program interposes cblas_sgemm (OpenBLAS is a shared library,
// so the definition below wins at link time and forwards to the real one through
// dlsym(RTLD_NEXT)); every call made during the timed step is timed and its
// 2·M·N·K FLOPs counted. qcal's GEMMs run as panels, one BLAS call each, on the
// pool's threads (kernels/gemm.h): GEMM seconds are the wall time during which
// at least one call is running, and the shape table lists panel shapes with
// their thread-seconds. The share is GEMM seconds / step seconds; the rest is
// the block's own code (quantizers, norms, RoPE, attention softmax, copies).
// The standalone sgemm rate of the step's largest linear shape is printed as the
// reference peak.
//
// Usage: bench_flatquant_step [--B 1] [--T 256] [--threads 2] [--reps 3] [--shapes 12]
//                             [--profile]   (adds a per-primitive breakdown, see below)
#include <cblas.h>
#include <dlfcn.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common/flags.h"
#include "common/model_config.h"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "kernels/grad.h"
#include "worker/calib/qblock.h"

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---- cblas_sgemm timing hook.
struct GemmStats {
  bool on = false;  // set between steps; pool threads see it through the pool's handoff
  double seconds = 0.0, flops = 0.0;
  int64_t calls = 0;
  int in_flight = 0;   // calls running now (pool threads)
  double since = 0.0;  // when in_flight last became 1
  // (trans_a, trans_b, M, N, K) → (calls, seconds)
  std::map<std::tuple<int, int, int64_t, int64_t, int64_t>, std::pair<int64_t, double>> shapes;
  void reset() {
    seconds = flops = 0.0;
    calls = 0;
    shapes.clear();
  }
};
GemmStats g_gemm;
std::mutex g_gemm_mu;  // guards g_gemm's counters (pool threads call concurrently)

using SgemmFn = void (*)(OPENBLAS_CONST enum CBLAS_ORDER, OPENBLAS_CONST enum CBLAS_TRANSPOSE,
                         OPENBLAS_CONST enum CBLAS_TRANSPOSE, OPENBLAS_CONST blasint,
                         OPENBLAS_CONST blasint, OPENBLAS_CONST blasint, OPENBLAS_CONST float,
                         OPENBLAS_CONST float*, OPENBLAS_CONST blasint, OPENBLAS_CONST float*,
                         OPENBLAS_CONST blasint, OPENBLAS_CONST float, float*,
                         OPENBLAS_CONST blasint);

SgemmFn real_sgemm() {
  static SgemmFn fn = [] {
    auto f = reinterpret_cast<SgemmFn>(dlsym(RTLD_NEXT, "cblas_sgemm"));
    if (f == nullptr) {
      std::fprintf(stderr, "bench_flatquant_step: cannot find the real cblas_sgemm\n");
      std::abort();
    }
    return f;
  }();
  return fn;
}

}  // namespace

extern "C" void cblas_sgemm(OPENBLAS_CONST enum CBLAS_ORDER order,
                            OPENBLAS_CONST enum CBLAS_TRANSPOSE ta,
                            OPENBLAS_CONST enum CBLAS_TRANSPOSE tb, OPENBLAS_CONST blasint M,
                            OPENBLAS_CONST blasint N, OPENBLAS_CONST blasint K,
                            OPENBLAS_CONST float alpha, OPENBLAS_CONST float* A,
                            OPENBLAS_CONST blasint lda, OPENBLAS_CONST float* B,
                            OPENBLAS_CONST blasint ldb, OPENBLAS_CONST float beta, float* C,
                            OPENBLAS_CONST blasint ldc) {
  SgemmFn f = real_sgemm();
  if (!g_gemm.on) {
    f(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  double t0;
  {
    std::lock_guard<std::mutex> g(g_gemm_mu);
    t0 = now();
    if (g_gemm.in_flight++ == 0) g_gemm.since = t0;
  }
  f(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  std::lock_guard<std::mutex> g(g_gemm_mu);
  const double t1 = now();
  if (--g_gemm.in_flight == 0) g_gemm.seconds += t1 - g_gemm.since;
  g_gemm.flops += 2.0 * M * N * K;
  ++g_gemm.calls;
  auto& s = g_gemm.shapes[{ta == CblasTrans, tb == CblasTrans, M, N, K}];
  ++s.first;
  s.second += t1 - t0;
}

namespace {

using qcal::calib::BlockClipT;
using qcal::calib::BlockGradsT;
using qcal::calib::BlockQuantSpec;
using qcal::calib::BlockTransformsT;
using qcal::calib::BlockWeightsT;
using qcal::calib::kNumProj;

std::vector<float> randn(qcal::Rng& rng, int64_t n, double scale) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(rng.normal() * scale);
  return v;
}

// n×n: I + noise/√n (well conditioned).
std::vector<float> near_identity(qcal::Rng& rng, int64_t n) {
  std::vector<float> m = randn(rng, n * n, 0.1 / std::sqrt(static_cast<double>(n)));
  for (int64_t i = 0; i < n; ++i) m[static_cast<size_t>(i * n + i)] += 1.0f;
  return m;
}

std::vector<float> positive(qcal::Rng& rng, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(0.5 + rng.uniform());
  return v;
}

double peak_rss_mb() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;
}

// Standalone sgemm rate of Y(T,O) = X(T,I)·W(O,I)ᵀ, best of a few runs.
double linear_gflops(int64_t M, int64_t N, int64_t K) {
  qcal::Rng rng(7);
  std::vector<float> A = randn(rng, M * K, 1.0), B = randn(rng, N * K, 1.0),
                     C(static_cast<size_t>(M * N));
  double best = 1e30;
  for (int r = 0; r < 4; ++r) {
    const double t0 = now();
    qcal::sgemm(false, true, M, N, K, 1.0f, A.data(), K, B.data(), K, 0.0f, C.data(), N);
    if (r > 0) best = std::min(best, now() - t0);
  }
  return 2.0 * M * N * K / best * 1e-9;
}

// --profile: the kernels/grad.h primitives the step is made of, timed alone on
// the step's shapes (weight-side work is independent of the token count), each
// split into GEMM and the rest through the cblas_sgemm hook. A breakdown for the
// block's owner; QBlock's own copies and glue are what the step has beyond it.
void profile_primitives(const BlockWeightsT<float>& w, const BlockTransformsT<float>& t,
                        const BlockQuantSpec& q, const BlockClipT<float>& clip,
                        const qcal::ModelConfig& c, int64_t N) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), KV = c.kv_dim();
  const int64_t out[kNumProj] = {Q, KV, KV, H, I, I, H};
  const int64_t in[kNumProj] = {H, H, H, Q, H, H, I};
  struct Kron {
    const std::vector<float>* L;
    const std::vector<float>* R;
    int64_t n1, n2;
  };
  const Kron kr[kNumProj] = {{&t.a1_it, &t.a2_it, 64, 64}, {&t.a1_it, &t.a2_it, 64, 64},
                             {&t.a1_it, &t.a2_it, 64, 64}, {&t.po_it, &t.pv_it, 32, 128},
                             {&t.u1_it, &t.u2_it, 64, 64}, {&t.u1_it, &t.u2_it, 64, 64},
                             {&t.d1_it, &t.d2_it, 86, 128}};
  struct Acc {
    double total = 0.0, gemm = 0.0;
  };
  std::map<std::string, Acc> acc;
  auto timed = [&](const std::string& name, const std::function<void()>& fn) {
    g_gemm.reset();
    g_gemm.on = true;
    const double t0 = now();
    fn();
    const double dt = now() - t0;
    g_gemm.on = false;
    acc[name].total += dt;
    acc[name].gemm += g_gemm.seconds;
  };
  size_t max_w = 0;
  for (int p = 0; p < kNumProj; ++p) max_w = std::max(max_w, static_cast<size_t>(out[p] * in[p]));
  std::vector<float> wt(max_w), wq(max_w), dwq(max_w), dwt(max_w), work(2 * max_w);
  std::vector<float> dL(128 * 128), dR(128 * 128), db(static_cast<size_t>(I));
  qcal::Rng rng(3);
  for (int p = 0; p < kNumProj; ++p) {
    const int64_t rows = out[p], cols = in[p];
    const Kron& k = kr[p];
    timed("weight kron fwd", [&] {
      qcal::kron_fwd(wt.data(), w.w[p].data(), k.L->data(), k.R->data(), rows, k.n1, k.n2,
                     work.data());
    });
    qcal::FakeQuantSaved<float> saved;
    timed("weight fake-quant fwd (LWC)", [&] {
      qcal::fake_quant_fwd(q.w[p], wq.data(), wt.data(), rows, cols, clip.w_max[p].data(),
                           clip.w_min[p].data(), rows, &saved);
    });
    for (size_t i = 0; i < static_cast<size_t>(rows * cols); ++i) {
      dwq[i] = static_cast<float>(rng.normal());
    }
    timed("weight fake-quant bwd (LWC)", [&] {
      qcal::fake_quant_bwd(q.w[p], dwt.data(), db.data(), db.data(), dwq.data(), wt.data(), rows,
                           cols, clip.w_max[p].data(), clip.w_min[p].data(), rows, saved);
    });
    timed("weight kron bwd (dL, dR)", [&] {
      qcal::kron_bwd<float>(nullptr, dL.data(), dR.data(), dwt.data(), w.w[p].data(), k.L->data(),
                            k.R->data(), rows, k.n1, k.n2, work.data());
    });
    std::vector<float> a(static_cast<size_t>(N * cols)), aq(a.size()), da(a.size());
    for (float& v : a) v = static_cast<float>(rng.normal());
    qcal::FakeQuantSaved<float> sa;
    float dbeta[2] = {0, 0};
    timed("activation fake-quant fwd+bwd (LAC)", [&] {
      qcal::fake_quant_fwd(q.act[p], aq.data(), a.data(), N, cols, clip.act_max[p].data(),
                           clip.act_min[p].data(), 1, &sa);
      qcal::fake_quant_bwd(q.act[p], da.data(), &dbeta[0], &dbeta[1], a.data(), a.data(), N, cols,
                           clip.act_max[p].data(), clip.act_min[p].data(), 1, sa);
    });
  }
  std::printf("\n--profile: grad.h primitives alone on the step's weight shapes (all 7 linears)\n");
  std::printf("| primitive | ms | GEMM ms | other ms |\n|---|---|---|---|\n");
  double tot = 0.0;
  for (const auto& [name, v] : acc) {
    std::printf("| %s | %.1f | %.1f | %.1f |\n", name.c_str(), v.total * 1e3, v.gemm * 1e3,
                (v.total - v.gemm) * 1e3);
    tot += v.total;
  }
  std::printf("| sum | %.1f | | |\n", tot * 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  qcal::Flags flags({"B", "T", "threads", "reps", "shapes"}, {"profile"});
  const char* usage =
      "usage: bench_flatquant_step [--B 1] [--T 256] [--threads 2] [--reps 3] [--shapes 12] "
      "[--profile]\n";
  if (qcal::Status st = flags.parse(argc, argv, 1); !st.is_ok()) {
    std::fprintf(stderr, "%s\n%s", st.to_string().c_str(), usage);
    return 2;
  }
  auto get = [&](const char* name, int64_t def, int64_t min = 1) {
    qcal::Result<int64_t> v = flags.integer(name, def);
    if (!v.is_ok()) {
      std::fprintf(stderr, "%s\n%s", v.status().to_string().c_str(), usage);
      std::exit(2);
    }
    if (*v < min) {
      std::fprintf(stderr, "--%s must be >= %lld\n%s", name, static_cast<long long>(min), usage);
      std::exit(2);
    }
    return *v;
  };
  const int64_t B = get("B", 1);
  const int64_t T = get("T", 256);
  const int64_t threads = get("threads", 2);
  const int reps = static_cast<int>(get("reps", 3));
  const int show_shapes = static_cast<int>(get("shapes", 12, 0));
  setenv("QCAL_THREADS", std::to_string(threads).c_str(), 1);

  qcal::ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 11008;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 32;
  c.head_dim = 128;
  c.vocab_size = 32000;
  const int64_t H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), KV = c.kv_dim();
  const int64_t N = B * T;

  qcal::Rng rng(1);
  BlockWeightsT<float> w;
  w.input_norm = positive(rng, H);
  w.post_norm = positive(rng, H);
  const int64_t out[kNumProj] = {Q, KV, KV, H, I, I, H};
  const int64_t in[kNumProj] = {H, H, H, Q, H, H, I};
  for (int p = 0; p < kNumProj; ++p) {
    w.w[p] = randn(rng, out[p] * in[p], 1.0 / std::sqrt(static_cast<double>(in[p])));
  }
  BlockTransformsT<float> t;
  t.a1 = near_identity(rng, 64), t.a2 = near_identity(rng, 64);
  t.a1_it = near_identity(rng, 64), t.a2_it = near_identity(rng, 64);
  t.u1 = near_identity(rng, 64), t.u2 = near_identity(rng, 64);
  t.u1_it = near_identity(rng, 64), t.u2_it = near_identity(rng, 64);
  t.d1 = near_identity(rng, 86), t.d2 = near_identity(rng, 128);
  t.d1_it = near_identity(rng, 86), t.d2_it = near_identity(rng, 128);
  t.po = near_identity(rng, 32), t.po_it = near_identity(rng, 32);
  t.pv = near_identity(rng, 128), t.pv_it = near_identity(rng, 128);
  t.pk = near_identity(rng, 128), t.pk_it = near_identity(rng, 128);
  t.ca = positive(rng, H), t.cu = positive(rng, H), t.cd = positive(rng, I);

  BlockQuantSpec q;
  for (int p = 0; p < kNumProj; ++p) {
    qcal::FakeQuantSpec a;
    a.bits = 4;
    a.sym = true;
    a.ste = qcal::Ste::kLsq;
    a.clip = qcal::ClipMode::kLearned;
    q.act[p] = a;
    a.lwc_range = true;
    a.min_scale = 1e-5;
    q.w[p] = a;
  }
  q.k.bits = q.v.bits = 4;
  q.k.sym = q.v.sym = false;
  q.k.group = q.v.group = c.head_dim;
  q.k.clip = q.v.clip = qcal::ClipMode::kLearned;
  const BlockClipT<float> clip = qcal::calib::init_clip_params<float>(q, c, 4.0f);

  const std::vector<float> x = randn(rng, N * H, 1.0);
  const std::vector<float> target = randn(rng, N * H, 1.0);
  std::vector<float> y(static_cast<size_t>(N * H)), dy(y.size());

  qcal::calib::QBlock<float> blk(c, &w, &t, &q, &clip);
  auto tape = qcal::calib::make_tape<float>();
  BlockGradsT<float> g;
  qcal::calib::BackwardOptions opt;
  opt.input = false;
  opt.transforms = true;
  opt.clip = true;
  opt.weights = false;

  std::printf(
      "FlatQuant calibration step, LLaMA-2-7B block (H %lld, I %lld, %lld heads, d %lld), "
      "B %lld x T %lld tokens, fp32, %d BLAS thread(s)\n",
      static_cast<long long>(H), static_cast<long long>(I),
      static_cast<long long>(c.num_attention_heads), static_cast<long long>(c.head_dim),
      static_cast<long long>(B), static_cast<long long>(T), qcal::blas_threads());
  double best_f = 1e30, best_b = 1e30, best_tot = 1e30;
  double gemm_f = 0, gemm_b = 0, flop_f = 0, flop_b = 0;
  int64_t calls_f = 0, calls_b = 0;
  GemmStats best_shapes;
  double loss = 0.0;
  for (int r = 0; r <= reps; ++r) {  // r == 0: warm-up (page faults, thread pools)
    g_gemm.reset();
    g_gemm.on = true;
    const double t0 = now();
    blk.forward(x.data(), y.data(), B, T, tape.get());
    // MSE loss (forward side, as in the PyTorch step), then FlatQuant's
    // L / stopgrad(L) gradient dy = 2(y − Y)/n / L (backward side).
    double l = 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
      l += (double(y[i]) - target[i]) * (double(y[i]) - target[i]);
    }
    l /= static_cast<double>(y.size());
    const double t1 = now();
    const double gf = g_gemm.seconds, ff = g_gemm.flops;
    const int64_t cf = g_gemm.calls;
    const float k = static_cast<float>(2.0 / static_cast<double>(y.size()) / l);
    for (size_t i = 0; i < y.size(); ++i) dy[i] = k * (y[i] - target[i]);
    blk.backward(*tape, dy.data(), &g, opt);
    const double t2 = now();
    g_gemm.on = false;
    loss = l;
    std::printf("  rep %d%s: forward %.1f ms, backward %.1f ms, total %.1f ms, GEMM %.1f ms\n", r,
                r == 0 ? " (warm-up)" : "", (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3,
                g_gemm.seconds * 1e3);
    if (r == 0) continue;
    if (t2 - t0 < best_tot) {
      best_tot = t2 - t0;
      gemm_f = gf, flop_f = ff, calls_f = cf;
      gemm_b = g_gemm.seconds - gf, flop_b = g_gemm.flops - ff, calls_b = g_gemm.calls - cf;
      best_shapes = g_gemm;
    }
    best_f = std::min(best_f, t1 - t0);
    best_b = std::min(best_b, t2 - t1);
  }
  if (!std::isfinite(loss)) {
    std::fprintf(stderr, "loss is not finite\n");
    return 1;
  }
  const double peak = linear_gflops(N, I, H);
  std::printf("\nbest of %d (the GEMM columns are from the fastest total step):\n", reps);
  std::printf("| phase | ms | GEMM ms | GEMM share | GEMM calls | GEMM GFLOP | GEMM GFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  auto row = [](const char* name, double s, double gs, int64_t calls, double fl) {
    std::printf("| %s | %.1f | %.1f | %.1f %% | %lld | %.1f | %.1f |\n", name, s * 1e3, gs * 1e3,
                100.0 * gs / s, static_cast<long long>(calls), fl * 1e-9,
                gs > 0 ? fl / gs * 1e-9 : 0.0);
  };
  row("forward", best_f, gemm_f, calls_f, flop_f);
  row("backward", best_b, gemm_b, calls_b, flop_b);
  row("total (best step)", best_tot, gemm_f + gemm_b, calls_f + calls_b, flop_f + flop_b);
  std::printf("standalone sgemm peak, linear %lldx%lldx%lld (T·I·H): %.1f GFLOP/s\n",
              static_cast<long long>(N), static_cast<long long>(I), static_cast<long long>(H),
              peak);
  std::printf("loss %.4g, peak RSS %.0f MB\n", loss, peak_rss_mb());
  // The costliest GEMM shapes of the best step.
  std::vector<std::pair<double, std::string>> top;
  for (const auto& [key, v] : best_shapes.shapes) {
    const auto& [ta, tb, M, Nn, K] = key;
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "%c%c M %6lld N %6lld K %6lld  calls %6lld  %8.2f ms  %6.1f GF/s", ta ? 'T' : 'N',
                  tb ? 'T' : 'N', static_cast<long long>(M), static_cast<long long>(Nn),
                  static_cast<long long>(K), static_cast<long long>(v.first), v.second * 1e3,
                  2.0 * M * Nn * K * v.first / v.second * 1e-9);
    top.emplace_back(v.second, buf);
  }
  std::sort(top.rbegin(), top.rend());
  std::printf("top GEMM shapes (of %zu):\n", top.size());
  for (int i = 0; i < show_shapes && i < static_cast<int>(top.size()); ++i) {
    std::printf("  %s\n", top[static_cast<size_t>(i)].second.c_str());
  }
  if (flags.flag("profile")) profile_primitives(w, t, q, clip, c, N);
  return 0;
}

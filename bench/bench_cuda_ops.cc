// The device ops of kernels/cuda_ops.h at the sizes of one FlatQuant
// calibration step (methods.md §5.2) of a LLaMA decoder block, next to the
// cuBLAS GEMMs of the same step timed in the same run (issue #13).
//
// STATUS: a skeleton. It compiles and links with and without CUDA and has run
// only on machines without a GPU, where it prints the probe's reason and exits
// 77 (skipped). No number in docs/GPU.md comes from it yet.
//
// Per shape (7B: H 4096, I 11008, 32/32 heads; 70B: H 8192, I 28672, 64/8
// heads; d 128; T tokens of one calibration sequence) it times, each as the
// median of --reps runs after one warm-up, with the context synchronized
// around every run (wall clock; kernel launch overhead included):
//   rows ops  rmsnorm fwd+bwd (T, H); rope fwd+bwd on q and k; swiglu fwd+bwd (T, I)
//   fq        fake quant fwd+bwd: per token (T, H) A4 sym + LAC; per channel
//             (I, H) W4 sym + LWC (gate_proj's weight); per head (T, n_kv·d) 4-bit
//             asym + LAC (k)
//   kron      Kronecker transform fwd+bwd of the block input (T, H = n1·n2) and
//             of the down_proj input (T, I)
//   attn      causal attention fwd+bwd (n_h, n_kv, d, T)
//   adamw     one AdamW step over the step's transform parameters (fp64)
//   gemm      the block's seven linears, forward X·Wᵀ and backward dY·W (the
//             weights are frozen in FlatQuant, so no dW), plain cuBLAS sgemm
// and prints a table: op, shape, ms, and the op's share of (ops + gemm).
// The step's real op count differs (each quantizer runs once per linear input,
// the transforms' inverses, the loss); the table measures one of each.
//
// Usage: bench_cuda_ops [--T 2048] [--reps 10] [--shapes 7b,70b] [--tf32]
//                       [--out results.tsv]   (the table as tab-separated values too)
// Exit: 0 ran, 77 no GPU (or built without CUDA), 1 an op failed, 2 bad flags.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/cuda_ops.h"
#include "kernels/device.h"

namespace {

using qcal::Rng;
using qcal::Status;
using namespace qcal::cuda;

struct Shape {
  const char* name;
  int64_t H, I, n_h, n_kv, d;
  int64_t k1, k2;  // block input Kronecker factors, k1·k2 = H
  int64_t m1, m2;  // down_proj input factors, m1·m2 = I
};

constexpr Shape kShapes[] = {
    {"7b", 4096, 11008, 32, 32, 128, 64, 64, 86, 128},
    {"70b", 8192, 28672, 64, 8, 128, 64, 128, 224, 128},
};

struct Row {
  std::string shape, op, dims;
  double ms = 0.0;
  bool gemm = false;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

[[noreturn]] void die(const std::string& what, const Status& s) {
  std::fprintf(stderr, "bench_cuda_ops: %s: %s\n", what.c_str(), s.message().c_str());
  std::exit(1);
}

void must(const std::string& what, const Status& s) {
  if (!s.is_ok()) die(what, s);
}

template <typename T>
DeviceArray<T> random_device(Rng& rng, int64_t n, double scale) {
  std::vector<T> h(static_cast<size_t>(n));
  for (auto& x : h) x = static_cast<T>(scale * rng.normal());
  auto r = DeviceArray<T>::from_host(h);
  if (!r.is_ok()) die("upload of " + std::to_string(n) + " elements", r.status());
  return std::move(r).value();
}

template <typename T>
DeviceArray<T> zeros_device(int64_t n) {
  auto r = DeviceArray<T>::zeros(n);
  if (!r.is_ok()) die("allocation of " + std::to_string(n) + " elements", r.status());
  return std::move(r).value();
}

// Median wall milliseconds of `reps` synchronized runs after one warm-up.
double time_ms(CudaContext& ctx, int reps, const std::string& what,
               const std::function<Status()>& body) {
  must(what, body());
  must(what, ctx.synchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now();
    must(what, body());
    must(what, ctx.synchronize());
    t.push_back((now() - t0) * 1e3);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::string dims(std::initializer_list<int64_t> v) {
  std::string s;
  for (int64_t x : v) s += (s.empty() ? "" : "x") + std::to_string(x);
  return s;
}

void bench_shape(CudaContext& ctx, const Shape& sh, int64_t T, int reps, std::vector<Row>& rows) {
  Rng rng(0x5eed0000u + static_cast<uint64_t>(sh.H));
  const int64_t H = sh.H, I = sh.I, qd = sh.n_h * sh.d, kd = sh.n_kv * sh.d;
  auto add = [&](const std::string& op, const std::string& d, bool gemm,
                 const std::function<Status()>& body) {
    Row r{sh.name, op, d, time_ms(ctx, reps, std::string(sh.name) + " " + op, body), gemm};
    std::printf("  %-4s %-28s %-22s %9.3f ms\n", r.shape.c_str(), r.op.c_str(), r.dims.c_str(),
                r.ms);
    std::fflush(stdout);
    rows.push_back(r);
  };

  // ---- rows ops
  {
    auto x = random_device<float>(rng, T * H, 1.0), gamma = random_device<float>(rng, H, 1.0);
    auto y = zeros_device<float>(T * H), inv = zeros_device<float>(T);
    auto dy = random_device<float>(rng, T * H, 1.0), dx = zeros_device<float>(T * H);
    auto dgamma = zeros_device<float>(H);
    add("rmsnorm fwd+bwd", dims({T, H}), false, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(
          rmsnorm_fwd(ctx, y.data(), x.data(), gamma.data(), T, H, 1e-5f, inv.data()));
      return rmsnorm_bwd(ctx, dx.data(), dgamma.data(), dy.data(), x.data(), gamma.data(),
                         inv.data(), T, H);
    });
  }
  {
    auto q = random_device<float>(rng, T * qd, 1.0), k = random_device<float>(rng, T * kd, 1.0);
    add("rope fwd+bwd (q, k)", dims({T, qd + kd}), false, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(rope_fwd(ctx, q.data(), T, sh.n_h, sh.d, 0, 10000.0));
      QCAL_RETURN_IF_ERROR(rope_fwd(ctx, k.data(), T, sh.n_kv, sh.d, 0, 10000.0));
      QCAL_RETURN_IF_ERROR(rope_bwd(ctx, q.data(), T, sh.n_h, sh.d, 0, 10000.0));
      return rope_bwd(ctx, k.data(), T, sh.n_kv, sh.d, 0, 10000.0);
    });
  }
  {
    auto g = random_device<float>(rng, T * I, 1.0), u = random_device<float>(rng, T * I, 1.0);
    auto out = zeros_device<float>(T * I), dout = random_device<float>(rng, T * I, 1.0);
    auto dg = zeros_device<float>(T * I), du = zeros_device<float>(T * I);
    add("swiglu fwd+bwd", dims({T, I}), false, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(swiglu_fwd(ctx, out.data(), g.data(), u.data(), T * I));
      return swiglu_bwd(ctx, dg.data(), du.data(), dout.data(), g.data(), u.data(), T * I);
    });
  }

  // ---- fake quantizers
  auto fq = [&](const std::string& op, int64_t R, int64_t C, const qcal::FakeQuantSpec& s,
                int64_t n_beta) {
    auto x = random_device<float>(rng, R * C, 1.0), y = zeros_device<float>(R * C);
    auto dy = random_device<float>(rng, R * C, 1.0), dx = zeros_device<float>(R * C);
    auto bmax = random_device<float>(rng, n_beta, 0.1),
         bmin = random_device<float>(rng, n_beta, 0.1);
    auto dbmax = zeros_device<float>(n_beta), dbmin = zeros_device<float>(n_beta);
    DeviceFakeQuantSaved saved;
    add(op, dims({R, C}), false, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(fake_quant_fwd(ctx, s, y.data(), x.data(), R, C, bmax.data(),
                                          bmin.data(), n_beta, &saved));
      return fake_quant_bwd(ctx, s, dx.data(), dbmax.data(), dbmin.data(), dy.data(), x.data(), R,
                            C, bmax.data(), bmin.data(), n_beta, saved);
    });
  };
  {
    qcal::FakeQuantSpec a;  // A4 per token, sym, LAC
    a.bits = 4;
    a.clip = qcal::ClipMode::kLearned;
    fq("fq per-token A4 LAC", T, H, a, 1);
    qcal::FakeQuantSpec w = a;  // W4 per channel, sym, LWC
    w.lwc_range = true;
    fq("fq per-channel W4 LWC", I, H, w, I);
    qcal::FakeQuantSpec kv = a;  // K 4-bit asym per head, LAC
    kv.sym = false;
    kv.group = sh.d;
    fq("fq per-head K4 asym LAC", T, kd, kv, 1);
  }

  // ---- Kronecker transforms (L, R both present)
  auto kron = [&](const std::string& op, int64_t n1, int64_t n2) {
    const int64_t C = n1 * n2;
    auto x = random_device<float>(rng, T * C, 1.0), y = zeros_device<float>(T * C);
    auto L = random_device<float>(rng, n1 * n1, 0.1), R = random_device<float>(rng, n2 * n2, 0.1);
    auto dy = random_device<float>(rng, T * C, 1.0), dx = zeros_device<float>(T * C);
    auto dL = zeros_device<float>(n1 * n1), dR = zeros_device<float>(n2 * n2);
    add(op, dims({T, n1, n2}), false, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(kron_fwd(ctx, y.data(), x.data(), L.data(), R.data(), T, n1, n2));
      return kron_bwd(ctx, dx.data(), dL.data(), dR.data(), dy.data(), x.data(), L.data(), R.data(),
                      T, n1, n2);
    });
  };
  kron("kron fwd+bwd (block input)", sh.k1, sh.k2);
  kron("kron fwd+bwd (down input)", sh.m1, sh.m2);

  // ---- attention
  {
    auto q = random_device<float>(rng, T * qd, 1.0), k = random_device<float>(rng, T * kd, 1.0);
    auto v = random_device<float>(rng, T * kd, 1.0), out = zeros_device<float>(T * qd);
    auto probs = zeros_device<float>(sh.n_h * T * T), dout = random_device<float>(rng, T * qd, 1.0);
    auto dq = zeros_device<float>(T * qd), dk = zeros_device<float>(T * kd);
    auto dv = zeros_device<float>(T * kd);
    add("attention fwd+bwd", dims({T, sh.n_h, sh.n_kv, sh.d}), false, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(attention_fwd(ctx, out.data(), q.data(), nullptr, nullptr, 0, k.data(),
                                         v.data(), T, sh.n_h, sh.n_kv, sh.d, probs.data()));
      return attention_bwd(ctx, dq.data(), nullptr, nullptr, dk.data(), dv.data(), dout.data(),
                           q.data(), nullptr, nullptr, 0, k.data(), v.data(), probs.data(), T,
                           sh.n_h, sh.n_kv, sh.d);
    });
  }

  // ---- AdamW over the transform parameters (two Kronecker pairs, P_o, P_v).
  {
    const int64_t n = sh.k1 * sh.k1 + sh.k2 * sh.k2 + sh.m1 * sh.m1 + sh.m2 * sh.m2 +
                      sh.n_h * sh.n_h + sh.d * sh.d;
    auto p = random_device<double>(rng, n, 1.0), g = random_device<double>(rng, n, 1.0);
    auto m = zeros_device<double>(n), v = zeros_device<double>(n);
    AdamWStep st;
    add("adamw step", dims({n}), false,
        [&]() { return adamw_step(ctx, p.data(), m.data(), v.data(), g.data(), n, st); });
  }

  // ---- the seven linears: forward X·Wᵀ and backward dY·W.
  struct Linear {
    const char* name;
    int64_t in, out;
  };
  const Linear linears[] = {{"q", H, qd},   {"k", H, kd}, {"v", H, kd},  {"o", qd, H},
                            {"gate", H, I}, {"up", H, I}, {"down", I, H}};
  for (const Linear& l : linears) {
    auto x = random_device<float>(rng, T * l.in, 1.0),
         w = random_device<float>(rng, l.out * l.in, 0.02);
    auto y = zeros_device<float>(T * l.out), dx = zeros_device<float>(T * l.in);
    add(std::string("gemm ") + l.name + " fwd+bwd", dims({T, l.in, l.out}), true, [&]() -> Status {
      QCAL_RETURN_IF_ERROR(gemm(ctx, false, true, T, l.out, l.in, 1.0f, x.data(), l.in, w.data(),
                                l.in, 0.0f, y.data(), l.out));
      return gemm(ctx, false, false, T, l.in, l.out, 1.0f, y.data(), l.out, w.data(), l.in, 0.0f,
                  dx.data(), l.in);
    });
  }
}

int usage(const char* msg) {
  std::fprintf(stderr,
               "bench_cuda_ops: %s\nusage: bench_cuda_ops [--T 2048] [--reps 10] "
               "[--shapes 7b,70b] [--tf32] [--out results.tsv]\n",
               msg);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t T = 2048;
  int reps = 10;
  std::string shapes = "7b,70b", out_path;
  bool tf32 = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--T" || a == "--reps" || a == "--shapes" || a == "--out") {
      const char* v = value();
      if (!v) return usage((a + " needs a value").c_str());
      if (a == "--T") {
        T = std::strtoll(v, nullptr, 10);
        if (T < 1 || T > 65536) return usage("--T must be in 1..65536");
      } else if (a == "--reps") {
        reps = std::atoi(v);
        if (reps < 1 || reps > 1000) return usage("--reps must be in 1..1000");
      } else if (a == "--shapes") {
        shapes = v;
      } else {
        out_path = v;
      }
    } else if (a == "--tf32") {
      tf32 = true;
    } else if (a == "--help" || a == "-h") {
      usage("the device ops of one FlatQuant step vs cuBLAS GEMMs");
      return 0;
    } else {
      return usage(("unknown flag " + a).c_str());
    }
  }
  std::vector<const Shape*> chosen;
  for (size_t b = 0; b <= shapes.size();) {
    size_t e = shapes.find(',', b);
    if (e == std::string::npos) e = shapes.size();
    const std::string name = shapes.substr(b, e - b);
    const Shape* found = nullptr;
    for (const Shape& s : kShapes)
      if (name == s.name) found = &s;
    if (!found) return usage(("unknown shape '" + name + "' (7b, 70b)").c_str());
    chosen.push_back(found);
    b = e + 1;
  }

  std::string why;
  if (!qcal::cuda_available(&why)) {
    std::printf("bench_cuda_ops: skipped: %s\n", why.c_str());
    return 77;
  }
  CudaOptions o;
  o.tf32 = tf32;
  auto ctx_r = CudaContext::create(o);
  if (!ctx_r.is_ok()) die("CudaContext", ctx_r.status());
  CudaContext& ctx = *ctx_r.value();
  std::printf("bench_cuda_ops: %s, T %lld, reps %d, GEMMs %s\n", ctx.device_name().c_str(),
              static_cast<long long>(T), reps, tf32 ? "TF32" : "fp32");

  std::vector<Row> rows;
  for (const Shape* s : chosen) bench_shape(ctx, *s, T, reps, rows);

  // The table, per shape: each op's share of (ops + gemm).
  std::FILE* tsv = out_path.empty() ? nullptr : std::fopen(out_path.c_str(), "w");
  if (!out_path.empty() && !tsv) {
    std::fprintf(stderr, "bench_cuda_ops: cannot write %s\n", out_path.c_str());
    return 1;
  }
  if (tsv) std::fprintf(tsv, "shape\top\tdims\tms\tshare\tkind\n");
  std::printf("\n%-5s %-28s %-22s %10s %7s\n", "shape", "op", "dims", "ms", "share");
  for (const Shape* s : chosen) {
    double ops = 0.0, gemms = 0.0;
    for (const Row& r : rows)
      if (r.shape == s->name) (r.gemm ? gemms : ops) += r.ms;
    const double total = ops + gemms;
    for (const Row& r : rows) {
      if (r.shape != s->name) continue;
      const double share = total > 0.0 ? 100.0 * r.ms / total : 0.0;
      std::printf("%-5s %-28s %-22s %10.3f %6.1f%%\n", r.shape.c_str(), r.op.c_str(),
                  r.dims.c_str(), r.ms, share);
      if (tsv) {
        std::fprintf(tsv, "%s\t%s\t%s\t%.4f\t%.2f\t%s\n", r.shape.c_str(), r.op.c_str(),
                     r.dims.c_str(), r.ms, share, r.gemm ? "gemm" : "op");
      }
    }
    std::printf("%-5s %-28s %-22s %10.3f\n%-5s %-28s %-22s %10.3f\n", s->name, "= device ops", "",
                ops, s->name, "= cuBLAS GEMMs", "", gemms);
  }
  if (tsv) std::fclose(tsv);
  return 0;
}

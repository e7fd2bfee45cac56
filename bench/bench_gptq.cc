// GPTQ of one layer: where the time goes. Default: W (4096, 4096), H from 2048
// correlated random tokens (8 sequences of 256), 4-bit, group 128, blocksize 128.
// Usage: bench_gptq [O I T]   (threads: QCAL_THREADS or OPENBLAS_NUM_THREADS)
// Letters: T tokens, O output features, I input features.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/rng.h"
#include "kernels/gemm.h"
#include "worker/engine/gptq.h"
#include "worker/engine/quantizer.h"

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ‖X (W − Ŵ)ᵀ‖² with one sgemm.
double layer_error(const qcal::Tensor& X, const qcal::Tensor& W, const qcal::Tensor& What) {
  const int64_t T = X.dim(0), I = X.dim(1), O = W.dim(0);
  std::vector<float> D(W.data.size());
  for (size_t k = 0; k < D.size(); ++k) D[k] = W.data[k] - What.data[k];
  std::vector<float> Y(static_cast<size_t>(T * O));
  qcal::sgemm(false, true, T, O, I, 1.0f, X.ptr(), I, D.data(), I, 0.0f, Y.data(), O);
  double s = 0.0;
  for (float y : Y) s += static_cast<double>(y) * y;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t O = 4096, I = 4096, T = 2048;
  if (argc == 4) {
    O = std::atoll(argv[1]);
    I = std::atoll(argv[2]);
    T = std::atoll(argv[3]);
  } else if (argc != 1) {
    std::fprintf(stderr, "usage: %s [O I T]\n", argv[0]);
    return 2;
  }
  const int64_t kSeqLen = 256;
  std::printf("bench_gptq: W (%lld, %lld), %lld tokens, %d BLAS threads\n",
              static_cast<long long>(O), static_cast<long long>(I), static_cast<long long>(T),
              qcal::blas_threads());

  // Correlated inputs X = Z · M (M scaled by 1/√I) and a random weight.
  auto t0 = Clock::now();
  qcal::Rng rng(1);
  qcal::Tensor Z({T, I}), M({I, I}), X({T, I}), W({O, I});
  for (auto& v : Z.data) v = static_cast<float>(rng.normal());
  const double m_scale = 1.0 / std::sqrt(static_cast<double>(I));
  for (auto& v : M.data) v = static_cast<float>(m_scale * rng.normal());
  for (auto& v : W.data) v = static_cast<float>(0.02 * rng.normal());
  qcal::sgemm(false, false, T, I, I, 1.0f, Z.ptr(), I, M.ptr(), I, 0.0f, X.ptr(), I);
  Z = qcal::Tensor();
  M = qcal::Tensor();
  std::printf("data generation: %.2f s (not counted)\n", since(t0));

  t0 = Clock::now();
  qcal::HessianAccumulator acc(I);
  for (int64_t t = 0; t < T; t += kSeqLen) {
    acc.add_batch(X.ptr() + t * I, std::min(kSeqLen, T - t), 1);
  }
  const qcal::Tensor H = acc.hessian();
  const double hess_s = since(t0);
  const double hess_gemm_s = acc.gemm_seconds();

  qcal::QuantSpec spec;  // 4-bit, group 128, symmetric
  qcal::GptqOptions opts;
  auto r = qcal::gptq_quantize(W, H, spec, opts);
  if (!r.is_ok()) {
    std::fprintf(stderr, "gptq failed: %s\n", r.status().to_string().c_str());
    return 1;
  }
  const qcal::GptqProfile& p = r->profile;

  t0 = Clock::now();
  auto rtn = qcal::rtn_quantize(W, spec);
  const double rtn_s = since(t0);
  if (!rtn.is_ok()) return 1;

  const double e_gptq = layer_error(X, W, r->qlinear.dequantize());
  const double e_rtn = layer_error(X, W, rtn->dequantize());

  // Flops: Hessian XᵀX as a symmetric rank-k update T·I²; lazy updates
  // Σ_blocks 2·O·B·(columns to the right).
  const double hess_gflop = static_cast<double>(T) * I * I * 1e-9;
  double lazy_gflop = 0.0;
  for (int64_t i2 = opts.blocksize; i2 < I; i2 += opts.blocksize) {
    lazy_gflop += 2.0 * O * opts.blocksize * static_cast<double>(I - i2) * 1e-9;
  }
  const double other_s = p.total_s - p.factor_s - p.loop_s - p.lazy_gemm_s;
  const double all_s = hess_s + p.total_s;
  const double gemm_s = hess_gemm_s + p.lazy_gemm_s;

  std::printf("\n%-34s %9s %9s %10s\n", "phase", "seconds", "share", "GFLOP/s");
  std::printf("%-34s %9.3f %8.1f%% %10.1f\n", "hessian (ssyrk, fp32)", hess_gemm_s,
              100.0 * hess_gemm_s / all_s, hess_gflop / hess_gemm_s);
  std::printf("%-34s %9.3f %8.1f%%\n", "hessian (rest: mirror, scale)", hess_s - hess_gemm_s,
              100.0 * (hess_s - hess_gemm_s) / all_s);
  std::printf("%-34s %9.3f %8.1f%%\n", "gptq: cholesky + inverse (fp64)", p.factor_s,
              100.0 * p.factor_s / all_s);
  std::printf("%-34s %9.3f %8.1f%%\n", "gptq: column loop (rank-1)", p.loop_s,
              100.0 * p.loop_s / all_s);
  std::printf("%-34s %9.3f %8.1f%% %10.1f\n", "gptq: lazy-update sgemm", p.lazy_gemm_s,
              100.0 * p.lazy_gemm_s / all_s, lazy_gflop / p.lazy_gemm_s);
  std::printf("%-34s %9.3f %8.1f%%\n", "gptq: other (copies, perm, groups)", other_s,
              100.0 * other_s / all_s);
  std::printf("%-34s %9.3f %8.1f%%\n", "total (hessian + gptq)", all_s, 100.0);
  std::printf("%-34s %9.3f %8.1f%%\n", "  of which sgemm/ssyrk", gemm_s, 100.0 * gemm_s / all_s);
  std::printf("%-34s %9.3f\n", "gptq alone", p.total_s);
  std::printf("%-34s %9.3f\n", "rtn (for comparison)", rtn_s);
  std::printf("\nlayer error ||X(W-Q)^T||^2: gptq %.4g, rtn %.4g, ratio %.3f\n", e_gptq, e_rtn,
              e_gptq / e_rtn);
  std::printf("gptq loss %.4g, percdamp used %g, factor attempts %d\n", r->loss, r->percdamp_used,
              p.factor_attempts);
  return 0;
}

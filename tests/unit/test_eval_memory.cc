// labels: slow
// Peak resident memory of streaming evaluations (worker/engine/eval.h
// evaluate_stream) of synthetic models (hidden 512, vocab 32000, 2 and 6
// layers, bf16 storage, an FP reference), measured and compared with
// estimate_eval_memory (common/eval_memory.h): within ±25%, and the same for 2
// and 6 layers within ±10%. Two option sets: the defaults (the lm_head chunks
// and logit tiles dominate) and small chunks (one layer dominates).
//
// Each measurement runs in a fresh process, this binary re-executed with
// QCAL_EVAL_MEMORY_CHILD set (test EvalMemoryChild.Measure), so no earlier heap
// hides an allocation. The child fixes malloc's mmap threshold (freed buffers
// leave the resident set, as live ones are counted), warms up the BLAS, the
// thread pool and the code paths (one tiny evaluation), reads VmRSS, resets VmHWM
// (/proc/self/clear_refs "5"), evaluates, and reports VmHWM − VmRSS before.
// Measured here: within 0.5% of the estimate, 6 vs 2 layers within 0.5%
// (docs/PERFORMANCE.md).
#include <gtest/gtest.h>
#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/eval_memory.h"
#include "common/fsutil.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"
#include "tests/unit/test_util.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {

using qcal::testing::proc_status_bytes;

constexpr const char* kChildEnv = "QCAL_EVAL_MEMORY_CHILD";
constexpr int64_t kSeqlen = 128, kSequences = 8;

ModelConfig model_config(int64_t layers) {
  ModelConfig c;
  c.hidden_size = 512;
  c.intermediate_size = 1376;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 8;
  c.head_dim = 64;
  c.vocab_size = 32000;
  c.torch_dtype = DType::kBF16;
  return c;
}

TokenSequences eval_tokens() { return {kSeqlen, synth_tokens(kSequences * kSeqlen, 32000, 17)}; }

// The child: "model_dir head_rows out_file" in the environment.
TEST(EvalMemoryChild, Measure) {
  const char* spec = std::getenv(kChildEnv);
  if (!spec) GTEST_SKIP() << "runs only as a child of EvalMemory.*";
  std::istringstream in(spec);
  std::string dir, out;
  int64_t head_rows = 0;
  in >> dir >> head_rows >> out;
  ASSERT_FALSE(out.empty()) << spec;
  mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  mallopt(M_TRIM_THRESHOLD, 128 * 1024);
  auto q = LlamaModel::open(dir);
  auto fp = LlamaModel::open(dir);
  ASSERT_TRUE(q.is_ok() && fp.is_ok());
  const TokenSequences data = eval_tokens();
  EvalOptions o;
  o.head_rows = head_rows;
  {
    // The BLAS's packing buffers (a per-process constant, not the evaluation's)
    // and the thread pool exist before the baseline: a GEMM as large as the
    // evaluation's largest (1024 rows against 8192 lm_head rows of 512).
    std::vector<float> a(1024 * 512, 1.0f), b(8192 * 512, 1.0f), c(1024 * 8192);
    sgemm(false, true, 1024, 8192, 512, 1.0f, a.data(), 512, b.data(), 512, 0.0f, c.data(), 8192);
    parallel_for(1 << 20, 1, [](int64_t, int64_t) {});
  }
  const LlamaEvalModel qm(**q), fm(**fp);
  {
    // First-touch costs (code pages, malloc arenas of the pool's threads) are
    // not the evaluation's either: one tiny evaluation first.
    const TokenSequences tiny{4, {data.tokens.begin(), data.tokens.begin() + 4}};
    EvalOptions t;
    t.head_rows = 64;
    ASSERT_TRUE(evaluate_stream(qm, &fm, tiny, t).is_ok());
  }
  malloc_trim(0);
  const uint64_t before = proc_status_bytes("VmRSS");
  { std::ofstream("/proc/self/clear_refs") << "5"; }
  auto r = evaluate_stream(qm, &fm, data, o);
  const uint64_t hwm = proc_status_bytes("VmHWM");
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  std::ofstream(out) << (hwm - before) << " " << r->ppl << " " << *r->kl << "\n";
}

struct Measured {
  uint64_t peak_delta = 0;
  double ppl = NAN, kl = NAN;
};

Measured measure(const std::string& dir, int64_t head_rows, const std::string& out) {
  const std::string spec = dir + " " + std::to_string(head_rows) + " " + out;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv(kChildEnv, spec.c_str(), 1);
    const char* argv[] = {"test_eval_memory", "--gtest_filter=EvalMemoryChild.Measure", nullptr};
    ::execv("/proc/self/exe", const_cast<char* const*>(argv));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  Measured m;
  std::ifstream in(out);
  in >> m.peak_delta >> m.ppl >> m.kl;
  return m;
}

TEST(EvalMemory, PeakRssMatchesTheEstimateAndDoesNotGrowWithDepth) {
  qcal::testing::TempDir tmp("qcal_evalmem_");
  for (int64_t layers : {2, 6}) {
    SynthOptions so;
    so.config = model_config(layers);
    so.seed = 3;
    ASSERT_TRUE(synth_model(so, tmp.sub("m" + std::to_string(layers))).is_ok());
  }
  for (int64_t head_rows : {int64_t{8192}, int64_t{512}}) {
    uint64_t peak[2] = {0, 0};
    for (int i = 0; i < 2; ++i) {
      const int64_t layers = i == 0 ? 2 : 6;
      const Measured m = measure(tmp.sub("m" + std::to_string(layers)), head_rows,
                                 tmp.sub("out" + std::to_string(i)));
      EvalShape s;
      s.config = model_config(layers);
      s.sequences = kSequences;
      s.seqlen = kSeqlen;
      s.options.head_rows = head_rows;
      const EvalMemory e = estimate_eval_memory(s);
      const double ratio = static_cast<double>(m.peak_delta) / static_cast<double>(e.peak());
      std::printf(
          "head_rows %5lld, %lld layers: measured peak %.1f MiB, estimate %.1f MiB "
          "(activations %.1f, layer %.1f, vocab %.1f), measured/estimate %.3f; ppl %.2f kl %g\n",
          static_cast<long long>(head_rows), static_cast<long long>(layers),
          m.peak_delta / 1048576.0, e.peak() / 1048576.0, e.activations / 1048576.0,
          e.layer / 1048576.0, e.vocab / 1048576.0, ratio, m.ppl, m.kl);
      EXPECT_TRUE(ratio >= 0.75 && ratio <= 1.25) << "measured/estimate " << ratio;
      EXPECT_TRUE(std::isfinite(m.ppl) && m.ppl > 1.0);
      EXPECT_EQ(m.kl, 0.0);  // the model against itself
      peak[i] = m.peak_delta;
    }
    const double growth = static_cast<double>(peak[1]) / static_cast<double>(peak[0]);
    std::printf("head_rows %lld: peak(6 layers) / peak(2 layers) = %.3f\n",
                static_cast<long long>(head_rows), growth);
    EXPECT_TRUE(growth >= 0.9 && growth <= 1.1) << growth;
  }
}

}  // namespace
}  // namespace qcal

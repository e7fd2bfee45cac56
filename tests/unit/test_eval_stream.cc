// The streaming evaluator (worker/engine/eval.h evaluate_stream) against the
// materializing reference (evaluate_logits over whole logits: model_logits for HF
// checkpoints, evaluate_native / native_logits for native ones) on the trained
// fixture tests/fixtures/grammar-tiny: an HF GPTQ output and native checkpoints
// (QuaRot W4A4KV4, with and without IntactKV) written here; chunks that do not
// divide the vocabulary, a chunk larger than it and tiles that split sequences;
// NaN propagation; the readers' checks; the memory estimate's shape.
// Tolerance (ppl, fp_ppl, kl, nll): |got − ref| ≤ 1e-6·|ref| (+1e-9 on kl), and
// top-1 agreement within one position of the reference's.
// Letters: S sequences, T seqlen, V vocab, H hidden.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "common/data.h"
#include "common/eval_memory.h"
#include "common/fsutil.h"
#include "common/safetensors.h"
#include "kernels/ops.h"
#include "tests/unit/test_util.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/native.h"
#include "worker/calib/native_eval.h"
#include "common/recipe.h"
#include "worker/local_runner.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using calib::NativeModel;

constexpr int64_t kT = 128;  // the fixture's sequence length

std::string fixture(const std::string& rel) {
  return std::string(QCAL_SOURCE_DIR) + "/tests/fixtures/" + rel;
}

struct Fixture {
  qcal::testing::TempDir dir{"qcal_evalstream_"};
  std::string fp_dir = fixture("grammar-tiny");
  std::string gptq_dir, native_dir, intact_dir;
  std::unique_ptr<LlamaModel> fp, gptq;
  TokenSequences calib, eval;  // every sequence begins with BOS (id 1)
  NativeModel native, intact;  // the in-memory models written to native_dir / intact_dir
};

NativeModel calibrate_or_die(const calib::FpModel& fp, const TokenSequences& data,
                             const Recipe& r) {
  auto nm = qcal::calibrate(fp, data, r, nullptr);
  if (!nm.is_ok()) {
    std::fprintf(stderr, "calibrate: %s\n", nm.status().to_string().c_str());
    std::abort();
  }
  return std::move(nm).value();
}

Fixture& fx() {
  static Fixture* f = [] {
    auto* f = new Fixture;
    auto die = [](const Status& s, const char* what) {
      if (s.is_ok()) return;
      std::fprintf(stderr, "%s: %s\n", what, s.to_string().c_str());
      std::abort();
    };
    auto fp = LlamaModel::open(f->fp_dir);
    die(fp.status(), "open fixture");
    f->fp = std::move(fp).value();
    const int64_t V = f->fp->config().vocab_size;
    auto c = load_token_sequences(fixture("grammar-data/calib.u32"), kT, V, 8);
    die(c.status(), "calib data");
    f->calib = std::move(c).value();
    auto e = load_token_sequences(fixture("grammar-data/eval.u32"), kT, V, 7);
    die(e.status(), "eval data");
    f->eval = std::move(e).value();

    // An HF GPTQ output (4-bit, groups of 32).
    f->gptq_dir = f->dir.sub("gptq");
    const Recipe gq = Recipe().with("weight_solver", "gptq").with("w_bits", 4).with("w_group", 32);
    die(calibrate_to_dir(f->fp_dir, f->calib, gq, f->gptq_dir, "gptq", false).status(),
        "calibrate_to_dir");
    auto g = LlamaModel::open(f->gptq_dir);
    die(g.status(), "open gptq");
    f->gptq = std::move(g).value();

    // Native checkpoints: QuaRot W4A4KV4 (RTN weights), without and with IntactKV.
    auto fpm = calib::load_fp_model(f->fp_dir);
    die(fpm.status(), "load_fp_model");
    Recipe r = Recipe()
                   .with("transform", "quarot")
                   .with("w_bits", 4)
                   .with("a_bits", 4)
                   .with("kv_bits", 4)
                   .with("a_clip", 0.9)
                   .with("kv_clip", 0.95);
    f->native = calibrate_or_die(*fpm, f->calib, r);
    r.with("intactkv", true);
    f->intact = calibrate_or_die(*fpm, f->calib, r);
    f->native_dir = f->dir.sub("native");
    f->intact_dir = f->dir.sub("intact");
    die(calib::write_native(f->native, f->native_dir, false), "write_native");
    die(calib::write_native(f->intact, f->intact_dir, false), "write_native intactkv");
    return f;
  }();
  return *f;
}

// |got − ref| ≤ atol + rtol·|ref|; prints the share of the budget used. NaN fails.
void expect_close(const char* what, double got, double ref, double rtol, double atol = 0) {
  const double budget = atol + rtol * std::fabs(ref), diff = std::fabs(got - ref);
  std::printf("  %-34s got %.12g ref %.12g |diff| %.3g (%.1f%% of budget)\n", what, got, ref, diff,
              budget > 0 ? 100.0 * diff / budget : 0.0);
  EXPECT_TRUE(diff <= budget) << what << ": got " << got << ", ref " << ref;
}

// Tolerances: rtol on ppl, nll, fp_ppl and kl, plus kl_atol on kl.
struct Tol {
  double rtol, kl_atol;
};
// Against evaluate_logits. Its fp32 log-softmax rounds every log-probability
// (~1e-7 relative), and GEMM tiles of other shapes than the reference's round the
// fp32 logits differently: each moves a mean KL by ~1e-9 (measured up to 6e-9
// with one-row tiles) and ppl by up to ~3e-7 relative.
constexpr Tol kVsReference{1e-6, 1e-8};
// Against the fp64 scoring of bit-identical logits (one batch of every sequence
// and whole-vocabulary tiles: the reference's GEMM exactly): only the order of
// the double sums differs.
constexpr Tol kSameLogits{1e-10, 1e-14};

void expect_equivalent(const EvalResult& got, const EvalResult& ref, Tol tol = kVsReference) {
  EXPECT_EQ(got.sequences, ref.sequences);
  EXPECT_EQ(got.tokens, ref.tokens);
  expect_close("ppl", got.ppl, ref.ppl, tol.rtol);
  expect_close("nll", got.nll, ref.nll, tol.rtol);
  ASSERT_EQ(got.kl.has_value(), ref.kl.has_value());
  if (!ref.kl) return;
  expect_close("kl", *got.kl, *ref.kl, tol.rtol, tol.kl_atol);
  expect_close("fp_ppl", *got.fp_ppl, *ref.fp_ppl, tol.rtol);
  expect_close("top1_agree", *got.top1_agree, *ref.top1_agree, 0,
               1.0 / static_cast<double>(ref.tokens));
}

// The scoring of evaluate_logits in float64 throughout (log-softmax included)
// over whole logits lq / lf (S·T, V) of `data`: what the streaming scorer, which
// works in double from the fp32 logits, should reproduce more closely than the
// fp32 log-softmax of evaluate_logits does.
EvalResult score_f64(const std::vector<float>& lq, const std::vector<float>* lf,
                     const TokenSequences& data, int64_t V) {
  const int64_t S = data.count(), T = data.seqlen;
  std::vector<double> pq(lq.begin(), lq.end()), pf;
  log_softmax_rows_ref(pq.data(), S * T, V);
  if (lf) {
    pf.assign(lf->begin(), lf->end());
    log_softmax_rows_ref(pf.data(), S * T, V);
  }
  double nll = 0, fp_nll = 0, kl = 0;
  int64_t agree = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t row = (s * T + t) * V;
      const int32_t next = data.seq(s)[t + 1];
      nll -= pq[row + next];
      if (!lf) continue;
      fp_nll -= pf[row + next];
      int64_t aq = 0, af = 0;
      for (int64_t v = 0; v < V; ++v) {
        kl += std::exp(pf[row + v]) * (pf[row + v] - pq[row + v]);
        if (pq[row + v] > pq[row + aq]) aq = v;
        if (pf[row + v] > pf[row + af]) af = v;
      }
      agree += aq == af;
    }
  EvalResult r;
  r.sequences = S;
  r.tokens = S * (T - 1);
  const double n = static_cast<double>(r.tokens);
  r.nll = nll / n;
  r.ppl = std::exp(r.nll);
  if (lf) {
    r.kl = kl / n;
    r.fp_ppl = std::exp(fp_nll / n);
    r.top1_agree = static_cast<double>(agree) / n;
  }
  return r;
}

// The reference: whole logits of both HF models, scored by evaluate_logits.
EvalResult reference_hf(const LlamaModel& q, const LlamaModel* fp, const TokenSequences& data,
                        int64_t batch) {
  BatchLogits qf = [&](int64_t s0, int64_t nb) { return model_logits(q, data, s0, nb); };
  BatchLogits ff = [&](int64_t s0, int64_t nb) { return model_logits(*fp, data, s0, nb); };
  auto r = evaluate_logits(qf, fp ? &ff : nullptr, data, q.config().vocab_size, batch);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? *r : EvalResult{};
}

EvalResult stream_ok(const EvalModel& q, const EvalModel* fp, const TokenSequences& data,
                     EvalOptions o) {
  auto r = evaluate_stream(q, fp, data, o);
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return r.is_ok() ? *r : EvalResult{};
}

EvalOptions opts(int64_t batch, int64_t head_rows, int64_t tile_floats = int64_t{1} << 22) {
  EvalOptions o;
  o.batch = batch;
  o.head_rows = head_rows;
  o.tile_floats = tile_floats;
  return o;
}

// ---- HF checkpoints.

TEST(EvalStream, GptqOutputMatchesMaterializedLogits) {
  Fixture& f = fx();
  const LlamaEvalModel q(*f.gptq), fp(*f.fp);
  ASSERT_EQ(f.fp->config().vocab_size, 256);
  const EvalResult ref = reference_hf(*f.gptq, f.fp.get(), f.eval, 3);
  ASSERT_TRUE(ref.kl && *ref.kl > 1e-4) << "the GPTQ model should differ from FP";
  auto lq = model_logits(*f.gptq, f.eval, 0, f.eval.count());
  auto lf = model_logits(*f.fp, f.eval, 0, f.eval.count());
  ASSERT_TRUE(lq.is_ok() && lf.is_ok());
  const EvalResult exact = score_f64(lq->data, &lf->data, f.eval, 256);
  // Chunks: 100 (does not divide 256), 256 (= V), 1000 (> V); tiles of 3 rows
  // (spanning sequence ends) and whole chunks.
  for (const EvalOptions& o : {opts(3, 100), opts(3, 256), opts(2, 1000), opts(7, 100, 300)}) {
    SCOPED_TRACE("batch " + std::to_string(o.batch) + " head_rows " + std::to_string(o.head_rows) +
                 " tile_floats " + std::to_string(o.tile_floats));
    std::printf("gptq: batch %lld head_rows %lld tile_floats %lld\n",
                static_cast<long long>(o.batch), static_cast<long long>(o.head_rows),
                static_cast<long long>(o.tile_floats));
    expect_equivalent(stream_ok(q, &fp, f.eval, o), ref);
  }
  std::printf("gptq, one batch, whole vocabulary, against the fp64 scoring:\n");
  expect_equivalent(stream_ok(q, &fp, f.eval, opts(f.eval.count(), 256)), exact, kSameLogits);
  // Without an FP model: perplexity only.
  const EvalResult ref_alone = reference_hf(*f.gptq, nullptr, f.eval, 4);
  const EvalResult alone = stream_ok(q, nullptr, f.eval, opts(4, 100));
  EXPECT_FALSE(alone.kl || alone.top1_agree || alone.fp_ppl);
  expect_equivalent(alone, ref_alone);
}

TEST(EvalStream, SameBitsOnEveryRunAndModelAgainstItselfIsExact) {
  Fixture& f = fx();
  const LlamaEvalModel q(*f.gptq), fp(*f.fp);
  const EvalResult a = stream_ok(q, &fp, f.eval, opts(3, 100, 1000));
  const EvalResult b = stream_ok(q, &fp, f.eval, opts(3, 100, 1000));
  EXPECT_EQ(a.ppl, b.ppl);
  EXPECT_EQ(*a.kl, *b.kl);
  EXPECT_EQ(*a.fp_ppl, *b.fp_ppl);
  EXPECT_EQ(*a.top1_agree, *b.top1_agree);
  // (Other tile shapes change the GEMM's rounding of the logits: not the same bits.)
  const EvalResult self = stream_ok(fp, &fp, f.eval, opts(3, 100, 1000));
  EXPECT_EQ(*self.kl, 0.0);
  EXPECT_EQ(*self.top1_agree, 1.0);
  EXPECT_EQ(*self.fp_ppl, self.ppl);
  EXPECT_EQ(self.ppl, *a.fp_ppl);
  // The fixture's documented quality (tests/fixtures/README.md: ppl 5.08 on all 64).
  EXPECT_GT(self.ppl, 3.0);
  EXPECT_LT(self.ppl, 10.0);
}

// ---- Native checkpoints.

TEST(EvalStream, NativeCheckpointMatchesInMemoryEvaluation) {
  Fixture& f = fx();
  auto q = calib::open_eval_model(f.native_dir);
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  EXPECT_TRUE((*q)->prefix().empty());
  const LlamaEvalModel fp(*f.fp);
  auto ref = calib::evaluate_native(f.native, f.eval, f.fp.get(), 3);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  auto lf = model_logits(*f.fp, f.eval, 0, f.eval.count());
  ASSERT_TRUE(lf.is_ok());
  const EvalResult exact =
      score_f64(calib::native_logits(f.native, f.eval.tokens.data(), f.eval.count(), kT), &lf->data,
                f.eval, 256);
  for (const EvalOptions& o : {opts(3, 100), opts(3, 1000, 500)}) {
    SCOPED_TRACE("head_rows " + std::to_string(o.head_rows));
    std::printf("native quarot w4a4kv4: head_rows %lld tile_floats %lld\n",
                static_cast<long long>(o.head_rows), static_cast<long long>(o.tile_floats));
    expect_equivalent(stream_ok(**q, &fp, f.eval, o), *ref);
  }
  std::printf("native, one batch, whole vocabulary, against the fp64 scoring:\n");
  expect_equivalent(stream_ok(**q, &fp, f.eval, opts(f.eval.count(), 256)), exact, kSameLogits);
}

TEST(EvalStream, NativeIntactKvMatchesInMemoryEvaluation) {
  Fixture& f = fx();
  ASSERT_EQ(f.intact.intact_prefix, std::vector<int32_t>{1});
  auto q = calib::open_eval_model(f.intact_dir);
  ASSERT_TRUE(q.is_ok()) << q.status().to_string();
  EXPECT_EQ((*q)->prefix(), f.intact.intact_prefix);
  const LlamaEvalModel fp(*f.fp);
  auto ref = calib::evaluate_native(f.intact, f.eval, f.fp.get(), 3);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  // Tiles of 5 and 77 rows start inside the prefix, right after it and at
  // sequence ends, so the model rows of a tile are gathered across sequences.
  for (const EvalOptions& o : {opts(3, 100), opts(2, 64, 5 * 64), opts(4, 256, 77 * 256)}) {
    SCOPED_TRACE("batch " + std::to_string(o.batch) + " tile_floats " +
                 std::to_string(o.tile_floats));
    std::printf("native quarot w4a4kv4 + IntactKV: batch %lld head_rows %lld tile_floats %lld\n",
                static_cast<long long>(o.batch), static_cast<long long>(o.head_rows),
                static_cast<long long>(o.tile_floats));
    expect_equivalent(stream_ok(**q, &fp, f.eval, o), *ref);
  }
  // The prefix check: a sequence that does not begin with BOS is refused.
  TokenSequences bad = f.eval;
  bad.tokens[static_cast<size_t>(2 * kT)] = 7;
  auto r = evaluate_stream(**q, &fp, bad, opts(3, 100));
  ASSERT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_NE(r.status().message().find("sequence 2 begins with 7"), std::string::npos)
      << r.status().to_string();
  // An FP reference that carries a prefix of its own is refused.
  EXPECT_EQ(evaluate_stream(fp, q->get(), f.eval, opts(3, 100)).status().code(),
            Code::kInvalidInput);
}

TEST(EvalStream, NativeCheckpointReadsTheSameLayersAsReadNative) {
  Fixture& f = fx();
  auto ck = calib::NativeCheckpoint::open(f.intact_dir);
  ASSERT_TRUE(ck.is_ok()) << ck.status().to_string();
  const calib::NativeCheckpoint& c = **ck;
  EXPECT_TRUE(c.meta().embed.empty() && c.meta().lm_head.empty());
  const int64_t L = c.config().num_hidden_layers, H = c.config().hidden_size;
  for (int64_t l = 0; l < L; ++l) {
    auto y = c.read_layer(l);
    ASSERT_TRUE(y.is_ok()) << y.status().to_string();
    const calib::NativeLayer& want = f.intact.layers[static_cast<size_t>(l)];
    for (int p = 0; p < calib::kNumProj; ++p) {
      EXPECT_EQ(y->qw[p].data, want.qw[p].data) << "layer " << l << " proj " << p;
      EXPECT_EQ(y->qw[p].scales, want.qw[p].scales);
      EXPECT_EQ(y->act[p].bits, want.act[p].bits);
    }
    EXPECT_EQ(y->online.d1, want.online.d1);
    EXPECT_EQ(y->online.pk, want.online.pk);
    std::vector<float> k, v;
    ASSERT_TRUE(c.read_intact_kv(l, &k, &v).is_ok());
    EXPECT_EQ(k, f.intact.intact_k[static_cast<size_t>(l)]);
    EXPECT_EQ(v, f.intact.intact_v[static_cast<size_t>(l)]);
  }
  std::vector<float> rows(static_cast<size_t>(3 * H));
  ASSERT_TRUE(c.read_lm_head_rows(250, 3, rows.data()).is_ok());
  EXPECT_EQ(0, std::memcmp(rows.data(), f.intact.lm_head.data() + 250 * H, rows.size() * 4));
  EXPECT_EQ(c.read_lm_head_rows(254, 3, rows.data()).code(), Code::kInvalidInput);
  EXPECT_EQ(c.read_layer(L).status().code(), Code::kInvalidInput);
  const int32_t bad_id = 256;
  EXPECT_EQ(c.read_embed_rows(&bad_id, 1, rows.data()).code(), Code::kInvalidInput);
}

// ---- Bad input and NaN.

TEST(EvalStream, RejectsBadOptions) {
  Fixture& f = fx();
  const LlamaEvalModel fp(*f.fp);
  EXPECT_EQ(evaluate_stream(fp, nullptr, f.eval, opts(0, 100)).status().code(),
            Code::kInvalidInput);
  EXPECT_EQ(evaluate_stream(fp, nullptr, f.eval, opts(2, 0)).status().code(), Code::kInvalidInput);
  EXPECT_EQ(evaluate_stream(fp, nullptr, f.eval, opts(2, 100, 0)).status().code(),
            Code::kInvalidInput);
  TokenSequences out_of_vocab = f.eval;
  out_of_vocab.tokens[static_cast<size_t>(kT + 5)] = 256;
  auto r = evaluate_stream(fp, nullptr, out_of_vocab, opts(2, 100));
  ASSERT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_NE(r.status().message().find("sequence 1 position 5"), std::string::npos)
      << r.status().to_string();
}

// Overwrites element `index` of tensor `name` of the F32 safetensors file in `dir`.
void poke_f32(const std::string& dir, const std::string& name, int64_t index, float value) {
  const std::string path = dir + "/model.safetensors";
  uint64_t offset = 0;
  {
    auto f = SafetensorsFile::open(path);
    ASSERT_TRUE(f.is_ok()) << f.status().to_string();
    const TensorInfo* t = (*f)->find(name);
    ASSERT_TRUE(t) << name;
    ASSERT_EQ(t->dtype, DType::kF32);
    offset = (*f)->header().data_start + t->begin + static_cast<uint64_t>(index) * 4;
  }
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  io.seekp(static_cast<std::streamoff>(offset));
  io.write(reinterpret_cast<const char*>(&value), 4);
  ASSERT_TRUE(io.good());
}

TEST(EvalStream, NanWeightNeverGivesAFinitePerplexity) {
  qcal::testing::TempDir tmp("qcal_evalstream_nan_");
  SynthOptions so;
  so.config = qcal::testing::small_config(128, 301, 2);  // V = 301: prime, chunks of 64
  so.seed = 5;
  const std::string clean = tmp.sub("clean");
  ASSERT_TRUE(synth_model(so, clean).is_ok());
  TokenSequences data{16, synth_tokens(4 * 16, 301, 9)};
  const int64_t H = 64;
  struct Case {
    const char* tensor;
    int64_t index;
  };
  // A layer weight, an lm_head row that is never a target's (row 300), the final
  // norm, and the embedding row of the first token.
  const Case cases[] = {{"model.layers.1.mlp.down_proj.weight", 77},
                        {"lm_head.weight", 300 * H + 3},
                        {"model.norm.weight", 5},
                        {"model.embed_tokens.weight", data.tokens[0] * H + 1}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.tensor);
    const std::string dir = tmp.sub(std::string("nan_") + std::to_string(&c - cases));
    fs::copy(clean, dir, fs::copy_options::recursive);
    poke_f32(dir, c.tensor, c.index, std::nanf(""));
    auto bad = LlamaModel::open(dir);
    auto good = LlamaModel::open(clean);
    ASSERT_TRUE(bad.is_ok() && good.is_ok());
    const LlamaEvalModel q(**bad), fp(**good);
    // A NaN is either refused as its tensor is read (naming it: the layer and row
    // readers check what they convert) or propagates: never a finite result.
    auto expect_never_finite = [&](const EvalModel& m, const EvalModel& ref, bool m_is_bad) {
      auto r = evaluate_stream(m, &ref, data, opts(3, 64));
      if (!r.is_ok()) {
        EXPECT_EQ(r.status().code(), Code::kInvalidInput) << r.status().to_string();
        EXPECT_NE(r.status().message().find(c.tensor), std::string::npos) << r.status().to_string();
        return;
      }
      std::printf("  NaN in %s: ppl %g kl %g fp_ppl %g\n", c.tensor, r->ppl, *r->kl, *r->fp_ppl);
      EXPECT_FALSE(std::isfinite(*r->kl));
      EXPECT_FALSE(std::isfinite(m_is_bad ? r->ppl : *r->fp_ppl));
      EXPECT_TRUE(std::isfinite(m_is_bad ? *r->fp_ppl : r->ppl));
    };
    expect_never_finite(q, fp, true);
    // As the FP reference: the KL and the FP perplexity are not finite either.
    expect_never_finite(fp, q, false);
  }
}

TEST(EvalStream, NativeNanWeightIsRefusedWhenRead) {
  Fixture& f = fx();
  qcal::testing::TempDir tmp("qcal_evalstream_nnan_");
  const LlamaEvalModel fp(*f.fp);
  int i = 0;
  for (const char* tensor : {"lm_head.weight", "model.layers.2.mlp.up_proj.scales"}) {
    SCOPED_TRACE(tensor);
    const std::string dir = tmp.sub("n" + std::to_string(i++));
    fs::copy(f.native_dir, dir, fs::copy_options::recursive);
    poke_f32(dir, tensor, 200, std::nanf(""));
    auto q = calib::open_eval_model(dir);  // headers only: opens fine
    ASSERT_TRUE(q.is_ok()) << q.status().to_string();
    auto r = evaluate_stream(**q, &fp, f.eval, opts(3, 100));
    ASSERT_EQ(r.status().code(), Code::kInvalidInput);
    EXPECT_NE(r.status().message().find(tensor), std::string::npos) << r.status().to_string();
    EXPECT_EQ(calib::read_native(dir).status().code(), Code::kInvalidInput);
  }
}

// ---- The memory estimate.

TEST(EvalMemoryEstimate, DoesNotGrowWithDepthAndFitsA70BModel) {
  ModelConfig c;  // LLaMA-3-70B shapes
  c.hidden_size = 8192;
  c.intermediate_size = 28672;
  c.num_attention_heads = 64;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.num_hidden_layers = 80;
  c.torch_dtype = DType::kBF16;
  EvalShape s;
  s.config = c;
  s.weights = EvalWeights::kPacked;
  s.sequences = 40;
  s.seqlen = 2048;
  const EvalMemory m80 = estimate_eval_memory(s);
  s.config.num_hidden_layers = 2;
  const EvalMemory m2 = estimate_eval_memory(s);
  EXPECT_EQ(m80.peak(), m2.peak());
  std::printf(
      "70B, GPTQ W4, batch 8 x 2048, FP reference: activations %.2f GiB, layer %.2f GiB, "
      "vocab %.2f GiB, peak %.2f GiB\n",
      m80.activations / 1073741824.0, m80.layer / 1073741824.0, m80.vocab / 1073741824.0,
      m80.peak() / 1073741824.0);
  // One fp32 block of 70B is 3.2 GiB; the batch's logits alone would be 2 · 15.7 GiB.
  EXPECT_LT(m80.peak(), uint64_t{12} << 30);
  EXPECT_GT(m80.peak(), uint64_t{3} << 30);
  EXPECT_EQ(m80.parts().size(), 2u);
  EXPECT_EQ(m80.parts()[0].second + m80.parts()[1].second, m80.peak());
  s.weights = EvalWeights::kNative;
  s.a_bits = 4;
  s.prefix = 1;
  const EvalMemory mn = estimate_eval_memory(s);
  std::printf("70B native W4A4 + IntactKV: peak %.2f GiB\n", mn.peak() / 1073741824.0);
  EXPECT_LT(mn.peak(), uint64_t{12} << 30);
  // More lm_head rows per chunk never lowers the vocabulary stage.
  s.options.head_rows = 16384;
  EXPECT_GE(estimate_eval_memory(s).vocab, mn.vocab);
}

}  // namespace
}  // namespace qcal

// Reconstruction recipes (block / CBQ × rtn / lora-rounding, IntactKV +Cal) on the one
// recipe and pipeline: the recipe's refusals, its JSON, the CBQ options it implies, and
// calibration results through the planned DAG (qcal::calibrate runs the same tasks as
// the service's workers).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/model_dir.h"
#include "common/recipe.h"
#include "tests/unit/test_util.h"
#include "worker/calib/block.h"
#include "worker/calib/cbq.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/native.h"
#include "worker/engine/qformats.h"
#include "worker/engine/synth.h"
#include "worker/local_runner.h"
#include "worker/pipeline.h"

namespace qcal::calib {
namespace {

using nlohmann::json;
using qcal::testing::mean_kl;

constexpr int64_t kT = 32;

struct Fixture {
  testing::TempDir dir{"qcal_cbq_recipe_"};
  std::string model_dir;
  FpModel fp;
  TokenSequences calib, eval;
  std::vector<float> fp_eval;  // FP logits of the eval set
};

Fixture& fx() {
  static Fixture* f = [] {
    auto* f = new Fixture;
    SynthOptions o;
    o.config = qcal::testing::small_config(192, 256, 3);
    const ModelConfig& c = o.config;
    o.seed = 7;
    o.outliers.norm_channels = 2;
    o.outliers.up_channels = 2;
    o.outliers.alpha = 20;
    f->model_dir = f->dir.sub("m");
    if (!synth_model(o, f->model_dir).is_ok()) std::abort();
    auto fp = load_fp_model(f->model_dir);
    if (!fp.is_ok()) std::abort();
    f->fp = std::move(fp).value();
    f->calib = {kT, synth_tokens(8 * kT, c.vocab_size, 11)};
    f->eval = {kT, synth_tokens(8 * kT, c.vocab_size, 12)};
    // Every eval sequence begins with BOS (IntactKV's prefix).
    for (int64_t q = 0; q < f->eval.count(); ++q)
      f->eval.tokens[static_cast<size_t>(q * kT)] = static_cast<int32_t>(c.bos_token_id);
    f->fp_eval = fp_model_logits(f->fp, f->eval.tokens.data(), f->eval.count(), kT);
    return f;
  }();
  return *f;
}

std::string err(const Status& s) { return s.to_string(); }

// Expects kInvalidInput whose message starts with `field` + ":" and contains `why`.
void expect_rejected(const Status& s, const std::string& field, const std::string& why) {
  EXPECT_EQ(s.code(), Code::kInvalidInput) << err(s);
  EXPECT_NE(s.message().find(field + ":"), std::string::npos) << err(s);
  EXPECT_NE(s.message().find(why), std::string::npos) << err(s);
}

Recipe recon(const std::string& rc, const std::string& ws) {
  return Recipe().with("reconstruction", rc).with("weight_solver", ws);
}

double eval_kl(const NativeModel& m, int64_t seqs = -1) {
  Fixture& f = fx();
  const int64_t V = f.fp.config.vocab_size;
  const int64_t B = seqs < 0 ? f.eval.count() : seqs;
  return mean_kl(native_logits(m, f.eval.tokens.data(), B, kT),
                 std::vector<float>(f.fp_eval.begin(), f.fp_eval.begin() + B * kT * V), V);
}

// ---------------------------------------------------------------- recipe

TEST(CbqRecipe, NonsenseCombinationsAreRejectedWithAReason) {
  expect_rejected(recon("none", "lora-rounding").validate(), "weight_solver",
                  "set reconstruction to block or cbq");
  expect_rejected(recon("cbq", "rtn").with("w_bits", 16).with("a_bits", 4).validate(),
                  "reconstruction", "needs w_bits 2, 3, 4 or 8");
  expect_rejected(recon("cbq", "lora-rounding").with("w_mse_clip", true).validate(), "w_mse_clip",
                  "learns the weight step sizes itself");
  // Ranges are checked when a value is set.
  Recipe r = recon("cbq", "lora-rounding");
  expect_rejected(r.set("cbq_window", 0), "cbq_window", "must be in [1, 4096]");
  expect_rejected(r.set("cbq_epochs", 0), "cbq_epochs", "must be in [1, 1000000]");
  expect_rejected(r.set("lora_rank", -3), "lora_rank", "(got -3)");
  r.with("cbq_window", 2).with("cbq_overlap", 2);
  expect_rejected(r.validate(), "cbq_overlap", "[0, cbq_window) = [0, 2) (got 2)");
  r.with("cbq_overlap", 1).with("lora_rank", 0);
  expect_rejected(r.validate(), "lora_rank", "must be >= 1 with weight_solver lora-rounding");
  // The model-dependent check: a window longer than the model.
  r = recon("cbq", "lora-rounding").with("cbq_window", 4).with("cbq_overlap", 1);
  ASSERT_TRUE(r.validate().is_ok());
  expect_rejected(r.validate_for(fx().fp.config), "cbq_window",
                  "4 blocks per window, but the model has 3 layers");
  r.with("reconstruction", "block");  // the window size is not used by block
  EXPECT_TRUE(r.validate_for(fx().fp.config).is_ok()) << err(r.validate_for(fx().fp.config));

  // Combinations that make sense: every transform with a reconstruction and rtn /
  // lora-rounding; rank 0 with rtn; IntactKV; parallel mode.
  // gptq with a reconstruction: LoRA-Rounding started from GPTQ's solution.
  for (const char* t : {"none", "smoothquant", "quarot", "spinquant", "flatquant"})
    for (const char* ws : {"rtn", "lora-rounding", "gptq"})
      for (const char* rc : {"block", "cbq"}) {
        Recipe ok = recon(rc, ws)
                        .with("transform", t)
                        .with("a_bits", 4)
                        .with("kv_bits", 4)
                        .with("intactkv", true)
                        .with("mode", std::string(rc) == "block" ? "parallel" : "sequential");
        if (std::string(ws) == "lora-rounding") ok.with("lora_rank", 8);
        EXPECT_TRUE(ok.validate().is_ok()) << t << ": " << err(ok.validate());
        EXPECT_TRUE(ok.validate_for(fx().fp.config).is_ok())
            << t << ": " << err(ok.validate_for(fx().fp.config));
      }
}

TEST(CbqRecipe, JsonRoundTripOfTheReconstructionKeys) {
  Recipe r = recon("cbq", "lora-rounding")
                 .with("transform", "quarot")
                 .with("w_bits", 2)
                 .with("w_group", 32)
                 .with("cbq_window", 3)
                 .with("cbq_overlap", 2)
                 .with("mode", "parallel")
                 .with("cbq_epochs", 7)
                 .with("lora_rank", 5)
                 .with("cfp", false)
                 .with("intactkv", true);
  const json j = r.to_json();
  EXPECT_EQ(j["weight_solver"], "lora-rounding");
  EXPECT_EQ(j["reconstruction"], "cbq");
  EXPECT_EQ(j["cbq_window"], 3);
  EXPECT_EQ(j["cbq_overlap"], 2);
  EXPECT_EQ(j["mode"], "parallel");
  EXPECT_EQ(j["cbq_epochs"], 7);
  EXPECT_EQ(j["lora_rank"], 5);
  EXPECT_EQ(j["cfp"], false);
  auto back = recipe_from_json(j);
  ASSERT_TRUE(back.is_ok()) << err(back.status());
  EXPECT_EQ(back->to_json(), j);
  EXPECT_TRUE(back->parallel());
  // Block reconstruction with rtn, from a minimal object (defaults elsewhere).
  auto blk = recipe_from_json({{"reconstruction", "block"}, {"weight_solver", "rtn"}});
  ASSERT_TRUE(blk.is_ok());
  EXPECT_EQ(blk->reconstruction(), "block");
  EXPECT_EQ(blk->i("cbq_window"), 2);
  EXPECT_TRUE(blk->b("cfp"));
  // The earlier boolean cbq_parallel is read as mode.
  auto par = recipe_from_json({{"reconstruction", "block"}, {"cbq_parallel", true}});
  ASSERT_TRUE(par.is_ok()) << err(par.status());
  EXPECT_TRUE(par->parallel());
  // Bad values name the key.
  expect_rejected(recipe_from_json({{"reconstruction", "full"}}).status(), "recipe.reconstruction",
                  "unknown 'full' (expected none, block, cbq)");
  expect_rejected(recipe_from_json({{"weight_solver", "adaround"}}).status(),
                  "recipe.weight_solver", "expected rtn, gptq, lora-rounding");
  expect_rejected(recipe_from_json({{"cbq_window", "2"}}).status(), "recipe.cbq_window",
                  "must be an integer");
  expect_rejected(recipe_from_json({{"cfp", 1}}).status(), "recipe.cfp", "must be true or false");
  expect_rejected(recipe_from_json({{"cbq_parallel", "yes"}}).status(), "recipe.cbq_parallel",
                  "must be true or false");
}

TEST(CbqRecipe, IntactKvCalKeys) {
  Recipe r = Recipe()
                 .with("transform", "quarot")
                 .with("a_bits", 4)
                 .with("intactkv", true)
                 .with("intactkv_cal", true)
                 .with("intactkv_cal_steps", 12)
                 .with("intactkv_cal_lr", 5e-3);
  EXPECT_TRUE(r.validate().is_ok()) << err(r.validate());
  EXPECT_TRUE(r.validate_for(fx().fp.config).is_ok()) << err(r.validate_for(fx().fp.config));
  const json j = r.to_json();
  EXPECT_EQ(j["intactkv_cal"], true);
  EXPECT_EQ(j["intactkv_cal_steps"], 12);
  EXPECT_EQ(j["intactkv_cal_lr"], 5e-3);
  auto back = recipe_from_json(j);
  ASSERT_TRUE(back.is_ok()) << err(back.status());
  EXPECT_EQ(back->to_json(), j);
  // Defaults (the paper's): off, 160 steps, lr 2e-4.
  auto d = recipe_from_json({{"intactkv", true}, {"a_bits", 4}});
  ASSERT_TRUE(d.is_ok());
  EXPECT_FALSE(d->b("intactkv_cal"));
  EXPECT_EQ(d->i("intactkv_cal_steps"), 160);
  EXPECT_EQ(d->f("intactkv_cal_lr"), 2e-4);
  // Rejections name the key.
  Recipe bad = r;
  bad.with("intactkv", false);
  expect_rejected(bad.validate(), "intactkv_cal", "turn intactkv on");
  bad = r;
  bad.with("w_bits", 16).with("a_bits", 16).with("kv_bits", 16);
  expect_rejected(bad.validate_fields(), "intactkv_cal", "nothing to calibrate");
  expect_rejected(Recipe().set("intactkv_cal_steps", 0), "intactkv_cal_steps", "must be in [1,");
  expect_rejected(Recipe().set("intactkv_cal_lr", 0), "intactkv_cal_lr", "must be in [");
  expect_rejected(recipe_from_json({{"intactkv_cal", "yes"}}).status(), "intactkv_cal",
                  "must be true or false");
  expect_rejected(recipe_from_json({{"intactkv_cal_steps", 1.5}}).status(), "intactkv_cal_steps",
                  "must be an integer");
}

TEST(CbqRecipe, OptionsFollowTheRecipe) {
  const ModelConfig& c = fx().fp.config;
  Recipe r = recon("block", "rtn")
                 .with("w_bits", 3)
                 .with("w_group", 32)
                 .with("a_bits", 8)
                 .with("cbq_window", 3)
                 .with("cbq_epochs", 5)
                 .with("cali_bsz", 2)
                 .with("seed", 9);
  CbqOptions o = cbq_options_for(r, c, 1, 0);
  EXPECT_EQ(o.window, 1);
  EXPECT_EQ(o.overlap, 0);
  EXPECT_FALSE(o.lora_rounding);
  EXPECT_EQ(o.lora_spec().rank, 0);
  EXPECT_EQ(o.w_bits, 3);
  EXPECT_EQ(o.w_group, 32);
  EXPECT_EQ(o.a_bits, 8);
  EXPECT_EQ(o.epochs, 5);
  EXPECT_EQ(o.bsz, 2);
  EXPECT_EQ(o.seed, 9u);
  EXPECT_FALSE(o.parallel);
  r.with("reconstruction", "cbq").with("weight_solver", "lora-rounding").with("lora_rank", 6);
  r.with("cfp", false).with("mode", "parallel");
  o = cbq_options_for(r, c, 3, 2);
  EXPECT_EQ(o.window, 3);
  EXPECT_EQ(o.overlap, 2);
  EXPECT_TRUE(o.lora_rounding);
  EXPECT_EQ(o.rank, 6);
  EXPECT_FALSE(o.cfp);
  EXPECT_TRUE(o.parallel);
  EXPECT_FALSE(o.gptq_init);
  EXPECT_TRUE(o.validate(c).is_ok()) << err(o.validate(c));
  // gptq + a reconstruction: LoRA-Rounding of lora_rank, initialized from GPTQ.
  r.with("weight_solver", "gptq").with("gptq.percdamp", 0.05).with("cbq_holdout", 7);
  o = cbq_options_for(r, c, 3, 2);
  EXPECT_EQ(o.holdout, 7);
  EXPECT_TRUE(o.gptq_init);
  EXPECT_TRUE(o.lora_rounding);
  EXPECT_EQ(o.rank, 6);
  // lora_rank is lora-rounding's option, in use by gptq with a reconstruction too;
  // without one (or with rtn) it changes nothing and is refused.
  EXPECT_TRUE(r.validate().is_ok()) << err(r.validate());
  Recipe plain = r;
  plain.with("reconstruction", "none").with("cbq_holdout", 0).with("cbq_window", 2);
  plain.with("cbq_overlap", 1).with("cbq_epochs", 20).with("cfp", true).with("mode", "sequential");
  expect_rejected(plain.validate(), "lora_rank", "an option of weight_solver lora-rounding");
  EXPECT_DOUBLE_EQ(o.gptq.percdamp, 0.05);
  EXPECT_TRUE(o.validate(c).is_ok()) << err(o.validate(c));
}

TEST(CbqRecipe, FittedCarriesByteArrays) {
  // The carried GPTQ codes travel as U8 tensors beside the fp64 arrays (qcal.fitted).
  qcal::testing::TempDir tmp("qcal_fitted_");
  Fitted f;
  f.arrays["L1.s0.q"] = {0.5, 0.25};
  f.bytes["L1.cell.q"] = {0, 7, 15, 3};
  f.meta["layers"] = {1};
  const std::string path = tmp.sub("state.safetensors");
  ASSERT_TRUE(save_fitted(f, path).is_ok());
  auto g = load_fitted(path);
  ASSERT_TRUE(g.is_ok()) << g.status().to_string();
  EXPECT_EQ(g->arrays, f.arrays);
  EXPECT_EQ(g->bytes, f.bytes);
  // A name in both maps is refused rather than written twice.
  f.bytes["L1.s0.q"] = {1};
  EXPECT_FALSE(save_fitted(f, tmp.sub("bad.safetensors")).is_ok());
}

// ---------------------------------------------------------------- the pipeline

Recipe quarot_w4a4(int64_t epochs) {
  return recon("cbq", "lora-rounding")
      .with("transform", "quarot")
      .with("a_bits", 4)
      .with("kv_bits", 4)
      .with("a_clip", 0.9)
      .with("kv_clip", 0.95)
      .with("lora_rank", 4)
      .with("cbq_epochs", epochs);
}

TEST(CbqPipeline, QuaRotW4A4CbqBeatsRtnWeights) {
  // QuaRot W4A4KV4 with CBQ(2,1) + LoRA-Rounding vs QuaRot with RTN weights, through
  // the planned windows (2 window tasks for 3 layers).
  Recipe base = quarot_w4a4(20).with("reconstruction", "none").with("weight_solver", "rtn");
  Recipe cbq = quarot_w4a4(20);
  json rep;
  auto nb = qcal::calibrate(fx().fp, fx().calib, base, nullptr);
  auto nc = qcal::calibrate(fx().fp, fx().calib, cbq, &rep);
  ASSERT_TRUE(nb.is_ok()) << err(nb.status());
  ASSERT_TRUE(nc.is_ok()) << err(nc.status());
  ASSERT_EQ(rep["windows"].size(), 2u) << rep.dump();
  for (const json& w : rep["windows"]) {
    EXPECT_LT(w["loss_hard"].get<double>(), w["loss_hard_init"].get<double>()) << w.dump();
  }
  EXPECT_FALSE(nc->layers[0].online.po.empty());  // the online Hadamards are kept
  EXPECT_EQ(nc->recipe["reconstruction"], "cbq");
  const double kb = eval_kl(nb.value()), kc = eval_kl(nc.value());
  std::printf("QuaRot W4A4KV4 KL vs FP: RTN weights %.4f, CBQ(2,1) + LoRA-Rounding %.4f\n", kb, kc);
  ASSERT_TRUE(std::isfinite(kc));
  EXPECT_LT(kc, kb);
}

// IntactKV "+Cal" after a transform alone and after a reconstruction: the learn task
// trains the cache and nothing else changes.
TEST(CbqPipeline, IntactKvCalTrainsTheCacheOnly) {
  Fixture& f = fx();
  const int64_t V = f.fp.config.vocab_size, B = f.eval.count();
  auto kl_of = [&](const NativeModel& m) {
    // The IntactKV protocol: the prefix logits are the stored FP ones.
    std::vector<int32_t> rest;
    for (int64_t q = 0; q < B; ++q) rest.insert(rest.end(), f.eval.seq(q) + 1, f.eval.seq(q) + kT);
    const std::vector<float> tail = native_logits(m, rest.data(), B, kT - 1);
    std::vector<float> all;
    for (int64_t q = 0; q < B; ++q) {
      all.insert(all.end(), m.intact_logits.begin(), m.intact_logits.end());
      all.insert(all.end(), tail.begin() + q * (kT - 1) * V, tail.begin() + (q + 1) * (kT - 1) * V);
    }
    return mean_kl(all, f.fp_eval, V);
  };
  const Recipe plain = Recipe()
                           .with("transform", "quarot")
                           .with("a_bits", 4)
                           .with("kv_bits", 4)
                           .with("a_clip", 0.9)
                           .with("kv_clip", 0.95)
                           .with("intactkv", true);
  Recipe cal = plain;
  cal.with("intactkv_cal", true).with("intactkv_cal_steps", 24).with("intactkv_cal_lr", 1e-2);
  json rep;
  auto a = qcal::calibrate(f.fp, f.calib, plain, nullptr);
  auto b = qcal::calibrate(f.fp, f.calib, cal, &rep);
  ASSERT_TRUE(a.is_ok()) << err(a.status());
  ASSERT_TRUE(b.is_ok()) << err(b.status());
  ASSERT_TRUE(rep["learn"].contains("intactkv-cal")) << rep.dump();
  const json& ic = rep["learn"]["intactkv-cal"]["intactkv_cal"];
  EXPECT_EQ(ic["steps"], 24);
  EXPECT_LT(ic["loss_last"].get<double>(), ic["loss_first"].get<double>());
  EXPECT_EQ(b->recipe["intactkv_cal"], true);
  // Only the cache differs.
  EXPECT_NE(a->intact_k, b->intact_k);
  EXPECT_EQ(a->intact_logits, b->intact_logits);
  NativeModel b_with_a = b.value();
  b_with_a.intact_k = a->intact_k;
  b_with_a.intact_v = a->intact_v;
  EXPECT_EQ(native_logits(b_with_a, f.eval.tokens.data(), 2, kT),
            native_logits(a.value(), f.eval.tokens.data(), 2, kT));
  const double kla = kl_of(a.value()), klb = kl_of(b.value());
  std::printf("QuaRot W4A4KV4 + IntactKV: loss %.5f -> %.5f; eval KL %.5f -> %.5f with +Cal\n",
              ic["loss_first"].get<double>(), ic["loss_last"].get<double>(), kla, klb);
  EXPECT_TRUE(std::isfinite(klb));

  // After a reconstruction (one window of 3 blocks): the cache is trained on the
  // reconstructed model; the rest equals the run without +Cal.
  Recipe rc = quarot_w4a4(1).with("cbq_window", 3).with("cbq_overlap", 0).with("intactkv", true);
  Recipe rc_cal = rc;
  rc_cal.with("intactkv_cal", true).with("intactkv_cal_steps", 3);
  json rep1;
  auto x = qcal::calibrate(f.fp, f.calib, rc, nullptr);
  auto y = qcal::calibrate(f.fp, f.calib, rc_cal, &rep1);
  ASSERT_TRUE(x.is_ok()) << err(x.status());
  ASSERT_TRUE(y.is_ok()) << err(y.status());
  EXPECT_EQ(rep1["windows"].size(), 1u);
  EXPECT_EQ(rep1["learn"]["intactkv-cal"]["intactkv_cal"]["steps"], 3);
  EXPECT_NE(x->intact_k, y->intact_k);
  for (size_t l = 0; l < x->layers.size(); ++l)
    for (int p = 0; p < kNumProj; ++p)
      EXPECT_EQ(x->layers[l].qw[p].data, y->layers[l].qw[p].data) << l << " " << p;
}

// The +Cal training data: sequences not beginning with the prefix get it written over
// their first tokens; the others are unchanged.
TEST(CbqPipeline, IntactKvCalDataWritesThePrefix) {
  TokenSequences d{4, {1, 2, 3, 4, 9, 1, 2, 3, 1, 5, 6, 7}};
  int64_t n = -1;
  const TokenSequences a = intactkv_cal_data(d, {1, 5}, &n);
  EXPECT_EQ(n, 2);
  EXPECT_EQ(a.tokens, (std::vector<int32_t>{1, 5, 3, 4, 1, 5, 2, 3, 1, 5, 6, 7}));
  const TokenSequences b = intactkv_cal_data(d, {1}, &n);
  EXPECT_EQ(n, 1);
  EXPECT_EQ(b.tokens, (std::vector<int32_t>{1, 2, 3, 4, 1, 1, 2, 3, 1, 5, 6, 7}));
}

// ---------------------------------------------------------------- outputs and quality

TEST(CbqPipeline, WeightOnlyReconstructionWritesGptq) {
  Fixture& f = fx();
  Recipe r = recon("block", "lora-rounding")
                 .with("w_bits", 4)
                 .with("w_group", 64)  // = H: q/k/v/o/gate/up have one group per row, down 3
                 .with("lora_rank", 4)
                 .with("cbq_epochs", 2);
  ASSERT_TRUE(r.folds_completely());
  auto nm = qcal::calibrate(f.fp, f.calib, r, nullptr);
  ASSERT_TRUE(nm.is_ok()) << err(nm.status());
  testing::TempDir d("qcal_cbq_gptq_");
  auto rep = calibrate_to_dir(f.model_dir, f.calib, r, d.sub("out"), "gptq", false);
  ASSERT_TRUE(rep.is_ok()) << err(rep.status());
  EXPECT_EQ((*rep)["windows"].size(), 3u);
  auto md = ModelDir::open(d.sub("out"));
  ASSERT_TRUE(md.is_ok()) << err(md.status());
  ASSERT_TRUE(md.value()->quantization_config());
  const ModelConfig& c = f.fp.config;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (int p = 0; p < kNumProj; ++p) {
      auto w = read_linear_weight(*md.value(), layer_prefix(l) + kProjNames[p]);
      ASSERT_TRUE(w.is_ok()) << err(w.status());
      // The native model's codes × scales.
      const PackedWeight& pw = nm->layers[static_cast<size_t>(l)].qw[p];
      const int64_t G = static_cast<int64_t>(pw.scales.size()) / pw.out;
      const int64_t gc = pw.group > 0 ? pw.group : pw.in;
      std::vector<int8_t> codes(static_cast<size_t>(pw.in));
      std::vector<float> deq(static_cast<size_t>(pw.out * pw.in));
      for (int64_t o = 0; o < pw.out; ++o) {
        unpack_row(pw, o, codes.data());
        for (int64_t i = 0; i < pw.in; ++i)
          deq[static_cast<size_t>(o * pw.in + i)] =
              pw.scales[static_cast<size_t>(o * G + i / gc)] * static_cast<float>(codes[i]);
      }
      EXPECT_EQ(w->data, deq) << "layer " << l << " " << kProjNames[p];
    }
}

TEST(CbqPipeline, EveryTransformComposesWithReconstruction) {
  // W4A4KV4, per-block reconstruction with LoRA-Rounding (1 epoch) after each
  // transform: the transform's online parts are kept (QuaRot / SpinQuant Hadamards,
  // FlatQuant's Kronecker pairs) and the result runs with finite logits.
  for (const char* t : {"none", "smoothquant", "quarot", "spinquant", "flatquant"}) {
    Recipe r = recon("block", "lora-rounding")
                   .with("transform", t)
                   .with("a_bits", 4)
                   .with("kv_bits", 4)
                   .with("lora_rank", 4)
                   .with("cbq_epochs", 1);
    if (std::string(t) == "flatquant") r.with("epochs", 1);
    if (std::string(t) == "spinquant") r.with("spin_steps", 2);
    auto nm = qcal::calibrate(fx().fp, fx().calib, r, nullptr);
    ASSERT_TRUE(nm.is_ok()) << t << ": " << err(nm.status());
    const std::string name(t);
    const BlockTransformsT<float>& on = nm->layers[0].online;
    const bool online = name == "quarot" || name == "spinquant" || name == "flatquant";
    EXPECT_EQ(!on.pk.empty() || !on.d1.empty() || !on.a1.empty(), online) << t;
    EXPECT_EQ(!on.a1.empty(), name == "flatquant") << t;
    const double kl = eval_kl(nm.value(), 4);
    std::printf("W4A4KV4 %-12s + block reconstruction (1 epoch): KL %.4f\n", t, kl);
    EXPECT_TRUE(std::isfinite(kl)) << t;
    EXPECT_LT(kl, 1.0) << t;
  }
}

TEST(CbqPipeline, W2A16ReconstructionsBeatRtn) {
  // 3 layers, 8 × 32 calibration tokens, 20 epochs (40 steps per window); KL of the
  // native model's logits vs FP on 8 held-out sequences.
  struct Row {
    const char* name;
    const char* rc;
    const char* ws;
    double kl = 0;
  };
  std::vector<Row> rows = {
      {"none (RTN)", "none", "rtn"},   {"none (GPTQ)", "none", "gptq"},
      {"block, rtn", "block", "rtn"},  {"block, lora-rounding", "block", "lora-rounding"},
      {"cbq(2,1), rtn", "cbq", "rtn"}, {"cbq(2,1), lora-rounding", "cbq", "lora-rounding"}};
  std::printf("W2A16 g32, KL vs FP (nats/token):\n");
  for (Row& row : rows) {
    Recipe r = recon(row.rc, row.ws).with("w_bits", 2).with("w_group", 32).with("lora_rank", 16);
    auto nm = qcal::calibrate(fx().fp, fx().calib, r, nullptr);
    ASSERT_TRUE(nm.is_ok()) << row.name << ": " << err(nm.status());
    row.kl = eval_kl(nm.value());
    std::printf("  %-26s %.4f\n", row.name, row.kl);
    ASSERT_TRUE(std::isfinite(row.kl));
  }
  const double rtn = rows[0].kl;
  for (size_t i = 2; i < rows.size(); ++i) EXPECT_LT(rows[i].kl, rtn) << rows[i].name;
  // LoRA-Rounding learns more than the step sizes alone.
  EXPECT_LT(rows[5].kl, rows[4].kl);
  EXPECT_LT(rows[3].kl, rows[2].kl);
}

}  // namespace
}  // namespace qcal::calib

// labels: unit
// CBQ / per-block reconstruction and LoRA-Rounding as recipes (issue #5; recipe.h,
// methods.h cbq_*): validation of nonsense combinations (field + reason), the JSON
// round trip of the new keys, exact save → load of the setup and of the window
// state, the service's window-per-task steps (save / load between every window)
// giving a bit-identical NativeModel and logits to calibrate() in one process
// (QuaRot W4A4KV4 with online transforms, LoRA-Rounding, IntactKV), the GPTQ
// checkpoint of a weight-only reconstruction, and on a 3-layer synthetic LLaMA with
// outlier channels at W2A16 g32 the output KL vs FP of reconstruction none / block /
// cbq with and without LoRA-Rounding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "tests/unit/test_util.h"
#include "worker/calib/cbq.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/methods.h"
#include "worker/calib/native.h"
#include "worker/calib/recipe.h"
#include "worker/engine/qformats.h"
#include "worker/engine/synth.h"

namespace qcal::calib {
namespace {

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

CalibRecipe recon(Reconstruction rc, WeightSolver ws) {
  CalibRecipe r;
  r.reconstruction = rc;
  r.weight_solver = ws;
  return r;
}

// ---------------------------------------------------------------- recipe

TEST(CbqRecipe, NonsenseCombinationsAreRejectedWithAReason) {
  expect_rejected(recon(Reconstruction::kNone, WeightSolver::kLoraRounding).validate(),
                  "weight_solver", "set reconstruction to block or cbq");
  expect_rejected(recon(Reconstruction::kCbq, WeightSolver::kGptq).validate(), "reconstruction",
                  "discard gptq's solution");
  expect_rejected(recon(Reconstruction::kBlock, WeightSolver::kGptq).validate(), "reconstruction",
                  "use weight_solver rtn");
  CalibRecipe r = recon(Reconstruction::kCbq, WeightSolver::kRtn);
  r.w_bits = 16;
  r.a_bits = 4;
  expect_rejected(r.validate(), "reconstruction", "needs w_bits 2, 3, 4 or 8");
  r = recon(Reconstruction::kCbq, WeightSolver::kLoraRounding);
  r.w_mse_clip = true;
  expect_rejected(r.validate(), "w_mse_clip", "learns the weight step sizes itself");
  r = recon(Reconstruction::kCbq, WeightSolver::kLoraRounding);
  r.cbq_window = 0;
  r.cbq_overlap = 0;
  expect_rejected(r.validate(), "cbq_window", "must be in [1, 4096]");
  r.cbq_window = 2;
  r.cbq_overlap = 2;
  expect_rejected(r.validate(), "cbq_overlap", "[0, cbq_window) = [0, 2) (got 2)");
  r.cbq_overlap = -1;
  expect_rejected(r.validate(), "cbq_overlap", "(got -1)");
  r.cbq_overlap = 1;
  r.cbq_epochs = 0;
  expect_rejected(r.validate(), "cbq_epochs", "must be in [1, 1000000]");
  r.cbq_epochs = 20;
  r.lora_rank = 0;
  expect_rejected(r.validate(), "lora_rank", "must be >= 1 with weight_solver lora-rounding");
  r.lora_rank = -3;
  expect_rejected(r.validate(), "lora_rank", "(got -3)");
  // The model-dependent check: a window longer than the model.
  r = recon(Reconstruction::kCbq, WeightSolver::kLoraRounding);
  r.cbq_window = 4;
  r.cbq_overlap = 1;
  ASSERT_TRUE(r.validate().is_ok());
  expect_rejected(r.validate_for(fx().fp.config), "cbq_window",
                  "4 blocks per window, but the model has 3 layers");
  r.reconstruction = Reconstruction::kBlock;  // the window size is not used by block
  EXPECT_TRUE(r.validate_for(fx().fp.config).is_ok());

  // Combinations that make sense: every transform with a reconstruction and rtn /
  // lora-rounding; rank 0 with rtn; IntactKV; parallel windows.
  for (Transform t : {Transform::kNone, Transform::kSmoothQuant, Transform::kQuaRot,
                      Transform::kSpinQuant, Transform::kFlatQuant})
    for (WeightSolver ws : {WeightSolver::kRtn, WeightSolver::kLoraRounding})
      for (Reconstruction rc : {Reconstruction::kBlock, Reconstruction::kCbq}) {
        CalibRecipe ok = recon(rc, ws);
        ok.transform = t;
        ok.a_bits = 4;
        ok.kv_bits = 4;
        ok.intactkv = true;
        ok.cbq_parallel = rc == Reconstruction::kBlock;
        ok.lora_rank = ws == WeightSolver::kRtn ? 0 : 8;
        EXPECT_TRUE(ok.validate().is_ok()) << transform_name(t) << ": " << err(ok.validate());
        EXPECT_TRUE(ok.validate_for(fx().fp.config).is_ok())
            << err(ok.validate_for(fx().fp.config));
      }
}

TEST(CbqRecipe, JsonRoundTripOfTheNewKeys) {
  CalibRecipe r = recon(Reconstruction::kCbq, WeightSolver::kLoraRounding);
  r.transform = Transform::kQuaRot;
  r.w_bits = 2;
  r.w_group = 32;
  r.cbq_window = 3;
  r.cbq_overlap = 2;
  r.cbq_parallel = true;
  r.cbq_epochs = 7;
  r.lora_rank = 5;
  r.cfp = false;
  r.intactkv = true;
  const nlohmann::json j = r.to_json();
  EXPECT_EQ(j["weight_solver"], "lora-rounding");
  EXPECT_EQ(j["reconstruction"], "cbq");
  EXPECT_EQ(j["cbq_window"], 3);
  EXPECT_EQ(j["cbq_overlap"], 2);
  EXPECT_EQ(j["cbq_parallel"], true);
  EXPECT_EQ(j["cbq_epochs"], 7);
  EXPECT_EQ(j["lora_rank"], 5);
  EXPECT_EQ(j["cfp"], false);
  auto back = recipe_from_json(j);
  ASSERT_TRUE(back.is_ok()) << err(back.status());
  const CalibRecipe& b = back.value();
  EXPECT_EQ(b.reconstruction, Reconstruction::kCbq);
  EXPECT_EQ(b.weight_solver, WeightSolver::kLoraRounding);
  EXPECT_EQ(b.cbq_window, 3);
  EXPECT_EQ(b.cbq_overlap, 2);
  EXPECT_TRUE(b.cbq_parallel);
  EXPECT_EQ(b.cbq_epochs, 7);
  EXPECT_EQ(b.lora_rank, 5);
  EXPECT_FALSE(b.cfp);
  EXPECT_EQ(b.to_json(), j);
  // Block reconstruction with rtn, from a minimal object (defaults elsewhere).
  auto blk = recipe_from_json({{"reconstruction", "block"}, {"weight_solver", "rtn"}});
  ASSERT_TRUE(blk.is_ok());
  EXPECT_EQ(blk->reconstruction, Reconstruction::kBlock);
  EXPECT_EQ(blk->cbq_window, 2);
  EXPECT_TRUE(blk->cfp);
  // Bad values name the key.
  expect_rejected(recipe_from_json({{"reconstruction", "full"}}).status(), "reconstruction",
                  "expected none, block or cbq");
  expect_rejected(recipe_from_json({{"weight_solver", "adaround"}}).status(), "weight_solver",
                  "expected rtn, gptq or lora-rounding");
  expect_rejected(recipe_from_json({{"cbq_window", "2"}}).status(), "cbq_window",
                  "must be an integer");
  expect_rejected(recipe_from_json({{"cfp", 1}}).status(), "cfp", "must be a boolean");
  expect_rejected(recipe_from_json({{"cbq_parallel", "yes"}}).status(), "cbq_parallel",
                  "must be a boolean");
  // The names.
  EXPECT_STREQ(reconstruction_str(Reconstruction::kBlock), "block");
  EXPECT_STREQ(weight_solver_str(WeightSolver::kLoraRounding), "lora-rounding");
}

TEST(CbqRecipe, IntactKvCalKeys) {
  CalibRecipe r;
  r.transform = Transform::kQuaRot;
  r.a_bits = 4;
  r.intactkv = true;
  r.intactkv_cal = true;
  r.intactkv_cal_steps = 12;
  r.intactkv_cal_lr = 5e-3;
  EXPECT_TRUE(r.validate().is_ok()) << err(r.validate());
  EXPECT_TRUE(r.validate_for(fx().fp.config).is_ok()) << err(r.validate_for(fx().fp.config));
  const nlohmann::json j = r.to_json();
  EXPECT_EQ(j["intactkv_cal"], true);
  EXPECT_EQ(j["intactkv_cal_steps"], 12);
  EXPECT_EQ(j["intactkv_cal_lr"], 5e-3);
  auto back = recipe_from_json(j);
  ASSERT_TRUE(back.is_ok()) << err(back.status());
  EXPECT_TRUE(back->intactkv_cal);
  EXPECT_EQ(back->intactkv_cal_steps, 12);
  EXPECT_EQ(back->intactkv_cal_lr, 5e-3);
  EXPECT_EQ(back->to_json(), j);
  // Defaults (the paper's): off, 160 steps, lr 2e-4.
  auto d = recipe_from_json({{"intactkv", true}, {"a_bits", 4}});
  ASSERT_TRUE(d.is_ok());
  EXPECT_FALSE(d->intactkv_cal);
  EXPECT_EQ(d->intactkv_cal_steps, 160);
  EXPECT_EQ(d->intactkv_cal_lr, 2e-4);
  // Rejections name the key.
  CalibRecipe bad = r;
  bad.intactkv = false;
  expect_rejected(bad.validate(), "intactkv_cal", "turn intactkv on");
  bad = r;
  bad.w_bits = bad.a_bits = bad.kv_bits = 16;
  expect_rejected(bad.validate_for(fx().fp.config), "intactkv_cal", "nothing to calibrate");
  bad = r;
  bad.intactkv_cal_steps = 0;
  expect_rejected(bad.validate(), "intactkv_cal_steps", "must be in [1,");
  bad = r;
  bad.intactkv_cal_lr = 0;
  expect_rejected(bad.validate(), "intactkv_cal_lr", "must be positive");
  expect_rejected(recipe_from_json({{"intactkv_cal", "yes"}}).status(), "intactkv_cal",
                  "must be a boolean");
  expect_rejected(recipe_from_json({{"intactkv_cal_steps", 1.5}}).status(), "intactkv_cal_steps",
                  "must be an integer");
}

TEST(CbqRecipe, OptionsFollowTheRecipe) {
  const ModelConfig& c = fx().fp.config;
  CalibRecipe r = recon(Reconstruction::kBlock, WeightSolver::kRtn);
  r.w_bits = 3;
  r.w_group = 32;
  r.a_bits = 8;
  r.cbq_window = 3;
  r.cbq_epochs = 5;
  r.cali_bsz = 2;
  r.seed = 9;
  CbqOptions o = cbq_options(r, c);
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
  EXPECT_FALSE(o.needs_online);
  r.reconstruction = Reconstruction::kCbq;
  r.weight_solver = WeightSolver::kLoraRounding;
  r.lora_rank = 6;
  r.cbq_overlap = 2;
  r.transform = Transform::kFlatQuant;
  o = cbq_options(r, c);
  EXPECT_EQ(o.window, 3);
  EXPECT_EQ(o.overlap, 2);
  EXPECT_TRUE(o.lora_rounding);
  EXPECT_EQ(o.rank, 6);
  EXPECT_TRUE(o.needs_online);  // FlatQuant keeps its Kronecker factors online
  EXPECT_TRUE(o.validate(c).code() == Code::kInvalidInput);  // ... and these carry none
  r.transform = Transform::kQuaRot;
  r.a_bits = 16;
  EXPECT_FALSE(cbq_options(r, c).needs_online);  // weight-only QuaRot folds completely
}

// ---------------------------------------------------------------- persistence

CalibRecipe quarot_w4a4(int64_t epochs) {
  CalibRecipe r = recon(Reconstruction::kCbq, WeightSolver::kLoraRounding);
  r.transform = Transform::kQuaRot;
  r.w_bits = 4;
  r.a_bits = 4;
  r.kv_bits = 4;
  r.a_clip = 0.9;
  r.kv_clip = 0.95;
  r.lora_rank = 4;
  r.cbq_epochs = epochs;
  r.intactkv = true;
  return r;
}

void expect_same_weights(const BlockWeightsT<float>& a, const BlockWeightsT<float>& b,
                         const std::string& at) {
  EXPECT_EQ(a.input_norm, b.input_norm) << at;
  EXPECT_EQ(a.post_norm, b.post_norm) << at;
  for (int p = 0; p < kNumProj; ++p) EXPECT_EQ(a.w[p], b.w[p]) << at << " " << p;
  for (int p = 0; p < 3; ++p) EXPECT_EQ(a.bias[p], b.bias[p]) << at << " bias " << p;
}

void expect_same_transforms(const BlockTransformsT<float>& a, const BlockTransformsT<float>& b,
                            const std::string& at) {
  EXPECT_EQ(a.a1, b.a1) << at;
  EXPECT_EQ(a.a2, b.a2) << at;
  EXPECT_EQ(a.u1, b.u1) << at;
  EXPECT_EQ(a.u2, b.u2) << at;
  EXPECT_EQ(a.d1, b.d1) << at;
  EXPECT_EQ(a.d2, b.d2) << at;
  EXPECT_EQ(a.po, b.po) << at;
  EXPECT_EQ(a.pk, b.pk) << at;
  EXPECT_EQ(a.pk_it, b.pk_it) << at;
  EXPECT_EQ(a.pv, b.pv) << at;
  EXPECT_EQ(a.ca, b.ca) << at;
}

void expect_same_act(const NativeActQuant& a, const NativeActQuant& b, const std::string& at) {
  EXPECT_EQ(a.bits, b.bits) << at;
  EXPECT_EQ(a.sym, b.sym) << at;
  EXPECT_EQ(a.group, b.group) << at;
  EXPECT_EQ(a.clip, b.clip) << at;
}

void expect_same_setup(const CbqSetup& a, const CbqSetup& b) {
  EXPECT_EQ(a.model.config.to_json(), b.model.config.to_json());
  EXPECT_EQ(a.model.embed, b.model.embed);
  EXPECT_EQ(a.model.final_norm, b.model.final_norm);
  EXPECT_EQ(a.model.lm_head, b.model.lm_head);
  ASSERT_EQ(a.model.layers.size(), b.model.layers.size());
  for (size_t l = 0; l < a.model.layers.size(); ++l)
    expect_same_weights(a.model.layers[l], b.model.layers[l], "layer " + std::to_string(l));
  ASSERT_EQ(a.online.size(), b.online.size());
  for (size_t l = 0; l < a.online.size(); ++l) {
    const std::string at = "online " + std::to_string(l);
    expect_same_transforms(a.online[l].online, b.online[l].online, at);
    for (int p = 0; p < kNumProj; ++p) expect_same_act(a.online[l].act[p], b.online[l].act[p], at);
    expect_same_act(a.online[l].k, b.online[l].k, at);
    expect_same_act(a.online[l].v, b.online[l].v, at);
  }
  EXPECT_EQ(a.N, b.N);
  EXPECT_EQ(a.T, b.T);
  EXPECT_EQ(a.x0, b.x0);
}

void expect_same_results(const std::vector<CbqLayerResult>& a,
                         const std::vector<CbqLayerResult>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string at = "result " + std::to_string(i);
    EXPECT_EQ(a[i].layer, b[i].layer) << at;
    for (int p = 0; p < kNumProj; ++p) {
      const QuantizedLinear &x = a[i].q[p], &y = b[i].q[p];
      EXPECT_EQ(x.out_features, y.out_features) << at;
      EXPECT_EQ(x.in_features, y.in_features) << at;
      EXPECT_EQ(x.spec.bits, y.spec.bits) << at;
      EXPECT_EQ(x.spec.group_size, y.spec.group_size) << at;
      EXPECT_EQ(x.spec.sym, y.spec.sym) << at;
      EXPECT_EQ(x.q, y.q) << at;
      EXPECT_EQ(x.scales, y.scales) << at;
      EXPECT_EQ(x.zeros, y.zeros) << at;
      EXPECT_EQ(x.g_idx, y.g_idx) << at;
    }
    EXPECT_EQ(a[i].act_clip, b[i].act_clip) << at;
    EXPECT_EQ(a[i].k_clip, b[i].k_clip) << at;
    EXPECT_EQ(a[i].v_clip, b[i].v_clip) << at;
    EXPECT_EQ(a[i].cfp_truncated, b[i].cfp_truncated) << at;
    EXPECT_EQ(a[i].smooth_attn, b[i].smooth_attn) << at;
    EXPECT_EQ(a[i].smooth_mlp, b[i].smooth_mlp) << at;
    EXPECT_EQ(a[i].smooth_down, b[i].smooth_down) << at;
    EXPECT_EQ(a[i].outlier_channels, b[i].outlier_channels) << at;
  }
}

TEST(CbqPersistence, SetupAndStateRoundTripExactly) {
  Fixture& f = fx();
  testing::TempDir d("qcal_cbq_io_");
  const CalibRecipe r = quarot_w4a4(1);
  auto setup = cbq_prepare(f.fp, f.calib, r, nullptr);
  ASSERT_TRUE(setup.is_ok()) << err(setup.status());
  const CbqSetup& s = setup.value();
  ASSERT_FALSE(s.online[0].online.po.empty());  // QuaRot W4A4KV4: online Hadamards
  ASSERT_FALSE(s.online[0].online.pk.empty());
  EXPECT_EQ(s.N, f.calib.count());
  EXPECT_EQ(s.x0.size(), static_cast<size_t>(s.N * kT * s.model.config.hidden_size));
  ASSERT_TRUE(save_cbq_setup(s, d.sub("setup")).is_ok());
  auto back = load_cbq_setup(d.sub("setup"));
  ASSERT_TRUE(back.is_ok()) << err(back.status());
  expect_same_setup(s, back.value());
  // Saving again replaces the directory (a retried capture task).
  ASSERT_TRUE(save_cbq_setup(back.value(), d.sub("setup")).is_ok());
  // A non-float32 storage dtype is restored (the tensors are stored exactly).
  CbqSetup bf = s;
  bf.model.config.torch_dtype = DType::kBF16;
  ASSERT_TRUE(save_cbq_setup(bf, d.sub("setup_bf16")).is_ok());
  auto bfb = load_cbq_setup(d.sub("setup_bf16"));
  ASSERT_TRUE(bfb.is_ok()) << err(bfb.status());
  expect_same_setup(bf, bfb.value());

  // State after window 0 of 2: one carried block with LoRA factors and clips.
  CbqState st = cbq_initial_state(s.x0, cbq_options(r, s));
  std::vector<CbqLayerResult> fin;
  ASSERT_TRUE(cbq_run_setup_window(s, r, &st, &fin, nullptr).is_ok());
  ASSERT_EQ(st.carried.size(), 1u);
  ASSERT_FALSE(st.carried[0].a1[kQ].empty());
  ASSERT_FALSE(st.carried[0].clip.k_max.empty());
  ASSERT_EQ(fin.size(), 1u);
  const std::string path = d.file("state1.safetensors");
  ASSERT_TRUE(save_cbq_state(st, fin, path).is_ok());
  std::vector<CbqLayerResult> fin2;
  auto st2 = load_cbq_state(path, &fin2);
  ASSERT_TRUE(st2.is_ok()) << err(st2.status());
  EXPECT_EQ(st2->next_window, st.next_window);
  EXPECT_EQ(st2->x_fp, st.x_fp);
  EXPECT_EQ(st2->x_q, st.x_q);
  ASSERT_EQ(st2->carried.size(), 1u);
  const CbqBlockParams &x = st.carried[0], &y = st2->carried[0];
  EXPECT_EQ(x.layer, y.layer);
  EXPECT_EQ(x.rho, y.rho);
  EXPECT_EQ(x.a1, y.a1);
  EXPECT_EQ(x.a2, y.a2);
  EXPECT_EQ(x.clip.act_max, y.clip.act_max);
  EXPECT_EQ(x.clip.act_min, y.clip.act_min);
  EXPECT_EQ(x.clip.k_max, y.clip.k_max);
  EXPECT_EQ(x.clip.v_min, y.clip.v_min);
  expect_same_results(fin, fin2);

  // Validation on load: another file kind, a code out of range, a truncated file.
  EXPECT_EQ(
      load_cbq_state(join_path(d.sub("setup"), "cbq_setup.safetensors"), &fin2).status().code(),
      Code::kCorrupt);
  std::vector<CbqLayerResult> bad = fin;
  bad[0].q[kK].q[3] = 200;  // 4-bit codes are 0..15
  ASSERT_TRUE(save_cbq_state(st, bad, d.file("bad.safetensors")).is_ok());
  const Status sb = load_cbq_state(d.file("bad.safetensors"), &fin2).status();
  EXPECT_EQ(sb.code(), Code::kCorrupt);
  EXPECT_NE(sb.message().find("finalized result 0 linear 1: a code is outside [0, 15]"),
            std::string::npos)
      << err(sb);
  EXPECT_FALSE(load_cbq_setup(d.sub("nonexistent")).is_ok());

  // The options without the setup's transforms are refused by the window trainer.
  CbqState st3 = cbq_initial_state(s.x0, cbq_options(r, s));
  std::vector<BlockWeightsT<float>> w01 = {s.model.layers[0], s.model.layers[1]};
  const CbqOptions bare = cbq_options(r, s.model.config);
  const Status sw = cbq_run_window(s.model.config, bare, cbq_plan(3, 2, 1), s.N, s.T,
                                   {&w01[0], &w01[1]}, &st3, nullptr, nullptr);
  EXPECT_EQ(sw.code(), Code::kInvalidInput);
  EXPECT_NE(sw.message().find("cbq_options(recipe, setup)"), std::string::npos) << err(sw);
  // cbq_finish refuses an incomplete set of results.
  const Status sf = cbq_finish(s, fin, r).status();
  EXPECT_EQ(sf.code(), Code::kInvalidInput);
  EXPECT_NE(sf.message().find("no result for layer 1"), std::string::npos) << err(sf);
}

void expect_same_native(const NativeModel& a, const NativeModel& b) {
  ASSERT_EQ(a.layers.size(), b.layers.size());
  EXPECT_EQ(a.embed, b.embed);
  EXPECT_EQ(a.lm_head, b.lm_head);
  EXPECT_EQ(a.final_norm, b.final_norm);
  EXPECT_EQ(a.w_bits, b.w_bits);
  EXPECT_EQ(a.w_group, b.w_group);
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const NativeLayer &x = a.layers[l], &y = b.layers[l];
    const std::string at = "layer " + std::to_string(l);
    EXPECT_EQ(x.input_norm, y.input_norm) << at;
    EXPECT_EQ(x.post_norm, y.post_norm) << at;
    for (int p = 0; p < kNumProj; ++p) {
      EXPECT_EQ(x.qw[p].data, y.qw[p].data) << at << " " << p;
      EXPECT_EQ(x.qw[p].scales, y.qw[p].scales) << at << " " << p;
      EXPECT_EQ(x.qw[p].group, y.qw[p].group) << at << " " << p;
      expect_same_act(x.act[p], y.act[p], at);
    }
    expect_same_act(x.k, y.k, at);
    expect_same_act(x.v, y.v, at);
    expect_same_transforms(x.online, y.online, at);
  }
  EXPECT_EQ(a.intact_prefix, b.intact_prefix);
  EXPECT_EQ(a.intact_k, b.intact_k);
  EXPECT_EQ(a.intact_v, b.intact_v);
  EXPECT_EQ(a.intact_logits, b.intact_logits);
}

TEST(CbqPersistence, WindowTasksThroughSaveLoadEqualCalibrate) {
  // The service's steps: capture (prepare, save), one task per window (load setup and
  // state, run the window, save the state with every finalized layer), assemble
  // (load, finish) — against calibrate() in one process.
  Fixture& f = fx();
  const CalibRecipe r = quarot_w4a4(3);
  CalibReport rep;
  auto one = calibrate(f.fp, f.calib, r, &rep);
  ASSERT_TRUE(one.is_ok()) << err(one.status());
  ASSERT_EQ(rep.windows.size(), 2u);
  EXPECT_EQ(rep.to_json()["windows"].size(), 2u);

  testing::TempDir d("qcal_cbq_tasks_");
  {
    auto s = cbq_prepare(f.fp, f.calib, r, nullptr);
    ASSERT_TRUE(s.is_ok()) << err(s.status());
    ASSERT_TRUE(save_cbq_setup(s.value(), d.sub("setup")).is_ok());
    const CbqState st0 = cbq_initial_state(s->x0, cbq_options(r, s->model.config));
    ASSERT_TRUE(save_cbq_state(st0, {}, d.file("state0")).is_ok());
  }
  int64_t w = 0;
  for (;; ++w) {
    auto s = load_cbq_setup(d.sub("setup"));
    ASSERT_TRUE(s.is_ok()) << err(s.status());
    std::vector<CbqLayerResult> fin;
    auto st = load_cbq_state(d.file("state" + std::to_string(w)), &fin);
    ASSERT_TRUE(st.is_ok()) << err(st.status());
    const CbqOptions o = cbq_options(r, s.value());
    if (st->next_window == static_cast<int64_t>(cbq_plan(3, o.window, o.overlap).size())) break;
    CbqWindowReport wr;
    ASSERT_TRUE(cbq_run_setup_window(s.value(), r, &st.value(), &fin, &wr).is_ok());
    EXPECT_EQ(wr.loss_hard, rep.windows[static_cast<size_t>(w)].loss_hard);
    ASSERT_TRUE(save_cbq_state(st.value(), fin, d.file("state" + std::to_string(w + 1))).is_ok());
  }
  EXPECT_EQ(w, 2);
  auto s = load_cbq_setup(d.sub("setup"));
  ASSERT_TRUE(s.is_ok());
  std::vector<CbqLayerResult> fin;
  ASSERT_TRUE(load_cbq_state(d.file("state" + std::to_string(w)), &fin).is_ok());
  ASSERT_EQ(fin.size(), 3u);
  auto two = cbq_finish(s.value(), fin, r);
  ASSERT_TRUE(two.is_ok()) << err(two.status());
  expect_same_native(one.value(), two.value());
  ASSERT_FALSE(two->intact_k.empty());
  const std::vector<float> la = native_logits(one.value(), f.eval.tokens.data(), 2, kT);
  const std::vector<float> lb = native_logits(two.value(), f.eval.tokens.data(), 2, kT);
  ASSERT_FALSE(la.empty());
  EXPECT_EQ(la, lb);
  for (float v : la) ASSERT_TRUE(std::isfinite(v));

  // Quality: QuaRot W4A4KV4 with CBQ + LoRA-Rounding vs QuaRot with RTN weights.
  CalibRecipe base = r;
  base.reconstruction = Reconstruction::kNone;
  base.weight_solver = WeightSolver::kRtn;
  base.intactkv = false;
  CalibRecipe cbq = r;
  cbq.intactkv = false;
  cbq.cbq_epochs = 20;
  auto nb = calibrate(f.fp, f.calib, base, nullptr);
  auto nc = calibrate(f.fp, f.calib, cbq, nullptr);
  ASSERT_TRUE(nb.is_ok() && nc.is_ok());
  const int64_t V = f.fp.config.vocab_size, B = f.eval.count();
  const double kb = mean_kl(native_logits(nb.value(), f.eval.tokens.data(), B, kT), f.fp_eval, V);
  const double kc = mean_kl(native_logits(nc.value(), f.eval.tokens.data(), B, kT), f.fp_eval, V);
  std::printf("QuaRot W4A4KV4 KL vs FP: RTN weights %.4f, CBQ(2,1) + LoRA-Rounding %.4f\n", kb, kc);
  EXPECT_LT(kc, kb);
}

// IntactKV "+Cal" in both pipelines: calibrate() without a reconstruction, and the
// reconstruction's prepare → windows → cbq_finish (the service's capture / window /
// assemble tasks) against calibrate() in one process.
TEST(CbqPipeline, IntactKvCalTrainsTheCacheInBothPipelines) {
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
  CalibRecipe plain;
  plain.transform = Transform::kQuaRot;
  plain.a_bits = plain.kv_bits = 4;
  plain.a_clip = 0.9;
  plain.kv_clip = 0.95;
  plain.intactkv = true;
  CalibRecipe cal = plain;
  cal.intactkv_cal = true;
  cal.intactkv_cal_steps = 24;
  cal.intactkv_cal_lr = 1e-2;
  std::vector<std::string> stages;
  CalibReport rep;
  auto a = calibrate(f.fp, f.calib, plain, nullptr);
  auto b = calibrate(f.fp, f.calib, cal, &rep,
                     [&](const std::string& st, int64_t, int64_t) { stages.push_back(st); });
  ASSERT_TRUE(a.is_ok() && b.is_ok()) << err(b.status());
  ASSERT_TRUE(rep.intactkv_cal.has_value());
  EXPECT_EQ(rep.intactkv_cal->steps, 24);
  EXPECT_LT(rep.intactkv_cal->loss_last, rep.intactkv_cal->loss_first);
  EXPECT_EQ(rep.to_json()["intactkv_cal"]["steps"], 24);
  EXPECT_EQ(std::count(stages.begin(), stages.end(), "intactkv-cal"), 13);  // every 2nd + last
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
              rep.intactkv_cal->loss_first, rep.intactkv_cal->loss_last, kla, klb);
  EXPECT_TRUE(std::isfinite(klb));

  // Reconstruction: calibrate() == the service's steps with the calibration data.
  CalibRecipe rc = quarot_w4a4(1);
  rc.cbq_window = 3;  // one window: quick
  rc.cbq_overlap = 0;
  rc.intactkv_cal = true;
  rc.intactkv_cal_steps = 3;
  CalibReport rep1;
  auto one = calibrate(f.fp, f.calib, rc, &rep1);
  ASSERT_TRUE(one.is_ok()) << err(one.status());
  ASSERT_TRUE(rep1.intactkv_cal.has_value());
  auto s = cbq_prepare(f.fp, f.calib, rc, nullptr);
  ASSERT_TRUE(s.is_ok());
  CbqState st = cbq_initial_state(s->x0, cbq_options(rc, s->model.config));
  std::vector<CbqLayerResult> fin;
  CbqWindowReport wr;
  ASSERT_TRUE(cbq_run_setup_window(s.value(), rc, &st, &fin, &wr).is_ok());
  ASSERT_EQ(fin.size(), 3u);
  // Without the data the assemble step refuses +Cal.
  auto no_data = cbq_finish(s.value(), fin, rc);
  ASSERT_FALSE(no_data.is_ok());
  EXPECT_NE(no_data.status().message().find("needs the calibration data"), std::string::npos)
      << err(no_data.status());
  CalibReport rep2;
  auto two = cbq_finish(s.value(), fin, rc, &f.calib, &rep2);
  ASSERT_TRUE(two.is_ok()) << err(two.status());
  expect_same_native(one.value(), two.value());
  ASSERT_TRUE(rep2.intactkv_cal.has_value());
  EXPECT_EQ(rep2.intactkv_cal->loss_last, rep1.intactkv_cal->loss_last);
  CalibRecipe rc_plain = rc;
  rc_plain.intactkv_cal = false;
  auto three = cbq_finish(s.value(), fin, rc_plain);
  ASSERT_TRUE(three.is_ok());
  EXPECT_NE(three->intact_k, two->intact_k);
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
  CalibRecipe r = recon(Reconstruction::kBlock, WeightSolver::kLoraRounding);
  r.w_bits = 4;
  r.w_group = 64;  // = H: q/k/v/o/gate/up have one group per row, down three
  r.lora_rank = 4;
  r.cbq_epochs = 2;
  ASSERT_TRUE(r.folds_completely());
  auto nm = calibrate(f.fp, f.calib, r, nullptr);
  ASSERT_TRUE(nm.is_ok()) << err(nm.status());
  testing::TempDir d("qcal_cbq_gptq_");
  auto rep = calibrate_to_dir(f.model_dir, f.calib, r, d.sub("out"), "gptq", false);
  ASSERT_TRUE(rep.is_ok()) << err(rep.status());
  EXPECT_EQ(rep->windows.size(), 3u);
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
  Fixture& f = fx();
  const int64_t V = f.fp.config.vocab_size;
  for (Transform t : {Transform::kNone, Transform::kSmoothQuant, Transform::kQuaRot,
                      Transform::kSpinQuant, Transform::kFlatQuant}) {
    CalibRecipe r = recon(Reconstruction::kBlock, WeightSolver::kLoraRounding);
    r.transform = t;
    r.a_bits = 4;
    r.kv_bits = 4;
    r.lora_rank = 4;
    r.cbq_epochs = 1;
    r.epochs = 1;
    r.spin_steps = 2;
    auto s = cbq_prepare(f.fp, f.calib, r, nullptr);
    ASSERT_TRUE(s.is_ok()) << transform_name(t) << ": " << err(s.status());
    const bool online =
        t == Transform::kQuaRot || t == Transform::kSpinQuant || t == Transform::kFlatQuant;
    EXPECT_EQ(cbq_options(r, s.value()).online.size(), online ? 3u : 0u) << transform_name(t);
    if (t == Transform::kFlatQuant) {
      EXPECT_FALSE(s->online[0].online.a1.empty());
    }
    auto nm = calibrate(f.fp, f.calib, r, nullptr);
    ASSERT_TRUE(nm.is_ok()) << transform_name(t) << ": " << err(nm.status());
    const double kl =
        mean_kl(native_logits(nm.value(), f.eval.tokens.data(), 4, kT),
                std::vector<float>(f.fp_eval.begin(), f.fp_eval.begin() + 4 * kT * V), V);
    std::printf("W4A4KV4 %-12s + block reconstruction (1 epoch): KL %.4f\n", transform_name(t), kl);
    EXPECT_TRUE(std::isfinite(kl)) << transform_name(t);
    EXPECT_LT(kl, 1.0) << transform_name(t);
  }
}

TEST(CbqPipeline, W2A16ReconstructionsBeatRtn) {
  // 3 layers, 8 × 32 calibration tokens, 20 epochs (40 steps per window); KL of the
  // native model's logits vs FP on 8 held-out sequences.
  Fixture& f = fx();
  const int64_t V = f.fp.config.vocab_size, B = f.eval.count();
  struct Row {
    const char* name;
    Reconstruction rc;
    WeightSolver ws;
    double kl = 0;
  };
  std::vector<Row> rows = {
      {"none (RTN)", Reconstruction::kNone, WeightSolver::kRtn},
      {"none (GPTQ)", Reconstruction::kNone, WeightSolver::kGptq},
      {"block, rtn", Reconstruction::kBlock, WeightSolver::kRtn},
      {"block, lora-rounding", Reconstruction::kBlock, WeightSolver::kLoraRounding},
      {"cbq(2,1), rtn", Reconstruction::kCbq, WeightSolver::kRtn},
      {"cbq(2,1), lora-rounding", Reconstruction::kCbq, WeightSolver::kLoraRounding}};
  std::printf("W2A16 g32, KL vs FP (nats/token):\n");
  for (Row& row : rows) {
    CalibRecipe r = recon(row.rc, row.ws);
    r.w_bits = 2;
    r.w_group = 32;
    r.lora_rank = 16;
    auto nm = calibrate(f.fp, f.calib, r, nullptr);
    ASSERT_TRUE(nm.is_ok()) << row.name << ": " << err(nm.status());
    row.kl = mean_kl(native_logits(nm.value(), f.eval.tokens.data(), B, kT), f.fp_eval, V);
    std::printf("  %-26s %.4f\n", row.name, row.kl);
    ASSERT_TRUE(std::isfinite(row.kl));
  }
  const double rtn = rows[0].kl;
  for (size_t i = 2; i < rows.size(); ++i) EXPECT_LT(rows[i].kl, rtn) << rows[i].name;
  // LoRA-Rounding learns more than the step sizes alone.
  EXPECT_LT(rows[5].kl, rows[4].kl);
  EXPECT_LT(rows[3].kl, rows[2].kl);
}

// ---------------------------------------------------------------- sweep (opt-in)

// QCAL_CBQ_RECIPE_SWEEP=<fixture dir> (e.g. tests/fixtures/grammar-tiny): KL vs FP on
// its eval split for option variants the recipe does not expose (slow; not a test).
TEST(CbqSweep, FixtureOptions) {
  const char* dir = std::getenv("QCAL_CBQ_RECIPE_SWEEP");
  if (!dir) GTEST_SKIP() << "set QCAL_CBQ_RECIPE_SWEEP=<fixture model dir>";
  const std::string model(dir);
  const std::string data = model + "/../grammar-data/";
  auto fp = load_fp_model(model);
  ASSERT_TRUE(fp.is_ok()) << err(fp.status());
  const ModelConfig& c = fp->config;
  const int64_t T = 128;
  const int64_t n = std::getenv("QCAL_SWEEP_N") ? std::atoi(std::getenv("QCAL_SWEEP_N")) : 32;
  auto calib = load_token_sequences(data + "calib.u32", T, c.vocab_size, n);
  auto eval = load_token_sequences(data + "eval.u32", T, c.vocab_size, 32);
  ASSERT_TRUE(calib.is_ok() && eval.is_ok());
  const std::vector<float> ref = fp_model_logits(fp.value(), eval->tokens.data(), eval->count(), T);
  const int bits = std::getenv("QCAL_SWEEP_BITS") ? std::atoi(std::getenv("QCAL_SWEEP_BITS")) : 4;
  const int abits =
      std::getenv("QCAL_SWEEP_ABITS") ? std::atoi(std::getenv("QCAL_SWEEP_ABITS")) : 16;
  const int64_t group =
      std::getenv("QCAL_SWEEP_GROUP") ? std::atoi(std::getenv("QCAL_SWEEP_GROUP")) : -1;
  struct Variant {
    const char* name;
    WeightSolver ws;
    double lr_lora;
    int rank;
    double reg;
    bool follow = false;
  };
  const std::vector<Variant> vs = {
      {"rtn (step sizes)", WeightSolver::kRtn, 0, 0, 0.01},
      {"lora lr 2e-2 r16", WeightSolver::kLoraRounding, 2e-2, 16, 0.01},
      {"lora lr 5e-3 r16", WeightSolver::kLoraRounding, 5e-3, 16, 0.01},
      {"lora lr 1e-3 r16", WeightSolver::kLoraRounding, 1e-3, 16, 0.01},
      {"lora lr 5e-3 r4", WeightSolver::kLoraRounding, 5e-3, 4, 0.01},
      {"lora lr 2e-2 reg 0", WeightSolver::kLoraRounding, 2e-2, 16, 0},
      {"lora 2e-2 follow", WeightSolver::kLoraRounding, 2e-2, 16, 0.01, true},
      {"lora 5e-3 follow", WeightSolver::kLoraRounding, 5e-3, 16, 0.01, true},
      {"lora 1e-3 follow", WeightSolver::kLoraRounding, 1e-3, 16, 0.01, true}};
  for (const Variant& v : vs) {
    CalibRecipe r = recon(Reconstruction::kBlock, v.ws);
    r.w_bits = bits;
    r.a_bits = abits;
    r.kv_bits = abits;
    r.w_group = group;
    r.lora_rank = v.rank;
    r.cbq_epochs = 8;
    auto s = cbq_prepare(fp.value(), calib.value(), r, nullptr);
    ASSERT_TRUE(s.is_ok());
    CbqOptions o = cbq_options(r, s.value());
    o.lr_lora = v.lr_lora;
    o.reg_lambda = v.reg;
    o.v0_follows_scale = v.follow;
    const auto plan = cbq_plan(c.num_hidden_layers, o.window, o.overlap);
    CbqState st = cbq_initial_state(s->x0, o);
    std::vector<CbqLayerResult> fin;
    std::printf("%-22s", v.name);
    while (st.next_window < static_cast<int64_t>(plan.size())) {
      const CbqWindow& w = plan[static_cast<size_t>(st.next_window)];
      std::vector<BlockWeightsT<float>> blocks(s->model.layers.begin() + w.first,
                                               s->model.layers.begin() + w.last + 1);
      std::vector<BlockWeightsT<float>*> ptrs;
      for (auto& b : blocks) ptrs.push_back(&b);
      CbqWindowReport rep;
      ASSERT_TRUE(cbq_run_window(c, o, plan, s->N, s->T, ptrs, &st, &fin, &rep).is_ok());
      std::printf(" %.4f->%.4f", rep.loss_hard_init, rep.loss_hard);
    }
    auto nm = cbq_finish(s.value(), fin, r);
    ASSERT_TRUE(nm.is_ok());
    std::printf("  KL %.4f\n",
                mean_kl(native_logits(nm.value(), eval->tokens.data(), eval->count(), T), ref,
                        c.vocab_size));
  }
}

}  // namespace
}  // namespace qcal::calib

#include "worker/pipeline.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/data.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/method_registry.h"
#include "common/path_policy.h"
#include "common/plan.h"
#include "common/sha256.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "worker/calib/block.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/method.h"
#include "worker/calib/native.h"
#include "worker/engine/model.h"
#include "worker/engine/qformats.h"
#include "worker/publish.h"

namespace qcal {

namespace fs = std::filesystem;
using calib::ActivationSource;
using calib::BlockInputs;
using calib::BlockResult;
using calib::Deployed;
using calib::Fitted;
using nlohmann::json;

namespace {

// ---------------------------------------------------------------- context helpers

void say(const TaskContext& ctx, const std::string& line) {
  if (ctx.group && !ctx.group->is_root()) return;
  if (ctx.log) {
    ctx.log(line);
  } else {
    LOG_INFO << ctx.job_id << "/" << ctx.task.id << ": " << line;
  }
}

bool stopping(const TaskContext& ctx) { return ctx.cancel && ctx.cancel->load(); }

bool is_root(const TaskContext& ctx) { return !ctx.group || ctx.group->is_root(); }

Result<int64_t> int_param(const TaskDef& t, const char* name) {
  if (!t.params.is_object() || !t.params.contains(name) || !t.params[name].is_number_integer())
    return invalid_input("task " + t.id + ": params." + name + " must be an integer (params " +
                         t.params.dump() + ")");
  return t.params[name].get<int64_t>();
}
bool bool_param(const TaskDef& t, const char* name) {
  return t.params.is_object() && t.params.contains(name) && t.params[name].is_boolean() &&
         t.params[name].get<bool>();
}
std::string str_param(const TaskDef& t, const char* name) {
  if (t.params.is_object() && t.params.contains(name) && t.params[name].is_string())
    return t.params[name].get<std::string>();
  return "";
}

// Artifact `key` of dep `dep` (which must be among the task's deps).
Result<ArtifactRef> dep_ref(const TaskContext& ctx, const std::string& dep,
                            const std::string& key) {
  auto it = ctx.deps.find(dep);
  if (it == ctx.deps.end())
    return invalid_input("task " + ctx.task.id + ": no result for dep " + dep);
  const json& r = it->second;
  if (!r.is_object() || !r.contains("artifacts") || !r["artifacts"].is_object() ||
      !r["artifacts"].contains(key))
    return invalid_input("task " + ctx.task.id + ": dep " + dep + " has no artifact '" + key + "'");
  auto ref = ArtifactRef::from_json(r["artifacts"][key]);
  if (!ref.is_ok()) return ref.status().with_context("dep " + dep + " artifact " + key);
  return ref;
}

std::string fp_producer(int64_t l) {
  return l == 0 ? std::string(plan::kEmbed) : plan::numbered(plan::kCapture, l - 1);
}

std::string artifact_rel(const TaskContext& ctx, const std::string& name) {
  return task_artifact_path(ctx.job_id, ctx.task.id, ctx.attempt, name);
}

// A readable activation stream of a dep's artifact (verified by the worker before the
// task started: find_corrupt_input).
Result<std::unique_ptr<ArtifactStore::ActivationFileReader>> open_acts(const TaskContext& ctx,
                                                                       const std::string& dep,
                                                                       const std::string& key) {
  QCAL_ASSIGN_OR_RETURN(ArtifactRef ref, dep_ref(ctx, dep, key));
  return ctx.store->open_activations(ref, /*verify=*/false);
}

Result<Fitted> load_fitted_dep(const TaskContext& ctx, const std::string& dep,
                               const std::string& key) {
  QCAL_ASSIGN_OR_RETURN(ArtifactRef ref, dep_ref(ctx, dep, key));
  QCAL_RETURN_IF_ERROR(ctx.store->verify(ref));
  return calib::load_fitted(ctx.store->absolute(ref.path));
}

// Writes a Fitted as artifact `name` of this task.
Result<ArtifactRef> write_fitted(const TaskContext& ctx, const std::string& name, const Fitted& f) {
  const std::string rel = artifact_rel(ctx, name + ".safetensors");
  const std::string path = ctx.store->absolute(rel);
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  if (ec) return io_error(path + ": " + ec.message());
  QCAL_RETURN_IF_ERROR(calib::save_fitted(f, path));
  QCAL_ASSIGN_OR_RETURN(FileDigest d, sha256_file(path));
  return ArtifactRef{rel, d.sha256, d.bytes};
}

Result<ArtifactRef> write_block(const TaskContext& ctx, const BlockResult& b,
                                const ModelConfig& c) {
  const std::string rel = artifact_rel(ctx, plan::block_artifact(b.layer) + ".safetensors");
  const std::string path = ctx.store->absolute(rel);
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  if (ec) return io_error(path + ": " + ec.message());
  QCAL_RETURN_IF_ERROR(calib::save_block_result(b, c, path));
  QCAL_ASSIGN_OR_RETURN(FileDigest d, sha256_file(path));
  return ArtifactRef{rel, d.sha256, d.bytes};
}

// A directory for a task's scratch files (removed by the caller's guard).
struct ScratchDir {
  std::string path;
  ~ScratchDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};
Result<std::string> make_scratch(const TaskContext& ctx, ScratchDir* guard) {
  const std::string rank = ctx.group ? std::to_string(ctx.group->rank()) : "0";
  guard->path = ctx.store->absolute(artifact_rel(ctx, "scratch-r" + rank));
  std::error_code ec;
  fs::create_directories(guard->path, ec);
  if (ec) return io_error(guard->path + ": " + ec.message());
  return guard->path;
}

// The job's calibration sequences; says so when there are fewer than asked for.
Result<TokenSequences> load_calib_data(const TaskContext& ctx, int64_t vocab) {
  const DataSpec& d = ctx.spec.calib;
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib,
                        load_token_sequences(d.path, d.seqlen, vocab, d.nsamples));
  if (calib.count() == 0)
    return invalid_input(d.path + ": calibration data holds no complete sequence");
  if (d.nsamples > 0 && calib.count() < d.nsamples)
    say(ctx, d.path + " holds " + std::to_string(calib.count()) + " sequences of " +
                 std::to_string(d.seqlen) + " tokens; using them all (asked for " +
                 std::to_string(d.nsamples) + ")");
  return calib;
}

// Data-parallel sums over the task's rank group (empty functions for one rank).
calib::SumFn sum_fn(const TaskContext& ctx) {
  if (!ctx.group || !ctx.group->multi()) return nullptr;
  RankGroup* g = ctx.group;
  return [g](double* data, int64_t n) { return g->allreduce_sum(data, n); };
}
// A method input's data-parallel fields (rank, ranks, sum) from the task's group.
template <typename In>
void set_ranks(const TaskContext& ctx, In* in) {
  in->rank = ctx.group ? ctx.group->rank() : 0;
  in->ranks = ctx.group ? ctx.group->size() : 1;
  in->sum = sum_fn(ctx);
}
calib::SumFloatFn sum_f_fn(const TaskContext& ctx) {
  if (!ctx.group || !ctx.group->multi()) return nullptr;
  RankGroup* g = ctx.group;
  return [g](float* data, int64_t n) { return g->allreduce_sum(data, n); };
}

// Everything a block task opens once.
struct Common {
  std::unique_ptr<LlamaModel> model;
  ModelConfig c;
  const Recipe* r = nullptr;
  const calib::TransformMethod* transform = nullptr;
  const MethodRow* trow = nullptr;
  std::optional<Fitted> global;  // spinquant's rotations
  std::vector<double> R1;        // the residual rotation (empty: none)
};

Result<Common> open_common(const TaskContext& ctx, bool need_global) {
  Common k;
  QCAL_ASSIGN_OR_RETURN(k.model, LlamaModel::open(ctx.spec.model));
  k.c = k.model->config();
  k.r = &ctx.spec.recipe;
  QCAL_RETURN_IF_ERROR(k.r->validate_for(k.c, /*allow_partial_groups=*/true));
  k.transform = calib::transform_method(k.r->transform());
  k.trow = find_method_row(k.r->transform(), MethodKind::kTransform);
  if (!k.transform || !k.trow)
    return internal_error("transform " + k.r->transform() + " is not linked into this worker");
  if (need_global && k.trow->whole_model) {
    QCAL_ASSIGN_OR_RETURN(Fitted g, load_fitted_dep(ctx, k.trow->name, "rotations"));
    k.global = std::move(g);
  }
  k.R1 = k.transform->residual_rotation(k.c, *k.r, k.global ? &*k.global : nullptr);
  return k;
}

Result<calib::BlockWeightsT<float>> load_block(const Common& k, int64_t l) {
  QCAL_ASSIGN_OR_RETURN(LayerWeights w, k.model->load_layer(l));
  return calib::to_block_weights(std::move(w));
}

// The deployed FP form of layer l: the checkpoint's weights under the transform (its
// block task's fit, the whole-model fit, the capture's statistics).
struct BlockSetup {
  calib::BlockWeightsT<float> w;
  std::optional<calib::ActStats> stats;
  Fitted fitted;
  Deployed dl;
};
Result<BlockSetup> deploy_layer(const TaskContext& ctx, const Common& k, int64_t l) {
  BlockSetup s;
  QCAL_ASSIGN_OR_RETURN(s.w, load_block(k, l));
  if (k.trow->needs.act_stats) {
    QCAL_ASSIGN_OR_RETURN(Fitted f,
                          load_fitted_dep(ctx, plan::numbered(plan::kCapture, l), "stats"));
    QCAL_ASSIGN_OR_RETURN(calib::ActStats st, calib::stats_from_fitted(f, k.c));
    s.stats = std::move(st);
  }
  if (k.trow->block_task) {
    QCAL_ASSIGN_OR_RETURN(s.fitted,
                          load_fitted_dep(ctx, plan::numbered(k.trow->name, l), "params"));
  }
  BlockInputs in;
  in.c = &k.c;
  in.r = k.r;
  in.layer = l;
  in.w = &s.w;
  in.stats = s.stats ? &*s.stats : nullptr;
  in.global = k.global ? &*k.global : nullptr;
  in.R1 = &k.R1;
  QCAL_ASSIGN_OR_RETURN(s.dl, k.transform->deploy(in, s.fitted));
  return s;
}

// IntactKV: the FP prefix states entering layer l (P, H), in the model's residual basis.
Result<std::vector<float>> prefix_states(const TaskContext& ctx, const Common& k, int64_t l) {
  QCAL_ASSIGN_OR_RETURN(auto rd, open_acts(ctx, fp_producer(l), "prefix"));
  const int64_t P = rd->seqlen(), H = k.c.hidden_size;
  std::vector<float> xp(static_cast<size_t>(P * H));
  QCAL_RETURN_IF_ERROR(rd->read(0, 1, xp.data()));
  calib::rotate_rows(xp.data(), P, H, k.R1);
  return xp;
}

void add_ref(json* arts, const std::string& name, const ArtifactRef& ref) {
  (*arts)[name] = ref.to_json();
}

// ---------------------------------------------------------------- embed

Result<json> run_embed(const TaskContext& ctx) {
  QCAL_ASSIGN_OR_RETURN(auto model, LlamaModel::open(ctx.spec.model));
  const ModelConfig& c = model->config();
  const Recipe& r = ctx.spec.recipe;
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib_data(ctx, c.vocab_size));
  const int64_t N = calib.count(), T = calib.seqlen, H = c.hidden_size;
  const bool mean_sub = r.b("embed_mean_sub");
  auto sub_mean = [&](float* x, int64_t rows) {
    if (!mean_sub) return;
    for (int64_t i = 0; i < rows; ++i) {
      float* e = x + i * H;
      double mean = 0.0;
      for (int64_t j = 0; j < H; ++j) mean += e[j];
      mean /= static_cast<double>(H);
      for (int64_t j = 0; j < H; ++j) e[j] = static_cast<float>(e[j] - mean);
    }
  };
  json arts = json::object();
  QCAL_ASSIGN_OR_RETURN(auto w,
                        ctx.store->create_activations(artifact_rel(ctx, "x.safetensors"), N, T, H));
  const int64_t batch = std::max<int64_t>(1, r.batch());
  for (int64_t s0 = 0; s0 < N; s0 += batch) {
    if (stopping(ctx)) return cancelled("embed");
    const int64_t nb = std::min(batch, N - s0);
    QCAL_ASSIGN_OR_RETURN(Tensor x, model->embed(calib, s0, nb));
    sub_mean(x.ptr(), nb * T);
    QCAL_RETURN_IF_ERROR(w->append(x.ptr(), nb));
  }
  QCAL_ASSIGN_OR_RETURN(ArtifactRef xr, w->finish());
  add_ref(&arts, "x", xr);
  if (r.intactkv()) {
    TokenSequences p;
    p.tokens = r.intactkv_prefix_for(c);
    p.seqlen = static_cast<int64_t>(p.tokens.size());
    QCAL_ASSIGN_OR_RETURN(Tensor xp, model->embed(p, 0, 1));
    sub_mean(xp.ptr(), p.seqlen);
    QCAL_ASSIGN_OR_RETURN(auto pw, ctx.store->create_activations(
                                       artifact_rel(ctx, "prefix.safetensors"), 1, p.seqlen, H));
    QCAL_RETURN_IF_ERROR(pw->append(xp.ptr(), 1));
    QCAL_ASSIGN_OR_RETURN(ArtifactRef pr, pw->finish());
    add_ref(&arts, "prefix", pr);
  }
  say(ctx, "embedded " + std::to_string(N) + " x " + std::to_string(T) + " tokens");
  return json{{"artifacts", arts}, {"sequences", N}, {"seqlen", T}};
}

// ---------------------------------------------------------------- capture

Result<json> run_capture(const TaskContext& ctx) {
  QCAL_ASSIGN_OR_RETURN(int64_t l, int_param(ctx.task, "layer"));
  QCAL_ASSIGN_OR_RETURN(auto model, LlamaModel::open(ctx.spec.model));
  const ModelConfig& c = model->config();
  const Recipe& r = ctx.spec.recipe;
  if (l < 0 || l >= c.num_hidden_layers)
    return invalid_input("task " + ctx.task.id + ": layer " + std::to_string(l) +
                         " outside the model");
  QCAL_ASSIGN_OR_RETURN(LayerWeights lw, model->load_layer(l));
  const calib::BlockWeightsT<float> w = calib::to_block_weights(std::move(lw));
  static const calib::BlockTransformsT<float> kNoT;
  static const calib::BlockQuantSpec kNoQ;
  static const calib::BlockClipT<float> kNoC;
  calib::QBlock<float> qb(c, &w, &kNoT, &kNoQ, &kNoC);
  json arts = json::object();
  if (bool_param(ctx.task, "fp")) {
    QCAL_ASSIGN_OR_RETURN(auto in, open_acts(ctx, fp_producer(l), "x"));
    QCAL_ASSIGN_OR_RETURN(
        auto out, ctx.store->create_activations(artifact_rel(ctx, "x.safetensors"), in->sequences(),
                                                in->seqlen(), in->width()));
    calib::ActStats st;
    st.init(c.hidden_size, c.intermediate_size);
    const bool stats = bool_param(ctx.task, "stats");
    LinearInputHook hook;
    if (stats)
      hook = [&st](const std::string& proj, const float* x, int64_t rows, int64_t cols) {
        st.update(proj, x, rows, cols);
      };
    QCAL_RETURN_IF_ERROR(calib::stream_block(qb, *in, out.get(), r.batch(), hook));
    if (stopping(ctx)) return cancelled(ctx.task.id);
    QCAL_ASSIGN_OR_RETURN(ArtifactRef xr, out->finish());
    add_ref(&arts, "x", xr);
    if (stats) {
      QCAL_ASSIGN_OR_RETURN(ArtifactRef sr, write_fitted(ctx, "stats", calib::stats_to_fitted(st)));
      add_ref(&arts, "stats", sr);
    }
  }
  if (bool_param(ctx.task, "prefix")) {
    QCAL_ASSIGN_OR_RETURN(auto in, open_acts(ctx, fp_producer(l), "prefix"));
    const int64_t P = in->seqlen(), H = c.hidden_size;
    std::vector<float> x(static_cast<size_t>(P * H)), y(x.size());
    QCAL_RETURN_IF_ERROR(in->read(0, 1, x.data()));
    qb.forward(x.data(), y.data(), 1, P);
    QCAL_ASSIGN_OR_RETURN(
        auto out, ctx.store->create_activations(artifact_rel(ctx, "prefix.safetensors"), 1, P, H));
    QCAL_RETURN_IF_ERROR(out->append(y.data(), 1));
    QCAL_ASSIGN_OR_RETURN(ArtifactRef pr, out->finish());
    add_ref(&arts, "prefix", pr);
  }
  say(ctx, "captured layer " + std::to_string(l + 1) + "/" + std::to_string(c.num_hidden_layers));
  return json{{"artifacts", arts}, {"layer", l}};
}

// ---------------------------------------------------------------- transform (block task)

Result<json> run_transform(const TaskContext& ctx) {
  QCAL_ASSIGN_OR_RETURN(int64_t l, int_param(ctx.task, "layer"));
  QCAL_ASSIGN_OR_RETURN(Common k, open_common(ctx, /*need_global=*/true));
  if (l < 0 || l >= k.c.num_hidden_layers)
    return invalid_input("task " + ctx.task.id + ": layer " + std::to_string(l) +
                         " outside the model");
  QCAL_ASSIGN_OR_RETURN(calib::BlockWeightsT<float> w, load_block(k, l));
  QCAL_ASSIGN_OR_RETURN(Fitted sf,
                        load_fitted_dep(ctx, plan::numbered(plan::kCapture, l), "stats"));
  QCAL_ASSIGN_OR_RETURN(calib::ActStats st, calib::stats_from_fitted(sf, k.c));
  QCAL_ASSIGN_OR_RETURN(auto x, open_acts(ctx, fp_producer(l), "x"));
  QCAL_ASSIGN_OR_RETURN(auto y, open_acts(ctx, plan::numbered(plan::kCapture, l), "x"));
  // The recipe's micro-batch, or the planner's smaller one for this task.
  Recipe r = *k.r;
  if (ctx.task.params.contains("micro") && ctx.task.params["micro"].is_number_integer())
    r.with("batch", std::max<int64_t>(1, ctx.task.params["micro"].get<int64_t>()));
  BlockInputs in;
  in.c = &k.c;
  in.r = &r;
  in.layer = l;
  in.w = &w;
  in.stats = &st;
  in.x = x.get();
  in.y = y.get();
  in.global = k.global ? &*k.global : nullptr;
  in.R1 = &k.R1;
  set_ranks(ctx, &in);
  in.sum_f = sum_f_fn(ctx);
  in.should_stop = [&ctx] { return stopping(ctx); };
  json report = json::object();
  auto fitted = k.transform->fit(in, &report);
  if (!fitted.is_ok()) {
    if (stopping(ctx)) return cancelled(ctx.task.id + ": " + fitted.status().message());
    return fitted.status();
  }
  if (!is_root(ctx)) return json::object();
  QCAL_ASSIGN_OR_RETURN(ArtifactRef pr, write_fitted(ctx, "params", *fitted));
  std::ostringstream line;
  line << k.trow->name << " layer " << l << ": loss " << report.value("loss_first", 0.0) << " -> "
       << report.value("loss_last", 0.0);
  say(ctx, line.str());
  report["layer"] = l;
  return json{{"artifacts", {{"params", pr.to_json()}}}, {"report", report}};
}

// ---------------------------------------------------------------- learn (whole model)

// IntactKV "+Cal" on the whole quantized model (in memory): the FP twin from the
// deployed FP blocks, the quantized model from the block results.
Result<json> run_intactkv_cal(const TaskContext& ctx);

Result<json> run_learn(const TaskContext& ctx) {
  const std::string method = str_param(ctx.task, "method");
  if (method == "intactkv") return run_intactkv_cal(ctx);
  const calib::TransformMethod* t = calib::transform_method(method);
  if (!t) return invalid_input("task " + ctx.task.id + ": no whole-model method '" + method + "'");
  QCAL_ASSIGN_OR_RETURN(ModelConfig c, load_model_config(join_path(ctx.spec.model, "config.json")));
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib_data(ctx, c.vocab_size));
  calib::WholeModelInputs in;
  in.model_dir = ctx.spec.model;
  in.calib = &calib;
  in.r = &ctx.spec.recipe;
  in.progress = [&ctx](const std::string& stage, int64_t i, int64_t n) {
    if (i % std::max<int64_t>(1, n / 10) == 0 || i + 1 == n)
      say(ctx, stage + " " + std::to_string(i + 1) + "/" + std::to_string(n));
  };
  set_ranks(ctx, &in);
  json report = json::object();
  QCAL_ASSIGN_OR_RETURN(Fitted f, t->learn(in, &report));
  if (!is_root(ctx)) return json::object();
  QCAL_ASSIGN_OR_RETURN(ArtifactRef ref, write_fitted(ctx, "rotations", f));
  return json{{"artifacts", {{"rotations", ref.to_json()}}}, {"report", report}};
}

// ---------------------------------------------------------------- quantize

Result<json> run_quantize(const TaskContext& ctx) {
  if (!ctx.task.params.contains("layers") || !ctx.task.params["layers"].is_array() ||
      ctx.task.params["layers"].size() != 2)
    return invalid_input("task " + ctx.task.id + ": params.layers must be [first, end)");
  const int64_t l0 = ctx.task.params["layers"][0].get<int64_t>();
  const int64_t l1 = ctx.task.params["layers"][1].get<int64_t>();
  const std::string input = str_param(ctx.task, "input");
  QCAL_ASSIGN_OR_RETURN(Common k, open_common(ctx, /*need_global=*/true));
  const ModelConfig& c = k.c;
  // The recipe's micro-batch, or the planner's smaller one for this task.
  Recipe r = *k.r;
  if (ctx.task.params.contains("micro") && ctx.task.params["micro"].is_number_integer())
    r.with("batch", std::max<int64_t>(1, ctx.task.params["micro"].get<int64_t>()));
  const int64_t L = c.num_hidden_layers, H = c.hidden_size;
  if (l0 < 0 || l1 <= l0 || l1 > L)
    return invalid_input("task " + ctx.task.id + ": layers [" + std::to_string(l0) + ", " +
                         std::to_string(l1) + ") outside [0, " + std::to_string(L) + ")");
  const calib::WeightSolverMethod* solver = calib::weight_solver_method(r.weight_solver());
  if (!solver)
    return internal_error("weight solver " + r.weight_solver() + " is not linked into this worker");
  const bool quantize = r.w_bits() < 16;
  const bool needs_x = quantize && solver->needs_inputs();
  const bool sequential = input == "quantized";
  const int rank = ctx.group ? ctx.group->rank() : 0, ranks = ctx.group ? ctx.group->size() : 1;

  // The block's input stream: the quantized path (sequential) or FP inputs (parallel),
  // in the residual basis of the transform.
  std::unique_ptr<ArtifactStore::ActivationFileReader> file_in;
  std::unique_ptr<calib::RotatedSource> rotated;
  const ActivationSource* x = nullptr;
  if (needs_x) {
    std::string dep, key = "x";
    bool rotate = true;
    if (sequential) {
      dep = l0 == 0 ? std::string(plan::kEmbed) : plan::numbered(plan::kQuantize, -1);
      // The previous quantize task: the dep that is a quantize task.
      for (const auto& d : ctx.task.deps)
        if (d.rfind(std::string(plan::kQuantize) + "-", 0) == 0) dep = d;
      rotate = dep == plan::kEmbed;  // the quantize tasks' outputs are rotated already
    } else {
      dep = fp_producer(l0);
    }
    QCAL_ASSIGN_OR_RETURN(file_in, open_acts(ctx, dep, key));
    x = file_in.get();
    if (rotate && !k.R1.empty()) {
      rotated = std::make_unique<calib::RotatedSource>(x, &k.R1);
      x = rotated.get();
    }
  }
  ScratchDir scratch;
  std::unique_ptr<calib::ActivationBuffer> cur;  // the next layer's input inside this task
  json arts = json::object(), layers = json::array();
  const bool write_x = sequential && l1 < L;
  for (int64_t l = l0; l < l1; ++l) {
    if (stopping(ctx)) return cancelled(ctx.task.id + " before layer " + std::to_string(l));
    const double tl = steady_seconds();
    QCAL_ASSIGN_OR_RETURN(BlockSetup s, deploy_layer(ctx, k, l));
    Deployed& dl = s.dl;
    // The checkpoint's weights are deploy's input only: the solvers read dl.
    s.w = calib::BlockWeightsT<float>();
    BlockInputs in;
    in.c = &c;
    in.r = &r;
    in.layer = l;
    in.w = nullptr;
    in.stats = s.stats ? &*s.stats : nullptr;
    in.global = k.global ? &*k.global : nullptr;
    in.R1 = &k.R1;
    in.rank = rank;
    in.ranks = ranks;
    in.sum = sum_fn(ctx);
    in.sum_f = sum_f_fn(ctx);
    json rep = json::object();
    const calib::BlockWeightsT<float> fp_w = dl.w;  // the deployed FP weights
    std::array<QuantizedLinear, calib::kNumProj> ql;
    if (quantize) {
      // Every rank accumulates Hessians on its shard of the sequences.
      std::unique_ptr<calib::ShardSource> shard;
      const ActivationSource* xs = x;
      if (x && ranks > 1) {
        const RankGroup::Shard sh = RankGroup::shard_of(x->sequences(), rank, ranks);
        shard = std::make_unique<calib::ShardSource>(x, sh.begin, sh.count());
        xs = shard.get();
      }
      QCAL_RETURN_IF_ERROR(solver->round(in, dl, xs, &ql, &rep));
    }
    BlockResult b = calib::block_result(l, dl, quantize ? &ql : nullptr, r.w_bits());
    if (r.intactkv()) {
      QCAL_ASSIGN_OR_RETURN(std::vector<float> xp, prefix_states(ctx, k, l));
      Deployed fp_dl = dl;
      fp_dl.w = fp_w;
      calib::prefix_kv(c, fp_dl, xp.data(), static_cast<int64_t>(xp.size()) / H, &b.prefix_k,
                       &b.prefix_v);
    }
    // The next layer's input (sequential GPTQ), and the block's output error on it:
    // ‖Y_fp − Y_q‖² / ‖Y_fp‖² with both from the same (quantized-path) input.
    if (!sequential && needs_x && l + 1 < l1) {
      // Parallel mode: the next block calibrates on its own FP inputs.
      QCAL_ASSIGN_OR_RETURN(file_in, open_acts(ctx, fp_producer(l + 1), "x"));
      x = file_in.get();
      if (!k.R1.empty()) {
        rotated = std::make_unique<calib::RotatedSource>(x, &k.R1);
        x = rotated.get();
      }
    } else if (x && (l + 1 < l1 || is_root(ctx))) {
      static const calib::BlockClipT<float> kNoClip;
      calib::QBlock<float> qq(c, &dl.w, &dl.online, &dl.q, &kNoClip);
      calib::Deployed fpd = dl;
      fpd.w = fp_w;
      calib::BlockQuantSpec off;
      calib::QBlock<float> qf(c, &fpd.w, &fpd.online, &off, &kNoClip);
      std::unique_ptr<calib::ActivationBuffer> next_buf;
      std::unique_ptr<ArtifactStore::ActivationFileWriter> next_file;
      calib::ActivationSink* sink = nullptr;
      if (l + 1 == l1) {
        if (is_root(ctx) && write_x) {
          QCAL_ASSIGN_OR_RETURN(next_file,
                                ctx.store->create_activations(artifact_rel(ctx, "x.safetensors"),
                                                              x->sequences(), x->seqlen(), H));
          sink = next_file.get();
        }
      } else {
        if (scratch.path.empty()) QCAL_RETURN_IF_ERROR(make_scratch(ctx, &scratch).status());
        QCAL_ASSIGN_OR_RETURN(next_buf,
                              calib::ScratchActivations::create(scratch.path, x->seqlen(), H));
        sink = next_buf.get();
      }
      const int64_t N = x->sequences(), T = x->seqlen(), batch = std::max<int64_t>(1, r.batch());
      std::vector<float> xb(static_cast<size_t>(std::min(batch, N) * T * H)), yq(xb.size()),
          yf(xb.size());
      double num = 0.0, den = 0.0;
      for (int64_t b0 = 0; b0 < N; b0 += batch) {
        const int64_t nb = std::min(batch, N - b0);
        QCAL_RETURN_IF_ERROR(x->read(b0, nb, xb.data()));
        qq.forward(xb.data(), yq.data(), nb, T);
        qf.forward(xb.data(), yf.data(), nb, T);
        for (int64_t i = 0; i < nb * T * H; ++i) {
          const double d = static_cast<double>(yf[i]) - yq[i];
          num += d * d;
          den += static_cast<double>(yf[i]) * yf[i];
          if (!std::isfinite(yq[i]))
            return internal_error("layer " + std::to_string(l) +
                                  ": non-finite activation after quantization");
        }
        if (sink) QCAL_RETURN_IF_ERROR(sink->append(yq.data(), nb));
      }
      rep["rel_output_error"] = den > 0 ? num / den : num;
      if (next_file) {
        QCAL_ASSIGN_OR_RETURN(ArtifactRef xr, next_file->finish());
        add_ref(&arts, "x", xr);
      }
      if (next_buf) {
        cur = std::move(next_buf);
        x = cur.get();
        file_in.reset();
        rotated.reset();
      }
    }
    rep["layer"] = l;
    b.report = rep;  // deterministic: the artifact's bytes depend on the inputs only
    rep["seconds"] = steady_seconds() - tl;
    if (is_root(ctx)) {
      QCAL_ASSIGN_OR_RETURN(ArtifactRef br, write_block(ctx, b, c));
      add_ref(&arts, plan::block_artifact(l), br);
    }
    layers.push_back(rep);
    std::ostringstream line;
    line << "layer " << l + 1 << "/" << L;
    if (rep.contains("rel_output_error"))
      line << ": rel output error " << rep["rel_output_error"].get<double>();
    line << " (" << rep["seconds"].get<double>() << " s)";
    say(ctx, line.str());
  }
  if (!is_root(ctx)) return json::object();
  return json{{"artifacts", arts}, {"layers", layers}, {"layer_begin", l0}, {"layer_end", l1}};
}

// ---------------------------------------------------------------- CBQ windows

// The carried parameters of a window's overlap blocks as fp64 arrays (GPTQ's codes as
// byte arrays, moved rather than copied: a byte per weight of each carried block).
Fitted carried_to_fitted(std::vector<calib::CbqBlockParams>&& carried) {
  Fitted f;
  json layers = json::array();
  for (calib::CbqBlockParams& b : carried) {
    const std::string pre = "L" + std::to_string(b.layer) + ".";
    layers.push_back(b.layer);
    for (int p = 0; p < calib::kNumProj; ++p) {
      const std::string n = kProjNames[p];
      f.arrays[pre + "rho." + n] = b.rho[p];
      if (!b.a1[p].empty()) f.arrays[pre + "a1." + n] = b.a1[p];
      if (!b.a2[p].empty()) f.arrays[pre + "a2." + n] = b.a2[p];
      if (!b.clip.act_max[p].empty()) f.arrays[pre + "act." + n] = b.clip.act_max[p];
      if (!b.s0[p].empty()) f.arrays[pre + "s0." + n] = b.s0[p];
      if (!b.cell[p].empty()) f.bytes[pre + "cell." + n] = std::move(b.cell[p]);
    }
    if (!b.clip.k_max.empty()) f.arrays[pre + "k"] = b.clip.k_max;
    if (!b.clip.v_max.empty()) f.arrays[pre + "v"] = b.clip.v_max;
  }
  f.meta["layers"] = layers;
  return f;
}

Result<std::vector<calib::CbqBlockParams>> carried_from_fitted(Fitted&& f) {
  std::vector<calib::CbqBlockParams> out;
  if (!f.meta.contains("layers") || !f.meta["layers"].is_array())
    return corrupt("cbq state: no layer list");
  for (const json& lj : f.meta["layers"]) {
    if (!lj.is_number_integer()) return corrupt("cbq state: bad layer entry");
    calib::CbqBlockParams b;
    b.layer = lj.get<int64_t>();
    const std::string pre = "L" + std::to_string(b.layer) + ".";
    auto get = [&](const std::string& n, std::vector<double>* v) {
      if (f.has(pre + n)) *v = f.at(pre + n);
    };
    for (int p = 0; p < calib::kNumProj; ++p) {
      const std::string n = kProjNames[p];
      if (!f.has(pre + "rho." + n))
        return corrupt("cbq state: layer " + std::to_string(b.layer) + " lacks rho");
      get("rho." + n, &b.rho[p]);
      get("a1." + n, &b.a1[p]);
      get("a2." + n, &b.a2[p]);
      get("act." + n, &b.clip.act_max[p]);
      b.clip.act_min[p] = b.clip.act_max[p];
      get("s0." + n, &b.s0[p]);
      if (auto it = f.bytes.find(pre + "cell." + n); it != f.bytes.end())
        b.cell[p] = std::move(it->second);
      if (b.s0[p].empty() != b.cell[p].empty())
        return corrupt("cbq state: layer " + std::to_string(b.layer) + " " + n +
                       " has only one of its GPTQ start's step sizes and codes");
    }
    get("k", &b.clip.k_max);
    get("v", &b.clip.v_max);
    b.clip.k_min = b.clip.k_max;
    b.clip.v_min = b.clip.v_max;
    out.push_back(std::move(b));
  }
  return out;
}

// A finalized layer's block result: the CBQ codes with the deployed block's norms (CFP's
// smoothing divided out), online transforms and learned clip ratios.
BlockResult window_block_result(const calib::CbqLayerResult& res, const Deployed& dl) {
  BlockResult b = calib::block_result(res.layer, dl, &res.q, res.q[0].spec.bits);
  auto divide = [](std::vector<float>& g, const std::vector<double>& s) {
    if (s.empty()) return;
    for (size_t j = 0; j < g.size(); ++j)
      if (s[j] != 1.0) g[j] = static_cast<float>(static_cast<double>(g[j]) / s[j]);
  };
  divide(b.input_norm, res.smooth_attn);
  divide(b.post_norm, res.smooth_mlp);
  for (int p = 0; p < calib::kNumProj; ++p)
    if (b.act[p].bits < 16) b.act[p].clip = static_cast<float>(res.act_clip[p]);
  if (b.k.bits < 16) b.k.clip = static_cast<float>(res.k_clip);
  if (b.v.bits < 16) b.v.clip = static_cast<float>(res.v_clip);
  return b;
}

// m (rows, H) ← m·R1 by chunks of rows (fp64, cast once); nothing when R1 is empty.
void rotate_rows_by_chunks(std::vector<float>* m, int64_t rows, int64_t H,
                           const std::vector<double>& R1) {
  if (R1.empty()) return;
  const int64_t chunk = 4096;
  for (int64_t v0 = 0; v0 < rows; v0 += chunk)
    calib::rotate_rows(m->data() + v0 * H, std::min(chunk, rows - v0), H, R1);
}

// The final norm and lm_head of the output: the checkpoint's (lm_head.weight, or the
// embedding when tied and absent: a copy of `embed` when the caller has read it, else
// read), the final norm folded into lm_head for transforms that fold it, lm_head
// rotated by the transform's residual rotation (all fp32).
Status output_lm_head(const Common& k, const std::vector<float>* embed,
                      std::vector<float>* final_norm, std::vector<float>* lm_head) {
  const ModelConfig& c = k.c;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const ModelDir& dir = k.model->dir();
  QCAL_ASSIGN_OR_RETURN(Tensor n, dir.read_f32("model.norm.weight", {H}));
  Result<Tensor> lm = dir.read_f32("lm_head.weight", {V, H});
  if (lm.is_ok()) {
    *lm_head = std::move(lm->data);
  } else if (!c.tie_word_embeddings) {
    return lm.status();
  } else if (embed) {
    *lm_head = *embed;
  } else {
    QCAL_ASSIGN_OR_RETURN(Tensor e, dir.read_f32("model.embed_tokens.weight", {V, H}));
    *lm_head = std::move(e.data);
  }
  *final_norm = std::move(n.data);
  if (k.transform->folds_final_norm()) {
    for (int64_t v = 0; v < V; ++v)
      for (int64_t j = 0; j < H; ++j)
        (*lm_head)[v * H + j] = static_cast<float>(static_cast<double>((*lm_head)[v * H + j]) *
                                                   static_cast<double>((*final_norm)[j]));
    std::fill(final_norm->begin(), final_norm->end(), 1.0f);
  }
  rotate_rows_by_chunks(lm_head, V, H, k.R1);
  return Status::ok();
}

Result<json> run_window(const TaskContext& ctx) {
  QCAL_ASSIGN_OR_RETURN(int64_t w, int_param(ctx.task, "window"));
  QCAL_ASSIGN_OR_RETURN(int64_t first, int_param(ctx.task, "first"));
  QCAL_ASSIGN_OR_RETURN(int64_t last, int_param(ctx.task, "last"));
  QCAL_ASSIGN_OR_RETURN(int64_t wsize, int_param(ctx.task, "window_size"));
  QCAL_ASSIGN_OR_RETURN(int64_t overlap, int_param(ctx.task, "overlap"));
  QCAL_ASSIGN_OR_RETURN(Common k, open_common(ctx, /*need_global=*/true));
  const ModelConfig& c = k.c;
  const Recipe& r = *k.r;
  const int64_t L = c.num_hidden_layers, H = c.hidden_size;
  calib::CbqOptions o = cbq_options_for(r, c, wsize, overlap);
  const std::vector<calib::CbqWindow> plan = calib::cbq_plan(L, o.window, o.overlap);
  if (w < 0 || w >= static_cast<int64_t>(plan.size()) || plan[w].first != first ||
      plan[w].last != last)
    return invalid_input("task " + ctx.task.id + ": window " + std::to_string(w) + " [" +
                         std::to_string(first) + ", " + std::to_string(last) +
                         "] is not the recipe's");
  if (ctx.cancel) o.should_stop = [&ctx] { return stopping(ctx); };
  // The window's deployed FP blocks and their online transforms.
  std::vector<BlockSetup> setups;
  std::vector<calib::BlockWeightsT<float>> blocks;
  o.online.assign(static_cast<size_t>(L), {});
  for (int64_t l = first; l <= last; ++l) {
    QCAL_ASSIGN_OR_RETURN(BlockSetup s, deploy_layer(ctx, k, l));
    o.online[static_cast<size_t>(l)] = s.dl.online;
    // The window trains its own copy of the deployed weights. The checkpoint's are
    // deploy's input only; the deployed linears are read again only by IntactKV's
    // prefix (the results take dl's norms and biases).
    s.w = calib::BlockWeightsT<float>();
    blocks.push_back(s.dl.w);
    if (!r.intactkv())
      for (auto& wp : s.dl.w.w) wp = std::vector<float>();
    setups.push_back(std::move(s));
  }
  o.needs_online = false;
  // IntactKV: the window trains against the FP pivot cache the output carries (cbq.h
  // CbqOptions::prefix_len), when every calibration sequence begins with the prefix.
  bool with_prefix = false;
  if (r.intactkv()) {
    const std::vector<int32_t> prefix = r.intactkv_prefix_for(c);
    QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib_data(ctx, c.vocab_size));
    with_prefix = static_cast<int64_t>(prefix.size()) < calib.seqlen;
    for (int64_t s = 0; with_prefix && s < calib.count(); ++s)
      with_prefix = std::equal(prefix.begin(), prefix.end(), calib.seq(s));
    if (!with_prefix)
      say(ctx,
          "the calibration sequences do not all begin with the IntactKV prefix: the window "
          "trains without the FP prefix cache");
  }
  if (with_prefix) {
    o.prefix_k.assign(static_cast<size_t>(L), {});
    o.prefix_v.assign(static_cast<size_t>(L), {});
    for (int64_t l = first; l <= last; ++l) {
      QCAL_ASSIGN_OR_RETURN(std::vector<float> xp, prefix_states(ctx, k, l));
      o.prefix_len = static_cast<int64_t>(xp.size()) / H;
      calib::prefix_kv(c, setups[static_cast<size_t>(l - first)].dl, xp.data(), o.prefix_len,
                       &o.prefix_k[static_cast<size_t>(l)], &o.prefix_v[static_cast<size_t>(l)]);
    }
  }
  // The last window's logit loss (cbq.h CbqOptions::head): the output's FP head.
  if (last + 1 == L && o.head_weight > 0) {
    auto head = std::make_shared<calib::CbqHead>();
    QCAL_RETURN_IF_ERROR(output_lm_head(k, nullptr, &head->norm, &head->lm_head));
    o.head = std::move(head);
  }
  std::vector<calib::BlockWeightsT<float>*> ptrs;
  for (auto& b : blocks) ptrs.push_back(&b);
  // Inputs: FP activations of the window's first block (rotated into the model's basis);
  // the quantized path from the previous window (sequential).
  QCAL_ASSIGN_OR_RETURN(auto fp_file, open_acts(ctx, fp_producer(first), "x"));
  calib::RotatedSource fp_rot(fp_file.get(), &k.R1);
  std::unique_ptr<ArtifactStore::ActivationFileReader> q_file;
  std::unique_ptr<calib::RotatedSource> q_rot;
  std::vector<calib::CbqBlockParams> carried;
  const std::string prev = plan::numbered(plan::kCbqWindow, w - 1);
  const bool has_prev =
      w > 0 && std::find(ctx.task.deps.begin(), ctx.task.deps.end(), prev) != ctx.task.deps.end();
  calib::CbqStreams io;
  io.x_fp = &fp_rot;
  if (!o.parallel) {
    if (w == 0) {
      QCAL_ASSIGN_OR_RETURN(q_file, open_acts(ctx, plan::kEmbed, "x"));
      q_rot = std::make_unique<calib::RotatedSource>(q_file.get(), &k.R1);
      io.x_q = q_rot.get();
    } else {
      QCAL_ASSIGN_OR_RETURN(q_file, open_acts(ctx, prev, "x"));
      io.x_q = q_file.get();
    }
  }
  if (has_prev) {
    auto it = ctx.deps.find(prev);
    if (it != ctx.deps.end() && it->second.contains("artifacts") &&
        it->second["artifacts"].contains("state")) {
      QCAL_ASSIGN_OR_RETURN(Fitted sf, load_fitted_dep(ctx, prev, "state"));
      QCAL_ASSIGN_OR_RETURN(carried, carried_from_fitted(std::move(sf)));
    }
  }
  if (w > 0 && !o.parallel) say(ctx, "resuming from the state of " + prev);
  ScratchDir scratch;
  QCAL_ASSIGN_OR_RETURN(io.scratch_dir, make_scratch(ctx, &scratch));
  set_ranks(ctx, &io);
  if (ctx.task.params.contains("micro") && ctx.task.params["micro"].is_number_integer())
    io.micro = ctx.task.params["micro"].get<int64_t>();
  std::unique_ptr<ArtifactStore::ActivationFileWriter> next_file;
  const calib::CbqWindow& win = plan[static_cast<size_t>(w)];
  if (!o.parallel && win.finalize_last + 1 < L && is_root(ctx)) {
    QCAL_ASSIGN_OR_RETURN(next_file,
                          ctx.store->create_activations(artifact_rel(ctx, "x.safetensors"),
                                                        fp_rot.sequences(), fp_rot.seqlen(), H));
    io.next_q = next_file.get();
  }
  std::vector<calib::CbqBlockParams> carried_out;
  std::vector<calib::CbqLayerResult> finalized;
  calib::CbqWindowReport rep;
  Status st =
      calib::cbq_run_window(c, o, plan, w, ptrs, carried, io, &carried_out, &finalized, &rep);
  if (!st.is_ok()) {
    if (stopping(ctx)) return cancelled(ctx.task.id + ": " + st.message());
    return st;
  }
  if (!is_root(ctx)) return json::object();
  json arts = json::object(), fin = json::array(), cfp = json::array();
  for (const calib::CbqLayerResult& res : finalized) {
    const BlockSetup& s = setups[static_cast<size_t>(res.layer - first)];
    BlockResult b = window_block_result(res, s.dl);
    if (with_prefix) {
      b.prefix_k = o.prefix_k[static_cast<size_t>(res.layer)];
      b.prefix_v = o.prefix_v[static_cast<size_t>(res.layer)];
    } else if (r.intactkv()) {
      QCAL_ASSIGN_OR_RETURN(std::vector<float> xp, prefix_states(ctx, k, res.layer));
      calib::prefix_kv(c, s.dl, xp.data(), static_cast<int64_t>(xp.size()) / H, &b.prefix_k,
                       &b.prefix_v);
    }
    b.report = {{"window", w},
                {"cfp_kept", res.cfp_kept},
                {"cfp_err_with", res.cfp_err_with},
                {"cfp_err_without", res.cfp_err_without}};
    cfp.push_back({{"layer", res.layer},
                   {"kept", res.cfp_kept},
                   {"err_with", res.cfp_err_with},
                   {"err_without", res.cfp_err_without}});
    QCAL_ASSIGN_OR_RETURN(ArtifactRef br, write_block(ctx, b, c));
    add_ref(&arts, plan::block_artifact(res.layer), br);
    fin.push_back(res.layer);
  }
  if (!carried_out.empty()) {
    QCAL_ASSIGN_OR_RETURN(ArtifactRef sr,
                          write_fitted(ctx, "state", carried_to_fitted(std::move(carried_out))));
    add_ref(&arts, "state", sr);
  }
  if (next_file) {
    QCAL_ASSIGN_OR_RETURN(ArtifactRef xr, next_file->finish());
    add_ref(&arts, "x", xr);
  }
  std::ostringstream line;
  line << "window " << w + 1 << "/" << plan.size() << " (layers " << first << ".." << last
       << "): loss " << rep.loss_first << " -> " << rep.loss_last << ", hardened "
       << rep.loss_hard_init << (rep.gptq_init ? " (gptq)" : "") << " -> " << rep.loss_hard
       << (rep.reverted ? " (kept the initial parameters: trained " : "")
       << (rep.reverted ? std::to_string(rep.loss_hard_trained) + ")" : "");
  if (rep.holdout > 0 && rep.best_epoch >= 0)
    line << ", held-out (" << rep.holdout << " sequences) " << rep.loss_holdout_init << " -> "
         << rep.loss_holdout << " at epoch " << rep.best_epoch << "/" << rep.holdout_losses.size();
  line << " (" << rep.seconds << " s)";
  say(ctx, line.str());
  json wj = {{"window", rep.window},
             {"first", rep.first},
             {"last", rep.last},
             {"loss_first", rep.loss_first},
             {"loss_last", rep.loss_last},
             {"loss_hard_init", rep.loss_hard_init},
             {"loss_hard", rep.loss_hard},
             {"steps", rep.steps},
             {"seconds", rep.seconds},
             {"loss_hard_trained", rep.loss_hard_trained},
             {"reverted", rep.reverted},
             {"gptq_init", rep.gptq_init},
             {"intactkv_prefix", with_prefix},
             {"holdout", rep.holdout},
             {"cfp", cfp}};
  if (rep.holdout > 0) {
    wj["best_epoch"] = rep.best_epoch;
    wj["loss_holdout_init"] = rep.loss_holdout_init;
    wj["loss_holdout"] = rep.loss_holdout;
    wj["holdout_losses"] = rep.holdout_losses;
  }
  return json{{"artifacts", arts}, {"window", wj}, {"finalized", fin}};
}

// ---------------------------------------------------------------- block results

// Every block result of the job, by layer (from the producers among the task's deps).
Result<std::vector<ArtifactRef>> block_refs(const TaskContext& ctx, int64_t L) {
  std::vector<std::optional<ArtifactRef>> by(static_cast<size_t>(L));
  for (const auto& dep : ctx.task.deps) {
    auto it = ctx.deps.find(dep);
    if (it == ctx.deps.end() || !it->second.is_object() || !it->second.contains("artifacts"))
      continue;
    const json& arts = it->second["artifacts"];
    for (int64_t l = 0; l < L; ++l) {
      const std::string key = plan::block_artifact(l);
      if (!arts.contains(key)) continue;
      if (by[static_cast<size_t>(l)])
        return invalid_input("task " + ctx.task.id + ": layer " + std::to_string(l) +
                             " has results from two tasks");
      auto ref = ArtifactRef::from_json(arts[key]);
      if (!ref.is_ok()) return ref.status().with_context("dep " + dep + " artifact " + key);
      by[static_cast<size_t>(l)] = *ref;
    }
  }
  std::vector<ArtifactRef> out;
  for (int64_t l = 0; l < L; ++l) {
    if (!by[static_cast<size_t>(l)])
      return invalid_input("task " + ctx.task.id + ": no task produced layer " + std::to_string(l));
    out.push_back(*by[static_cast<size_t>(l)]);
  }
  return out;
}

// The embedding, final norm and lm_head of the output: output_lm_head's, and the
// embedding with the embedding's row-mean subtracted when the recipe asks, rotated by
// the residual rotation (all fp32).
struct Head {
  std::vector<float> embed, final_norm, lm_head;
};
Result<Head> output_head(const Common& k) {
  const ModelConfig& c = k.c;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  Head h;
  QCAL_ASSIGN_OR_RETURN(Tensor e, k.model->dir().read_f32("model.embed_tokens.weight", {V, H}));
  h.embed = std::move(e.data);
  QCAL_RETURN_IF_ERROR(output_lm_head(k, &h.embed, &h.final_norm, &h.lm_head));
  if (k.r->b("embed_mean_sub")) {
    for (int64_t v = 0; v < V; ++v) {
      float* row = h.embed.data() + v * H;
      double mean = 0.0;
      for (int64_t j = 0; j < H; ++j) mean += row[j];
      mean /= static_cast<double>(H);
      for (int64_t j = 0; j < H; ++j) row[j] = static_cast<float>(row[j] - mean);
    }
  }
  rotate_rows_by_chunks(&h.embed, V, H, k.R1);
  return h;
}

// The IntactKV prefix's FP logits (P, V): the checkpoint's final norm and lm_head on the
// prefix's final FP states.
Result<std::vector<float>> prefix_logits(const TaskContext& ctx, const Common& k) {
  const ModelConfig& c = k.c;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  QCAL_ASSIGN_OR_RETURN(auto rd, open_acts(ctx, plan::numbered(plan::kCapture, L - 1), "prefix"));
  const int64_t P = rd->seqlen();
  Tensor x({P, H});
  QCAL_RETURN_IF_ERROR(rd->read(0, 1, x.ptr()));
  QCAL_ASSIGN_OR_RETURN(Tensor logits, k.model->logits(x));
  if (logits.numel() != P * V) return internal_error("prefix logits of the wrong size");
  return std::move(logits.data);
}

// The quantized NativeModel of the block results (in memory; for +Cal and, until the
// streaming writers land, for assemble).
Result<calib::NativeModel> native_model(const TaskContext& ctx, const Common& k,
                                        const std::vector<ArtifactRef>& refs) {
  const ModelConfig& c = k.c;
  const Recipe& r = *k.r;
  calib::NativeModel nm;
  nm.config = c;
  nm.recipe = r.to_json();
  nm.w_bits = r.w_bits() < 16 ? r.w_bits() : 16;
  nm.w_group = r.w_bits() < 16 && r.w_group() > 0 ? r.w_group() : -1;
  QCAL_ASSIGN_OR_RETURN(Head h, output_head(k));
  nm.embed = std::move(h.embed);
  nm.final_norm = std::move(h.final_norm);
  nm.lm_head = std::move(h.lm_head);
  for (const ArtifactRef& ref : refs) {
    QCAL_RETURN_IF_ERROR(ctx.store->verify(ref));
    QCAL_ASSIGN_OR_RETURN(BlockResult b,
                          calib::load_block_result(ctx.store->absolute(ref.path), c));
    nm.layers.push_back(calib::native_layer_of(b, nm.w_group));
    if (r.intactkv()) {
      nm.intact_k.push_back(std::move(b.prefix_k));
      nm.intact_v.push_back(std::move(b.prefix_v));
    }
  }
  if (r.intactkv()) {
    nm.intact_prefix = r.intactkv_prefix_for(c);
    QCAL_ASSIGN_OR_RETURN(nm.intact_logits, prefix_logits(ctx, k));
  }
  return nm;
}

Result<json> run_intactkv_cal(const TaskContext& ctx) {
  QCAL_ASSIGN_OR_RETURN(Common k, open_common(ctx, /*need_global=*/true));
  const ModelConfig& c = k.c;
  const Recipe& r = *k.r;
  QCAL_ASSIGN_OR_RETURN(std::vector<ArtifactRef> refs, block_refs(ctx, c.num_hidden_layers));
  QCAL_ASSIGN_OR_RETURN(calib::NativeModel nm, native_model(ctx, k, refs));
  // The FP twin: the deployed FP blocks (every layer's transform re-applied) with the
  // quantized model's online transforms, every quantizer off (intactkv.h fp_view).
  calib::NativeModel shell;
  shell.config = c;
  shell.recipe = nm.recipe;
  shell.w_bits = 16;
  shell.w_group = -1;
  shell.embed = nm.embed;
  shell.final_norm = nm.final_norm;
  shell.lm_head = nm.lm_head;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    QCAL_ASSIGN_OR_RETURN(BlockSetup s, deploy_layer(ctx, k, l));
    BlockResult fb = calib::block_result(l, s.dl, nullptr, 16);
    calib::NativeLayer y = calib::native_layer_of(fb, -1);
    // The twin keeps the quantized model's norms and online transforms where CBQ's
    // smoothing changed them... the deployed FP block is the transform's FP form.
    shell.layers.push_back(std::move(y));
  }
  const calib::NativeModel fp_t = calib::fp_view(shell);
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib_data(ctx, c.vocab_size));
  const std::vector<int32_t> prefix = r.intactkv_prefix_for(c);
  if (static_cast<int64_t>(prefix.size()) >= calib.seqlen)
    return invalid_input("intactkv_cal: the IntactKV prefix of " + std::to_string(prefix.size()) +
                         " tokens leaves nothing of calibration sequences of " +
                         std::to_string(calib.seqlen));
  int64_t replaced = 0;
  const TokenSequences data = calib::intactkv_cal_data(calib, prefix, &replaced);
  if (replaced > 0)
    say(ctx, std::to_string(replaced) + " of " + std::to_string(data.count()) +
                 " calibration sequences did not begin with the prefix; their first " +
                 std::to_string(prefix.size()) + " token(s) were replaced by it");
  calib::IntactKvCalOptions o;
  o.steps = r.i("intactkv_cal_steps");
  o.lr = r.f("intactkv_cal_lr");
  set_ranks(ctx, &o);
  const int64_t every = std::max<int64_t>(1, (o.steps + 15) / 16);
  auto rep =
      calib::calibrate_intactkv(nm, fp_t, data, o, [&](int64_t step, int64_t steps, double loss) {
        if (step % every == 0 || step + 1 == steps) {
          std::ostringstream line;
          line << "intactkv-cal " << step + 1 << "/" << steps << ": loss " << loss;
          say(ctx, line.str());
        }
      });
  if (!rep.is_ok()) return rep.status().with_context("intactkv_cal");
  if (!is_root(ctx)) return json::object();
  Fitted f;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    f.arrays["k." + std::to_string(l)] =
        std::vector<double>(nm.intact_k[l].begin(), nm.intact_k[l].end());
    f.arrays["v." + std::to_string(l)] =
        std::vector<double>(nm.intact_v[l].begin(), nm.intact_v[l].end());
  }
  QCAL_ASSIGN_OR_RETURN(ArtifactRef ref, write_fitted(ctx, "prefix_kv", f));
  json report = {{"loss_first", rep->loss_first},
                 {"loss_last", rep->loss_last},
                 {"steps", rep->steps},
                 {"seconds", rep->seconds}};
  return json{{"artifacts", {{"prefix_kv", ref.to_json()}}},
              {"report", {{"intactkv_cal", report}}}};
}

// ---------------------------------------------------------------- assemble
//
// The assemble task streams (issue #10 part 2): the writers (calib::stream_native,
// stream_quantized_checkpoint) ask for each layer when they reach it, and the block
// result is loaded then and dropped after; the embedding and lm_head are made by
// blocks of rows from the mapped checkpoint; the IntactKV prefix logits read lm_head
// by blocks of rows. What it holds: one block result (and its written form), one
// block of head rows with the rotation's fp64 buffers, R1, the writers' pieces, and
// (IntactKV) the prefix cache and logits. The bytes are those of the whole-model
// assemble it replaced (tests/unit/test_assemble_stream.cc).

uint64_t dir_bytes(const std::string& dir) {
  uint64_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec))
    if (e.is_regular_file(ec)) n += e.file_size(ec);
  return n;
}

// The (V, H) float tensor `name` of the checkpoint; kNotFound / kInvalidInput as
// ModelDir::read_f32.
Result<const TensorInfo*> head_tensor(const ModelDir& dir, const std::string& name, int64_t V,
                                      int64_t H, const SafetensorsFile** file) {
  const TensorInfo* ti = dir.find(name, file);
  if (!ti) return not_found(dir.dir() + ": missing tensor " + name);
  if (ti->shape != std::vector<int64_t>{V, H})
    return invalid_input(dir.dir() + ": tensor " + name + " has shape " + shape_str(ti->shape) +
                         ", config implies " + shape_str({V, H}));
  if (!is_float_dtype(ti->dtype))
    return invalid_input(dir.dir() + ": tensor " + name + " has non-float dtype " +
                         dtype_name(ti->dtype));
  return ti;
}

// Rows of the output's embedding (`lm_head` false) or lm_head, as output_head() makes
// them: the checkpoint's rows (the embedding minus each row's mean when the recipe
// asks; lm_head.weight, or the embedding when tied and absent, times the final norm
// when the transform folds it), rotated by R1. They are made on output_head()'s grid
// of kHeadRows-row blocks, so that the rotation's GEMM sees the same shapes and the
// bytes are the same; one block is kept between calls. `k` must outlive the RowFn.
constexpr int64_t kHeadRows = 4096;
Result<RowFn> head_rows(const Common& k, bool lm_head) {
  const ModelConfig& c = k.c;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const ModelDir& dir = k.model->dir();
  std::string name = "model.embed_tokens.weight";
  if (lm_head && (dir.has("lm_head.weight") || !c.tie_word_embeddings)) name = "lm_head.weight";
  const SafetensorsFile* file = nullptr;
  QCAL_ASSIGN_OR_RETURN(const TensorInfo* ti, head_tensor(dir, name, V, H, &file));
  auto norm = std::make_shared<std::vector<float>>();
  if (lm_head && k.transform->folds_final_norm()) {
    QCAL_ASSIGN_OR_RETURN(Tensor n, dir.read_f32("model.norm.weight", {H}));
    *norm = std::move(n.data);
  }
  const bool mean_sub = !lm_head && k.r->b("embed_mean_sub");
  struct Block {
    int64_t index = -1;
    std::vector<float> rows;
  };
  auto blk = std::make_shared<Block>();
  const std::vector<double>* R1 = &k.R1;
  return RowFn([=](int64_t row0, int64_t rows, float* out) -> Status {
    const size_t row_bytes = static_cast<size_t>(H) * dtype_size(ti->dtype);
    for (int64_t v = row0; v < row0 + rows;) {
      const int64_t b = v / kHeadRows, v0 = b * kHeadRows, n = std::min(kHeadRows, V - v0);
      if (blk->index != b) {
        blk->index = -1;
        blk->rows.resize(static_cast<size_t>(n * H));
        float* m = blk->rows.data();
        to_f32(ti->dtype, file->raw(*ti).data() + static_cast<size_t>(v0) * row_bytes, m,
               static_cast<size_t>(n * H));
        file->release(*ti, static_cast<uint64_t>(v0) * row_bytes,
                      static_cast<uint64_t>(v0 + n) * row_bytes);
        if (mean_sub) {
          for (int64_t i = 0; i < n; ++i) {
            float* row = m + i * H;
            double mean = 0.0;
            for (int64_t j = 0; j < H; ++j) mean += row[j];
            mean /= static_cast<double>(H);
            for (int64_t j = 0; j < H; ++j) row[j] = static_cast<float>(row[j] - mean);
          }
        }
        if (!norm->empty()) {
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < H; ++j)
              m[i * H + j] = static_cast<float>(static_cast<double>(m[i * H + j]) *
                                                static_cast<double>((*norm)[j]));
        }
        calib::rotate_rows(m, n, H, *R1);
        blk->index = b;
      }
      const int64_t end = std::min(row0 + rows, v0 + n);
      std::memcpy(out + (v - row0) * H, blk->rows.data() + (v - v0) * H,
                  static_cast<size_t>((end - v) * H) * sizeof(float));
      v = end;
    }
    if (row0 + rows >= V) *blk = Block();  // the last rows: nothing more to keep
    return Status::ok();
  });
}

// The output's final norm: the checkpoint's, ones when the transform folds it.
Result<std::vector<float>> output_final_norm(const Common& k) {
  const int64_t H = k.c.hidden_size;
  if (k.transform->folds_final_norm()) return std::vector<float>(static_cast<size_t>(H), 1.0f);
  QCAL_ASSIGN_OR_RETURN(Tensor n, k.model->dir().read_f32("model.norm.weight", {H}));
  return std::move(n.data);
}

// The IntactKV prefix's FP logits (P, V), as prefix_logits() makes them (the
// checkpoint's final norm, then lm_head) with lm_head read by blocks of rows. The
// product is cut along V at multiples of 64 columns, where sgemm's values are
// bitwise those of one call over all of V (kernels/gemm.cc, panel_begin).
Result<std::vector<float>> prefix_logits_by_rows(const TaskContext& ctx, const Common& k) {
  const ModelConfig& c = k.c;
  const int64_t H = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  QCAL_ASSIGN_OR_RETURN(auto rd, open_acts(ctx, plan::numbered(plan::kCapture, L - 1), "prefix"));
  const int64_t P = rd->seqlen();
  std::vector<float> x(static_cast<size_t>(P * H)), xn(x.size());
  QCAL_RETURN_IF_ERROR(rd->read(0, 1, x.data()));
  QCAL_ASSIGN_OR_RETURN(Tensor g, k.model->final_norm());
  rmsnorm_forward(xn.data(), x.data(), g.ptr(), P, H, static_cast<float>(c.rms_norm_eps));
  const int64_t step =
      std::max<int64_t>(64, static_cast<int64_t>(kWriteChunkBytes) / (H * 4) / 64 * 64);
  std::vector<float> w(static_cast<size_t>(std::min(step, V) * H));
  std::vector<float> logits(static_cast<size_t>(P * V));
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    QCAL_RETURN_IF_ERROR(k.model->lm_head_rows(v0, n, w.data()));
    sgemm(false, true, P, n, H, 1.0f, xn.data(), H, w.data(), H, 0.0f, logits.data() + v0, V);
  }
  return logits;
}

// Every block result's declaration, by layer (each file verified against its ref).
Result<std::vector<calib::BlockResultDecl>> block_decls(const TaskContext& ctx,
                                                        const ModelConfig& c,
                                                        const std::vector<ArtifactRef>& refs) {
  std::vector<calib::BlockResultDecl> out;
  for (size_t l = 0; l < refs.size(); ++l) {
    QCAL_RETURN_IF_ERROR(ctx.store->verify(refs[l]));
    QCAL_ASSIGN_OR_RETURN(calib::BlockResultDecl d,
                          calib::load_block_decl(ctx.store->absolute(refs[l].path), c));
    if (d.layer != static_cast<int64_t>(l))
      return corrupt(refs[l].path + ": the result of layer " + std::to_string(d.layer) +
                     " stands for layer " + std::to_string(l));
    out.push_back(std::move(d));
  }
  return out;
}

Result<BlockResult> load_block_at(const TaskContext& ctx, const ModelConfig& c,
                                  const ArtifactRef& ref) {
  return calib::load_block_result(ctx.store->absolute(ref.path), c);
}

// native: the layers from the block results, the head by rows, the IntactKV cache
// (the blocks' FP one, or +Cal's trained "prefix_kv") and the prefix logits.
Status assemble_native(const TaskContext& ctx, const Common& k,
                       const std::vector<ArtifactRef>& refs, const std::string& dest) {
  const ModelConfig& c = k.c;
  const Recipe& r = *k.r;
  const int64_t L = c.num_hidden_layers, K = c.kv_dim();
  calib::NativeModelDecl decl;
  decl.config = c;
  decl.recipe = r.to_json();
  decl.w_bits = r.w_bits() < 16 ? r.w_bits() : 16;
  decl.w_group = r.w_bits() < 16 && r.w_group() > 0 ? r.w_group() : -1;
  if (r.intactkv()) decl.intact_prefix = r.intactkv_prefix_for(c);
  const int64_t P = static_cast<int64_t>(decl.intact_prefix.size());
  QCAL_ASSIGN_OR_RETURN(std::vector<calib::BlockResultDecl> decls, block_decls(ctx, c, refs));
  for (const calib::BlockResultDecl& d : decls) {
    if (r.intactkv() && d.prefix_rows != P)
      return invalid_input("assemble: the IntactKV prefix cache of layer " +
                           std::to_string(d.layer) + " has " + std::to_string(d.prefix_rows) +
                           " rows, the prefix " + std::to_string(P) + " tokens");
    decl.layers.push_back(d.native);
  }
  // +Cal's trained prefix cache replaces the FP one.
  std::optional<Fitted> trained;
  for (const auto& dep : ctx.task.deps) {
    if (dep != "intactkv-cal" || !r.intactkv()) continue;
    QCAL_ASSIGN_OR_RETURN(Fitted f, load_fitted_dep(ctx, dep, "prefix_kv"));
    for (int64_t l = 0; l < L; ++l) {
      const auto& kk = f.at("k." + std::to_string(l));
      const auto& vv = f.at("v." + std::to_string(l));
      if (static_cast<int64_t>(kk.size()) != P * K || static_cast<int64_t>(vv.size()) != P * K)
        return corrupt("intactkv-cal: the trained cache of layer " + std::to_string(l) +
                       " has the wrong size");
    }
    trained = std::move(f);
  }
  std::vector<std::vector<float>> intact_k(static_cast<size_t>(L)),
      intact_v(static_cast<size_t>(L));
  std::vector<float> final_norm, logits;
  QCAL_ASSIGN_OR_RETURN(final_norm, output_final_norm(k));
  calib::NativeSource src;
  QCAL_ASSIGN_OR_RETURN(src.embed, head_rows(k, /*lm_head=*/false));
  QCAL_ASSIGN_OR_RETURN(src.lm_head, head_rows(k, /*lm_head=*/true));
  src.final_norm = rows_of(final_norm.data(), 1);
  src.layer = [&](int64_t l) -> Result<calib::NativeLayer> {
    if (stopping(ctx)) return cancelled("assemble at layer " + std::to_string(l));
    QCAL_ASSIGN_OR_RETURN(BlockResult b, load_block_at(ctx, c, refs[static_cast<size_t>(l)]));
    if (r.intactkv() && !trained) {
      intact_k[static_cast<size_t>(l)] = std::move(b.prefix_k);
      intact_v[static_cast<size_t>(l)] = std::move(b.prefix_v);
    }
    return calib::native_layer_of(b, decl.w_group);
  };
  if (r.intactkv()) {
    src.intact_kv = [&](int64_t l, std::vector<float>* kc, std::vector<float>* vc) -> Status {
      if (trained) {
        const auto& kk = trained->at("k." + std::to_string(l));
        const auto& vv = trained->at("v." + std::to_string(l));
        kc->assign(kk.begin(), kk.end());
        vc->assign(vv.begin(), vv.end());
      } else {
        *kc = std::move(intact_k[static_cast<size_t>(l)]);
        *vc = std::move(intact_v[static_cast<size_t>(l)]);
      }
      return Status::ok();
    };
    src.intact_logits = [&](int64_t row0, int64_t rows, float* out) -> Status {
      const int64_t V = c.vocab_size;
      if (logits.empty()) {
        QCAL_ASSIGN_OR_RETURN(logits, prefix_logits_by_rows(ctx, k));
        if (static_cast<int64_t>(logits.size()) != P * V)
          return invalid_input("assemble: the IntactKV prefix states hold " +
                               std::to_string(logits.size() / static_cast<size_t>(V)) +
                               " positions, the prefix " + std::to_string(P) + " tokens");
      }
      std::memcpy(out, logits.data() + row0 * V, static_cast<size_t>(rows * V) * sizeof(float));
      return Status::ok();
    };
  }
  return calib::stream_native(decl, src, dest, /*overwrite=*/false);
}

// GPTQ / compressed-tensors: the quantized linears from the block results, in the
// writer's order (the module names sorted as strings, one layer's modules together:
// one result in memory); with a transform, every unquantized tensor it changes
// (embedding, norms, biases, lm_head) from row sources, in fp32 as the transformed
// model's, and the config's dtype and tying updated.
Status assemble_checkpoint(const TaskContext& ctx, const Common& k,
                           const std::vector<ArtifactRef>& refs, const std::string& format,
                           const std::string& dest) {
  const ModelConfig& c = k.c;
  const Recipe& r = *k.r;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const ModelDir& dir = k.model->dir();
  QCAL_ASSIGN_OR_RETURN(CheckpointFormat f, parse_checkpoint_format(format));
  QCAL_ASSIGN_OR_RETURN(std::vector<calib::BlockResultDecl> decls, block_decls(ctx, c, refs));
  const int64_t group = r.w_group() > 0 ? r.w_group() : -1;
  CheckpointStream in;
  std::map<std::string, std::pair<int64_t, int>> where;  // module → (layer, projection)
  for (const calib::BlockResultDecl& d : decls) {
    if (d.w_bits >= 16) return invalid_input("assemble: " + format + " needs quantized weights");
    for (int p = 0; p < calib::kNumProj; ++p) {
      QuantizedLinear q = d.q[p];
      q.spec.group_size = group;
      const std::string m = layer_prefix(d.layer) + kProjNames[p];
      in.linears[m] = linear_decl(q);
      where[m] = {d.layer, p};
    }
  }
  // The current layer's result; each module is handed out once.
  int64_t held = -1;
  BlockResult b;
  in.provide = [&](const std::string& m) -> Result<QuantizedLinear> {
    auto it = where.find(m);
    if (it == where.end()) return internal_error("assemble: no module " + m);
    const auto [l, p] = it->second;
    if (held != l) {
      if (stopping(ctx)) return cancelled("assemble at layer " + std::to_string(l));
      b = BlockResult();
      held = -1;
      QCAL_ASSIGN_OR_RETURN(b, load_block_at(ctx, c, refs[static_cast<size_t>(l)]));
      held = l;
    }
    QuantizedLinear q = std::move(b.q[p]);
    q.spec.group_size = group;
    return q;
  };
  const bool changes_fp = r.transform() != "none";
  std::vector<float> final_norm;
  if (changes_fp) {
    const bool tied = c.tie_word_embeddings && !k.transform->folds_final_norm() && k.R1.empty() &&
                      !r.b("embed_mean_sub");
    auto add = [&](const std::string& name, std::vector<int64_t> shape, RowFn rows) {
      in.overrides[name] = TensorOverride{DType::kF32, std::move(shape), std::move(rows)};
    };
    QCAL_ASSIGN_OR_RETURN(RowFn embed, head_rows(k, /*lm_head=*/false));
    add("model.embed_tokens.weight", {V, H}, std::move(embed));
    if (!tied || dir.has("lm_head.weight")) {
      QCAL_ASSIGN_OR_RETURN(RowFn lm, head_rows(k, /*lm_head=*/true));
      add("lm_head.weight", {V, H}, std::move(lm));
    }
    QCAL_ASSIGN_OR_RETURN(final_norm, output_final_norm(k));
    add("model.norm.weight", {H}, rows_of(final_norm.data(), 1));
    // A layer's norms and biases from its result (loaded by whichever of its tensors
    // the writer reaches first: they sort among its modules).
    auto block_rows = [&](int64_t l, std::vector<float> BlockResult::*member, int bias) {
      return RowFn([&, l, member, bias](int64_t row0, int64_t rows, float* out) -> Status {
        if (held != l) {
          b = BlockResult();
          held = -1;
          QCAL_ASSIGN_OR_RETURN(b, load_block_at(ctx, c, refs[static_cast<size_t>(l)]));
          held = l;
        }
        const std::vector<float>& v = bias >= 0 ? b.bias[static_cast<size_t>(bias)] : b.*member;
        if (row0 + rows > static_cast<int64_t>(v.size()))
          return corrupt("assemble: a tensor of layer " + std::to_string(l) + " is short");
        std::memcpy(out, v.data() + row0, static_cast<size_t>(rows) * sizeof(float));
        return Status::ok();
      });
    };
    const char* bias_names[3] = {"self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                 "self_attn.v_proj.bias"};
    for (const calib::BlockResultDecl& d : decls) {
      const int64_t l = d.layer;
      const std::string pre = layer_prefix(l);
      add(pre + "input_layernorm.weight", {H}, block_rows(l, &BlockResult::input_norm, -1));
      add(pre + "post_attention_layernorm.weight", {H}, block_rows(l, &BlockResult::post_norm, -1));
      for (int i = 0; i < 3; ++i) {
        const std::string name = pre + bias_names[i];
        if (d.native.bias[static_cast<size_t>(i)]) {
          add(name, {proj_shape(c, kProjNames[i])[0]}, block_rows(l, nullptr, i));
        } else if (dir.has(name)) {
          return invalid_input("assemble: the result of layer " + std::to_string(l) +
                               " lacks the " + name + " the checkpoint has");
        }
      }
    }
    in.config_updates = {{"torch_dtype", torch_dtype_name(DType::kF32)},
                         {"tie_word_embeddings", tied}};
    if (dir.config_json().contains("dtype"))
      in.config_updates["dtype"] = torch_dtype_name(DType::kF32);
  }
  WriteOptions wo;
  wo.format = f;
  wo.overwrite = false;
  wo.max_shard_bytes = static_cast<uint64_t>(ctx.spec.output.max_shard_mb) << 20;
  wo.extra_config = {{"meta", {{"qcal_recipe", r.to_json()}}}};
  if (r.gptq()) {
    wo.extra_config["damp_percent"] = r.f("gptq.percdamp");
    wo.extra_config["static_groups"] = r.b("gptq.static_groups");
    wo.extra_config["true_sequential"] = r.b("gptq.true_sequential");
  }
  return stream_quantized_checkpoint(dir, in, wo, dest);
}

Result<json> run_assemble(const TaskContext& ctx) {
  QCAL_ASSIGN_OR_RETURN(Common k, open_common(ctx, /*need_global=*/true));
  const ModelConfig& c = k.c;
  const int64_t L = c.num_hidden_layers;
  std::string format = str_param(ctx.task, "format");
  if (format.empty()) {
    QCAL_ASSIGN_OR_RETURN(format, output_format(ctx.spec));
  }
  QCAL_ASSIGN_OR_RETURN(std::vector<ArtifactRef> refs, block_refs(ctx, L));
  if (stopping(ctx)) return cancelled("assemble before writing");
  const std::string& out = ctx.spec.output.path;
  // Staged beside output.path and published under the fence (worker/publish.h); a
  // re-run after a crash between publishing and reporting replaces its own output.
  QCAL_ASSIGN_OR_RETURN(OutputPublication pub, OutputPublication::begin(ctx));
  const std::string& dest = pub.staging();
  if (format == "native") {
    QCAL_RETURN_IF_ERROR(assemble_native(ctx, k, refs, dest));
  } else {
    QCAL_RETURN_IF_ERROR(assemble_checkpoint(ctx, k, refs, format, dest));
  }
  QCAL_RETURN_IF_ERROR(pub.commit());
  const uint64_t bytes = dir_bytes(out);
  say(ctx, "wrote " + out + " (" + format + ", " + std::to_string(bytes) + " bytes, " +
               std::to_string(L) + " layers)");
  return json{{"output", out}, {"bytes", bytes}, {"format", format}, {"layers", L}};
}

}  // namespace

// ---------------------------------------------------------------- public

calib::CbqOptions cbq_options_for(const Recipe& r, const ModelConfig& c, int64_t window,
                                  int64_t overlap) {
  calib::CbqOptions o;
  o.w_bits = r.w_bits();
  o.w_group = r.w_group();
  o.a_bits = r.a_bits();
  o.a_clip = r.f("a_clip");
  o.kv_bits = r.kv_bits();
  o.kv_clip = r.f("kv_clip");
  const int64_t L = std::max<int64_t>(1, c.num_hidden_layers);
  o.window = static_cast<int>(std::clamp<int64_t>(window, 1, L));
  o.overlap = static_cast<int>(std::clamp<int64_t>(overlap, 0, o.window - 1));
  o.parallel = r.parallel();
  // gptq + a reconstruction: LoRA-Rounding initialized from GPTQ's solution (cbq.h
  // CbqOptions::gptq_init).
  o.gptq_init = r.weight_solver() == "gptq";
  o.lora_rounding = r.weight_solver() == "lora-rounding" || o.gptq_init;
  o.rank = o.lora_rounding ? static_cast<int>(r.i("lora_rank")) : 0;
  o.gptq.percdamp = r.f("gptq.percdamp");
  o.gptq.blocksize = r.i("gptq.blocksize");
  o.gptq.act_order = r.b("gptq.act_order");
  o.v0_follows_scale = true;  // cbq.h: measured better at W4A16, W2A16 and W4A4KV4
  o.cfp = r.b("cfp");
  o.epochs = static_cast<int>(std::clamp<int64_t>(r.i("cbq_epochs"), 1, 1000000));
  o.head_weight = r.f("cbq_logit_loss");
  o.holdout = r.i("cbq_holdout");
  o.bsz = r.i("cali_bsz");
  o.seed = r.seed();
  return o;
}

bool runs_on_all_ranks(const std::string& type) {
  return type == plan::kTransform || type == plan::kLearn || type == plan::kQuantize ||
         type == plan::kCbqWindow;
}

Result<std::vector<TaskInput>> pipeline_task_inputs(const TaskContext& ctx) {
  // Every file artifact of every dep (the DAG lists exactly what each task reads).
  std::vector<TaskInput> out;
  for (const auto& dep : ctx.task.deps) {
    auto it = ctx.deps.find(dep);
    if (it == ctx.deps.end())
      return invalid_input("task " + ctx.task.id + ": no result for dep " + dep);
    const json& r = it->second;
    if (!r.is_object() || !r.contains("artifacts")) continue;
    if (!r["artifacts"].is_object())
      return invalid_input("task " + ctx.task.id + ": dep " + dep + " has malformed artifacts");
    for (auto a = r["artifacts"].begin(); a != r["artifacts"].end(); ++a) {
      auto ref = ArtifactRef::from_json(a.value());
      if (!ref.is_ok()) return ref.status().with_context("dep " + dep + " artifact " + a.key());
      out.push_back(TaskInput{dep, a.key(), *ref});
    }
  }
  return out;
}

Result<json> run_pipeline_task(const TaskContext& ctx) {
  const std::string& type = ctx.task.type;
  if (!runs_on_all_ranks(type) && ctx.group && !ctx.group->is_root())
    return internal_error("task " + ctx.task.id + " (" + type + ") runs on the root rank only");
  if (type == plan::kEmbed) return run_embed(ctx);
  if (type == plan::kCapture) return run_capture(ctx);
  if (type == plan::kTransform) return run_transform(ctx);
  if (type == plan::kLearn) return run_learn(ctx);
  if (type == plan::kQuantize) return run_quantize(ctx);
  if (type == plan::kCbqWindow) return run_window(ctx);
  if (type == plan::kAssemble) return run_assemble(ctx);
  return invalid_input("task " + ctx.task.id + ": unknown type '" + type + "'");
}

}  // namespace qcal

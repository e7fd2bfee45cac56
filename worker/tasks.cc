#include "worker/tasks.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <sstream>

#include "common/data.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/plan.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/engine/quantize.h"
#include "worker/engine/recipe.h"

namespace qcal {

namespace fs = std::filesystem;

namespace {

constexpr const char* kCancelledPrefix = "cancelled: ";

// Bits of RankGroup::agree between layers.
constexpr int kAgreeFailed = 1;
constexpr int kAgreeCancel = 2;

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void say(const TaskContext& ctx, const std::string& line) {
  if (ctx.log) {
    ctx.log(line);
  } else if (ctx.group && !ctx.group->is_root()) {
    LOG_DEBUG << "rank " << ctx.group->rank() << ": " << ctx.job_id << "/" << ctx.task.id << ": "
              << line;
  } else {
    LOG_INFO << ctx.job_id << "/" << ctx.task.id << ": " << line;
  }
}

Result<int64_t> int_param(const TaskDef& t, const char* name) {
  if (!t.params.is_object() || !t.params.contains(name) || !t.params[name].is_number_integer())
    return invalid_input("task " + t.id + ": params." + name + " must be an integer (params " +
                         t.params.dump() + ")");
  return t.params[name].get<int64_t>();
}

Result<ArtifactRef> dep_artifact(const TaskContext& ctx, const std::string& dep,
                                 const std::string& key) {
  auto it = ctx.deps.find(dep);
  if (it == ctx.deps.end())
    return invalid_input("task " + ctx.task.id + ": no result for dep " + dep);
  const nlohmann::json& r = it->second;
  if (!r.is_object() || !r.contains("artifacts") || !r["artifacts"].is_object() ||
      !r["artifacts"].contains(key))
    return invalid_input("task " + ctx.task.id + ": dep " + dep + " has no artifact '" + key + "'");
  auto ref = ArtifactRef::from_json(r["artifacts"][key]);
  if (!ref.is_ok()) return ref.status().with_context("dep " + dep + " artifact " + key);
  return ref;
}

bool dep_has_artifact(const TaskContext& ctx, const std::string& dep, const std::string& key) {
  auto it = ctx.deps.find(dep);
  if (it == ctx.deps.end()) return false;
  const nlohmann::json& r = it->second;
  return r.is_object() && r.contains("artifacts") && r["artifacts"].is_object() &&
         r["artifacts"].contains(key);
}

std::string act_key(int64_t layer) { return "x." + std::to_string(layer); }

Status need_root(const TaskContext& ctx) {
  if (ctx.group && !ctx.group->is_root())
    return internal_error("task " + ctx.task.id + " (" + ctx.task.type +
                          ") runs on the root rank only");
  return Status::ok();
}

nlohmann::json layer_json(const LayerReport& l) {
  return {{"layer", l.layer},
          {"rel_output_error", l.rel_output_error},
          {"seconds", l.seconds},
          {"proj_losses", l.proj_losses}};
}

// The FP forward of layer `l` over x (N*T, H) in place, in batches (parallel mode).
Status fp_forward(const LlamaModel& m, int64_t l, Tensor& x, int64_t T, int64_t batch) {
  const ModelConfig& c = m.config();
  const int64_t H = c.hidden_size, N = x.dim(0) / T;
  QCAL_ASSIGN_OR_RETURN(LayerWeights w, m.load_layer(l));
  for (int64_t b0 = 0; b0 < N; b0 += batch) {
    int64_t nb = std::min(batch, N - b0);
    block_forward(c, w, x.ptr() + b0 * T * H, nb, T);
  }
  return Status::ok();
}

// ---------------------------------------------------------------- capture

Result<nlohmann::json> run_capture(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(QuantizeOptions opts, quantize_options_from_spec(ctx.spec));
  QCAL_ASSIGN_OR_RETURN(auto model, LlamaModel::open(ctx.spec.model));
  QCAL_RETURN_IF_ERROR(check_quantize_inputs(*model, opts));
  const ModelConfig& c = model->config();
  const DataSpec& d = ctx.spec.calib;
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib,
                        load_token_sequences(d.path, d.seqlen, c.vocab_size, d.nsamples));
  if (calib.count() == 0)
    return invalid_input(d.path + ": calibration data holds no complete sequence");
  if (d.nsamples > 0 && calib.count() < d.nsamples)
    say(ctx, d.path + " holds " + std::to_string(calib.count()) + " sequences of " +
                 std::to_string(d.seqlen) + " tokens; using them all (asked for " +
                 std::to_string(d.nsamples) + ")");
  const int64_t N = calib.count(), T = calib.seqlen;
  QCAL_ASSIGN_OR_RETURN(Tensor x, model->embed(calib, 0, N));  // (N*T, H)

  nlohmann::json arts = nlohmann::json::object();
  auto path = [&](const std::string& name) {
    return task_artifact_path(ctx.job_id, ctx.task.id, ctx.attempt, name + ".safetensors");
  };
  QCAL_ASSIGN_OR_RETURN(ArtifactRef x0, ctx.store->write_activations(path("x"), x, T));
  arts["x"] = x0.to_json();
  if (ctx.spec.recipe.mode == "parallel") {
    // FP inputs of every window's first layer: each window then calibrates
    // from FP activations, independently of the others.
    const int64_t W = ctx.spec.recipe.window, L = c.num_hidden_layers;
    const int64_t last_start = (L - 1) / W * W;
    for (int64_t l = 0; l < last_start; ++l) {
      if (ctx.cancel && ctx.cancel->load())
        return cancelled("capture at layer " + std::to_string(l));
      QCAL_RETURN_IF_ERROR(fp_forward(*model, l, x, T, opts.batch));
      if ((l + 1) % W == 0) {
        QCAL_ASSIGN_OR_RETURN(ArtifactRef r,
                              ctx.store->write_activations(path(act_key(l + 1)), x, T));
        arts[act_key(l + 1)] = r.to_json();
      }
    }
  }
  say(ctx, "captured " + std::to_string(N) + " x " + std::to_string(T) + " tokens");
  return nlohmann::json{{"artifacts", arts}, {"sequences", N}, {"seqlen", T}};
}

// ---------------------------------------------------------------- calibrate

// Which dep and key hold the window's input activations.
Result<TaskInput> calibrate_input(const TaskContext& ctx, int64_t begin) {
  if (ctx.task.deps.empty())
    return invalid_input("task " + ctx.task.id + ": calibrate needs a dep holding its input");
  for (const auto& dep : ctx.task.deps)
    if (dep_has_artifact(ctx, dep, act_key(begin))) {
      QCAL_ASSIGN_OR_RETURN(ArtifactRef r, dep_artifact(ctx, dep, act_key(begin)));
      return TaskInput{dep, act_key(begin), r};
    }
  for (const auto& dep : ctx.task.deps)
    if (dep_has_artifact(ctx, dep, "x")) {
      QCAL_ASSIGN_OR_RETURN(ArtifactRef r, dep_artifact(ctx, dep, "x"));
      return TaskInput{dep, "x", r};
    }
  return invalid_input("task " + ctx.task.id + ": no dep has activations 'x' or '" +
                       act_key(begin) + "'");
}

Result<nlohmann::json> run_calibrate(const TaskContext& ctx) {
  std::unique_ptr<RankGroup> own;
  RankGroup* g = ctx.group;
  if (!g) {
    own = RankGroup::single();
    g = own.get();
  }
  const double t0 = now_s();

  // Every rank checks the same inputs; the root alone reads the store, then
  // tells the others what it found so all leave together on an error.
  Status setup;
  std::unique_ptr<LlamaModel> model;
  QuantizeOptions opts;
  int64_t begin = 0, end = 0, N = 0, T = 0, H = 0;
  Activations in;
  TaskInput input;
  {
    auto o = quantize_options_from_spec(ctx.spec);
    if (!o.is_ok()) setup = o.status();
    if (setup.is_ok()) opts = *o;
    auto b = int_param(ctx.task, "layer_begin");
    auto e = int_param(ctx.task, "layer_end");
    if (setup.is_ok() && !b.is_ok()) setup = b.status();
    if (setup.is_ok() && !e.is_ok()) setup = e.status();
    if (setup.is_ok()) {
      begin = *b;
      end = *e;
      auto m = LlamaModel::open(ctx.spec.model);
      if (!m.is_ok()) setup = m.status();
      if (setup.is_ok()) model = std::move(m).value();
    }
    if (setup.is_ok()) {
      const int64_t L = model->config().num_hidden_layers;
      if (begin < 0 || end <= begin || end > L)
        setup = invalid_input("task " + ctx.task.id + ": layers [" + std::to_string(begin) + ", " +
                              std::to_string(end) + ") not inside [0, " + std::to_string(L) + ")");
    }
    if (setup.is_ok() && g->is_root()) setup = check_quantize_inputs(*model, opts);
    if (setup.is_ok() && g->is_root()) {
      auto i = calibrate_input(ctx, begin);
      if (!i.is_ok()) setup = i.status();
      if (setup.is_ok()) {
        input = *i;
        auto a = ctx.store->read_activations(input.ref);
        if (!a.is_ok()) setup = a.status();
        if (setup.is_ok()) in = std::move(a).value();
      }
      if (setup.is_ok()) {
        H = model->config().hidden_size;
        T = in.seqlen;
        N = in.num_sequences();
        if (in.x.dim(1) != H || T != ctx.spec.calib.seqlen)
          setup = invalid_input(input.ref.path + ": activations " + shape_str(in.x.shape) +
                                " with seqlen " + std::to_string(T) + " do not match hidden " +
                                std::to_string(H) + ", seqlen " +
                                std::to_string(ctx.spec.calib.seqlen));
      }
    }
    if (g->multi()) {
      // The root's verdict and sizes to every rank.
      std::string hdr;
      if (g->is_root())
        hdr = nlohmann::json{
            {"ok", setup.is_ok()},
            {"error", setup.is_ok() ? "" : setup.to_string()},
            {"n", N},
            {"t", T},
            {"h",
             H}}.dump();
      QCAL_RETURN_IF_ERROR(g->broadcast(&hdr));
      auto j = nlohmann::json::parse(hdr);
      if (!g->is_root()) {
        if (!j["ok"].get<bool>() && setup.is_ok())
          setup = internal_error("root rank: " + j["error"].get<std::string>());
        N = j["n"].get<int64_t>();
        T = j["t"].get<int64_t>();
        H = j["h"].get<int64_t>();
      }
      QCAL_ASSIGN_OR_RETURN(int bits, g->agree(setup.is_ok() ? 0 : kAgreeFailed));
      if (bits & kAgreeFailed)
        return setup.is_ok() ? internal_error("another rank failed to set up " + ctx.task.id)
                             : setup;
    } else if (!setup.is_ok()) {
      return setup;
    }
  }

  Tensor x;  // (n*T, H): this rank's sequences
  if (g->multi()) {
    QCAL_RETURN_IF_ERROR(g->scatter_sequences(in.x, N, T, H, &x));
    in.x = Tensor();
  } else {
    x = std::move(in.x);
  }
  const HessianReduce reduce = g->hessian_reduce();
  std::map<std::string, QuantizedLinear> qlinears;
  nlohmann::json layers = nlohmann::json::array();
  const int64_t L = model->config().num_hidden_layers;
  for (int64_t l = begin; l < end; ++l) {
    const bool stop = ctx.cancel && ctx.cancel->load();
    QCAL_ASSIGN_OR_RETURN(int bits, g->agree(stop ? kAgreeCancel : 0));
    if (bits & kAgreeCancel) return cancelled(ctx.task.id + " before layer " + std::to_string(l));
    auto lr = quantize_layer(*model, l, x, T, opts, &qlinears, reduce);
    QCAL_ASSIGN_OR_RETURN(bits, g->agree(lr.is_ok() ? 0 : kAgreeFailed));
    if (!lr.is_ok()) return lr.status().with_context("layer " + std::to_string(l));
    if (bits & kAgreeFailed)
      return internal_error("another rank failed at layer " + std::to_string(l));
    layers.push_back(layer_json(*lr));
    std::ostringstream line;
    line << "layer " << l + 1 << "/" << L << ": rel output error " << lr->rel_output_error << " ("
         << lr->seconds << " s)";
    say(ctx, line.str());
  }

  const bool write_x = ctx.spec.recipe.mode != "parallel" && end < L;
  Tensor out;
  if (write_x) {
    if (g->multi()) {
      QCAL_RETURN_IF_ERROR(g->gather_sequences(x, N, T, H, &out));
    } else {
      out = std::move(x);
    }
  }
  if (!g->is_root()) return nlohmann::json::object();

  nlohmann::json arts = nlohmann::json::object();
  auto path = [&](const std::string& name) {
    return task_artifact_path(ctx.job_id, ctx.task.id, ctx.attempt, name + ".safetensors");
  };
  QCAL_ASSIGN_OR_RETURN(ArtifactRef q, ctx.store->write_qlinears(path("qlinears"), qlinears));
  arts["qlinears"] = q.to_json();
  if (write_x) {
    QCAL_ASSIGN_OR_RETURN(ArtifactRef xr, ctx.store->write_activations(path("x"), out, T));
    arts["x"] = xr.to_json();
  }
  say(ctx, "calibrated layers [" + std::to_string(begin) + ", " + std::to_string(end) + ") on " +
               std::to_string(g->size()) + " rank(s) in " + std::to_string(now_s() - t0) + " s");
  return nlohmann::json{
      {"artifacts", arts}, {"layers", layers}, {"layer_begin", begin}, {"layer_end", end}};
}

// ---------------------------------------------------------------- assemble

uint64_t dir_bytes(const std::string& dir) {
  uint64_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec))
    if (e.is_regular_file(ec)) n += e.file_size(ec);
  return n;
}

Result<nlohmann::json> run_assemble(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(QuantizeOptions opts, quantize_options_from_spec(ctx.spec));
  QCAL_ASSIGN_OR_RETURN(auto model, LlamaModel::open(ctx.spec.model));
  QCAL_ASSIGN_OR_RETURN(std::vector<TaskInput> inputs, task_inputs(ctx));
  std::map<std::string, QuantizedLinear> all;
  for (const TaskInput& in : inputs) {
    if (ctx.cancel && ctx.cancel->load()) return cancelled("assemble while reading inputs");
    QCAL_ASSIGN_OR_RETURN(auto part, ctx.store->read_qlinears(in.ref));
    for (auto& [name, q] : part)
      if (!all.emplace(name, std::move(q)).second)
        return invalid_input("task " + ctx.task.id + ": module " + name +
                             " is produced by more than one calibrate task (" + in.producer + ")");
  }
  const int64_t L = model->config().num_hidden_layers;
  for (int64_t l = 0; l < L; ++l)
    for (const char* proj : kProjNames) {
      std::string name = layer_prefix(l) + proj;
      if (!all.count(name))
        return invalid_input("task " + ctx.task.id + ": no calibrate dep produced " + name);
    }

  // A re-run after a crash between publishing and reporting finds its own
  // output in place: the intent marker (written before publishing) says so.
  const std::string& out = ctx.spec.output.path;
  WriteOptions w = checkpoint_write_options(opts);
  const std::string marker = "jobs/" + ctx.job_id + "/" + ctx.task.id + "/publishing.json";
  if (path_exists(out) && !w.overwrite && path_exists(ctx.store->absolute(marker))) {
    say(ctx, out + " exists from an earlier attempt of this task: replacing it");
    w.overwrite = true;
  }
  if (!path_exists(ctx.store->absolute(marker)))
    QCAL_RETURN_IF_ERROR(
        ctx.store->write_blob(marker, nlohmann::json{{"output", out}}.dump()).status());
  QCAL_RETURN_IF_ERROR(write_quantized_checkpoint(model->dir(), all, w, out));
  const uint64_t bytes = dir_bytes(out);
  say(ctx, "wrote " + out + " (" + checkpoint_format_name(w.format) + ", " + std::to_string(bytes) +
               " bytes, " + std::to_string(all.size()) + " modules)");
  return nlohmann::json{{"output", out},
                        {"bytes", bytes},
                        {"format", checkpoint_format_name(w.format)},
                        {"modules", all.size()}};
}

// ---------------------------------------------------------------- validate

Result<nlohmann::json> run_validate(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  if (!ctx.spec.eval)
    return nlohmann::json{{"report", {{"skipped", "no eval data in the job spec"}}},
                          {"gate_passed", true}};
  std::string out = ctx.spec.output.path;
  for (const auto& dep : ctx.task.deps) {
    auto it = ctx.deps.find(dep);
    if (it != ctx.deps.end() && it->second.is_object() && it->second.contains("output") &&
        it->second["output"].is_string())
      out = it->second["output"].get<std::string>();
  }
  QCAL_ASSIGN_OR_RETURN(auto fp, LlamaModel::open(ctx.spec.model));
  QCAL_ASSIGN_OR_RETURN(auto q, LlamaModel::open(out));
  const ModelConfig &a = q->config(), &b = fp->config();
  if (a.vocab_size != b.vocab_size || a.hidden_size != b.hidden_size ||
      a.num_hidden_layers != b.num_hidden_layers)
    return invalid_input(out + " has a different architecture than " + ctx.spec.model);
  const DataSpec& d = *ctx.spec.eval;
  QCAL_ASSIGN_OR_RETURN(TokenSequences data,
                        load_token_sequences(d.path, d.seqlen, a.vocab_size, d.nsamples));
  if (data.count() == 0) return invalid_input(d.path + ": eval data holds no complete sequence");
  QCAL_ASSIGN_OR_RETURN(EvalResult r, evaluate(*q, data, fp.get()));

  nlohmann::json report = r.to_json();
  nlohmann::json gate = nlohmann::json::object();
  nlohmann::json violations = nlohmann::json::array();
  const GateSpec& gs = ctx.spec.gate;
  const double ppl_increase = r.fp_ppl && *r.fp_ppl > 0 ? r.ppl / *r.fp_ppl - 1.0 : NAN;
  gate["ppl_increase"] = std::isfinite(ppl_increase) ? nlohmann::json(ppl_increase) : nullptr;
  if (gs.max_ppl_increase) {
    gate["max_ppl_increase"] = *gs.max_ppl_increase;
    // NaN never passes.
    if (!(ppl_increase <= *gs.max_ppl_increase)) {
      std::ostringstream s;
      s << "ppl increase " << ppl_increase << " > max " << *gs.max_ppl_increase;
      violations.push_back(s.str());
    }
  }
  if (gs.max_kl) {
    gate["max_kl"] = *gs.max_kl;
    const double kl = r.kl ? *r.kl : NAN;
    if (!(kl <= *gs.max_kl)) {
      std::ostringstream s;
      s << "kl " << kl << " > max " << *gs.max_kl;
      violations.push_back(s.str());
    }
  }
  const bool passed = violations.empty();
  gate["violations"] = violations;
  gate["passed"] = passed;
  report["gate"] = gate;
  std::ostringstream line;
  line << "ppl " << r.ppl << " (fp " << (r.fp_ppl ? *r.fp_ppl : NAN) << "), kl "
       << (r.kl ? *r.kl : NAN) << ": gate " << (passed ? "passed" : "FAILED");
  for (const auto& v : violations) line << "; " << v.get<std::string>();
  say(ctx, line.str());
  return nlohmann::json{{"report", report}, {"gate_passed", passed}};
}

}  // namespace

Status cancelled(const std::string& what) { return unavailable(kCancelledPrefix + what); }

bool is_cancelled(const Status& s) {
  return s.code() == Code::kUnavailable && s.message().rfind(kCancelledPrefix, 0) == 0;
}

Result<std::vector<TaskInput>> task_inputs(const TaskContext& ctx) {
  std::vector<TaskInput> out;
  const std::string& type = ctx.task.type;
  if (type == plan::kCalibrate) {
    QCAL_ASSIGN_OR_RETURN(int64_t begin, int_param(ctx.task, "layer_begin"));
    QCAL_ASSIGN_OR_RETURN(TaskInput in, calibrate_input(ctx, begin));
    out.push_back(std::move(in));
  } else if (type == plan::kAssemble) {
    for (const auto& dep : ctx.task.deps) {
      QCAL_ASSIGN_OR_RETURN(ArtifactRef r, dep_artifact(ctx, dep, "qlinears"));
      out.push_back(TaskInput{dep, "qlinears", r});
    }
  }
  // capture reads the model and the token file (the user's inputs); validate
  // reads the published checkpoint. Neither has a producer to re-run.
  return out;
}

Status find_corrupt_input(const TaskContext& ctx, std::string* producer) {
  producer->clear();
  QCAL_ASSIGN_OR_RETURN(std::vector<TaskInput> inputs, task_inputs(ctx));
  for (const TaskInput& in : inputs) {
    Status s = ctx.store->verify(in.ref);
    if (s.code() == Code::kCorrupt) {
      *producer = in.producer;
      return s;
    }
    QCAL_RETURN_IF_ERROR(s);
  }
  return Status::ok();
}

Result<nlohmann::json> run_task(const TaskContext& ctx) {
  if (!ctx.store) return internal_error("run_task: no artifact store");
  const std::string& type = ctx.task.type;
  if (type == plan::kCapture) return run_capture(ctx);
  if (type == plan::kCalibrate) return run_calibrate(ctx);
  if (type == plan::kAssemble) return run_assemble(ctx);
  if (type == plan::kValidate) return run_validate(ctx);
  return invalid_input("task " + ctx.task.id + ": unknown type '" + type + "'");
}

}  // namespace qcal

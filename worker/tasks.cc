#include "worker/tasks.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <sstream>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/data.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/model_config.h"
#include "common/plan.h"
#include "common/sha256.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/methods.h"
#include "worker/calib/native.h"
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

// Sequences per evaluation batch (evaluate's default).
constexpr int64_t kEvalBatch = 8;

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

// The job's calibration sequences (ctx.spec.calib); says so when there are fewer
// than asked for.
Result<TokenSequences> load_calib(const TaskContext& ctx, int64_t vocab) {
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

// ---------------------------------------------------------------- capture

Result<nlohmann::json> run_capture(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(QuantizeOptions opts, quantize_options_from_spec(ctx.spec));
  QCAL_ASSIGN_OR_RETURN(auto model, LlamaModel::open(ctx.spec.model));
  QCAL_RETURN_IF_ERROR(check_quantize_inputs(*model, opts));
  const ModelConfig& c = model->config();
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib(ctx, c.vocab_size));
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
  const double t0 = steady_seconds();

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
               std::to_string(g->size()) + " rank(s) in " + std::to_string(steady_seconds() - t0) +
               " s");
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

  // Staged beside output.path, published under the fence (worker/publish.h); a
  // re-run after a crash between publishing and reporting replaces its own output.
  const std::string& out = ctx.spec.output.path;
  WriteOptions w = checkpoint_write_options(opts);
  QCAL_ASSIGN_OR_RETURN(OutputPublication pub, OutputPublication::begin(ctx));
  w.overwrite = false;
  QCAL_RETURN_IF_ERROR(write_quantized_checkpoint(model->dir(), all, w, pub.staging()));
  QCAL_RETURN_IF_ERROR(pub.commit());
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
  const ModelConfig& b = fp->config();
  const DataSpec& d = *ctx.spec.eval;
  auto same_arch = [&](const ModelConfig& a) -> Status {
    if (a.vocab_size != b.vocab_size || a.hidden_size != b.hidden_size ||
        a.num_hidden_layers != b.num_hidden_layers)
      return invalid_input(out + " has a different architecture than " + ctx.spec.model);
    return Status::ok();
  };
  auto load_eval = [&]() -> Result<TokenSequences> {
    QCAL_ASSIGN_OR_RETURN(TokenSequences data,
                          load_token_sequences(d.path, d.seqlen, b.vocab_size, d.nsamples));
    if (data.count() == 0) return invalid_input(d.path + ": eval data holds no complete sequence");
    return data;
  };
  EvalResult r;
  if (calib::is_native_dir(out)) {
    // A native qcal checkpoint: quantized inference with the integer kernels.
    QCAL_ASSIGN_OR_RETURN(calib::NativeModel nm, calib::read_native(out));
    QCAL_RETURN_IF_ERROR(same_arch(nm.config));
    QCAL_ASSIGN_OR_RETURN(TokenSequences data, load_eval());
    QCAL_ASSIGN_OR_RETURN(r, calib::evaluate_native(nm, data, fp.get(), kEvalBatch));
  } else {
    QCAL_ASSIGN_OR_RETURN(auto q, LlamaModel::open(out));
    QCAL_RETURN_IF_ERROR(same_arch(q->config()));
    QCAL_ASSIGN_OR_RETURN(TokenSequences data, load_eval());
    QCAL_ASSIGN_OR_RETURN(r, evaluate(*q, data, fp.get()));
  }

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

// ---------------------------------------------------------------- calibration recipes

// Directory artifacts (common/plan.h): every file under store-relative `rel` (a
// file or a directory) as refs in `arts`, keyed "<name>" (a file) or
// "<name>/<path inside>" (a directory, sorted).
Status add_tree_refs(const ArtifactStore& store, const std::string& rel, const std::string& name,
                     nlohmann::json* arts) {
  const std::string abs = store.absolute(rel);
  std::error_code ec;
  if (fs::is_regular_file(abs, ec)) {
    QCAL_ASSIGN_OR_RETURN(FileDigest d, sha256_file(abs));
    (*arts)[name] = ArtifactRef{rel, d.sha256, d.bytes}.to_json();
    return Status::ok();
  }
  if (!fs::is_directory(abs, ec)) return io_error(abs + ": not written");
  std::vector<std::string> files;
  for (auto it = fs::recursive_directory_iterator(abs, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
    if (it->is_regular_file(ec)) files.push_back(fs::relative(it->path(), abs).generic_string());
  if (ec) return io_error(abs + ": " + ec.message());
  if (files.empty()) return io_error(abs + ": empty directory");
  std::sort(files.begin(), files.end());
  for (const std::string& f : files) {
    QCAL_ASSIGN_OR_RETURN(FileDigest d, sha256_file(abs + "/" + f));
    (*arts)[name + "/" + f] = ArtifactRef{rel + "/" + f, d.sha256, d.bytes}.to_json();
  }
  return Status::ok();
}

// A file or directory artifact `name` of a dep: its store-relative path and files.
struct TreeInput {
  std::string producer;
  std::string path;  // relative to the store root
  std::vector<TaskInput> files;
};

bool dep_has_tree(const TaskContext& ctx, const std::string& dep, const std::string& name) {
  auto it = ctx.deps.find(dep);
  if (it == ctx.deps.end() || !it->second.is_object() || !it->second.contains("artifacts") ||
      !it->second["artifacts"].is_object())
    return false;
  for (auto a = it->second["artifacts"].begin(); a != it->second["artifacts"].end(); ++a)
    if (a.key() == name || a.key().rfind(name + "/", 0) == 0) return true;
  return false;
}

Result<TreeInput> dep_tree(const TaskContext& ctx, const std::string& dep,
                           const std::string& name) {
  if (!dep_has_tree(ctx, dep, name))
    return invalid_input("task " + ctx.task.id + ": dep " + dep + " has no artifact '" + name +
                         "'");
  TreeInput t;
  t.producer = dep;
  const nlohmann::json& arts = ctx.deps.at(dep)["artifacts"];
  for (auto a = arts.begin(); a != arts.end(); ++a) {
    const std::string& key = a.key();
    const bool file = key == name;
    if (!file && key.rfind(name + "/", 0) != 0) continue;
    auto ref = ArtifactRef::from_json(a.value());
    if (!ref.is_ok()) return ref.status().with_context("dep " + dep + " artifact " + key);
    std::string root = ref->path;
    if (!file) {
      const std::string inside = key.substr(name.size());  // "/<path inside>"
      if (root.size() <= inside.size() ||
          root.compare(root.size() - inside.size(), inside.size(), inside) != 0)
        return invalid_input("task " + ctx.task.id + ": dep " + dep + " artifact " + key +
                             " is stored at " + ref->path);
      root.resize(root.size() - inside.size());
    }
    if (!t.path.empty() && t.path != root)
      return invalid_input("task " + ctx.task.id + ": dep " + dep + " artifact " + name +
                           " spans " + t.path + " and " + root);
    t.path = root;
    t.files.push_back(TaskInput{dep, key, *ref});
  }
  return t;
}

// The first dep holding artifact `name`.
Result<TreeInput> find_tree(const TaskContext& ctx, const std::string& name) {
  for (const auto& dep : ctx.task.deps)
    if (dep_has_tree(ctx, dep, name)) return dep_tree(ctx, dep, name);
  return invalid_input("task " + ctx.task.id + ": no dep has artifact '" + name + "'");
}

Status verify_tree(const TaskContext& ctx, const TreeInput& t) {
  for (const TaskInput& f : t.files) QCAL_RETURN_IF_ERROR(ctx.store->verify(f.ref));
  return Status::ok();
}

calib::CalibProgress progress_to(const TaskContext& ctx) {
  return [&ctx](const std::string& stage, int64_t i, int64_t n) {
    say(ctx, stage + " " + std::to_string(i + 1) + "/" + std::to_string(n));
  };
}

// calib: one task, the whole calibration in process (calibrate_to_dir).
Result<nlohmann::json> run_calib(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(ModelConfig c, load_model_config(join_path(ctx.spec.model, "config.json")));
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, calib_recipe_from_spec(ctx.spec, &c));
  std::string format;
  if (ctx.task.params.is_object() && ctx.task.params.contains("format") &&
      ctx.task.params["format"].is_string()) {
    format = ctx.task.params["format"].get<std::string>();
  } else {
    QCAL_ASSIGN_OR_RETURN(format, calib_output_format(ctx.spec, r));
  }
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib(ctx, c.vocab_size));
  if (ctx.cancel && ctx.cancel->load()) return cancelled("calib before starting");
  const std::string& out = ctx.spec.output.path;
  QCAL_ASSIGN_OR_RETURN(OutputPublication pub, OutputPublication::begin(ctx));  // publish.h
  QCAL_ASSIGN_OR_RETURN(calib::CalibReport rep,
                        calib::calibrate_to_dir(ctx.spec.model, calib, r, pub.staging(), format,
                                                /*overwrite=*/false, progress_to(ctx)));
  QCAL_RETURN_IF_ERROR(pub.commit());
  const uint64_t bytes = dir_bytes(out);
  if (rep.intactkv_cal) {
    std::ostringstream line;
    line << "intactkv-cal: " << rep.intactkv_cal->steps << " steps, loss "
         << rep.intactkv_cal->loss_first << " -> " << rep.intactkv_cal->loss_last;
    say(ctx, line.str());
  }
  say(ctx, "wrote " + out + " (" + format + ", " + std::to_string(bytes) + " bytes) in " +
               std::to_string(rep.seconds) + " s");
  return nlohmann::json{
      {"output", out}, {"bytes", bytes}, {"format", format}, {"report", rep.to_json()}};
}

// capture of a reconstruction recipe: everything before the first window.
Result<nlohmann::json> run_cbq_capture(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(calib::FpModel fp, calib::load_fp_model(ctx.spec.model));
  const ModelConfig& c = fp.config;
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, calib_recipe_from_spec(ctx.spec, &c));
  QCAL_ASSIGN_OR_RETURN(TokenSequences calib, load_calib(ctx, c.vocab_size));
  if (ctx.cancel && ctx.cancel->load()) return cancelled("capture before starting");
  calib::CalibReport rep;
  QCAL_ASSIGN_OR_RETURN(calib::CbqSetup setup, calib::cbq_prepare(fp, calib, r, &rep));
  const calib::CbqOptions o = calib::cbq_options(r, setup);
  const auto windows = calib::cbq_plan(c.num_hidden_layers, o.window, o.overlap);
  const std::string rel = task_artifact_path(ctx.job_id, ctx.task.id, ctx.attempt, "setup");
  std::error_code ec;
  fs::create_directories(fs::path(ctx.store->absolute(rel)).parent_path(), ec);
  if (ec) return io_error(ctx.store->absolute(rel) + ": " + ec.message());
  QCAL_RETURN_IF_ERROR(calib::save_cbq_setup(setup, ctx.store->absolute(rel)));
  nlohmann::json arts = nlohmann::json::object();
  QCAL_RETURN_IF_ERROR(add_tree_refs(*ctx.store, rel, "setup", &arts));
  say(ctx, "prepared " + std::to_string(setup.N) + " x " + std::to_string(setup.T) +
               " tokens for " + std::to_string(windows.size()) + " window(s)");
  return nlohmann::json{{"artifacts", arts},
                        {"sequences", setup.N},
                        {"seqlen", setup.T},
                        {"windows", windows.size()},
                        {"report", rep.to_json()}};
}

nlohmann::json window_json(const calib::CbqWindowReport& w) {
  return {{"window", w.window},       {"first", w.first},
          {"last", w.last},           {"loss_first", w.loss_first},
          {"loss_last", w.loss_last}, {"loss_hard_init", w.loss_hard_init},
          {"loss_hard", w.loss_hard}, {"steps", w.steps},
          {"seconds", w.seconds}};
}

// One CBQ window: setup + the previous window's state → the next state.
Result<nlohmann::json> run_cbq_window(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(int64_t w, int_param(ctx.task, "window"));
  if (ctx.cancel && ctx.cancel->load()) return cancelled(ctx.task.id + " before starting");
  QCAL_ASSIGN_OR_RETURN(TreeInput setup_in, find_tree(ctx, "setup"));
  QCAL_RETURN_IF_ERROR(verify_tree(ctx, setup_in));
  std::optional<TreeInput> state_in;
  if (w > 0) {
    QCAL_ASSIGN_OR_RETURN(TreeInput t, find_tree(ctx, "state"));
    QCAL_RETURN_IF_ERROR(verify_tree(ctx, t));
    state_in = std::move(t);
  }
  QCAL_ASSIGN_OR_RETURN(calib::CbqSetup setup,
                        calib::load_cbq_setup(ctx.store->absolute(setup_in.path)));
  const ModelConfig& c = setup.model.config;
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, calib_recipe_from_spec(ctx.spec, &c));
  calib::CbqOptions o = calib::cbq_options(r, setup);
  if (ctx.cancel) o.should_stop = [&ctx] { return ctx.cancel->load(); };
  const std::vector<calib::CbqWindow> plan =
      calib::cbq_plan(c.num_hidden_layers, o.window, o.overlap);
  if (w < 0 || w >= static_cast<int64_t>(plan.size()))
    return invalid_input("task " + ctx.task.id + ": window " + std::to_string(w) +
                         " not in the recipe's " + std::to_string(plan.size()) + " windows");
  const calib::CbqWindow& win = plan[static_cast<size_t>(w)];
  for (const auto& [key, v] : {std::pair<const char*, int64_t>{"first", win.first},
                               {"last", win.last},
                               {"finalize_last", win.finalize_last}}) {
    auto p = int_param(ctx.task, key);
    if (p.is_ok() && *p != v)
      return invalid_input("task " + ctx.task.id + ": params." + key + " " + std::to_string(*p) +
                           " but the recipe's window " + std::to_string(w) + " has " +
                           std::to_string(v));
  }
  calib::CbqState state;
  if (w == 0) {
    state = calib::cbq_initial_state(setup.x0, o);
  } else {
    std::vector<calib::CbqLayerResult> earlier;  // read by assemble, not here
    QCAL_ASSIGN_OR_RETURN(state,
                          calib::load_cbq_state(ctx.store->absolute(state_in->path), &earlier));
    say(ctx, "resuming from the state of " + state_in->producer);
  }
  if (state.next_window != w)
    return invalid_input("task " + ctx.task.id + ": the state " +
                         (state_in ? "of " + state_in->producer : std::string("at start")) +
                         " is at window " + std::to_string(state.next_window) + ", not " +
                         std::to_string(w));
  if (ctx.cancel && ctx.cancel->load()) return cancelled(ctx.task.id + " before starting");
  std::vector<calib::BlockWeightsT<float>*> layers;
  for (int64_t l = win.first; l <= win.last; ++l)
    layers.push_back(&setup.model.layers[static_cast<size_t>(l)]);
  std::vector<calib::CbqLayerResult> finalized;
  calib::CbqWindowReport rep;
  if (Status st =
          calib::cbq_run_window(c, o, plan, setup.N, setup.T, layers, &state, &finalized, &rep);
      !st.is_ok()) {
    if (ctx.cancel && ctx.cancel->load()) return cancelled(ctx.task.id + ": " + st.message());
    return st;
  }
  const std::string rel = task_artifact_path(ctx.job_id, ctx.task.id, ctx.attempt, "state");
  std::error_code ec;
  fs::create_directories(fs::path(ctx.store->absolute(rel)).parent_path(), ec);
  if (ec) return io_error(ctx.store->absolute(rel) + ": " + ec.message());
  QCAL_RETURN_IF_ERROR(calib::save_cbq_state(state, finalized, ctx.store->absolute(rel)));
  nlohmann::json arts = nlohmann::json::object();
  QCAL_RETURN_IF_ERROR(add_tree_refs(*ctx.store, rel, "state", &arts));
  nlohmann::json fin = nlohmann::json::array();
  for (const auto& l : finalized) fin.push_back(l.layer);
  std::ostringstream line;
  line << "window " << w + 1 << "/" << plan.size() << " (layers " << win.first << ".." << win.last
       << "): loss " << rep.loss_first << " -> " << rep.loss_last << ", hardened "
       << rep.loss_hard_init << " -> " << rep.loss_hard << " (" << rep.seconds << " s)";
  say(ctx, line.str());
  return nlohmann::json{{"artifacts", arts}, {"window", window_json(rep)}, {"finalized", fin}};
}

// assemble of a reconstruction recipe: every window's finalized layers → native.
Result<nlohmann::json> run_cbq_assemble(const TaskContext& ctx) {
  QCAL_RETURN_IF_ERROR(need_root(ctx));
  QCAL_ASSIGN_OR_RETURN(TreeInput setup_in, find_tree(ctx, "setup"));
  QCAL_RETURN_IF_ERROR(verify_tree(ctx, setup_in));
  QCAL_ASSIGN_OR_RETURN(calib::CbqSetup setup,
                        calib::load_cbq_setup(ctx.store->absolute(setup_in.path)));
  const ModelConfig& c = setup.model.config;
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, calib_recipe_from_spec(ctx.spec, &c));
  std::vector<calib::CbqLayerResult> layers;
  for (const auto& dep : ctx.task.deps) {
    if (!dep_has_tree(ctx, dep, "state")) continue;
    if (ctx.cancel && ctx.cancel->load()) return cancelled("assemble while reading inputs");
    QCAL_ASSIGN_OR_RETURN(TreeInput t, dep_tree(ctx, dep, "state"));
    QCAL_RETURN_IF_ERROR(verify_tree(ctx, t));
    std::vector<calib::CbqLayerResult> fin;
    QCAL_RETURN_IF_ERROR(calib::load_cbq_state(ctx.store->absolute(t.path), &fin).status());
    for (auto& l : fin) layers.push_back(std::move(l));
  }
  const int64_t L = c.num_hidden_layers;
  if (static_cast<int64_t>(layers.size()) != L)
    return invalid_input("task " + ctx.task.id + ": the windows finalized " +
                         std::to_string(layers.size()) + " layers, the model has " +
                         std::to_string(L));
  for (int64_t l = 0; l < L; ++l)
    if (layers[static_cast<size_t>(l)].layer != l)
      return invalid_input("task " + ctx.task.id + ": finalized layer " + std::to_string(l) +
                           " is layer " + std::to_string(layers[static_cast<size_t>(l)].layer));
  // IntactKV "+Cal" trains the prefix cache on the calibration data: this task reads
  // it from the user's token file, as the capture task does.
  std::optional<TokenSequences> calib;
  if (r.intactkv && r.intactkv_cal) {
    QCAL_ASSIGN_OR_RETURN(TokenSequences data, load_calib(ctx, c.vocab_size));
    calib = std::move(data);
  }
  if (ctx.cancel && ctx.cancel->load()) return cancelled("assemble before finishing");
  calib::CalibReport rep;
  QCAL_ASSIGN_OR_RETURN(
      calib::NativeModel nm,
      calib::cbq_finish(setup, layers, r, calib ? &*calib : nullptr, &rep, progress_to(ctx)));
  const std::string& out = ctx.spec.output.path;
  QCAL_ASSIGN_OR_RETURN(OutputPublication pub, OutputPublication::begin(ctx));  // publish.h
  QCAL_RETURN_IF_ERROR(calib::write_native(nm, pub.staging(), /*overwrite=*/false));
  QCAL_RETURN_IF_ERROR(pub.commit());
  const uint64_t bytes = dir_bytes(out);
  say(ctx, "wrote " + out + " (native, " + std::to_string(bytes) + " bytes, " + std::to_string(L) +
               " layers)");
  nlohmann::json res{{"output", out}, {"bytes", bytes}, {"format", "native"}, {"layers", L}};
  if (rep.intactkv_cal) {
    const calib::IntactKvCalReport& k = *rep.intactkv_cal;
    std::ostringstream line;
    line << "intactkv-cal: " << k.steps << " steps, loss " << k.loss_first << " -> " << k.loss_last
         << " (" << k.seconds << " s)";
    say(ctx, line.str());
    res["report"] = rep.to_json();
  }
  return res;
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
  } else if (type == plan::kCbqWindow ||
             (type == plan::kAssemble && ctx.spec.recipe.calibration())) {
    // The setup and the states: every file artifact of every dep.
    for (const auto& dep : ctx.task.deps) {
      auto it = ctx.deps.find(dep);
      if (it == ctx.deps.end())
        return invalid_input("task " + ctx.task.id + ": no result for dep " + dep);
      const nlohmann::json& r = it->second;
      if (!r.is_object() || !r.contains("artifacts") || !r["artifacts"].is_object())
        return invalid_input("task " + ctx.task.id + ": dep " + dep + " has no artifacts");
      for (auto a = r["artifacts"].begin(); a != r["artifacts"].end(); ++a) {
        auto ref = ArtifactRef::from_json(a.value());
        if (!ref.is_ok()) return ref.status().with_context("dep " + dep + " artifact " + a.key());
        out.push_back(TaskInput{dep, a.key(), *ref});
      }
    }
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
  const bool calibration = ctx.spec.recipe.calibration();
  if (type == plan::kCapture) return calibration ? run_cbq_capture(ctx) : run_capture(ctx);
  if (type == plan::kCalibrate) return run_calibrate(ctx);
  if (type == plan::kCalib) return run_calib(ctx);
  if (type == plan::kCbqWindow) return run_cbq_window(ctx);
  if (type == plan::kAssemble) return calibration ? run_cbq_assemble(ctx) : run_assemble(ctx);
  if (type == plan::kValidate) return run_validate(ctx);
  return invalid_input("task " + ctx.task.id + ": unknown type '" + type + "'");
}

}  // namespace qcal

#include "coordinator/planner.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <system_error>

#include "common/model_dir.h"
#include "common/plan.h"
#include "coordinator/memory_guard.h"
#include "worker/calib/methods.h"
#include "worker/engine/qformats.h"
#include "worker/engine/quantizer.h"
#include "worker/engine/recipe.h"

namespace qcal {

namespace fs = std::filesystem;

const std::vector<MethodInfo>& supported_methods() {
  // One row per method the workers run. Order is the order error messages list them.
  static const std::vector<MethodInfo> kMethods = {
      {"rtn", /*uses_hessian=*/false, /*overlapping_windows=*/false},
      {"gptq", /*uses_hessian=*/true, /*overlapping_windows=*/false},
  };
  return kMethods;
}

const MethodInfo* find_method(const std::string& name) {
  for (const auto& m : supported_methods())
    if (name == m.name) return &m;
  return nullptr;
}

std::string format_bytes(uint64_t bytes) {
  static const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes) / 1024.0;
  int u = 0;
  while (v >= 1024.0 && u < 3) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  return buf;
}

uint64_t MemoryEstimate::total() const {
  uint64_t t = 0;
  for (const auto& [name, bytes] : parts) t += bytes;
  return t;
}

std::string MemoryEstimate::describe() const {
  std::string s;
  for (const auto& [name, bytes] : parts) {
    if (!s.empty()) s += ", ";
    s += name + " " + format_bytes(bytes);
  }
  return s;
}

nlohmann::json MemoryEstimate::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  j["total"] = total();
  for (const auto& [name, bytes] : parts) j[name] = bytes;
  return j;
}

namespace {

using u64 = uint64_t;

u64 u(int64_t v) { return v > 0 ? static_cast<u64>(v) : 0; }

// Shapes of one block, from the config.
struct BlockShapes {
  u64 H, I, Q, K, V;
  u64 linear_params;  // the seven projections
  u64 params;         // plus norms and q/k/v bias
  u64 max_in;         // largest linear input width
  u64 quantized;      // in-memory QuantizedLinear bytes of the seven projections
};

// Bytes of a QuantizedLinear (O, I) in memory: one byte per code, fp32 scales
// and int32 zeros per (group, row), int32 g_idx.
u64 qlinear_bytes(u64 O, u64 I, int64_t group_size) {
  u64 G = group_size <= 0 ? 1 : (I + u(group_size) - 1) / u(group_size);
  return O * I + G * O * 8 + I * 4;
}

BlockShapes block_shapes(const ModelConfig& c, int64_t group_size) {
  BlockShapes b{};
  b.H = u(c.hidden_size);
  b.I = u(c.intermediate_size);
  b.Q = u(c.q_dim());
  b.K = u(c.kv_dim());
  b.V = u(c.vocab_size);
  b.linear_params = b.Q * b.H + 2 * b.K * b.H + b.H * b.Q + 3 * b.I * b.H;
  b.params = b.linear_params + 2 * b.H + (c.attention_bias ? b.Q + 2 * b.K : 0);
  b.max_in = std::max({b.H, b.Q, b.I});
  for (const char* proj : kProjNames) {
    auto s = proj_shape(c, proj);
    b.quantized += qlinear_bytes(u(s[0]), u(s[1]), group_size);
  }
  return b;
}

// block_forward's arena for `batch` sequences of `T` tokens.
u64 batch_arena(const BlockShapes& b, u64 batch, u64 T) {
  return batch * T * (b.H + std::max(2 * b.Q + 2 * b.K, 2 * b.I)) * 4;
}

// Checks a token file and returns its size in bytes.
Result<u64> check_data_file(const std::string& field, const std::string& path) {
  std::error_code ec;
  auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) return not_found(field + ": " + path + " does not exist");
  if (!fs::is_regular_file(st)) return invalid_input(field + ": " + path + " is not a file");
  const std::string ext = fs::path(path).extension().string();
  if (ext != ".jsonl" && ext != ".u32")
    return invalid_input(field + ": " + path + " must be a .jsonl or .u32 token file (got '" + ext +
                         "')");
  if (::access(path.c_str(), R_OK) != 0)
    return invalid_input(field + ": " + path + " is not readable");
  auto size = fs::file_size(path, ec);
  if (ec) return io_error(field + ": " + path + ": " + ec.message());
  return static_cast<u64>(size);
}

// Sequences the workers will hold: nsamples, or an upper bound from the file
// when nsamples is 0 ("all").
u64 sequences_bound(const DataSpec& d, u64 file_bytes) {
  if (d.nsamples > 0) return u(d.nsamples);
  const u64 T = std::max<u64>(1, u(d.seqlen));
  const bool u32 = fs::path(d.path).extension() == ".u32";
  return std::max<u64>(1, file_bytes / (u32 ? 4 : 2) / T);
}

Status check_output(const OutputSpec& out, const std::string& model_dir) {
  std::error_code ec;
  const fs::path p = fs::absolute(out.path, ec);
  if (ec) return invalid_input("output.path: " + out.path + ": " + ec.message());
  if (fs::weakly_canonical(p, ec) == fs::weakly_canonical(fs::absolute(model_dir), ec))
    return invalid_input("output.path: " + out.path + " is the model directory");
  auto st = fs::symlink_status(p, ec);
  if (fs::exists(st)) {
    if (!out.overwrite)
      return invalid_input("output.path: " + out.path +
                           " exists (set output.overwrite to replace it)");
    if (!fs::is_directory(fs::status(p, ec)))
      return invalid_input("output.path: " + out.path + " exists and is not a directory");
  }
  // The nearest existing ancestor must be a directory we may create entries in.
  fs::path a = p.parent_path();
  while (!a.empty() && !fs::exists(a, ec)) {
    if (a == a.parent_path()) break;
    a = a.parent_path();
  }
  if (a.empty() || !fs::is_directory(a, ec))
    return invalid_input("output.path: " + out.path + ": " + a.string() + " is not a directory");
  if (::access(a.c_str(), W_OK | X_OK) != 0)
    return invalid_input("output.path: " + out.path + ": directory " + a.string() +
                         " is not writable");
  return Status::ok();
}

std::string calibrate_id(int64_t w) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "calibrate-%04lld", static_cast<long long>(w));
  return buf;
}

// What a user can change to make a refused task fit.
std::string fit_hint(const TaskDef& t, const MemoryEstimate& m, const JobSpec& spec) {
  std::string largest;
  u64 most = 0;
  for (const auto& [name, bytes] : m.parts) {
    if (bytes > most) {
      most = bytes;
      largest = name;
    }
  }
  if (largest == "activations" && t.type == plan::kValidate) return "lower eval.seqlen";
  if (largest == "activations" || largest == "embeddings")
    return "lower calib.nsamples or calib.seqlen";
  if (largest == "weights" && t.type == plan::kCalibrate && spec.recipe.window > 1)
    return "lower recipe.window";
  return "this model needs workers with more memory";
}

std::string cbq_window_id(int64_t w) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s-%04lld", plan::kCbqWindow, static_cast<long long>(w));
  return buf;
}

const char* reconstruction_name(calib::Reconstruction r) {
  switch (r) {
    case calib::Reconstruction::kNone: return "none";
    case calib::Reconstruction::kBlock: return "block";
    case calib::Reconstruction::kCbq: return "cbq";
  }
  return "none";
}

// The calibration DAGs of common/plan.h (spec.recipe.calib set).
// The eval batch of the validate task: logits and activations of `eb` sequences,
// and the eval tokens, all held at once (`eval_seqs`, bounded by the file for 0 = all).
void add_eval_parts(MemoryEstimate* m, const BlockShapes& b, u64 eb, u64 eval_T, u64 eval_seqs) {
  m->parts.push_back({"eval data", eval_seqs * eval_T * 4});
  m->parts.push_back({"activations", 2 * eb * eval_T * (b.H + b.V) * 4});
  m->parts.push_back({"batch", batch_arena(b, eb, eval_T)});
}

// Sets every task's mem_bytes from `est` (one per task, in order) and refuses the
// plan when the largest does not fit a worker. Returns the summary's memory keys:
// "peak" (task, bytes), "worker_memory_bytes" and "estimates" (by task id).
Result<nlohmann::json> set_task_memory(Plan* plan, const std::vector<MemoryEstimate>& est,
                                       const PlannerLimits& limits, const JobSpec& spec) {
  size_t peak = 0;
  for (size_t i = 0; i < plan->tasks.size(); ++i) {
    plan->tasks[i].mem_bytes = est[i].total();
    if (est[i].total() > est[peak].total()) peak = i;
  }
  if (est[peak].total() > limits.worker_memory_bytes) {
    const TaskDef& t = plan->tasks[peak];
    return resource_exhausted(t.id + " needs " + format_bytes(est[peak].total()) + " (" +
                              est[peak].describe() + ") but workers have " +
                              format_bytes(limits.worker_memory_bytes) + "; " +
                              fit_hint(t, est[peak], spec));
  }
  nlohmann::json estimates = nlohmann::json::object();
  for (size_t i = 0; i < plan->tasks.size(); ++i) estimates[plan->tasks[i].id] = est[i].to_json();
  return nlohmann::json{{"peak", {{"task", plan->tasks[peak].id}, {"bytes", est[peak].total()}}},
                        {"worker_memory_bytes", limits.worker_memory_bytes},
                        {"estimates", estimates}};
}

// Every projection of `c` quantized per `qspec` can be written as `f`.
Status check_format_writable(const ModelConfig& c, const QuantSpec& qspec, bool act_order,
                             CheckpointFormat f) {
  for (const char* proj : kProjNames) {
    auto shape = proj_shape(c, proj);
    QuantizedLinear probe;
    probe.out_features = shape[0];
    probe.in_features = shape[1];
    probe.spec = qspec;
    probe.act_order = act_order;
    Status st = check_writable(probe, f);
    if (!st.is_ok())
      return st.with_context("output.format " + std::string(checkpoint_format_name(f)) + ": " +
                             proj);
  }
  return Status::ok();
}

// The job's data files and output path, checked; the sizes the estimates need.
struct DataBounds {
  u64 calib_seqs = 0, eval_seqs = 0, eval_T = 0;
};
Result<DataBounds> check_data_and_output(const JobSpec& spec) {
  DataBounds d;
  QCAL_ASSIGN_OR_RETURN(u64 calib_bytes, check_data_file("calib.path", spec.calib.path));
  d.calib_seqs = sequences_bound(spec.calib, calib_bytes);
  if (spec.eval) {
    QCAL_ASSIGN_OR_RETURN(u64 eval_bytes, check_data_file("eval.path", spec.eval->path));
    d.eval_seqs = sequences_bound(*spec.eval, eval_bytes);
    d.eval_T = u(spec.eval->seqlen);
  }
  QCAL_RETURN_IF_ERROR(check_output(spec.output, spec.model));
  return d;
}

Result<Plan> plan_calibration(const JobSpec& spec, const PlannerLimits& limits) {
  // The recipe on its own first: its errors name recipe fields and need no files.
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, calib_recipe_from_spec(spec));
  QCAL_ASSIGN_OR_RETURN(std::string format, calib_output_format(spec, r));
  if (spec.calib.seqlen < 2) return invalid_input("calib.seqlen: must be at least 2");

  auto dir_or = ModelDir::open(spec.model);
  if (!dir_or.is_ok()) return dir_or.status().with_context("model");
  const ModelDir& dir = **dir_or;
  if (dir.quantization_config())
    return invalid_input("model: " + spec.model +
                         " is already quantized (config.json has quantization_config); "
                         "submit the FP checkpoint");
  QCAL_RETURN_IF_ERROR(dir.validate_fp_model().with_context("model"));
  const ModelConfig& c = dir.config();
  QCAL_RETURN_IF_ERROR(calib_recipe_from_spec(spec, &c).status());
  const bool reconstruct = r.reconstruction != calib::Reconstruction::kNone;
  calib::CbqOptions cbq;
  if (reconstruct) {
    cbq = calib::cbq_options(r, c);
    Status s = cbq.validate(c);
    if (!s.is_ok()) return Status(s.code(), "recipe (reconstruction): " + s.message());
  }
  if (format != "native") {
    // Everything folds: the engine's GPTQ / compressed-tensors writers pack it.
    QuantSpec qspec;
    qspec.bits = r.w_bits;
    qspec.group_size = r.w_group;
    qspec.sym = true;
    QCAL_ASSIGN_OR_RETURN(CheckpointFormat f, parse_checkpoint_format(format));
    QCAL_RETURN_IF_ERROR(check_format_writable(
        c, qspec, r.weight_solver == calib::WeightSolver::kGptq && r.gptq.act_order, f));
  }

  QCAL_ASSIGN_OR_RETURN(const DataBounds data, check_data_and_output(spec));
  QCAL_RETURN_IF_ERROR(check_estimate_range(spec, c, data.calib_seqs, data.eval_seqs,
                                            std::max(limits.batch, r.batch)));

  // ---- Shapes for the estimates.
  const int64_t L = c.num_hidden_layers;
  const BlockShapes b = block_shapes(c, r.w_group);
  const u64 N = data.calib_seqs;
  const u64 T = u(spec.calib.seqlen);
  const u64 batch = std::max<u64>(1, u(std::min<int64_t>(limits.batch, r.batch)));
  const u64 x_bytes = N * T * b.H * 4;
  // The whole FP model in fp32 (FpModel: every block, embeddings, lm_head copy).
  const u64 model_bytes = (u(L) * b.params + 2 * b.V * b.H + b.H) * 4;
  const u64 arena = batch_arena(b, std::min(batch, N), T);

  Plan plan;
  std::vector<MemoryEstimate> est;
  int64_t windows = 0;
  std::string validate_dep;
  if (!reconstruct) {
    TaskDef t;
    t.id = plan::kCalib;
    t.type = plan::kCalib;
    t.params["format"] = format;
    plan.tasks.push_back(t);
    MemoryEstimate m;
    m.parts.push_back({"weights", 2 * model_bytes});  // FP + transformed / quantized
    m.parts.push_back({"activations", 3 * x_bytes});  // quantized path, FP in / out
    m.parts.push_back({"batch", arena});
    est.push_back(m);
    validate_dep = t.id;
  } else {
    const std::vector<calib::CbqWindow> wins = calib::cbq_plan(L, cbq.window, cbq.overlap);
    windows = static_cast<int64_t>(wins.size());
    TaskDef capture;
    capture.id = plan::kCapture;
    capture.type = plan::kCapture;
    capture.params["cbq"] = true;
    plan.tasks.push_back(capture);
    MemoryEstimate mc;
    mc.parts.push_back({"weights", 2 * model_bytes});  // FP + the setup's transformed model
    mc.parts.push_back({"activations", 2 * x_bytes});
    mc.parts.push_back({"batch", arena});
    est.push_back(mc);
    std::vector<std::string> deps_all = {capture.id};
    for (int64_t w = 0; w < windows; ++w) {
      const calib::CbqWindow& win = wins[static_cast<size_t>(w)];
      TaskDef t;
      t.id = cbq_window_id(w);
      t.type = plan::kCbqWindow;
      t.params = {{"window", w},
                  {"first", win.first},
                  {"last", win.last},
                  {"finalize_last", win.finalize_last}};
      t.deps = {capture.id};
      if (w > 0) t.deps.push_back(cbq_window_id(w - 1));
      deps_all.push_back(t.id);
      plan.tasks.push_back(std::move(t));
      const u64 k = u(win.last - win.first + 1);
      MemoryEstimate m;
      // The setup's whole model, plus per window block FP, CFP base and Ŵ, and the
      // LoRA-Rounding base V0 per linear.
      m.parts.push_back({"weights", model_bytes + k * (b.params * 4 * 3 + b.linear_params * 4)});
      // Running, next input and target, plus the state's x_fp / x_q in and out.
      m.parts.push_back({"activations", 7 * x_bytes});
      m.parts.push_back({"batch", 3 * k * batch_arena(b, std::min(u(r.cali_bsz), N), T)});
      est.push_back(m);
    }
    TaskDef assemble;
    assemble.id = plan::kAssemble;
    assemble.type = plan::kAssemble;
    assemble.deps = deps_all;
    plan.tasks.push_back(assemble);
    MemoryEstimate ma;
    ma.parts.push_back({"weights", 2 * model_bytes});  // setup + native model
    ma.parts.push_back({"quantized", u(L) * b.quantized});
    est.push_back(ma);
    validate_dep = assemble.id;
  }
  TaskDef validate;
  validate.id = plan::kValidate;
  validate.type = plan::kValidate;
  validate.deps = {validate_dep};
  plan.tasks.push_back(validate);
  {
    MemoryEstimate m;
    // A native output is held whole; a GPTQ one streams a block at a time.
    m.parts.push_back({"weights", format == "native"
                                      ? model_bytes + std::max(b.params, b.V * b.H) * 4
                                      : 2 * std::max(b.params, b.V * b.H) * 4});
    if (spec.eval)
      add_eval_parts(&m, b, std::min(batch, data.eval_seqs), data.eval_T, data.eval_seqs);
    est.push_back(m);
  }

  QCAL_ASSIGN_OR_RETURN(const nlohmann::json memory, set_task_memory(&plan, est, limits, spec));
  plan.summary = {{"method", spec.recipe.method},
                  {"recipe", r.to_json()},
                  {"reconstruction", reconstruction_name(r.reconstruction)},
                  {"layers", L},
                  {"format", format},
                  {"calib_sequences", N},
                  {"tasks", plan.tasks.size()}};
  plan.summary.update(memory);
  if (reconstruct) {
    plan.summary["windows"] = windows;
    plan.summary["window"] = cbq.window;
    plan.summary["overlap"] = cbq.overlap;
  }
  return plan;
}

}  // namespace

Result<Plan> plan_job(const JobSpec& spec, const PlannerLimits& limits) {
  if (spec.recipe.calibration()) return plan_calibration(spec, limits);
  const RecipeSpec& r = spec.recipe;
  const MethodInfo* method = find_method(r.method);
  if (!method) {
    std::string names;
    for (const auto& m : supported_methods())
      names += std::string(names.empty() ? "" : ", ") + m.name;
    return invalid_input("recipe.method: method " + r.method +
                         " is not supported by this server (supported: " + names + ")");
  }
  QuantSpec qspec;
  qspec.bits = r.w_bits;
  qspec.group_size = r.group_size;
  qspec.sym = r.sym;
  qspec.mse_clip = r.mse_clip;
  QCAL_RETURN_IF_ERROR(qspec.validate().with_context("recipe"));
  if (r.mode != "sequential" && r.mode != "parallel")
    return invalid_input("recipe.mode: must be sequential or parallel (got " + r.mode + ")");
  if (r.window < 1) return invalid_input("recipe.window: must be at least 1");
  if (r.overlap != 0 && !method->overlapping_windows)
    return invalid_input("recipe.overlap: method " + r.method +
                         " calibrates disjoint windows (overlap must be 0, got " +
                         std::to_string(r.overlap) + ")");
  if (spec.calib.seqlen < 2) return invalid_input("calib.seqlen: must be at least 2");
  QCAL_ASSIGN_OR_RETURN(CheckpointFormat format, parse_checkpoint_format(spec.output.format));

  auto dir_or = ModelDir::open(spec.model);
  if (!dir_or.is_ok()) return dir_or.status().with_context("model");
  const ModelDir& dir = **dir_or;
  if (dir.quantization_config())
    return invalid_input("model: " + spec.model +
                         " is already quantized (config.json has quantization_config); "
                         "submit the FP checkpoint");
  QCAL_RETURN_IF_ERROR(dir.validate_fp_model().with_context("model"));
  const ModelConfig& c = dir.config();

  QCAL_RETURN_IF_ERROR(check_format_writable(c, qspec, r.method == "gptq" && r.act_order, format));

  QCAL_ASSIGN_OR_RETURN(const DataBounds data, check_data_and_output(spec));
  QCAL_RETURN_IF_ERROR(
      check_estimate_range(spec, c, data.calib_seqs, data.eval_seqs, limits.batch));

  // ---- The DAG.
  const int64_t L = c.num_hidden_layers;
  const int64_t k = r.window;
  const int64_t windows = (L + k - 1) / k;
  const bool parallel = r.mode == "parallel";
  Plan plan;
  TaskDef capture;
  capture.id = plan::kCapture;
  capture.type = plan::kCapture;
  if (parallel) capture.params["fp_inputs"] = true;
  plan.tasks.push_back(capture);
  std::vector<std::string> calibrate_ids;
  for (int64_t w = 0; w < windows; ++w) {
    TaskDef t;
    t.id = calibrate_id(w);
    t.type = plan::kCalibrate;
    t.params["layer_begin"] = w * k;
    t.params["layer_end"] = std::min(L, (w + 1) * k);
    if (parallel) {
      t.params["fp_inputs"] = true;
      t.deps = {capture.id};
    } else {
      t.deps = {w == 0 ? capture.id : calibrate_ids.back()};
    }
    calibrate_ids.push_back(t.id);
    plan.tasks.push_back(std::move(t));
  }
  TaskDef assemble;
  assemble.id = plan::kAssemble;
  assemble.type = plan::kAssemble;
  assemble.deps = calibrate_ids;
  plan.tasks.push_back(assemble);
  TaskDef validate;
  validate.id = plan::kValidate;
  validate.type = plan::kValidate;
  validate.deps = {assemble.id};
  plan.tasks.push_back(validate);

  // ---- Memory.
  const BlockShapes b = block_shapes(c, r.group_size);
  const u64 N = data.calib_seqs;
  const u64 T = u(spec.calib.seqlen);
  const u64 batch = std::max<u64>(1, u(limits.batch));
  const u64 x_bytes = N * T * b.H * 4;  // one (N·T, H) fp32 activation tensor
  std::vector<MemoryEstimate> est(plan.tasks.size());
  {
    MemoryEstimate& m = est[0];
    m.parts.push_back({"activations", x_bytes * (parallel ? 2 : 1)});
    m.parts.push_back({"embeddings", std::min(b.V, N * T) * b.H * 4});
    if (parallel) {
      m.parts.push_back({"weights", b.params * 4});
      m.parts.push_back({"batch", batch_arena(b, std::min(batch, N), T)});
    }
  }
  u64 hessian = 0;
  if (method->uses_hessian) {
    hessian = r.true_sequential
                  ? b.max_in * b.max_in * 4
                  : (2 * b.H * b.H + b.Q * b.Q + b.I * b.I) * 4;  // qkv, o, gate/up, down
  }
  for (int64_t w = 0; w < windows; ++w) {
    const u64 layers = u(std::min(L, (w + 1) * k) - w * k);
    MemoryEstimate& m = est[1 + w];
    m.parts.push_back({"weights", layers * b.params * 4 * 2});
    m.parts.push_back({"activations", x_bytes * 4});
    if (method->uses_hessian) {
      m.parts.push_back({"Hessian", hessian});
      m.parts.push_back({"solver", b.max_in * b.max_in * 16});
    }
    m.parts.push_back({"batch", batch_arena(b, std::min(batch, N), T)});
    m.parts.push_back({"quantized", layers * b.quantized});
  }
  {
    MemoryEstimate& m = est[1 + windows];
    m.parts.push_back({"quantized", u(L) * b.quantized});
    m.parts.push_back({"tensor", std::max({b.V * b.H, b.I * b.H, b.Q * b.H}) * 4});
  }
  {
    MemoryEstimate& m = est[2 + windows];
    m.parts.push_back({"weights", 2 * std::max(b.params, b.V * b.H) * 4});
    if (spec.eval)
      add_eval_parts(&m, b, std::min(batch, data.eval_seqs), data.eval_T, data.eval_seqs);
  }

  QCAL_ASSIGN_OR_RETURN(const nlohmann::json memory, set_task_memory(&plan, est, limits, spec));
  plan.summary = {{"method", r.method},
                  {"mode", r.mode},
                  {"layers", L},
                  {"window", k},
                  {"format", checkpoint_format_name(format)},
                  {"calib_sequences", N},
                  {"tasks", plan.tasks.size()}};
  plan.summary.update(memory);
  return plan;
}

}  // namespace qcal

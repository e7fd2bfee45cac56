#include "common/pipeline_plan.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>

#include "common/eval_memory.h"
#include "common/memory_model.h"
#include "common/method_registry.h"
#include "common/plan.h"

namespace qcal {

std::string format_bytes(uint64_t bytes) {
  static const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes) / 1024.0;
  int k = 0;
  while (v >= 1024.0 && k < 5) {
    v /= 1024.0;
    ++k;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[k]);
  return buf;
}

uint64_t MemoryEstimate::total() const { return mem_peak(parts); }

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

// The rows a recipe uses: core, its transform, weight solver, reconstruction, and
// intactkv when on.
std::vector<const MethodRow*> recipe_rows(const Recipe& r) {
  std::vector<const MethodRow*> rows = {
      find_method_row("core", MethodKind::kCore),
      find_method_row(r.transform(), MethodKind::kTransform),
      find_method_row(r.weight_solver(), MethodKind::kWeightSolver),
      find_method_row(r.reconstruction(), MethodKind::kReconstruction)};
  if (r.intactkv()) rows.push_back(find_method_row("intactkv", MethodKind::kAddon));
  rows.erase(std::remove(rows.begin(), rows.end(), nullptr), rows.end());
  return rows;
}

// The memory of a task of `type` under the recipe's rows, parts of the same name summed.
MemoryEstimate estimate(const std::vector<const MethodRow*>& rows, const MemCtx& m,
                        const std::string& type) {
  std::vector<MemPart> parts;
  for (const MethodRow* row : rows)
    if (row->memory) row->memory(m, type, &parts);
  MemoryEstimate e;
  for (const auto& [name, bytes] : parts) {
    auto it = std::find_if(e.parts.begin(), e.parts.end(),
                           [&](const auto& p) { return p.first == name; });
    if (it == e.parts.end()) {
      e.parts.push_back({name, bytes});
    } else {
      it->second = sat_add(it->second, bytes);
    }
  }
  return e;
}

std::string capture_id(int64_t l) { return plan::numbered(plan::kCapture, l); }
std::string quantize_id(int64_t l) { return plan::numbered(plan::kQuantize, l); }
std::string window_id(int64_t w) { return plan::numbered(plan::kCbqWindow, w); }

// What a user can change to make a refused task fit.
std::string fit_hint(const TaskDef& t, const MemoryEstimate& m) {
  std::string largest;
  u64 most = 0;
  for (const auto& [name, bytes] : m.parts)
    if (bytes > most) {
      most = bytes;
      largest = name.substr(name.find('/') + 1);  // without its phase
    }
  if (t.type == plan::kLearn)
    return "it learns over the whole model in one process (" + t.id +
           "); use a recipe without it for a model this size, or workers with more memory";
  if (largest == "tokens" || largest == "embeddings") return "lower calib.nsamples or calib.seqlen";
  if (t.type == plan::kValidate)
    return largest == "vocab" ? "lower the evaluator's lm_head rows per chunk, or eval.seqlen"
                              : "lower eval.seqlen";
  if (largest == "activations" || largest == "training" || largest == "forward" ||
      largest == "logits")
    return "lower calib.seqlen or recipe.batch";
  if (t.type == plan::kCbqWindow) return "lower recipe.cbq_window";
  return "this model needs workers with more memory";
}

}  // namespace

Result<Plan> build_pipeline_plan(const PlanInputs& in) {
  if (!in.recipe) return internal_error("build_pipeline_plan: no recipe");
  const Recipe& r = *in.recipe;
  const ModelConfig& c = in.config;
  const int64_t L = c.num_hidden_layers;
  if (L < 1) return invalid_input("model: no layers");
  if (in.calib_seqs < 1 || in.calib_T < 2) return invalid_input("calib: no calibration sequences");
  const MethodRow* rt = find_method_row(r.transform(), MethodKind::kTransform);
  const MethodRow* rs = find_method_row(r.weight_solver(), MethodKind::kWeightSolver);
  const MethodRow* rr = find_method_row(r.reconstruction(), MethodKind::kReconstruction);
  if (!rt || !rs || !rr) return internal_error("build_pipeline_plan: a recipe method has no row");
  const std::vector<const MethodRow*> rows = recipe_rows(r);
  const bool recon = r.reconstructs();
  if (recon && static_cast<uint64_t>(std::max<int64_t>(0, r.i("cbq_holdout"))) >= in.calib_seqs)
    return invalid_input("recipe.cbq_holdout: " + std::to_string(r.i("cbq_holdout")) +
                         " held-out sequences leave none of the " + std::to_string(in.calib_seqs) +
                         " calibration sequences to train the reconstruction on");
  const bool gptq = r.gptq() && !recon;
  const bool parallel = r.parallel();
  const bool cal = r.intactkv() && r.b("intactkv_cal");

  // ---- What the capture must provide.
  const bool need_fp = rt->needs.fp_inputs || (recon && rr->needs.fp_inputs) || (gptq && parallel);
  const bool need_stats = rt->needs.act_stats;
  const bool need_capture = need_fp || need_stats || r.intactkv();

  Plan plan;
  std::vector<std::string> kinds;  // task type per task (memory)
  auto add = [&](TaskDef t) {
    kinds.push_back(t.type);
    plan.tasks.push_back(std::move(t));
  };
  {
    TaskDef t;
    t.id = plan::kEmbed;
    t.type = plan::kEmbed;
    t.params = {{"prefix", r.intactkv()}};
    add(t);
  }
  // Producer of X_l (FP input of layer l) and of the prefix states entering l.
  auto fp_producer = [&](int64_t l) {
    return l == 0 ? std::string(plan::kEmbed) : capture_id(l - 1);
  };
  if (need_capture) {
    for (int64_t l = 0; l < L; ++l) {
      TaskDef t;
      t.id = capture_id(l);
      t.type = plan::kCapture;
      t.deps = {fp_producer(l)};
      t.params = {{"layer", l},
                  {"fp", need_fp || need_stats},
                  {"stats", need_stats},
                  {"prefix", r.intactkv()}};
      add(t);
    }
  }
  // Whole-model learning before the blocks.
  std::string learn_id;
  if (rt->whole_model) {
    TaskDef t;
    t.id = rt->name;
    t.type = plan::kLearn;
    t.params = {{"method", rt->name}};
    add(t);
    learn_id = t.id;
  }
  // Per-block transform tasks.
  auto transform_id = [&](int64_t l) { return plan::numbered(rt->name, l); };
  if (rt->block_task) {
    for (int64_t l = 0; l < L; ++l) {
      TaskDef t;
      t.id = transform_id(l);
      t.type = plan::kTransform;
      t.deps = {fp_producer(l), capture_id(l)};
      t.params = {{"layer", l}, {"method", rt->name}};
      add(t);
    }
  }
  // What a block's deployment reads: its transform's fit, the whole-model fit, the
  // capture's statistics and the prefix states.
  auto block_deps = [&](int64_t l, std::set<std::string>* deps) {
    if (rt->block_task) deps->insert(transform_id(l));
    if (!learn_id.empty()) deps->insert(learn_id);
    if (need_stats) deps->insert(capture_id(l));
    if (r.intactkv()) deps->insert(fp_producer(l));
  };

  std::vector<std::string> producers;  // tasks writing block results
  int64_t windows = 0;
  if (!recon) {
    const int64_t k = r.i("blocks_per_task");
    std::string prev;
    for (int64_t l0 = 0; l0 < L; l0 += k) {
      const int64_t l1 = std::min(L, l0 + k);
      TaskDef t;
      t.id = quantize_id(l0);
      t.type = plan::kQuantize;
      std::set<std::string> deps;
      for (int64_t l = l0; l < l1; ++l) block_deps(l, &deps);
      std::string input = "none";
      if (gptq) {
        if (parallel) {
          input = "fp";
          for (int64_t l = l0; l < l1; ++l) deps.insert(fp_producer(l));
        } else {
          input = "quantized";
          deps.insert(prev.empty() ? std::string(plan::kEmbed) : prev);
        }
      }
      t.deps.assign(deps.begin(), deps.end());
      t.params = {{"layers", {l0, l1}}, {"input", input}};
      prev = t.id;
      producers.push_back(t.id);
      add(t);
    }
  } else {
    const int64_t window =
        r.reconstruction() == "block" ? 1 : std::min<int64_t>(r.i("cbq_window"), L);
    const int64_t overlap =
        r.reconstruction() == "block" ? 0 : std::min(r.i("cbq_overlap"), window - 1);
    const std::vector<plan::CbqWindow> wins = plan::cbq_windows(L, window, overlap);
    windows = static_cast<int64_t>(wins.size());
    for (int64_t w = 0; w < windows; ++w) {
      const plan::CbqWindow& win = wins[static_cast<size_t>(w)];
      TaskDef t;
      t.id = window_id(w);
      t.type = plan::kCbqWindow;
      std::set<std::string> deps;
      for (int64_t l = win.first; l <= win.last; ++l) block_deps(l, &deps);
      deps.insert(fp_producer(win.first));  // FP inputs of the window
      // The chain: the previous window's quantized output and carried parameters
      // (parallel mode with no overlap: independent windows).
      const bool chained = !parallel || overlap > 0;
      if (w > 0 && chained) deps.insert(window_id(w - 1));
      if (w == 0 && !parallel) deps.insert(plan::kEmbed);
      t.deps.assign(deps.begin(), deps.end());
      t.params = {{"window", w},           {"first", win.first},
                  {"last", win.last},      {"finalize_last", win.finalize_last},
                  {"window_size", window}, {"overlap", overlap}};
      producers.push_back(t.id);
      add(t);
    }
  }
  std::string cal_id;
  if (cal) {
    TaskDef t;
    t.id = "intactkv-cal";
    t.type = plan::kLearn;
    // The blocks' results, and what re-deploying every block's FP form reads (its FP
    // twin), and the prefix's final states (its FP logits).
    std::set<std::string> deps(producers.begin(), producers.end());
    for (int64_t l = 0; l < L; ++l) block_deps(l, &deps);
    deps.insert(capture_id(L - 1));
    t.deps.assign(deps.begin(), deps.end());
    t.params = {{"method", "intactkv"}};
    add(t);
    cal_id = t.id;
  }
  {
    TaskDef t;
    t.id = plan::kAssemble;
    t.type = plan::kAssemble;
    t.deps = producers;
    if (!learn_id.empty()) t.deps.push_back(learn_id);
    if (!cal_id.empty()) t.deps.push_back(cal_id);
    if (r.intactkv()) t.deps.push_back(capture_id(L - 1));  // the prefix's final states
    t.params = {{"format", in.format}};
    add(t);
  }
  {
    TaskDef t;
    t.id = plan::kValidate;
    t.type = plan::kValidate;
    t.deps = {plan::kAssemble};
    add(t);
  }

  // ---- Memory: micro-batches chosen to fit, then every task's estimate.
  MemCtx m = mem_ctx(c);
  m.N = in.calib_seqs;
  m.T = in.calib_T;
  m.micro = std::max<u64>(1, std::min(u(r.batch()), m.N));
  m.prefix = r.intactkv() ? r.intactkv_prefix_for(c).size() : 0;
  m.w_bits = static_cast<u64>(r.w_bits());
  m.a_bits = static_cast<u64>(std::max(1, r.a_bits()));
  m.w_group_cols = r.w_group() > 0 ? u(r.w_group()) : 0;
  const u64 target =
      static_cast<u64>(static_cast<double>(in.worker_memory_bytes) * in.target_fraction);
  const u64 train_bsz = std::max<u64>(1, std::min(u(r.i("cali_bsz")), m.N));
  // SpinQuant trains on the sequences it does not hold out (spinquant.cc: the last
  // min(spin_holdout, N − 1) score the rotations), spin_bsz of them at a time.
  const u64 spin_train = m.N - std::min(u(r.i("spin_holdout")), m.N > 0 ? m.N - 1 : 0);
  const u64 spin_bsz = std::max<u64>(1, std::min(u(r.i("spin_bsz")), spin_train));
  std::vector<MemoryEstimate> est(plan.tasks.size());
  for (size_t i = 0; i < plan.tasks.size(); ++i) {
    TaskDef& t = plan.tasks[i];
    MemCtx mc = m;
    if (t.type == plan::kCbqWindow) {
      mc.window = u(t.params["last"].get<int64_t>() - t.params["first"].get<int64_t>() + 1);
      mc.head =
          t.params["last"].get<int64_t>() + 1 == c.num_hidden_layers && r.f("cbq_logit_loss") > 0;
      mc.gptq_start = r.weight_solver() == "gptq";
    }
    if (t.type == plan::kValidate) {
      mc.T = std::max<u64>(in.eval_T, 2);
      mc.micro = std::max<u64>(1, std::min(in.eval_batch, std::max<u64>(in.eval_seqs, 1)));
    }
    const bool trains = t.type == plan::kTransform || t.type == plan::kCbqWindow ||
                        (t.type == plan::kLearn && t.id == "spinquant");
    if (trains) {
      // The largest micro-batch (≤ the minibatch and recipe.batch) that fits the target.
      const u64 cap =
          t.id == "spinquant" ? spin_bsz : std::max<u64>(1, std::min(train_bsz, u(r.batch())));
      u64 pick = 1;
      for (u64 cand = cap; cand >= 1; --cand) {
        mc.train_micro = cand;
        if (estimate(rows, mc, t.type).total() <= target || cand == 1) {
          pick = cand;
          break;
        }
      }
      mc.train_micro = pick;
      if (t.id != "spinquant") t.params["micro"] = pick;
    } else if (t.type == plan::kLearn) {
      mc.train_micro = 1;
    } else if (t.type == plan::kQuantize && mc.micro > 1 &&
               estimate(rows, mc, t.type).total() > target) {
      // A forward's micro-batch (GPTQ's Hessian stream and the output check): the
      // largest ≤ recipe.batch that fits the target.
      for (u64 cand = mc.micro - 1; cand >= 1; --cand) {
        mc.micro = cand;
        if (estimate(rows, mc, t.type).total() <= target) break;
      }
      t.params["micro"] = mc.micro;
    }
    if (t.type == plan::kValidate) {
      // The streaming evaluator's own estimate (common/eval_memory.h).
      MemoryEstimate e;
      e.parts.push_back({"process", kProcessBaseBytes});
      if (in.has_eval) {
        EvalShape es;
        es.config = c;
        es.weights = in.format == "native" ? EvalWeights::kNative : EvalWeights::kPacked;
        es.w_bits = r.w_bits();
        es.w_group = r.w_group();
        es.a_bits = r.a_bits();
        es.sequences = static_cast<int64_t>(std::max<u64>(in.eval_seqs, 1));
        es.seqlen = static_cast<int64_t>(std::max<u64>(in.eval_T, 2));
        es.prefix = static_cast<int64_t>(m.prefix);
        es.options.batch = static_cast<int64_t>(std::max<u64>(in.eval_batch, 1));
        for (const auto& part : estimate_eval_memory(es).parts()) e.parts.push_back(part);
        // The eval tokens, loaded whole before the evaluation streams.
        e.parts.push_back({"eval data", sat_mul(sat_mul(in.eval_seqs, in.eval_T), 4)});
      }
      est[i] = e;
    } else {
      est[i] = estimate(rows, mc, t.type);
    }
    t.mem_bytes = est[i].total();
  }
  size_t peak = 0;
  for (size_t i = 0; i < est.size(); ++i)
    if (est[i].total() > est[peak].total()) peak = i;
  if (est[peak].total() > in.worker_memory_bytes) {
    const TaskDef& t = plan.tasks[peak];
    std::string hint = fit_hint(t, est[peak]);
    if (t.type == plan::kCbqWindow) {
      // Whether a shorter window would do: a one-block window at one sequence.
      MemCtx one = m;
      one.window = 1;
      one.train_micro = 1;
      const u64 b = estimate(rows, one, t.type).total();
      hint = b <= in.worker_memory_bytes
                 ? "lower recipe.cbq_window (a one-block window needs " + format_bytes(b) + ")"
                 : "even a one-block window needs " + format_bytes(b) +
                       ": this model needs workers with more memory, or a recipe without "
                       "block reconstruction";
    }
    return resource_exhausted(t.id + " needs " + format_bytes(est[peak].total()) + " (" +
                              est[peak].describe() + ") but workers have " +
                              format_bytes(in.worker_memory_bytes) + "; " + hint);
  }

  // ---- Summary: critical path, store space.
  std::map<std::string, int64_t> depth;
  int64_t critical = 0;
  for (const TaskDef& t : plan.tasks) {
    int64_t d = 1;
    for (const std::string& dep : t.deps) d = std::max(d, depth[dep] + 1);
    depth[t.id] = d;
    critical = std::max(critical, d);
  }
  const u64 x_bytes = sat_mul(sat_mul(m.N, m.T), sat_mul(m.H, 4));
  u64 store = x_bytes;  // embed's X_0
  if (need_capture) store = sat_add(store, sat_mul(x_bytes, u(L)));
  if (!recon && gptq && !parallel) store = sat_add(store, sat_mul(x_bytes, u(L)));
  if (recon && !parallel) store = sat_add(store, sat_mul(x_bytes, u(windows)));
  // Block results (a byte per code + scales) and the output checkpoint (packed codes,
  // the unquantized embedding / lm_head in fp32 at most).
  const u64 blocks =
      sat_mul(u(L), sat_add(m.linear_params, sat_mul(m.block_params - m.linear_params, 4)));
  const u64 packed = sat_mul(u(L), m.linear_params * std::min<u64>(m.w_bits, 16) / 8);
  store = sat_add(store, blocks);
  store = sat_add(store, sat_add(packed, sat_mul(sat_mul(2 * m.V, m.H), 4)));
  nlohmann::json estimates = nlohmann::json::object();
  for (size_t i = 0; i < plan.tasks.size(); ++i) estimates[plan.tasks[i].id] = est[i].to_json();
  plan.summary = {{"method", r.display_name()},
                  {"recipe", r.to_json()},
                  {"transform", r.transform()},
                  {"weight_solver", r.weight_solver()},
                  {"reconstruction", r.reconstruction()},
                  {"mode", r.s("mode")},
                  {"layers", L},
                  {"format", in.format},
                  {"calib_sequences", m.N},
                  {"tasks", plan.tasks.size()},
                  {"critical_path", critical},
                  {"peak", {{"task", plan.tasks[peak].id}, {"bytes", est[peak].total()}}},
                  {"worker_memory_bytes", in.worker_memory_bytes},
                  {"store_bytes", store},
                  {"estimates", estimates}};
  if (recon) plan.summary["windows"] = windows;
  return plan;
}

}  // namespace qcal

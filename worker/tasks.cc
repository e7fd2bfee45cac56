#include "worker/tasks.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <utility>
#include <vector>

#include "common/data.h"
#include "common/log.h"
#include "common/model_config.h"
#include "common/plan.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/native.h"
#include "worker/calib/native_eval.h"
#include "worker/engine/eval.h"
#include "worker/engine/model.h"
#include "worker/pipeline.h"

namespace qcal {

namespace {

constexpr const char* kCancelledPrefix = "cancelled: ";

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

Status need_root(const TaskContext& ctx) {
  if (ctx.group && !ctx.group->is_root())
    return internal_error("task " + ctx.task.id + " (" + ctx.task.type +
                          ") runs on the root rank only");
  return Status::ok();
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
  // Any output format (native: the integer kernels; GPTQ / compressed-tensors:
  // dequantized on load), streamed a layer and an lm_head chunk at a time.
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<EvalModel> q, calib::open_eval_model(out));
  QCAL_RETURN_IF_ERROR(same_arch(q->config()));
  QCAL_ASSIGN_OR_RETURN(TokenSequences data, load_eval());
  const LlamaEvalModel fp_eval(*fp);
  EvalOptions eo;
  eo.batch = kEvalBatch;
  QCAL_ASSIGN_OR_RETURN(const EvalResult r, evaluate_stream(*q, &fp_eval, data, eo));

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
  // validate reads the published checkpoint, embed the user's files: no producer.
  if (ctx.task.type == plan::kValidate) return std::vector<TaskInput>{};
  return pipeline_task_inputs(ctx);
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
  if (ctx.task.type == plan::kValidate) return run_validate(ctx);
  return run_pipeline_task(ctx);
}

}  // namespace qcal

#include "api/spec_flags.h"

#include <string>
#include <utility>

#include "api/calib_cli.h"
#include "common/job_spec.h"
#include "worker/engine/recipe.h"

namespace qcal {

namespace {

// The weight-only spec's flags (the table in spec_flags.h).
const std::set<std::string>& weight_only_valued_flags() {
  // clang-format off
  static const std::set<std::string> kValued = {
      "model",
      "method", "w-bits", "group-size", "damp", "mode", "window", "overlap", "seed",
      "calib", "nsamples", "seqlen",
      "eval-data", "eval-nsamples", "eval-seqlen",
      "out", "format",
      "max-ppl-increase", "max-kl", "priority", "labels"};
  // clang-format on
  return kValued;
}

const std::set<std::string>& weight_only_boolean_flags() {
  static const std::set<std::string> kBooleans = {
      "sym", "asym", "act-order", "static-groups", "mse-clip", "no-true-sequential", "overwrite"};
  return kBooleans;
}

// The job's rows of spec_flags(): everything but the recipe.
std::vector<FlagSpec> job_flags() {
  const std::string io = "Input and output", eval = "Evaluation and gate", job = "Job",
                    dag = "Weight-only tasks";
  return {
      {"model", "DIR", "", "the model to quantize (required)", io},
      {"calib", "FILE", "", "calibration tokens, .jsonl or .u32 (required)", io},
      {"nsamples", "N", "128", "calibration sequences", io},
      {"seqlen", "N", "2048", "tokens per calibration sequence", io},
      {"out", "DIR", "", "where the quantized checkpoint goes (required)", io},
      {"format", "NAME", "gptq weight-only, auto calibration engine",
       "gptq or compressed-tensors; the calibration engine also takes native and auto (gptq when "
       "everything folds into the weights, else native)",
       io},
      {"overwrite", "", "", "replace an existing --out", io},
      {"eval-data", "FILE", "", "validate the result on these tokens (perplexity, KL)", eval},
      {"eval-nsamples", "N", "0 = all", "evaluation sequences (needs --eval-data)", eval},
      {"eval-seqlen", "N", "--seqlen", "tokens per evaluation sequence (needs --eval-data)", eval},
      {"max-ppl-increase", "X", "",
       "fail the job when, on --eval-data, ppl / FP ppl − 1 exceeds X (0.05: 5 %)", eval},
      {"max-kl", "X", "",
       "fail the job when, on --eval-data, the mean KL(FP ‖ quantized) per token exceeds X "
       "nats",
       eval},
      {"priority", "NAME", "normal", "high, normal or low", job},
      {"labels", "K=V,...", "", "labels to find the job by (qcal jobs --label)", job},
      {"mode", "NAME", "sequential",
       "sequential (each task on the quantized model's inputs) or parallel (every task on FP "
       "inputs)",
       dag},
      {"window", "N", "1", "blocks per calibrate task (CBQ's window is --cbq-window)", dag},
      {"overlap", "N", "0", "blocks shared by neighbouring calibrate tasks", dag},
  };
}

}  // namespace

const std::vector<FlagSpec>& spec_flags() {
  static const std::vector<FlagSpec> kRows = concat_flags(job_flags(), recipe_flags());
  return kRows;
}

const std::set<std::string>& spec_valued_flags() {
  static const std::set<std::string> kValued = valued_flag_names(spec_flags());
  return kValued;
}

const std::set<std::string>& spec_boolean_flags() {
  static const std::set<std::string> kBooleans = boolean_flag_names(spec_flags());
  return kBooleans;
}

static std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

Result<std::map<std::string, std::string>> parse_labels(const std::string& s,
                                                        const std::string& flag) {
  std::map<std::string, std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t comma = s.find(',', pos);
    if (comma == std::string::npos) comma = s.size();
    std::string item = trim(s.substr(pos, comma - pos));
    pos = comma + 1;
    if (item.empty()) continue;  // "a=1,,b=2" and a trailing comma are harmless
    size_t eq = item.find('=');
    if (eq == std::string::npos)
      return invalid_input(flag + ": '" + item + "' is not of the form key=value");
    std::string key = trim(item.substr(0, eq)), value = trim(item.substr(eq + 1));
    if (key.empty()) return invalid_input(flag + ": '" + item + "' has an empty key");
    if (!out.emplace(key, value).second)
      return invalid_input(flag + ": label '" + key + "' given twice");
  }
  return out;
}

namespace {

// Copies an integer flag into j[key] when given.
Status put_integer(const Flags& f, const char* flag, nlohmann::json& j, const char* key) {
  if (!f.has(flag)) return Status::ok();
  QCAL_ASSIGN_OR_RETURN(int64_t v, f.integer(flag, 0));
  j[key] = v;
  return Status::ok();
}

Status put_number(const Flags& f, const char* flag, nlohmann::json& j, const char* key) {
  if (!f.has(flag)) return Status::ok();
  QCAL_ASSIGN_OR_RETURN(double v, f.number(flag, 0));
  j[key] = v;
  return Status::ok();
}

void put_string(const Flags& f, const char* flag, nlohmann::json& j, const char* key) {
  if (f.has(flag)) j[key] = f.str(flag);
}

Status check_seed(const Flags& f) {
  if (!f.has("seed")) return Status::ok();
  QCAL_ASSIGN_OR_RETURN(int64_t seed, f.integer("seed", 0));
  if (seed < 0) return invalid_input("flag --seed: must be ≥ 0 (got " + f.str("seed") + ")");
  return Status::ok();
}

// The weight-only recipe object (the table in spec_flags.h); empty when no
// recipe flag is given.
Result<nlohmann::json> weight_only_recipe(const Flags& f) {
  // A calibration-only flag has no field in a weight-only recipe: refuse it
  // rather than drop it. --a-bits / --kv-bits get here only as 16 (unquantized).
  for (const auto* set : {&spec_valued_flags(), &spec_boolean_flags()}) {
    for (const auto& k : *set) {
      if (!f.has(k) || weight_only_valued_flags().count(k) || weight_only_boolean_flags().count(k))
        continue;
      if (k == "a-bits" || k == "kv-bits") continue;
      return invalid_input("--" + k +
                           " applies to calibration recipes (--method "
                           "smoothquant|quarot|spinquant|flatquant|lora-rounding, --weight-solver, "
                           "--a-bits/--kv-bits < 16, --reconstruction, --intactkv, --format "
                           "native); a weight-only rtn/gptq recipe has no field for it");
    }
  }
  nlohmann::json recipe = nlohmann::json::object();
  put_string(f, "method", recipe, "method");
  QCAL_RETURN_IF_ERROR(put_integer(f, "w-bits", recipe, "w_bits"));
  QCAL_RETURN_IF_ERROR(put_integer(f, "group-size", recipe, "group_size"));
  if (f.flag("sym") && f.flag("asym")) return invalid_input("--sym and --asym are exclusive");
  if (f.flag("sym")) recipe["sym"] = true;
  if (f.flag("asym")) recipe["sym"] = false;
  if (f.flag("act-order")) recipe["act_order"] = true;
  if (f.flag("static-groups")) recipe["static_groups"] = true;
  QCAL_RETURN_IF_ERROR(put_number(f, "damp", recipe, "damp"));
  if (f.flag("mse-clip")) recipe["mse_clip"] = true;
  if (f.flag("no-true-sequential")) recipe["true_sequential"] = false;
  put_string(f, "mode", recipe, "mode");
  QCAL_RETURN_IF_ERROR(put_integer(f, "window", recipe, "window"));
  QCAL_RETURN_IF_ERROR(put_integer(f, "overlap", recipe, "overlap"));
  QCAL_RETURN_IF_ERROR(check_seed(f));
  if (f.has("seed")) {
    QCAL_ASSIGN_OR_RETURN(int64_t seed, f.integer("seed", 0));
    recipe["seed"] = static_cast<uint64_t>(seed);
  }
  return recipe;
}

// The calibration recipe object: `qcal quantize`'s recipe, in CalibRecipe's
// JSON form (transform and weight_solver resolved, every key present).
Result<nlohmann::json> calibration_recipe(const Flags& f) {
  // The weight-only DAG's knobs; CBQ has its own (and they also cut its tasks).
  if (f.has("window") || f.has("overlap")) {
    const std::string k = f.has("window") ? "window" : "overlap";
    return invalid_input(
        "--" + k + " is the weight-only recipe's " +
        (k == "window" ? "blocks per calibrate task" : "blocks shared by calibrate tasks") +
        "; a calibration recipe runs as one calib task, or with --reconstruction "
        "block|cbq as one task per CBQ window: use --cbq-" +
        k);
  }
  if (f.has("mode"))
    return invalid_input(
        "--mode applies to weight-only recipes; for CBQ windows calibrated independently on FP "
        "inputs use --cbq-parallel");
  if (f.flag("no-true-sequential"))
    return invalid_input(
        "--no-true-sequential applies to weight-only recipes; the calibration engine is always "
        "true-sequential");
  if (f.flag("sym") && f.flag("asym")) return invalid_input("--sym and --asym are exclusive");
  QCAL_RETURN_IF_ERROR(check_seed(f));
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, recipe_from_flags(f));
  return r.to_json();
}

// Runs a calibration spec through what the coordinator (parse_job_spec) and
// its planner (calib_recipe_from_spec, calib_output_format) will run on it.
Status check_calibration_spec(const nlohmann::json& spec) {
  QCAL_ASSIGN_OR_RETURN(JobSpec js, parse_job_spec(spec));
  if (!js.recipe.calibration())
    return internal_error("the recipe flags built a recipe the coordinator reads as weight-only: " +
                          spec["recipe"].dump());
  QCAL_ASSIGN_OR_RETURN(calib::CalibRecipe r, calib_recipe_from_spec(js));
  auto format = calib_output_format(js, r);
  if (!format.is_ok()) {
    // "output.format: gptq: ..." → "--format gptq: ..."
    std::string m = format.status().message();
    const std::string field = "output.format: ";
    if (m.rfind(field, 0) == 0) m = m.substr(field.size());
    if (m.rfind(js.output.format + ": ", 0) == 0)
      m = "--format " + m;
    else
      m = "--format: " + m;
    return invalid_input(m);
  }
  return Status::ok();
}

}  // namespace

Result<nlohmann::json> job_spec_json_from_flags(const Flags& f) {
  nlohmann::json spec = nlohmann::json::object();
  QCAL_ASSIGN_OR_RETURN(std::string model, f.required("model"));
  QCAL_ASSIGN_OR_RETURN(std::string calib_path, f.required("calib"));
  QCAL_ASSIGN_OR_RETURN(std::string out, f.required("out"));
  spec["model"] = model;

  const bool calibration = wants_calibration(f);
  nlohmann::json recipe;
  if (calibration) {
    QCAL_ASSIGN_OR_RETURN(recipe, calibration_recipe(f));
  } else {
    QCAL_ASSIGN_OR_RETURN(recipe, weight_only_recipe(f));
  }
  if (!recipe.empty()) spec["recipe"] = recipe;

  nlohmann::json calib = {{"path", calib_path}};
  QCAL_RETURN_IF_ERROR(put_integer(f, "nsamples", calib, "nsamples"));
  QCAL_RETURN_IF_ERROR(put_integer(f, "seqlen", calib, "seqlen"));
  spec["calib"] = calib;

  if (f.has("eval-data")) {
    QCAL_ASSIGN_OR_RETURN(std::string eval_path, f.required("eval-data"));
    nlohmann::json eval = {{"path", eval_path}};
    QCAL_RETURN_IF_ERROR(put_integer(f, "eval-nsamples", eval, "nsamples"));
    // The eval set is cut like the calibration set unless told otherwise: a
    // --seqlen 256 job should not evaluate at the schema's default of 2048.
    QCAL_RETURN_IF_ERROR(
        put_integer(f, f.has("eval-seqlen") ? "eval-seqlen" : "seqlen", eval, "seqlen"));
    spec["eval"] = eval;
  } else {
    for (const char* flag : {"eval-nsamples", "eval-seqlen"})
      if (f.has(flag)) return invalid_input(std::string("flag --") + flag + " needs --eval-data");
  }

  nlohmann::json output = {{"path", out}};
  put_string(f, "format", output, "format");
  if (f.flag("overwrite")) output["overwrite"] = true;
  spec["output"] = output;

  nlohmann::json gate = nlohmann::json::object();
  QCAL_RETURN_IF_ERROR(put_number(f, "max-ppl-increase", gate, "max_ppl_increase"));
  QCAL_RETURN_IF_ERROR(put_number(f, "max-kl", gate, "max_kl"));
  if (!gate.empty()) spec["gate"] = gate;

  if (f.has("priority")) {
    std::string p = f.str("priority");
    if (p != "high" && p != "normal" && p != "low")
      return invalid_input("flag --priority: must be high, normal or low (got '" + p + "')");
    spec["priority"] = p;
  }
  if (f.has("labels")) {
    QCAL_ASSIGN_OR_RETURN(auto labels, parse_labels(f.str("labels"), "--labels"));
    spec["labels"] = labels;
  }
  if (calibration) QCAL_RETURN_IF_ERROR(check_calibration_spec(spec));
  return spec;
}

}  // namespace qcal

#include "api/spec_flags.h"

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/job_spec.h"
#include "common/method_registry.h"

namespace qcal {

namespace {

// The job's rows of spec_flags(): everything but the recipe.
std::vector<FlagSpec> job_flags() {
  const std::string io = "Input and output", eval = "Evaluation and gate", job = "Job";
  return {
      {"model", "DIR", "", "the model to quantize (required)", io},
      {"calib", "FILE", "", "calibration tokens, .jsonl or .u32 (required)", io},
      {"nsamples", "N", "128", "calibration sequences", io},
      {"seqlen", "N", "2048", "tokens per calibration sequence", io},
      {"out", "DIR", "", "where the quantized checkpoint goes (required)", io},
      {"format", "NAME", "auto",
       "auto, native, gptq or compressed-tensors; auto = gptq when everything folds into the "
       "weights, else native",
       io},
      {"overwrite", "", "", "replace an existing --out (a directory qcal wrote)", io},
      {"max-shard-mb", "N", "2048", "largest safetensors shard of the output", io},
      {"eval-data", "FILE", "", "validate the result on these tokens (perplexity, KL)", eval},
      {"eval-nsamples", "N", "0 = all", "evaluation sequences (needs --eval-data)", eval},
      {"eval-seqlen", "N", "--seqlen", "tokens per evaluation sequence (needs --eval-data)", eval},
      {"max-ppl-increase", "X", "",
       "fail the job when, on --eval-data, ppl / FP ppl − 1 exceeds X (0.05: 5 %)", eval},
      {"max-kl", "X", "",
       "fail the job when, on --eval-data, the mean KL(FP ‖ quantized) per token exceeds X nats",
       eval},
      {"priority", "NAME", "normal", "high, normal or low", job},
      {"labels", "K=V,...", "", "labels to find the job by (qcal jobs --label)", job},
  };
}

std::string shown_default(const OptionSpec& o) {
  if (o.type == OptType::kIds) return "";
  if (o.type == OptType::kBool) return "";
  if (o.def.is_string()) return o.def.get<std::string>();
  return o.def.dump();
}

std::string placeholder(const OptionSpec& o) {
  switch (o.type) {
    case OptType::kBool: return "";
    case OptType::kInt: return "N";
    case OptType::kNum: return "X";
    case OptType::kIds: return "ID,...";
    case OptType::kString: {
      std::string c;
      for (const std::string& x : o.choices) c += (c.empty() ? "" : "|") + x;
      return c.empty() ? "S" : c;
    }
  }
  return "V";
}

// The recipe rows: the aliases, then every registry option with a flag, grouped by
// method row; with the recipe key each flag sets.
struct RecipeRows {
  std::vector<FlagSpec> rows;
  std::map<std::string, std::string> key_of;  // flag → recipe key
};

const RecipeRows& recipe_rows() {
  static const RecipeRows k = [] {
    RecipeRows out;
    const std::string alias = "Recipe (aliases)";
    out.rows = {
        {"method", "NAME", "",
         "a transform (smoothquant, quarot, spinquant, flatquant) or a weight solver (rtn, gptq, "
         "lora-rounding); without it and --weight-solver: gptq, or rtn with a transform, or "
         "lora-rounding with a reconstruction",
         alias},
        {"window", "N", "1", "blocks per quantize task (CBQ's window: --cbq-window)", alias},
        {"overlap", "N", "0", "must be 0 (overlapping windows are CBQ's --cbq-overlap)", alias},
        {"cbq-parallel", "", "", "the same as --mode parallel", alias}};
    for (const MethodRow& row : method_registry()) {
      const std::string group =
          row.kind == MethodKind::kCore
              ? std::string("Recipe")
              : std::string("Recipe: ") + method_kind_name(row.kind) + " " + row.name;
      for (const OptionSpec& o : row.options) {
        if (!o.flag.empty()) {
          out.rows.push_back({o.flag, placeholder(o), shown_default(o), o.help, group});
          out.key_of[o.flag] = o.key;
        }
        if (!o.neg_flag.empty()) {
          out.rows.push_back({o.neg_flag, "", "", "turn off: " + o.help, group});
          out.key_of[o.neg_flag] = o.key;
        }
      }
    }
    return out;
  }();
  return k;
}

}  // namespace

const std::vector<FlagSpec>& recipe_flags() { return recipe_rows().rows; }

std::string recipe_key_of_flag(const std::string& flag) {
  auto it = recipe_rows().key_of.find(flag);
  return it == recipe_rows().key_of.end() ? std::string() : it->second;
}

const std::vector<FlagSpec>& spec_flags() {
  static const std::vector<FlagSpec> k = concat_flags(job_flags(), recipe_flags());
  return k;
}

const std::set<std::string>& spec_valued_flags() {
  static const std::set<std::string> k = valued_flag_names(spec_flags());
  return k;
}
const std::set<std::string>& spec_boolean_flags() {
  static const std::set<std::string> k = boolean_flag_names(spec_flags());
  return k;
}

namespace {

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// "1,5,9" → [1, 5, 9]: non-negative decimal ids separated by commas.
Result<nlohmann::json> parse_ids(const std::string& flag, const std::string& s) {
  nlohmann::json ids = nlohmann::json::array();
  auto bad = [&]() {
    return invalid_input("--" + flag + ": '" + s +
                         "' is not a comma-separated list of token ids (e.g. 1,5,9)");
  };
  size_t i = 0;
  while (true) {
    const size_t j = s.find(',', i);
    const std::string part = s.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (part.empty() || part.size() > 10 ||
        part.find_first_not_of("0123456789") != std::string::npos)
      return bad();
    const int64_t v = std::stoll(part);
    if (v > std::numeric_limits<int32_t>::max()) return bad();
    ids.push_back(v);
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return ids;
}

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

// "recipe.epochs: must be in ..." → "--epochs: must be in ..." for a key a flag set.
Status flag_error(const Status& s, const std::map<std::string, std::string>& key_flag) {
  std::string m = s.message();
  const std::string pre = "recipe.";
  if (m.rfind(pre, 0) == 0) m = m.substr(pre.size());
  for (const auto& [key, flag] : key_flag)
    if (m.rfind(key + ":", 0) == 0) return Status(s.code(), "--" + flag + m.substr(key.size()));
  return Status(s.code(), m);
}

}  // namespace

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

Result<nlohmann::json> recipe_json_from_flags(const Flags& f) {
  nlohmann::json r = nlohmann::json::object();
  // Registry flags.
  for (const MethodRow& row : method_registry())
    for (const OptionSpec& o : row.options) {
      const bool pos = !o.flag.empty() && f.has(o.flag);
      const bool neg = !o.neg_flag.empty() && f.has(o.neg_flag);
      if (pos && neg)
        return invalid_input("--" + o.flag + " and --" + o.neg_flag + " are exclusive");
      if (neg) {
        r[o.key] = false;
        continue;
      }
      if (!pos) continue;
      switch (o.type) {
        case OptType::kBool: r[o.key] = true; break;
        case OptType::kInt: {
          QCAL_ASSIGN_OR_RETURN(int64_t v, f.integer(o.flag, 0));
          r[o.key] = v;
          break;
        }
        case OptType::kNum: {
          QCAL_ASSIGN_OR_RETURN(double v, f.number(o.flag, 0));
          r[o.key] = v;
          break;
        }
        case OptType::kString: r[o.key] = f.str(o.flag); break;
        case OptType::kIds: {
          QCAL_ASSIGN_OR_RETURN(r[o.key], parse_ids(o.flag, f.str(o.flag)));
          break;
        }
      }
    }
  // Aliases.
  if (f.has("method")) {
    const std::string m = f.str("method");
    const auto solvers = method_names(MethodKind::kWeightSolver);
    const bool solver = std::find(solvers.begin(), solvers.end(), m) != solvers.end();
    const char* key = solver ? "weight_solver" : "transform";
    const char* flag = solver ? "weight-solver" : "transform";
    if (r.contains(key) && r[key] != m)
      return invalid_input("--" + std::string(flag) + " " + r[key].get<std::string>() +
                           " contradicts --method " + m);
    r[key] = m;
  }
  if (f.flag("cbq-parallel")) {
    if (r.contains("mode") && r["mode"] != "parallel")
      return invalid_input("--cbq-parallel contradicts --mode " + r["mode"].get<std::string>());
    r["mode"] = "parallel";
  }
  const bool recon = r.contains("reconstruction") && r["reconstruction"] != "none";
  if (f.has("window")) {
    if (recon)
      return invalid_input(
          "--window is the number of blocks per quantize task; a reconstruction's window is "
          "--cbq-window");
    QCAL_ASSIGN_OR_RETURN(int64_t w, f.integer("window", 1));
    r["blocks_per_task"] = w;
  }
  if (f.has("overlap")) {
    QCAL_ASSIGN_OR_RETURN(int64_t v, f.integer("overlap", 0));
    if (v != 0)
      return invalid_input(
          "--overlap: rtn / gptq quantize disjoint blocks; overlapping windows are CBQ's "
          "(--reconstruction cbq --cbq-window N --cbq-overlap M)");
  }
  // Defaults of the one code path (see spec_flags.h).
  const bool transform = r.contains("transform") && r["transform"] != "none";
  if (!r.contains("weight_solver"))
    r["weight_solver"] = transform ? "rtn" : (recon ? "lora-rounding" : "gptq");
  auto quantized = [&](const char* k) { return r.contains(k) && r[k] != 16; };
  const bool weight_only = !transform && !quantized("a_bits") && !quantized("kv_bits") && !recon &&
                           !(r.contains("intactkv") && r["intactkv"] == true);
  if (weight_only && !r.contains("w_group")) r["w_group"] = 128;
  // Dotted keys as the recipe object writes them: "gptq.percdamp" → {"gptq": {"percdamp"}}.
  nlohmann::json nested = nlohmann::json::object();
  for (auto it = r.begin(); it != r.end(); ++it) {
    const size_t dot = it.key().find('.');
    if (dot == std::string::npos)
      nested[it.key()] = it.value();
    else
      nested[it.key().substr(0, dot)][it.key().substr(dot + 1)] = it.value();
  }
  return nested;
}

Result<nlohmann::json> job_spec_json_from_flags(const Flags& f) {
  nlohmann::json spec = nlohmann::json::object();
  QCAL_ASSIGN_OR_RETURN(std::string model, f.required("model"));
  QCAL_ASSIGN_OR_RETURN(std::string calib_path, f.required("calib"));
  QCAL_ASSIGN_OR_RETURN(std::string out, f.required("out"));
  spec["model"] = model;
  QCAL_ASSIGN_OR_RETURN(spec["recipe"], recipe_json_from_flags(f));
  nlohmann::json calib = {{"path", calib_path}};
  QCAL_RETURN_IF_ERROR(put_integer(f, "nsamples", calib, "nsamples"));
  QCAL_RETURN_IF_ERROR(put_integer(f, "seqlen", calib, "seqlen"));
  spec["calib"] = calib;
  if (f.has("eval-data")) {
    QCAL_ASSIGN_OR_RETURN(std::string eval_path, f.required("eval-data"));
    nlohmann::json eval = {{"path", eval_path}};
    QCAL_RETURN_IF_ERROR(put_integer(f, "eval-nsamples", eval, "nsamples"));
    // The eval set is cut like the calibration set unless told otherwise: a --seqlen
    // 256 job should not evaluate at the schema's default of 2048.
    QCAL_RETURN_IF_ERROR(
        put_integer(f, f.has("eval-seqlen") ? "eval-seqlen" : "seqlen", eval, "seqlen"));
    spec["eval"] = eval;
  } else {
    for (const char* flag : {"eval-nsamples", "eval-seqlen"})
      if (f.has(flag)) return invalid_input(std::string("flag --") + flag + " needs --eval-data");
  }
  nlohmann::json output = {{"path", out}};
  if (f.has("format")) output["format"] = f.str("format");
  if (f.flag("overwrite")) output["overwrite"] = true;
  QCAL_RETURN_IF_ERROR(put_integer(f, "max-shard-mb", output, "max_shard_mb"));
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
  // What the coordinator (and qcal quantize) will check, with flag names in the errors.
  auto parsed = parse_job_spec(spec);
  if (!parsed.is_ok()) {
    std::map<std::string, std::string> key_flag;
    for (const FlagSpec& r : recipe_flags()) {
      const std::string key = recipe_key_of_flag(r.name);
      // The flag the user wrote (--no-act-order), else the key's first flag.
      if (!key.empty() && (!key_flag.count(key) || f.has(r.name))) key_flag[key] = r.name;
    }
    const std::string m = parsed.status().message();
    if (m.rfind("recipe.", 0) == 0) return flag_error(parsed.status(), key_flag);
    if (m.rfind("output.format", 0) == 0)
      return invalid_input("--format" + m.substr(std::string("output.format").size()));
    return parsed.status();
  }
  return spec;
}

}  // namespace qcal

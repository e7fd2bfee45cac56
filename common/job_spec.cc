#include "common/job_spec.h"

#include <cmath>
#include <limits>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include "common/json_util.h"
#include "common/limits.h"

namespace qcal {

const char* priority_name(Priority p) {
  switch (p) {
    case Priority::kHigh: return "high";
    case Priority::kNormal: return "normal";
    case Priority::kLow: return "low";
  }
  return "normal";
}

namespace {

using nlohmann::json;

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::number_float: return "a number";
    default: return "an integer";
  }
}

// Short rendering of a value for error messages.
std::string shown(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// One JSON object being read: every read key is remembered so that the rest
// can be reported as unknown. Errors name the full key path.
class Reader : public JsonFields {
 public:
  using JsonFields::JsonFields;

  Status str(const std::string& key, std::string* out, bool required) const {
    const json* v = find(key);
    if (!v) return required ? invalid_input(key_path(key) + ": required") : Status::ok();
    if (!v->is_string()) {
      return invalid_input(key_path(key) + ": must be a string (got " + type_name(*v) + ")");
    }
    *out = v->get<std::string>();
    if (out->empty()) return invalid_input(key_path(key) + ": must not be empty");
    return Status::ok();
  }

  Status boolean(const std::string& key, bool* out) const {
    const json* v = find(key);
    if (!v) return Status::ok();
    if (!v->is_boolean()) {
      return invalid_input(key_path(key) + ": must be true or false (got " + shown(*v) + ")");
    }
    *out = v->get<bool>();
    return Status::ok();
  }

  Status integer(const std::string& key, int64_t* out) const {
    const json* v = find(key);
    if (!v) return Status::ok();
    if (v->is_number_integer()) {
      if (v->is_number_unsigned() &&
          v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return invalid_input(key_path(key) + ": out of range (got " + shown(*v) + ")");
      }
      *out = v->get<int64_t>();
      return Status::ok();
    }
    // 4.0 from a client that writes every number as a float is still 4.
    if (v->is_number_float()) {
      double d = v->get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
        *out = static_cast<int64_t>(d);
        return Status::ok();
      }
    }
    return invalid_input(key_path(key) + ": must be an integer (got " + shown(*v) + ")");
  }

  Status number(const std::string& key, double* out) const {
    const json* v = find(key, /*null_is_absent=*/false);
    if (!v) return Status::ok();
    if (!v->is_number()) {
      return invalid_input(key_path(key) + ": must be a number (got " + shown(*v) + ")");
    }
    *out = v->get<double>();
    return Status::ok();
  }
};

// Paths are checked for form here (length, no NUL); where they lead is the
// path policy's business (common/path_policy.h).
Status check_path(const std::string& field, const std::string& p) {
  if (p.size() > limits::kMaxPathBytes)
    return invalid_input(field + ": longer than " + std::to_string(limits::kMaxPathBytes) +
                         " bytes");
  if (p.find('\0') != std::string::npos) return invalid_input(field + ": contains a NUL byte");
  return Status::ok();
}

Status require_object(const json& j, const std::string& path) {
  if (!j.is_object()) {
    return invalid_input(path + ": must be an object (got " + type_name(j) + ")");
  }
  return Status::ok();
}

Status one_of(const std::string& path, const std::string& v,
              const std::vector<std::string>& allowed) {
  for (const auto& a : allowed) {
    if (v == a) return Status::ok();
  }
  std::string list;
  for (size_t i = 0; i < allowed.size(); ++i) {
    list += (i == 0 ? "" : (i + 1 == allowed.size() ? " or " : ", ")) + allowed[i];
  }
  return invalid_input(path + ": must be " + list + " (got '" + v + "')");
}

bool contains(const std::vector<std::string>& v, const std::string& k) {
  for (const auto& e : v)
    if (e == k) return true;
  return false;
}

const std::vector<std::string>& transform_methods() {
  static const std::vector<std::string> k = {"smoothquant", "quarot", "spinquant", "flatquant"};
  return k;
}

// The calibration key to use instead of a weight-only one.
std::string calib_hint(const std::string& key) {
  if (key == "group_size") return "use w_group";
  if (key == "sym") return "the calibration engine quantizes weights symmetrically";
  if (key == "act_order") return "use gptq.act_order";
  if (key == "static_groups") return "use gptq.static_groups";
  if (key == "damp") return "use gptq.percdamp";
  if (key == "mse_clip") return "use w_mse_clip";
  if (key == "true_sequential") return "the calibration engine is always true-sequential";
  if (key == "mode") return "use cbq_parallel";
  if (key == "window") return "use cbq_window";
  if (key == "overlap") return "use cbq_overlap";
  return "not a calibration recipe key";
}

// A calibration recipe (see job_spec.h): checks the key set and resolves
// "method"; the engine checks the values when the job is planned.
Status parse_calib_recipe(const json& j, const std::string& why, RecipeSpec* r) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "method" || contains(calib_recipe_keys(), it.key())) continue;
    return invalid_input("recipe." + it.key() + ": a weight-only recipe key, but this is a " +
                         "calibration recipe (because of " + why + "); " + calib_hint(it.key()));
  }
  json c = j;
  std::string display;
  if (const auto it = j.find("method"); it != j.end()) {
    if (!it->is_string())
      return invalid_input("recipe.method: must be a string (got " + type_name(*it) + ")");
    const std::string m = it->get<std::string>();
    const bool solver = m == "rtn" || m == "gptq";
    if (!solver && !contains(transform_methods(), m))
      return invalid_input(
          "recipe.method: must be rtn, gptq, smoothquant, quarot, spinquant or "
          "flatquant (got '" +
          m + "')");
    const char* key = solver ? "weight_solver" : "transform";
    if (const auto k = j.find(key); k != j.end() && !(k->is_string() && k->get<std::string>() == m))
      return invalid_input(std::string("recipe.") + key + ": " + shown(*k) +
                           " contradicts recipe.method '" + m + "'");
    c.erase("method");
    c[key] = m;
  }
  if (const auto it = c.find("transform");
      it != c.end() && it->is_string() && it->get<std::string>() != "none")
    display = it->get<std::string>();
  if (display.empty()) {
    const auto it = c.find("weight_solver");
    display = it != c.end() && it->is_string() ? it->get<std::string>() : "rtn";
  }
  r->method = display;
  if (const auto it = c.find("w_bits"); it != c.end() && it->is_number_integer())
    r->w_bits = it->get<int>();
  if (const auto it = c.find("seed"); it != c.end() && it->is_number_unsigned())
    r->seed = it->get<uint64_t>();
  r->calib = std::move(c);
  return Status::ok();
}

Status parse_recipe(const json& j, RecipeSpec* r) {
  QCAL_RETURN_IF_ERROR(require_object(j, "recipe"));
  Reader rd(j, "recipe");
  // Which form: a key only the calibration schema has, or a transform as method.
  std::string why;
  for (auto it = j.begin(); it != j.end() && why.empty(); ++it) {
    const std::string& k = it.key();
    const bool weight_only = contains(weight_only_recipe_keys(), k);
    if (!weight_only && !contains(calib_recipe_keys(), k)) {
      std::string list;
      for (const auto& e : weight_only_recipe_keys()) list += (list.empty() ? "" : ", ") + e;
      std::string calib;
      for (const auto& e : calib_recipe_keys())
        if (!contains(weight_only_recipe_keys(), e)) calib += (calib.empty() ? "" : ", ") + e;
      return invalid_input("recipe." + k + ": unknown key (known: " + list +
                           "; calibration recipes: " + calib + ")");
    }
    if (!weight_only) why = k;
  }
  if (why.empty()) {
    if (const json* m = rd.find("method");
        m && m->is_string() && contains(transform_methods(), m->get<std::string>()))
      why = "method " + m->get<std::string>();
  }
  if (!why.empty()) return parse_calib_recipe(j, why, r);

  QCAL_RETURN_IF_ERROR(rd.check_keys(weight_only_recipe_keys()));
  QCAL_RETURN_IF_ERROR(rd.str("method", &r->method, false));
  QCAL_RETURN_IF_ERROR(one_of("recipe.method", r->method, {"rtn", "gptq"}));

  int64_t bits = r->w_bits;
  QCAL_RETURN_IF_ERROR(rd.integer("w_bits", &bits));
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
    return invalid_input("recipe.w_bits: must be one of 2, 3, 4, 8 (got " + std::to_string(bits) +
                         ")");
  }
  r->w_bits = static_cast<int>(bits);

  QCAL_RETURN_IF_ERROR(rd.integer("group_size", &r->group_size));
  if (r->group_size != -1 && (r->group_size <= 0 || r->group_size > limits::kMaxGroupSize)) {
    return invalid_input("recipe.group_size: must be -1 (per channel) or in [1, " +
                         std::to_string(limits::kMaxGroupSize) + "] (got " +
                         std::to_string(r->group_size) + ")");
  }
  QCAL_RETURN_IF_ERROR(rd.boolean("sym", &r->sym));
  QCAL_RETURN_IF_ERROR(rd.boolean("act_order", &r->act_order));
  QCAL_RETURN_IF_ERROR(rd.boolean("static_groups", &r->static_groups));
  QCAL_RETURN_IF_ERROR(rd.number("damp", &r->damp));
  if (!(r->damp > 0) || !(r->damp <= limits::kMaxDamp)) {
    std::ostringstream os;
    os << "recipe.damp: must be positive and at most " << limits::kMaxDamp << " (got " << r->damp
       << ")";
    return invalid_input(os.str());
  }
  QCAL_RETURN_IF_ERROR(rd.boolean("mse_clip", &r->mse_clip));
  QCAL_RETURN_IF_ERROR(rd.boolean("true_sequential", &r->true_sequential));
  QCAL_RETURN_IF_ERROR(rd.str("mode", &r->mode, false));
  QCAL_RETURN_IF_ERROR(one_of("recipe.mode", r->mode, {"sequential", "parallel"}));
  QCAL_RETURN_IF_ERROR(rd.integer("window", &r->window));
  if (r->window < 1 || r->window > limits::kMaxWindow) {
    return invalid_input("recipe.window: must be in [1, " + std::to_string(limits::kMaxWindow) +
                         "] (got " + std::to_string(r->window) + ")");
  }
  QCAL_RETURN_IF_ERROR(rd.integer("overlap", &r->overlap));
  if (r->overlap < 0 || r->overlap >= r->window) {
    return invalid_input("recipe.overlap: must be in [0, window) = [0, " +
                         std::to_string(r->window) + ") (got " + std::to_string(r->overlap) + ")");
  }
  if (const json* v = rd.find("seed")) {
    if (!v->is_number_unsigned() && !(v->is_number_integer() && v->get<int64_t>() >= 0)) {
      return invalid_input("recipe.seed: must be a non-negative integer (got " + shown(*v) + ")");
    }
    r->seed = v->get<uint64_t>();
  }
  return Status::ok();
}

Status parse_data(const json& j, const std::string& path, bool is_eval, DataSpec* d) {
  QCAL_RETURN_IF_ERROR(require_object(j, path));
  Reader rd(j, path);
  QCAL_RETURN_IF_ERROR(rd.check_keys({"path", "nsamples", "seqlen"}));
  QCAL_RETURN_IF_ERROR(rd.str("path", &d->path, /*required=*/true));
  QCAL_RETURN_IF_ERROR(check_path(path + ".path", d->path));
  QCAL_RETURN_IF_ERROR(rd.integer("nsamples", &d->nsamples));
  const int64_t min_samples = is_eval ? 0 : 1;
  if (d->nsamples < min_samples) {
    return invalid_input(path + ".nsamples: must be at least " + std::to_string(min_samples) +
                         (is_eval ? " (0 = all)" : "") + " (got " + std::to_string(d->nsamples) +
                         ")");
  }
  if (d->nsamples > limits::kMaxSequences) {
    return invalid_input(path + ".nsamples: must be at most " +
                         std::to_string(limits::kMaxSequences) + " (got " +
                         std::to_string(d->nsamples) + ")");
  }
  QCAL_RETURN_IF_ERROR(rd.integer("seqlen", &d->seqlen));
  if (d->seqlen < 2) {
    return invalid_input(path + ".seqlen: must be at least 2 (got " + std::to_string(d->seqlen) +
                         ")");
  }
  if (d->seqlen > limits::kMaxSeqlen) {
    return invalid_input(path + ".seqlen: must be at most " + std::to_string(limits::kMaxSeqlen) +
                         " (got " + std::to_string(d->seqlen) + ")");
  }
  return Status::ok();
}

Status parse_output(const json& j, bool calibration, OutputSpec* o) {
  QCAL_RETURN_IF_ERROR(require_object(j, "output"));
  Reader rd(j, "output");
  QCAL_RETURN_IF_ERROR(rd.check_keys({"path", "format", "overwrite"}));
  QCAL_RETURN_IF_ERROR(rd.str("path", &o->path, /*required=*/true));
  QCAL_RETURN_IF_ERROR(check_path("output.path", o->path));
  if (calibration) o->format = "auto";
  QCAL_RETURN_IF_ERROR(rd.str("format", &o->format, false));
  if (calibration) {
    QCAL_RETURN_IF_ERROR(
        one_of("output.format", o->format, {"auto", "native", "gptq", "compressed-tensors"}));
  } else if (o->format == "native" || o->format == "auto") {
    return invalid_input("output.format: " + o->format +
                         " is for calibration recipes (transform, a_bits, kv_bits, "
                         "reconstruction, intactkv, ...); a weight-only recipe writes gptq or "
                         "compressed-tensors");
  } else {
    QCAL_RETURN_IF_ERROR(one_of("output.format", o->format, {"gptq", "compressed-tensors"}));
  }
  QCAL_RETURN_IF_ERROR(rd.boolean("overwrite", &o->overwrite));
  return Status::ok();
}

Status parse_gate(const json& j, GateSpec* g) {
  QCAL_RETURN_IF_ERROR(require_object(j, "gate"));
  Reader rd(j, "gate");
  QCAL_RETURN_IF_ERROR(rd.check_keys({"max_ppl_increase", "max_kl"}));
  for (auto [key, out] :
       {std::pair{"max_ppl_increase", &g->max_ppl_increase}, std::pair{"max_kl", &g->max_kl}}) {
    const json* v = rd.find(key, /*null_is_absent=*/true);
    if (!v) continue;
    double d = 0;
    QCAL_RETURN_IF_ERROR(rd.number(key, &d));
    if (!(d >= 0)) {
      std::ostringstream os;
      os << "gate." << key << ": must be >= 0 (got " << d << ")";
      return invalid_input(os.str());
    }
    if (!(d <= limits::kMaxGateValue)) {
      std::ostringstream os;
      os << "gate." << key << ": must be at most " << limits::kMaxGateValue << " (got " << d << ")";
      return invalid_input(os.str());
    }
    *out = d;
  }
  return Status::ok();
}

bool label_key_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-' || c == '/';
}

Status parse_labels(const json& j, std::map<std::string, std::string>* labels) {
  QCAL_RETURN_IF_ERROR(require_object(j, "labels"));
  if (j.size() > limits::kMaxLabels)
    return invalid_input("labels: at most " + std::to_string(limits::kMaxLabels) + " (got " +
                         std::to_string(j.size()) + ")");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k.empty()) return invalid_input("labels: a label key must not be empty");
    bool ok = k.size() <= limits::kMaxLabelKeyBytes;
    for (char c : k) ok = ok && label_key_char(c);
    if (!ok)
      return invalid_input("labels: key " + shown(json(k)) + " must be 1 to " +
                           std::to_string(limits::kMaxLabelKeyBytes) +
                           " characters of A-Z a-z 0-9 . _ - /");
    if (!it->is_string()) {
      return invalid_input("labels." + k + ": must be a string (got " + type_name(*it) + ")");
    }
    const std::string& v = it->get_ref<const std::string&>();
    if (v.size() > limits::kMaxLabelValueBytes)
      return invalid_input("labels." + k + ": longer than " +
                           std::to_string(limits::kMaxLabelValueBytes) + " bytes (got " +
                           std::to_string(v.size()) + ")");
    for (unsigned char c : v)
      if (c < 0x20 || c == 0x7F)
        return invalid_input("labels." + k + ": must not contain control characters");
    (*labels)[k] = v;
  }
  return Status::ok();
}

json data_json(const DataSpec& d) {
  return {{"path", d.path}, {"nsamples", d.nsamples}, {"seqlen", d.seqlen}};
}

json optional_json(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

}  // namespace

const std::vector<std::string>& calib_recipe_keys() {
  // CalibRecipe::to_json's keys (worker/calib/recipe.h); test_job_spec checks the two agree.
  // clang-format off
  static const std::vector<std::string> k = {
      "transform", "weight_solver", "w_bits", "w_group", "w_mse_clip",
      "a_bits", "a_clip", "kv_bits", "kv_clip", "sq_alpha",
      "epochs", "cali_bsz", "flat_lr", "lwc", "lac", "add_diag", "diag_alpha",
      "spin_steps", "spin_lr", "spin_bsz", "embed_mean_sub",
      "intactkv", "intactkv_prefix", "intactkv_cal", "intactkv_cal_steps", "intactkv_cal_lr",
      "gptq", "seed", "batch",
      "reconstruction", "cbq_window", "cbq_overlap", "cbq_parallel", "cbq_epochs", "lora_rank",
      "cfp"};
  // clang-format on
  return k;
}

const std::vector<std::string>& weight_only_recipe_keys() {
  static const std::vector<std::string> k = {
      "method",   "w_bits",          "group_size", "sym",    "act_order", "static_groups", "damp",
      "mse_clip", "true_sequential", "mode",       "window", "overlap",   "seed"};
  return k;
}

json JobSpec::to_json() const {
  json j;
  j["model"] = model;
  if (recipe.calib) {
    j["recipe"] = *recipe.calib;
  } else {
    j["recipe"] = {{"method", recipe.method},
                   {"w_bits", recipe.w_bits},
                   {"group_size", recipe.group_size},
                   {"sym", recipe.sym},
                   {"act_order", recipe.act_order},
                   {"static_groups", recipe.static_groups},
                   {"damp", recipe.damp},
                   {"mse_clip", recipe.mse_clip},
                   {"true_sequential", recipe.true_sequential},
                   {"mode", recipe.mode},
                   {"window", recipe.window},
                   {"overlap", recipe.overlap},
                   {"seed", recipe.seed}};
  }
  j["calib"] = data_json(calib);
  j["eval"] = eval ? data_json(*eval) : json(nullptr);
  j["output"] = {{"path", output.path}, {"format", output.format}, {"overwrite", output.overwrite}};
  j["gate"] = {{"max_ppl_increase", optional_json(gate.max_ppl_increase)},
               {"max_kl", optional_json(gate.max_kl)}};
  j["priority"] = priority_name(priority);
  j["labels"] = json::object();
  for (const auto& [k, v] : labels) j["labels"][k] = v;
  return j;
}

Result<JobSpec> parse_job_spec(const nlohmann::json& j) {
  if (!j.is_object()) {
    return invalid_input("job spec: must be a JSON object (got " + type_name(j) + ")");
  }
  JobSpec s;
  Reader rd(j, "");
  QCAL_RETURN_IF_ERROR(
      rd.check_keys({"model", "recipe", "calib", "eval", "output", "gate", "priority", "labels"}));
  QCAL_RETURN_IF_ERROR(rd.str("model", &s.model, /*required=*/true));
  QCAL_RETURN_IF_ERROR(check_path("model", s.model));
  if (const json* v = rd.find("recipe", true)) QCAL_RETURN_IF_ERROR(parse_recipe(*v, &s.recipe));

  const json* calib = rd.find("calib");
  if (!calib) return invalid_input("calib.path: required");
  QCAL_RETURN_IF_ERROR(parse_data(*calib, "calib", /*is_eval=*/false, &s.calib));
  if (const json* v = rd.find("eval", true)) {
    DataSpec e;
    e.nsamples = 0;  // eval default: every sequence
    QCAL_RETURN_IF_ERROR(parse_data(*v, "eval", /*is_eval=*/true, &e));
    s.eval = e;
  }

  const json* output = rd.find("output");
  if (!output) return invalid_input("output.path: required");
  QCAL_RETURN_IF_ERROR(parse_output(*output, s.recipe.calibration(), &s.output));
  if (!s.recipe.calibration() && s.output.format == "compressed-tensors" && s.recipe.w_bits != 4 &&
      s.recipe.w_bits != 8) {
    return invalid_input("output.format: compressed-tensors needs recipe.w_bits 4 or 8 (got " +
                         std::to_string(s.recipe.w_bits) + ")");
  }
  if (const json* v = rd.find("gate", true)) QCAL_RETURN_IF_ERROR(parse_gate(*v, &s.gate));

  std::string priority = "normal";
  QCAL_RETURN_IF_ERROR(rd.str("priority", &priority, false));
  QCAL_RETURN_IF_ERROR(one_of("priority", priority, {"high", "normal", "low"}));
  s.priority = priority == "high"  ? Priority::kHigh
               : priority == "low" ? Priority::kLow
                                   : Priority::kNormal;
  if (const json* v = rd.find("labels", true)) QCAL_RETURN_IF_ERROR(parse_labels(*v, &s.labels));
  return s;
}

}  // namespace qcal

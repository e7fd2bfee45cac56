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

Status parse_output(const json& j, OutputSpec* o) {
  QCAL_RETURN_IF_ERROR(require_object(j, "output"));
  Reader rd(j, "output");
  QCAL_RETURN_IF_ERROR(rd.check_keys({"path", "format", "overwrite", "max_shard_mb"}));
  QCAL_RETURN_IF_ERROR(rd.str("path", &o->path, /*required=*/true));
  QCAL_RETURN_IF_ERROR(check_path("output.path", o->path));
  QCAL_RETURN_IF_ERROR(rd.str("format", &o->format, false));
  if (o->format == "compressed_tensors" || o->format == "ct") o->format = "compressed-tensors";
  QCAL_RETURN_IF_ERROR(
      one_of("output.format", o->format, {"auto", "native", "gptq", "compressed-tensors"}));
  QCAL_RETURN_IF_ERROR(rd.boolean("overwrite", &o->overwrite));
  QCAL_RETURN_IF_ERROR(rd.integer("max_shard_mb", &o->max_shard_mb));
  if (o->max_shard_mb < 1 || o->max_shard_mb > (int64_t{1} << 20))
    return invalid_input("output.max_shard_mb: must be in [1, 1048576] (got " +
                         std::to_string(o->max_shard_mb) + ")");
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

Result<std::string> output_format(const JobSpec& spec) {
  const Recipe& r = spec.recipe;
  const std::string& f = spec.output.format;
  if (f == "auto") return std::string(r.folds_completely() ? "gptq" : "native");
  if (f == "native") {
    if (!r.w_sym())
      return invalid_input(
          "output.format: native stores symmetric weights; asymmetric (w_sym false) needs gptq "
          "or compressed-tensors");
    return f;
  }
  if (!r.folds_completely())
    return invalid_input("output.format: " + f + " holds quantized weights only, but the recipe " +
                         (r.intactkv() ? std::string("keeps an IntactKV cache")
                                       : "leaves transforms or quantizers online (" +
                                             r.display_name() + ", a_bits " +
                                             std::to_string(r.a_bits()) + ", kv_bits " +
                                             std::to_string(r.kv_bits()) + ")") +
                         "; use native or auto");
  if (f == "compressed-tensors" && r.w_bits() != 4 && r.w_bits() != 8)
    return invalid_input("output.format: compressed-tensors needs w_bits 4 or 8 (got " +
                         std::to_string(r.w_bits()) + ")");
  return f;
}

json JobSpec::to_json() const {
  json j;
  j["model"] = model;
  j["recipe"] = recipe.to_json();
  j["calib"] = data_json(calib);
  j["eval"] = eval ? data_json(*eval) : json(nullptr);
  j["output"] = {{"path", output.path},
                 {"format", output.format},
                 {"overwrite", output.overwrite},
                 {"max_shard_mb", output.max_shard_mb}};
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
  {
    const json* v = rd.find("recipe", true);
    QCAL_ASSIGN_OR_RETURN(s.recipe, recipe_from_json(v ? *v : json::object(), "recipe"));
    Status st = s.recipe.validate();
    if (!st.is_ok()) return Status(st.code(), "recipe." + st.message());
  }

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
  QCAL_RETURN_IF_ERROR(parse_output(*output, &s.output));
  QCAL_RETURN_IF_ERROR(output_format(s).status());
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

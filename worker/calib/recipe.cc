#include "worker/calib/recipe.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/json_util.h"
#include "kernels/hadamard.h"
#include "worker/calib/param.h"

namespace qcal::calib {

namespace {

using nlohmann::json;

std::string num(double v) {
  std::string s = std::to_string(v);
  while (s.size() > 1 && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

// The native format's integer kernels take these activation / K/V widths (native.h).
bool act_bits_ok(int b) { return b == 16 || b == 2 || b == 3 || b == 4 || b == 6 || b == 8; }
// The engine's quantizers and writers support these weight widths (worker/engine/quantizer.h).
bool w_bits_ok(int b) { return b == 16 || b == 2 || b == 3 || b == 4 || b == 8; }

// IntactKV "+Cal" (§6.4): trains the prefix cache of intactkv against the FP model,
// which only makes sense when something is quantized. validate() and validate_for()
// both run it (the transform-only probe of methods.cc bypasses the former).
Status check_intactkv_cal(const CalibRecipe& r) {
  if (r.intactkv_cal_steps < 1 || r.intactkv_cal_steps > 100000000) {
    return invalid_input("intactkv_cal_steps: must be in [1, 100000000] (got " +
                         std::to_string(r.intactkv_cal_steps) + ")");
  }
  if (!std::isfinite(r.intactkv_cal_lr) || r.intactkv_cal_lr <= 0) {
    return invalid_input("intactkv_cal_lr: must be positive (got " + num(r.intactkv_cal_lr) + ")");
  }
  if (!r.intactkv_cal) return Status::ok();
  if (!r.intactkv)
    return invalid_input("intactkv_cal: trains the IntactKV cache; turn intactkv on");
  if (r.w_bits == 16 && r.a_bits == 16 && r.kv_bits == 16) {
    return invalid_input(
        "intactkv_cal: w_bits, a_bits, kv_bits all 16: the model equals the FP one, there is "
        "nothing to calibrate the cache against");
  }
  return Status::ok();
}

// The caps on every numeric option (issue #11: an accepted job must be one a
// worker can run; FlatQuant epochs 1e9 used to be accepted). One table, so the
// method registry (issue #10) can take it over: field, range, whether the lower
// bound is open, and how to read the value. Checked after the specific checks
// below (their messages explain more), so this table only adds the upper
// bounds they lack. README.md "Limits" lists the same numbers.
struct RecipeCap {
  const char* field;
  double lo, hi;
  bool lo_open;  // (lo, hi] instead of [lo, hi]
  double (*get)(const CalibRecipe&);
};
// clang-format off
constexpr RecipeCap kRecipeCaps[] = {
    {"w_group", -1, 65536, false, [](const CalibRecipe& r) { return double(r.w_group); }},
    {"epochs", 0, 1000, false, [](const CalibRecipe& r) { return double(r.epochs); }},
    {"cali_bsz", 1, 4096, false, [](const CalibRecipe& r) { return double(r.cali_bsz); }},
    {"flat_lr", 0, 10, true, [](const CalibRecipe& r) { return r.flat_lr; }},
    {"spin_steps", 0, 100000, false, [](const CalibRecipe& r) { return double(r.spin_steps); }},
    {"spin_lr", 0, 100, true, [](const CalibRecipe& r) { return r.spin_lr; }},
    {"spin_bsz", 1, 4096, false, [](const CalibRecipe& r) { return double(r.spin_bsz); }},
    {"batch", 1, 4096, false, [](const CalibRecipe& r) { return double(r.batch); }},
    {"gptq.percdamp", 0, 1, false, [](const CalibRecipe& r) { return r.gptq.percdamp; }},
    {"gptq.blocksize", 1, 65536, false, [](const CalibRecipe& r) { return double(r.gptq.blocksize); }},
    {"intactkv_prefix (tokens)", 0, 4096, false,
     [](const CalibRecipe& r) { return double(r.intactkv_prefix.size()); }},
    {"intactkv_cal_steps", 1, 100000000, false,
     [](const CalibRecipe& r) { return double(r.intactkv_cal_steps); }},
    {"intactkv_cal_lr", 0, 1, true, [](const CalibRecipe& r) { return r.intactkv_cal_lr; }},
    {"cbq_window", 1, 4096, false, [](const CalibRecipe& r) { return double(r.cbq_window); }},
    {"cbq_epochs", 1, 1000000, false, [](const CalibRecipe& r) { return double(r.cbq_epochs); }},
    {"lora_rank", 0, 65536, false, [](const CalibRecipe& r) { return double(r.lora_rank); }},
};
// clang-format on

Status check_caps(const CalibRecipe& r) {
  for (const RecipeCap& c : kRecipeCaps) {
    const double v = c.get(r);
    const bool ok = (c.lo_open ? v > c.lo : v >= c.lo) && v <= c.hi;
    if (!ok)
      return invalid_input(std::string(c.field) + ": must be in " + (c.lo_open ? "(" : "[") +
                           num(c.lo) + ", " + num(c.hi) + "] (got " + num(v) + ")");
  }
  return Status::ok();
}

// Everything but the "nothing to quantize" check, which the transform-only
// equivalence check (methods.md §10 item 6) must be able to bypass.
Status validate_fields(const CalibRecipe& r) {
  if (!w_bits_ok(r.w_bits)) {
    return invalid_input("w_bits: must be 2, 3, 4, 8 or 16 (got " + std::to_string(r.w_bits) + ")");
  }
  if (!act_bits_ok(r.a_bits)) {
    return invalid_input("a_bits: must be 2, 3, 4, 6, 8 or 16 (got " + std::to_string(r.a_bits) +
                         ")");
  }
  if (!act_bits_ok(r.kv_bits)) {
    return invalid_input("kv_bits: must be 2, 3, 4, 6, 8 or 16 (got " + std::to_string(r.kv_bits) +
                         ")");
  }
  if (r.w_group != -1 && r.w_group < 1) {
    return invalid_input("w_group: must be -1 (per channel) or positive (got " +
                         std::to_string(r.w_group) + ")");
  }
  auto in_unit = [](double v, bool open_zero) {
    return std::isfinite(v) && v <= 1.0 && (open_zero ? v > 0.0 : v >= 0.0);
  };
  if (!in_unit(r.a_clip, true))
    return invalid_input("a_clip: must be in (0, 1] (got " + num(r.a_clip) + ")");
  if (!in_unit(r.kv_clip, true)) {
    return invalid_input("kv_clip: must be in (0, 1] (got " + num(r.kv_clip) + ")");
  }
  if (!in_unit(r.sq_alpha, false)) {
    return invalid_input("sq_alpha: must be in [0, 1] (got " + num(r.sq_alpha) + ")");
  }
  if (!in_unit(r.diag_alpha, false)) {
    return invalid_input("diag_alpha: must be in [0, 1] (got " + num(r.diag_alpha) + ")");
  }
  if (r.epochs < 0)
    return invalid_input("epochs: must be >= 0 (got " + std::to_string(r.epochs) + ")");
  if (r.cali_bsz < 1) {
    return invalid_input("cali_bsz: must be >= 1 (got " + std::to_string(r.cali_bsz) + ")");
  }
  if (!std::isfinite(r.flat_lr) || r.flat_lr <= 0) {
    return invalid_input("flat_lr: must be positive (got " + num(r.flat_lr) + ")");
  }
  if (r.spin_steps < 0) {
    return invalid_input("spin_steps: must be >= 0 (got " + std::to_string(r.spin_steps) + ")");
  }
  if (!std::isfinite(r.spin_lr) || r.spin_lr <= 0) {
    return invalid_input("spin_lr: must be positive (got " + num(r.spin_lr) + ")");
  }
  if (r.spin_bsz < 1) {
    return invalid_input("spin_bsz: must be >= 1 (got " + std::to_string(r.spin_bsz) + ")");
  }
  if (r.batch < 1)
    return invalid_input("batch: must be >= 1 (got " + std::to_string(r.batch) + ")");
  if (!std::isfinite(r.gptq.percdamp) || r.gptq.percdamp < 0) {
    return invalid_input("gptq.percdamp: must be >= 0 (got " + num(r.gptq.percdamp) + ")");
  }
  if (r.gptq.blocksize < 1) {
    return invalid_input("gptq.blocksize: must be positive (got " +
                         std::to_string(r.gptq.blocksize) + ")");
  }
  if (r.transform == Transform::kFlatQuant && r.lwc && r.w_mse_clip && r.w_bits < 16) {
    return invalid_input(
        "w_mse_clip: flatquant with lwc learns the weight clipping itself; turn one of them off");
  }
  // The native format keeps one scale per (row, group) of consecutive columns: act-order
  // groups (non-monotone g_idx) only fit with static groups. GPTQ / compressed-tensors
  // (the fully folded case) take them as they are.
  if (r.weight_solver == WeightSolver::kGptq && r.gptq.act_order && r.w_group > 0 &&
      !r.gptq.static_groups && r.w_bits < 16 && !r.folds_completely()) {
    return invalid_input(
        "gptq.act_order: with w_group > 0 the native format needs gptq.static_groups "
        "(one scale per group of consecutive columns)");
  }
  if (!r.intactkv && !r.intactkv_prefix.empty())
    return invalid_input("intactkv_prefix: set without intactkv (turn intactkv on)");
  for (size_t i = 0; i < r.intactkv_prefix.size(); ++i) {
    if (r.intactkv_prefix[i] < 0) {
      return invalid_input("intactkv_prefix: token " + std::to_string(i) + " = " +
                           std::to_string(r.intactkv_prefix[i]) + " is negative");
    }
  }
  QCAL_RETURN_IF_ERROR(check_intactkv_cal(r));
  // Reconstruction (cbq.h; issue #5).
  const bool recon = r.reconstruction != Reconstruction::kNone;
  if (r.weight_solver == WeightSolver::kLoraRounding && !recon) {
    return invalid_input(
        "weight_solver: lora-rounding learns the rounding inside a block reconstruction; set "
        "reconstruction to block or cbq");
  }
  if (recon && r.weight_solver == WeightSolver::kGptq) {
    return invalid_input(
        std::string("reconstruction: ") + reconstruction_str(r.reconstruction) +
        " learns the weights' step sizes and rounding itself and would discard gptq's "
        "solution; use weight_solver rtn (learned step sizes, round to nearest) or "
        "lora-rounding");
  }
  if (recon && r.w_bits == 16) {
    return invalid_input(std::string("reconstruction: ") + reconstruction_str(r.reconstruction) +
                         " learns the step sizes and rounding of quantized weights; it needs "
                         "w_bits 2, 3, 4 or 8 (got 16)");
  }
  if (recon && r.w_mse_clip && r.w_bits < 16) {
    return invalid_input(
        "w_mse_clip: the reconstruction learns the weight step sizes itself; turn w_mse_clip off");
  }
  if (r.cbq_window < 1 || r.cbq_window > 4096) {
    return invalid_input("cbq_window: must be in [1, 4096] blocks (got " +
                         std::to_string(r.cbq_window) + ")");
  }
  if (r.cbq_overlap < 0 || r.cbq_overlap >= r.cbq_window) {
    return invalid_input("cbq_overlap: must be in [0, cbq_window) = [0, " +
                         std::to_string(r.cbq_window) + ") (got " + std::to_string(r.cbq_overlap) +
                         ")");
  }
  if (r.cbq_epochs < 1 || r.cbq_epochs > 1000000) {
    return invalid_input("cbq_epochs: must be in [1, 1000000] (got " +
                         std::to_string(r.cbq_epochs) + ")");
  }
  if (r.lora_rank < 0 || r.lora_rank > 65536) {
    return invalid_input("lora_rank: must be in [0, 65536] (got " + std::to_string(r.lora_rank) +
                         ")");
  }
  if (r.weight_solver == WeightSolver::kLoraRounding && r.lora_rank < 1) {
    return invalid_input(
        "lora_rank: must be >= 1 with weight_solver lora-rounding (learned step sizes with "
        "round to nearest only is weight_solver rtn)");
  }
  if (r.transform == Transform::kSpinQuant && r.weight_solver == WeightSolver::kGptq &&
      r.a_bits == 16 && r.kv_bits == 16 && r.w_bits < 16) {
    return invalid_input(
        "transform: spinquant with weight_solver gptq trains its rotations at W16 (methods.md "
        "§4.2); with a_bits = kv_bits = 16 there is nothing to train them on (use quarot, or rtn)");
  }
  return check_caps(r);
}

// ---- JSON reading: every key is checked for its type; unknown keys are errors.
class Reader : public JsonFields {
 public:
  using JsonFields::JsonFields;
  Status get(const std::string& k, bool* out) const {
    const json* v = find(k);
    if (!v) return Status::ok();
    if (!v->is_boolean())
      return invalid_input(key_path(k) + ": must be a boolean (got " + v->dump() + ")");
    *out = v->get<bool>();
    return Status::ok();
  }
  template <typename I>
  Status get_int(const std::string& k, I* out) const {
    const json* v = find(k);
    if (!v) return Status::ok();
    bool ok = v->is_number_integer();
    if (!ok && v->is_number_float()) {
      double d = v->get<double>();
      ok = std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15;
    }
    if (!ok) return invalid_input(key_path(k) + ": must be an integer (got " + v->dump() + ")");
    if constexpr (std::is_unsigned_v<I>) {
      if (v->is_number_unsigned()) {
        *out = static_cast<I>(v->get<uint64_t>());
        return Status::ok();
      }
      if (v->get<double>() < 0)
        return invalid_input(key_path(k) + ": must be >= 0 (got " + v->dump() + ")");
    }
    double d = v->get<double>();
    if (d < static_cast<double>(std::numeric_limits<I>::min()) ||
        d > static_cast<double>(std::numeric_limits<I>::max())) {
      return invalid_input(key_path(k) + ": out of range (got " + v->dump() + ")");
    }
    *out = v->is_number_integer() ? v->get<I>() : static_cast<I>(d);
    return Status::ok();
  }
  Status get(const std::string& k, double* out) const {
    const json* v = find(k);
    if (!v) return Status::ok();
    if (!v->is_number())
      return invalid_input(key_path(k) + ": must be a number (got " + v->dump() + ")");
    *out = v->get<double>();
    return Status::ok();
  }
  // An array of token ids (each an integer in int32 range; signs are validate()'s job).
  Status get(const std::string& k, std::vector<int32_t>* out) const {
    const json* v = find(k);
    if (!v) return Status::ok();
    if (!v->is_array())
      return invalid_input(key_path(k) + ": must be an array of token ids (got " + v->dump() + ")");
    std::vector<int32_t> ids;
    for (size_t i = 0; i < v->size(); ++i) {
      const json& e = (*v)[i];
      const std::string at = key_path(k) + "[" + std::to_string(i) + "]";
      if (!e.is_number_integer())
        return invalid_input(at + ": must be an integer (got " + e.dump() + ")");
      constexpr int64_t lo = std::numeric_limits<int32_t>::min(),
                        hi = std::numeric_limits<int32_t>::max();
      const bool big = e.is_number_unsigned() ? e.get<uint64_t>() > static_cast<uint64_t>(hi)
                                              : (e.get<int64_t>() < lo || e.get<int64_t>() > hi);
      if (big) return invalid_input(at + ": out of range (got " + e.dump() + ")");
      ids.push_back(static_cast<int32_t>(e.get<int64_t>()));
    }
    *out = std::move(ids);
    return Status::ok();
  }
  Status get(const std::string& k, std::string* out) const {
    const json* v = find(k);
    if (!v) return Status::ok();
    if (!v->is_string())
      return invalid_input(key_path(k) + ": must be a string (got " + v->dump() + ")");
    *out = v->get<std::string>();
    return Status::ok();
  }
};

}  // namespace

const char* transform_name(Transform t) {
  switch (t) {
    case Transform::kNone: return "none";
    case Transform::kSmoothQuant: return "smoothquant";
    case Transform::kQuaRot: return "quarot";
    case Transform::kSpinQuant: return "spinquant";
    case Transform::kFlatQuant: return "flatquant";
  }
  return "none";
}

Result<Transform> parse_transform(const std::string& s) {
  for (Transform t : {Transform::kNone, Transform::kSmoothQuant, Transform::kQuaRot,
                      Transform::kSpinQuant, Transform::kFlatQuant}) {
    if (s == transform_name(t)) return t;
  }
  return invalid_input("transform: unknown '" + s +
                       "' (expected none, smoothquant, quarot, spinquant or flatquant)");
}

const char* weight_solver_str(WeightSolver s) {
  switch (s) {
    case WeightSolver::kRtn: return "rtn";
    case WeightSolver::kGptq: return "gptq";
    case WeightSolver::kLoraRounding: return "lora-rounding";
  }
  return "rtn";
}

Result<WeightSolver> parse_weight_solver(const std::string& s) {
  for (WeightSolver w : {WeightSolver::kRtn, WeightSolver::kGptq, WeightSolver::kLoraRounding})
    if (s == weight_solver_str(w)) return w;
  return invalid_input("weight_solver: unknown '" + s + "' (expected rtn, gptq or lora-rounding)");
}

const char* reconstruction_str(Reconstruction r) {
  switch (r) {
    case Reconstruction::kNone: return "none";
    case Reconstruction::kBlock: return "block";
    case Reconstruction::kCbq: return "cbq";
  }
  return "none";
}

Result<Reconstruction> parse_reconstruction(const std::string& s) {
  for (Reconstruction r : {Reconstruction::kNone, Reconstruction::kBlock, Reconstruction::kCbq})
    if (s == reconstruction_str(r)) return r;
  return invalid_input("reconstruction: unknown '" + s + "' (expected none, block or cbq)");
}

bool CalibRecipe::transforms_fold() const {
  return w_bits < 16 && a_bits == 16 && kv_bits == 16 && transform != Transform::kFlatQuant;
}

bool CalibRecipe::folds_completely() const { return transforms_fold() && !intactkv; }

std::vector<int32_t> CalibRecipe::intactkv_prefix_for(const ModelConfig& c) const {
  if (!intactkv_prefix.empty()) return intactkv_prefix;
  return {static_cast<int32_t>(c.bos_token_id)};
}

Status CalibRecipe::validate() const {
  QCAL_RETURN_IF_ERROR(validate_fields(*this));
  if (w_bits == 16 && a_bits == 16 && kv_bits == 16) {
    return invalid_input(std::string("w_bits, a_bits, kv_bits: all 16, ") +
                         (transform == Transform::kNone
                              ? "nothing to quantize"
                              : std::string(transform_name(transform)) +
                                    " has nothing to prepare for (no quantizer is on)"));
  }
  return Status::ok();
}

Status CalibRecipe::validate_for(const ModelConfig& c) const {
  QCAL_RETURN_IF_ERROR(check_intactkv_cal(*this));
  const int64_t H = c.hidden_size, I = c.intermediate_size, nh = c.num_attention_heads,
                d = c.head_dim;
  if (w_bits < 16 && w_group > 0) {
    const std::pair<const char*, int64_t> dims[] = {
        {"hidden_size", H}, {"num_attention_heads*head_dim", c.q_dim()}, {"intermediate_size", I}};
    for (const auto& [name, n] : dims) {
      if (n % w_group != 0) {
        return invalid_input("w_group: " + std::to_string(w_group) + " does not divide " + name +
                             " " + std::to_string(n));
      }
    }
  }
  if (transform == Transform::kQuaRot || transform == Transform::kSpinQuant) {
    std::vector<std::pair<const char*, int64_t>> dims = {{"hidden_size", H}, {"head_dim", d}};
    if (!transforms_fold()) {
      dims.push_back({"intermediate_size", I});
      if (transform == Transform::kQuaRot) dims.push_back({"num_attention_heads", nh});
    }
    for (const auto& [name, n] : dims) {
      if (!hadamard_k(n).is_ok()) {
        return invalid_input(std::string("transform: ") + transform_name(transform) +
                             " needs a Hadamard matrix of " + name + " " + std::to_string(n) +
                             " (n = K·2^m with K in 1, 12, 20, 28, 36, 40, 52, 60, 108, 140, "
                             "156, 172)");
      }
    }
  }
  if (transform == Transform::kFlatQuant) {
    const std::pair<const char*, int64_t> dims[] = {{"hidden_size", H}, {"intermediate_size", I}};
    for (const auto& [name, n] : dims) {
      if (!decompose_dim(n).is_ok()) {
        return invalid_input(std::string("transform: flatquant cannot split ") + name + " " +
                             std::to_string(n) + " into a Kronecker pair (n must not be 2 mod 4)");
      }
    }
  }
  if (reconstruction == Reconstruction::kCbq && cbq_window > c.num_hidden_layers) {
    return invalid_input("cbq_window: " + std::to_string(cbq_window) +
                         " blocks per window, but the model has " +
                         std::to_string(c.num_hidden_layers) + " layers");
  }
  if (intactkv) {
    if (intactkv_prefix.empty() && (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size)) {
      return invalid_input("intactkv: the model's bos_token_id " + std::to_string(c.bos_token_id) +
                           " is outside the vocabulary (" + std::to_string(c.vocab_size) +
                           "); give intactkv_prefix");
    }
    for (size_t i = 0; i < intactkv_prefix.size(); ++i) {
      if (intactkv_prefix[i] < 0 || intactkv_prefix[i] >= c.vocab_size) {
        return invalid_input("intactkv_prefix: token " + std::to_string(i) + " = " +
                             std::to_string(intactkv_prefix[i]) +
                             " is outside the vocabulary [0, " + std::to_string(c.vocab_size) +
                             ")");
      }
    }
  }
  return Status::ok();
}

nlohmann::json CalibRecipe::to_json() const {
  json j;
  j["transform"] = transform_name(transform);
  j["weight_solver"] = weight_solver_str(weight_solver);
  j["w_bits"] = w_bits;
  j["w_group"] = w_group;
  j["w_mse_clip"] = w_mse_clip;
  j["a_bits"] = a_bits;
  j["a_clip"] = a_clip;
  j["kv_bits"] = kv_bits;
  j["kv_clip"] = kv_clip;
  j["sq_alpha"] = sq_alpha;
  j["epochs"] = epochs;
  j["cali_bsz"] = cali_bsz;
  j["flat_lr"] = flat_lr;
  j["lwc"] = lwc;
  j["lac"] = lac;
  j["add_diag"] = add_diag;
  j["diag_alpha"] = diag_alpha;
  j["spin_steps"] = spin_steps;
  j["spin_lr"] = spin_lr;
  j["spin_bsz"] = spin_bsz;
  j["embed_mean_sub"] = embed_mean_sub;
  j["intactkv"] = intactkv;
  j["intactkv_prefix"] = intactkv_prefix;
  j["intactkv_cal"] = intactkv_cal;
  j["intactkv_cal_steps"] = intactkv_cal_steps;
  j["intactkv_cal_lr"] = intactkv_cal_lr;
  j["gptq"] = {{"percdamp", gptq.percdamp},
               {"blocksize", gptq.blocksize},
               {"act_order", gptq.act_order},
               {"static_groups", gptq.static_groups}};
  j["reconstruction"] = reconstruction_str(reconstruction);
  j["cbq_window"] = cbq_window;
  j["cbq_overlap"] = cbq_overlap;
  j["cbq_parallel"] = cbq_parallel;
  j["cbq_epochs"] = cbq_epochs;
  j["lora_rank"] = lora_rank;
  j["cfp"] = cfp;
  j["seed"] = seed;
  j["batch"] = batch;
  return j;
}

Result<CalibRecipe> recipe_from_json(const nlohmann::json& j) {
  if (!j.is_object()) return invalid_input("recipe: must be an object (got " + j.dump() + ")");
  CalibRecipe r;
  Reader rd(j, "");
  static const std::vector<std::string> kKeys = {"transform",
                                                 "weight_solver",
                                                 "w_bits",
                                                 "w_group",
                                                 "w_mse_clip",
                                                 "a_bits",
                                                 "a_clip",
                                                 "kv_bits",
                                                 "kv_clip",
                                                 "sq_alpha",
                                                 "epochs",
                                                 "cali_bsz",
                                                 "flat_lr",
                                                 "lwc",
                                                 "lac",
                                                 "add_diag",
                                                 "diag_alpha",
                                                 "spin_steps",
                                                 "spin_lr",
                                                 "spin_bsz",
                                                 "embed_mean_sub",
                                                 "intactkv",
                                                 "intactkv_prefix",
                                                 "intactkv_cal",
                                                 "intactkv_cal_steps",
                                                 "intactkv_cal_lr",
                                                 "gptq",
                                                 "seed",
                                                 "batch",
                                                 "reconstruction",
                                                 "cbq_window",
                                                 "cbq_overlap",
                                                 "cbq_parallel",
                                                 "cbq_epochs",
                                                 "lora_rank",
                                                 "cfp"};
  QCAL_RETURN_IF_ERROR(rd.check_keys(kKeys));
  std::string s;
  if (rd.find("transform")) {
    QCAL_RETURN_IF_ERROR(rd.get("transform", &s));
    QCAL_ASSIGN_OR_RETURN(r.transform, parse_transform(s));
  }
  if (rd.find("weight_solver")) {
    QCAL_RETURN_IF_ERROR(rd.get("weight_solver", &s));
    QCAL_ASSIGN_OR_RETURN(r.weight_solver, parse_weight_solver(s));
  }
  if (rd.find("reconstruction")) {
    QCAL_RETURN_IF_ERROR(rd.get("reconstruction", &s));
    QCAL_ASSIGN_OR_RETURN(r.reconstruction, parse_reconstruction(s));
  }
  QCAL_RETURN_IF_ERROR(rd.get_int("cbq_window", &r.cbq_window));
  QCAL_RETURN_IF_ERROR(rd.get_int("cbq_overlap", &r.cbq_overlap));
  QCAL_RETURN_IF_ERROR(rd.get("cbq_parallel", &r.cbq_parallel));
  QCAL_RETURN_IF_ERROR(rd.get_int("cbq_epochs", &r.cbq_epochs));
  QCAL_RETURN_IF_ERROR(rd.get_int("lora_rank", &r.lora_rank));
  QCAL_RETURN_IF_ERROR(rd.get("cfp", &r.cfp));
  QCAL_RETURN_IF_ERROR(rd.get_int("w_bits", &r.w_bits));
  QCAL_RETURN_IF_ERROR(rd.get_int("w_group", &r.w_group));
  QCAL_RETURN_IF_ERROR(rd.get("w_mse_clip", &r.w_mse_clip));
  QCAL_RETURN_IF_ERROR(rd.get_int("a_bits", &r.a_bits));
  QCAL_RETURN_IF_ERROR(rd.get("a_clip", &r.a_clip));
  QCAL_RETURN_IF_ERROR(rd.get_int("kv_bits", &r.kv_bits));
  QCAL_RETURN_IF_ERROR(rd.get("kv_clip", &r.kv_clip));
  QCAL_RETURN_IF_ERROR(rd.get("sq_alpha", &r.sq_alpha));
  QCAL_RETURN_IF_ERROR(rd.get_int("epochs", &r.epochs));
  QCAL_RETURN_IF_ERROR(rd.get_int("cali_bsz", &r.cali_bsz));
  QCAL_RETURN_IF_ERROR(rd.get("flat_lr", &r.flat_lr));
  QCAL_RETURN_IF_ERROR(rd.get("lwc", &r.lwc));
  QCAL_RETURN_IF_ERROR(rd.get("lac", &r.lac));
  QCAL_RETURN_IF_ERROR(rd.get("add_diag", &r.add_diag));
  QCAL_RETURN_IF_ERROR(rd.get("diag_alpha", &r.diag_alpha));
  QCAL_RETURN_IF_ERROR(rd.get_int("spin_steps", &r.spin_steps));
  QCAL_RETURN_IF_ERROR(rd.get("spin_lr", &r.spin_lr));
  QCAL_RETURN_IF_ERROR(rd.get_int("spin_bsz", &r.spin_bsz));
  QCAL_RETURN_IF_ERROR(rd.get("embed_mean_sub", &r.embed_mean_sub));
  QCAL_RETURN_IF_ERROR(rd.get("intactkv", &r.intactkv));
  QCAL_RETURN_IF_ERROR(rd.get("intactkv_prefix", &r.intactkv_prefix));
  QCAL_RETURN_IF_ERROR(rd.get("intactkv_cal", &r.intactkv_cal));
  QCAL_RETURN_IF_ERROR(rd.get_int("intactkv_cal_steps", &r.intactkv_cal_steps));
  QCAL_RETURN_IF_ERROR(rd.get("intactkv_cal_lr", &r.intactkv_cal_lr));
  QCAL_RETURN_IF_ERROR(rd.get_int("seed", &r.seed));
  QCAL_RETURN_IF_ERROR(rd.get_int("batch", &r.batch));
  if (const json* g = rd.find("gptq")) {
    if (!g->is_object()) return invalid_input("gptq: must be an object (got " + g->dump() + ")");
    Reader gr(*g, "gptq");
    QCAL_RETURN_IF_ERROR(gr.check_keys({"percdamp", "blocksize", "act_order", "static_groups"}));
    QCAL_RETURN_IF_ERROR(gr.get("percdamp", &r.gptq.percdamp));
    QCAL_RETURN_IF_ERROR(gr.get_int("blocksize", &r.gptq.blocksize));
    QCAL_RETURN_IF_ERROR(gr.get("act_order", &r.gptq.act_order));
    QCAL_RETURN_IF_ERROR(gr.get("static_groups", &r.gptq.static_groups));
  }
  return r;
}

}  // namespace qcal::calib

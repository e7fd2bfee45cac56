#include "worker/engine/recipe.h"

#include <string>

namespace qcal {

Result<QuantizeOptions> quantize_options_from_spec(const JobSpec& spec) {
  const RecipeSpec& r = spec.recipe;
  QuantizeOptions o;
  auto method = parse_weight_method(r.method);
  if (!method.is_ok()) return method.status().with_context("recipe.method");
  o.method = *method;
  o.spec.bits = r.w_bits;
  o.spec.group_size = r.group_size;
  o.spec.sym = r.sym;
  o.spec.mse_clip = r.mse_clip;
  if (r.w_bits != 2 && r.w_bits != 3 && r.w_bits != 4 && r.w_bits != 8)
    return invalid_input("recipe.w_bits: must be one of 2, 3, 4, 8 (got " +
                         std::to_string(r.w_bits) + ")");
  if (r.group_size != -1 && r.group_size <= 0)
    return invalid_input("recipe.group_size: must be -1 (per channel) or positive (got " +
                         std::to_string(r.group_size) + ")");
  QCAL_RETURN_IF_ERROR(o.spec.validate().with_context("recipe"));
  if (!(r.damp > 0))
    return invalid_input("recipe.damp: must be positive (got " + std::to_string(r.damp) + ")");
  o.gptq.percdamp = r.damp;
  o.gptq.act_order = r.act_order;
  o.gptq.static_groups = r.static_groups;
  o.true_sequential = r.true_sequential;
  if (r.overlap != 0)
    return invalid_input("recipe.overlap: overlapping windows are not supported yet (got " +
                         std::to_string(r.overlap) + ")");
  if (r.mode != "sequential" && r.mode != "parallel")
    return invalid_input("recipe.mode: must be sequential or parallel (got '" + r.mode + "')");
  if (r.window <= 0)
    return invalid_input("recipe.window: must be positive (got " + std::to_string(r.window) + ")");
  auto format = parse_checkpoint_format(spec.output.format);
  if (!format.is_ok()) return format.status().with_context("output.format");
  o.write.format = *format;
  o.write.overwrite = spec.output.overwrite;
  return o;
}

namespace {

// "w_bits: ..." → "recipe.w_bits: ..." (the engine names fields without the
// spec's section; a message already naming "recipe" keeps its form).
Status in_recipe(const Status& s) {
  if (s.is_ok()) return s;
  const std::string& m = s.message();
  if (m.rfind("recipe", 0) == 0) return s;
  return Status(s.code(), "recipe." + m);
}

}  // namespace

Result<calib::CalibRecipe> calib_recipe_from_spec(const JobSpec& spec, const ModelConfig* config) {
  if (!spec.recipe.calib)
    return invalid_input("recipe: not a calibration recipe (method " + spec.recipe.method + ")");
  auto r = calib::recipe_from_json(*spec.recipe.calib);
  if (!r.is_ok()) return in_recipe(r.status());
  QCAL_RETURN_IF_ERROR(in_recipe(r->validate()));
  if (config) QCAL_RETURN_IF_ERROR(in_recipe(r->validate_for(*config)));
  return r;
}

Result<std::string> calib_output_format(const JobSpec& spec, const calib::CalibRecipe& r) {
  const bool reconstruct = r.reconstruction != calib::Reconstruction::kNone;
  const std::string& f = spec.output.format;
  if (f == "auto") return std::string(r.folds_completely() && !reconstruct ? "gptq" : "native");
  if (f == "native") return f;
  if (f != "gptq" && f != "compressed-tensors")
    return invalid_input("output.format: must be auto, native, gptq or compressed-tensors (got '" +
                         f + "')");
  if (reconstruct)
    return invalid_input("output.format: " + f +
                         ": a reconstruction recipe writes the native format (use native or auto)");
  if (!r.folds_completely())
    return invalid_input("output.format: " + f + ": " +
                         (r.transforms_fold() && r.intactkv
                              ? std::string("the IntactKV prefix cache needs the native format")
                              : std::string("this recipe leaves transforms or activation/KV "
                                            "quantizers to run online")) +
                         " (use native or auto)");
  return f;
}

}  // namespace qcal

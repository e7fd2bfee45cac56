#include "common/method_registry.h"

#include <cmath>
#include <sstream>

#include "common/memory_model.h"

namespace qcal {

namespace {

using nlohmann::json;

// An option's common fields; the typed makers below add the default and range.
OptionSpec opt(std::string key, std::string flag, OptType type, std::string help) {
  OptionSpec o;
  o.key = std::move(key);
  o.flag = std::move(flag);
  o.type = type;
  o.help = std::move(help);
  return o;
}
OptionSpec opt_bool(std::string key, std::string flag, bool def, std::string help,
                    std::string neg_flag = "") {
  OptionSpec o = opt(std::move(key), std::move(flag), OptType::kBool, std::move(help));
  o.def = def;
  o.neg_flag = std::move(neg_flag);
  return o;
}
OptionSpec opt_int(std::string key, std::string flag, int64_t def, double lo, double hi,
                   std::string help) {
  OptionSpec o = opt(std::move(key), std::move(flag), OptType::kInt, std::move(help));
  o.def = def;
  o.min = lo;
  o.max = hi;
  return o;
}
OptionSpec opt_num(std::string key, std::string flag, double def, double lo, double hi,
                   std::string help) {
  OptionSpec o = opt(std::move(key), std::move(flag), OptType::kNum, std::move(help));
  o.def = def;
  o.min = lo;
  o.max = hi;
  return o;
}
OptionSpec opt_str(std::string key, std::string flag, std::string def,
                   std::vector<std::string> choices, std::string help) {
  OptionSpec o = opt(std::move(key), std::move(flag), OptType::kString, std::move(help));
  o.def = std::move(def);
  o.choices = std::move(choices);
  return o;
}

MethodRow row(std::string name, MethodKind kind, std::string summary,
              std::vector<OptionSpec> options = {}) {
  MethodRow r;
  r.name = std::move(name);
  r.kind = kind;
  r.summary = std::move(summary);
  r.options = std::move(options);
  return r;
}

std::vector<MethodRow> build() {
  std::vector<MethodRow> rows;
  const std::vector<std::string> transforms = {"none", "smoothquant", "quarot", "spinquant",
                                               "flatquant"};
  const std::vector<std::string> solvers = {"rtn", "gptq", "lora-rounding"};
  const std::vector<std::string> recons = {"none", "block", "cbq"};

  // ---- core: every recipe.
  {
    MethodRow r = row(
        "core", MethodKind::kCore, "quantizer widths, data batching and the pipeline's mode",
        {opt_str("transform", "transform", "none", transforms,
                 "the transform (or give it as --method)"),
         opt_str("weight_solver", "weight-solver", "rtn", solvers,
                 "rounds the final weights (lora-rounding needs a reconstruction; gptq with a "
                 "reconstruction: LoRA-Rounding started from GPTQ's solution)"),
         opt_str("reconstruction", "reconstruction", "none", recons,
                 "block reconstruction after the transform (block = CBQ windows of 1)"),
         opt_int("w_bits", "w-bits", 4, 2, 16, "weight bits: 2, 3, 4, 8, or 16 (unquantized)"),
         opt_int("w_group", "group-size", -1, -1, 65536,
                 "input columns per weight scale; -1 = one per output channel"),
         opt_bool("w_sym", "sym", true,
                  "symmetric weight grid (--asym: asymmetric, rtn/gptq into GPTQ and "
                  "compressed-tensors formats only)",
                  "asym"),
         opt_bool("w_mse_clip", "mse-clip", false, "MSE search of each weight row/group's range"),
         opt_str("w_grid", "w-grid", "auto", {"auto", "full", "narrow"},
                 "symmetric weight grid: full = scale 2·absmax/(2^b−1), all 2^b codes "
                 "(AutoGPTQ, GPTQModel, llm-compressor); narrow = absmax/(2^(b−1)−1) "
                 "(QuaRot/FlatQuant, what the fake quantizers train on); auto = full for "
                 "weight-only rtn/gptq without a transform (or with flatquant's flat_fold), "
                 "narrow otherwise"),
         opt_int("a_bits", "a-bits", 16, 2, 16,
                 "activation bits (inputs of every linear but lm_head): 2, 3, 4, 6, 8 or 16"),
         opt_num("a_clip", "a-clip", 1.0, 1e-6, 1.0, "fixed activation clip ratio"),
         opt_int("kv_bits", "kv-bits", 16, 2, 16, "K/V cache bits: 2, 3, 4, 6, 8 or 16"),
         opt_num("kv_clip", "kv-clip", 1.0, 1e-6, 1.0, "fixed K/V clip ratio"),
         opt_bool("embed_mean_sub", "embed-mean-sub", false,
                  "subtract each embedding row's mean (QuaRot/SpinQuant quirk)"),
         opt_int("cali_bsz", "cali-bsz", 4, 1, 4096,
                 "calibration sequences per training step (FlatQuant, CBQ)"),
         opt_int("batch", "batch", 8, 1, 4096,
                 "sequences per forward micro-batch: memory only, never results"),
         opt_str("mode", "mode", "sequential", {"sequential", "parallel"},
                 "sequential: each block calibrates on the quantized outputs of the blocks "
                 "before it; parallel: every block on FP inputs, all at once"),
         opt_int("blocks_per_task", "blocks-per-task", 1, 1, 4096,
                 "blocks per quantize task (scheduling only)"),
         opt_int("seed", "seed", 0, 0, 9007199254740992.0, "seed of every random choice")});
    r.memory = memory_terms_core;
    rows.push_back(std::move(r));
  }

  // ---- transforms.
  rows.push_back(row("none", MethodKind::kTransform, "no transform"));
  {
    MethodRow r = row("smoothquant", MethodKind::kTransform,
                      "per-channel smoothing of activation outliers into the weights (§1)",
                      {opt_num("sq_alpha", "alpha", 0.5, 0.0, 1.0, "migration strength")});
    r.needs.fp_inputs = true;
    r.needs.act_stats = true;
    rows.push_back(std::move(r));
  }
  {
    MethodRow r =
        row("quarot", MethodKind::kTransform, "random Hadamard rotations, online Hadamards (§3)");
    r.rotates_residual = true;
    r.memory = memory_terms_rotation;
    rows.push_back(std::move(r));
  }
  {
    MethodRow r =
        row("spinquant", MethodKind::kTransform,
            "rotations R1/R2 learned through the fake-quantized model by Cayley SGD (§4); "
            "whole model in one process",
            {opt_int("spin_steps", "spin-steps", 100, 0, 100000, "Cayley SGD steps"),
             opt_num("spin_lr", "spin-lr", 1.5, 1e-9, 100.0, "peak learning rate"),
             opt_int("spin_bsz", "spin-bsz", 4, 1, 4096, "sequences per step"),
             opt_int("spin_holdout", "spin-holdout", 8, 0, 4096,
                     "calibration sequences held out to score the rotations: the best of those "
                     "significantly better than the initial (QuaRot) ones is kept, else the "
                     "initial (0: keep the last)")});
    r.rotates_residual = true;
    r.whole_model = true;
    r.memory = memory_terms_spinquant;
    rows.push_back(std::move(r));
  }
  {
    MethodRow r = row(
        "flatquant", MethodKind::kTransform,
        "learned Kronecker affine transforms, diagonals and clipping per block on FP inputs (§5)",
        {opt_int("epochs", "epochs", 15, 0, 1000, "passes over the calibration set per block"),
         opt_num("flat_lr", "flat-lr", 5e-3, 1e-9, 10.0, "learning rate of the transforms"),
         opt_bool("lwc", "", true, "learnable weight clipping", "no-lwc"),
         opt_bool("lac", "", true, "learnable activation clipping", "no-lac"),
         opt_bool("add_diag", "", true, "per-channel diagonal scaling", "no-diag"),
         opt_num("diag_alpha", "diag-alpha", 0.3, 0.0, 1.0, "initial diagonal's strength"),
         opt_bool("flat_fold", "flat-fold", false,
                  "weight-only: learn only what folds into the weights (the diagonals, V's "
                  "per-head transform, LWC), so the result is written as GPTQ / "
                  "compressed-tensors with nothing online (with weight_solver gptq, LWC shapes the "
                  "training but GPTQ picks the weights' ranges)")});
    r.needs.fp_inputs = true;
    r.needs.act_stats = true;
    r.block_task = true;
    r.memory = memory_terms_flatquant;
    rows.push_back(std::move(r));
  }

  // ---- weight solvers.
  rows.push_back(row("rtn", MethodKind::kWeightSolver, "round to nearest"));
  {
    MethodRow r = row(
        "gptq", MethodKind::kWeightSolver,
        "GPTQ: Hessian-aware rounding on the block's (transformed, act-quantized) inputs (§2)",
        {opt_num("gptq.percdamp", "damp", 0.01, 0.0, 1.0, "damping, a fraction of mean diag(H)"),
         opt_int("gptq.blocksize", "blocksize", 128, 1, 65536, "columns per lazy-update block"),
         opt_bool("gptq.act_order", "act-order", true,
                  "quantize columns by decreasing diag(H) (default: on for weight-only recipes, "
                  "as llm-compressor's actorder \"static\"; off when activations or the KV "
                  "cache are quantized)",
                  "no-act-order"),
         opt_bool("gptq.static_groups", "static-groups", true,
                  "group parameters fixed on the original columns before the walk (default: as "
                  "act-order; with act-order the output keeps the plain group order)",
                  "no-static-groups"),
         opt_bool("gptq.true_sequential", "", true,
                  "q/k/v → o → gate/up → down, each on the quantized outputs before it",
                  "no-true-sequential")});
    r.independent_blocks = false;
    r.memory = memory_terms_gptq;
    rows.push_back(std::move(r));
  }
  {
    MethodRow r = row("lora-rounding", MethodKind::kWeightSolver,
                      "LoRA-Rounding: learned low-rank rounding inside the reconstruction (§7.2)",
                      {opt_int("lora_rank", "lora-rank", 16, 0, 65536, "rank of the rounding")});
    rows.push_back(std::move(r));
  }

  // ---- reconstructions.
  rows.push_back(row("none", MethodKind::kReconstruction, "no block reconstruction"));
  {
    MethodRow r = row("block", MethodKind::kReconstruction,
                      "per-block reconstruction: CBQ's trainer with windows of one block");
    r.needs.fp_inputs = true;
    r.needs.act_stats = true;
    r.independent_blocks = false;
    r.memory = memory_terms_cbq;
    rows.push_back(std::move(r));
  }
  {
    MethodRow r = row(
        "cbq", MethodKind::kReconstruction,
        "CBQ: cross-block reconstruction of overlapping windows, CFP, learned step sizes (§7)",
        {opt_int("cbq_window", "cbq-window", 2, 1, 4096, "blocks trained jointly"),
         opt_int("cbq_overlap", "cbq-overlap", 1, 0, 4095, "blocks shared with the next window"),
         opt_int("cbq_epochs", "cbq-epochs", 20, 1, 1000000, "passes per window"),
         opt_num("cbq_logit_loss", "cbq-logit-loss", 0.0, 0.0, 1e6,
                 "weight of the next-token KL in the last window's loss (0: off)"),
         opt_int("cbq_holdout", "cbq-holdout", 0, 0, 1000000,
                 "calibration sequences held out of each window's training to pick its "
                 "best epoch (0: off)"),
         opt_bool("cfp", "", true, "coarse-to-fine preprocessing (§7.3)", "no-cfp")});
    r.needs.fp_inputs = true;
    r.needs.act_stats = true;
    r.independent_blocks = false;
    r.memory = memory_terms_cbq;
    rows.push_back(std::move(r));
  }

  // ---- add-ons.
  {
    MethodRow r = row(
        "intactkv", MethodKind::kAddon,
        "IntactKV: the FP K/V cache of a pivot prefix, kept unquantized (§6); +Cal trains it",
        {opt_bool("intactkv", "intactkv", false, "keep the FP K/V cache of the prefix"),
         OptionSpec{"intactkv_prefix",
                    "intactkv-prefix",
                    OptType::kIds,
                    json::array(),
                    0,
                    2147483647.0,
                    {},
                    "prefix token ids (default [bos_token_id])",
                    ""},
         opt_bool("intactkv_cal", "intactkv-cal", false,
                  "train the cache against the FP layer outputs (+Cal, whole model)"),
         opt_int("intactkv_cal_steps", "intactkv-cal-steps", 160, 1, 100000000, "+Cal steps"),
         opt_num("intactkv_cal_lr", "intactkv-cal-lr", 2e-4, 1e-12, 1.0, "+Cal learning rate")});
    r.memory = memory_terms_intactkv;
    rows.push_back(std::move(r));
  }
  return rows;
}

std::string yaml_scalar(const json& v) {
  if (v.is_string()) return "\"" + v.get<std::string>() + "\"";
  return v.dump();
}

std::string yaml_number(double x) {
  std::ostringstream s;
  s.precision(15);
  s << x;
  return s.str();
}

std::string yaml_text(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

}  // namespace

const char* method_kind_name(MethodKind k) {
  switch (k) {
    case MethodKind::kCore: return "core";
    case MethodKind::kTransform: return "transform";
    case MethodKind::kWeightSolver: return "weight_solver";
    case MethodKind::kReconstruction: return "reconstruction";
    case MethodKind::kAddon: return "addon";
  }
  return "core";
}

const std::vector<MethodRow>& method_registry() {
  static const std::vector<MethodRow> kRows = build();
  return kRows;
}

const MethodRow* find_method_row(const std::string& name, MethodKind kind) {
  for (const MethodRow& r : method_registry())
    if (r.kind == kind && r.name == name) return &r;
  return nullptr;
}

const MethodRow* row_of_option(const std::string& key) {
  for (const MethodRow& r : method_registry())
    for (const OptionSpec& o : r.options)
      if (o.key == key) return &r;
  return nullptr;
}

const OptionSpec* find_option(const std::string& key) {
  for (const MethodRow& r : method_registry())
    for (const OptionSpec& o : r.options)
      if (o.key == key) return &o;
  return nullptr;
}

std::vector<std::string> method_names(MethodKind kind) {
  std::vector<std::string> out;
  for (const MethodRow& r : method_registry())
    if (r.kind == kind) out.push_back(r.name);
  return out;
}

std::string recipe_openapi_yaml() {
  // Nested objects for dotted keys ("gptq.percdamp" → gptq: {percdamp}).
  std::ostringstream y;
  y << "    Recipe:\n"
       "      description: >-\n"
       "        The one quantization recipe (common/recipe.h), generated from the method\n"
       "        registry by `qcal registry --openapi`. Unknown keys are refused. `method` is\n"
       "        an alias of transform (smoothquant, quarot, spinquant, flatquant) or\n"
       "        weight_solver (rtn, gptq, lora-rounding). The earlier weight-only form\n"
       "        (method, w_bits, group_size, sym, act_order, static_groups, damp, mse_clip,\n"
       "        true_sequential, mode, window, overlap, seed) is still accepted.\n"
       "      type: object\n"
       "      additionalProperties: false\n"
       "      properties:\n"
       "        method:\n"
       "          type: string\n"
       "          description: \"alias: a transform or weight_solver name\"\n";
  std::string open_group;
  for (const MethodRow& r : method_registry()) {
    for (const OptionSpec& o : r.options) {
      std::string name = o.key;
      std::string ind = "        ";
      const size_t dot = o.key.find('.');
      if (dot != std::string::npos) {
        const std::string group = o.key.substr(0, dot);
        name = o.key.substr(dot + 1);
        if (group != open_group) {
          y << "        " << group << ":\n"
            << "          type: object\n"
            << "          additionalProperties: false\n"
            << "          description: " << yaml_text(r.name + " options") << "\n"
            << "          properties:\n";
          open_group = group;
        }
        ind = "            ";
      } else {
        open_group.clear();
      }
      y << ind << name << ":\n";
      switch (o.type) {
        case OptType::kBool: y << ind << "  type: boolean\n"; break;
        case OptType::kInt:
          y << ind << "  type: integer\n"
            << ind << "  minimum: " << yaml_number(o.min) << "\n"
            << ind << "  maximum: " << yaml_number(o.max) << "\n";
          break;
        case OptType::kNum:
          y << ind << "  type: number\n"
            << ind << "  minimum: " << yaml_number(o.min) << "\n"
            << ind << "  maximum: " << yaml_number(o.max) << "\n";
          break;
        case OptType::kString:
          y << ind << "  type: string\n";
          if (!o.choices.empty()) {
            y << ind << "  enum: [";
            for (size_t i = 0; i < o.choices.size(); ++i)
              y << (i ? ", " : "") << yaml_text(o.choices[i]);
            y << "]\n";
          }
          break;
        case OptType::kIds:
          y << ind << "  type: array\n"
            << ind << "  items: {type: integer, minimum: 0, maximum: " << yaml_number(o.max)
            << "}\n";
          break;
      }
      y << ind << "  default: " << yaml_scalar(o.def) << "\n";
      y << ind << "  description: "
        << yaml_text("[" + r.name + "] " + o.help + (o.flag.empty() ? "" : " (--" + o.flag + ")"))
        << "\n";
    }
  }
  return y.str();
}

}  // namespace qcal

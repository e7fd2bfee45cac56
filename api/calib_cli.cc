#include "api/calib_cli.h"

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace qcal {

namespace {

std::string fmt(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

}  // namespace

const std::vector<FlagSpec>& recipe_flags() {
  static const std::vector<FlagSpec> kRows = [] {
    const calib::CalibRecipe r;
    const GptqOptions g;
    const std::string recipe = kRecipeGroup, engine = "Calibration engine", flat = "FlatQuant",
                      spin = "SpinQuant", ikv = "IntactKV (methods.md §6)",
                      recon = "Reconstruction (CBQ, methods.md §7)";
    auto n = [](int64_t v) { return std::to_string(v); };
    return std::vector<FlagSpec>{
        {"method", "NAME", "gptq",
         "rtn or gptq: weight-only quantization. smoothquant, quarot, spinquant or flatquant: that "
         "transform, then --weight-solver, on the calibration engine. lora-rounding: CBQ's "
         "learned rounding (needs --reconstruction block|cbq).",
         recipe},
        {"w-bits", "N", n(r.w_bits), "weight bits", recipe},
        {"group-size", "N", "128 weight-only, -1 calibration engine",
         "weights per quantization group; -1 = per output channel", recipe},
        {"sym", "", "", "symmetric weight grid (the default)", recipe},
        {"asym", "", "", "asymmetric weight grid (weight-only rtn/gptq only)", recipe},
        {"act-order", "", "", "GPTQ: quantize columns in order of decreasing Hessian diagonal",
         recipe},
        {"static-groups", "", "",
         "GPTQ with --act-order: compute the group parameters before reordering", recipe},
        {"damp", "X", fmt(g.percdamp), "GPTQ dampening, a fraction of the Hessian's mean diagonal",
         recipe},
        {"mse-clip", "", "",
         "search each weight group's clipping range for the least squared error", recipe},
        {"no-true-sequential", "", "",
         "weight-only: quantize all of a block's projections from one capture of their inputs, "
         "not {q,k,v} → {o} → {gate,up} → {down}",
         recipe},
        {"blocksize", "N", n(g.blocksize), "GPTQ: columns per lazy-update block", recipe},
        {"batch", "N", n(r.batch), "sequences per forward batch (memory only)", recipe},

        {"weight-solver", "NAME", "rtn after a transform",
         "rtn, gptq or lora-rounding: the solver of the weights, after the transform of --method "
         "or, alone, on the untransformed model",
         engine},
        {"a-bits", "N", n(r.a_bits),
         "activation bits (inputs of every linear but lm_head, per token); 16 = unquantized",
         engine},
        {"kv-bits", "N", n(r.kv_bits),
         "K/V cache bits (asymmetric per token and head); 16 = unquantized", engine},
        {"a-clip", "X", fmt(r.a_clip), "activation clipping ratio", engine},
        {"kv-clip", "X", fmt(r.kv_clip), "K/V cache clipping ratio", engine},
        {"seed", "N", n(static_cast<int64_t>(r.seed)),
         "seed of the recipe's random parts (rotations, training batches)", engine},
        {"embed-mean-sub", "", "",
         "QuaRot/SpinQuant: subtract the embedding rows' mean (changes an RMSNorm model's "
         "function)",
         engine},
        {"alpha", "X", fmt(r.sq_alpha), "SmoothQuant's migration strength", engine},

        {"epochs", "N", n(r.epochs), "training epochs per block", flat},
        {"flat-lr", "X", fmt(r.flat_lr), "learning rate", flat},
        {"cali-bsz", "N", n(r.cali_bsz),
         "sequences per training step (also the reconstruction's minibatch)", flat},
        {"diag-alpha", "X", fmt(r.diag_alpha),
         "strength of the per-channel scaling's SmoothQuant-style initialization", flat},
        {"no-lwc", "", "", "no learnable weight clipping", flat},
        {"no-lac", "", "", "no learnable activation clipping", flat},
        {"no-diag", "", "", "no per-channel scaling", flat},

        {"spin-steps", "N", n(r.spin_steps), "Cayley SGD steps", spin},
        {"spin-lr", "X", fmt(r.spin_lr), "peak learning rate", spin},
        {"spin-bsz", "N", n(r.spin_bsz), "sequences per step", spin},

        {"intactkv", "", "",
         "keep the pivot tokens' FP K/V cache (native format; evaluated sequences must begin "
         "with the prefix)",
         ikv},
        {"intactkv-prefix", "IDS", "the BOS id",
         "the pivot token ids, e.g. 1,5,9 (needs --intactkv)", ikv},
        {"intactkv-cal", "", "",
         "then train that cache against the FP model's layer outputs (§6.4; needs --intactkv)",
         ikv},
        {"intactkv-cal-steps", "N", n(r.intactkv_cal_steps),
         "training steps (needs --intactkv-cal)", ikv},
        {"intactkv-cal-lr", "X", fmt(r.intactkv_cal_lr),
         "AdamW learning rate (needs --intactkv-cal)", ikv},

        {"reconstruction", "NAME", calib::reconstruction_str(r.reconstruction),
         "none, block (each block alone) or cbq (windows of blocks); without --method or "
         "--weight-solver, block|cbq means lora-rounding",
         recon},
        {"cbq-window", "N", n(r.cbq_window), "blocks per window", recon},
        {"cbq-overlap", "N", n(r.cbq_overlap), "blocks shared by consecutive windows", recon},
        {"cbq-parallel", "", "", "calibrate every window on FP inputs, independently", recon},
        {"cbq-epochs", "N", n(r.cbq_epochs), "training epochs per window", recon},
        {"lora-rank", "N", n(r.lora_rank), "rank of the learned LoRA rounding", recon},
        {"no-cfp", "", "", "skip coarse-to-fine preprocessing (§7.3)", recon},
    };
  }();
  return kRows;
}

const std::set<std::string>& calib_valued_flags() {
  static const std::set<std::string> k = [] {
    std::set<std::string> s;
    for (const FlagSpec& f : recipe_flags())
      if (f.group != kRecipeGroup && !f.boolean()) s.insert(f.name);
    return s;
  }();
  return k;
}

const std::set<std::string>& calib_bool_flags() {
  static const std::set<std::string> k = [] {
    std::set<std::string> s;
    for (const FlagSpec& f : recipe_flags())
      if (f.group != kRecipeGroup && f.boolean()) s.insert(f.name);
    return s;
  }();
  return k;
}

namespace {

// "1,5,9" → {1, 5, 9}: non-negative decimal ids separated by commas.
Result<std::vector<int32_t>> parse_ids(const std::string& flag, const std::string& s) {
  std::vector<int32_t> ids;
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
    ids.push_back(static_cast<int32_t>(v));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  return ids;
}

}  // namespace

bool wants_calibration(const Flags& f) {
  const std::string m = f.str("method", "gptq");
  if (m != "rtn" && m != "gptq") return true;
  if (f.str("format") == "native") return true;
  if (f.flag("intactkv") || f.has("intactkv-prefix") || f.flag("intactkv-cal")) return true;
  if (f.has("intactkv-cal-steps") || f.has("intactkv-cal-lr")) return true;
  if (f.has("reconstruction") || f.has("weight-solver")) return true;
  for (const char* k : {"cbq-window", "cbq-overlap", "cbq-epochs", "lora-rank"})
    if (f.has(k)) return true;
  if (f.flag("cbq-parallel") || f.flag("no-cfp")) return true;
  for (const char* k : {"a-bits", "kv-bits"})
    if (f.has(k) && f.str(k) != "16") return true;
  return false;
}

Result<calib::CalibRecipe> recipe_from_flags(const Flags& f) {
  calib::CalibRecipe r;
  // --method names the transform, or (rtn, gptq, lora-rounding) the weight solver of
  // an untransformed model; without --method, --weight-solver alone does the latter.
  // With a reconstruction and neither flag, the solver is lora-rounding (CBQ's).
  const bool recon = f.has("reconstruction") && f.str("reconstruction") != "none";
  const std::string m =
      f.str("method", f.has("weight-solver") ? "" : (recon ? "lora-rounding" : "gptq"));
  std::string solver = f.str("weight-solver", "");
  if (m.empty() || m == "rtn" || m == "gptq" || m == "lora-rounding") {
    if (!m.empty() && !solver.empty() && solver != m)
      return invalid_input("--weight-solver " + solver + " contradicts --method " + m);
    r.transform = calib::Transform::kNone;
    if (solver.empty()) solver = m;
  } else {
    QCAL_ASSIGN_OR_RETURN(r.transform, calib::parse_transform(m));
    if (solver.empty()) solver = "rtn";
  }
  {
    auto ws = calib::parse_weight_solver(solver);
    if (!ws.is_ok())
      return invalid_input("--weight-solver must be rtn, gptq or lora-rounding (got '" + solver +
                           "')");
    r.weight_solver = ws.value();
  }
  if (f.has("reconstruction")) {
    auto rc = calib::parse_reconstruction(f.str("reconstruction"));
    if (!rc.is_ok())
      return invalid_input("--reconstruction must be none, block or cbq (got '" +
                           f.str("reconstruction") + "')");
    r.reconstruction = rc.value();
  }
  QCAL_ASSIGN_OR_RETURN(r.cbq_window, f.integer("cbq-window", r.cbq_window));
  QCAL_ASSIGN_OR_RETURN(r.cbq_overlap, f.integer("cbq-overlap", r.cbq_overlap));
  QCAL_ASSIGN_OR_RETURN(r.cbq_epochs, f.integer("cbq-epochs", r.cbq_epochs));
  QCAL_ASSIGN_OR_RETURN(r.lora_rank, f.integer("lora-rank", r.lora_rank));
  r.cbq_parallel = f.flag("cbq-parallel");
  r.cfp = !f.flag("no-cfp");
  QCAL_ASSIGN_OR_RETURN(int64_t wb, f.integer("w-bits", 4));
  QCAL_ASSIGN_OR_RETURN(int64_t ab, f.integer("a-bits", 16));
  QCAL_ASSIGN_OR_RETURN(int64_t kb, f.integer("kv-bits", 16));
  r.w_bits = static_cast<int>(wb);
  r.a_bits = static_cast<int>(ab);
  r.kv_bits = static_cast<int>(kb);
  // The calibration engine's weights are per output channel unless asked otherwise
  // (the references' W4A4 setting); the weight-only path keeps its 128 default.
  QCAL_ASSIGN_OR_RETURN(r.w_group, f.integer("group-size", -1));
  if (f.flag("asym"))
    return invalid_input("--asym: the calibration engine quantizes weights symmetrically");
  r.w_mse_clip = f.flag("mse-clip");
  QCAL_ASSIGN_OR_RETURN(r.a_clip, f.number("a-clip", r.a_clip));
  QCAL_ASSIGN_OR_RETURN(r.kv_clip, f.number("kv-clip", r.kv_clip));
  QCAL_ASSIGN_OR_RETURN(r.sq_alpha, f.number("alpha", r.sq_alpha));
  QCAL_ASSIGN_OR_RETURN(r.epochs, f.integer("epochs", r.epochs));
  QCAL_ASSIGN_OR_RETURN(r.flat_lr, f.number("flat-lr", r.flat_lr));
  QCAL_ASSIGN_OR_RETURN(r.cali_bsz, f.integer("cali-bsz", r.cali_bsz));
  QCAL_ASSIGN_OR_RETURN(r.diag_alpha, f.number("diag-alpha", r.diag_alpha));
  QCAL_ASSIGN_OR_RETURN(r.spin_steps, f.integer("spin-steps", r.spin_steps));
  QCAL_ASSIGN_OR_RETURN(r.spin_lr, f.number("spin-lr", r.spin_lr));
  QCAL_ASSIGN_OR_RETURN(r.spin_bsz, f.integer("spin-bsz", r.spin_bsz));
  QCAL_ASSIGN_OR_RETURN(int64_t seed, f.integer("seed", 0));
  r.seed = static_cast<uint64_t>(seed);
  r.lwc = !f.flag("no-lwc");
  r.lac = !f.flag("no-lac");
  r.add_diag = !f.flag("no-diag");
  r.embed_mean_sub = f.flag("embed-mean-sub");
  r.intactkv = f.flag("intactkv");
  if (f.has("intactkv-prefix")) {
    if (!r.intactkv) return invalid_input("--intactkv-prefix needs --intactkv");
    QCAL_ASSIGN_OR_RETURN(r.intactkv_prefix,
                          parse_ids("intactkv-prefix", f.str("intactkv-prefix")));
  }
  r.intactkv_cal = f.flag("intactkv-cal");
  if (r.intactkv_cal && !r.intactkv) return invalid_input("--intactkv-cal needs --intactkv");
  for (const char* k : {"intactkv-cal-steps", "intactkv-cal-lr"})
    if (f.has(k) && !r.intactkv_cal)
      return invalid_input(std::string("--") + k + " needs --intactkv-cal");
  QCAL_ASSIGN_OR_RETURN(r.intactkv_cal_steps,
                        f.integer("intactkv-cal-steps", r.intactkv_cal_steps));
  QCAL_ASSIGN_OR_RETURN(r.intactkv_cal_lr, f.number("intactkv-cal-lr", r.intactkv_cal_lr));
  QCAL_ASSIGN_OR_RETURN(r.gptq.percdamp, f.number("damp", 0.01));
  QCAL_ASSIGN_OR_RETURN(r.gptq.blocksize, f.integer("blocksize", 128));
  r.gptq.act_order = f.flag("act-order");
  r.gptq.static_groups = f.flag("static-groups");
  QCAL_ASSIGN_OR_RETURN(r.batch, f.integer("batch", 8));
  QCAL_RETURN_IF_ERROR(r.validate());
  return r;
}

}  // namespace qcal

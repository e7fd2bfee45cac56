#include "common/planner.h"

#include "common/memory_guard.h"

#include <unistd.h>

#include <filesystem>
#include <system_error>

#include "common/format_rules.h"
#include "common/model_dir.h"

namespace qcal {

namespace fs = std::filesystem;

namespace {

using u64 = uint64_t;

u64 u(int64_t v) { return v > 0 ? static_cast<u64>(v) : 0; }

// Checks a token file and returns its size in bytes.
Result<u64> check_data_file(const std::string& field, const std::string& path) {
  std::error_code ec;
  auto st = fs::status(path, ec);
  if (ec || !fs::exists(st)) return not_found(field + ": " + path + " does not exist");
  if (!fs::is_regular_file(st)) return invalid_input(field + ": " + path + " is not a file");
  const std::string ext = fs::path(path).extension().string();
  if (ext != ".jsonl" && ext != ".u32")
    return invalid_input(field + ": " + path + " must be a .jsonl or .u32 token file (got '" + ext +
                         "')");
  if (::access(path.c_str(), R_OK) != 0)
    return invalid_input(field + ": " + path + " is not readable");
  auto size = fs::file_size(path, ec);
  if (ec) return io_error(field + ": " + path + ": " + ec.message());
  return static_cast<u64>(size);
}

// Sequences the workers will hold: nsamples, or an upper bound from the file when
// nsamples is 0 ("all"); never more than the file can hold.
u64 sequences_bound(const DataSpec& d, u64 file_bytes) {
  const u64 T = std::max<u64>(1, u(d.seqlen));
  const bool u32 = fs::path(d.path).extension() == ".u32";
  const u64 in_file = std::max<u64>(1, file_bytes / (u32 ? 4 : 2) / T);
  if (d.nsamples > 0) return std::min(u(d.nsamples), in_file);
  return in_file;
}

Status check_output(const OutputSpec& out, const std::string& model_dir) {
  std::error_code ec;
  const fs::path p = fs::absolute(out.path, ec);
  if (ec) return invalid_input("output.path: " + out.path + ": " + ec.message());
  if (fs::weakly_canonical(p, ec) == fs::weakly_canonical(fs::absolute(model_dir), ec))
    return invalid_input("output.path: " + out.path + " is the model directory");
  auto st = fs::symlink_status(p, ec);
  if (fs::exists(st)) {
    if (!out.overwrite)
      return invalid_input("output.path: " + out.path +
                           ": output exists (set output.overwrite, or pass --overwrite, to "
                           "replace it)");
    if (!fs::is_directory(fs::status(p, ec)))
      return invalid_input("output.path: " + out.path + " exists and is not a directory");
  }
  // The nearest existing ancestor must be a directory we may create entries in.
  fs::path a = p.parent_path();
  while (!a.empty() && !fs::exists(a, ec)) {
    if (a == a.parent_path()) break;
    a = a.parent_path();
  }
  if (a.empty() || !fs::is_directory(a, ec))
    return invalid_input("output.path: " + out.path + ": " + a.string() + " is not a directory");
  if (::access(a.c_str(), W_OK | X_OK) != 0)
    return invalid_input("output.path: " + out.path + ": directory " + a.string() +
                         " is not writable");
  return Status::ok();
}

}  // namespace

Result<Plan> plan_job(const JobSpec& spec, const PlannerLimits& limits) {
  const Recipe& r = spec.recipe;
  QCAL_ASSIGN_OR_RETURN(std::string format, output_format(spec));
  if (spec.calib.seqlen < 2) return invalid_input("calib.seqlen: must be at least 2");

  auto dir_or = ModelDir::open(spec.model);
  if (!dir_or.is_ok()) return dir_or.status().with_context("model");
  const ModelDir& dir = **dir_or;
  if (dir.quantization_config())
    return invalid_input("model: " + spec.model +
                         " is already quantized (config.json has quantization_config); "
                         "submit the FP checkpoint");
  QCAL_RETURN_IF_ERROR(dir.validate_fp_model().with_context("model"));
  const ModelConfig& c = dir.config();
  {
    Status st = r.validate_for(c, /*allow_partial_groups=*/format == "native");
    if (!st.is_ok()) return Status(st.code(), "recipe." + st.message());
  }
  QCAL_RETURN_IF_ERROR(check_model_writable(c, r, format));

  PlanInputs in;
  in.recipe = &r;
  in.config = c;
  in.format = format;
  QCAL_ASSIGN_OR_RETURN(u64 calib_bytes, check_data_file("calib.path", spec.calib.path));
  in.calib_seqs = sequences_bound(spec.calib, calib_bytes);
  in.calib_T = u(spec.calib.seqlen);
  if (spec.eval) {
    QCAL_ASSIGN_OR_RETURN(u64 eval_bytes, check_data_file("eval.path", spec.eval->path));
    in.has_eval = true;
    in.eval_seqs = sequences_bound(*spec.eval, eval_bytes);
    in.eval_T = u(spec.eval->seqlen);
  }
  QCAL_RETURN_IF_ERROR(check_output(spec.output, spec.model));
  // No estimate below can wrap around (common/memory_guard.h).
  QCAL_RETURN_IF_ERROR(check_estimate_range(spec, c, in.calib_seqs, in.eval_seqs,
                                            std::max<int64_t>(limits.batch, r.batch())));
  in.worker_memory_bytes = limits.worker_memory_bytes;
  in.eval_batch = u(std::max<int64_t>(1, limits.batch));
  return build_pipeline_plan(in);
}

}  // namespace qcal

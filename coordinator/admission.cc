#include "coordinator/admission.h"

#include "common/data.h"
#include "common/fsutil.h"
#include "common/limits.h"
#include "common/model_config.h"
#include "common/path_policy.h"

namespace qcal {

namespace {

// A problem with a file the user named is a bad request, not a server error.
Status as_user_error(const Status& s) {
  if (s.code() == Code::kNotFound || s.code() == Code::kCorrupt) return invalid_input(s.message());
  return s;
}

Status check_data(const std::string& field, const DataSpec& d, int64_t vocab) {
  auto c = check_token_file(d.path, d.seqlen, vocab, d.nsamples, limits::kSubmitScanBytes);
  if (!c.is_ok()) return as_user_error(c.status()).with_context(field);
  return Status::ok();
}

}  // namespace

Result<Admission> admit_job(const JobSpec& parsed, const PlannerLimits& limits) {
  Admission a;
  if (limits.paths) {
    auto confined = limits.paths->confine(parsed);
    if (!confined.is_ok()) return as_user_error(confined.status());
    a.spec = std::move(confined).value();
  } else {
    a.spec = parsed;
  }
  auto plan = plan_job(a.spec, limits);
  if (!plan.is_ok()) return as_user_error(plan.status());
  a.plan = std::move(plan).value();
  auto config = load_model_config(join_path(a.spec.model, "config.json"));
  if (!config.is_ok()) return as_user_error(config.status()).with_context("model");
  QCAL_RETURN_IF_ERROR(check_data("calib.path", a.spec.calib, config->vocab_size));
  if (a.spec.eval) QCAL_RETURN_IF_ERROR(check_data("eval.path", *a.spec.eval, config->vocab_size));
  return a;
}

}  // namespace qcal

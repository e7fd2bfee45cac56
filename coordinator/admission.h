// Admission: the one path from a parsed job spec to a job the store may
// accept — used by POST /v1/jobs, by POST /v1/schedules (the template's first
// slot) and by every scheduled run (coordinator/schedules.cc), so all three
// refuse the same things the same way.
//
// In order (the first failure is returned):
//   1. confinement   PathPolicy::confine (common/path_policy.h) when the
//                    limits carry a policy: every path absolute, inside the
//                    allowed roots, inputs regular files, the output only a
//                    qcal output and only with overwrite. kPermissionDenied
//                    (403) names the field and nothing about files outside.
//                    The admitted spec holds the resolved paths: the job (and
//                    its output ownership key) names the real directories.
//   2. planning      plan_job (common/planner.h): recipe, model headers,
//                    shapes, formats, memory with checked arithmetic.
//   3. data files    check_token_file (common/data.h) on calib.path and
//                    eval.path with the model's vocabulary: a .u32 whose size
//                    is not a multiple of 4, malformed JSON at line N, ids out
//                    of range — reading at most limits::kSubmitScanBytes of each.
// Errors from reading the user's files are the user's: kNotFound and kCorrupt
// (a safetensors header of garbage, an index naming missing shards) become
// kInvalidInput (HTTP 400) naming the file; kIoError stays 500.
//
// Thread safety: a pure function of its arguments and the files it reads.
#pragma once

#include <string>

#include "common/job_spec.h"
#include "common/status.h"
#include "common/planner.h"

namespace qcal {

struct Admission {
  JobSpec spec;  // resolved paths: what create_job stores
  Plan plan;
};

Result<Admission> admit_job(const JobSpec& parsed, const PlannerLimits& limits);

}  // namespace qcal

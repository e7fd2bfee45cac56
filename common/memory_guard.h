// The range guard of the planner's memory estimates (issue #11).
//
// The planner (common/planner.cc) forms products of user-controlled
// numbers: sequences × tokens × widths × bytes, L × block parameters, widths
// squared. check_estimate_range computes, with overflow-checked arithmetic
// (common/checked_math.h), an upper bound of every term any plan uses (each
// multiplier at least the planner's) and refuses with the numbers when that
// bound does not fit in 62 bits:
//   "memory estimate out of range: calib.nsamples 1048576 x calib.seqlen
//    1048576 x hidden_size 4194304 x 4 bytes overflows 64 bits"
// Once it passes, no estimate in plan_job can wrap around (a wrapped estimate
// turned petabytes into megabytes and let a job through that then crashed
// every worker with std::bad_alloc).
//
// Thread safety: pure.
#pragma once

#include <cstdint>

#include "common/job_spec.h"
#include "common/model_config.h"
#include "common/status.h"

namespace qcal {

// `calib_seqs` / `eval_seqs`: the sequences the planner will assume
// (nsamples, or its bound from the file size for 0 = all); `batch`: the
// planner's batch. kResourceExhausted naming the numbers on overflow.
Status check_estimate_range(const JobSpec& spec, const ModelConfig& c, uint64_t calib_seqs,
                            uint64_t eval_seqs, int64_t batch);

}  // namespace qcal

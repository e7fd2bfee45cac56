// The caps on every numeric (and free-text) field of a job spec, in one table.
//
// Why: an accepted job must be one a worker can run. Without caps a spec with
// calib.nsamples near 2^62 overflowed the planner's memory estimate to a few
// megabytes and crashed three workers in turn (issue #11). Each cap is far
// above any real use and low enough that the planner's products of them stay
// well inside 64 bits (nsamples · seqlen · hidden · 16 < 2^64 for hidden up
// to 2^20). The parser (common/job_spec.cc) refuses a value outside its range
// with kInvalidInput naming the field and the range:
//   "calib.nsamples: must be in [1, 1048576] (got 4611686018427387904)".
//
// README.md ("Limits") and api/openapi.yaml (minimum / maximum / maxLength)
// list the same numbers; test_limits checks the table against the parser.
// The recipe's options (bits, group sizes, epochs, steps, ranks, windows, ...)
// carry their ranges in their method registry rows (common/method_registry.cc),
// checked by Recipe::set.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qcal::limits {

// ---- data sets (calib, eval)
inline constexpr int64_t kMaxSequences = int64_t{1} << 20;  // calib/eval.nsamples (eval 0 = all)
inline constexpr int64_t kMaxSeqlen = int64_t{1} << 20;     // calib/eval.seqlen (min 2)

// ---- validation gate (finite, >= 0)
inline constexpr double kMaxGateValue = 1e6;  // gate.max_ppl_increase, gate.max_kl

// ---- schedules (finite, >= 0)
inline constexpr double kMaxRegression = 1e6;  // thresholds.max_ppl_regression / max_kl_regression

// ---- labels
inline constexpr size_t kMaxLabels = 32;
inline constexpr size_t kMaxLabelKeyBytes = 63;     // [A-Za-z0-9._/-]
inline constexpr size_t kMaxLabelValueBytes = 256;  // UTF-8, no control characters

// ---- paths (model, calib.path, eval.path, output.path)
inline constexpr size_t kMaxPathBytes = 4096;  // PATH_MAX

// ---- a data file at submit: header checks read at most this much of a
// .jsonl / .u32 file (the rest is checked by the worker as it loads).
inline constexpr uint64_t kSubmitScanBytes = 64ull << 20;

}  // namespace qcal::limits

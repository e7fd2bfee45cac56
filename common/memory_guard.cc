#include "common/memory_guard.h"

#include <algorithm>
#include <string>
#include <vector>

#include "common/checked_math.h"

namespace qcal {

namespace {

uint64_t u(int64_t v) { return v > 0 ? static_cast<uint64_t>(v) : 0; }

// One named bound: the product and how it was formed, for the message.
struct Term {
  std::string what;
  CheckedU64 value;
};

}  // namespace

Status check_estimate_range(const JobSpec& spec, const ModelConfig& c, uint64_t calib_seqs,
                            uint64_t eval_seqs, int64_t batch) {
  const uint64_t H = u(c.hidden_size), I = u(c.intermediate_size), V = u(c.vocab_size);
  const uint64_t Q = u(c.q_dim()), K = u(c.kv_dim()), L = u(c.num_hidden_layers);
  const uint64_t T = u(spec.calib.seqlen), Te = spec.eval ? u(spec.eval->seqlen) : 0;
  const uint64_t b = u(std::max<int64_t>(1, batch));
  const uint64_t widest = std::max({H, I, Q, K, V});
  // Multipliers round the planner's up: 8 activation copies of 4 bytes, 16
  // bytes per solver element, 13 bytes per quantized parameter, 3 arenas per layer.
  const std::vector<Term> terms = {
      {"calib.nsamples " + std::to_string(calib_seqs) + " x calib.seqlen " + std::to_string(T) +
           " x width " + std::to_string(widest) + " x 32 bytes",
       CheckedU64(calib_seqs) * T * widest * 32},
      {"eval sequences " + std::to_string(eval_seqs) + " x eval.seqlen " + std::to_string(Te) +
           " x 4 bytes",
       CheckedU64(eval_seqs) * Te * 4},
      {"batch " + std::to_string(b) + " x eval.seqlen " + std::to_string(Te) +
           " x (hidden + vocab " + std::to_string(H + V) + ") x 8 bytes",
       CheckedU64(b) * Te * (CheckedU64(H) + V) * 8},
      {"layers " + std::to_string(L) + " x 3 batch arenas of " + std::to_string(b) + " x " +
           std::to_string(std::max(T, Te)) + " tokens x width " + std::to_string(widest) +
           " x 20 bytes",
       CheckedU64(L) * 3 * b * std::max(T, Te) * widest * 20},
      {"layers " + std::to_string(L) + " x 12 weight matrices of " + std::to_string(widest) +
           " x " + std::to_string(widest) + " x 13 bytes",
       CheckedU64(L) * 12 * widest * widest * 13},
      {"vocab " + std::to_string(V) + " x hidden " + std::to_string(H) + " x 16 bytes",
       CheckedU64(V) * H * 16},
      {"width " + std::to_string(widest) + " squared x 32 bytes (Hessian and solver)",
       CheckedU64(widest) * widest * 32},
  };
  CheckedU64 total;
  for (const Term& t : terms) {
    if (t.value.overflowed())
      return resource_exhausted("memory estimate out of range: " + t.what + " overflows 64 bits");
    total += t.value;
  }
  constexpr uint64_t kMax = uint64_t{1} << 62;
  if (total.overflowed() || total.value() > kMax)
    return resource_exhausted("memory estimate out of range: the terms (" + terms[0].what +
                              ", ...) add up to more than 2^62 bytes; lower calib.nsamples, "
                              "calib.seqlen or eval.nsamples");
  return Status::ok();
}

}  // namespace qcal

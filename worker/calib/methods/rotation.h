// The deployed block of a rotating transform (QuaRot §3, SpinQuant §4's folding):
// norms folded, the residual rotation R1 on every input/output side, the per-head
// R2 on V/O, and — when activations or the K/V cache are quantized — the online
// Hadamards: across heads on o's input, R4 on down's input, R3 on Q/K after RoPE.
// Shared by methods/quarot.cc and methods/spinquant.cc (both with the cross-head
// Hadamard: SpinQuant's reference drops it but quantizes o's input per head, while
// qcal quantizes it per token like QuaRot; docs/SPINQUANT.md has the measurements).
#pragma once

#include <vector>

#include "worker/calib/method.h"

namespace qcal::calib {

// `R2` (d×d) for this layer; `heads_online`: the cross-head Hadamard on o's input.
Deployed deploy_rotated(const BlockInputs& in, const std::vector<double>& R1,
                        const std::vector<double>& R2, bool heads_online);

}  // namespace qcal::calib

// Weight fake quantization on the GPU: the CUDA variant of the engine's RTN
// (worker/engine/quantizer.h, whose `fake_quantize` is the scalar reference it
// is tested against, bit for bit). No CUDA types here; a build without CUDA
// links kernels/quant_cuda_none.cc, where every call returns kUnavailable.
//
// Letters: R rows, C columns, gs group size.
#pragma once

#include <cstdint>

#include "common/status.h"

namespace qcal {

// host_out (R, C) = RTN fake quantization of host_in (R, C), both row-major fp32
// host memory (they may alias). Groups of `group_size` consecutive columns per
// row (−1 = the whole row; the last group may be partial); `bits` ∈ {2,3,4,8};
// symmetric (full or `narrow` grid) or asymmetric exactly as
// QuantSpec{bits, group_size, sym, narrow} without the MSE clip search:
// fp16-rounded scales clamped ≥ 1e-5, half-to-even rounding.
// Copies to the device, runs, copies back (synchronous).
// Errors: kInvalidInput (bad bits/group_size/shape), kUnavailable (built without
// CUDA, or no GPU: retry elsewhere), kResourceExhausted (device allocation),
// kInternal (a CUDA failure after allocation). R == 0 or C == 0 is a no-op.
// Thread safety: safe to call concurrently (each call owns its device buffers).
Status fake_quantize_rows_cuda(const float* host_in, float* host_out, int64_t rows, int64_t cols,
                               int bits, int64_t group_size, bool sym, bool narrow);

}  // namespace qcal

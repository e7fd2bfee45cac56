// Integer kernels for quantized inference (issue #3 part 4, methods.md §3.5, §5.5):
// weights stored as int4/int8 codes, activations quantized per token on the fly,
// integer GEMM with int32 accumulation, dequantized by the outer product of the
// per-token and per-channel scales. Every fast kernel has a scalar reference that
// the tests compare against on random inputs (results are exact integers, so the
// comparison is exact before the final fp32 scaling).
#pragma once

#include <cstdint>
#include <vector>

namespace qcal {

// Per-token symmetric activation quantization (QuaRot/FlatQuant): per row of x
// (rows, cols): s = clip·absmax/(2^(b−1) − 1) (s = 1 when absmax = 0),
// q = clamp(rint(x/s), −2^(b−1), 2^(b−1) − 1). bits ∈ [2, 8]. codes (rows, cols) int8.
// Also per group of `group` columns when group > 0 (scales (rows, cols/group)).
void quantize_act_sym(const float* x, int64_t rows, int64_t cols, int bits, float clip,
                      int64_t group, int8_t* codes, float* scales);
void quantize_act_sym_ref(const float* x, int64_t rows, int64_t cols, int bits, float clip,
                          int64_t group, int8_t* codes, float* scales);

// Asymmetric per-(row, group) quantization (K/V cache, asymmetric activations):
// xmin = min(min, 0)·clip, xmax = max(max, 0)·clip, s = (xmax − xmin)/(2^b − 1)
// (s = 1 when 0), z = rint(−xmin/s), q = clamp(rint(x/s) + z, 0, 2^b − 1) as uint8;
// dequantized value s·(q − z).
void quantize_asym(const float* x, int64_t rows, int64_t cols, int bits, float clip,
                   int64_t group, uint8_t* codes, float* scales, float* zeros);
void dequantize_asym(const uint8_t* codes, const float* scales, const float* zeros, int64_t rows,
                     int64_t cols, int64_t group, float* x);

// Signed weight codes (O, I) in [−2^(b−1), 2^(b−1) − 1] packed two per byte for b ≤ 4
// (low nibble = even column) or one per byte for b ≤ 8.
struct PackedWeight {
  int bits = 4;
  int64_t out = 0, in = 0;
  std::vector<uint8_t> data;   // packed codes, row-major
  std::vector<float> scales;   // (out) per output channel (symmetric)
  // Columns per scale group; ≤ 0 = one group per row (per output channel). With
  // group > 0, scales is (out, G), G = ceil(in/group), the last group possibly short.
  int64_t group = -1;
};
// Row o starts at byte o·ceil(in/2) (b ≤ 4) or o·in (b > 4). Aborts on codes out of range.
PackedWeight pack_weight(const int8_t* codes, const float* scales, int64_t out, int64_t in,
                         int bits);
// Grouped: scales (out, ceil(in/group)); group ≤ 0 is the per-channel form above.
PackedWeight pack_weight(const int8_t* codes, const float* scales, int64_t out, int64_t in,
                         int bits, int64_t group);
// Unpacks row o into int8 codes (in).
void unpack_row(const PackedWeight& w, int64_t o, int8_t* codes);

// Y (rows, out) = (sx ⊗ sw) ⊙ (Xq · Wqᵀ) with int32 accumulation, + bias (out) if non-null.
// Xq (rows, in) int8 codes with per-row scales sx (rows) (group ≤ 0, the GEMM case).
// Exact float order (fast == ref bit for bit): acc_g = Σ_{i∈g} xq·wq (int32),
// y[t,o] = sx[t]·(Σ_g sw[o,g]·acc_g) summed in g order from 0, then + bias[o].
// Multithreaded over output rows (QCAL_THREADS) for large problems.
void qgemm(const int8_t* xq, const float* sx, int64_t rows, const PackedWeight& w,
           const float* bias, float* y);
void qgemm_ref(const int8_t* xq, const float* sx, int64_t rows, const PackedWeight& w,
               const float* bias, float* y);
// The integer kernel qgemm uses: "avx512vnni", "avx2", "sse2" or "scalar", the best
// the CPU runs unless the environment variable QCAL_QGEMM_ISA names a lower one
// (read at every call; tests and benchmarks compare the kernels).
const char* qgemm_isa();

}  // namespace qcal

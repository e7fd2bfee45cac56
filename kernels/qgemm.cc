// Integer kernels for quantized inference (kernels/qgemm.h). Letters: T token
// rows, I input columns, O output channels, G scale groups per weight row.
//
// qgemm, a register-blocked integer GEMM:
// - Layout. Codes are widened once per call into a "group-padded" layout where
//   every scale group starts at a multiple of KK (the products one int32 lane
//   sums per instruction) and is zero-filled up to it. X stays row-major
//   (T, stride); W is repacked per tile of kTileO outputs into panels of NP
//   outputs, k-major: element (j, k) of a panel at (k/KK)·NP·KK + j·KK + k%KK,
//   so one vector load holds KK consecutive k of V consecutive outputs (V the
//   int32 lanes of a vector). Output tiles are split across threads.
// - Micro-kernel. MR rows × NP outputs of int32 accumulators, one vector lane per
//   (row, output): per KK-step, broadcast KK codes of each X row and multiply-add
//   them with the panel vectors (pmaddwd on int16, or AVX-512 VNNI vpdpbusd on
//   u8 × s8). No horizontal sums. At each group's end the lanes are scaled:
//   s += sw[o, g]·float(acc) elementwise, the reference's own order, so fast and
//   reference agree bit for bit.
// - u8 × s8 (VNNI): X is shifted to x + 128 ∈ [0, 255]; 128·Σ_{i∈g} w_i is
//   subtracted per (o, g) before scaling (int32 exact).
#include "kernels/qgemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/status.h"
#include "kernels/gemm.h"
#include "kernels/parallel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QCAL_QGEMM_X86 1
// GCC 12's AVX-512 intrinsics pass an "undefined" register that its own
// -Wuninitialized flags once inlined; the warning points into this header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace qcal {
namespace {

constexpr int64_t kTileO = 128;  // outputs repacked per tile (≤ 128 × I × 2 bytes, in L2)

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Columns per group and number of groups of a row of `cols` (group ≤ 0: one).
int64_t group_size(int64_t cols, int64_t group) {
  return group > 0 ? std::min(group, std::max<int64_t>(cols, 1)) : std::max<int64_t>(cols, 1);
}
int64_t num_groups(int64_t cols, int64_t group) {
  return group > 0 ? ceil_div(cols, group_size(cols, group)) : 1;
}

// Rounds half to even like rint for |v| ≤ 2^22 (default rounding mode): adding
// 1.5·2^23 pushes the fraction out of the mantissa. Vectorizes under SSE2,
// where rint does not.
inline float round_small(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ---------------------------------------------------------------------------
// Micro-kernels. Each is a struct with the element types XT (X) and WT (W), MR
// rows, NP panel outputs, KK products per int32 lane, and
//   tile(x, ldx, w, nk, corr, sw, s):
//     acc[r][j] = Σ_{t<nk} Σ_{u<KK} x[r·ldx + t·KK + u] · w[t·NP·KK + j·KK + u]
//     s[r·NP + j] += sw[j] · float(acc[r][j] − corr[j])
// with x at the group's first column, w at the group's first panel step.

struct KernelScalar {
  using XT = int16_t;
  using WT = int16_t;
  static constexpr int MR = 4, NP = 8, KK = 2;
  static void tile(const XT* x, int64_t ldx, const WT* w, int64_t nk, const int32_t* corr,
                   const float* sw, float* s) {
    int32_t acc[MR][NP] = {};
    for (int64_t t = 0; t < nk; ++t) {
      const WT* wt = w + t * NP * KK;
      for (int r = 0; r < MR; ++r) {
        const XT* xr = x + r * ldx + t * KK;
        for (int j = 0; j < NP; ++j)
          for (int u = 0; u < KK; ++u) acc[r][j] += int32_t{xr[u]} * wt[j * KK + u];
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NP; ++j) s[r * NP + j] += sw[j] * static_cast<float>(acc[r][j] - corr[j]);
  }
};

#ifdef QCAL_QGEMM_X86
// SSE2 (the x86-64 baseline): 4 rows × 2 vectors of 4 outputs (11 of 16 registers).
struct KernelSse2 {
  using XT = int16_t;
  using WT = int16_t;
  static constexpr int MR = 4, NP = 8, KK = 2;
  static void tile(const XT* x, int64_t ldx, const WT* w, int64_t nk, const int32_t* corr,
                   const float* sw, float* s) {
    __m128i a[MR][2];
#pragma GCC unroll 16
    for (auto& row : a) row[0] = row[1] = _mm_setzero_si128();
    for (int64_t t = 0; t < nk; ++t) {
      const WT* wt = w + t * NP * KK;
      const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wt));
      const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wt + 8));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m128i xv = _mm_set1_epi32(load32(x + r * ldx + t * KK));
        a[r][0] = _mm_add_epi32(a[r][0], _mm_madd_epi16(xv, b0));
        a[r][1] = _mm_add_epi32(a[r][1], _mm_madd_epi16(xv, b1));
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(corr + 4 * v));
      const __m128 f = _mm_loadu_ps(sw + 4 * v);
      for (int r = 0; r < MR; ++r) {
        float* sp = s + r * NP + 4 * v;
        const __m128 p = _mm_mul_ps(f, _mm_cvtepi32_ps(_mm_sub_epi32(a[r][v], c)));
        _mm_storeu_ps(sp, _mm_add_ps(_mm_loadu_ps(sp), p));
      }
    }
  }
};

// AVX2: 4 rows × 2 vectors of 8 outputs (more rows spill under GCC 12 and run
// slower). target("avx2") has no FMA, so multiply and add round separately, as
// in the reference.
struct KernelAvx2 {
  using XT = int16_t;
  using WT = int16_t;
  static constexpr int MR = 4, NP = 16, KK = 2;
  __attribute__((target("avx2"))) static void tile(const XT* x, int64_t ldx, const WT* w,
                                                   int64_t nk, const int32_t* corr, const float* sw,
                                                   float* s) {
    __m256i a[MR][2];
#pragma GCC unroll 16
    for (auto& row : a) row[0] = row[1] = _mm256_setzero_si256();
    for (int64_t t = 0; t < nk; ++t) {
      const WT* wt = w + t * NP * KK;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + 16));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m256i xv = _mm256_set1_epi32(load32(x + r * ldx + t * KK));
        a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(xv, b0));
        a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(xv, b1));
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + 8 * v));
      const __m256 f = _mm256_loadu_ps(sw + 8 * v);
      for (int r = 0; r < MR; ++r) {
        float* sp = s + r * NP + 8 * v;
        const __m256 p = _mm256_mul_ps(f, _mm256_cvtepi32_ps(_mm256_sub_epi32(a[r][v], c)));
        _mm256_storeu_ps(sp, _mm256_add_ps(_mm256_loadu_ps(sp), p));
      }
    }
  }
};

// AVX-512 VNNI, u8 × s8: vpdpbusd adds 4 adjacent u8·s8 products into each int32
// lane without saturation. 8 rows × 2 vectors of 16 outputs: 16 accumulators,
// 2 weight vectors, 1 broadcast. The epilogue uses the explicit-rounding forms
// so the compiler cannot fuse the multiply and add into an FMA (AVX-512F has one).
struct KernelAvx512Vnni {
  using XT = uint8_t;
  using WT = int8_t;
  static constexpr int MR = 8, NP = 32, KK = 4;
  static constexpr int NV = NP / 16;
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile(const XT* x, int64_t ldx,
                                                                          const WT* w, int64_t nk,
                                                                          const int32_t* corr,
                                                                          const float* sw,
                                                                          float* s) {
    __m512i a[MR][NV];
#pragma GCC unroll 16
    for (auto& row : a)
      for (auto& v : row) v = _mm512_setzero_si512();
    for (int64_t t = 0; t < nk; ++t) {
      const WT* wt = w + t * NP * KK;
      __m512i b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(wt + 64 * v);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512i xv = _mm512_set1_epi32(load32(x + r * ldx + t * KK));
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) a[r][v] = _mm512_dpbusd_epi32(a[r][v], xv, b[v]);
      }
    }
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int v = 0; v < NV; ++v) {
      const __m512i c = _mm512_loadu_si512(corr + 16 * v);
      const __m512 f = _mm512_loadu_ps(sw + 16 * v);
      for (int r = 0; r < MR; ++r) {
        float* sp = s + r * NP + 16 * v;
        const __m512 p = _mm512_mul_round_ps(
            f, _mm512_cvt_roundepi32_ps(_mm512_sub_epi32(a[r][v], c), kRound), kRound);
        _mm512_storeu_ps(sp, _mm512_add_round_ps(_mm512_loadu_ps(sp), p, kRound));
      }
    }
  }
};
#endif  // QCAL_QGEMM_X86

enum class IsaId { kAvx512Vnni, kAvx2, kSse2, kScalar };
struct Isa {
  const char* name;
  IsaId id;
};

// The kernel for this call: the best the CPU runs, or a lower one named by QCAL_QGEMM_ISA.
Isa pick_isa() {
  static const Isa kAll[] = {
#ifdef QCAL_QGEMM_X86
      {"avx512vnni", IsaId::kAvx512Vnni},
      {"avx2", IsaId::kAvx2},
      {"sse2", IsaId::kSse2},
#endif
      {"scalar", IsaId::kScalar},
  };
  constexpr int n = static_cast<int>(sizeof(kAll) / sizeof(kAll[0]));
  static const int best = [] {
#ifdef QCAL_QGEMM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      return 0;
    if (__builtin_cpu_supports("avx2")) return 1;
    return 2;
#else
    return 0;
#endif
  }();
  int level = best;
  if (const char* e = std::getenv("QCAL_QGEMM_ISA")) {
    for (int i = 0; i < n; ++i)
      if (std::strcmp(e, kAll[i].name) == 0) level = std::max(best, i);
  }
  return kAll[level];
}

// ---------------------------------------------------------------------------
// The group-padded layout of rows of length `in` (groups start at multiples of pad).
struct PadLayout {
  int64_t gs = 0;      // columns per group (the last may be shorter)
  int64_t G = 0;       // groups (0 when in = 0)
  int64_t gpad = 0;    // padded length of a full group
  int64_t stride = 0;  // padded row length
  PadLayout(int64_t in, int64_t group, int64_t pad) {
    gs = group_size(in, group);
    G = in > 0 ? ceil_div(in, gs) : 0;
    gpad = round_up(gs, pad);
    stride = G > 0 ? (G - 1) * gpad + round_up(in - (G - 1) * gs, pad) : 0;
  }
  int64_t plen(int64_t g) const { return g + 1 < G ? gpad : stride - g * gpad; }
  // dst (stride) ← src (in) + offset, zero padded.
  template <typename T>
  void widen(const int8_t* src, int64_t in, int32_t offset, T* dst) const {
    std::fill(dst, dst + stride, T{0});
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = std::min(gs, in - g * gs);
      const int8_t* s = src + g * gs;
      T* d = dst + g * gpad;
      for (int64_t k = 0; k < n; ++k) d[k] = static_cast<T>(s[k] + offset);
    }
  }
};

// Σ c[0..n), blocks of 16 through locals (SLP-vectorized at -O2).
int32_t sum_codes(const int8_t* c, int64_t n) {
  int32_t acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int u = 0; u < 16; ++u) acc[u] += c[i + u];
  int32_t s = 0;
  for (; i < n; ++i) s += c[i];
  for (int32_t a : acc) s += a;
  return s;
}

void check_bits(int bits) {
  QCAL_CHECK_MSG(bits >= 2 && bits <= 8, "quantization bits not in [2, 8]");
}

}  // namespace

// ---------------------------------------------------------------------------
// Activation quantization.

void quantize_act_sym_ref(const float* x, int64_t rows, int64_t cols, int bits, float clip,
                          int64_t group, int8_t* codes, float* scales) {
  check_bits(bits);
  if (cols <= 0) return;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float qmin = -static_cast<float>(1 << (bits - 1));
  const int64_t gs = group_size(cols, group), G = num_groups(cols, group);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(cols, c0 + gs);
      const float* xr = x + r * cols;
      float amax = 0.0f;
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(xr[c]));
      float s = clip * amax / qmax;
      if (!(s > 0.0f)) s = 1.0f;  // absmax = 0 (or an underflowing scale)
      for (int64_t c = c0; c < c1; ++c) {
        const float q = std::clamp(std::rint(xr[c] / s), qmin, qmax);
        codes[r * cols + c] = static_cast<int8_t>(q);
      }
      scales[r * G + g] = s;
    }
  }
}

void quantize_act_sym(const float* x, int64_t rows, int64_t cols, int bits, float clip,
                      int64_t group, int8_t* codes, float* scales) {
  check_bits(bits);
  if (cols <= 0) return;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float qmin = -static_cast<float>(1 << (bits - 1));
  const int64_t gs = group_size(cols, group), G = num_groups(cols, group);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * gs, n = std::min(cols, c0 + gs) - c0;
      const float* xr = x + r * cols + c0;
      int8_t* qr = codes + r * cols + c0;
      // Blocks of 8 through locals: GCC vectorizes them at -O2 (max is exact in any order).
      float m8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= n; c += 8)
        for (int u = 0; u < 8; ++u) {
          const float a = std::fabs(xr[c + u]);
          m8[u] = m8[u] < a ? a : m8[u];
        }
      float amax = 0.0f;
      for (; c < n; ++c) amax = std::max(amax, std::fabs(xr[c]));
      for (float m : m8) amax = std::max(amax, m);
      float s = clip * amax / qmax;
      if (!(s > 0.0f)) s = 1.0f;
      // Clamp first, then round: the same as rounding first for integer bounds.
      c = 0;
      for (; c + 8 <= n; c += 8) {
        int32_t q[8];
        for (int u = 0; u < 8; ++u) {
          float v = xr[c + u] / s;
          v = v < qmin ? qmin : v;
          v = v > qmax ? qmax : v;
          q[u] = static_cast<int32_t>(round_small(v));
        }
        for (int u = 0; u < 8; ++u) qr[c + u] = static_cast<int8_t>(q[u]);
      }
      for (; c < n; ++c) {
        float v = xr[c] / s;
        v = v < qmin ? qmin : v;
        v = v > qmax ? qmax : v;
        qr[c] = static_cast<int8_t>(round_small(v));
      }
      scales[r * G + g] = s;
    }
  }
}

void quantize_asym(const float* x, int64_t rows, int64_t cols, int bits, float clip, int64_t group,
                   uint8_t* codes, float* scales, float* zeros) {
  check_bits(bits);
  if (cols <= 0) return;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t gs = group_size(cols, group), G = num_groups(cols, group);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * gs, c1 = std::min(cols, c0 + gs);
      const float* xr = x + r * cols;
      float lo = 0.0f, hi = 0.0f;
      for (int64_t c = c0; c < c1; ++c) {
        lo = std::min(lo, xr[c]);
        hi = std::max(hi, xr[c]);
      }
      lo *= clip;
      hi *= clip;
      float s = (hi - lo) / qmax;
      if (!(s > 0.0f)) s = 1.0f;
      const float z = std::rint(-lo / s);
      for (int64_t c = c0; c < c1; ++c) {
        const float q = std::clamp(std::rint(xr[c] / s) + z, 0.0f, qmax);
        codes[r * cols + c] = static_cast<uint8_t>(q);
      }
      scales[r * G + g] = s;
      zeros[r * G + g] = z;
    }
  }
}

void dequantize_asym(const uint8_t* codes, const float* scales, const float* zeros, int64_t rows,
                     int64_t cols, int64_t group, float* x) {
  if (cols <= 0) return;
  const int64_t gs = group_size(cols, group), G = num_groups(cols, group);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = c / gs;
      x[r * cols + c] =
          scales[r * G + g] * (static_cast<float>(codes[r * cols + c]) - zeros[r * G + g]);
    }
}

// ---------------------------------------------------------------------------
// Weight packing.

PackedWeight pack_weight(const int8_t* codes, const float* scales, int64_t out, int64_t in,
                         int bits) {
  return pack_weight(codes, scales, out, in, bits, -1);
}

PackedWeight pack_weight(const int8_t* codes, const float* scales, int64_t out, int64_t in,
                         int bits, int64_t group) {
  check_bits(bits);
  QCAL_CHECK(out >= 0 && in >= 0);
  PackedWeight w;
  w.bits = bits;
  w.out = out;
  w.in = in;
  w.group = group > 0 ? group : -1;
  const int lo = -(1 << (bits - 1)), hi = (1 << (bits - 1)) - 1;
  for (int64_t i = 0; i < out * in; ++i)
    QCAL_CHECK_MSG(codes[i] >= lo && codes[i] <= hi, "pack_weight: code out of range for bits");
  if (bits <= 4) {
    const int64_t rb = ceil_div(in, 2);
    w.data.assign(static_cast<size_t>(out * rb), 0);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        const uint8_t nib = static_cast<uint8_t>(codes[o * in + i]) & 0x0f;
        w.data[static_cast<size_t>(o * rb + i / 2)] |= (i % 2 == 0) ? nib : uint8_t(nib << 4);
      }
  } else {
    w.data.resize(static_cast<size_t>(out * in));
    for (int64_t i = 0; i < out * in; ++i)
      w.data[static_cast<size_t>(i)] = static_cast<uint8_t>(codes[i]);
  }
  const int64_t G = w.group > 0 ? num_groups(in, w.group) : 1;
  w.scales.assign(scales, scales + out * G);
  return w;
}

void unpack_row(const PackedWeight& w, int64_t o, int8_t* codes) {
  if (w.bits <= 4) {
    const uint8_t* row = w.data.data() + o * ceil_div(w.in, 2);
    int64_t i = 0;
#ifdef QCAL_QGEMM_X86
    // SSE2, 32 codes per step: split the nibbles, sign-extend with (v ^ 8) − 8,
    // interleave low (even column) and high (odd column).
    const __m128i mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(0x08);
    for (; i + 32 <= w.in; i += 32) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i / 2));
      __m128i lo = _mm_and_si128(v, mask);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
      lo = _mm_sub_epi8(_mm_xor_si128(lo, eight), eight);
      hi = _mm_sub_epi8(_mm_xor_si128(hi, eight), eight);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; i + 2 <= w.in; i += 2) {
      const uint8_t b = row[i / 2];
      // Sign-extend each nibble: shift it to the top of an int8, then back.
      codes[i] = static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4);
      codes[i + 1] = static_cast<int8_t>(static_cast<int8_t>(b) >> 4);
    }
    if (i < w.in) codes[i] = static_cast<int8_t>(static_cast<int8_t>(row[i / 2] << 4) >> 4);
  } else {
    std::memcpy(codes, w.data.data() + o * w.in, static_cast<size_t>(w.in));
  }
}

// ---------------------------------------------------------------------------
// Integer GEMM.

void qgemm_ref(const int8_t* xq, const float* sx, int64_t rows, const PackedWeight& w,
               const float* bias, float* y) {
  const int64_t in = w.in, out = w.out;
  const int64_t gs = group_size(in, w.group);
  const int64_t G = w.group > 0 ? num_groups(in, w.group) : 1;
  std::vector<int8_t> wr(static_cast<size_t>(in));
  for (int64_t o = 0; o < out; ++o) {
    unpack_row(w, o, wr.data());
    for (int64_t t = 0; t < rows; ++t) {
      float s = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        int32_t acc = 0;
        for (int64_t i = g * gs; i < std::min(in, (g + 1) * gs); ++i)
          acc += int32_t{xq[t * in + i]} * int32_t{wr[static_cast<size_t>(i)]};
        s += w.scales[static_cast<size_t>(o * G + g)] * static_cast<float>(acc);
      }
      float v = sx[t] * s;
      if (bias) v += bias[o];
      y[t * out + o] = v;
    }
  }
}

namespace {

// The GEMM driver for one micro-kernel (see the top of the file).
template <typename Kernel>
void qgemm_impl(const int8_t* xq, const float* sx, int64_t rows, const PackedWeight& w,
                const float* bias, float* y) {
  using XT = typename Kernel::XT;
  using WT = typename Kernel::WT;
  constexpr int MR = Kernel::MR, NP = Kernel::NP, KK = Kernel::KK;
  constexpr int64_t kTile = round_up(kTileO, NP);  // outputs per tile
  constexpr int32_t x_offset = std::is_unsigned_v<XT> ? 128 : 0;
  const int64_t in = w.in, out = w.out;
  const PadLayout lay(in, w.group, KK);
  const int64_t G = w.group > 0 ? lay.G : 1;  // scale columns (per channel with in = 0: one)
  const int64_t ld = lay.stride, steps = ld / KK;
  const int64_t rows_p = round_up(rows, MR);

  // X widened once (rows padded to MR with rows of zeros, whose outputs are dropped).
  std::vector<XT> xb(static_cast<size_t>(rows_p * ld), XT{0});
  for (int64_t t = 0; t < rows; ++t) lay.widen(xq + t * in, in, x_offset, xb.data() + t * ld);

  const int64_t tiles = ceil_div(out, kTile);
  const int64_t Gl = std::max<int64_t>(lay.G, 1);
  auto run = [&](int64_t tile0, int64_t tile1) {
    std::vector<WT> panels(static_cast<size_t>(kTile * ld));
    std::vector<float> tsw(static_cast<size_t>(Gl * kTile));      // [g][j]
    std::vector<int32_t> tcorr(static_cast<size_t>(Gl * kTile));  // [g][j]
    std::vector<int8_t> row(static_cast<size_t>(in));
    std::vector<WT> wide(static_cast<size_t>(ld));
    alignas(64) float s[MR * NP];
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t o0 = tile * kTile, no = std::min(kTile, out - o0);
      const int64_t np = ceil_div(no, NP);  // panels in this tile
      std::fill(tsw.begin(), tsw.end(), 0.0f);
      std::fill(tcorr.begin(), tcorr.end(), 0);
      for (int64_t j = 0; j < np * NP; ++j) {
        WT* panel = panels.data() + (j / NP) * NP * ld;
        const int64_t jj = j % NP;
        if (j < no) {
          unpack_row(w, o0 + j, row.data());
          if (std::is_same_v<WT, int8_t> && ld == in) {
            std::memcpy(wide.data(), row.data(), static_cast<size_t>(in));  // nothing to pad
          } else {
            lay.widen(row.data(), in, 0, wide.data());
          }
          for (int64_t g = 0; g < lay.G; ++g) {
            tsw[g * kTile + j] = w.scales[static_cast<size_t>((o0 + j) * G + g)];
            if constexpr (x_offset != 0) {
              const int64_t i0 = g * lay.gs, i1 = std::min(in, i0 + lay.gs);
              tcorr[g * kTile + j] = x_offset * sum_codes(row.data() + i0, i1 - i0);
            }
          }
        } else {
          std::fill(wide.begin(), wide.end(), WT{0});
        }
        static_assert(KK * sizeof(WT) == 4);  // one 4-byte move per step
        const int64_t nsteps = steps;  // a local: the byte stores below may alias anything else
        const WT* src = wide.data();
        WT* dst = panel + jj * KK;
        for (int64_t t = 0; t < nsteps; ++t) std::memcpy(dst + t * NP * KK, src + t * KK, 4);
      }
      for (int64_t r0 = 0; r0 < rows_p; r0 += MR) {
        const XT* xr = xb.data() + r0 * ld;
        for (int64_t p = 0; p < np; ++p) {
          const WT* panel = panels.data() + p * NP * ld;
          std::fill(s, s + MR * NP, 0.0f);
          for (int64_t g = 0; g < lay.G; ++g)
            Kernel::tile(xr + g * lay.gpad, ld, panel + g * lay.gpad * NP, lay.plen(g) / KK,
                         tcorr.data() + g * kTile + p * NP, tsw.data() + g * kTile + p * NP, s);
          const int nr = static_cast<int>(std::min<int64_t>(MR, rows - r0));
          const int nc = static_cast<int>(std::min<int64_t>(NP, no - p * NP));
          for (int r = 0; r < nr; ++r) {
            float* yr = y + (r0 + r) * out + o0 + p * NP;
            for (int c = 0; c < nc; ++c) {
              float v = sx[r0 + r] * s[r * NP + c];
              if (bias) v += bias[o0 + p * NP + c];
              yr[c] = v;
            }
          }
        }
      }
    }
  };
  parallel_for(tiles, rows * out * std::max<int64_t>(in, 1) / tiles + 1, run);
}

}  // namespace

void qgemm(const int8_t* xq, const float* sx, int64_t rows, const PackedWeight& w,
           const float* bias, float* y) {
  if (rows <= 0 || w.out <= 0) return;
  switch (pick_isa().id) {
#ifdef QCAL_QGEMM_X86
    case IsaId::kAvx512Vnni: return qgemm_impl<KernelAvx512Vnni>(xq, sx, rows, w, bias, y);
    case IsaId::kAvx2: return qgemm_impl<KernelAvx2>(xq, sx, rows, w, bias, y);
    case IsaId::kSse2: return qgemm_impl<KernelSse2>(xq, sx, rows, w, bias, y);
#endif
    default: return qgemm_impl<KernelScalar>(xq, sx, rows, w, bias, y);
  }
}

const char* qgemm_isa() { return pick_isa().name; }

}  // namespace qcal

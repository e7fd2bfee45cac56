// Element types of stored tensors and the conversions between them.
// Compute is always fp32 (or fp64 in references); f16/bf16 are storage only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace qcal {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

// Bytes per element.
size_t dtype_size(DType t);
// Safetensors spelling: "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL".
const char* dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
// torch_dtype spelling used in config.json ("float32", "float16", "bfloat16").
const char* torch_dtype_name(DType t);
std::optional<DType> dtype_from_torch_name(std::string_view name);
bool is_float_dtype(DType t);

// IEEE binary16 <-> float, round to nearest even, inf/nan preserved.
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);
// bfloat16 <-> float, round to nearest even, nan stays nan.
uint16_t f32_to_bf16(float f);
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// The float nearest to `f` that is exactly representable in `t` (f32 is identity).
float round_to_dtype(float f, DType t);

// Converts n elements of floating type `src` at `in` to fp32 (unaligned ok).
void to_f32(DType src, const void* in, float* out, size_t n);
// Converts n fp32 values to floating type `dst` at `out` (unaligned ok).
void from_f32(DType dst, const float* in, void* out, size_t n);

}  // namespace qcal

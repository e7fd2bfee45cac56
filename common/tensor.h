// Tensor: a dense, row-major, owning fp32 array with a shape. The compute type
// of the engine. Storage dtypes (f16/bf16/int) live only in files; they are
// converted at the boundary (common/safetensors.h, worker/engine/qformats.h).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // size == numel()

  Tensor() = default;
  explicit Tensor(std::vector<int64_t> s, float fill = 0.0f) : shape(std::move(s)) {
    data.assign(static_cast<size_t>(count(shape)), fill);
  }
  static int64_t count(const std::vector<int64_t>& s) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    return n;
  }
  int64_t numel() const { return count(shape); }
  int64_t dim(int i) const { return shape.at(static_cast<size_t>(i < 0 ? i + ndim() : i)); }
  int ndim() const { return static_cast<int>(shape.size()); }
  float* ptr() { return data.data(); }
  const float* ptr() const { return data.data(); }
  // 2-D access (rows, cols) for matrices.
  float& at(int64_t r, int64_t c) { return data[static_cast<size_t>(r * shape[1] + c)]; }
  float at(int64_t r, int64_t c) const { return data[static_cast<size_t>(r * shape[1] + c)]; }
};

// "[4096, 11008]"
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace qcal

// Safetensors files: a validated header parser (pure, fuzzable), an mmap
// reader that never loads a file whole, and a streaming, atomic writer.
//
// Format: 8-byte little-endian header length N, then N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"k": "v"}}, then the data buffer; offsets are relative to
// the start of the data buffer.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"

namespace qcal {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offset in the data buffer
  uint64_t end = 0;    // one past the last byte
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  uint64_t header_len = 0;      // N
  uint64_t data_start = 0;      // 8 + N: file offset of the data buffer
  std::vector<TensorInfo> tensors;  // sorted by `begin`
  std::map<std::string, std::string> metadata;
};

// Parses and validates the first bytes of a safetensors file of total size
// `file_size`. `bytes` must hold at least the 8-byte length and the header (if
// it holds less, kCorrupt "truncated"). Checks: header length within the file
// and below 100 MB; valid JSON object; each entry has a known dtype, a shape of
// non-negative ints, data_offsets [b, e] with b <= e, e within the data buffer,
// e - b == numel * dtype_size; no two tensors overlap; no duplicate names.
// Every error is kCorrupt (or kInvalidInput for an unknown dtype) and the
// message names the tensor and the problem; `what` (usually the path) prefixes it.
Result<SafetensorsHeader> parse_safetensors_header(std::string_view bytes, uint64_t file_size,
                                                   const std::string& what);

// A memory-mapped safetensors file. Thread safe for concurrent reads.
class SafetensorsFile {
 public:
  static Result<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  // nullptr when absent.
  const TensorInfo* find(const std::string& name) const;
  // Raw bytes of a tensor, pointing into the mapping (valid while this lives).
  std::string_view raw(const TensorInfo& t) const;
  // Reads a float tensor converted to fp32. kNotFound if absent; kInvalidInput
  // if not a float dtype.
  Result<Tensor> read_f32(const std::string& name) const;
  // Advises the kernel that the pages of this tensor can be dropped (after
  // use), keeping the resident set bounded when walking a large model.
  void release(const TensorInfo& t) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  SafetensorsHeader header_;
  const unsigned char* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, size_t> index_;  // name -> position in header_.tensors
};

// Streaming writer. Declare every tensor first (the header needs all shapes),
// then write their data in declaration order. The file appears at `path` only
// after finish() succeeds (temporary name, fsync, rename); if the writer is
// destroyed before finish(), the temporary file is removed.
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::string path);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  void set_metadata(const std::string& key, const std::string& value);
  // Declares a tensor. Names must be unique (checked in begin()).
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape);
  // Total bytes of data declared so far.
  uint64_t data_bytes() const;
  // Writes the header. Tensors are laid out in declaration order.
  Status begin();
  // Writes the next declared tensor's bytes; `bytes.size()` must equal its size.
  Status write(std::string_view bytes);
  // Convenience: converts fp32 values to the declared float dtype and writes.
  Status write_f32(const float* values, size_t n);
  // Checks every tensor was written, fsyncs, renames into place.
  Status finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal

// Safetensors files: a validated header parser (pure, fuzzable), an mmap
// reader that never loads a file whole, and a streaming, atomic writer that
// takes each tensor whole or in pieces of any size (so a (V, H) tensor can be
// produced a few thousand rows at a time).
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
  uint64_t header_len = 0;          // N
  uint64_t data_start = 0;          // 8 + N: file offset of the data buffer
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
  // The same for bytes [begin, end) of the tensor (clamped to it), so a large
  // tensor can be walked in pieces with a bounded resident set.
  void release(const TensorInfo& t, uint64_t begin, uint64_t end) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  SafetensorsHeader header_;
  const unsigned char* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, size_t> index_;  // name -> position in header_.tensors
};

// Default piece size of the streaming writers (copies, fp32 conversions, row
// sources): bounds their buffers independently of the tensor sizes.
inline constexpr uint64_t kWriteChunkBytes = 16ull << 20;  // 16 MiB

// Produces rows [row0, row0 + rows) of a tensor as fp32, row-major, into
// `out` (rows × row_numel values, row_numel = the product of the dims after
// the first; a 1-D tensor's rows are its elements, a 0-D tensor is one row).
// Every value must be written and finite. A non-OK status aborts the write
// that called it and is returned by it unchanged.
using RowFn = std::function<Status(int64_t row0, int64_t rows, float* out)>;
// Rows of a row-major fp32 array with `row_numel` values per row (not owned:
// `data` must outlive the RowFn).
RowFn rows_of(const float* data, int64_t row_numel);

// Streaming writer. Declare every tensor first (the header needs all shapes),
// then write their data in declaration order: each tensor whole (write,
// write_f32), in pieces (append), or from a row source (write_rows). Output
// is deterministic: the header lists the tensors in declaration order with
// the metadata keys sorted. The file appears at `path` only after finish()
// succeeds (temporary `path.tmp.<pid>`, fsync, rename, fsync of the
// directory); if the writer is destroyed before finish(), or any call fails,
// the temporary file is removed. After a failure every later call returns
// the first error. Memory: the header plus the caller's pieces.
// Not thread safe.
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
  // Appends the next piece of the current tensor (the first one not yet
  // complete): pieces of any size, in order, until exactly its declared bytes
  // have arrived; then the next tensor is current. A piece never spans two
  // tensors; an empty piece completes an empty tensor and is a no-op otherwise.
  // kInternal naming the tensor and the byte counts when the piece is larger
  // than what the tensor still lacks, or after every tensor is complete.
  Status append(std::string_view bytes);
  // Writes the whole current tensor (a float dtype, none of it written yet)
  // from `rows`, called with consecutive ranges of at most
  // max(1, chunk_bytes / (row_numel·4)) rows, in order; each piece is
  // converted to the declared dtype as it arrives. kInvalidInput naming the
  // tensor and the element when a value is not finite (or was not written);
  // `rows`' own errors are returned unchanged; kInternal when the current
  // tensor is not a float dtype or was partly written. Memory: one piece in
  // fp32 and one in the declared dtype.
  Status write_rows(const RowFn& rows, uint64_t chunk_bytes = kWriteChunkBytes);
  // Checks every tensor was written completely (kInternal naming the first
  // that was not and the bytes it got), fsyncs, renames into place.
  Status finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal

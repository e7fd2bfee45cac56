// SHA-256 (FIPS 180-4) through OpenSSL's EVP interface: buffers, files and
// streams. Digests are lower-case hex strings of 64 characters, the form
// artifact references carry ({"path", "sha256", "bytes"}).
//
// Thread safety: a Sha256 object is not thread safe; distinct objects and the
// free functions are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"

namespace qcal {

// Incremental hashing: update() any number of times, then hex_digest() once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(const void* data, size_t n);
  void update(std::string_view bytes) { update(bytes.data(), bytes.size()); }
  uint64_t bytes() const { return bytes_; }  // bytes hashed so far
  // Finishes and returns the digest; the object must not be updated afterwards
  // (a second call returns the same digest).
  std::string hex_digest();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  uint64_t bytes_ = 0;
  std::string digest_;
};

// Digest of a buffer.
std::string sha256_hex(std::string_view bytes);

struct FileDigest {
  std::string sha256;  // hex
  uint64_t bytes = 0;  // file size
};

// Digest of a whole file, read in 4 MiB chunks (memory stays bounded).
// kNotFound when the file does not exist; kIoError when a read fails.
Result<FileDigest> sha256_file(const std::string& path);

}  // namespace qcal

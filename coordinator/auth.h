// Bearer-token authentication for the REST API.
//
// Tokens come from a file: one token per line, surrounding whitespace
// ignored, blank lines and lines starting with `#` skipped. The file is
// re-read when its mtime (or size) changes, checked at most once a second, so
// tokens can be rotated without a restart. A reload that fails (file gone,
// unreadable) keeps the previous tokens and logs a warning: a rotation
// mistake neither locks everyone out nor opens the API. A file with no tokens
// rejects every request.
//
// Comparison is constant-time in the presented token: its SHA-256 is compared
// with each stored token's digest (CRYPTO_memcmp), always against all of them.
//
// With no token file configured, authentication is off (the server logs a
// warning at startup) and every request is allowed.
//
// Thread safety: all methods may be called from any thread; the token set is
// guarded by mu_.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <mutex>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

class TokenAuth {
 public:
  // `token_file` empty = auth off.
  explicit TokenAuth(std::string token_file);

  // Reads the file once. kNotFound / kIoError when it cannot be read (a
  // server should refuse to start rather than run with no tokens).
  Status load();
  bool enabled() const { return !path_.empty(); }

  // Checks an `Authorization` header value ("Bearer <token>", scheme
  // case-insensitive). Always true when auth is off. Reloads the file first
  // when it changed (at most once a second).
  bool check_header(const std::string& authorization);
  // Checks a bare token.
  bool check_token(const std::string& token);

  // Tokens currently loaded (for logs and tests).
  size_t size() const;

 private:
  using Digest = std::array<unsigned char, 32>;
  void maybe_reload();
  Status read_file(std::vector<Digest>* out, std::timespec* mtime, int64_t* size) const;

  const std::string path_;
  mutable std::mutex mu_;
  std::vector<Digest> digests_;                       // guarded by mu_
  std::timespec mtime_{};                             // guarded by mu_
  int64_t size_ = -1;                                 // guarded by mu_
  std::chrono::steady_clock::time_point last_check_;  // guarded by mu_
};

}  // namespace qcal

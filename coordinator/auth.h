// Bearer-token authentication for the REST API.
//
// Tokens come from a file: one token per line, surrounding whitespace
// ignored, blank lines and lines starting with `#` skipped. The file is
// re-read when its mtime (or size) changes, checked at most once a second, so
// tokens can be rotated without a restart (write the new file under another
// name and rename it over the old one, so no check sees it half written).
// Deleting or emptying the file revokes every token, as does a file that
// cannot be read: the API then refuses every request (401) until the file
// holds tokens again. Revocation is logged once, as an error; it is never
// silent, and a rotation mistake never opens the API.
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
#include <optional>
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
  // Like check_header, but names who is asking: the accepted token's id,
  // "t-" + the first 16 hex digits of its SHA-256 (stable across reloads,
  // safe to log and to store); "anonymous" when auth is off; nullopt when
  // the header is missing, malformed or its token is not in the file.
  std::optional<std::string> identify(const std::string& authorization);

  // Tokens currently loaded (for logs and tests).
  size_t size() const;

 private:
  using Digest = std::array<unsigned char, 32>;
  void maybe_reload();
  void revoke_locked(const std::string& why);  // mu_ held
  // Whether `token` is loaded (constant time: compared with every stored
  // digest); `digest` receives its SHA-256.
  bool match(const std::string& token, Digest* digest);
  Status read_file(std::vector<Digest>* out, std::timespec* mtime, int64_t* size) const;

  const std::string path_;
  mutable std::mutex mu_;
  std::vector<Digest> digests_;                       // guarded by mu_
  std::timespec mtime_{};                             // guarded by mu_
  int64_t size_ = -1;                                 // guarded by mu_
  std::chrono::steady_clock::time_point last_check_;  // guarded by mu_
  bool loaded_ = false;                               // guarded by mu_
  bool revoked_ = false;  // the file is gone or unreadable; guarded by mu_
};

}  // namespace qcal

#include "coordinator/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/log.h"

namespace qcal {

namespace {

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

}  // namespace

TokenAuth::TokenAuth(std::string token_file) : path_(std::move(token_file)) {}

Status TokenAuth::read_file(std::vector<Digest>* out, std::timespec* mtime, int64_t* size) const {
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) {
    if (errno == ENOENT) return not_found("token file " + path_ + " does not exist");
    return io_error("token file " + path_ + ": " + std::strerror(errno));
  }
  std::ifstream in(path_);
  if (!in) return io_error("token file " + path_ + ": cannot open");
  std::string line;
  out->clear();
  while (std::getline(in, line)) {
    std::string t = trim(line);
    if (t.empty() || t[0] == '#') continue;
    Digest d;
    SHA256(reinterpret_cast<const unsigned char*>(t.data()), t.size(), d.data());
    out->push_back(d);
  }
  if (in.bad()) return io_error("token file " + path_ + ": read error");
  *mtime = st.st_mtim;
  *size = static_cast<int64_t>(st.st_size);
  return Status::ok();
}

Status TokenAuth::load() {
  if (!enabled()) return Status::ok();
  std::vector<Digest> d;
  std::timespec mtime{};
  int64_t size = 0;
  QCAL_RETURN_IF_ERROR(read_file(&d, &mtime, &size));
  if (d.empty()) LOG_WARN << "token file " << path_ << " holds no tokens: every request is refused";
  std::lock_guard<std::mutex> lock(mu_);
  digests_ = std::move(d);
  mtime_ = mtime;
  size_ = size;
  loaded_ = true;
  revoked_ = false;
  last_check_ = std::chrono::steady_clock::now();
  return Status::ok();
}

void TokenAuth::revoke_locked(const std::string& why) {
  if (!revoked_)
    LOG_ERROR << why << ": every token is revoked; the API refuses all requests until " << path_
              << " holds tokens again";
  revoked_ = true;
  digests_.clear();
  mtime_ = {};
  size_ = -1;  // whatever appears next is read
}

void TokenAuth::maybe_reload() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  if (loaded_ && now - last_check_ < std::chrono::seconds(1)) return;
  loaded_ = true;
  last_check_ = now;
  struct stat st {};
  if (::stat(path_.c_str(), &st) != 0) {
    revoke_locked("token file " + path_ + ": " + std::strerror(errno));
    return;
  }
  if (st.st_mtim.tv_sec == mtime_.tv_sec && st.st_mtim.tv_nsec == mtime_.tv_nsec &&
      static_cast<int64_t>(st.st_size) == size_)
    return;
  std::vector<Digest> d;
  std::timespec mtime{};
  int64_t size = 0;
  Status s = read_file(&d, &mtime, &size);
  if (!s.is_ok()) {
    revoke_locked(s.message());
    return;
  }
  if (d.empty()) {
    revoke_locked("token file " + path_ + " holds no tokens");
    mtime_ = mtime;  // an empty file stays revoked until it changes
    size_ = size;
    return;
  }
  LOG_INFO << "token file " << path_ << " reloaded: " << d.size() << " token(s)";
  revoked_ = false;
  digests_ = std::move(d);
  mtime_ = mtime;
  size_ = size;
}

bool TokenAuth::match(const std::string& token, Digest* digest) {
  maybe_reload();
  Digest& d = *digest;
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), d.data());
  std::lock_guard<std::mutex> lock(mu_);
  int match = 0;
  for (const Digest& t : digests_) match |= CRYPTO_memcmp(t.data(), d.data(), d.size()) == 0;
  return match != 0;
}

bool TokenAuth::check_token(const std::string& token) {
  if (!enabled()) return true;
  Digest d;
  return match(token, &d);
}

std::optional<std::string> TokenAuth::identify(const std::string& authorization) {
  if (!enabled()) return std::string("anonymous");
  const std::string h = trim(authorization);
  static const char kScheme[] = "bearer ";
  if (h.size() <= sizeof(kScheme) - 1) return std::nullopt;
  for (size_t i = 0; i + 1 < sizeof(kScheme); ++i) {
    if (std::tolower(static_cast<unsigned char>(h[i])) != kScheme[i]) return std::nullopt;
  }
  const std::string token = trim(h.substr(sizeof(kScheme) - 1));
  Digest d;
  if (!match(token, &d)) return std::nullopt;
  static const char* kHex = "0123456789abcdef";
  std::string id = "t-";
  for (int b = 0; b < 8; ++b) {
    id += kHex[d[b] >> 4];
    id += kHex[d[b] & 15];
  }
  return id;
}

bool TokenAuth::check_header(const std::string& authorization) {
  return identify(authorization).has_value();
}

size_t TokenAuth::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return digests_.size();
}

}  // namespace qcal

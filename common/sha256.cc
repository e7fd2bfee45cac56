#include "common/sha256.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "common/path_policy.h"

namespace qcal {

struct Sha256::Impl {
  EVP_MD_CTX* ctx = nullptr;
};

Sha256::Sha256() : impl_(std::make_unique<Impl>()) {
  impl_->ctx = EVP_MD_CTX_new();
  // Allocation failure or a libcrypto without SHA-256 are not recoverable.
  QCAL_CHECK(impl_->ctx != nullptr);
  QCAL_CHECK(EVP_DigestInit_ex(impl_->ctx, EVP_sha256(), nullptr) == 1);
}

Sha256::~Sha256() { EVP_MD_CTX_free(impl_->ctx); }

void Sha256::update(const void* data, size_t n) {
  QCAL_CHECK_MSG(digest_.empty(), "Sha256::update after hex_digest");
  if (n == 0) return;
  QCAL_CHECK(EVP_DigestUpdate(impl_->ctx, data, n) == 1);
  bytes_ += n;
}

std::string Sha256::hex_digest() {
  if (!digest_.empty()) return digest_;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  QCAL_CHECK(EVP_DigestFinal_ex(impl_->ctx, md, &len) == 1 && len == 32);
  static const char* kHex = "0123456789abcdef";
  digest_.resize(2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    digest_[2 * i] = kHex[md[i] >> 4];
    digest_[2 * i + 1] = kHex[md[i] & 15];
  }
  return digest_;
}

std::string sha256_hex(std::string_view bytes) {
  Sha256 h;
  h.update(bytes);
  return h.hex_digest();
}

Result<FileDigest> sha256_file(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(int fd, open_input_file(path));
  Sha256 h;
  std::vector<char> buf(4u << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return io_error(path + ": read: " + std::strerror(err));
    }
    if (n == 0) break;
    h.update(buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return FileDigest{h.hex_digest(), h.bytes()};
}

}  // namespace qcal

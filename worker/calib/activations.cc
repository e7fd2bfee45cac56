#include "worker/calib/activations.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/grad.h"

namespace qcal::calib {

namespace {
Status check_range(const ActivationSource& s, int64_t s0, int64_t n) {
  if (s0 < 0 || n < 0 || s0 + n > s.sequences())
    return invalid_input("activations: sequences [" + std::to_string(s0) + ", " +
                         std::to_string(s0 + n) + ") outside [0, " +
                         std::to_string(s.sequences()) + ")");
  return Status::ok();
}
}  // namespace

Status MemoryActivations::read(int64_t s0, int64_t n, float* out) const {
  QCAL_RETURN_IF_ERROR(check_range(*this, s0, n));
  const int64_t e = T_ * H_;
  if (n > 0) std::memcpy(out, x_.data() + s0 * e, static_cast<size_t>(n * e) * sizeof(float));
  return Status::ok();
}

Status MemoryActivations::append(const float* x, int64_t n) {
  x_.insert(x_.end(), x, x + n * T_ * H_);
  return Status::ok();
}

Result<std::unique_ptr<ScratchActivations>> ScratchActivations::create(const std::string& dir,
                                                                      int64_t T, int64_t H) {
  // O_TMPFILE: an unnamed file in `dir`, gone when closed.
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    // Filesystems without O_TMPFILE: a named file, unlinked at once.
    std::string path = dir + "/.qcal-scratch.XXXXXX";
    fd = ::mkstemp(path.data());
    if (fd < 0) return io_error(dir + ": cannot create a scratch file: " + std::strerror(errno));
    ::unlink(path.c_str());
  }
  return std::unique_ptr<ScratchActivations>(new ScratchActivations(fd, dir, T, H));
}

ScratchActivations::~ScratchActivations() {
  if (fd_ >= 0) ::close(fd_);
}

Status ScratchActivations::append(const float* x, int64_t n) {
  const char* p = reinterpret_cast<const char*>(x);
  size_t left = static_cast<size_t>(n * T_ * H_) * sizeof(float);
  off_t off = static_cast<off_t>(n_ * T_ * H_) * static_cast<off_t>(sizeof(float));
  while (left > 0) {
    const ssize_t w = ::pwrite(fd_, p, left, off);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      if (err == ENOSPC || err == EDQUOT)
        return resource_exhausted(dir_ + ": scratch file: " + std::strerror(err));
      return io_error(dir_ + ": scratch file: " + std::strerror(err));
    }
    p += w;
    off += w;
    left -= static_cast<size_t>(w);
  }
  n_ += n;
  return Status::ok();
}

Status ScratchActivations::read(int64_t s0, int64_t n, float* out) const {
  QCAL_RETURN_IF_ERROR(check_range(*this, s0, n));
  char* p = reinterpret_cast<char*>(out);
  size_t left = static_cast<size_t>(n * T_ * H_) * sizeof(float);
  off_t off = static_cast<off_t>(s0 * T_ * H_) * static_cast<off_t>(sizeof(float));
  while (left > 0) {
    const ssize_t r = ::pread(fd_, p, left, off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return io_error(dir_ + ": scratch file: " + std::strerror(errno));
    }
    if (r == 0) return io_error(dir_ + ": scratch file truncated");
    p += r;
    off += r;
    left -= static_cast<size_t>(r);
  }
  return Status::ok();
}

Status ShardSource::read(int64_t s0, int64_t n, float* out) const {
  QCAL_RETURN_IF_ERROR(check_range(*this, s0, n));
  return base_->read(begin_ + s0, n, out);
}

void rotate_rows(float* x, int64_t rows, int64_t H, const std::vector<double>& R) {
  if (R.empty() || rows == 0) return;
  std::vector<double> a(x, x + rows * H), out(static_cast<size_t>(rows * H));
  gemm_t(false, false, rows, H, H, 1.0, a.data(), H, R.data(), H, 0.0, out.data(), H);
  for (int64_t i = 0; i < rows * H; ++i) x[i] = static_cast<float>(out[static_cast<size_t>(i)]);
}

Status RotatedSource::read(int64_t s0, int64_t n, float* out) const {
  QCAL_RETURN_IF_ERROR(base_->read(s0, n, out));
  if (R_) rotate_rows(out, n * seqlen(), width(), *R_);
  return Status::ok();
}

}  // namespace qcal::calib

#include "common/fsutil.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace qcal {
namespace fs = std::filesystem;

namespace {
std::string errno_str() { return std::strerror(errno); }
}  // namespace

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(path + ": cannot open: " + errno_str());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return io_error(path + ": read failed");
  return ss.str();
}

Status fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return io_error(path + ": open for fsync: " + errno_str());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL) return io_error(path + ": fsync: " + std::strerror(err));
  return Status::ok();
}

Status write_file_atomic(const std::string& path, std::string_view bytes) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return io_error(tmp + ": create: " + errno_str());
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      Status s = io_error(tmp + ": write: " + errno_str());
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return io_error(tmp + ": fsync/close: " + errno_str());
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    Status s = io_error(path + ": rename: " + errno_str());
    ::unlink(tmp.c_str());
    return s;
  }
  fs::path parent = fs::path(path).parent_path();
  return fsync_path(parent.empty() ? "." : parent.string());
}

Result<std::string> make_staging_dir(const std::string& final_dir) {
  std::string dir = final_dir;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  std::string staging = dir + ".partial." + std::to_string(::getpid());
  std::error_code ec;
  fs::remove_all(staging, ec);
  fs::path parent = fs::path(dir).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  if (!fs::create_directory(staging, ec))
    return io_error(staging + ": cannot create staging directory: " + ec.message());
  return staging;
}

Status publish_dir(const std::string& staging_dir, const std::string& final_dir_in,
                   bool overwrite) {
  std::string final_dir = final_dir_in;
  while (final_dir.size() > 1 && final_dir.back() == '/') final_dir.pop_back();
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(staging_dir, ec)) {
    if (e.is_regular_file()) QCAL_RETURN_IF_ERROR(fsync_path(e.path().string()));
  }
  if (ec) return io_error(staging_dir + ": list: " + ec.message());
  QCAL_RETURN_IF_ERROR(fsync_path(staging_dir));
  std::string aside;
  if (fs::exists(final_dir, ec)) {
    if (!overwrite)
      return invalid_input(final_dir + ": output exists (pass --overwrite to replace it)");
    aside = final_dir + ".old." + std::to_string(::getpid());
    fs::remove_all(aside, ec);
    if (::rename(final_dir.c_str(), aside.c_str()) != 0)
      return io_error(final_dir + ": move aside: " + errno_str());
  }
  if (::rename(staging_dir.c_str(), final_dir.c_str()) != 0)
    return io_error(final_dir + ": rename from " + staging_dir + ": " + errno_str());
  fs::path parent = fs::path(final_dir).parent_path();
  QCAL_RETURN_IF_ERROR(fsync_path(parent.empty() ? "." : parent.string()));
  if (!aside.empty()) fs::remove_all(aside, ec);
  return Status::ok();
}

bool path_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

bool is_directory(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

std::string join_path(const std::string& a, const std::string& b) {
  return (fs::path(a) / b).string();
}

}  // namespace qcal

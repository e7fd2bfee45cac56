#include "common/fsutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "common/output_manifest.h"
#include "common/path_policy.h"

namespace qcal {
namespace fs = std::filesystem;

namespace {
std::string errno_str() { return std::strerror(errno); }

double now_s() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

std::string strip_slashes(std::string d) {
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return d;
}

std::string parent_or_dot(const std::string& p) {
  fs::path parent = fs::path(p).parent_path();
  return parent.empty() ? "." : parent.string();
}
}  // namespace

Result<std::string> read_file(const std::string& path, size_t max_bytes) {
  QCAL_ASSIGN_OR_RETURN(int fd, open_input_file(path));
  std::string out;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const Status s = io_error(path + ": read failed: " + errno_str());
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    if (out.size() + static_cast<size_t>(n) > max_bytes) {
      ::close(fd);
      return invalid_input(path + ": larger than " + std::to_string(max_bytes) + " bytes");
    }
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

Status fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return io_error(path + ": open for fsync: " + errno_str());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL) return io_error(path + ": fsync: " + std::strerror(err));
  return Status::ok();
}

Status write_file_atomic(const std::string& path, std::string_view bytes) {
  QCAL_RETURN_IF_ERROR(check_process_write(path));
  std::string tmp = path + ".tmp." + staging_tag();
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
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
  return fsync_path(parent_or_dot(path));
}

std::string staging_tag() {
  static const std::string host = [] {
    char h[256] = {0};
    if (::gethostname(h, sizeof h - 1) != 0) std::snprintf(h, sizeof h, "host");
    std::string s(h);
    for (char& c : s)
      if (c == '.' || c == '/' || c == '-') c = '_';
    return s.empty() ? std::string("host") : s;
  }();
  return host + "-" + std::to_string(::getpid());
}

Result<std::string> make_staging_dir(const std::string& final_dir) {
  const std::string dir = strip_slashes(final_dir);
  std::string staging = dir + ".partial." + staging_tag();
  QCAL_RETURN_IF_ERROR(check_process_write(staging));
  std::error_code ec;
  fs::remove_all(staging, ec);
  fs::path parent = fs::path(dir).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  if (!fs::create_directory(staging, ec))
    return io_error(staging + ": cannot create staging directory: " + ec.message());
  return staging;
}

int rename_noreplace(const std::string& from, const std::string& to) {
  return ::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0 ? 0
                                                                                          : errno;
}

int rename_exchange(const std::string& a, const std::string& b) {
  return ::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) == 0 ? 0 : errno;
}

Status publish_dir(const std::string& staging_dir, const std::string& final_dir_in, bool overwrite,
                   const OutputManifest* manifest) {
  const std::string final_dir = strip_slashes(final_dir_in);
  QCAL_RETURN_IF_ERROR(check_process_write(final_dir));
  std::error_code ec;
  // The manifest last: its presence means everything else is complete.
  OutputManifest plain;
  plain.writer = "qcal";
  plain.published_at = now_s();
  QCAL_RETURN_IF_ERROR(write_output_manifest(staging_dir, manifest ? *manifest : plain));
  for (const auto& e : fs::directory_iterator(staging_dir, ec)) {
    if (e.is_regular_file()) QCAL_RETURN_IF_ERROR(fsync_path(e.path().string()));
  }
  if (ec) return io_error(staging_dir + ": list: " + ec.message());
  QCAL_RETURN_IF_ERROR(fsync_path(staging_dir));
  int err = rename_noreplace(staging_dir, final_dir);
  if (err == EINVAL || err == ENOSYS) {
    // No RENAME_NOREPLACE here: a plain rename when nothing is in the way.
    struct stat st {};
    if (::lstat(final_dir.c_str(), &st) != 0)
      err = ::rename(staging_dir.c_str(), final_dir.c_str()) == 0 ? 0 : errno;
    else
      err = EEXIST;
  }
  if (err == EEXIST || err == ENOTEMPTY) {
    struct stat st {};
    if (::lstat(final_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
      return invalid_input(final_dir + ": exists and is not a directory");
    if (!overwrite)
      return invalid_input(final_dir + ": output exists (pass --overwrite to replace it)");
    auto old = read_output_manifest(final_dir);
    if (!old.is_ok())
      return permission_denied(final_dir + ": exists and is not a directory qcal published (" +
                               (old.status().code() == Code::kNotFound
                                    ? std::string("no ") + kOutputManifestName
                                    : old.status().message()) +
                               "); remove it yourself, qcal replaces only its own outputs");
    err = rename_exchange(staging_dir, final_dir);
    if (err == 0) {
      fs::remove_all(staging_dir, ec);  // now the old output
    } else if (err == EINVAL || err == ENOSYS) {
      const std::string aside = final_dir + ".old." + staging_tag();
      fs::remove_all(aside, ec);
      if (::rename(final_dir.c_str(), aside.c_str()) != 0)
        return io_error(final_dir + ": move aside: " + errno_str());
      if (::rename(staging_dir.c_str(), final_dir.c_str()) != 0)
        return io_error(final_dir + ": rename from " + staging_dir + ": " + errno_str());
      fs::remove_all(aside, ec);
    } else {
      return io_error(final_dir + ": exchange with " + staging_dir + ": " + std::strerror(err));
    }
  } else if (err != 0) {
    return io_error(final_dir + ": rename from " + staging_dir + ": " + std::strerror(err));
  }
  return fsync_path(parent_or_dot(final_dir));
}

namespace {

constexpr const char* kMarkers[] = {".partial.", ".old.", ".tmp.", ".qcal-stage.",
                                    ".qcal-transformed."};

// The owner of a staging entry: host ("" when the tag has none) and pid; false
// when the name carries no marker.
bool staging_owner(const std::string& name, std::string* host, long* pid) {
  for (const char* m : kMarkers) {
    const size_t at = name.rfind(m);
    if (at == std::string::npos) continue;
    std::string tag = name.substr(at + std::strlen(m));
    tag = tag.substr(0, tag.find('.'));
    const size_t dash = tag.rfind('-');
    const std::string digits = dash == std::string::npos ? tag : tag.substr(dash + 1);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    *host = dash == std::string::npos ? "" : tag.substr(0, dash);
    *pid = std::strtol(digits.c_str(), nullptr, 10);
    return true;
  }
  return false;
}

bool pid_alive(long pid) {
  return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
}

void sweep(const std::string& dir, int depth, double stale_after_s, const std::string& my_host,
           double now, SweepReport* rep) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;
  std::vector<std::pair<std::string, bool>> entries;  // name, is a real directory
  while (struct dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    struct stat st {};
    if (::lstat((dir + "/" + name).c_str(), &st) != 0) continue;
    entries.push_back({name, S_ISDIR(st.st_mode)});
  }
  ::closedir(d);
  for (const auto& [name, is_dir] : entries) {
    const std::string p = dir + "/" + name;
    std::string host;
    long pid = 0;
    if (staging_owner(name, &host, &pid)) {
      struct stat st {};
      if (::lstat(p.c_str(), &st) != 0) continue;
      const double age = now - static_cast<double>(st.st_mtime);
      const bool stale =
          host == my_host ? !pid_alive(pid) : (stale_after_s >= 0 && age > stale_after_s);
      if (stale) {
        const uint64_t bytes = is_dir ? tree_bytes(p) : static_cast<uint64_t>(st.st_size);
        std::error_code ec;
        const auto n = fs::remove_all(p, ec);
        if (!ec && n > 0) {
          rep->entries += 1;
          rep->bytes += bytes;
        }
        continue;
      }
    }
    if (is_dir && depth > 0) sweep(p, depth - 1, stale_after_s, my_host, now, rep);
  }
}

}  // namespace

SweepReport sweep_stale_staging(const std::string& dir, int depth, double stale_after_s) {
  SweepReport rep;
  const std::string tag = staging_tag();
  sweep(strip_slashes(dir), depth, stale_after_s, tag.substr(0, tag.rfind('-')), now_s(), &rep);
  return rep;
}

uint64_t tree_bytes(const std::string& dir) {
  uint64_t n = 0;
  std::error_code ec;
  for (auto it =
           fs::recursive_directory_iterator(dir, fs::directory_options::skip_permission_denied, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_symlink(ec)) {
      it.disable_recursion_pending();
      continue;
    }
    if (it->is_regular_file(ec)) n += it->file_size(ec);
  }
  return n;
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

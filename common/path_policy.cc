#include "common/path_policy.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <utility>

#include "common/limits.h"
#include "common/output_manifest.h"

namespace qcal {

namespace fs = std::filesystem;

namespace {

std::deque<std::string> components(const std::string& p) {
  std::deque<std::string> out;
  size_t i = 0;
  while (i <= p.size()) {
    size_t j = p.find('/', i);
    if (j == std::string::npos) j = p.size();
    if (j > i) out.push_back(p.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

std::string parent_of(const std::string& p) {  // p absolute, "" = "/"
  const size_t k = p.rfind('/');
  return k == std::string::npos || k == 0 ? std::string() : p.substr(0, k);
}

const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISLNK(m)) return "a symbolic link";
  return "not a regular file";
}

std::string join_roots(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& r : v) s += (s.empty() ? "" : ", ") + r;
  return s.empty() ? "(none)" : s;
}

std::string make_absolute(const std::string& path) {
  if (!path.empty() && path[0] == '/') return path;
  std::error_code ec;
  return fs::absolute(path, ec).string();
}

// The file an open descriptor refers to, or "" when /proc is unavailable.
std::string fd_path(int fd) {
  char link[64], buf[PATH_MAX + 1];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = ::readlink(link, buf, PATH_MAX);
  if (n <= 0) return "";
  return std::string(buf, static_cast<size_t>(n));
}

std::atomic<std::shared_ptr<const PathPolicy>>& policy_slot() {
  static std::atomic<std::shared_ptr<const PathPolicy>> slot;
  return slot;
}

}  // namespace

Result<ResolvedPath> resolve_path(const std::string& path) {
  if (path.empty() || path[0] != '/')
    return invalid_input("'" + path + "' is not an absolute path");
  std::deque<std::string> todo = components(path);
  std::string cur;  // "" = "/"
  bool exists = true;
  int links = 0;
  auto more = [&] {
    for (const auto& c : todo)
      if (c != ".") return true;
    return false;
  };
  while (!todo.empty()) {
    std::string c = std::move(todo.front());
    todo.pop_front();
    if (c == ".") continue;
    if (c == "..") {
      cur = parent_of(cur);
      continue;
    }
    std::string next = cur + "/" + c;
    if (!exists) {
      cur = std::move(next);
      continue;
    }
    struct stat st {};
    if (::lstat(next.c_str(), &st) != 0) {
      exists = false;
      cur = std::move(next);
      continue;
    }
    if (S_ISLNK(st.st_mode)) {
      if (++links > 40) return invalid_input(path + ": too many levels of symbolic links");
      char buf[PATH_MAX + 1];
      const ssize_t n = ::readlink(next.c_str(), buf, PATH_MAX);
      if (n <= 0) {
        exists = false;
        cur = std::move(next);
        continue;
      }
      const std::string target(buf, static_cast<size_t>(n));
      std::deque<std::string> parts = components(target);
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) todo.push_front(*it);
      if (target[0] == '/') cur.clear();
      continue;
    }
    if (!S_ISDIR(st.st_mode) && more()) exists = false;  // ENOTDIR: the rest cannot exist
    cur = std::move(next);
  }
  return ResolvedPath{cur.empty() ? "/" : cur, exists};
}

bool path_within(const std::string& path, const std::string& root) {
  if (root == "/") return !path.empty() && path[0] == '/';
  return path == root || (path.size() > root.size() && path.compare(0, root.size(), root) == 0 &&
                          path[root.size()] == '/');
}

// ------------------------------------------------------------------ PathPolicy

Result<PathPolicy> PathPolicy::make(const std::vector<std::string>& read_roots,
                                    const std::vector<std::string>& write_roots,
                                    const std::string& store_root) {
  PathPolicy p;
  auto canon = [](const std::string& flag, const std::string& r,
                  std::vector<std::string>* out) -> Status {
    if (r.empty()) return invalid_input(flag + ": empty directory");
    char buf[PATH_MAX + 1];
    if (!::realpath(r.c_str(), buf))
      return invalid_input(flag + " " + r + ": " + std::strerror(errno));
    struct stat st {};
    if (::stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
      return invalid_input(flag + " " + r + ": not a directory");
    std::string c(buf);
    for (const auto& e : *out)
      if (e == c) return Status::ok();
    out->push_back(c);
    return Status::ok();
  };
  for (const auto& r : read_roots) QCAL_RETURN_IF_ERROR(canon("--allow-read", r, &p.read_));
  for (const auto& r : write_roots) QCAL_RETURN_IF_ERROR(canon("--allow-write", r, &p.write_));
  if (!store_root.empty()) {
    std::error_code ec;
    fs::create_directories(store_root, ec);
    std::vector<std::string> s;
    QCAL_RETURN_IF_ERROR(canon("--store", store_root, &s));
    p.store_ = s[0];
  }
  return p;
}

PathPolicy PathPolicy::unconfined() {
  PathPolicy p;
  p.confined_ = false;
  return p;
}

bool PathPolicy::in_store(const std::string& resolved) const {
  return !store_.empty() && path_within(resolved, store_);
}

bool PathPolicy::readable(const std::string& resolved) const {
  if (in_store(resolved)) return false;
  if (!confined_) return true;
  for (const auto& r : read_)
    if (path_within(resolved, r)) return true;
  for (const auto& r : write_)
    if (path_within(resolved, r)) return true;
  return false;
}

bool PathPolicy::writable(const std::string& resolved) const {
  if (in_store(resolved)) return false;
  if (!confined_) return true;
  for (const auto& r : write_)
    if (path_within(resolved, r) && resolved != r) return true;
  return false;
}

std::string PathPolicy::describe() const {
  if (!confined_) return "unconfined";
  return "--allow-read " + join_roots(read_) + "; --allow-write " + join_roots(write_) +
         "; store " + (store_.empty() ? "-" : store_);
}

Status PathPolicy::outside(const std::string& field, const std::string& path, bool write) const {
  std::string msg = field + ": " + path + " is outside the directories this server may " +
                    (write ? "write (--allow-write)" : "read (--allow-read)");
  if ((write && write_.empty()) || (!write && read_.empty() && write_.empty()))
    msg += "; none are configured: start qcal-coordinator and qcal-worker with " +
           std::string(write ? "--allow-write DIR" : "--allow-read DIR");
  return permission_denied(msg);
}

Result<ResolvedPath> PathPolicy::absolute(const std::string& field, const std::string& path) const {
  if (path.empty()) return invalid_input(field + ": must not be empty");
  if (path.size() > limits::kMaxPathBytes)
    return invalid_input(field + ": longer than " + std::to_string(limits::kMaxPathBytes) +
                         " bytes");
  if (path.find('\0') != std::string::npos) return invalid_input(field + ": contains a NUL byte");
  if (confined_ && path[0] != '/')
    return invalid_input(field + ": must be an absolute path (got '" + path +
                         "'): the coordinator and the workers may run in different directories");
  auto r = resolve_path(make_absolute(path));
  if (!r.is_ok()) return r.status().with_context(field);
  return r;
}

Result<std::string> PathPolicy::check_data_file(const std::string& field,
                                                const std::string& path) const {
  QCAL_ASSIGN_OR_RETURN(ResolvedPath r, absolute(field, path));
  if (in_store(r.path))
    return permission_denied(field + ": " + path + " is inside qcal's artifact store");
  if (!readable(r.path)) return outside(field, path, false);
  if (!r.exists) return not_found(field + ": " + path + " does not exist");
  struct stat st {};
  if (::stat(r.path.c_str(), &st) != 0)
    return not_found(field + ": " + path + " cannot be read: " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    return invalid_input(field + ": " + path + " is " + kind_of(st.st_mode) +
                         ", not a regular file");
  return r.path;
}

Result<std::string> PathPolicy::check_model_dir(const std::string& field,
                                                const std::string& dir) const {
  QCAL_ASSIGN_OR_RETURN(ResolvedPath r, absolute(field, dir));
  if (in_store(r.path))
    return permission_denied(field + ": " + dir + " is inside qcal's artifact store");
  if (!readable(r.path)) return outside(field, dir, false);
  if (!r.exists) return not_found(field + ": " + dir + ": model directory does not exist");
  struct stat st {};
  if (::stat(r.path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return invalid_input(field + ": " + dir + " is not a directory");
  // Every file the engine may read or copy (config, weights, index, tokenizer
  // and generation files) must be a regular file inside the roots.
  DIR* d = ::opendir(r.path.c_str());
  if (!d) return io_error(field + ": " + dir + ": cannot list: " + std::strerror(errno));
  Status bad;
  size_t entries = 0;
  bool has_config = false;
  constexpr size_t kMaxEntries = 100000;
  while (struct dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (++entries > kMaxEntries) {
      bad = invalid_input(field + ": " + dir + " holds more than " + std::to_string(kMaxEntries) +
                          " entries");
      break;
    }
    const std::string p = r.path + "/" + name;
    struct stat lst {};
    if (::lstat(p.c_str(), &lst) != 0) continue;
    if (S_ISDIR(lst.st_mode)) continue;  // subdirectories are never read
    auto t = resolve_path(p);
    if (!t.is_ok() || !readable(t->path)) {
      bad = permission_denied(field + ": " + dir + "/" + name +
                              " links outside the directories this server may read");
      break;
    }
    if (!t->exists) {
      bad = not_found(field + ": " + dir + "/" + name + " is a dangling symbolic link");
      break;
    }
    struct stat tst {};
    if (::stat(t->path.c_str(), &tst) != 0 || !S_ISREG(tst.st_mode)) {
      if (S_ISDIR(tst.st_mode)) continue;  // a symlinked subdirectory: never read
      bad = invalid_input(field + ": " + dir + "/" + name + " is " + kind_of(tst.st_mode) +
                          ", not a regular file");
      break;
    }
    if (name == "config.json") has_config = true;
  }
  ::closedir(d);
  QCAL_RETURN_IF_ERROR(bad);
  if (!has_config) return not_found(field + ": " + dir + "/config.json: missing config.json");
  return r.path;
}

Result<std::string> PathPolicy::check_output(const std::string& field, const std::string& path,
                                             bool overwrite, const std::vector<std::string>& inputs,
                                             const std::string& job_id) const {
  QCAL_ASSIGN_OR_RETURN(ResolvedPath r, absolute(field, path));
  if (in_store(r.path))
    return permission_denied(field + ": " + path + " is inside qcal's artifact store");
  if (!store_.empty() && path_within(store_, r.path))
    return permission_denied(field + ": " + path + " contains qcal's artifact store");
  if (confined_) {
    for (const auto* roots : {&read_, &write_})
      for (const auto& root : *roots)
        if (path_within(root, r.path))
          return permission_denied(field + ": " + path + " is or contains the allowed root " +
                                   root + "; name a directory inside a --allow-write root");
    if (!writable(r.path)) return outside(field, path, true);
  } else if (r.path == "/") {
    return permission_denied(field + ": / cannot be an output directory");
  }
  for (const std::string& in : inputs) {
    if (in.empty()) continue;
    if (path_within(in, r.path) || path_within(r.path, in))
      return invalid_input(field + ": " + path + " overlaps the job's input " + in);
  }
  // The nearest existing ancestor must be a directory we may create entries in.
  std::string a = parent_of(r.path);
  while (!a.empty()) {
    struct stat st {};
    if (::lstat(a.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode))
        return invalid_input(field + ": " + path + ": " + a + " is not a directory");
      break;
    }
    a = parent_of(a);
  }
  if (a.empty()) a = "/";
  if (::access(a.c_str(), W_OK | X_OK) != 0)
    return invalid_input(field + ": " + path + ": directory " + a + " is not writable");
  if (r.exists) {
    struct stat st {};
    if (::lstat(r.path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
      return invalid_input(field + ": " + path + " exists and is not a directory");
    auto m = read_output_manifest(r.path);
    if (!m.is_ok()) {
      const std::string why = m.status().code() == Code::kNotFound
                                  ? std::string("no ") + kOutputManifestName
                                  : m.status().message();
      return permission_denied(field + ": " + path +
                               " exists and is not a directory qcal published (" + why +
                               "); qcal replaces only its own outputs");
    }
    const bool own = !job_id.empty() && m->job == job_id;
    if (!own && !overwrite)
      return invalid_input(field + ": " + path + " exists (set output.overwrite to replace it)");
  }
  return r.path;
}

Result<JobSpec> PathPolicy::confine(const JobSpec& spec, const std::string& job_id) const {
  JobSpec s = spec;
  QCAL_ASSIGN_OR_RETURN(s.model, check_model_dir("model", spec.model));
  QCAL_ASSIGN_OR_RETURN(s.calib.path, check_data_file("calib.path", spec.calib.path));
  if (s.eval) {
    QCAL_ASSIGN_OR_RETURN(s.eval->path, check_data_file("eval.path", spec.eval->path));
  }
  std::vector<std::string> inputs = {s.model, s.calib.path};
  if (s.eval) inputs.push_back(s.eval->path);
  QCAL_ASSIGN_OR_RETURN(s.output.path, check_output("output.path", spec.output.path,
                                                    spec.output.overwrite, inputs, job_id));
  return s;
}

// ------------------------------------------------------------------ process policy

void set_process_path_policy(std::shared_ptr<const PathPolicy> p) {
  policy_slot().store(std::move(p));
}

std::shared_ptr<const PathPolicy> process_path_policy() { return policy_slot().load(); }

Result<int> open_input_file(const std::string& path) {
  const auto policy = process_path_policy();
  bool store_file = false;
  if (policy && policy->confined()) {
    // Before opening: a path outside the roots is refused whether or not it
    // exists (the error must not tell which).
    auto r = resolve_path(make_absolute(path));
    if (!r.is_ok()) return r.status();
    store_file = !policy->store_root().empty() && path_within(r->path, policy->store_root());
    if (!store_file && !policy->readable(r->path))
      return permission_denied(path + ": outside the directories this process may read");
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) return not_found(path + ": does not exist");
    return io_error(path + ": cannot open: " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return io_error(path + ": fstat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_input(path + ": " + kind_of(st.st_mode) + ", not a regular file");
  }
  if (policy && policy->confined()) {
    // After opening: what the descriptor refers to, whatever was swapped in
    // between the check above and the open.
    const std::string real = fd_path(fd);
    const bool in_store = !policy->store_root().empty() && path_within(real, policy->store_root());
    if (!real.empty() && !in_store && !policy->readable(real)) {
      ::close(fd);
      return permission_denied(path + ": outside the directories this process may read");
    }
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) (void)::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

Status check_process_write(const std::string& path) {
  const auto policy = process_path_policy();
  if (!policy || !policy->confined()) return Status::ok();
  auto r = resolve_path(make_absolute(path));
  if (!r.is_ok()) return r.status();
  const bool in_store = !policy->store_root().empty() && path_within(r->path, policy->store_root());
  if (in_store || policy->writable(r->path)) return Status::ok();
  return permission_denied(path + ": outside the directories this process may write " +
                           "(--allow-write)");
}

Status copy_input_file(const std::string& from, const std::string& to) {
  QCAL_ASSIGN_OR_RETURN(int in, open_input_file(from));
  Status st = check_process_write(to);
  if (!st.is_ok()) {
    ::close(in);
    return st;
  }
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (out < 0) {
    const int err = errno;
    ::close(in);
    return io_error(to + ": create: " + std::strerror(err));
  }
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(in, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      st = io_error(from + ": read: " + std::strerror(errno));
      break;
    }
    if (n == 0) break;
    for (ssize_t off = 0; off < n;) {
      const ssize_t w = ::write(out, buf + off, static_cast<size_t>(n - off));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        st = io_error(to + ": write: " + std::strerror(errno));
        break;
      }
      off += w;
    }
    if (!st.is_ok()) break;
  }
  if (st.is_ok() && ::fsync(out) != 0) st = io_error(to + ": fsync: " + std::strerror(errno));
  ::close(in);
  if (::close(out) != 0 && st.is_ok()) st = io_error(to + ": close: " + std::strerror(errno));
  if (!st.is_ok()) ::unlink(to.c_str());
  return st;
}

}  // namespace qcal

#include "worker/artifacts.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/fsutil.h"
#include "common/safetensors.h"
#include "common/sha256.h"

namespace qcal {

// Artifacts store raw host bytes as safetensors' little-endian values.
static_assert(std::endian::native == std::endian::little, "artifacts assume a little-endian host");

namespace fs = std::filesystem;

namespace {

std::string errno_str(int err) { return std::strerror(err); }

bool is_hex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// A temporary name unique within the process (distinct threads may write
// artifacts next to each other).
std::string temp_name(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  return path + ".tmp." + staging_tag() + "." + std::to_string(counter++);
}

Status make_parent(const std::string& path) {
  std::error_code ec;
  fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  if (ec) return io_error(parent.string() + ": cannot create directory: " + ec.message());
  return Status::ok();
}

template <typename T>
std::string_view bytes_of(const std::vector<T>& v) {
  return std::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Copies a tensor's raw bytes into `out` after checking its dtype and shape.
template <typename T>
Status read_raw(const SafetensorsFile& f, const std::string& name, DType dtype,
                const std::vector<int64_t>& shape, std::vector<T>* out) {
  const TensorInfo* t = f.find(name);
  if (!t) return corrupt(f.path() + ": missing tensor '" + name + "'");
  if (t->dtype != dtype || t->shape != shape)
    return corrupt(f.path() + ": tensor '" + name + "' is " + dtype_name(t->dtype) +
                   shape_str(t->shape) + ", expected " + dtype_name(dtype) + shape_str(shape));
  std::string_view raw = f.raw(*t);
  out->resize(raw.size() / sizeof(T));
  if (!raw.empty()) std::memcpy(out->data(), raw.data(), raw.size());
  return Status::ok();
}

// Checks the magic and version in a file's metadata.
Status check_format(const SafetensorsFile& f, const char* format) {
  const auto& m = f.header().metadata;
  auto it = m.find("qcal.format");
  if (it == m.end() || it->second != format)
    return corrupt(f.path() + ": not a " + format + " artifact (qcal.format '" +
                   (it == m.end() ? std::string("<absent>") : it->second) + "')");
  auto v = m.find("qcal.version");
  const std::string want = std::to_string(kArtifactFormatVersion);
  if (v == m.end()) return corrupt(f.path() + ": " + format + " artifact without qcal.version");
  if (v->second != want)
    return invalid_input(f.path() + ": " + format + " version " + v->second +
                         " is not supported (this build reads version " + want + ")");
  return Status::ok();
}

}  // namespace

// ---------------------------------------------------------------- refs

nlohmann::json ArtifactRef::to_json() const {
  return {{"path", path}, {"sha256", sha256}, {"bytes", bytes}};
}

Result<ArtifactRef> ArtifactRef::from_json(const nlohmann::json& j) {
  if (!j.is_object()) return invalid_input("artifact ref: not an object: " + j.dump());
  if (!j.contains("path") || !j["path"].is_string() || !j.contains("sha256") ||
      !j["sha256"].is_string() || !j.contains("bytes") || !j["bytes"].is_number_unsigned())
    return invalid_input("artifact ref: needs string path, string sha256, unsigned bytes: " +
                         j.dump());
  ArtifactRef r;
  r.path = j["path"].get<std::string>();
  r.sha256 = j["sha256"].get<std::string>();
  r.bytes = j["bytes"].get<uint64_t>();
  if (r.path.empty() || r.path[0] == '/' || r.path.find("..") != std::string::npos)
    return invalid_input("artifact ref: path must be relative, without '..': '" + r.path + "'");
  if (!is_hex64(r.sha256))
    return invalid_input("artifact ref " + r.path + ": sha256 is not 64 lower-case hex digits");
  return r;
}

std::string task_artifact_path(const std::string& job, const std::string& task, int64_t attempt,
                               const std::string& name) {
  return "jobs/" + job + "/" + task + "/a" + std::to_string(attempt) + "/" + name;
}

// ---------------------------------------------------------------- store

ArtifactStore::ArtifactStore(std::string root) : root_(std::move(root)) {
  while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
}

std::string ArtifactStore::absolute(const std::string& rel) const { return join_path(root_, rel); }

Result<std::string> ArtifactStore::checked_path(const std::string& rel) const {
  if (rel.empty() || rel[0] == '/' || rel.find("..") != std::string::npos)
    return invalid_input("artifact path must be relative, without '..': '" + rel + "'");
  return absolute(rel);
}

Result<ArtifactRef> ArtifactStore::finish_ref(const std::string& rel,
                                              const std::string& path) const {
  QCAL_ASSIGN_OR_RETURN(FileDigest d, sha256_file(path));
  return ArtifactRef{rel, d.sha256, d.bytes};
}

Result<ArtifactRef> ArtifactStore::write_blob(const std::string& rel, std::string_view bytes) {
  QCAL_ASSIGN_OR_RETURN(std::string path, checked_path(rel));
  QCAL_RETURN_IF_ERROR(make_parent(path));
  const std::string tmp = temp_name(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return io_error(tmp + ": create: " + errno_str(errno));
  auto fail = [&](Status s) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      // A full disk is retried (kIoError): space comes back as old artifacts
      // are swept (coordinator/retention.h) and failed attempts cleaned.
      if (err == ENOSPC || err == EDQUOT)
        return fail(io_error(tmp + ": write: " + errno_str(err) + " (disk full)"));
      return fail(io_error(tmp + ": write: " + errno_str(err)));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) return fail(io_error(tmp + ": fsync: " + errno_str(errno)));
  if (fault_hook_) {
    Status s = fault_hook_(path);
    if (!s.is_ok()) return fail(s);
  }
  int rc = ::close(fd);
  fd = -1;
  if (rc != 0) return fail(io_error(tmp + ": close: " + errno_str(errno)));
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    return fail(io_error(path + ": rename from " + tmp + ": " + errno_str(errno)));
  QCAL_RETURN_IF_ERROR(fsync_path(fs::path(path).parent_path().string()));
  return ArtifactRef{rel, sha256_hex(bytes), bytes.size()};
}

Status ArtifactStore::verify(const ArtifactRef& ref) const {
  QCAL_ASSIGN_OR_RETURN(std::string path, checked_path(ref.path));
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    int err = errno;
    if (err == ENOENT) return corrupt(path + ": artifact missing");
    return io_error(path + ": stat: " + errno_str(err));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size != ref.bytes)
    return corrupt(path + ": size mismatch: " + std::to_string(size) + " bytes on disk, " +
                   std::to_string(ref.bytes) + " recorded" +
                   (size < ref.bytes ? " (truncated)" : ""));
  auto d = sha256_file(path);
  if (!d.is_ok()) {
    if (d.status().code() == Code::kNotFound) return corrupt(path + ": artifact missing");
    return d.status();
  }
  if (d->sha256 != ref.sha256)
    return corrupt(path + ": checksum mismatch: sha256 " + d->sha256 + " on disk, " + ref.sha256 +
                   " recorded");
  return Status::ok();
}

Result<std::string> ArtifactStore::read_blob(const ArtifactRef& ref) const {
  QCAL_ASSIGN_OR_RETURN(std::string path, checked_path(ref.path));
  auto bytes = read_file(path);
  if (!bytes.is_ok()) {
    if (bytes.status().code() == Code::kNotFound) return corrupt(path + ": artifact missing");
    return bytes.status();
  }
  if (bytes->size() != ref.bytes)
    return corrupt(path + ": size mismatch: " + std::to_string(bytes->size()) + " bytes on disk, " +
                   std::to_string(ref.bytes) + " recorded" +
                   (bytes->size() < ref.bytes ? " (truncated)" : ""));
  std::string got = sha256_hex(*bytes);
  if (got != ref.sha256)
    return corrupt(path + ": checksum mismatch: sha256 " + got + " on disk, " + ref.sha256 +
                   " recorded");
  return std::move(bytes).value();
}

// ---------------------------------------------------------------- qlinears

Result<ArtifactRef> ArtifactStore::write_qlinears(
    const std::string& rel, const std::map<std::string, QuantizedLinear>& qlinears) {
  QCAL_ASSIGN_OR_RETURN(std::string path, checked_path(rel));
  QCAL_RETURN_IF_ERROR(make_parent(path));
  nlohmann::json index = nlohmann::json::object();
  SafetensorsWriter w(path);
  for (const auto& [name, q] : qlinears) {
    const int64_t O = q.out_features, I = q.in_features;
    const int64_t G = O > 0 ? static_cast<int64_t>(q.scales.size()) / O : 0;
    if (O <= 0 || I <= 0 || static_cast<int64_t>(q.q.size()) != O * I ||
        static_cast<int64_t>(q.scales.size()) != G * O ||
        static_cast<int64_t>(q.zeros.size()) != G * O || static_cast<int64_t>(q.g_idx.size()) != I)
      return invalid_input(name + ": inconsistent quantized linear (O " + std::to_string(O) +
                           ", I " + std::to_string(I) + ", " + std::to_string(q.q.size()) +
                           " codes, " + std::to_string(q.scales.size()) + " scales, " +
                           std::to_string(q.zeros.size()) + " zeros, " +
                           std::to_string(q.g_idx.size()) + " g_idx)");
    index[name] = {{"out", O},
                   {"in", I},
                   {"bits", q.spec.bits},
                   {"group_size", q.spec.group_size},
                   {"sym", q.spec.sym},
                   {"mse_clip", q.spec.mse_clip},
                   {"act_order", q.act_order}};
    w.add(name + ".q", DType::kU8, {O, I});
    w.add(name + ".scales", DType::kF32, {G, O});
    w.add(name + ".zeros", DType::kI32, {G, O});
    w.add(name + ".g_idx", DType::kI32, {I});
  }
  w.set_metadata("qcal.format", kQLinearsFormat);
  w.set_metadata("qcal.version", std::to_string(kArtifactFormatVersion));
  w.set_metadata("qcal.qlinears", index.dump());
  QCAL_RETURN_IF_ERROR(w.begin());
  for (const auto& [name, q] : qlinears) {
    QCAL_RETURN_IF_ERROR(w.write(bytes_of(q.q)));
    QCAL_RETURN_IF_ERROR(w.write(bytes_of(q.scales)));
    QCAL_RETURN_IF_ERROR(w.write(bytes_of(q.zeros)));
    QCAL_RETURN_IF_ERROR(w.write(bytes_of(q.g_idx)));
  }
  if (fault_hook_) QCAL_RETURN_IF_ERROR(fault_hook_(path));  // ~w removes the temporary
  QCAL_RETURN_IF_ERROR(w.finish());
  return finish_ref(rel, path);
}

Result<std::map<std::string, QuantizedLinear>> ArtifactStore::read_qlinears(
    const ArtifactRef& ref) const {
  QCAL_RETURN_IF_ERROR(verify(ref));
  const std::string path = absolute(ref.path);
  auto opened = SafetensorsFile::open(path);
  if (!opened.is_ok()) return corrupt(opened.status().message());
  const SafetensorsFile& f = **opened;
  QCAL_RETURN_IF_ERROR(check_format(f, kQLinearsFormat));
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(f.header().metadata.at("qcal.qlinears"));
  } catch (const std::exception& e) {
    return corrupt(path + ": qcal.qlinears metadata: " + e.what());
  }
  if (!index.is_object()) return corrupt(path + ": qcal.qlinears metadata is not an object");
  std::map<std::string, QuantizedLinear> out;
  for (auto it = index.begin(); it != index.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& e = it.value();
    QuantizedLinear q;
    try {
      q.out_features = e.at("out").get<int64_t>();
      q.in_features = e.at("in").get<int64_t>();
      q.spec.bits = e.at("bits").get<int>();
      q.spec.group_size = e.at("group_size").get<int64_t>();
      q.spec.sym = e.at("sym").get<bool>();
      q.spec.mse_clip = e.at("mse_clip").get<bool>();
      q.act_order = e.at("act_order").get<bool>();
    } catch (const std::exception& ex) {
      return corrupt(path + ": " + name + ": bad metadata: " + ex.what());
    }
    const int64_t O = q.out_features, I = q.in_features;
    if (O <= 0 || I <= 0) return corrupt(path + ": " + name + ": non-positive shape");
    if (!q.spec.validate().is_ok()) return corrupt(path + ": " + name + ": invalid quant spec");
    const TensorInfo* st = f.find(name + ".scales");
    if (!st || st->shape.size() != 2 || st->shape[1] != O || st->shape[0] <= 0)
      return corrupt(path + ": " + name + ".scales: missing or not (G, " + std::to_string(O) + ")");
    const int64_t G = st->shape[0];
    QCAL_RETURN_IF_ERROR(read_raw(f, name + ".q", DType::kU8, {O, I}, &q.q));
    QCAL_RETURN_IF_ERROR(read_raw(f, name + ".scales", DType::kF32, {G, O}, &q.scales));
    QCAL_RETURN_IF_ERROR(read_raw(f, name + ".zeros", DType::kI32, {G, O}, &q.zeros));
    QCAL_RETURN_IF_ERROR(read_raw(f, name + ".g_idx", DType::kI32, {I}, &q.g_idx));
    // Values dequantize() and the checkpoint writers would abort or misread on.
    const int maxq = q.spec.maxq();
    for (uint8_t c : q.q)
      if (c > maxq) return corrupt(path + ": " + name + ".q: code above 2^bits − 1");
    for (int32_t z : q.zeros)
      if (z < 0 || z > maxq) return corrupt(path + ": " + name + ".zeros: zero out of range");
    for (int32_t g : q.g_idx)
      if (g < 0 || g >= G) return corrupt(path + ": " + name + ".g_idx: group out of range");
    out.emplace(name, std::move(q));
  }
  return out;
}

// ---------------------------------------------------------------- activations

Result<ArtifactRef> ArtifactStore::write_activations(const std::string& rel, const Tensor& x,
                                                     int64_t seqlen) {
  QCAL_ASSIGN_OR_RETURN(std::string path, checked_path(rel));
  if (x.ndim() != 2 || seqlen <= 0 || x.dim(0) % seqlen != 0)
    return invalid_input(rel + ": activations must be (N*T, H) with T = seqlen " +
                         std::to_string(seqlen) + ", got " + shape_str(x.shape));
  QCAL_RETURN_IF_ERROR(make_parent(path));
  SafetensorsWriter w(path);
  w.set_metadata("qcal.format", kActivationsFormat);
  w.set_metadata("qcal.version", std::to_string(kArtifactFormatVersion));
  w.set_metadata("qcal.seqlen", std::to_string(seqlen));
  w.add("x", DType::kF32, x.shape);
  QCAL_RETURN_IF_ERROR(w.begin());
  QCAL_RETURN_IF_ERROR(w.write(bytes_of(x.data)));
  if (fault_hook_) QCAL_RETURN_IF_ERROR(fault_hook_(path));
  QCAL_RETURN_IF_ERROR(w.finish());
  return finish_ref(rel, path);
}

Result<Activations> ArtifactStore::read_activations(const ArtifactRef& ref) const {
  QCAL_RETURN_IF_ERROR(verify(ref));
  const std::string path = absolute(ref.path);
  auto opened = SafetensorsFile::open(path);
  if (!opened.is_ok()) return corrupt(opened.status().message());
  const SafetensorsFile& f = **opened;
  QCAL_RETURN_IF_ERROR(check_format(f, kActivationsFormat));
  Activations a;
  try {
    a.seqlen = std::stoll(f.header().metadata.at("qcal.seqlen"));
  } catch (const std::exception&) {
    return corrupt(path + ": missing or bad qcal.seqlen");
  }
  const TensorInfo* t = f.find("x");
  if (!t || t->dtype != DType::kF32 || t->shape.size() != 2 || a.seqlen <= 0 ||
      t->shape[0] % a.seqlen != 0)
    return corrupt(path +
                   ": tensor 'x' missing or not F32 (N*T, H) with T = " + std::to_string(a.seqlen));
  a.x = Tensor(t->shape);
  std::string_view raw = f.raw(*t);
  if (!raw.empty()) std::memcpy(a.x.ptr(), raw.data(), raw.size());
  return a;
}

}  // namespace qcal

// ---------------------------------------------------------------- streamed activations

namespace qcal {

struct ArtifactStore::ActivationFileWriter::Impl {
  std::string rel, path, tmp;
  int fd = -1;
  int64_t N = 0, T = 0, H = 0, written = 0;
  Sha256 sha;
  uint64_t bytes = 0;
  const ArtifactStore::FaultHook* hook = nullptr;
  bool done = false;

  Status write_all(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    while (n > 0) {
      ssize_t w = ::write(fd, c, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        if (err == ENOSPC || err == EDQUOT)
          return resource_exhausted(tmp + ": write: " + errno_str(err));
        return io_error(tmp + ": write: " + errno_str(err));
      }
      sha.update(c, static_cast<size_t>(w));
      bytes += static_cast<uint64_t>(w);
      c += w;
      n -= static_cast<size_t>(w);
    }
    return Status::ok();
  }
};

ArtifactStore::ActivationFileWriter::~ActivationFileWriter() {
  if (impl_ && impl_->fd >= 0) ::close(impl_->fd);
  if (impl_ && !impl_->done && !impl_->tmp.empty()) ::unlink(impl_->tmp.c_str());
}

Result<std::unique_ptr<ArtifactStore::ActivationFileWriter>> ArtifactStore::create_activations(
    const std::string& rel, int64_t N, int64_t T, int64_t H) {
  QCAL_ASSIGN_OR_RETURN(std::string path, checked_path(rel));
  if (N < 1 || T < 1 || H < 1)
    return invalid_input(rel + ": activations need N, T, H >= 1 (got " + std::to_string(N) +
                         ", " + std::to_string(T) + ", " + std::to_string(H) + ")");
  QCAL_RETURN_IF_ERROR(make_parent(path));
  std::unique_ptr<ActivationFileWriter> w(new ActivationFileWriter());
  w->impl_ = std::make_unique<ActivationFileWriter::Impl>();
  auto& m = *w->impl_;
  m.rel = rel;
  m.path = path;
  m.N = N;
  m.T = T;
  m.H = H;
  m.hook = &fault_hook_;
  m.tmp = temp_name(path);
  m.fd = ::open(m.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (m.fd < 0) {
    const int err = errno;
    m.tmp.clear();
    return io_error(path + ": create: " + errno_str(err));
  }
  // The same header SafetensorsWriter writes for write_activations: metadata, then "x".
  nlohmann::ordered_json hj = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  meta["qcal.format"] = kActivationsFormat;
  meta["qcal.seqlen"] = std::to_string(T);
  meta["qcal.version"] = std::to_string(kArtifactFormatVersion);
  hj["__metadata__"] = std::move(meta);
  const uint64_t data = static_cast<uint64_t>(N) * static_cast<uint64_t>(T) *
                        static_cast<uint64_t>(H) * sizeof(float);
  hj["x"] = {{"dtype", "F32"}, {"shape", {N * T, H}}, {"data_offsets", {0, data}}};
  std::string header = hj.dump();
  header.append((8 - header.size() % 8) % 8, ' ');
  unsigned char len[8];
  uint64_t hl = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(hl >> (8 * i));
  QCAL_RETURN_IF_ERROR(m.write_all(len, 8));
  QCAL_RETURN_IF_ERROR(m.write_all(header.data(), header.size()));
  return w;
}

Status ArtifactStore::ActivationFileWriter::append(const float* x, int64_t n) {
  auto& m = *impl_;
  if (m.done || m.fd < 0) return internal_error(m.path + ": append after finish");
  if (n < 0 || m.written + n > m.N)
    return internal_error(m.path + ": " + std::to_string(m.written + n) + " sequences for a file of " +
                          std::to_string(m.N));
  QCAL_RETURN_IF_ERROR(
      m.write_all(x, static_cast<size_t>(n * m.T * m.H) * sizeof(float)));
  m.written += n;
  return Status::ok();
}

Result<ArtifactRef> ArtifactStore::ActivationFileWriter::finish() {
  auto& m = *impl_;
  if (m.done) return internal_error(m.path + ": finish() twice");
  if (m.written != m.N)
    return internal_error(m.path + ": " + std::to_string(m.written) + " of " + std::to_string(m.N) +
                          " sequences written");
  if (*m.hook) QCAL_RETURN_IF_ERROR((*m.hook)(m.path));
  if (::fsync(m.fd) != 0) return io_error(m.tmp + ": fsync: " + errno_str(errno));
  ::close(m.fd);
  m.fd = -1;
  if (::rename(m.tmp.c_str(), m.path.c_str()) != 0)
    return io_error(m.path + ": rename: " + errno_str(errno));
  m.done = true;
  QCAL_RETURN_IF_ERROR(fsync_path(fs::path(m.path).parent_path().string()));
  return ArtifactRef{m.rel, m.sha.hex_digest(), m.bytes};
}

ArtifactStore::ActivationFileReader::~ActivationFileReader() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<ArtifactStore::ActivationFileReader>> ArtifactStore::open_activations(
    const ArtifactRef& ref, bool verify_sum) const {
  if (verify_sum) QCAL_RETURN_IF_ERROR(verify(ref));
  const std::string path = absolute(ref.path);
  auto opened = SafetensorsFile::open(path);
  if (!opened.is_ok()) return corrupt(opened.status().message());
  const SafetensorsFile& f = **opened;
  QCAL_RETURN_IF_ERROR(check_format(f, kActivationsFormat));
  std::unique_ptr<ActivationFileReader> r(new ActivationFileReader());
  try {
    r->T_ = std::stoll(f.header().metadata.at("qcal.seqlen"));
  } catch (const std::exception&) {
    return corrupt(path + ": missing or bad qcal.seqlen");
  }
  const TensorInfo* t = f.find("x");
  if (!t || t->dtype != DType::kF32 || t->shape.size() != 2 || r->T_ <= 0 ||
      t->shape[0] % r->T_ != 0)
    return corrupt(path + ": tensor 'x' missing or not F32 (N*T, H) with T = " +
                   std::to_string(r->T_));
  r->N_ = t->shape[0] / r->T_;
  r->H_ = t->shape[1];
  r->data_start_ = f.header().data_start + t->begin;
  r->path_ = path;
  r->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (r->fd_ < 0) return corrupt(path + ": open: " + errno_str(errno));
  return r;
}

Status ArtifactStore::ActivationFileReader::read(int64_t s0, int64_t n, float* out) const {
  if (s0 < 0 || n < 0 || s0 + n > N_)
    return invalid_input(path_ + ": sequences [" + std::to_string(s0) + ", " +
                         std::to_string(s0 + n) + ") outside [0, " + std::to_string(N_) + ")");
  const uint64_t seq = static_cast<uint64_t>(T_ * H_) * sizeof(float);
  char* p = reinterpret_cast<char*>(out);
  uint64_t left = static_cast<uint64_t>(n) * seq;
  uint64_t off = data_start_ + static_cast<uint64_t>(s0) * seq;
  while (left > 0) {
    ssize_t got = ::pread(fd_, p, left, static_cast<off_t>(off));
    if (got < 0) {
      if (errno == EINTR) continue;
      return io_error(path_ + ": read: " + errno_str(errno));
    }
    if (got == 0) return corrupt(path_ + ": truncated");
    p += got;
    off += static_cast<uint64_t>(got);
    left -= static_cast<uint64_t>(got);
  }
  return Status::ok();
}

}  // namespace qcal

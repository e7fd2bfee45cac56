#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/fsutil.h"
#include "common/json_util.h"
#include "common/log.h"
#include "common/path_policy.h"
#include "common/sanitize.h"

namespace qcal {

namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderLen = 100ull * 1000 * 1000;  // 100 MB, as the reference reader
constexpr const char* kMetadataKey = "__metadata__";
// A valid header nests 3 deep (root, entry, shape); allow generous slack.
constexpr int kMaxHeaderDepth = 16;

std::string errno_str(int err) { return std::strerror(err); }

uint64_t read_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Reads a JSON value that must be a non-negative integer (a plain JSON integer
// literal, not a float such as 1.0 or 1e3).
bool as_u64(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    int64_t s = v.get<int64_t>();
    if (s < 0) return false;
    *out = static_cast<uint64_t>(s);
    return true;
  }
  return false;
}

// A short rendering of a scalar for messages. Containers are not dumped: a
// hostile header can nest them deep enough to exhaust the stack in dump().
std::string short_dump(const json& v) {
  if (v.is_array()) return "[...]";
  if (v.is_object()) return "{...}";
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

// A SAX pass that finds the first duplicate key in any object and the first
// syntax error. nlohmann::json::parse keeps the last of duplicate keys
// silently, and its callback parser rescans the parent object at every
// object end (quadratic in the number of tensors), so duplicates are found
// here, in one linear pass, before the DOM parse.
class KeyChecker : public nlohmann::json_sax<json> {
 public:
  std::string duplicate;
  std::string syntax_error;

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    if (!keys_.empty() && !keys_.back().insert(k).second) {
      duplicate = k;
      return false;  // stop: the header is rejected anyway
    }
    return true;
  }
  bool end_object() override {
    if (!keys_.empty()) keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    syntax_error = sanitize_text(e.what(), 256);  // quotes the offending bytes
    return false;
  }

 private:
  std::vector<std::set<std::string>> keys_;  // one set per open object
};

// Parses `text` into `out`, rejecting syntax errors, deep nesting and
// duplicate keys. Never throws.
Status parse_json_strict(std::string_view text, json* out, const std::string& what) {
  if (json_nesting_exceeds(text, kMaxHeaderDepth) != std::string::npos)
    return corrupt(what + ": bad JSON header: nested deeper than " +
                   std::to_string(kMaxHeaderDepth) + " levels");
  try {
    KeyChecker check;
    json::sax_parse(text.begin(), text.end(), &check);
    if (!check.syntax_error.empty())
      return corrupt(what + ": bad JSON header: " + check.syntax_error);
    if (!check.duplicate.empty())
      return corrupt(what + ": duplicate name '" + check.duplicate + "' in header");
    *out = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  } catch (const std::exception& e) {
    // The parser's message quotes the bytes it choked on: escaped, bounded.
    return corrupt(what + ": bad JSON header: " + sanitize_text(e.what(), 256));
  }
  if (out->is_discarded()) return corrupt(what + ": bad JSON header (not valid JSON)");
  return Status::ok();
}

Status parse_entry(const std::string& name, const json& e, uint64_t data_size,
                   const std::string& what, TensorInfo* t) {
  const std::string ctx = what + ": tensor '" + name + "': ";
  if (!e.is_object()) return corrupt(ctx + "entry is not an object");
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) return corrupt(ctx + "missing or non-string dtype");
  const std::string& dname = dt->get_ref<const std::string&>();
  auto dtype = dtype_from_name(dname);
  if (!dtype) return invalid_input(ctx + "unknown dtype '" + dname + "'");
  t->name = name;
  t->dtype = *dtype;

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) return corrupt(ctx + "missing or non-array shape");
  uint64_t numel = 1;
  bool numel_overflow = false;
  t->shape.clear();
  for (const json& d : *sh) {
    uint64_t v = 0;
    if (!as_u64(d, &v) || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return corrupt(ctx + "shape entry " + short_dump(d) + " is not a non-negative integer");
    t->shape.push_back(static_cast<int64_t>(v));
    if (__builtin_mul_overflow(numel, v, &numel)) numel_overflow = true;
  }

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2)
    return corrupt(ctx + "data_offsets must be an array [begin, end]");
  uint64_t b = 0, en = 0;
  if (!as_u64((*off)[0], &b) || !as_u64((*off)[1], &en))
    return corrupt(ctx + "data_offsets [" + short_dump((*off)[0]) + ", " + short_dump((*off)[1]) +
                   "] are not non-negative integers");
  if (b > en)
    return corrupt(ctx + "data_offsets begin " + std::to_string(b) + " > end " +
                   std::to_string(en));
  if (en > data_size)
    return corrupt(ctx + "data_offsets end " + std::to_string(en) + " past data buffer size " +
                   std::to_string(data_size));
  uint64_t expect = 0;
  if (numel_overflow || __builtin_mul_overflow(numel, dtype_size(*dtype), &expect))
    return corrupt(ctx + "size mismatch: shape " + shape_str(t->shape) + " is too large");
  if (en - b != expect)
    return corrupt(ctx + "size mismatch: data_offsets span " + std::to_string(en - b) +
                   " bytes but shape " + shape_str(t->shape) + " of " + dname + " needs " +
                   std::to_string(expect));
  t->begin = b;
  t->end = en;
  return Status::ok();
}

}  // namespace

Result<SafetensorsHeader> parse_safetensors_header(std::string_view bytes, uint64_t file_size,
                                                   const std::string& what) {
  if (file_size < 8)
    return corrupt(what + ": truncated: file size " + std::to_string(file_size) +
                   " is smaller than the 8-byte header length");
  if (bytes.size() < 8)
    return corrupt(what + ": truncated: only " + std::to_string(bytes.size()) +
                   " bytes given, need the 8-byte header length");
  SafetensorsHeader h;
  h.header_len = read_le64(reinterpret_cast<const unsigned char*>(bytes.data()));
  if (h.header_len > file_size - 8)
    return corrupt(what + ": header length " + std::to_string(h.header_len) +
                   " runs past end of file (size " + std::to_string(file_size) + ")");
  if (h.header_len >= kMaxHeaderLen)
    return corrupt(what + ": header length " + std::to_string(h.header_len) +
                   " exceeds the 100 MB limit");
  if (bytes.size() - 8 < h.header_len)
    return corrupt(what + ": truncated: header needs " + std::to_string(h.header_len + 8) +
                   " bytes, only " + std::to_string(bytes.size()) + " given");
  h.data_start = 8 + h.header_len;
  const uint64_t data_size = file_size - h.data_start;

  json j;
  QCAL_RETURN_IF_ERROR(parse_json_strict(bytes.substr(8, h.header_len), &j, what));
  if (!j.is_object()) return corrupt(what + ": bad JSON header: top level is not an object");

  try {
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      if (name == kMetadataKey) {
        const json& m = it.value();
        if (m.is_null()) continue;
        if (!m.is_object()) return corrupt(what + ": __metadata__ is not an object");
        for (auto mi = m.begin(); mi != m.end(); ++mi) {
          if (!mi.value().is_string())
            return corrupt(what + ": __metadata__ value for '" + mi.key() + "' is not a string");
          h.metadata[mi.key()] = mi.value().get<std::string>();
        }
        continue;
      }
      TensorInfo t;
      QCAL_RETURN_IF_ERROR(parse_entry(name, it.value(), data_size, what, &t));
      h.tensors.push_back(std::move(t));
    }
  } catch (const std::exception& e) {  // defensive: nlohmann type errors must never escape
    // The parser's message quotes the bytes it choked on: escaped, bounded.
    return corrupt(what + ": bad JSON header: " + sanitize_text(e.what(), 256));
  }

  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  // Empty tensors occupy no bytes and overlap nothing.
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : h.tensors) {
    if (t.nbytes() == 0) continue;
    if (prev && prev->end > t.begin)
      return corrupt(what + ": tensors '" + prev->name + "' [" + std::to_string(prev->begin) +
                     ", " + std::to_string(prev->end) + ") and '" + t.name + "' [" +
                     std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     ") have overlapping data_offsets");
    prev = &t;
  }
  return h;
}

// ---------------------------------------------------------------- reader

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  // A regular file inside the process policy's roots, never blocking on a FIFO.
  QCAL_ASSIGN_OR_RETURN(int fd, open_input_file(path));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return io_error(path + ": fstat: " + errno_str(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_input(path + ": not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return corrupt(path + ": truncated: file size " + std::to_string(size) +
                   " is smaller than the 8-byte header length");
  }
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (m == MAP_FAILED) return io_error(path + ": mmap: " + errno_str(map_err));

  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = static_cast<const unsigned char*>(m);
  f->map_size_ = size;
  auto h = parse_safetensors_header(
      std::string_view(reinterpret_cast<const char*>(f->map_), f->map_size_), size, path);
  if (!h.is_ok()) return h.status();  // destructor unmaps
  f->header_ = std::move(h).value();
  for (size_t i = 0; i < f->header_.tensors.size(); ++i) f->index_[f->header_.tensors[i].name] = i;
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

std::string_view SafetensorsFile::raw(const TensorInfo& t) const {
  return std::string_view(reinterpret_cast<const char*>(map_ + header_.data_start + t.begin),
                          t.nbytes());
}

Result<Tensor> SafetensorsFile::read_f32(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) return not_found(path_ + ": missing tensor '" + name + "'");
  if (!is_float_dtype(t->dtype))
    return invalid_input(path_ + ": tensor '" + name + "' has dtype " + dtype_name(t->dtype) +
                         ", not a float dtype");
  Tensor out(t->shape);
  to_f32(t->dtype, map_ + header_.data_start + t->begin, out.ptr(), out.data.size());
  // The fp32 copy is what callers keep; dropping the mapped pages keeps the
  // resident set at one copy when walking a model larger than memory.
  release(*t);
  return out;
}

void SafetensorsFile::release(const TensorInfo& t) const { release(t, 0, t.nbytes()); }

void SafetensorsFile::release(const TensorInfo& t, uint64_t begin, uint64_t end) const {
  end = std::min(end, t.nbytes());
  if (begin >= end) return;
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  // The mapping is read-only and private, so dropped pages are simply re-read
  // from the file if touched again; dropping a page shared with a neighbour is
  // harmless.
  uint64_t lo = (header_.data_start + t.begin + begin) / page * page;
  uint64_t hi = std::min<uint64_t>(map_size_, header_.data_start + t.begin + end);
  ::madvise(const_cast<unsigned char*>(map_) + lo, hi - lo, MADV_DONTNEED);
}

// ---------------------------------------------------------------- writer

RowFn rows_of(const float* data, int64_t row_numel) {
  return [data, row_numel](int64_t row0, int64_t rows, float* out) {
    if (rows > 0 && row_numel > 0)
      std::memcpy(out, data + row0 * row_numel,
                  static_cast<size_t>(rows * row_numel) * sizeof(float));
    return Status::ok();
  };
}

struct SafetensorsWriter::Impl {
  enum class State { kDeclaring, kWriting, kFinished, kFailed };

  std::string path;
  std::string tmp;
  std::map<std::string, std::string> metadata{{"format", "pt"}};
  std::vector<TensorInfo> tensors;  // declaration order, offsets assigned in add()
  uint64_t total = 0;
  State state = State::kDeclaring;
  Status error;  // first error; returned by every later call
  int fd = -1;
  size_t next = 0;  // index of the tensor being written
  uint64_t written_in_next = 0;
  std::string too_large;  // first tensor whose size overflowed 64 bits (reported by begin())

  Status fail(Status s) {
    if (state != State::kFailed) {
      error = s;
      state = State::kFailed;
    }
    if (fd >= 0) {
      ::close(fd);
      fd = -1;
    }
    if (!tmp.empty()) ::unlink(tmp.c_str());
    return error;
  }

  Status write_all(const char* p, size_t n) {
    while (n > 0) {
      ssize_t w = ::write(fd, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        int err = errno;
        // kIoError: a full disk is worth a retry once space comes back.
        if (err == ENOSPC || err == EDQUOT)
          return fail(io_error(tmp + ": write: " + errno_str(err) + " (disk full)"));
        return fail(io_error(tmp + ": write: " + errno_str(err)));
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return Status::ok();
  }

  // Appends bytes of the current tensor; may be called in pieces.
  Status write_piece(std::string_view bytes) {
    const TensorInfo& t = tensors[next];
    QCAL_RETURN_IF_ERROR(write_all(bytes.data(), bytes.size()));
    written_in_next += bytes.size();
    if (written_in_next == t.nbytes()) {
      ++next;
      written_in_next = 0;
    }
    return Status::ok();
  }

  Status check_writing(const char* op) {
    if (state == State::kFailed) return error;
    if (state != State::kWriting)
      return internal_error(path + ": " + op + " called " +
                            (state == State::kDeclaring ? "before begin()" : "after finish()"));
    return Status::ok();
  }
};

SafetensorsWriter::SafetensorsWriter(std::string path) : impl_(std::make_unique<Impl>()) {
  impl_->path = std::move(path);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (impl_->fd >= 0) ::close(impl_->fd);
  if (impl_->state != Impl::State::kFinished && !impl_->tmp.empty()) ::unlink(impl_->tmp.c_str());
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  impl_->metadata[key] = value;
}

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape) {
  TensorInfo t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  uint64_t n = dtype_size(dtype);
  bool overflow = false;
  for (int64_t d : t.shape)  // negative dims are reported by begin()
    overflow |= __builtin_mul_overflow(n, d < 0 ? 0 : static_cast<uint64_t>(d), &n);
  overflow |= __builtin_add_overflow(impl_->total, n, &t.end);
  if (overflow && impl_->too_large.empty()) impl_->too_large = name;
  t.begin = impl_->total;
  impl_->total = t.end;
  impl_->tensors.push_back(std::move(t));
}

uint64_t SafetensorsWriter::data_bytes() const { return impl_->total; }

Status SafetensorsWriter::begin() {
  Impl& m = *impl_;
  if (m.state == Impl::State::kFailed) return m.error;
  if (m.state != Impl::State::kDeclaring) return internal_error(m.path + ": begin() called twice");
  std::set<std::string> seen;
  if (!m.too_large.empty())
    return m.fail(invalid_input(m.path + ": tensor '" + m.too_large + "' is too large"));
  // ordered_json keeps declaration order, so equal inputs give identical bytes.
  nlohmann::ordered_json hj = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [k, v] : m.metadata) meta[k] = v;
  hj[kMetadataKey] = std::move(meta);
  for (const TensorInfo& t : m.tensors) {
    if (t.name == kMetadataKey)
      return m.fail(invalid_input(m.path + ": tensor name '__metadata__' is reserved"));
    if (!seen.insert(t.name).second)
      return m.fail(invalid_input(m.path + ": duplicate tensor name '" + t.name + "'"));
    for (int64_t d : t.shape)
      if (d < 0)
        return m.fail(invalid_input(m.path + ": tensor '" + t.name + "' has negative shape " +
                                    shape_str(t.shape)));
    nlohmann::ordered_json e;
    e["dtype"] = dtype_name(t.dtype);
    e["shape"] = t.shape;
    e["data_offsets"] = {t.begin, t.end};
    hj[t.name] = std::move(e);
  }
  std::string header = hj.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::strict);
  // Pad with spaces so the data buffer starts 8-byte aligned (as the reference writer does).
  header.append((8 - header.size() % 8) % 8, ' ');

  if (Status w = check_process_write(m.path); !w.is_ok()) return m.fail(w);
  m.tmp = m.path + ".tmp." + staging_tag();
  m.fd = ::open(m.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (m.fd < 0) {
    int err = errno;
    std::string tmp = m.tmp;
    m.tmp.clear();  // nothing of ours to remove
    return m.fail(io_error(tmp + ": create: " + errno_str(err)));
  }
  m.state = Impl::State::kWriting;
  unsigned char len[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  QCAL_RETURN_IF_ERROR(m.write_all(reinterpret_cast<const char*>(len), 8));
  QCAL_RETURN_IF_ERROR(m.write_all(header.data(), header.size()));
  return Status::ok();
}

Status SafetensorsWriter::write(std::string_view bytes) {
  Impl& m = *impl_;
  QCAL_RETURN_IF_ERROR(m.check_writing("write()"));
  if (m.next >= m.tensors.size())
    return m.fail(internal_error(m.path + ": write() called after every declared tensor"));
  const TensorInfo& t = m.tensors[m.next];
  if (m.written_in_next != 0 || bytes.size() != t.nbytes())
    return m.fail(internal_error(m.path + ": tensor '" + t.name + "' needs " +
                                 std::to_string(t.nbytes()) + " bytes, got " +
                                 std::to_string(bytes.size())));
  return m.write_piece(bytes);
}

Status SafetensorsWriter::write_f32(const float* values, size_t n) {
  Impl& m = *impl_;
  QCAL_RETURN_IF_ERROR(m.check_writing("write_f32()"));
  if (m.next >= m.tensors.size())
    return m.fail(internal_error(m.path + ": write_f32() called after every declared tensor"));
  const TensorInfo& t = m.tensors[m.next];
  if (!is_float_dtype(t.dtype))
    return m.fail(internal_error(m.path + ": write_f32() for tensor '" + t.name +
                                 "' of non-float dtype " + dtype_name(t.dtype)));
  const size_t es = dtype_size(t.dtype);
  if (m.written_in_next != 0 || static_cast<uint64_t>(n) * es != t.nbytes())
    return m.fail(internal_error(m.path + ": tensor '" + t.name + "' needs " +
                                 std::to_string(t.nbytes() / es) + " values, got " +
                                 std::to_string(n)));
  if (n == 0) return m.write_piece({});
  // Convert in bounded chunks so writing a large tensor needs little extra memory.
  constexpr size_t kChunk = 1 << 20;
  std::vector<char> buf(std::min(n, kChunk) * es);
  for (size_t i = 0; i < n; i += kChunk) {
    size_t c = std::min(kChunk, n - i);
    from_f32(t.dtype, values + i, buf.data(), c);
    QCAL_RETURN_IF_ERROR(m.write_piece(std::string_view(buf.data(), c * es)));
  }
  return Status::ok();
}

Status SafetensorsWriter::append(std::string_view bytes) {
  Impl& m = *impl_;
  QCAL_RETURN_IF_ERROR(m.check_writing("append()"));
  if (m.next >= m.tensors.size())
    return m.fail(internal_error(m.path + ": append() of " + std::to_string(bytes.size()) +
                                 " bytes after every declared tensor was written"));
  const TensorInfo& t = m.tensors[m.next];
  const uint64_t left = t.nbytes() - m.written_in_next;
  if (bytes.size() > left)
    return m.fail(internal_error(m.path + ": tensor '" + t.name + "' needs " +
                                 std::to_string(t.nbytes()) + " bytes, " + std::to_string(left) +
                                 " still missing, got a piece of " + std::to_string(bytes.size())));
  return m.write_piece(bytes);
}

Status SafetensorsWriter::write_rows(const RowFn& rows, uint64_t chunk_bytes) {
  Impl& m = *impl_;
  QCAL_RETURN_IF_ERROR(m.check_writing("write_rows()"));
  if (m.next >= m.tensors.size())
    return m.fail(internal_error(m.path + ": write_rows() called after every declared tensor"));
  const TensorInfo& t = m.tensors[m.next];
  if (!is_float_dtype(t.dtype))
    return m.fail(internal_error(m.path + ": write_rows() for tensor '" + t.name +
                                 "' of non-float dtype " + dtype_name(t.dtype)));
  if (m.written_in_next != 0)
    return m.fail(internal_error(m.path + ": write_rows() for tensor '" + t.name + "' after " +
                                 std::to_string(m.written_in_next) + " of its bytes"));
  const int64_t R = t.shape.empty() ? 1 : t.shape[0];
  int64_t row_numel = 1;
  for (size_t i = 1; i < t.shape.size(); ++i) row_numel *= t.shape[i];
  if (R == 0 || row_numel == 0) return m.write_piece({});
  const size_t es = dtype_size(t.dtype);
  const int64_t per = std::max<int64_t>(
      1, static_cast<int64_t>(chunk_bytes / (static_cast<uint64_t>(row_numel) * sizeof(float))));
  const int64_t chunk_rows = std::min(per, R);
  std::vector<float> f(static_cast<size_t>(chunk_rows * row_numel));
  std::vector<char> conv(t.dtype == DType::kF32 ? 0 : f.size() * es);
  for (int64_t r0 = 0; r0 < R; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, R - r0);
    const size_t count = static_cast<size_t>(n * row_numel);
    // NaN marks values the source leaves unwritten: the finiteness check reports them.
    std::fill(f.begin(), f.begin() + static_cast<std::ptrdiff_t>(count),
              std::numeric_limits<float>::quiet_NaN());
    Status st = rows(r0, n, f.data());
    if (!st.is_ok()) return m.fail(st);
    for (size_t i = 0; i < count; ++i)
      if (!std::isfinite(f[i]))
        return m.fail(invalid_input(
            "tensor " + t.name + ": non-finite value " + std::to_string(f[i]) + " at element " +
            std::to_string(static_cast<uint64_t>(r0 * row_numel) + i) + " (row " +
            std::to_string(r0 + static_cast<int64_t>(i) / row_numel) + ")"));
    const char* bytes = reinterpret_cast<const char*>(f.data());
    if (t.dtype != DType::kF32) {
      from_f32(t.dtype, f.data(), conv.data(), count);
      bytes = conv.data();
    }
    QCAL_RETURN_IF_ERROR(m.write_piece(std::string_view(bytes, count * es)));
  }
  return Status::ok();
}

Status SafetensorsWriter::finish() {
  Impl& m = *impl_;
  QCAL_RETURN_IF_ERROR(m.check_writing("finish()"));
  if (m.next != m.tensors.size())
    return m.fail(
        internal_error(m.path + ": finish() with " + std::to_string(m.tensors.size() - m.next) +
                       " declared tensor(s) not written, first '" + m.tensors[m.next].name + "' (" +
                       std::to_string(m.written_in_next) + " of its " +
                       std::to_string(m.tensors[m.next].nbytes()) + " bytes)"));
  if (::fsync(m.fd) != 0) return m.fail(io_error(m.tmp + ": fsync: " + errno_str(errno)));
  int rc = ::close(m.fd);
  m.fd = -1;
  if (rc != 0) return m.fail(io_error(m.tmp + ": close: " + errno_str(errno)));
  if (::rename(m.tmp.c_str(), m.path.c_str()) != 0)
    return m.fail(io_error(m.path + ": rename from " + m.tmp + ": " + errno_str(errno)));
  m.state = Impl::State::kFinished;
  std::filesystem::path parent = std::filesystem::path(m.path).parent_path();
  Status s = fsync_path(parent.empty() ? "." : parent.string());
  if (!s.is_ok())
    LOG_WARN << m.path << ": written, but fsync of its directory failed: " << s.message();
  return Status::ok();
}

}  // namespace qcal

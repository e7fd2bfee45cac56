#include "common/data.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common/fsutil.h"
#include "common/json_util.h"
#include "common/path_policy.h"

namespace qcal {

namespace {

using json = nlohmann::json;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A scalar for an error message; containers are not dumped (unbounded recursion).
std::string brief(const json& v) {
  if (v.is_array()) return "[...]";
  if (v.is_object()) return "{...}";
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 40 ? s.substr(0, 37) + "..." : s;
}

std::string range_str(int64_t vocab) { return "[0, " + std::to_string(vocab) + ")"; }

// Buffered reads from a descriptor opened with open_input_file; closes it.
class FdReader {
 public:
  explicit FdReader(int fd) : fd_(fd) {}
  ~FdReader() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdReader(const FdReader&) = delete;
  FdReader& operator=(const FdReader&) = delete;

  uint64_t size() const {
    struct stat st {};
    return ::fstat(fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  }
  uint64_t consumed() const { return consumed_; }
  // The next line without its '\n' (false at end of file or error; see bad()).
  // A line longer than `max_line` sets *too_long and stops there.
  bool getline(std::string* line, size_t max_line, bool* too_long) {
    line->clear();
    *too_long = false;
    for (;;) {
      if (pos_ == len_ && !fill()) return !line->empty();
      const char* start = buf_ + pos_;
      const void* nl = std::memchr(start, '\n', len_ - pos_);
      const size_t n = nl ? static_cast<size_t>(static_cast<const char*>(nl) - start) : len_ - pos_;
      if (line->size() + n > max_line) {
        *too_long = true;
        return true;
      }
      line->append(start, n);
      pos_ += n;
      consumed_ += n;
      if (nl) {
        ++pos_;
        ++consumed_;
        return true;
      }
    }
  }
  // Exactly `n` bytes into `out` (false on a short read or error).
  bool read(char* out, size_t n) {
    while (n > 0) {
      if (pos_ == len_ && !fill()) return false;
      const size_t c = std::min(n, len_ - pos_);
      std::memcpy(out, buf_ + pos_, c);
      pos_ += c;
      consumed_ += c;
      out += c;
      n -= c;
    }
    return true;
  }
  bool bad() const { return bad_; }

 private:
  bool fill() {
    for (;;) {
      const ssize_t n = ::read(fd_, buf_, sizeof buf_);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        bad_ = n < 0;
        return false;
      }
      pos_ = 0;
      len_ = static_cast<size_t>(n);
      return true;
    }
  }
  int fd_;
  char buf_[1 << 16];
  size_t pos_ = 0, len_ = 0;
  uint64_t consumed_ = 0;
  bool bad_ = false;
};

// Reads ids from a .jsonl file, appending them to `out` (nullptr: count only),
// stopping once `want` tokens are there (want <= 0: read everything) or more
// than `max_bytes` were read (0: no limit). Returns the tokens seen.
Result<int64_t> read_jsonl(const std::string& path, int64_t vocab, int64_t want,
                           std::vector<int32_t>* out, uint64_t max_bytes, bool* complete) {
  QCAL_ASSIGN_OR_RETURN(int fd, open_input_file(path));
  FdReader in(fd);
  std::string line;
  int64_t lineno = 0, seen = 0;
  *complete = true;
  constexpr size_t kMaxLine = 64u << 20;
  bool too_long = false;
  while (in.getline(&line, kMaxLine, &too_long)) {
    ++lineno;
    if (too_long)
      return invalid_input(path + ":" + std::to_string(lineno) + ": line longer than " +
                           std::to_string(kMaxLine) + " bytes");
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno) + ": ";
    if (json_nesting_exceeds(line, 8) != std::string::npos)
      return invalid_input(where + "nested deeper than 8 levels");
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return invalid_input(where + "malformed JSON");
    if (!j.is_object()) return invalid_input(where + "expected a JSON object");
    auto ids = j.find("input_ids");
    if (ids == j.end()) return invalid_input(where + "missing input_ids");
    if (!ids->is_array()) return invalid_input(where + "input_ids is not an array");
    for (size_t i = 0; i < ids->size(); ++i) {
      const json& v = (*ids)[i];
      const std::string at = where + "input_ids[" + std::to_string(i) + "]";
      if (!v.is_number_integer())
        return invalid_input(at + " = " + brief(v) + " is not an integer");
      bool neg = !v.is_number_unsigned() && v.get<int64_t>() < 0;
      if (neg || v.get<uint64_t>() >= static_cast<uint64_t>(vocab))
        return invalid_input(at + " = " + brief(v) + " out of range " + range_str(vocab));
      if (out) out->push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    seen += static_cast<int64_t>(ids->size());
    if (want > 0 && seen >= want) break;
    if (max_bytes > 0 && in.consumed() >= max_bytes) {
      *complete = in.consumed() >= in.size();
      break;
    }
  }
  if (in.bad()) return io_error(path + ": read failed");
  return seen;
}

Result<int64_t> read_u32(const std::string& path, int64_t vocab, int64_t want,
                         std::vector<int32_t>* out, uint64_t max_bytes, bool* complete) {
  QCAL_ASSIGN_OR_RETURN(int fd, open_input_file(path));
  FdReader in(fd);
  const uint64_t size = in.size();
  if (size % 4 != 0)
    return invalid_input(path + ": size " + std::to_string(size) +
                         " is not a multiple of 4 (a .u32 file holds 4-byte token ids)");
  uint64_t n = size / 4;
  if (want > 0) n = std::min<uint64_t>(n, static_cast<uint64_t>(want));
  *complete = true;
  if (max_bytes > 0 && n > max_bytes / 4) {
    n = max_bytes / 4;
    *complete = false;
  }
  if (out) out->reserve(n);
  constexpr uint64_t kChunk = 1 << 16;
  std::vector<unsigned char> buf(kChunk * 4);
  for (uint64_t done = 0; done < n;) {
    uint64_t c = std::min(kChunk, n - done);
    if (!in.read(reinterpret_cast<char*>(buf.data()), static_cast<size_t>(c * 4)))
      return io_error(path + ": read failed at token " + std::to_string(done));
    for (uint64_t k = 0; k < c; ++k) {
      const unsigned char* p = buf.data() + 4 * k;
      uint32_t v = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
      if (static_cast<int64_t>(v) >= vocab)
        return invalid_input(path + ": token " + std::to_string(done + k) + " = " +
                             std::to_string(v) + " out of range " + range_str(vocab));
      if (out) out->push_back(static_cast<int32_t>(v));
    }
    done += c;
  }
  return static_cast<int64_t>(n);
}

Status check_args(const std::string& path, int64_t seqlen, int64_t vocab_size) {
  if (seqlen <= 0)
    return invalid_input(path + ": seqlen must be positive, got " + std::to_string(seqlen));
  if (vocab_size <= 0 || vocab_size > (int64_t{1} << 31))
    return invalid_input(path + ": vocab_size " + std::to_string(vocab_size) + " out of range");
  if (!ends_with(path, ".jsonl") && !ends_with(path, ".u32"))
    return invalid_input(path + ": unknown token file type (expected .jsonl or .u32)");
  return Status::ok();
}

}  // namespace

Result<TokenSequences> load_token_sequences(const std::string& path, int64_t seqlen,
                                            int64_t vocab_size, int64_t max_sequences) {
  QCAL_RETURN_IF_ERROR(check_args(path, seqlen, vocab_size));
  // Overflow-safe: the parser caps nsamples and seqlen (common/limits.h).
  const int64_t want =
      max_sequences > 0 && max_sequences <= INT64_MAX / seqlen ? max_sequences * seqlen : 0;
  TokenSequences out;
  out.seqlen = seqlen;
  bool complete = true;
  if (ends_with(path, ".jsonl")) {
    QCAL_RETURN_IF_ERROR(read_jsonl(path, vocab_size, want, &out.tokens, 0, &complete).status());
  } else {
    QCAL_RETURN_IF_ERROR(read_u32(path, vocab_size, want, &out.tokens, 0, &complete).status());
  }
  const int64_t total = static_cast<int64_t>(out.tokens.size());
  if (total < seqlen)
    return invalid_input(path + ": " + std::to_string(total) +
                         " tokens, fewer than one sequence of " + std::to_string(seqlen));
  int64_t n = total / seqlen;
  if (max_sequences > 0) n = std::min(n, max_sequences);
  out.tokens.resize(static_cast<size_t>(n * seqlen));
  out.tokens.shrink_to_fit();
  return out;
}

Result<TokenFileCheck> check_token_file(const std::string& path, int64_t seqlen, int64_t vocab_size,
                                        int64_t max_sequences, uint64_t max_bytes) {
  QCAL_RETURN_IF_ERROR(check_args(path, seqlen, vocab_size));
  const int64_t want =
      max_sequences > 0 && max_sequences <= INT64_MAX / seqlen ? max_sequences * seqlen : 0;
  TokenFileCheck c;
  {
    QCAL_ASSIGN_OR_RETURN(int fd, open_input_file(path));
    struct stat st {};
    if (::fstat(fd, &st) == 0) c.file_bytes = static_cast<uint64_t>(st.st_size);
    ::close(fd);
  }
  bool complete = true;
  if (ends_with(path, ".jsonl")) {
    QCAL_ASSIGN_OR_RETURN(c.tokens,
                          read_jsonl(path, vocab_size, want, nullptr, max_bytes, &complete));
  } else {
    QCAL_ASSIGN_OR_RETURN(c.tokens,
                          read_u32(path, vocab_size, want, nullptr, max_bytes, &complete));
  }
  c.complete = complete || (want > 0 && c.tokens >= want);
  c.bytes_checked = std::min<uint64_t>(c.file_bytes, max_bytes > 0 ? max_bytes : c.file_bytes);
  if (c.complete && c.tokens < seqlen)
    return invalid_input(path + ": " + std::to_string(c.tokens) +
                         " tokens, fewer than one sequence of " + std::to_string(seqlen));
  return c;
}

Status write_tokens_jsonl(const std::string& path, const std::vector<int32_t>& tokens,
                          int64_t per_line) {
  if (per_line <= 0)
    return invalid_input(path + ": per_line must be positive, got " + std::to_string(per_line));
  std::string s;
  for (size_t i = 0; i < tokens.size(); i += static_cast<size_t>(per_line)) {
    size_t end = std::min(tokens.size(), i + static_cast<size_t>(per_line));
    s += "{\"input_ids\": [";
    for (size_t k = i; k < end; ++k) {
      if (k > i) s += ", ";
      s += std::to_string(tokens[k]);
    }
    s += "]}\n";
  }
  return write_file_atomic(path, s);
}

}  // namespace qcal

#include "common/data.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/fsutil.h"

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

// Appends ids from a .jsonl file to `out`, stopping early once `want` tokens
// are there (want <= 0: read everything).
Status read_jsonl(const std::string& path, int64_t vocab, int64_t want, std::vector<int32_t>* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(path + ": cannot open");
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(lineno) + ": ";
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
      out->push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    if (want > 0 && static_cast<int64_t>(out->size()) >= want) break;
  }
  if (in.bad()) return io_error(path + ": read failed");
  return Status::ok();
}

Status read_u32(const std::string& path, int64_t vocab, int64_t want, std::vector<int32_t>* out) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return not_found(path + ": cannot open");
  const auto size = static_cast<uint64_t>(in.tellg());
  if (size % 4 != 0)
    return invalid_input(path + ": size " + std::to_string(size) + " is not a multiple of 4");
  in.seekg(0);
  uint64_t n = size / 4;
  if (want > 0) n = std::min<uint64_t>(n, static_cast<uint64_t>(want));
  out->reserve(n);
  constexpr uint64_t kChunk = 1 << 16;
  std::vector<unsigned char> buf(kChunk * 4);
  for (uint64_t done = 0; done < n;) {
    uint64_t c = std::min(kChunk, n - done);
    if (!in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(c * 4)))
      return io_error(path + ": read failed at token " + std::to_string(done));
    for (uint64_t k = 0; k < c; ++k) {
      const unsigned char* p = buf.data() + 4 * k;
      uint32_t v = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
      if (static_cast<int64_t>(v) >= vocab)
        return invalid_input(path + ": token " + std::to_string(done + k) + " = " +
                             std::to_string(v) + " out of range " + range_str(vocab));
      out->push_back(static_cast<int32_t>(v));
    }
    done += c;
  }
  return Status::ok();
}

}  // namespace

Result<TokenSequences> load_token_sequences(const std::string& path, int64_t seqlen,
                                            int64_t vocab_size, int64_t max_sequences) {
  if (seqlen <= 0)
    return invalid_input(path + ": seqlen must be positive, got " + std::to_string(seqlen));
  if (vocab_size <= 0 || vocab_size > (int64_t{1} << 31))
    return invalid_input(path + ": vocab_size " + std::to_string(vocab_size) + " out of range");
  const int64_t want = max_sequences > 0 ? max_sequences * seqlen : 0;
  TokenSequences out;
  out.seqlen = seqlen;
  if (ends_with(path, ".jsonl")) {
    QCAL_RETURN_IF_ERROR(read_jsonl(path, vocab_size, want, &out.tokens));
  } else if (ends_with(path, ".u32")) {
    QCAL_RETURN_IF_ERROR(read_u32(path, vocab_size, want, &out.tokens));
  } else {
    return invalid_input(path + ": unknown token file type (expected .jsonl or .u32)");
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

#include "common/sanitize.h"

#include <cstdio>

namespace qcal {

namespace {

// Length of the well-formed UTF-8 sequence starting at s[i], or 0 when the
// byte there does not start one (RFC 3629 table 3-7: no overlong forms, no
// surrogates, nothing above U+10FFFF).
size_t utf8_sequence(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const auto cont = [&](size_t k) { return i + k < s.size() && (b(k) & 0xC0) == 0x80; };
  const auto in = [&](size_t k, unsigned lo, unsigned hi) {
    return i + k < s.size() && b(k) >= lo && b(k) <= hi;
  };
  const unsigned c = b(0);
  if (c < 0x80) return c == 0 ? 0 : 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return in(1, 0xA0, 0xBF) && cont(2) ? 3 : 0;
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xED) return in(1, 0x80, 0x9F) && cont(2) ? 3 : 0;
  if (c == 0xF0) return in(1, 0x90, 0xBF) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return in(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

void append_hex(std::string* out, unsigned char c, const char* prefix) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%s%02X", prefix, c);
  *out += buf;
}

// Cuts `s` (valid UTF-8) to at most `max_bytes`, marking the cut.
void cap(std::string* s, size_t max_bytes) {
  if (max_bytes == 0 || s->size() <= max_bytes) return;
  const size_t total = s->size();
  std::string suffix;
  size_t keep = 0;
  // The suffix names the bytes removed, which depends on where the cut lands:
  // two passes settle it (the digits of the count change by at most one).
  for (int pass = 0; pass < 3; ++pass) {
    suffix = "... [" + std::to_string(total - keep) + " bytes truncated]";
    keep = max_bytes > suffix.size() ? max_bytes - suffix.size() : 0;
    while (keep > 0 && (static_cast<unsigned char>((*s)[keep]) & 0xC0) == 0x80) --keep;
  }
  suffix = "... [" + std::to_string(total - keep) + " bytes truncated]";
  s->resize(keep);
  *s += suffix;
  if (s->size() > max_bytes && max_bytes >= 3) {
    s->resize(max_bytes - 3);  // a pathological tiny cap: still never exceed it
    while (!s->empty() && (static_cast<unsigned char>(s->back()) & 0xC0) == 0x80) s->pop_back();
    *s += "...";
  }
}

}  // namespace

bool is_clean_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_sequence(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string sanitize_text(std::string_view s, size_t max_bytes) {
  std::string out;
  if (is_clean_utf8(s)) {
    out.assign(s);
  } else {
    out.reserve(s.size() + 16);
    for (size_t i = 0; i < s.size();) {
      const size_t n = utf8_sequence(s, i);
      if (n == 0) {
        append_hex(&out, static_cast<unsigned char>(s[i]), "\\x");
        ++i;
      } else {
        out.append(s.substr(i, n));
        i += n;
      }
    }
  }
  cap(&out, max_bytes);
  return out;
}

nlohmann::json sanitize_json(const nlohmann::json& j, size_t max_string_bytes) {
  using json = nlohmann::json;
  switch (j.type()) {
    case json::value_t::string:
      return sanitize_text(j.get_ref<const std::string&>(), max_string_bytes);
    case json::value_t::array: {
      json out = json::array();
      for (const auto& v : j) out.push_back(sanitize_json(v, max_string_bytes));
      return out;
    }
    case json::value_t::object: {
      json out = json::object();
      for (auto it = j.begin(); it != j.end(); ++it)
        out[sanitize_text(it.key(), max_string_bytes)] = sanitize_json(*it, max_string_bytes);
      return out;
    }
    case json::value_t::number_float: {
      // NaN / Inf are not JSON: dump() would write "null" anyway; say so explicitly.
      const double d = j.get<double>();
      return d == d && d - d == 0 ? j : json(nullptr);
    }
    default: return j;
  }
}

std::string terminal_safe(std::string_view s, bool keep_newlines) {
  const std::string clean = sanitize_text(s);
  std::string out;
  out.reserve(clean.size());
  for (size_t i = 0; i < clean.size(); ++i) {
    const auto c = static_cast<unsigned char>(clean[i]);
    if (c < 0x20 || c == 0x7F) {
      if (keep_newlines && (c == '\n' || c == '\t')) {
        out += static_cast<char>(c);
      } else {
        append_hex(&out, c, "\\x");
      }
    } else if (c == 0xC2 && i + 1 < clean.size() &&
               static_cast<unsigned char>(clean[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(clean[i + 1]) <= 0x9F) {
      // C1 controls (U+0080..U+009F; 0x9B is a one-byte CSI on some terminals).
      append_hex(&out, static_cast<unsigned char>(clean[i + 1]), "\\u00");
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

}  // namespace qcal

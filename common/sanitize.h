// Text that came from files, errors or users, made safe to store and to show.
//
// Two uses, one module (issue #11 "nothing poisoned"):
//  - Storage: everything JobStore writes to Redis (errors, log lines, labels,
//    results, reports) goes through sanitize_text / sanitize_json, so what is
//    stored is valid UTF-8 and bounded in length, and JSON serialization of it
//    can never fail. Reads run the same functions over what they find, so data
//    stored before this existed (or written by another tool) never makes a
//    read fail.
//  - Display: the CLI prints server-provided strings through terminal_safe, so
//    a label or error holding terminal escape sequences is shown, not obeyed.
//
// Escaping is reversible to the eye and unambiguous: an invalid UTF-8 byte
// becomes the four characters `\xFF` (upper-case hex); a backslash is left as
// is (it is valid UTF-8), so `\xFF` in the output means either the byte or the
// literal text — good enough for messages, which are never parsed back.
//
// Thread safety: pure functions.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace qcal {

// Caps on what the job store keeps (bytes of UTF-8 after escaping). Longer
// text is cut at a character boundary and ends with
// "... [N bytes truncated]". Documented in README.md ("Limits").
inline constexpr size_t kMaxErrorBytes = 4096;        // job / task errors
inline constexpr size_t kMaxLogLineBytes = 2048;      // one job log line
inline constexpr size_t kMaxResultBytes = 4u << 20;   // a task result, serialized
inline constexpr size_t kMaxReportBytes = 1u << 20;   // a job report, serialized
inline constexpr size_t kMaxJsonStringBytes = 65536;  // one string inside a result / report

// `s` with every byte that is not part of a well-formed UTF-8 sequence
// (overlong forms, surrogates, code points above U+10FFFF, truncated
// sequences) replaced by `\xNN`, and NUL bytes replaced by `\x00`; then
// capped at `max_bytes` (0 = no cap) as described above. Idempotent on its
// own output (when uncut).
std::string sanitize_text(std::string_view s, size_t max_bytes = 0);

// True when `s` is well-formed UTF-8 without NUL bytes (sanitize_text(s) == s).
bool is_clean_utf8(std::string_view s);

// A copy of `j` with every string (values and object keys) passed through
// sanitize_text(·, max_string_bytes). Never throws; nlohmann::json::dump() of
// the result never throws either.
nlohmann::json sanitize_json(const nlohmann::json& j,
                             size_t max_string_bytes = kMaxJsonStringBytes);

// `s` for a terminal: sanitize_text, then C0 control characters (except
// '\n' and '\t' when `keep_newlines`), DEL and the C1 controls U+0080..U+009F
// shown as `\xNN` / `\u00NN`. ESC can then never start a terminal sequence.
std::string terminal_safe(std::string_view s, bool keep_newlines = false);

}  // namespace qcal

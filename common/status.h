// Status and Result<T>: how every module boundary reports failure.
//
// Codes are chosen by what the caller should do about the failure:
//   kInvalidInput  - the user's input is wrong (bad flag, malformed file, shape
//                    mismatch). Fail the job and show the message. Never retry.
//   kNotFound      - a named file/tensor/job does not exist. Same reaction.
//   kCorrupt       - stored data fails a check (checksum, header bounds). The
//                    producer of that data should be re-run.
//   kUnavailable   - a dependency is briefly gone (Redis, GPU). Retry as is.
//   kResourceExhausted - does not fit (memory, disk). Fail with the numbers.
//   kIoError       - the OS refused a read/write. Retry the task.
//   kInternal      - a bug or a numerical failure we could not recover from.
//
// Messages name the thing and the problem, e.g.
//   "m/model.safetensors: header length 9999 runs past end of file (size 120)".
#pragma once

#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace qcal {

enum class Code {
  kOk = 0,
  kInvalidInput,
  kNotFound,
  kCorrupt,
  kUnavailable,
  kResourceExhausted,
  kIoError,
  kInternal,
  // The caller may not do this (a path outside the allowed roots): HTTP 403.
  kPermissionDenied,
  // The request conflicts with live state (an output path owned by a live job): HTTP 409.
  kConflict,
};

const char* code_name(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}

  static Status ok() { return Status(); }
  bool is_ok() const { return code_ == Code::kOk; }
  explicit operator bool() const { return is_ok(); }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }
  // "INVALID_INPUT: <message>"
  std::string to_string() const;
  // Returns a copy whose message is prefixed with `context + ": "`.
  Status with_context(const std::string& context) const;

 private:
  Code code_ = Code::kOk;
  std::string msg_;
};

inline Status invalid_input(std::string m) { return {Code::kInvalidInput, std::move(m)}; }
inline Status not_found(std::string m) { return {Code::kNotFound, std::move(m)}; }
inline Status corrupt(std::string m) { return {Code::kCorrupt, std::move(m)}; }
inline Status io_error(std::string m) { return {Code::kIoError, std::move(m)}; }
inline Status internal_error(std::string m) { return {Code::kInternal, std::move(m)}; }
inline Status resource_exhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
inline Status unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status permission_denied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
inline Status conflict(std::string m) { return {Code::kConflict, std::move(m)}; }

// A value or a non-OK Status. Accessing value() of an error aborts (a bug).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit on purpose
  Result(Status s) : v_(std::move(s)) {      // NOLINT
    if (std::get<Status>(v_).is_ok()) std::abort();  // an OK status carries no value
  }
  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }
  const Status& status() const {
    static const Status kOk;
    return is_ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & {
    if (!is_ok()) std::abort();
    return std::get<T>(v_);
  }
  const T& value() const& {
    if (!is_ok()) std::abort();
    return std::get<T>(v_);
  }
  T&& value() && {
    if (!is_ok()) std::abort();
    return std::get<T>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace qcal

#define QCAL_CONCAT_INNER(a, b) a##b
#define QCAL_CONCAT(a, b) QCAL_CONCAT_INNER(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define QCAL_RETURN_IF_ERROR(expr)          \
  do {                                      \
    ::qcal::Status _qcal_st = (expr);       \
    if (!_qcal_st.is_ok()) return _qcal_st; \
  } while (0)

// `QCAL_ASSIGN_OR_RETURN(auto x, make_x());`
#define QCAL_ASSIGN_OR_RETURN(lhs, expr) \
  QCAL_ASSIGN_OR_RETURN_IMPL(QCAL_CONCAT(_qcal_res_, __LINE__), lhs, expr)
#define QCAL_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.is_ok()) return tmp.status();           \
  lhs = std::move(tmp).value()

// Programmer invariants only (never for user input): prints file:line and aborts.
#define QCAL_CHECK(cond)                                                           \
  do {                                                                             \
    if (!(cond)) ::qcal::detail::check_failed(__FILE__, __LINE__, #cond, nullptr); \
  } while (0)
#define QCAL_CHECK_MSG(cond, msg)                                               \
  do {                                                                          \
    if (!(cond)) ::qcal::detail::check_failed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)

namespace qcal::detail {
[[noreturn]] void check_failed(const char* file, int line, const char* cond, const char* msg);
}

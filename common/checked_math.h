// Overflow-checked unsigned arithmetic for size and memory estimates.
//
// The planner multiplies user-controlled numbers (sequences × tokens × hidden
// × bytes); a wrap-around turns a petabyte estimate into a few megabytes and
// lets a job through that then dies in std::bad_alloc on every worker (issue
// #11). CheckedU64 carries the first overflow along, with the operands that
// caused it, so one check at the end of a formula names the numbers:
//
//   CheckedU64 x = CheckedU64(N) * T * H * 4;
//   if (x.overflowed()) return resource_exhausted("activations: " + x.error());
//   uint64_t bytes = x.value();
//
// Thread safety: value types.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

namespace qcal {

// a * b, or false when it does not fit in 64 bits.
inline bool mul_u64(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}
inline bool add_u64(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_add_overflow(a, b, out);
}

class CheckedU64 {
 public:
  CheckedU64() = default;
  CheckedU64(uint64_t v) : v_(v) {}  // NOLINT: implicit, so formulas read naturally

  bool overflowed() const { return overflow_; }
  // The value; meaningless (saturated at UINT64_MAX) after an overflow.
  uint64_t value() const { return overflow_ ? std::numeric_limits<uint64_t>::max() : v_; }
  // "2305843009213693952 x 2048 overflows 64 bits" (the first overflow), or "".
  const std::string& error() const { return why_; }

  friend CheckedU64 operator*(CheckedU64 a, CheckedU64 b) { return a.combine(b, '*'); }
  friend CheckedU64 operator+(CheckedU64 a, CheckedU64 b) { return a.combine(b, '+'); }
  CheckedU64& operator*=(CheckedU64 b) { return *this = *this * b; }
  CheckedU64& operator+=(CheckedU64 b) { return *this = *this + b; }

 private:
  CheckedU64 combine(const CheckedU64& b, char op) const {
    if (overflow_) return *this;
    if (b.overflow_) return b;
    CheckedU64 r;
    const bool ok = op == '*' ? mul_u64(v_, b.v_, &r.v_) : add_u64(v_, b.v_, &r.v_);
    if (!ok) {
      r.overflow_ = true;
      r.why_ = std::to_string(v_) + (op == '*' ? " x " : " + ") + std::to_string(b.v_) +
               " overflows 64 bits";
    }
    return r;
  }

  uint64_t v_ = 0;
  bool overflow_ = false;
  std::string why_;
};

}  // namespace qcal

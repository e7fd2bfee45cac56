#include "common/hadamard_orders.h"

namespace qcal {

namespace {
// kernels/hadamard.cc's orders, in its search order.
constexpr int64_t kOrders[] = {172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12};
bool is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }
}  // namespace

bool orthogonal_order_available(int64_t n) {
  if (n <= 0) return false;
  for (int64_t K : kOrders) {
    if (n % K == 0) return is_pow2(n / K);
  }
  return is_pow2(n);
}

std::string orthogonal_orders_description() {
  return "is not K·2^m for K in {1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172}";
}

}  // namespace qcal

// Which sizes QuaRot / SpinQuant / FlatQuant's online Hadamards can be built
// for: the pure size rule of kernels/hadamard.h, here so that the recipe's
// checks (and so the coordinator) need no numerics.
#pragma once

#include <cstdint>
#include <string>

namespace qcal {

// True iff kernels/hadamard.h can build an orthogonal matrix of order n for
// the rotations (a Hadamard matrix, or its orthogonal fallback).
bool orthogonal_order_available(int64_t n);
// The rule as words, for error messages ("is not K·2^m for K in {...}").
std::string orthogonal_orders_description();

}  // namespace qcal

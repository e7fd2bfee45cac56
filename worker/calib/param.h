// Parameterizations and optimizers of the learned transforms (methods.md §4.4,
// §5.1, §5.3, §5.7, §11.5), in float64 where they touch matrix inverses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/recipe.h"
#include "common/rng.h"
#include "common/status.h"

namespace qcal::calib {

// ---- Small dense linear algebra, row-major n×n, double.
// Solves A X = B for X (n×m) by LU with partial pivoting; false if singular.
bool lu_solve(std::vector<double> A, std::vector<double>& B, int64_t n, int64_t m);
// Random orthogonal Q (n×n): QR of a Gaussian matrix, sign-fixed by sign(diag R).
std::vector<double> random_orthogonal(int64_t n, Rng& rng);
// max_ij |A Aᵀ − I| (orthogonality error).
double orthogonality_error(const std::vector<double>& A, int64_t n);

// decompose_dim (FlatQuant's Kronecker split) is common/recipe.h's.

// ---- Cayley map (PyTorch orthogonal(..., "cayley", use_trivialization=False)):
// T = tril(raw), A = T − Tᵀ, U = (I − A/2)⁻¹ (I + A/2).
std::vector<double> cayley(const std::vector<double>& raw, int64_t n);
// d raw given dU (same shapes): ∂A = ½ M⁻ᵀ G (I + U)ᵀ, ∂T = ∂A − ∂Aᵀ, ∂raw = tril(∂T).
std::vector<double> cayley_bwd(const std::vector<double>& raw, const std::vector<double>& dU,
                               int64_t n);

// ---- One FlatQuant factor P = U diag(σ) Vᵀ, U = cayley(u_raw), V = cayley(v_raw);
// P⁻ᵀ = U diag(1/σ) Vᵀ. Initialization (§5.1): u_raw, v_raw = random orthogonal
// (so the effective U is Cayley of it, a random rotation), σ = 1.
struct SvdFactor {
  int64_t n = 0;
  std::vector<double> u_raw, v_raw, sigma;  // n×n, n×n, n

  static SvdFactor init_random(int64_t n, Rng& rng);
  static SvdFactor init_identity(int64_t n);  // P = I exactly (raw = 0)
  // P and P⁻ᵀ (n×n).
  void materialize(std::vector<double>* P, std::vector<double>* P_it) const;
  // Gradients of raw parameters from dP and dP⁻ᵀ (either may be empty = 0).
  void backward(const std::vector<double>& dP, const std::vector<double>& dP_it,
                std::vector<double>* du_raw, std::vector<double>* dv_raw,
                std::vector<double>* dsigma) const;
  size_t num_params() const { return 2 * static_cast<size_t>(n * n) + static_cast<size_t>(n); }
};

// ---- AdamW (PyTorch semantics: decoupled weight decay p ← p − lr·wd·p, bias-corrected
// moments) over flat parameter groups. Parameters are fp64 masters.
struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};
class AdamW {
 public:
  explicit AdamW(AdamWOptions o = {}) : o_(o) {}
  // Registers a parameter tensor; returns its id. `lr_scale` multiplies the schedule's lr
  // (FlatQuant: 1 for transforms and diagonals, 10 for clip parameters).
  int add(std::vector<double>* param, double lr_scale = 1.0);
  // One step with learning rate lr·lr_scale on every parameter whose gradient is given
  // (grads[id] same size as the parameter; an empty gradient skips that parameter, as
  // PyTorch skips parameters with no grad).
  void step(const std::vector<std::vector<double>>& grads, double lr);
  int64_t steps() const { return t_; }

 private:
  AdamWOptions o_;
  struct Slot {
    std::vector<double>* p;
    double lr_scale;
    std::vector<double> m, v;
    int64_t t = 0;
  };
  std::vector<Slot> slots_;
  int64_t t_ = 0;
};

// CosineAnnealingLR: lr(t) = eta_min + (base − eta_min)(1 + cos(π t / t_max))/2.
double cosine_lr(double base, double eta_min, int64_t t, int64_t t_max);

// ---- SpinQuant's Cayley SGD on the Stiefel manifold (§4.4), one step in place on
// R (n×n) with gradient G; exact Cayley solve instead of 5 fixed-point iterations.
// `reorth` forces the QR re-orthonormalization (the reference does it with p = 1/101).
void stiefel_sgd_step(std::vector<double>& R, const std::vector<double>& G, int64_t n, double lr,
                      bool reorth);

// ---- Data parallel: one sum across the ranks for many arrays of a training step.
struct SumSpan {
  double* data;
  size_t n;
};
// Packs the spans in order into one buffer, sums it across the ranks with `sum` (an
// in-place sum of n doubles: method.h SumFn) and writes the sums back into the spans.
Status sum_spans(const std::function<Status(double* data, int64_t n)>& sum,
                 const std::vector<SumSpan>& spans);

}  // namespace qcal::calib

// Forward primitives of a LLaMA decoder block, fp32, row-major. Each has a
// scalar fp64 reference (`*_ref`, double in/out) that the fast version is
// tested against. Letters: T tokens, C channels, n_h query heads, n_kv KV
// heads, d head dim.
#pragma once

#include <cstdint>

namespace qcal {

// out(rows,C) = gamma ⊙ x / sqrt(mean(x²) + eps); fp32 accumulation of mean(x²)
// in double. out may alias x.
void rmsnorm_forward(float* out, const float* x, const float* gamma, int64_t rows, int64_t C,
                     float eps);
void rmsnorm_forward_ref(double* out, const double* x, const double* gamma, int64_t rows,
                         int64_t C, double eps);

// HF rotate-half RoPE, in place on x (T, n_heads*d): token t has position
// `pos0 + t`; pairs (i, i + d/2) rotate by angle pos * theta^(-2i/d).
void rope_forward(float* x, int64_t T, int64_t n_heads, int64_t d, int64_t pos0, double theta);
void rope_forward_ref(double* x, int64_t T, int64_t n_heads, int64_t d, int64_t pos0,
                      double theta);

// Causal GQA attention for one sequence. q (T, n_h*d), k/v (T, n_kv*d),
// out (T, n_h*d); query head h reads KV head h / (n_h / n_kv); scale 1/sqrt(d);
// softmax in fp32 with max subtraction.
void attention_forward(float* out, const float* q, const float* k, const float* v, int64_t T,
                       int64_t n_h, int64_t n_kv, int64_t d);
void attention_forward_ref(double* out, const double* q, const double* k, const double* v,
                           int64_t T, int64_t n_h, int64_t n_kv, int64_t d);

// out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)). out may alias gate.
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);
void swiglu_forward_ref(double* out, const double* gate, const double* up, int64_t n);

// In place: row ← log_softmax(row), for `rows` rows of length V.
void log_softmax_rows(float* x, int64_t rows, int64_t V);
void log_softmax_rows_ref(double* x, int64_t rows, int64_t V);

}  // namespace qcal

// The planner's memory model (issue #10 part 4): what each task holds at its
// peak, as a sum of named terms, each a method's (the registry rows' `memory`
// functions, common/method_registry.h). The formulas mirror the code: the
// QBlock forward / training tape of worker/calib/qblock.cc, GPTQ's Hessians
// and solver (worker/engine/gptq.cc), the CBQ window (worker/calib/cbq.cc), the
// whole-model trainers; tests/unit/test_memory_model.cc runs every task type on
// generated models of two sizes and holds measured peak RSS within ±25% of the
// estimate. All arithmetic saturates at 2^64 − 1 (a plan that large is refused).
//
// Phases: a part named "phase/name" (deploy/…, stream/…, solve/…, check/…,
// train/…) is held only during that phase of the task, which frees it before the
// next phase starts; the other parts are held throughout. A task's peak is the sum
// of the parts held throughout plus the largest phase's sum (mem_peak).
//
// Letters (MemCtx): P = block_params, Lp = linear_params, m = micro (sequences
// per forward), t = train_micro (per training forward/backward), T tokens,
// H, I, Q = n_h·d, K = n_kv·d, V vocab, n_h heads, k = window blocks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/method_registry.h"
#include "common/model_config.h"

namespace qcal {

// What any task process holds before its own data (code, libraries, allocator).
inline constexpr uint64_t kProcessBaseBytes = 48ull << 20;

// a·b and a + b, saturating at UINT64_MAX.
uint64_t sat_mul(uint64_t a, uint64_t b);
uint64_t sat_add(uint64_t a, uint64_t b);

// The phase of a part's name ("stream/forward" → "stream"; "" when held throughout).
std::string mem_phase_of(const std::string& part);
// The peak of a task's parts (see Phases above), saturating.
uint64_t mem_peak(const std::vector<MemPart>& parts);

// The sizes of `c` for the terms (micro, train_micro, window, N, T... left for the caller).
MemCtx mem_ctx(const ModelConfig& c);

// Bytes of a QBlock forward's working set for `tokens` tokens of sequences of T
// (activations of every stage, attention scores of one sequence at a time).
// With `quantized` (the deployed block of an A-quantized recipe), each linear's
// act-quantized input (q, k, v, gate, up each their own) and the online transforms'
// outputs too.
uint64_t block_forward_bytes(const MemCtx& m, uint64_t tokens, bool quantized = false);
// Bytes a QBlock<float> training forward + backward keeps (the tape: every stage's
// activations, the attention probabilities, transformed and fake-quantized weights,
// the gradients) for `tokens` tokens.
uint64_t block_train_bytes(const MemCtx& m, uint64_t tokens, bool transformed_weights);

// The registry rows' terms (see method_registry.cc for which row uses which).
void memory_terms_core(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts);
void memory_terms_rotation(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts);
void memory_terms_spinquant(const MemCtx& m, const std::string& task,
                            std::vector<MemPart>* parts);
void memory_terms_flatquant(const MemCtx& m, const std::string& task,
                            std::vector<MemPart>* parts);
void memory_terms_gptq(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts);
void memory_terms_cbq(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts);
void memory_terms_intactkv(const MemCtx& m, const std::string& task, std::vector<MemPart>* parts);

}  // namespace qcal

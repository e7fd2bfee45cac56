// A seeded generator of structured token sequences for training the tiny
// fixture models (`qcal synth-grammar`, tools/make_fixtures.sh): a mixture of
// five segment kinds over a fixed 256-token vocabulary, each needing a
// different skill, so that a small transformer reaches a perplexity far below
// the vocabulary size and attention matters.
//
// Every sequence is exactly `seqlen` tokens: BOS (id 1) followed by segments
// drawn i.i.d. until the sequence is full (the last one is cut). Segments:
//   sentence  (p 0.25) a PCFG: S → NP_n VP_n "."; NP_n → Det Adj* Noun_n [PP];
//             PP → Prep NP_m (nesting ≤ 2); VP_n → Verb_n [NP_m]. The verb agrees
//             in number with the head noun of the subject across any PP and
//             follows that noun's preferences (long-range agreement); a noun
//             follows its adjective's, the verb's (objects) or the determiner's
//             preferences (selection across intervening words). Words are
//             Zipf-distributed (exponent 1.8) where no preference applies.
//   lookup    (p 0.15) <kv> k1 v1 .. kn vn <q> kj vj (x4) "." (n in 2..6
//             distinct keys of 16, values of 16): each answer is the value
//             listed for its key (associative recall).
//   brackets  (p 0.15) <br> then a Dyck word over 4 bracket pairs (depth ≤ 4)
//             with filler words (mostly the innermost bracket's own word), "."
//             when balanced; every closing bracket is determined by the stack.
//   copy      (p 0.20) <copy> x1 .. xk <rep> x1 .. xk "." (k in 3..8, 16 symbols):
//             the second half repeats the first (induction).
//   count     (p 0.25) <count> a, a+s, a+2s, ... (mod 48) "." (s in 1..3,
//             4..10 numbers): arithmetic progressions.
// The generator's NLL (below) is ~1.48 nats/token (ppl ~4.4); without the
// recall of lookups and copies it would be ~1.86 (ppl ~6.4).
// The grammar's tables (verb preferences, Zipf ranks) are fixed, independent of
// the data seed, so train / calibration / evaluation files of different seeds
// are samples of the same language.
//
// Every latent choice of the generator is revealed by the token it emits, so
// the probability the generator assigned to each emitted token is exactly the
// conditional probability given the sequence so far: the sum of their
// negative logs is the NLL of the Bayes-optimal predictor, the floor no model
// can beat (GrammarStats::optimal_nll).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal::calib {

// Token layout (ids < kGrammarVocab).
inline constexpr int32_t kGrammarVocab = 256;
inline constexpr int32_t kGrammarBos = 1;
inline constexpr int32_t kGrammarEos = 2;  // reserved (never emitted)

struct GrammarStats {
  int64_t sequences = 0;
  int64_t tokens = 0;      // sequences · seqlen
  int64_t predicted = 0;   // sequences · (seqlen − 1): tokens after the first
  double optimal_nll = 0;  // mean −log p(token | prefix) over predicted tokens (nats)
  double optimal_ppl = 0;  // exp(optimal_nll)
};

// `count` sequences of `seqlen` tokens (row-major), each starting with BOS.
// Deterministic in (count, seqlen, seed): sequence i depends only on seed and i.
// Empty when count ≤ 0 or seqlen < 2. `stats` (optional) receives the
// generator's exact NLL.
std::vector<int32_t> grammar_sequences(int64_t count, int64_t seqlen, uint64_t seed,
                                       GrammarStats* stats = nullptr);

// Writes tokens as a .u32 file (little-endian uint32, the format of
// common/data.h), atomically. kInvalidInput for a negative id.
Status write_tokens_u32(const std::string& path, const std::vector<int32_t>& tokens);

}  // namespace qcal::calib

// Token data for calibration and evaluation: `.jsonl` files with one
// {"input_ids": [...]} object per line, or `.u32` raw little-endian uint32
// token streams. All tokens are concatenated in file order and cut into
// consecutive, non-overlapping sequences of `seqlen` tokens (a trailing
// remainder shorter than seqlen is dropped).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

struct TokenSequences {
  int64_t seqlen = 0;
  std::vector<int32_t> tokens;  // (num_sequences, seqlen) row-major
  int64_t count() const { return seqlen ? static_cast<int64_t>(tokens.size()) / seqlen : 0; }
  const int32_t* seq(int64_t i) const { return tokens.data() + i * seqlen; }
};

// Loads `path` (format by extension: .jsonl or .u32), checks every id is in
// [0, vocab_size), and returns at most `max_sequences` sequences (all if <= 0).
// The file is opened with open_input_file (a regular file inside the process
// policy's roots; a FIFO is refused, never waited on).
// Errors name the file, the line (jsonl) or token index, and the problem:
// malformed JSON, missing input_ids, non-integer id, id out of range, file size
// not a multiple of 4 (.u32), fewer tokens than one sequence.
Result<TokenSequences> load_token_sequences(const std::string& path, int64_t seqlen,
                                            int64_t vocab_size, int64_t max_sequences = 0);

// What check_token_file found.
struct TokenFileCheck {
  uint64_t file_bytes = 0;
  uint64_t bytes_checked = 0;  // < file_bytes when the scan stopped at max_bytes
  int64_t tokens = 0;          // tokens seen (all of them when the scan was complete)
  bool complete = false;       // the whole file (or enough for max_sequences) was read
};
// The submit-time check of a token file (the coordinator, before a job is
// accepted): the same parsing and errors as load_token_sequences (a .u32 size
// not a multiple of 4, malformed JSON at line N, ids out of [0, vocab_size)),
// without keeping the tokens, reading at most `max_bytes` of the file
// (limits::kSubmitScanBytes) and stopping once `max_sequences` sequences of
// `seqlen` are there (<= 0: all). kInvalidInput naming the file, and the
// line for .jsonl; fewer tokens than one sequence is an error only when the
// scan was complete.
Result<TokenFileCheck> check_token_file(const std::string& path, int64_t seqlen, int64_t vocab_size,
                                        int64_t max_sequences, uint64_t max_bytes);

// Writes tokens as .jsonl, one line per chunk of `per_line` tokens (for demos).
Status write_tokens_jsonl(const std::string& path, const std::vector<int32_t>& tokens,
                          int64_t per_line);

}  // namespace qcal

// The manifest that marks a directory as one qcal published:
// `<output>/.qcal-output.json`, written LAST into the staging directory (after
// every other file is complete and fsynced), so its presence in a published
// directory means "qcal wrote all of this".
//
// Format (JSON object, version 1):
//   {"format": "qcal.output", "version": 1,
//    "writer": "qcal-worker" | "qcal <cmd>",
//    "job": "j-...", "task": "assemble", "attempt": 2,   // service outputs only
//    "generation": 17,                                    // ditto: the output key's
//    "published_at": 1718000000.25}                       //   generation (job_store.h)
// An output written outside the service (qcal quantize, synth, ...) carries
// only format, version and writer, so equal inputs give identical directories.
//
// Rules built on it (issue #11): an existing directory may be replaced only if
// it carries a valid manifest (common/fsutil.h publish_dir,
// common/path_policy.h check_output, worker/publish.h); a worker publishing
// over a directory whose manifest names a newer owner (higher generation, or
// the same job and a higher attempt) swaps it back and fails.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "common/status.h"

namespace qcal {

inline constexpr const char* kOutputManifestName = ".qcal-output.json";
inline constexpr const char* kOutputManifestFormat = "qcal.output";
inline constexpr int kOutputManifestVersion = 1;

struct OutputManifest {
  std::string writer;  // "qcal-worker", "qcal quantize", ...
  std::string job, task;
  int64_t attempt = 0;
  int64_t generation = 0;  // 0 for outputs written outside the service
  double published_at = 0;

  nlohmann::json to_json() const;
  // kCorrupt naming `what` for a wrong format / version or malformed fields.
  static Result<OutputManifest> from_json(const nlohmann::json& j, const std::string& what);
  // True when this manifest's owner is strictly newer than `o`'s: a higher
  // generation, or the same job with a higher attempt.
  bool newer_than(const OutputManifest& o) const;
};

// Reads `<dir>/.qcal-output.json` (a regular file, at most 64 KiB, opened with
// open_input_file). kNotFound when absent; kCorrupt when unreadable as a manifest.
Result<OutputManifest> read_output_manifest(const std::string& dir);
// Writes the manifest into `dir` atomically (write_file_atomic).
Status write_output_manifest(const std::string& dir, const OutputManifest& m);

}  // namespace qcal

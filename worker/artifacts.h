// The artifact store: the files tasks hand to each other (activations,
// quantized linears), under one root directory (local disk, or a shared
// NFS/Lustre path when a job's workers span machines).
//
// Every artifact is written to a temporary name, fsynced, renamed into place
// (and its directory fsynced), then described by an ArtifactRef {path
// relative to the root, SHA-256 of the file, size}. The ref goes into the
// producing task's result; readers check size and checksum before parsing and
// answer kCorrupt on any mismatch, which the worker turns into a re-run of
// the producer (JobStore::rerun_producer).
//
// On-disk formats (safetensors files with a versioned magic in __metadata__;
// a reader refuses a format or version it does not know):
//
//   qcal.qlinears v1   metadata {"qcal.format": "qcal.qlinears", "qcal.version": "1",
//                      "qcal.qlinears": JSON {name: {"out": O, "in": I, "bits",
//                      "group_size", "sym", "mse_clip", "act_order"}}}
//                      per linear `name` ("model.layers.3.mlp.up_proj"):
//                        name.q      U8  (O, I)  codes in [0, 2^bits − 1]
//                        name.scales F32 (G, O)
//                        name.zeros  I32 (G, O)
//                        name.g_idx  I32 (I)
//   qcal.activations v1 metadata {"qcal.format": "qcal.activations",
//                      "qcal.version": "1", "qcal.seqlen": T}
//                        x F32 (N*T, H)  N sequences of T tokens, sequence-major
//
// Both round-trip exactly (raw fp32 / integer bytes, little-endian).
//
// Paths: callers name artifacts with task_artifact_path(), which puts the
// attempt number in the path, so a re-run (or a worker that lost its lease
// and is still writing) never overwrites a file another task already relies on.
//
// Thread safety: an ArtifactStore holds only its root and a test hook; its
// methods may be called concurrently for distinct paths.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "common/status.h"
#include "common/tensor.h"
#include "worker/calib/activations.h"
#include "worker/engine/quantizer.h"

namespace qcal {

// {"path": relative to the store root, "sha256": hex, "bytes": n} (common/plan.h).
struct ArtifactRef {
  std::string path;
  std::string sha256;
  uint64_t bytes = 0;

  nlohmann::json to_json() const;
  // kInvalidInput naming the problem when `j` is not such an object, the path
  // is absolute or contains "..", or the digest is not 64 hex characters.
  static Result<ArtifactRef> from_json(const nlohmann::json& j);
};

// Calibration activations: x (N*T, H) for N sequences of `seqlen` tokens.
struct Activations {
  Tensor x;
  int64_t seqlen = 0;
  int64_t num_sequences() const { return seqlen > 0 && x.ndim() == 2 ? x.dim(0) / seqlen : 0; }
};

inline constexpr const char* kQLinearsFormat = "qcal.qlinears";
inline constexpr const char* kActivationsFormat = "qcal.activations";
inline constexpr int kArtifactFormatVersion = 1;

// "jobs/<job>/<task>/a<attempt>/<name>": where task `task` of `job` writes its
// artifact `name` on its `attempt`-th run.
std::string task_artifact_path(const std::string& job, const std::string& task, int64_t attempt,
                               const std::string& name);

class ArtifactStore {
 public:
  explicit ArtifactStore(std::string root);

  const std::string& root() const { return root_; }
  // root/rel.
  std::string absolute(const std::string& rel) const;

  // ---- generic files
  // Writes `bytes` to root/rel atomically (parent directories created) and
  // returns its ref. kInvalidInput for a bad `rel`; kIoError from the
  // filesystem, a full disk included (the task is retried once space is
  // back: failed attempts are cleaned, old jobs swept). On error nothing
  // exists at root/rel and no temporary file is left behind.
  Result<ArtifactRef> write_blob(const std::string& rel, std::string_view bytes);
  // Reads and verifies.
  Result<std::string> read_blob(const ArtifactRef& ref) const;
  // Checks that the file exists with ref.bytes bytes and ref.sha256. kCorrupt
  // otherwise, naming the file and both sizes or both digests:
  //   "<path>: checksum mismatch: sha256 <on disk> on disk, <recorded> recorded".
  // A missing file is also kCorrupt (its producer must run again).
  Status verify(const ArtifactRef& ref) const;

  // ---- quantized linears (keys: module prefixes, as quantize_layer emits them)
  Result<ArtifactRef> write_qlinears(const std::string& rel,
                                     const std::map<std::string, QuantizedLinear>& qlinears);
  // Verifies, then parses. kCorrupt for an inconsistent file (wrong dtypes or
  // shapes, codes/zeros/g_idx out of range), kInvalidInput for an unknown
  // format version. The map equals the one written, field for field.
  Result<std::map<std::string, QuantizedLinear>> read_qlinears(const ArtifactRef& ref) const;

  // ---- activations
  // x (N*T, H) with x.dim(0) a multiple of seqlen (checked: kInvalidInput).
  Result<ArtifactRef> write_activations(const std::string& rel, const Tensor& x, int64_t seqlen);
  Result<Activations> read_activations(const ArtifactRef& ref) const;

  // ---- activations, streamed (the same qcal.activations v1 files): a writer for
  // N sequences of T tokens of width H that takes them in order (memory: none
  // beyond the caller's buffers; the SHA-256 is computed while writing), and a
  // reader that verifies the file once (a streaming pass) and then reads any
  // range of sequences with pread (the page cache, not this process, holds the file).
  class ActivationFileWriter;
  class ActivationFileReader;
  Result<std::unique_ptr<ActivationFileWriter>> create_activations(const std::string& rel,
                                                                   int64_t N, int64_t T,
                                                                   int64_t H);
  // verify = false skips the checksum pass (the caller verified the ref already).
  Result<std::unique_ptr<ActivationFileReader>> open_activations(const ArtifactRef& ref,
                                                                 bool verify = true) const;

  // Tests: called after an artifact's bytes are in its temporary file and
  // before it is published, with the final path. A non-OK status aborts the
  // write as a crash there would (the temporary file is removed, nothing
  // appears at the final path) and is returned.
  using FaultHook = std::function<Status(const std::string& path)>;
  void set_fault_hook(FaultHook hook) { fault_hook_ = std::move(hook); }

 private:
  Result<std::string> checked_path(const std::string& rel) const;
  Result<ArtifactRef> finish_ref(const std::string& rel, const std::string& path) const;

  std::string root_;
  FaultHook fault_hook_;
};

// Appends sequences to a qcal.activations file; finish() publishes it (fsync,
// rename, the ref). Destroyed without finish(): the temporary file is removed.
class ArtifactStore::ActivationFileWriter : public calib::ActivationSink {
 public:
  ~ActivationFileWriter() override;
  Status append(const float* x, int64_t n) override;
  // All N sequences must have been appended (kInternal otherwise).
  Result<ArtifactRef> finish();

 private:
  friend class ArtifactStore;
  ActivationFileWriter() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class ArtifactStore::ActivationFileReader : public calib::ActivationSource {
 public:
  ~ActivationFileReader() override;
  int64_t sequences() const override { return N_; }
  int64_t seqlen() const override { return T_; }
  int64_t width() const override { return H_; }
  // pread of the range; thread safe.
  Status read(int64_t s0, int64_t n, float* out) const override;

 private:
  friend class ArtifactStore;
  ActivationFileReader() = default;
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;
  int64_t N_ = 0, T_ = 0, H_ = 0;
};

}  // namespace qcal

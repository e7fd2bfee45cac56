// Confinement of the files a job may read and write (issue #11).
//
// qcal-coordinator and qcal-worker take `--allow-read DIR` and `--allow-write
// DIR` (repeatable). One PathPolicy, built from those roots and the artifact
// store, decides for both processes:
//
//   every path in a spec      must be absolute (no relative path can mean one
//   (model, calib.path,       file to the coordinator and another to a worker),
//   eval.path, output.path;   at most limits::kMaxPathBytes; it is resolved
//   schedule templates too)   (symlinks followed, "." and ".." folded; for a
//                             path that does not exist, the existing prefix is
//                             resolved and the rest kept as written) and the
//                             result must lie inside an allowed root and not
//                             inside the artifact store.
//   readable                  inside a read root or a write root (outputs are
//                             read back by the validate task).
//   inputs                    calib.path / eval.path: a regular file. model: a
//                             directory whose config.json, *.safetensors and
//                             index files are regular files inside the roots
//                             (a symlink into the roots is fine: Hugging Face
//                             caches are symlinks into blobs/; one out of them
//                             is refused). FIFOs, devices and sockets are refused.
//   output.path               inside a write root and not a root itself; never
//                             the store, a root or anything containing one,
//                             nor overlapping the model directory or a data
//                             file. Its nearest existing ancestor must be a
//                             directory. If it exists it must be a directory
//                             qcal published (common/output_manifest.h) and
//                             output.overwrite must be set — unless the
//                             manifest names the same job (a re-run after a
//                             crash between publishing and reporting).
//
// Errors name the field and never more about a path outside the roots than
// that it is outside: whether it exists, is a file or a directory, or what a
// symlink points at is not revealed (kPermissionDenied, HTTP 403):
//   "model: /etc is outside the directories this server may read (--allow-read)".
// Inside the roots the usual errors apply: kNotFound "... does not exist",
// kInvalidInput "... is not a regular file", "... exists (set output.overwrite ...)".
//
// Default when a process is given no --allow-* flag: nothing is readable or
// writable (every job is refused with 403 and a message naming the flags);
// README.md "Roots" explains how to set them. `qcal quantize` (embedded mode,
// the user's own files) runs unconfined(): no roots, but the same input-type
// and replace-only-qcal-outputs rules.
//
// The process policy: a process may install one policy (qcal-worker and
// qcal-coordinator do, at start). open_input_file then checks, for every file
// qcal opens for reading (safetensors, token files, config and index JSON,
// copied tokenizer files), that the file the descriptor actually refers to
// (/proc/self/fd) is inside the readable roots or the store — closing the
// window between the check at submit and the open on the worker, whatever
// was swapped in meanwhile — and opens with O_NONBLOCK, so a FIFO swapped in
// after submission is refused at once instead of blocking the worker.
//
// Thread safety: PathPolicy is immutable after make(); the process policy is
// an atomic pointer (install once at start; tests may swap it).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "common/status.h"

namespace qcal {

// A path resolved against the filesystem (see resolve_path).
struct ResolvedPath {
  std::string path;     // absolute, no symlinks in the existing prefix, no "." / ".."
  bool exists = false;  // the whole path exists (lstat of `path` succeeded)
};

// Resolves `path` (which must be absolute) like realpath(3), but tolerant of a
// missing tail: the longest existing prefix is resolved (symlinks followed, at
// most 40), the rest appended lexically; a dangling symlink is followed to
// where its target would be. kInvalidInput for a relative path or a symlink
// loop. Never fails because something does not exist.
Result<ResolvedPath> resolve_path(const std::string& path);

// True when `path` equals `root` or lies below it (both resolved, absolute).
bool path_within(const std::string& path, const std::string& root);

class PathPolicy {
 public:
  // Canonicalizes the roots (each must exist and be a directory; kInvalidInput
  // naming the flag otherwise). `store_root` may be empty (the coordinator
  // without --store); when set it is created if missing.
  static Result<PathPolicy> make(const std::vector<std::string>& read_roots,
                                 const std::vector<std::string>& write_roots,
                                 const std::string& store_root);
  // No roots enforced (embedded `qcal quantize`): every absolute or relative
  // path is allowed, the type and replace rules still hold.
  static PathPolicy unconfined();

  bool confined() const { return confined_; }
  const std::vector<std::string>& read_roots() const { return read_; }
  const std::vector<std::string>& write_roots() const { return write_; }
  const std::string& store_root() const { return store_; }

  // Resolved and inside the readable (read ∪ write) roots, not in the store.
  bool readable(const std::string& resolved) const;
  // Resolved and strictly inside a write root, not in the store.
  bool writable(const std::string& resolved) const;

  // ---- the spec's fields (see the top of this file). Each returns the
  // resolved path the job should use from then on.
  Result<std::string> check_data_file(const std::string& field, const std::string& path) const;
  Result<std::string> check_model_dir(const std::string& field, const std::string& dir) const;
  // `inputs`: resolved model dir and data files the output must not overlap.
  // `job_id`: the job the caller runs for ("" at submit): an existing output
  // whose manifest names it may be replaced without overwrite.
  Result<std::string> check_output(const std::string& field, const std::string& path,
                                   bool overwrite, const std::vector<std::string>& inputs,
                                   const std::string& job_id = "") const;

  // Every path of `spec` checked, in the order model, calib.path, eval.path,
  // output.path; returns the spec with the resolved paths.
  Result<JobSpec> confine(const JobSpec& spec, const std::string& job_id = "") const;

  // "--allow-read /a, /b; --allow-write /c; store /s" (for logs and /readyz).
  std::string describe() const;

 private:
  Status outside(const std::string& field, const std::string& path, bool write) const;
  Result<ResolvedPath> absolute(const std::string& field, const std::string& path) const;
  bool in_store(const std::string& resolved) const;

  bool confined_ = true;
  std::vector<std::string> read_, write_;
  std::string store_;
};

// ---- the process policy

// Installs `p` for this process (nullptr = unconfined, the default).
void set_process_path_policy(std::shared_ptr<const PathPolicy> p);
std::shared_ptr<const PathPolicy> process_path_policy();

// Opens `path` for reading as every qcal input is opened (see the top of this
// file): O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY, then fstat: a regular
// file, else kInvalidInput "<path>: not a regular file (a FIFO)"; with a
// process policy, the descriptor's real path must be readable or in the store,
// else kPermissionDenied "<path>: outside the directories this process may
// read". kNotFound when absent. O_NONBLOCK is cleared before returning. The
// caller owns (closes) the descriptor.
Result<int> open_input_file(const std::string& path);

// With a process policy: kPermissionDenied unless resolved `path` (which need
// not exist yet) is writable or in the store. OK without a policy.
Status check_process_write(const std::string& path);

// Copies a regular file opened with open_input_file to `to` (created, 0644,
// fsynced). For tokenizer and generation files that travel with a model.
Status copy_input_file(const std::string& from, const std::string& to);

}  // namespace qcal

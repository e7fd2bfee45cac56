// Filesystem helpers with explicit durability. Everything qcal publishes is
// written to a temporary name, fsynced, and renamed into place, so a crash
// never leaves a file (or output directory) that looks complete but is not.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace qcal {

struct OutputManifest;  // common/output_manifest.h

// Reads a whole (small) file, opened with open_input_file (common/path_policy.h:
// a regular file, never blocking on a FIFO, confined by the process policy).
// kInvalidInput when it holds more than `max_bytes`.
Result<std::string> read_file(const std::string& path, size_t max_bytes = 256u << 20);
// Writes `bytes` to `path` atomically: `path.tmp.<tag>` + fsync + rename +
// fsync of the parent directory (tag: staging_tag()). Checked against the
// process policy's writable directories.
Status write_file_atomic(const std::string& path, std::string_view bytes);
// fsync a file or directory by path.
Status fsync_path(const std::string& path);

// ---- staging and publishing (see also worker/publish.h for the service's fenced
// publish, and common/output_manifest.h for the manifest)

// "<host>-<pid>" with '.' and '/' in the host name replaced by '_': the owner
// tag in the names of temporary files and staging directories, so a sweep can
// tell whether their owner is still alive (sweep_stale_staging).
std::string staging_tag();
// Creates a fresh, empty staging directory next to `final_dir`
// (`<final_dir>.partial.<tag>`), removing a stale one of that name.
Result<std::string> make_staging_dir(const std::string& final_dir);
// Publishes a fully written staging directory: writes the output manifest
// (`manifest`, or a plain {"writer": "qcal"} one) into it LAST, fsyncs every
// file in it and the directory, then renames it to `final_dir`
// (renameat2 RENAME_NOREPLACE). If `final_dir` exists it is replaced only
// when `overwrite` is true AND it is a directory qcal published (it carries
// an output manifest): otherwise kInvalidInput ("output exists") or
// kPermissionDenied ("not a directory qcal published"). The replacement is
// one atomic RENAME_EXCHANGE (a rename aside + rename where the filesystem
// cannot exchange); the old directory is removed afterwards.
Status publish_dir(const std::string& staging_dir, const std::string& final_dir, bool overwrite,
                   const OutputManifest* manifest = nullptr);
// renameat2(2) wrappers: 0, or the errno (EEXIST: `to` exists; EINVAL /
// ENOSYS: the filesystem or kernel cannot do it atomically).
int rename_noreplace(const std::string& from, const std::string& to);
int rename_exchange(const std::string& a, const std::string& b);

// Removes what dead processes left behind in `dir` (and its subdirectories,
// `depth` levels down): entries whose name carries a staging marker
// (".partial.", ".old.", ".tmp.", ".qcal-stage.", ".qcal-transformed.")
// followed by an owner tag. An owner on this host is dead when kill(pid, 0)
// says so; an entry of another host (or with no host in its tag) is stale
// when older than `stale_after_s`. Never follows symlinks. Returns the bytes
// and entries removed.
struct SweepReport {
  uint64_t entries = 0;
  uint64_t bytes = 0;
};
SweepReport sweep_stale_staging(const std::string& dir, int depth, double stale_after_s);
// Bytes of the regular files under `dir` (not following symlinks).
uint64_t tree_bytes(const std::string& dir);
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string join_path(const std::string& a, const std::string& b);

}  // namespace qcal

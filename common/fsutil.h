// Filesystem helpers with explicit durability. Everything qcal publishes is
// written to a temporary name, fsynced, and renamed into place, so a crash
// never leaves a file (or output directory) that looks complete but is not.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace qcal {

// Reads a whole (small) file.
Result<std::string> read_file(const std::string& path);
// Writes `bytes` to `path` atomically: `path.tmp.<pid>` + fsync + rename +
// fsync of the parent directory.
Status write_file_atomic(const std::string& path, std::string_view bytes);
// fsync a file or directory by path.
Status fsync_path(const std::string& path);
// Creates a fresh, empty staging directory next to `final_dir`
// (`<final_dir>.partial.<pid>`), removing a stale one of that name.
Result<std::string> make_staging_dir(const std::string& final_dir);
// Publishes a fully written staging directory: fsyncs every file in it and the
// directory, then renames it to `final_dir`. If `final_dir` exists it is
// replaced only when `overwrite` is true (the old one is moved aside and
// removed after the rename), otherwise kInvalidInput.
Status publish_dir(const std::string& staging_dir, const std::string& final_dir, bool overwrite);
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
std::string join_path(const std::string& a, const std::string& b);

}  // namespace qcal

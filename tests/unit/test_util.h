// Small helpers shared by the unit tests (header-only; each test binary is
// standalone).
#pragma once

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace qcal::testing {

// A fresh temporary directory `<tmp>/<prefix>XXXXXX`, removed with its
// contents at scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "qcal_") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "XXXXXX")).string();
    if (!::mkdtemp(tmpl.data())) std::abort();
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // A path inside the directory.
  std::string file(const std::string& name) const {
    return (std::filesystem::path(path_) / name).string();
  }
  std::string sub(const std::string& name) const { return file(name); }

 private:
  std::string path_;
};

}  // namespace qcal::testing

// A small command-line flag parser for the qcal tools.
//
// Accepts `--name value`, `--name=value` and boolean `--name`. Each command
// declares its flags up front; an undeclared flag, a missing value or a value
// of the wrong type is a kInvalidInput error naming the flag, so a typo never
// silently falls back to a default.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

class Flags {
 public:
  // `valued`: flags that take a value; `booleans`: flags that take none.
  Flags(std::set<std::string> valued, std::set<std::string> booleans)
      : valued_(std::move(valued)), booleans_(std::move(booleans)) {}

  // Parses argv[first..argc). Non-flag arguments are kept as positionals.
  Status parse(int argc, char** argv, int first);
  Status parse(const std::vector<std::string>& args);

  bool has(const std::string& name) const;
  bool flag(const std::string& name) const { return bools_.count(name) > 0; }
  // The last value given (a flag given twice keeps the later one).
  std::string str(const std::string& name, const std::string& def = "") const;
  // Every value of a repeatable flag, in order (`--allow-read A --allow-read B`).
  std::vector<std::string> all(const std::string& name) const;
  // Missing → kInvalidInput "missing required flag --name".
  Result<std::string> required(const std::string& name) const;
  Result<int64_t> integer(const std::string& name, int64_t def) const;
  Result<double> number(const std::string& name, double def) const;
  const std::vector<std::string>& positionals() const { return positionals_; }

 private:
  std::set<std::string> valued_, booleans_;
  std::map<std::string, std::string> values_;
  std::map<std::string, std::vector<std::string>> all_;
  std::set<std::string> bools_;
  std::vector<std::string> positionals_;
};

}  // namespace qcal

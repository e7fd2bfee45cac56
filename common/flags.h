// A small command-line flag parser for the qcal tools, driven by a table.
//
// A command declares its flags once, as a table of FlagSpec rows; the same
// table parses the command line (Flags) and prints the command's usage
// (format_flag_table), so the help can never list a flag the parser refuses
// or miss one it takes. Tables are plain std::vector values: a block of rows
// built at run time (a method registry's recipe flags) is appended like any
// other.
//
// Accepts `--name value`, `--name=value` and boolean `--name`. An undeclared
// flag, a missing value or a value of the wrong type is a kInvalidInput error
// naming the flag, so a typo never silently falls back to a default. `--help`
// and `-h` are built in (a table never declares them): parse stops there and
// help() turns true, whatever comes after.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/status.h"

namespace qcal {

// One row of a command's flag table.
struct FlagSpec {
  std::string name;   // without the leading "--": "w-bits"
  std::string value;  // placeholder of the value in usage ("N", "DIR", "X"); empty: a
                      // boolean flag, which takes no value
  std::string def;    // the default as shown in usage ("128"); empty: none shown. The code
                      // reading the flag owns the real default.
  std::string help;   // what the flag does: one or more sentences, wrapped when printed
  std::string group;  // heading the row is listed under; rows keep their order, and
                      // groups appear in the order of their first row. Empty: no heading.

  bool boolean() const { return value.empty(); }
};

// The usage lines of `table`: for each group, its heading ("Recipe:") then one
// entry per row, "  --name VALUE   help (default D)", help wrapped to `width`
// columns. Ends with the built-in "-h, --help" line. Pure; never fails.
std::string format_flag_table(const std::vector<FlagSpec>& table, int width = 100);

// kInvalidInput naming the row when `table` declares a name twice, an empty
// name, a name starting with '-', or "help": tables are checked by tests.
Status check_flag_table(const std::vector<FlagSpec>& table);

class Flags {
 public:
  // Parses the flags of `table` (a later row of the same name is ignored).
  explicit Flags(const std::vector<FlagSpec>& table);
  // `valued`: flags that take a value; `booleans`: flags that take none. For
  // programs without a usage text (benchmarks, tests).
  Flags(std::set<std::string> valued, std::set<std::string> booleans)
      : valued_(std::move(valued)), booleans_(std::move(booleans)) {}

  // Parses argv[first..argc). Non-flag arguments are kept as positionals.
  // Stops at `--help` / `-h` (help() is then true) and returns ok.
  Status parse(int argc, char** argv, int first);
  Status parse(const std::vector<std::string>& args);

  // `--help` or `-h` was given; the flags before it are parsed, the rest not.
  bool help() const { return help_; }
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
  bool help_ = false;
};

// The names of the rows of `table` that take a value / take none.
std::set<std::string> valued_flag_names(const std::vector<FlagSpec>& table);
std::set<std::string> boolean_flag_names(const std::vector<FlagSpec>& table);

// `a` followed by the rows of `b`.
std::vector<FlagSpec> concat_flags(std::vector<FlagSpec> a, const std::vector<FlagSpec>& b);

}  // namespace qcal

#include "common/flags.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

namespace qcal {

Status Flags::parse(int argc, char** argv, int first) {
  std::vector<std::string> args;
  for (int i = first; i < argc; ++i) args.emplace_back(argv[i]);
  return parse(args);
}

Status Flags::parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.size() < 3 || a[0] != '-' || a[1] != '-') {
      positionals_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (booleans_.count(name)) {
      if (has_value) return invalid_input("flag --" + name + " takes no value");
      bools_.insert(name);
    } else if (valued_.count(name)) {
      if (!has_value) {
        if (i + 1 >= args.size()) return invalid_input("flag --" + name + " needs a value");
        value = args[++i];
      }
      values_[name] = value;
      all_[name].push_back(value);
    } else {
      return invalid_input("unknown flag --" + name);
    }
  }
  return Status::ok();
}

std::vector<std::string> Flags::all(const std::string& name) const {
  auto it = all_.find(name);
  return it == all_.end() ? std::vector<std::string>() : it->second;
}

bool Flags::has(const std::string& name) const {
  return values_.count(name) > 0 || bools_.count(name) > 0;
}

std::string Flags::str(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second;
}

Result<std::string> Flags::required(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end() || it->second.empty())
    return invalid_input("missing required flag --" + name);
  return it->second;
}

Result<int64_t> Flags::integer(const std::string& name, int64_t def) const {
  auto it = values_.find(name);
  if (it == values_.end()) return def;
  const char* s = it->second.c_str();
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0')
    return invalid_input("flag --" + name + ": '" + it->second + "' is not an integer");
  return static_cast<int64_t>(v);
}

Result<double> Flags::number(const std::string& name, double def) const {
  auto it = values_.find(name);
  if (it == values_.end()) return def;
  const char* s = it->second.c_str();
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s, &end);
  if (errno != 0 || end == s || *end != '\0' || !std::isfinite(v))
    return invalid_input("flag --" + name + ": '" + it->second + "' is not a number");
  return v;
}

}  // namespace qcal

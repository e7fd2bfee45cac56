#include "common/flags.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

namespace qcal {

namespace {

// Columns `s` takes on a terminal: UTF-8 continuation bytes take none.
size_t columns(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

// Appends `text` word-wrapped: the first line continues after `col` columns
// already used on the current line, every line (the first included) starts at
// column `indent`, and no line passes `width` unless one word is longer.
void wrap(std::string* out, const std::string& text, size_t col, size_t indent, size_t width) {
  std::istringstream words(text);
  std::string w;
  bool first = true;
  while (words >> w) {
    const size_t need = columns(w) + (first ? 0 : 1);
    if (!first && col + need > width) {
      *out += "\n" + std::string(indent, ' ');
      col = indent;
      first = true;
    }
    if (!first) *out += ' ';
    *out += w;
    col += columns(w) + (first ? 0 : 1);
    first = false;
  }
  *out += '\n';
}

std::string flag_label(const FlagSpec& f) {
  return "--" + f.name + (f.boolean() ? "" : " " + f.value);
}

}  // namespace

Flags::Flags(const std::vector<FlagSpec>& table) {
  for (const FlagSpec& f : table) {
    if (valued_.count(f.name) || booleans_.count(f.name)) continue;
    (f.boolean() ? booleans_ : valued_).insert(f.name);
  }
}

std::set<std::string> valued_flag_names(const std::vector<FlagSpec>& table) {
  std::set<std::string> s;
  for (const FlagSpec& f : table)
    if (!f.boolean()) s.insert(f.name);
  return s;
}

std::set<std::string> boolean_flag_names(const std::vector<FlagSpec>& table) {
  std::set<std::string> s;
  for (const FlagSpec& f : table)
    if (f.boolean()) s.insert(f.name);
  return s;
}

std::vector<FlagSpec> concat_flags(std::vector<FlagSpec> a, const std::vector<FlagSpec>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Status check_flag_table(const std::vector<FlagSpec>& table) {
  std::set<std::string> seen;
  for (const FlagSpec& f : table) {
    if (f.name.empty()) return invalid_input("a flag row has an empty name");
    if (f.name[0] == '-') return invalid_input("flag row '" + f.name + "': name starts with '-'");
    if (f.name == "help") return invalid_input("flag row --help: built in, never declared");
    if (!seen.insert(f.name).second) return invalid_input("flag --" + f.name + " declared twice");
  }
  return Status::ok();
}

std::string format_flag_table(const std::vector<FlagSpec>& table, int width) {
  // The help column starts after the longest label, within limits; a longer
  // label puts its help on the next line.
  size_t label_cols = 0;
  for (const FlagSpec& f : table) label_cols = std::max(label_cols, columns(flag_label(f)));
  const size_t help_col = std::clamp<size_t>(label_cols + 4, 16, 30);
  const size_t w = static_cast<size_t>(std::max(width, 40));
  std::vector<std::string> groups;
  for (const FlagSpec& f : table)
    if (std::find(groups.begin(), groups.end(), f.group) == groups.end()) groups.push_back(f.group);
  std::string out;
  auto row = [&](const std::string& label, const std::string& help) {
    out += "  " + label;
    size_t col = 2 + columns(label);
    if (col + 2 > help_col) {
      out += "\n" + std::string(help_col, ' ');
    } else {
      out += std::string(help_col - col, ' ');
    }
    wrap(&out, help, help_col, help_col, w);
  };
  for (const std::string& g : groups) {
    if (!out.empty()) out += '\n';
    if (!g.empty()) out += g + ":\n";
    for (const FlagSpec& f : table) {
      if (f.group != g) continue;
      std::string help = f.help;
      // "(default" stays on the line of the default's first word (\x01: a space
      // that wrap() does not break at).
      if (!f.def.empty())
        help += (help.empty() ? "" : " ") + std::string("(default\x01") + f.def + ")";
      row(flag_label(f), help);
    }
  }
  if (!out.empty()) out += '\n';
  row("-h, --help", "print this help and exit");
  std::replace(out.begin(), out.end(), '\x01', ' ');
  return out;
}

Status Flags::parse(int argc, char** argv, int first) {
  std::vector<std::string> args;
  for (int i = first; i < argc; ++i) args.emplace_back(argv[i]);
  return parse(args);
}

Status Flags::parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      help_ = true;
      return Status::ok();
    }
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

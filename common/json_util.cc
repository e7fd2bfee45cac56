#include "common/json_util.h"

namespace qcal {

size_t json_nesting_exceeds(std::string_view text, int limit) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limit) return i;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::string::npos;
}

Status JsonFields::check_keys(const std::vector<std::string>& known) const {
  for (auto it = j_.begin(); it != j_.end(); ++it) {
    bool ok = false;
    for (const auto& k : known) ok = ok || k == it.key();
    if (!ok) {
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      return invalid_input(key_path(it.key()) + ": unknown key (known: " + list + ")");
    }
  }
  return Status::ok();
}

const nlohmann::json* JsonFields::find(const std::string& key, bool null_is_absent) const {
  auto it = j_.find(key);
  if (it == j_.end()) return nullptr;
  if (null_is_absent && it->is_null()) return nullptr;
  return &*it;
}

}  // namespace qcal

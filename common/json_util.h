// Guards for parsing untrusted JSON (safetensors headers, config and index
// files, REST bodies), and the field access the spec / recipe readers share.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace qcal {

// The byte offset at which arrays/objects in `text` first nest deeper than
// `limit`, or std::string::npos. Checked before parsing: nlohmann builds (and
// destroys, recursively) arbitrarily deep values, so a small hostile input
// could otherwise cost gigabytes or overflow a thread's stack. A linear scan
// that respects strings and escapes; it does not validate the JSON.
size_t json_nesting_exceeds(std::string_view text, int limit);

// One JSON object being read, known by its dotted path in the document
// ("recipe.gptq"): the typed readers of job_spec.cc and common/recipe.cc
// build on it.
class JsonFields {
 public:
  JsonFields(const nlohmann::json& j, std::string path) : j_(j), path_(std::move(path)) {}

  // "path.key" (or "key" at the top level), for error messages.
  std::string key_path(const std::string& key) const {
    return path_.empty() ? key : path_ + "." + key;
  }
  // kInvalidInput naming the first key not in `known` and listing the known
  // ones. Check this first: a typo must be reported as a typo, not as the
  // missing value it hid.
  Status check_keys(const std::vector<std::string>& known) const;
  // nullptr when absent (or null, where `null_is_absent`).
  const nlohmann::json* find(const std::string& key, bool null_is_absent = false) const;

  const nlohmann::json& j() const { return j_; }
  const std::string& path() const { return path_; }

 private:
  const nlohmann::json& j_;
  std::string path_;
};

}  // namespace qcal

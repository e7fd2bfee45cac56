#include "common/output_manifest.h"

#include <unistd.h>

#include "common/fsutil.h"
#include "common/path_policy.h"

namespace qcal {

using nlohmann::json;

json OutputManifest::to_json() const {
  json j = {
      {"format", kOutputManifestFormat}, {"version", kOutputManifestVersion}, {"writer", writer}};
  // Outputs written outside the service stay byte-identical for equal inputs:
  // only a service output says who published it and when.
  if (!job.empty()) {
    j["published_at"] = published_at;
    j["job"] = job;
    j["task"] = task;
    j["attempt"] = attempt;
    j["generation"] = generation;
  }
  return j;
}

Result<OutputManifest> OutputManifest::from_json(const json& j, const std::string& what) {
  if (!j.is_object()) return corrupt(what + ": not a JSON object");
  if (j.value("format", "") != kOutputManifestFormat)
    return corrupt(what + ": format is not " + kOutputManifestFormat);
  const auto v = j.find("version");
  if (v == j.end() || !v->is_number_integer())
    return corrupt(what + ": missing integer \"version\"");
  if (v->get<int64_t>() != kOutputManifestVersion)
    return corrupt(what + ": version " + std::to_string(v->get<int64_t>()) +
                   " is not supported (this build reads version " +
                   std::to_string(kOutputManifestVersion) + ")");
  OutputManifest m;
  auto str = [&](const char* k, std::string* out) -> Status {
    const auto it = j.find(k);
    if (it == j.end()) return Status::ok();
    if (!it->is_string()) return corrupt(what + ": \"" + k + "\" is not a string");
    *out = it->get<std::string>();
    return Status::ok();
  };
  auto integer = [&](const char* k, int64_t* out) -> Status {
    const auto it = j.find(k);
    if (it == j.end()) return Status::ok();
    if (!it->is_number_integer()) return corrupt(what + ": \"" + k + "\" is not an integer");
    *out = it->get<int64_t>();
    return Status::ok();
  };
  QCAL_RETURN_IF_ERROR(str("writer", &m.writer));
  QCAL_RETURN_IF_ERROR(str("job", &m.job));
  QCAL_RETURN_IF_ERROR(str("task", &m.task));
  QCAL_RETURN_IF_ERROR(integer("attempt", &m.attempt));
  QCAL_RETURN_IF_ERROR(integer("generation", &m.generation));
  if (const auto it = j.find("published_at"); it != j.end() && it->is_number())
    m.published_at = it->get<double>();
  return m;
}

bool OutputManifest::newer_than(const OutputManifest& o) const {
  if (generation != o.generation) return generation > o.generation;
  return job == o.job && attempt > o.attempt;
}

Result<OutputManifest> read_output_manifest(const std::string& dir) {
  const std::string path = join_path(dir, kOutputManifestName);
  QCAL_ASSIGN_OR_RETURN(std::string text, read_file(path, /*max_bytes=*/64 << 10));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return corrupt(path + ": not valid JSON");
  return OutputManifest::from_json(j, path);
}

Status write_output_manifest(const std::string& dir, const OutputManifest& m) {
  return write_file_atomic(join_path(dir, kOutputManifestName), m.to_json().dump(2) + "\n");
}

}  // namespace qcal

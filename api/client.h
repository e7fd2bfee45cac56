// The `qcal` tool's side of the coordinator's REST API (api/openapi.yaml):
// one HTTP(S) connection with the bearer token, JSON in and out, and every
// failure turned into a Status the commands can report and map to an exit
// code.
//
// Errors, by what the user should do:
//   - HTTP 4xx: the request was wrong (bad spec, unknown job, bad token).
//     kNotFound for 404, kInvalidInput otherwise (exit 2). The message is the
//     server's {"error": {"code", "message"}} message, or the body's first
//     line when the body is not that JSON, followed by " (HTTP <status>)".
//   - HTTP 5xx: kInternal (503: kUnavailable), same message form (exit 1).
//   - No answer (refused, timed out, TLS failure): kUnavailable,
//     "cannot reach coordinator at <url>: <reason>" (exit 1).
//   - A 2xx whose body is not the JSON asked for: kInternal naming the route.
//
// Thread safety: an ApiClient is not thread safe; use one per thread.
#pragma once

#include <initializer_list>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/flags.h"
#include "common/status.h"

namespace qcal {

inline constexpr const char* kDefaultServer = "http://127.0.0.1:8080";

struct ClientOptions {
  // http[s]://host[:port][/base-path]; routes are appended to the base path.
  std::string server = kDefaultServer;
  std::string token;  // sent as "Authorization: Bearer <token>" when non-empty
  double connect_timeout_s = 5.0;
  double read_timeout_s = 60.0;
};

// The rows every service command appends to its flag table: --server, --token.
const std::vector<FlagSpec>& client_flags();

// --server / --token, else $QCAL_SERVER / $QCAL_TOKEN, else the defaults.
ClientOptions client_options_from(const Flags& f);

// A raw answer: status code, body and Content-Type.
struct HttpResponse {
  int status = 0;
  std::string body;
  std::string content_type;
};

class ApiClient {
 public:
  // Parses opts.server; kInvalidInput for a URL that is not http(s)://host...
  // No connection is made until the first request.
  static Result<std::unique_ptr<ApiClient>> create(const ClientOptions& opts);
  ~ApiClient();
  ApiClient(const ApiClient&) = delete;
  ApiClient& operator=(const ApiClient&) = delete;

  // JSON requests. `path` starts with '/' and may carry a query string
  // (build it with query_string()). A 2xx body is parsed as JSON (an empty
  // body gives null); anything else is an error as described at the top.
  Result<nlohmann::json> get_json(const std::string& path);
  Result<nlohmann::json> post_json(const std::string& path, const nlohmann::json& body);
  Result<nlohmann::json> delete_json(const std::string& path);

  // Any answer with a status code, 4xx/5xx included: only "no answer" is an
  // error (kUnavailable). For text routes (/metrics) and for tests.
  Result<HttpResponse> request(const std::string& method, const std::string& path,
                               const std::string& body = "",
                               const std::string& content_type = "application/json");

  const std::string& server() const { return opts_.server; }

 private:
  explicit ApiClient(ClientOptions opts);
  Result<nlohmann::json> json_or_error(const std::string& method, const std::string& path,
                                       Result<HttpResponse> r);

  struct Impl;
  ClientOptions opts_;
  std::string base_path_;  // "" or "/prefix" (no trailing slash)
  std::unique_ptr<Impl> impl_;
};

// Turns a non-2xx answer into the Status described at the top.
Status status_from_http_error(const HttpResponse& r);

// Percent-encodes everything but RFC 3986 unreserved characters.
std::string url_encode(const std::string& s);
// "?k1=v1&k2=v2" with encoded keys and values; "" for no pairs.
std::string query_string(const std::vector<std::pair<std::string, std::string>>& params);

// Looks up a dotted path ("progress.tasks_done") in `j`; nullptr when any
// step is missing or not an object. Never throws.
const nlohmann::json* json_find(const nlohmann::json& j, const std::string& dotted);
// The number at the first of `paths` that holds one, else `def`.
double json_number(const nlohmann::json& j, std::initializer_list<const char*> paths, double def);
// The string at the first of `paths` that holds one, else `def`.
std::string json_string(const nlohmann::json& j, std::initializer_list<const char*> paths,
                        const std::string& def = "");

}  // namespace qcal

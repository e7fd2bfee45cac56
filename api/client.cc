#include "api/client.h"

#include <httplib.h>

#include <cctype>
#include <cstdlib>

namespace qcal {

const std::vector<FlagSpec>& client_flags() {
  static const std::vector<FlagSpec> kRows = {
      {"server", "URL", std::string("$QCAL_SERVER, else ") + kDefaultServer,
       "the coordinator: http[s]://host[:port][/base-path]", "Coordinator"},
      {"token", "T", "$QCAL_TOKEN", "bearer token sent with every request", "Coordinator"},
  };
  return kRows;
}

ClientOptions client_options_from(const Flags& f) {
  ClientOptions o;
  if (const char* env = std::getenv("QCAL_SERVER"); env && *env) o.server = env;
  if (const char* env = std::getenv("QCAL_TOKEN"); env && *env) o.token = env;
  if (f.has("server")) o.server = f.str("server");
  if (f.has("token")) o.token = f.str("token");
  return o;
}

struct ApiClient::Impl {
  explicit Impl(const std::string& scheme_host_port) : cli(scheme_host_port) {}
  httplib::Client cli;
};

ApiClient::ApiClient(ClientOptions opts) : opts_(std::move(opts)) {}
ApiClient::~ApiClient() = default;

Result<std::unique_ptr<ApiClient>> ApiClient::create(const ClientOptions& opts) {
  const std::string& url = opts.server;
  auto bad = [&](const std::string& why) {
    return invalid_input("--server '" + url + "': " + why +
                         " (expected http://host:port or https://host[:port][/path])");
  };
  size_t sep = url.find("://");
  if (sep == std::string::npos) return bad("no scheme");
  std::string scheme = url.substr(0, sep);
  if (scheme != "http" && scheme != "https") return bad("scheme must be http or https");
  std::string rest = url.substr(sep + 3);
  size_t slash = rest.find('/');
  std::string host_port = rest.substr(0, slash);
  std::string base = slash == std::string::npos ? "" : rest.substr(slash);
  while (!base.empty() && base.back() == '/') base.pop_back();
  if (host_port.empty() || host_port.front() == ':') return bad("no host");
  if (host_port.find_first_of("?#@ ") != std::string::npos) return bad("unexpected characters");
  if (size_t colon = host_port.rfind(':');
      colon != std::string::npos && host_port.find(']') == std::string::npos) {
    std::string port = host_port.substr(colon + 1);
    char* end = nullptr;
    long p = std::strtol(port.c_str(), &end, 10);
    if (port.empty() || *end != '\0' || p <= 0 || p > 65535) return bad("bad port");
  }

  std::unique_ptr<ApiClient> c(new ApiClient(opts));
  c->base_path_ = base;
  c->impl_ = std::make_unique<Impl>(scheme + "://" + host_port);
  httplib::Client& cli = c->impl_->cli;
  auto seconds = [](double s, auto set) {
    set(static_cast<time_t>(s), static_cast<time_t>((s - static_cast<time_t>(s)) * 1e6));
  };
  seconds(opts.connect_timeout_s, [&](time_t s, time_t us) { cli.set_connection_timeout(s, us); });
  seconds(opts.read_timeout_s, [&](time_t s, time_t us) { cli.set_read_timeout(s, us); });
  seconds(opts.read_timeout_s, [&](time_t s, time_t us) { cli.set_write_timeout(s, us); });
  cli.set_keep_alive(true);  // `wait` polls: one connection, not one per poll
  // A POST goes out as two writes (headers, body): without TCP_NODELAY the
  // second waits for the server's delayed ACK, ~40 ms per request.
  cli.set_tcp_nodelay(true);
  cli.set_url_encode(false);  // callers encode (query_string)
  if (!opts.token.empty()) cli.set_bearer_token_auth(opts.token);
  return c;
}

static std::string describe(httplib::Error e) {
  switch (e) {
    case httplib::Error::Connection: return "connection refused or host unreachable";
    case httplib::Error::ConnectionTimeout: return "connection timed out";
    case httplib::Error::Read: return "no answer (read failed or timed out)";
    case httplib::Error::Write: return "could not send the request";
    case httplib::Error::SSLConnection: return "TLS handshake failed";
    case httplib::Error::SSLServerVerification: return "TLS certificate verification failed";
    default: return httplib::to_string(e);
  }
}

Result<HttpResponse> ApiClient::request(const std::string& method, const std::string& path,
                                        const std::string& body, const std::string& content_type) {
  httplib::Client& cli = impl_->cli;
  const std::string full = base_path_ + path;
  httplib::Result r{nullptr, httplib::Error::Unknown};
  if (method == "GET") {
    r = cli.Get(full);
  } else if (method == "POST") {
    r = cli.Post(full, body, content_type);
  } else if (method == "PUT") {
    r = cli.Put(full, body, content_type);
  } else if (method == "DELETE") {
    r = body.empty() ? cli.Delete(full) : cli.Delete(full, body, content_type);
  } else {
    return invalid_input("unsupported HTTP method " + method);
  }
  if (!r)
    return unavailable("cannot reach coordinator at " + opts_.server + ": " + describe(r.error()));
  HttpResponse out;
  out.status = r->status;
  out.body = std::move(r->body);
  out.content_type = r->get_header_value("Content-Type");
  return out;
}

static const char* reason_phrase(int status) {
  switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status >= 500 ? "server error" : "request refused";
  }
}

Status status_from_http_error(const HttpResponse& r) {
  std::string msg;
  try {
    auto j = nlohmann::json::parse(r.body);
    if (const auto* m = json_find(j, "error.message"); m && m->is_string())
      msg = m->get<std::string>();
  } catch (const nlohmann::json::exception&) {
  }
  if (msg.empty()) {
    msg = r.body.substr(0, r.body.find('\n'));
    if (msg.size() > 200) msg = msg.substr(0, 200) + "...";
    if (msg.empty()) msg = reason_phrase(r.status);
  }
  msg += " (HTTP " + std::to_string(r.status) + ")";
  if (r.status == 404) return not_found(msg);
  if (r.status >= 400 && r.status < 500) return invalid_input(msg);
  if (r.status == 503) return unavailable(msg);
  return internal_error(msg);
}

Result<nlohmann::json> ApiClient::json_or_error(const std::string& method, const std::string& path,
                                                Result<HttpResponse> r) {
  if (!r.is_ok()) return r.status();
  if (r->status < 200 || r->status >= 300) return status_from_http_error(*r);
  if (r->body.empty()) return nlohmann::json();
  try {
    return nlohmann::json::parse(r->body);
  } catch (const nlohmann::json::exception& e) {
    return internal_error(method + " " + path + ": the coordinator answered " +
                          std::to_string(r->status) + " with a body that is not JSON: " + e.what());
  }
}

Result<nlohmann::json> ApiClient::get_json(const std::string& path) {
  return json_or_error("GET", path, request("GET", path));
}

Result<nlohmann::json> ApiClient::post_json(const std::string& path, const nlohmann::json& body) {
  return json_or_error("POST", path, request("POST", path, body.dump()));
}

Result<nlohmann::json> ApiClient::delete_json(const std::string& path) {
  return json_or_error("DELETE", path, request("DELETE", path));
}

std::string url_encode(const std::string& s) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string query_string(const std::vector<std::pair<std::string, std::string>>& params) {
  std::string q;
  for (const auto& [k, v] : params)
    q += (q.empty() ? "?" : "&") + url_encode(k) + "=" + url_encode(v);
  return q;
}

const nlohmann::json* json_find(const nlohmann::json& j, const std::string& dotted) {
  const nlohmann::json* cur = &j;
  size_t pos = 0;
  while (pos <= dotted.size()) {
    size_t dot = dotted.find('.', pos);
    if (dot == std::string::npos) dot = dotted.size();
    if (!cur->is_object()) return nullptr;
    auto it = cur->find(dotted.substr(pos, dot - pos));
    if (it == cur->end()) return nullptr;
    cur = &*it;
    pos = dot + 1;
  }
  return cur;
}

double json_number(const nlohmann::json& j, std::initializer_list<const char*> paths, double def) {
  for (const char* p : paths)
    if (const auto* v = json_find(j, p); v && v->is_number()) return v->get<double>();
  return def;
}

std::string json_string(const nlohmann::json& j, std::initializer_list<const char*> paths,
                        const std::string& def) {
  for (const char* p : paths)
    if (const auto* v = json_find(j, p); v && v->is_string()) return v->get<std::string>();
  return def;
}

}  // namespace qcal

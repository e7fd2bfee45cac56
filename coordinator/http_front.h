// The coordinator's HTTP/1.1 front: sockets, request parsing and limits, on
// Boost.Beast. It knows nothing of the API: it hands each request to two
// callbacks (HttpHandlers) and writes back what they answer.
//
// Why not cpp-httplib (docs/PERFORMANCE.md, "Hostile clients"): its server
// holds one pool thread per open connection, so 32 idle or slow connections
// stopped every other request, /healthz included; its read timeout is per
// recv(), so a client trickling a byte every few seconds holds a thread
// forever; and Debian's 0.11 does not apply the payload limit to chunked
// bodies. Here one I/O thread serves any number of connections
// asynchronously, each under deadlines, and handlers run on a separate pool.
//
// What a client gets, in order:
//   - Connections beyond `max_connections` (or beyond
//     `max_connections_per_ip` from one address) are answered at once with
//     503 OVERLOADED and closed.
//   - The request line and headers must arrive within `header_timeout_s` of
//     the connection opening (or of the previous response on a keep-alive
//     connection, which makes it the idle limit too) and fit in
//     `max_header_bytes`: else 408 REQUEST_TIMEOUT / 431 HEADERS_TOO_LARGE,
//     and the connection is closed.
//   - Once the head is in, HttpHandlers::on_head runs on the I/O thread. It
//     may answer at once (authentication, unknown routes, /healthz); then a
//     body not yet read is never read, and the connection is closed.
//   - The body (Content-Length or chunked) must arrive within
//     `body_timeout_s` of the head and is limited to `max_body_bytes` while
//     it is read: a Content-Length above the limit is refused before any
//     body byte is read, a chunked body as soon as its chunk sizes pass the
//     limit (413 PAYLOAD_TOO_LARGE). `Expect: 100-continue` is honoured.
//   - Malformed requests (bad request line or header, a Transfer-Encoding
//     other than chunked, Content-Length together with chunked) get 400
//     BAD_REQUEST naming the problem.
//   - HttpHandlers::on_request runs on a pool of `worker_threads` with the
//     complete request; its answer is written within `write_timeout_s`, or
//     the connection is closed.
// Every error reply is a JSON body {"error": {"code", "message"}}. A
// connection carries one request at a time (pipelined requests wait their
// turn). After an answer that closes the connection, the server stops
// sending, reads and discards what the client still sends for up to 1 s (so
// the client sees the answer rather than a reset), then closes.
//
// Thread safety: start/stop/wait/stats may be called from any thread; stop()
// is idempotent. The handlers must be thread safe: on_head runs on the I/O
// threads, on_request on the worker pool, concurrently.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace qcal {

// One request, as the handlers see it (no sockets: tests build them by hand).
struct HttpRequest {
  std::string method;  // "GET", as sent
  std::string target;  // as sent: "/v1/jobs?state=queued"
  std::string path;    // target up to '?', not percent-decoded
  std::string query;   // after '?', not decoded ("" when none)
  std::vector<std::pair<std::string, std::string>> headers;  // in order, names as sent
  std::string body;
  std::string peer;  // the client's address ("" when not from a socket)

  // The first value of header `name` (case-insensitive); "" when absent.
  std::string header(std::string_view name) const;
  bool has_header(std::string_view name) const;
  // Every value of query parameter `name`, percent-decoded ('+' is a space),
  // in order. "a=1&a=2" → {"1", "2"}; "label=team=x" → {"team=x"}.
  std::vector<std::string> params(std::string_view name) const;
  // The first value of `name`; nullopt when absent.
  std::optional<std::string> param(std::string_view name) const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // CR/LF in values are dropped
  bool close = false;  // close the connection after this response
};

// The error body every failure gets: {"error": {"code": code, "message": message}}.
// Bytes of `message` that are not valid UTF-8 are replaced (U+FFFD).
HttpResponse json_error(int status, const std::string& code, const std::string& message);

// Percent-decoding; an invalid escape is kept as is.
std::string url_decode(std::string_view s, bool plus_is_space);

struct HttpLimits {
  size_t max_header_bytes = 16 << 10;  // request line + headers
  uint64_t max_body_bytes = 1 << 20;   // after chunked decoding
};

// Parses HTTP/1.x requests from bytes, one at a time (pure: no I/O). Feed it
// what arrives, in any split; it stops after each request's head so the
// caller can look at it before the body is read.
//
//   RequestReader r(limits);
//   auto s = r.feed(bytes);            // kHead: need more bytes
//   if (s == kBody || s == kDone) ...  // head complete: r.request() has it
//   s = r.feed({});                    // go on into the body (buffered bytes)
//   if (s == kDone) HttpRequest req = r.take();  // bytes past it are kept
//   if (s == kError) send r.error() and close
class RequestReader {
 public:
  enum class State {
    kHead,   // the head is incomplete (or nothing came yet)
    kBody,   // the head is complete; the body is incomplete
    kDone,   // a complete request is ready (take())
    kError,  // malformed or over a limit: error() is the answer; stop reading
  };

  explicit RequestReader(HttpLimits limits);
  ~RequestReader();
  RequestReader(const RequestReader&) = delete;
  RequestReader& operator=(const RequestReader&) = delete;

  // Appends `bytes` and parses: up to the end of the head if it was not
  // complete (then returns, even if body bytes are buffered), else through
  // the body. Call again with no bytes to continue after the head.
  State feed(std::string_view bytes);
  State state() const { return state_; }
  // Whether any byte of the current request has arrived.
  bool started() const;
  // After the head: the request (the body is filled in at kDone).
  const HttpRequest& request() const { return req_; }
  // After the head: the client asked for "Expect: 100-continue".
  bool expects_continue() const;
  // After the head: the connection may carry another request after this one.
  bool keep_alive() const;
  // After the head: 10 for HTTP/1.0, 11 for HTTP/1.1.
  int http_version() const;
  // After kError: the answer (400, 413 or 431; close set).
  const HttpResponse& error() const { return error_; }
  // After kDone: the request; the reader starts on the next one (call
  // feed({}) to parse bytes that already arrived for it).
  HttpRequest take();

 private:
  struct Parser;
  State fail(int status, const std::string& code, const std::string& message);
  State after_head();

  HttpLimits limits_;
  std::unique_ptr<Parser> p_;
  std::string buf_;  // bytes received and not yet consumed by the parser
  State state_ = State::kHead;
  HttpRequest req_;
  HttpResponse error_;
};

// What the front calls. on_head runs on an I/O thread once a request's head
// is in (before its body is read): return a response to answer at once
// (keep it cheap: no Redis), or nullopt to go on. on_request runs on the
// worker pool with the complete request. An exception from either becomes
// 500 INTERNAL.
struct HttpHandlers {
  std::function<std::optional<HttpResponse>(const HttpRequest&)> on_head;
  std::function<HttpResponse(const HttpRequest&)> on_request;
};

struct HttpFrontOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                 // 0 = any free port (see HttpFront::port())
  int max_connections = 512;       // open at once; more get 503 (lowered to fit RLIMIT_NOFILE)
  int max_connections_per_ip = 0;  // from one client address; 0 = no cap
  double header_timeout_s = 10;    // request line + headers (and keep-alive idle)
  double body_timeout_s = 30;      // the body, from the end of the head
  double write_timeout_s = 30;     // writing one response
  int io_threads = 1;              // accept, parse, write
  int worker_threads = 16;         // run on_request
  HttpLimits limits;
};

// Counters since start() (for /metrics).
struct HttpFrontStats {
  int64_t open_connections = 0;      // now
  int64_t accepted_total = 0;        // connections accepted, rejected ones included
  int64_t rejected_total = 0;        // answered 503 over a connection cap
  int64_t timeouts_total = 0;        // closed by the head/body/write deadlines
  std::map<int, int64_t> responses;  // responses written, by status
};

class HttpFront {
 public:
  HttpFront(HttpFrontOptions opts, HttpHandlers handlers);
  ~HttpFront();  // stop() + wait()
  HttpFront(const HttpFront&) = delete;
  HttpFront& operator=(const HttpFront&) = delete;

  // Binds and starts the I/O and worker threads; returns once connections
  // are being accepted. kUnavailable when the address cannot be bound.
  Status start();
  int port() const;  // the bound port, after start()
  // Stops accepting and closes idle connections; requests being handled
  // finish and are answered (with Connection: close). Connections still open
  // 5 s later are dropped.
  void stop();
  void wait();  // until stop() has completed
  HttpFrontStats stats() const;
  // max_connections as applied (after the RLIMIT_NOFILE check), after start().
  int max_connections() const;

  struct Impl;  // public only so the .cc's connection class can name it

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace qcal

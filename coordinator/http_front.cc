#include "coordinator/http_front.h"

#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/buffer.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/string_body.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <unordered_map>

#include "common/log.h"

namespace qcal {

namespace net = boost::asio;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;

// ================================================================ requests

namespace {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  return true;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string reason(int status) {
  const auto r = http::obsolete_reason(http::int_to_status(static_cast<unsigned>(status)));
  return r == "<unknown-status>" ? "Unknown" : std::string(r);
}

// Header values from handlers must not break the response framing.
std::string no_crlf(const std::string& s) {
  std::string o;
  for (char c : s)
    if (c != '\r' && c != '\n') o += c;
  return o;
}

std::string serialize(const HttpResponse& r, bool close, bool http10) {
  std::string s = "HTTP/1.1 " + std::to_string(r.status) + " " + reason(r.status) + "\r\n";
  if (r.status != 100) {
    s += "Content-Type: " + no_crlf(r.content_type) + "\r\n";
    s += "Content-Length: " + std::to_string(r.body.size()) + "\r\n";
  }
  if (close) {
    s += "Connection: close\r\n";
  } else if (http10) {
    s += "Connection: keep-alive\r\n";
  }
  for (const auto& [k, v] : r.headers) s += no_crlf(k) + ": " + no_crlf(v) + "\r\n";
  s += "\r\n";
  s += r.body;
  return s;
}

}  // namespace

std::string HttpRequest::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (iequals(k, name)) return v;
  return "";
}

bool HttpRequest::has_header(std::string_view name) const {
  for (const auto& h : headers)
    if (iequals(h.first, name)) return true;
  return false;
}

std::vector<std::string> HttpRequest::params(std::string_view name) const {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < query.size()) {
    size_t end = query.find('&', start);
    if (end == std::string::npos) end = query.size();
    const std::string_view item(query.data() + start, end - start);
    const size_t eq = item.find('=');
    const std::string key = url_decode(item.substr(0, eq), true);
    if (key == name)
      out.push_back(eq == std::string_view::npos ? "" : url_decode(item.substr(eq + 1), true));
    start = end + 1;
  }
  return out;
}

std::optional<std::string> HttpRequest::param(std::string_view name) const {
  auto all = params(name);
  if (all.empty()) return std::nullopt;
  return all.front();
}

std::string url_decode(std::string_view s, bool plus_is_space) {
  std::string o;
  o.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      const int hi = hex_digit(s[i + 1]), lo = hex_digit(s[i + 2]);
      if (hi >= 0 && lo >= 0) {
        o += static_cast<char>(hi * 16 + lo);
        i += 2;
        continue;
      }
    }
    o += plus_is_space && s[i] == '+' ? ' ' : s[i];
  }
  return o;
}

HttpResponse json_error(int status, const std::string& code, const std::string& message) {
  HttpResponse r;
  r.status = status;
  const nlohmann::json body = {{"error", {{"code", code}, {"message", message}}}};
  r.body = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return r;
}

// ================================================================ RequestReader

struct RequestReader::Parser {
  std::optional<http::request_parser<http::string_body>> p;
  void reset(const HttpLimits& l) {
    p.emplace();
    p->header_limit(static_cast<std::uint32_t>(
        std::min<size_t>(l.max_header_bytes, std::numeric_limits<std::uint32_t>::max())));
    p->body_limit(l.max_body_bytes);
    p->eager(false);  // stop after the head
  }
};

RequestReader::RequestReader(HttpLimits limits) : limits_(limits), p_(std::make_unique<Parser>()) {
  p_->reset(limits_);
}

RequestReader::~RequestReader() = default;

bool RequestReader::started() const { return !buf_.empty() || p_->p->got_some(); }

bool RequestReader::expects_continue() const {
  const auto& m = p_->p->get();
  auto it = m.find(http::field::expect);
  return m.version() >= 11 && it != m.end() &&
         iequals(std::string_view(it->value().data(), it->value().size()), "100-continue");
}

bool RequestReader::keep_alive() const { return p_->p->get().keep_alive(); }

int RequestReader::http_version() const { return static_cast<int>(p_->p->get().version()); }

RequestReader::State RequestReader::fail(int status, const std::string& code,
                                         const std::string& message) {
  error_ = json_error(status, code, message);
  error_.close = true;
  state_ = State::kError;
  buf_.clear();
  return state_;
}

RequestReader::State RequestReader::after_head() {
  auto& p = *p_->p;
  const auto& m = p.get();
  req_ = HttpRequest{};
  req_.method = std::string(m.method_string());
  req_.target = std::string(m.target());
  const size_t q = req_.target.find('?');
  req_.path = req_.target.substr(0, q);
  if (q != std::string::npos) req_.query = req_.target.substr(q + 1);
  for (const auto& f : m) req_.headers.emplace_back(f.name_string(), f.value());
  if (req_.target.empty() || req_.target[0] != '/')
    return fail(400, "BAD_REQUEST",
                "malformed HTTP request: the request target must be a path starting with '/' "
                "(got '" +
                    req_.target.substr(0, 64) + "')");
  // RFC 9112 §6.1: a request whose Transfer-Encoding does not end in chunked
  // has no knowable length.
  if (m.find(http::field::transfer_encoding) != m.end() && !p.chunked())
    return fail(400, "BAD_REQUEST",
                "malformed HTTP request: Transfer-Encoding '" +
                    std::string(m[http::field::transfer_encoding]).substr(0, 64) +
                    "' is not supported (only chunked)");
  p.eager(true);
  state_ = p.is_done() ? State::kDone : State::kBody;
  return state_;
}

RequestReader::State RequestReader::feed(std::string_view bytes) {
  if (state_ == State::kError) return state_;
  buf_.append(bytes.data(), bytes.size());
  if (state_ == State::kDone) return state_;  // take() first
  auto& p = *p_->p;
  boost::system::error_code ec;
  auto put = [&] {
    const size_t n = p.put(net::buffer(buf_.data(), buf_.size()), ec);
    buf_.erase(0, n);
    return n;
  };
  auto from_ec = [&] {
    if (ec == http::error::body_limit) {
      std::string m =
          "request body exceeds the limit of " + std::to_string(limits_.max_body_bytes) + " bytes";
      if (auto cl = p.content_length(); cl && !p.chunked())
        m += " (Content-Length: " + std::to_string(*cl) + ")";
      return fail(413, "PAYLOAD_TOO_LARGE", m);
    }
    if (ec == http::error::header_limit)
      return fail(431, "HEADERS_TOO_LARGE",
                  "request line and headers exceed the limit of " +
                      std::to_string(limits_.max_header_bytes) + " bytes");
    return fail(400, "BAD_REQUEST", "malformed HTTP request: " + ec.message());
  };
  if (state_ == State::kHead) {
    while (!p.is_header_done()) {
      if (buf_.empty()) return state_;
      const size_t n = put();
      if (ec == http::error::need_more) {
        if (n == 0) return state_;
        ec = {};
        continue;
      }
      if (ec) return from_ec();
    }
    return after_head();
  }
  // kBody
  while (!p.is_done()) {
    if (buf_.empty()) return state_;
    const size_t n = put();
    if (ec == http::error::need_more) {
      if (n == 0) return state_;
      ec = {};
      continue;
    }
    if (ec) return from_ec();
  }
  req_.body = std::move(p.get().body());
  state_ = State::kDone;
  return state_;
}

HttpRequest RequestReader::take() {
  HttpRequest r = std::move(req_);
  req_ = HttpRequest{};
  p_->reset(limits_);
  state_ = State::kHead;
  return r;
}

// ================================================================ the server

namespace {
class Connection;

HttpResponse overloaded() {
  HttpResponse r =
      json_error(503, "OVERLOADED", "the server has too many open connections; retry shortly");
  r.headers.push_back({"Retry-After", "1"});
  r.close = true;
  return r;
}
constexpr int kMaxRejecting = 64;         // 503 answers lingering at once
constexpr double kLingerS = 1.0;          // drain after a closing answer
constexpr size_t kLingerBytes = 1 << 20;  // ... at most this much
constexpr double kStopGraceS = 5.0;       // stop(): then connections are dropped
}  // namespace

struct HttpFront::Impl {
  Impl(HttpFrontOptions o, HttpHandlers h) : opts(std::move(o)), handlers(std::move(h)) {}

  const HttpFrontOptions opts;
  const HttpHandlers handlers;
  int max_connections = 0;  // as applied
  int bound_port = 0;

  mutable std::mutex mu;
  bool started = false;   // guarded by mu
  bool stopping = false;  // guarded by mu
  bool io_done = false;   // guarded by mu
  std::condition_variable io_done_cv;
  int open = 0;                                                      // guarded by mu
  int rejecting = 0;                                                 // guarded by mu
  std::unordered_map<std::string, int> per_ip;                       // guarded by mu
  std::unordered_map<Connection*, std::weak_ptr<Connection>> conns;  // guarded by mu
  HttpFrontStats counters;                                           // guarded by mu
  std::atomic<bool> stop_flag{false};

  // Declared after what Connection destructors touch: destroyed first, with
  // any handlers (and connections) still queued in it.
  std::optional<net::thread_pool> pool;
  net::io_context io;
  tcp::acceptor acceptor{io};
  net::steady_timer accept_retry{io};
  std::vector<std::thread> io_threads;
  std::thread stopper;
  std::chrono::steady_clock::time_point last_accept_error{};

  void accept();
  void admit(tcp::socket s);
  void closed(Connection* c, const std::string& peer, bool reject);
  void count_response(int status) {
    std::lock_guard<std::mutex> lock(mu);
    ++counters.responses[status];
  }
  void count_timeout() {
    std::lock_guard<std::mutex> lock(mu);
    ++counters.timeouts_total;
  }
};

namespace {

// One client connection. Runs on its own strand; holds a shared_ptr to itself
// through every pending operation.
class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(HttpFront::Impl* f, tcp::socket s, std::string peer, bool reject)
      : f_(f),
        sock_(std::move(s)),
        timer_(sock_.get_executor()),
        reader_(f->opts.limits),
        peer_(std::move(peer)),
        reject_(reject) {}
  ~Connection() { f_->closed(this, peer_, reject_); }

  void start() {
    if (reject_) return respond(overloaded());
    arm(f_->opts.header_timeout_s);
    read();
  }

  // stop(): idle and reading connections close now; one being handled or
  // written closes after its answer.
  void on_stop() {
    if (phase_ == Phase::kReading || phase_ == Phase::kLingering) close_now();
  }

 private:
  enum class Phase { kReading, kHandling, kWriting, kLingering, kClosed };

  void read() {
    if (reading_ || phase_ == Phase::kClosed) return;
    reading_ = true;
    sock_.async_read_some(net::buffer(rbuf_),
                          [self = shared_from_this()](boost::system::error_code ec, size_t n) {
                            self->on_read(ec, n);
                          });
  }

  void on_read(boost::system::error_code ec, size_t n) {
    reading_ = false;
    if (phase_ == Phase::kClosed) return;
    if (phase_ == Phase::kLingering) {
      lingered_ += n;
      if (ec || lingered_ > kLingerBytes) return close_now();
      return read();
    }
    if (ec) return close_now();  // the peer closed or reset: nobody to answer
    if (phase_ != Phase::kReading) return;
    advance(reader_.feed(std::string_view(rbuf_.data(), n)));
  }

  void advance(RequestReader::State s) {
    using S = RequestReader::State;
    for (;;) {
      switch (s) {
        case S::kHead: return read();
        case S::kError: {
          HttpResponse r = reader_.error();
          return respond(std::move(r));
        }
        case S::kBody:
        case S::kDone:
          if (!head_handled_) {
            head_handled_ = true;
            keep_ = reader_.keep_alive();
            http10_ = reader_.http_version() < 11;
            std::optional<HttpResponse> early;
            try {
              early = f_->handlers.on_head(reader_.request());
            } catch (const std::exception& e) {
              early = json_error(500, "INTERNAL", std::string("internal error: ") + e.what());
            }
            if (early) {
              if (s != S::kDone) early->close = true;  // the body stays unread
              return respond(std::move(*early));
            }
            if (s == S::kBody) {
              arm(f_->opts.body_timeout_s);
              if (reader_.expects_continue()) return write_continue();
            }
            s = reader_.feed({});
            continue;
          }
          if (s == S::kBody) return read();
          return dispatch();
      }
    }
  }

  void write_continue() {
    out_ = "HTTP/1.1 100 Continue\r\n\r\n";
    phase_ = Phase::kWriting;
    net::async_write(sock_, net::buffer(out_),
                     [self = shared_from_this()](boost::system::error_code ec, size_t) {
                       if (self->phase_ == Phase::kClosed) return;
                       if (ec) return self->close_now();
                       self->phase_ = Phase::kReading;
                       self->advance(self->reader_.feed({}));
                     });
  }

  void dispatch() {
    HttpRequest req = reader_.take();
    req.peer = peer_;
    phase_ = Phase::kHandling;
    disarm();
    net::post(*f_->pool, [self = shared_from_this(), req = std::move(req),
                          work = net::make_work_guard(f_->io)]() mutable {
      HttpResponse r;
      try {
        r = self->f_->handlers.on_request(req);
      } catch (const std::exception& e) {
        r = json_error(500, "INTERNAL", std::string("internal error: ") + e.what());
      }
      net::post(self->sock_.get_executor(),
                [self, r = std::move(r)]() mutable { self->respond(std::move(r)); });
    });
  }

  void respond(HttpResponse r) {
    if (phase_ == Phase::kClosed) return;
    const bool close = r.close || !keep_ || f_->stop_flag.load();
    f_->count_response(r.status);
    out_ = serialize(r, close, http10_);
    close_after_ = close;
    phase_ = Phase::kWriting;
    arm(f_->opts.write_timeout_s);
    net::async_write(
        sock_, net::buffer(out_),
        [self = shared_from_this()](boost::system::error_code ec, size_t) { self->on_write(ec); });
  }

  void on_write(boost::system::error_code ec) {
    if (phase_ == Phase::kClosed) return;
    if (ec) return close_now();
    if (close_after_) return linger();
    head_handled_ = false;
    keep_ = true;
    phase_ = Phase::kReading;
    arm(f_->opts.header_timeout_s);
    ++served_;
    advance(reader_.feed({}));  // a pipelined request may be buffered
  }

  // Stop sending; drain what the client still sends for a moment, so it
  // reads our answer instead of a reset; then close.
  void linger() {
    phase_ = Phase::kLingering;
    boost::system::error_code ignored;
    sock_.shutdown(tcp::socket::shutdown_send, ignored);
    arm(kLingerS);
    read();
  }

  void close_now() {
    if (phase_ == Phase::kClosed) return;
    phase_ = Phase::kClosed;
    disarm();
    boost::system::error_code ignored;
    sock_.shutdown(tcp::socket::shutdown_both, ignored);
    sock_.close(ignored);
  }

  void arm(double seconds) {
    const uint64_t gen = ++timer_gen_;
    timer_.expires_after(std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6)));
    timer_.async_wait([self = shared_from_this(), gen](boost::system::error_code ec) {
      if (ec || gen != self->timer_gen_) return;
      self->on_timeout();
    });
  }
  void disarm() {
    ++timer_gen_;
    timer_.cancel();
  }

  void on_timeout() {
    switch (phase_) {
      case Phase::kReading: {
        if (!reader_.started() && served_ > 0) return close_now();  // keep-alive idle
        f_->count_timeout();
        // Best effort, without waiting: a client this slow may not read.
        HttpResponse r = json_error(
            408, "REQUEST_TIMEOUT",
            head_handled_
                ? "request body not received within " + seconds(f_->opts.body_timeout_s)
                : "request head not received within " + seconds(f_->opts.header_timeout_s));
        f_->count_response(408);
        const std::string bytes = serialize(r, true, false);
        boost::system::error_code ignored;
        sock_.non_blocking(true, ignored);
        sock_.write_some(net::buffer(bytes), ignored);
        return close_now();
      }
      case Phase::kWriting: f_->count_timeout(); return close_now();
      case Phase::kLingering: return close_now();
      case Phase::kHandling:
      case Phase::kClosed: return;
    }
  }

  static std::string seconds(double s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g s", s);
    return buf;
  }

  HttpFront::Impl* f_;
  tcp::socket sock_;
  net::steady_timer timer_;
  uint64_t timer_gen_ = 0;
  std::array<char, 8192> rbuf_{};
  RequestReader reader_;
  std::string out_;
  const std::string peer_;
  const bool reject_;
  Phase phase_ = Phase::kReading;
  bool reading_ = false;
  bool head_handled_ = false;
  bool keep_ = true;
  bool http10_ = false;
  bool close_after_ = false;
  int64_t served_ = 0;
  size_t lingered_ = 0;

 public:
  tcp::socket::executor_type executor() { return sock_.get_executor(); }
};

}  // namespace

void HttpFront::Impl::accept() {
  acceptor.async_accept(net::make_strand(io), [this](boost::system::error_code ec, tcp::socket s) {
    if (ec == net::error::operation_aborted || stop_flag.load()) return;
    if (ec) {
      // Out of file descriptors (EMFILE) and the like: back off, never spin.
      const auto now = std::chrono::steady_clock::now();
      if (now - last_accept_error > std::chrono::seconds(10)) {
        LOG_WARN << "http: accept failed: " << ec.message() << " (retrying)";
        last_accept_error = now;
      }
      accept_retry.expires_after(std::chrono::milliseconds(50));
      accept_retry.async_wait([this](boost::system::error_code e) {
        if (!e) accept();
      });
      return;
    }
    admit(std::move(s));
    accept();
  });
}

void HttpFront::Impl::admit(tcp::socket s) {
  boost::system::error_code ec;
  const auto ep = s.remote_endpoint(ec);
  const std::string peer = ec ? std::string("?") : ep.address().to_string();
  bool reject = false, flood = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    ++counters.accepted_total;
    auto ip = per_ip.find(peer);
    const bool over =
        open >= max_connections || (opts.max_connections_per_ip > 0 && ip != per_ip.end() &&
                                    ip->second >= opts.max_connections_per_ip);
    if (over) {
      ++counters.rejected_total;
      if (rejecting >= kMaxRejecting) {
        flood = true;
        ++counters.responses[503];  // written below, without a Connection
      } else {
        ++rejecting;
        reject = true;
      }
    } else {
      ++open;
      ++per_ip[peer];
      counters.open_connections = open;
    }
  }
  if (flood) {
    // Too many 503s lingering already: answer without waiting. Write the 503
    // if the socket takes it, discard what the request sent so far (so the
    // close sends FIN, not a reset that could eat the answer), close.
    static const std::string kBusy = serialize(overloaded(), true, false);
    s.non_blocking(true, ec);
    s.write_some(net::buffer(kBusy), ec);
    char sink[4096];
    for (int i = 0; i < 16; ++i)
      if (s.read_some(net::buffer(sink), ec) == 0 || ec) break;
    s.shutdown(tcp::socket::shutdown_both, ec);
    s.close(ec);
    return;
  }
  s.set_option(tcp::no_delay(true), ec);
  auto c = std::make_shared<Connection>(this, std::move(s), peer, reject);
  {
    std::lock_guard<std::mutex> lock(mu);
    conns[c.get()] = c;
  }
  net::dispatch(c->executor(), [c] { c->start(); });
}

void HttpFront::Impl::closed(Connection* c, const std::string& peer, bool reject) {
  std::lock_guard<std::mutex> lock(mu);
  conns.erase(c);
  if (reject) {
    --rejecting;
    return;
  }
  --open;
  counters.open_connections = open;
  auto it = per_ip.find(peer);
  if (it != per_ip.end() && --it->second <= 0) per_ip.erase(it);
}

HttpFront::HttpFront(HttpFrontOptions opts, HttpHandlers handlers)
    : impl_(std::make_shared<Impl>(std::move(opts), std::move(handlers))) {}

HttpFront::~HttpFront() {
  stop();
  wait();
}

Status HttpFront::start() {
  Impl& d = *impl_;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    if (d.started) return internal_error("http front already started");
  }
  // Every connection holds a descriptor; leave room for Redis clients, the
  // token file and lingering 503 answers.
  d.max_connections = std::max(1, d.opts.max_connections);
  rlimit rl{};
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    const int64_t room = static_cast<int64_t>(rl.rlim_cur) - 128 - kMaxRejecting;
    if (room < d.max_connections) {
      const int fit = static_cast<int>(std::max<int64_t>(8, room));
      LOG_WARN << "http: max connections " << d.max_connections << " lowered to " << fit
               << " to fit the open-file limit " << rl.rlim_cur << " (raise ulimit -n)";
      d.max_connections = fit;
    }
  }
  boost::system::error_code ec;
  const auto addr = net::ip::make_address(d.opts.host, ec);
  if (ec) return invalid_input("http: bad listen address '" + d.opts.host + "': " + ec.message());
  const tcp::endpoint ep(addr, static_cast<unsigned short>(d.opts.port));
  const std::string where = d.opts.host + ":" + std::to_string(d.opts.port);
  d.acceptor.open(ep.protocol(), ec);
  if (!ec) d.acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) d.acceptor.bind(ep, ec);
  if (!ec) d.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return unavailable("cannot bind " + where + ": " + ec.message());
  d.bound_port = d.acceptor.local_endpoint(ec).port();
  {
    std::lock_guard<std::mutex> lock(d.mu);
    d.started = true;
  }
  d.pool.emplace(static_cast<size_t>(std::max(1, d.opts.worker_threads)));
  d.accept();
  for (int i = 0; i < std::max(1, d.opts.io_threads); ++i)
    d.io_threads.emplace_back([&d] {
      for (;;) {
        try {
          d.io.run();
          return;
        } catch (const std::exception& e) {
          LOG_ERROR << "http: I/O thread: " << e.what();
        }
      }
    });
  return Status::ok();
}

int HttpFront::port() const { return impl_->bound_port; }
int HttpFront::max_connections() const { return impl_->max_connections; }

void HttpFront::stop() {
  Impl& d = *impl_;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    if (!d.started || d.stopping) return;
    d.stopping = true;
  }
  d.stop_flag.store(true);
  net::post(d.io, [&d] {
    boost::system::error_code ignored;
    d.acceptor.close(ignored);
    d.accept_retry.cancel();
    std::vector<std::shared_ptr<Connection>> live;
    {
      std::lock_guard<std::mutex> lock(d.mu);
      for (auto& [p, w] : d.conns)
        if (auto c = w.lock()) live.push_back(c);
    }
    for (auto& c : live) net::post(c->executor(), [c] { c->on_stop(); });
  });
  // Connections that do not finish within the grace period are dropped.
  d.stopper = std::thread([&d] {
    std::unique_lock<std::mutex> lock(d.mu);
    if (!d.io_done_cv.wait_for(lock, std::chrono::duration<double>(kStopGraceS),
                               [&d] { return d.io_done; }))
      d.io.stop();
  });
}

void HttpFront::wait() {
  Impl& d = *impl_;
  for (auto& t : d.io_threads)
    if (t.joinable()) t.join();
  {
    std::lock_guard<std::mutex> lock(d.mu);
    d.io_done = true;
  }
  d.io_done_cv.notify_all();
  if (d.stopper.joinable()) d.stopper.join();
  if (d.pool) d.pool->join();
}

HttpFrontStats HttpFront::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->counters;
}

}  // namespace qcal

// labels: integration
// RedisClient against a real redis-server (tests/unit/redis_fixture.h).
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>

#include "common/redis.h"
#include "tests/unit/redis_fixture.h"

namespace qcal {
namespace {

using Type = RedisReply::Type;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

class RedisClientTest : public qcal::testing::RedisTest {};

TEST_F(RedisClientTest, BinarySafeArgumentsAndReplyTypes) {
  RedisClient c(redis().options());
  const std::string value("a\0b\r\nc\xff", 7);
  auto set = c.command({"SET", std::string("k\0ey", 4), value});
  ASSERT_TRUE(set.is_ok()) << set.status().to_string();
  EXPECT_EQ(set->type, Type::kStatus);
  EXPECT_EQ(set->str, "OK");

  auto get = c.command({"GET", std::string("k\0ey", 4)});
  ASSERT_TRUE(get.is_ok());
  EXPECT_EQ(get->type, Type::kString);
  EXPECT_EQ(get->str, value);

  auto nil = c.command({"GET", "absent"});
  ASSERT_TRUE(nil.is_ok());
  EXPECT_TRUE(nil->is_nil());

  auto n = c.command({"INCRBY", "counter", "41"});
  ASSERT_TRUE(n.is_ok());
  EXPECT_EQ(n->type, Type::kInteger);
  EXPECT_EQ(n->integer, 41);

  ASSERT_TRUE(c.command({"RPUSH", "list", "x", "", "z"}).is_ok());
  auto arr = c.command({"LRANGE", "list", "0", "-1"});
  ASSERT_TRUE(arr.is_ok());
  ASSERT_EQ(arr->type, Type::kArray);
  ASSERT_EQ(arr->array.size(), 3u);
  EXPECT_EQ(arr->array[1].str, "");
  EXPECT_EQ(arr->array[2].str, "z");

  // Nested arrays with nil members (MGET).
  auto mget = c.command({"MGET", std::string("k\0ey", 4), "absent"});
  ASSERT_TRUE(mget.is_ok());
  ASSERT_EQ(mget->array.size(), 2u);
  EXPECT_EQ(mget->array[0].str, value);
  EXPECT_TRUE(mget->array[1].is_nil());

  // A large value survives intact.
  std::string big(3 << 20, 'q');
  big[12345] = '\0';
  ASSERT_TRUE(c.command({"SET", "big", big}).is_ok());
  auto back = c.command({"GET", "big"});
  ASSERT_TRUE(back.is_ok());
  EXPECT_EQ(back->str, big);
}

TEST_F(RedisClientTest, ErrorRepliesAreInternalAndKeepTheConnection) {
  RedisClient c(redis().options());
  ASSERT_TRUE(c.command({"SET", "s", "text"}).is_ok());
  auto r = c.command({"INCR", "s"});
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kInternal);
  EXPECT_NE(r.status().message().find("not an integer"), std::string::npos) << r.status().message();
  auto unknown = c.command({"NOSUCHCOMMAND"});
  EXPECT_EQ(unknown.status().code(), Code::kInternal);
  // The connection is still in step.
  auto ping = c.command({"PING"});
  ASSERT_TRUE(ping.is_ok());
  EXPECT_EQ(ping->str, "PONG");
  EXPECT_EQ(c.command({}).status().code(), Code::kInvalidInput);
}

TEST_F(RedisClientTest, PipelineRepliesInOrder) {
  RedisClient c(redis().options());
  auto r = c.pipeline({{"SET", "a", "1"}, {"INCR", "a"}, {"GET", "a"}, {"GET", "nope"}});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  ASSERT_EQ(r->size(), 4u);
  EXPECT_EQ((*r)[0].str, "OK");
  EXPECT_EQ((*r)[1].integer, 2);
  EXPECT_EQ((*r)[2].str, "2");
  EXPECT_TRUE((*r)[3].is_nil());

  // An error in the middle fails the call, but every reply is consumed.
  auto bad = c.pipeline({{"SET", "b", "x"}, {"INCR", "b"}, {"SET", "c", "y"}});
  EXPECT_EQ(bad.status().code(), Code::kInternal);
  auto next = c.command({"GET", "c"});
  ASSERT_TRUE(next.is_ok());
  EXPECT_EQ(next->str, "y");

  auto empty = c.pipeline({});
  ASSERT_TRUE(empty.is_ok());
  EXPECT_TRUE(empty->empty());

  // Many commands in one round trip.
  std::vector<std::vector<std::string>> many;
  for (int i = 0; i < 2000; ++i) many.push_back({"RPUSH", "many", std::to_string(i)});
  auto m = c.pipeline(many);
  ASSERT_TRUE(m.is_ok());
  EXPECT_EQ(m->back().integer, 2000);
}

TEST_F(RedisClientTest, EvalLoadsScriptAndRecoversFromScriptFlush) {
  RedisClient c(redis().options());
  const std::string script =
      "redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[1]), 7}";
  auto r = c.eval(script, {"ek"}, {std::string("v\0w", 3)});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  ASSERT_EQ(r->array.size(), 2u);
  EXPECT_EQ(r->array[0].str, std::string("v\0w", 3));
  EXPECT_EQ(r->array[1].integer, 7);

  // The server forgets every script; the client reloads it transparently.
  auto flush = c.command({"SCRIPT", "FLUSH"});
  ASSERT_TRUE(flush.is_ok());
  auto again = c.eval(script, {"ek"}, {"second"});
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->array[0].str, "second");

  // A script error is kInternal with the server's message.
  auto err = c.eval("return redis.error_reply('MYERR broken')", {}, {});
  ASSERT_FALSE(err.is_ok());
  EXPECT_EQ(err.status().code(), Code::kInternal);
  EXPECT_NE(err.status().message().find("MYERR broken"), std::string::npos);
}

TEST_F(RedisClientTest, BlockingCommandsGetTheirBlockTimeOnTopOfTheTimeout) {
  RedisOptions o = redis().options();
  o.command_timeout_s = 0.1;
  RedisClient c(o);
  auto t0 = Clock::now();
  auto r = c.command({"XREAD", "BLOCK", "400", "STREAMS", "nostream", "$"});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_TRUE(r->is_nil());
  EXPECT_GE(seconds_since(t0), 0.35);
  auto b = c.command({"BLPOP", "nolist", "0.3"});
  ASSERT_TRUE(b.is_ok()) << b.status().to_string();
  EXPECT_TRUE(b->is_nil());
}

TEST_F(RedisClientTest, CommandTimeoutDropsTheConnection) {
  RedisOptions o = redis().options(0.5);
  o.command_timeout_s = 0.2;
  RedisClient c(o);
  // The script keeps the server busy past the client's timeout.
  auto r = c.eval(
      "local t = redis.call('TIME'); local s = tonumber(t[1]) + tonumber(t[2]) / 1e6 "
      "while true do t = redis.call('TIME') "
      "if tonumber(t[1]) + tonumber(t[2]) / 1e6 - s > 0.6 then break end end "
      "return 1",
      {}, {});
  EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().to_string();
  // A new connection serves the next command once the script has ended
  // (BUSY while it runs is kUnavailable too).
  Status s = retry_unavailable(
      [&] {
        auto p = c.command({"PING"});
        return p.status();
      },
      5.0);
  EXPECT_TRUE(s.is_ok()) << s.to_string();
}

TEST_F(RedisClientTest, OutageIsUnavailableAndRestartReconnectsWithData) {
  RedisClient c(redis().options(/*reconnect_timeout_s=*/0.3));
  ASSERT_TRUE(c.command({"SET", "durable", "yes"}).is_ok());
  ASSERT_TRUE(c.command({"RPUSH", "dl", "1", "2"}).is_ok());

  redis().stop();
  auto t0 = Clock::now();
  auto during = c.command({"GET", "durable"});
  EXPECT_EQ(during.status().code(), Code::kUnavailable) << during.status().to_string();
  EXPECT_LT(seconds_since(t0), 2.0);
  t0 = Clock::now();
  auto during2 = c.command({"GET", "durable"});
  EXPECT_EQ(during2.status().code(), Code::kUnavailable);
  EXPECT_GE(seconds_since(t0), 0.25);  // it did back off for its budget
  EXPECT_LT(seconds_since(t0), 2.0);

  ASSERT_TRUE(redis().start()) << redis().error();
  auto after = c.command({"GET", "durable"});
  ASSERT_TRUE(after.is_ok()) << after.status().to_string();
  EXPECT_EQ(after->str, "yes");  // AOF brought it back
  auto list = c.command({"LRANGE", "dl", "0", "-1"});
  ASSERT_TRUE(list.is_ok());
  EXPECT_EQ(list->array.size(), 2u);
}

TEST_F(RedisClientTest, IdleConnectionClosedByTheServerIsReplacedBeforeSending) {
  RedisClient c(redis().options(5.0));
  ASSERT_TRUE(c.command({"SET", "x", "1"}).is_ok());
  ASSERT_TRUE(redis().restart()) << redis().error();
  // The old socket is dead; the client notices before sending, so the
  // command is not lost and no error surfaces.
  auto r = c.command({"INCR", "x"});
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->integer, 2);
}

TEST_F(RedisClientTest, ReconnectWaitsForAServerThatComesBack) {
  RedisClient c(redis().options(/*reconnect_timeout_s=*/10.0));
  ASSERT_TRUE(c.command({"SET", "k", "v"}).is_ok());
  redis().kill9();
  // The client backs off on another thread while the server comes back
  // (start() stays on this thread: the server dies with the thread that started it).
  Result<RedisReply> r = internal_error("not run");
  auto t0 = Clock::now();
  std::thread t([&] { r = c.command({"GET", "k"}); });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ASSERT_TRUE(redis().start()) << redis().error();
  t.join();
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->str, "v");
  EXPECT_GE(seconds_since(t0), 0.35);
}

TEST(RedisClientNoServer, UnreachableIsUnavailableAfterTheBudget) {
  RedisOptions o;
  o.host = "127.0.0.1";
  o.port = 1;  // nothing listens there
  o.reconnect_timeout_s = 0.25;
  RedisClient c(o);
  auto t0 = Clock::now();
  auto r = c.command({"PING"});
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_NE(r.status().message().find("127.0.0.1:1"), std::string::npos) << r.status().message();
  EXPECT_GE(seconds_since(t0), 0.2);
  EXPECT_LT(seconds_since(t0), 2.0);
}

TEST(RedisUrl, Parses) {
  auto a = parse_redis_url("redis://:s3cret@db.example:6380");
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  EXPECT_EQ(a->host, "db.example");
  EXPECT_EQ(a->port, 6380);
  EXPECT_EQ(a->password, "s3cret");

  auto b = parse_redis_url("localhost:7000");
  ASSERT_TRUE(b.is_ok());
  EXPECT_EQ(b->host, "localhost");
  EXPECT_EQ(b->port, 7000);
  EXPECT_EQ(b->password, "");

  auto c = parse_redis_url("redis://10.0.0.5");
  ASSERT_TRUE(c.is_ok());
  EXPECT_EQ(c->port, 6379);

  auto d = parse_redis_url("redis://[::1]:6390/0");
  ASSERT_TRUE(d.is_ok()) << d.status().to_string();
  EXPECT_EQ(d->host, "::1");
  EXPECT_EQ(d->port, 6390);

  auto e = parse_redis_url("redis://default:pw@h:1");
  ASSERT_TRUE(e.is_ok());
  EXPECT_EQ(e->password, "pw");

  for (const char* bad : {"http://h:1", "redis://h:0", "redis://h:99999", "redis://h:x",
                          "redis://:pw@:6379", "h:", "redis://h:1/3", "redis://bob:pw@h:1"}) {
    auto r = parse_redis_url(bad);
    EXPECT_EQ(r.status().code(), Code::kInvalidInput) << bad;
  }
}

TEST(RetryUnavailable, RetriesOnlyUnavailable) {
  int calls = 0;
  Status s = retry_unavailable(
      [&] {
        ++calls;
        return calls < 3 ? unavailable("gone") : Status::ok();
      },
      5.0);
  EXPECT_TRUE(s.is_ok());
  EXPECT_EQ(calls, 3);

  calls = 0;
  s = retry_unavailable(
      [&] {
        ++calls;
        return invalid_input("bad");
      },
      5.0);
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_EQ(calls, 1);

  auto t0 = Clock::now();
  s = retry_unavailable([&] { return unavailable("still gone"); }, 0.3);
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_GE(seconds_since(t0), 0.28);
  EXPECT_LT(seconds_since(t0), 1.5);
}

}  // namespace
}  // namespace qcal

// labels: integration
// The coordinator over HTTP, in process, against a real redis-server: job
// submission and views, rejected requests that must leave Redis untouched,
// cancel, listing filters, metrics, readiness across a Redis outage (and what
// it shows without a token), schedules (CRUD, firing by a tick, regression
// marking, the minimum interval), malformed ids, label caps, the per-token
// job quota and token revocation. The API without sockets
// (CoordinatorServer::handle) where Redis must not be touched.
#include <gtest/gtest.h>
#include <httplib.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common/data.h"
#include "common/job_store.h"
#include "common/plan.h"
#include "coordinator/auth.h"
#include "coordinator/server.h"
#include "tests/unit/redis_fixture.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kToken = "s3cret-token";
constexpr uint64_t kMaxBody = 64 << 10;

class CoordinatorHttp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string tmpl = (fs::temp_directory_path() / "qcal_coord_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = new std::string(tmpl);
    SynthOptions o;
    o.config.hidden_size = 64;
    o.config.intermediate_size = 128;
    o.config.num_hidden_layers = 2;
    o.config.num_attention_heads = 4;
    o.config.num_key_value_heads = 2;
    o.config.head_dim = 16;
    o.config.vocab_size = 256;
    ASSERT_TRUE(synth_model(o, path("model")).is_ok());
    ASSERT_TRUE(write_tokens_jsonl(path("calib.jsonl"), synth_tokens(64 * 16, 256, 1), 64).is_ok());
    std::ofstream(path("tokens")) << "# test tokens\n\n" << kToken << "\nother-token\n";
    fs::create_directories(path("store"));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
  }
  static std::string path(const std::string& name) { return *dir_ + "/" + name; }

  void SetUp() override {
    redis_ = std::make_unique<testing::RedisServer>();
    QCAL_REQUIRE_REDIS(*redis_);
    CoordinatorOptions o;
    o.port = 0;
    o.redis = redis_->options(2.0);
    o.token_file = path("tokens");
    o.store_root = path("store");
    o.allow_read = {*dir_};  // the fixture's models, data and outputs
    o.allow_write = {*dir_};
    o.max_body_bytes = kMaxBody;
    o.tick_interval_s = 0;  // ticks are driven by the tests
    o.status_log_interval_s = 0;
    o.request_redis_timeout_s = 0.5;
    server_ = std::make_unique<CoordinatorServer>(o);
    ASSERT_TRUE(server_->start().is_ok());
    redis_client_ = std::make_unique<RedisClient>(redis_->options());
  }
  void TearDown() override {
    server_.reset();
    redis_client_.reset();
    redis_.reset();
  }

  std::unique_ptr<httplib::Client> client(const std::string& token = kToken) {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", server_->port());
    if (!token.empty()) c->set_bearer_token_auth(token);
    c->set_read_timeout(30, 0);
    return c;
  }

  static json spec(const std::string& out, std::map<std::string, std::string> labels = {}) {
    json j = {{"model", path("model")},
              {"recipe", {{"method", "gptq"}, {"w_bits", 4}, {"group_size", 32}}},
              {"calib", {{"path", path("calib.jsonl")}, {"nsamples", 8}, {"seqlen", 64}}},
              {"output", {{"path", path(out)}}}};
    if (!labels.empty()) j["labels"] = labels;
    return j;
  }

  // 202 and the new job's id.
  std::string submit(const json& s) {
    auto r = client()->Post("/v1/jobs", s.dump(), "application/json");
    EXPECT_TRUE(r) << httplib::to_string(r.error());
    if (!r) return "";
    EXPECT_EQ(r->status, 202) << r->body;
    return json::parse(r->body).value("id", "");
  }

  // Every key with its serialized value: a rejected request must not change it.
  std::map<std::string, std::string> snapshot() {
    std::map<std::string, std::string> out;
    auto keys = redis_client_->command({"KEYS", "*"});
    EXPECT_TRUE(keys.is_ok()) << keys.status().to_string();
    if (!keys.is_ok()) return out;
    for (const auto& k : keys->array) {
      auto d = redis_client_->command({"DUMP", k.str});
      out[k.str] = d.is_ok() ? d->str : "?";
    }
    auto n = redis_client_->command({"DBSIZE"});
    out["<dbsize>"] = n.is_ok() ? std::to_string(n->integer) : "?";
    return out;
  }

  // Completes every ready task through the worker side of JobStore, as a
  // worker would, until nothing is left to claim.
  void run_worker(double ppl, double kl) {
    JobStore store(*redis_client_);
    for (int i = 0; i < 100; ++i) {
      auto c = store.claim_task("w-test", 60000, 50);
      ASSERT_TRUE(c.is_ok()) << c.status().to_string();
      if (!c->has_value()) return;
      const Claim& cl = **c;
      json result = {{"artifacts", json::object()}};
      if (cl.task.def.type == plan::kQuantize) {
        json layers = json::array();
        for (int64_t l = cl.task.def.params["layers"][0]; l < cl.task.def.params["layers"][1];
             ++l)
          layers.push_back({{"layer", l}, {"rel_output_error", 0.01 * (l + 1)}, {"seconds", 0.1}});
        result["layers"] = layers;
      } else if (cl.task.def.type == plan::kValidate) {
        result = {{"report", {{"ppl", ppl}, {"kl", kl}, {"fp_ppl", 9.0}}}, {"gate_passed", true}};
      }
      ASSERT_TRUE(store.complete_task(cl, result).is_ok());
    }
  }

  static json body(const httplib::Result& r) {
    if (!r) return json();
    return json::parse(r->body, nullptr, false);
  }
  static void expect_error(const httplib::Result& r, int status, const std::string& code,
                           const std::string& msg_part) {
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    EXPECT_EQ(r->status, status) << r->body;
    json b = body(r);
    ASSERT_TRUE(b.is_object() && b.contains("error")) << r->body;
    EXPECT_EQ(b["error"]["code"], code) << r->body;
    EXPECT_NE(b["error"]["message"].get<std::string>().find(msg_part), std::string::npos)
        << r->body;
    EXPECT_NE(r->get_header_value("Content-Type").find("application/json"), std::string::npos);
  }

  static std::string* dir_;
  std::unique_ptr<testing::RedisServer> redis_;
  std::unique_ptr<CoordinatorServer> server_;
  std::unique_ptr<RedisClient> redis_client_;
};
std::string* CoordinatorHttp::dir_ = nullptr;

TEST_F(CoordinatorHttp, SubmitThenGet) {
  auto r = client()->Post("/v1/jobs", spec("out/a").dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 202) << r->body;
  json b = body(r);
  const std::string id = b["id"];
  EXPECT_EQ(b["state"], "queued");
  EXPECT_EQ(b["tasks"],
            (json{"embed", "quantize-0000", "quantize-0001", "assemble", "validate"}));
  EXPECT_EQ(b["plan"]["layers"], 2);
  EXPECT_EQ(r->get_header_value("Location"), "/v1/jobs/" + id);

  auto g = client()->Get("/v1/jobs/" + id);
  ASSERT_TRUE(g);
  ASSERT_EQ(g->status, 200) << g->body;
  json j = body(g);
  EXPECT_EQ(j["id"], id);
  EXPECT_EQ(j["state"], "queued");
  EXPECT_EQ(j["spec"]["model"], path("model"));
  EXPECT_EQ(j["progress"]["tasks_total"], 5);
  EXPECT_EQ(j["progress"]["tasks_done"], 0);
  ASSERT_EQ(j["progress"]["tasks"].size(), 5u);
  EXPECT_EQ(j["progress"]["tasks"][0]["id"], "embed");
  EXPECT_EQ(j["progress"]["tasks"][0]["state"], "ready");
  EXPECT_EQ(j["progress"]["tasks"][1]["state"], "waiting");
  EXPECT_TRUE(j["eta_seconds"].is_null());

  expect_error(client()->Get("/v1/jobs/" + id + "/report"), 404, "NOT_FOUND", "no report yet");
  expect_error(client()->Get("/v1/jobs/j-nope"), 404, "NOT_FOUND", "");
  auto logs = client()->Get("/v1/jobs/" + id + "/logs");
  ASSERT_TRUE(logs);
  EXPECT_EQ(logs->status, 200) << logs->body;
}

TEST_F(CoordinatorHttp, ProgressBlocksAndReportAfterTheTasksRun) {
  const std::string id = submit(spec("out/b"));
  run_worker(10.0, 0.05);
  auto g = client()->Get("/v1/jobs/" + id);
  ASSERT_TRUE(g);
  json j = body(g);
  EXPECT_EQ(j["state"], "succeeded") << g->body;
  EXPECT_EQ(j["progress"]["tasks_done"], 5);
  ASSERT_EQ(j["blocks"].size(), 2u) << g->body;
  EXPECT_EQ(j["blocks"][1]["layer"], 1);
  EXPECT_EQ(j["eta_seconds"], 0.0);
  EXPECT_EQ(j["progress"]["tasks"][1]["worker"], "w-test");
  auto rep = client()->Get("/v1/jobs/" + id + "/report");
  ASSERT_TRUE(rep);
  EXPECT_EQ(rep->status, 200) << rep->body;
  EXPECT_EQ(body(rep)["ppl"], 10.0);
  // A finished job cannot be cancelled.
  expect_error(client()->Delete("/v1/jobs/" + id), 409, "CONFLICT", "already succeeded");
}

TEST_F(CoordinatorHttp, RejectedRequestsChangeNothingInRedis) {
  submit(spec("out/c"));  // some state to compare against
  const auto before = snapshot();
  ASSERT_FALSE(before.empty());

  // Malformed JSON: 400 naming the position.
  expect_error(client()->Post("/v1/jobs", R"({"model": "/m", )", "application/json"), 400,
               "INVALID_INPUT", "malformed JSON (byte");
  expect_error(client()->Post("/v1/jobs", "", "application/json"), 400, "INVALID_INPUT",
               "body is empty");
  expect_error(client()->Post("/v1/jobs", std::string(50000, '['), "application/json"), 400,
               "INVALID_INPUT", "nested deeper than");
  expect_error(client()->Post("/v1/jobs", "[1, 2]", "application/json"), 400, "INVALID_INPUT", "");
  // Unknown key.
  json s = spec("out/d");
  s["recipe"]["wbits"] = 4;
  expect_error(client()->Post("/v1/jobs", s.dump(), "application/json"), 400, "INVALID_INPUT",
               "unknown recipe key");
  // A file the spec names is missing.
  s = spec("out/d");
  s["calib"]["path"] = path("missing.jsonl");
  expect_error(client()->Post("/v1/jobs", s.dump(), "application/json"), 400, "INVALID_INPUT",
               "does not exist");
  // Does not fit the workers: 422 with the numbers (attention over sequences of 2^20
  // tokens).
  s = spec("out/d");
  s["calib"]["seqlen"] = 1 << 20;
  expect_error(client()->Post("/v1/jobs", s.dump(), "application/json"), 422, "RESOURCE_EXHAUSTED",
               "but workers have 24.0 GiB");
  // Oversized body.
  s = spec("out/d");
  s["labels"] = {{"pad", std::string(kMaxBody + 1000, 'x')}};
  expect_error(client()->Post("/v1/jobs", s.dump(), "application/json"), 413, "PAYLOAD_TOO_LARGE",
               "limit");
  // Labels (the spec's caps, common/limits.h): at most 32, keys up to 63 characters,
  // values up to 256 bytes.
  std::map<std::string, std::string> many;
  for (int i = 0; i < 33; ++i) many["k" + std::to_string(i)] = "v";
  expect_error(client()->Post("/v1/jobs", spec("out/d", many).dump(), "application/json"), 400,
               "INVALID_INPUT", "labels: at most 32 (got 33)");
  expect_error(client()->Post("/v1/jobs", spec("out/d", {{std::string(64, 'k'), "v"}}).dump(),
                              "application/json"),
               400, "INVALID_INPUT", "must be 1 to 63 characters");
  expect_error(client()->Post("/v1/jobs", spec("out/d", {{"team", std::string(257, 'v')}}).dump(),
                              "application/json"),
               400, "INVALID_INPUT", "labels.team: longer than 256 bytes (got 257)");
  // Missing and wrong tokens.
  auto r = client("")->Post("/v1/jobs", spec("out/d").dump(), "application/json");
  expect_error(r, 401, "UNAUTHENTICATED", "missing bearer token");
  if (r) {
    EXPECT_EQ(r->get_header_value("WWW-Authenticate"), "Bearer");
  }
  expect_error(client("wrong")->Post("/v1/jobs", spec("out/d").dump(), "application/json"), 401,
               "UNAUTHENTICATED", "invalid bearer token");
  expect_error(client("")->Get("/v1/jobs"), 401, "UNAUTHENTICATED", "");
  // Unknown route; bad query parameters; bad schedules.
  expect_error(client()->Get("/v1/nothing"), 404, "NOT_FOUND", "no route for GET /v1/nothing");
  expect_error(client()->Get("/v1/jobs?state=bogus"), 400, "INVALID_INPUT", "unknown job state");
  expect_error(client()->Get("/v1/jobs?limit=0"), 400, "INVALID_INPUT", "limit");
  json sched = {{"cron", "0 2 * * *"}, {"template", spec("out/{time}")}};
  sched["template"]["calib"]["path"] = path("missing.jsonl");
  expect_error(client()->Post("/v1/schedules", sched.dump(), "application/json"), 400,
               "INVALID_INPUT", "template.calib.path");
  sched = {{"cron", "0 2 * * *"}, {"template", spec("out/fixed")}};
  expect_error(client()->Post("/v1/schedules", sched.dump(), "application/json"), 400,
               "INVALID_INPUT", "put {time} in the path");
  sched = {{"cron", "0 25 * * *"}, {"template", spec("out/{time}")}};
  expect_error(client()->Post("/v1/schedules", sched.dump(), "application/json"), 400,
               "INVALID_INPUT", "cron: hour field");
  // More often than --min-schedule-interval-s (300 s): refused with the numbers.
  sched = {{"cron", "*/2 * * * *"}, {"template", spec("out/{time}")}};
  expect_error(client()->Post("/v1/schedules", sched.dump(), "application/json"), 400,
               "INVALID_INPUT", "can fire 120 s apart; runs must be at least 300 s apart");
  sched = {{"cron", "0,59 0,23 * * *"}, {"template", spec("out/{time}")}};
  expect_error(client()->Post("/v1/schedules", sched.dump(), "application/json"), 400,
               "INVALID_INPUT", "can fire 60 s apart");
  sched = {{"cron", "0 2 * * *"}, {"template", spec("out/{time}", {{"t", std::string(300, 'x')}})}};
  expect_error(client()->Post("/v1/schedules", sched.dump(), "application/json"), 400,
               "INVALID_INPUT", "template: labels.t: longer than 256 bytes (got 300)");
  // Ids the store never issues: 404, and no Redis key is built from them.
  const std::string job_id = body(client()->Get("/v1/jobs"))["jobs"][0]["id"];
  expect_error(client()->Get("/v1/jobs/" + job_id + ":tasks"), 404, "NOT_FOUND", "not a job id");
  expect_error(client()->Get("/v1/jobs/" + job_id + ":log/report"), 404, "NOT_FOUND",
               "not a job id");
  expect_error(client()->Delete("/v1/jobs/*"), 404, "NOT_FOUND", "not a job id");
  expect_error(client()->Get("/v1/schedules/..%2Fjob"), 404, "NOT_FOUND", "not a schedule id");

  EXPECT_EQ(snapshot(), before);
}

TEST_F(CoordinatorHttp, CancelThenCancelAgain) {
  const std::string id = submit(spec("out/e"));
  auto r = client()->Delete("/v1/jobs/" + id);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(body(r)["state"], "cancelled");
  expect_error(client()->Delete("/v1/jobs/" + id), 409, "CONFLICT", "already cancelled");
  EXPECT_EQ(body(client()->Get("/v1/jobs/" + id))["state"], "cancelled");
  expect_error(client()->Delete("/v1/jobs/j-unknown"), 404, "NOT_FOUND", "");
}

TEST_F(CoordinatorHttp, ListFiltersByStateAndLabel) {
  const std::string a = submit(spec("out/f", {{"team", "a"}}));
  const std::string b = submit(spec("out/g", {{"team", "b"}, {"tier", "1"}}));
  ASSERT_EQ(client()->Delete("/v1/jobs/" + b)->status, 200);
  auto list = [&](const std::string& q) {
    auto r = client()->Get("/v1/jobs" + q);
    EXPECT_TRUE(r);
    EXPECT_EQ(r->status, 200) << r->body;
    std::vector<std::string> ids;
    const json b = body(r);
    for (const auto& j : b["jobs"]) ids.push_back(j["id"]);
    return ids;
  };
  EXPECT_EQ(list(""), (std::vector<std::string>{b, a}));  // newest first
  EXPECT_EQ(list("?state=cancelled"), std::vector<std::string>{b});
  EXPECT_EQ(list("?state=queued"), std::vector<std::string>{a});
  EXPECT_EQ(list("?label=team=a"), std::vector<std::string>{a});
  EXPECT_EQ(list("?label=team=b&label=tier=1"), std::vector<std::string>{b});
  EXPECT_TRUE(list("?label=team=b&state=queued").empty());
  EXPECT_EQ(list("?limit=1").size(), 1u);
}

TEST_F(CoordinatorHttp, MetricsAndHealth) {
  submit(spec("out/h"));
  auto h = client("")->Get("/healthz");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  // The request counter is bumped by the server's logger, which runs after a
  // response is written: poll briefly until /healthz's 200 has been counted.
  auto m = client("")->Get("/metrics");  // no token needed
  for (int i = 0;
       i < 40 && m && m->body.find("qcal_http_requests_total{code=\"200\"} ") == std::string::npos;
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    m = client("")->Get("/metrics");
  }
  ASSERT_TRUE(m);
  ASSERT_EQ(m->status, 200) << m->body;
  EXPECT_NE(m->get_header_value("Content-Type").find("text/plain"), std::string::npos);
  for (const char* series :
       {"qcal_redis_up 1", "qcal_jobs{state=\"queued\"} 1", "qcal_jobs{state=\"running\"} 0",
        "qcal_queue_depth ", "qcal_workers ", "# TYPE qcal_task_seconds histogram",
        "qcal_task_seconds_bucket{le=\"+Inf\"} ", "qcal_task_seconds_sum ",
        "qcal_task_seconds_count ", "qcal_schedule_regressions_total 0",
        "qcal_http_requests_total{code=\"202\"} 1", "qcal_http_requests_total{code=\"200\"} "})
    EXPECT_NE(m->body.find(series), std::string::npos) << series << "\n" << m->body;
}

TEST_F(CoordinatorHttp, ReadyzFollowsRedis) {
  // Without a token: the verdict only, nothing about where things live.
  auto r = client("")->Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(body(r), (json{{"status", "ready"}})) << r->body;
  EXPECT_EQ(client("wrong")->Get("/readyz")->body, r->body);
  // With one: the details.
  r = client()->Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(body(r)["store"], path("store"));
  EXPECT_EQ(body(r)["store_exists"], true);
  EXPECT_EQ(body(r)["redis"], "127.0.0.1:" + std::to_string(redis_->port()));

  redis_->stop();
  expect_error(client("")->Get("/readyz"), 503, "UNAVAILABLE", "redis unreachable");
  EXPECT_EQ(client("")->Get("/readyz")->body.find(std::to_string(redis_->port())),
            std::string::npos);
  expect_error(client()->Get("/readyz"), 503, "UNAVAILABLE",
               "127.0.0.1:" + std::to_string(redis_->port()));
  EXPECT_EQ(client("")->Get("/healthz")->status, 200);  // the process is still up
  // A request that needs Redis answers 503, not a hang or a 500.
  expect_error(client()->Get("/v1/jobs"), 503, "UNAVAILABLE", "");
  auto m = client("")->Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("qcal_redis_up 0"), std::string::npos) << m->body;

  ASSERT_TRUE(redis_->start()) << redis_->error();
  int status = 0;
  for (int i = 0; i < 100 && status != 200; ++i) {
    auto again = client("")->Get("/readyz");
    status = again ? again->status : 0;
    if (status != 200) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(status, 200);
  // And the API works again (with the jobs from before the outage: AOF).
  EXPECT_EQ(client()->Get("/v1/jobs")->status, 200);
}

TEST_F(CoordinatorHttp, SchedulesCrudAndTick) {
  json req = {{"cron", "*/10 * * * *"},
              {"template", spec("out/sched-{time}")},
              {"thresholds", {{"max_ppl_regression", 0.05}, {"max_kl_regression", 0.01}}}};
  auto r = client()->Post("/v1/schedules", req.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 201) << r->body;
  json s = body(r);
  const std::string id = s["id"];
  const int64_t first = s["next_run_at"];
  EXPECT_EQ(first % 600, 0);
  EXPECT_GT(first, static_cast<int64_t>(std::time(nullptr)));
  EXPECT_EQ(s["thresholds"]["max_ppl_regression"], 0.05);

  auto list = client()->Get("/v1/schedules");
  ASSERT_TRUE(list);
  ASSERT_EQ(body(list)["schedules"].size(), 1u);
  EXPECT_EQ(body(list)["schedules"][0]["id"], id);

  // Not due yet: nothing happens.
  auto t = server_->tick(first - 1);
  ASSERT_TRUE(t.is_ok()) << t.status().to_string();
  EXPECT_EQ(t->fired, 0);

  // Due: one job, next_run_at moves on; the same tick again fires nothing.
  t = server_->tick(first + 1);
  ASSERT_TRUE(t.is_ok()) << t.status().to_string();
  EXPECT_EQ(t->fired, 1);
  EXPECT_EQ(server_->tick(first + 1)->fired, 0);
  json got = body(client()->Get("/v1/schedules/" + id));
  EXPECT_EQ(got["next_run_at"], first + 600);
  ASSERT_EQ(got["runs"].size(), 1u) << got.dump();
  const std::string job1 = got["runs"][0]["job"];
  EXPECT_EQ(got["runs"][0]["evaluated"], false);
  json j1 = body(client()->Get("/v1/jobs/" + job1));
  EXPECT_EQ(j1["schedule_id"], id);
  EXPECT_EQ(j1["state"], "queued");
  EXPECT_NE(j1["spec"]["output"]["path"].get<std::string>().find("out/sched-"), std::string::npos);
  EXPECT_EQ(j1["spec"]["output"]["path"].get<std::string>().find("{time}"), std::string::npos);

  // Run 1 succeeds (the baseline); run 2 is 10 % worse in ppl: regressed.
  run_worker(10.0, 0.05);
  t = server_->tick(first + 2);
  EXPECT_EQ(t->evaluated, 1);
  EXPECT_EQ(t->regressed, 0);
  t = server_->tick(first + 601);
  EXPECT_EQ(t->fired, 1);
  run_worker(11.0, 0.05);
  t = server_->tick(first + 602);
  EXPECT_EQ(t->evaluated, 1);
  EXPECT_EQ(t->regressed, 1);
  got = body(client()->Get("/v1/schedules/" + id));
  ASSERT_EQ(got["runs"].size(), 2u) << got.dump();
  EXPECT_EQ(got["runs"][0]["regressed"], false);
  EXPECT_EQ(got["runs"][1]["regressed"], true) << got.dump();
  EXPECT_EQ(got["runs"][1]["baseline"], job1);
  EXPECT_EQ(got["regressions"], 1);
  auto m = client("")->Get("/metrics");
  EXPECT_NE(m->body.find("qcal_schedule_regressions_total 1"), std::string::npos) << m->body;

  // Delete: gone, its jobs stay.
  auto d = client()->Delete("/v1/schedules/" + id);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->status, 200) << d->body;
  expect_error(client()->Get("/v1/schedules/" + id), 404, "NOT_FOUND", "");
  expect_error(client()->Delete("/v1/schedules/" + id), 404, "NOT_FOUND", "");
  EXPECT_EQ(client()->Get("/v1/jobs/" + job1)->status, 200);
  EXPECT_EQ(server_->tick(first + 10000)->fired, 0);
}

TEST_F(CoordinatorHttp, TwoCoordinatorsFireASlotOnce) {
  json req = {{"cron", "@hourly"}, {"template", spec("out/h-{time}")}};
  auto r = client()->Post("/v1/schedules", req.dump(), "application/json");
  ASSERT_EQ(r->status, 201) << r->body;
  const int64_t due = body(r)["next_run_at"].get<int64_t>() + 5;
  CoordinatorOptions o;
  o.port = 0;
  o.redis = redis_->options(2.0);
  o.allow_read = {*dir_};
  o.allow_write = {*dir_};
  o.tick_interval_s = 0;
  o.status_log_interval_s = 0;
  CoordinatorServer other(o);
  ASSERT_TRUE(other.start().is_ok());
  int64_t fired = 0;
  std::thread a([&] { fired += server_->tick(due)->fired; });
  int64_t fired_b = other.tick(due)->fired;
  a.join();
  EXPECT_EQ(fired + fired_b, 1);
  auto jobs = client()->Get("/v1/jobs");
  EXPECT_EQ(body(jobs)["jobs"].size(), 1u);
}

TEST_F(CoordinatorHttp, PerTokenQuotaOfLiveJobs) {
  CoordinatorOptions o;
  o.port = 0;
  o.redis = redis_->options(2.0);
  o.token_file = path("tokens");
  o.tick_interval_s = 0;
  o.status_log_interval_s = 0;
  o.max_jobs_per_token = 2;
  o.store_root = path("store");
  o.allow_read = {*dir_};
  o.allow_write = {*dir_};
  CoordinatorServer quota(o);
  ASSERT_TRUE(quota.start().is_ok());
  auto post = [&](const std::string& token, const std::string& out) {
    httplib::Client c("127.0.0.1", quota.port());
    c.set_bearer_token_auth(token);
    return c.Post("/v1/jobs", spec(out).dump(), "application/json");
  };
  auto a = post(kToken, "out/q1");
  ASSERT_TRUE(a);
  ASSERT_EQ(a->status, 202) << a->body;
  ASSERT_EQ(post(kToken, "out/q2")->status, 202);
  const auto before = snapshot();
  expect_error(post(kToken, "out/q3"), 429, "TOO_MANY_JOBS",
               "this token has 2 live jobs (queued, running or validating); the limit is 2");
  EXPECT_EQ(snapshot(), before);
  // Another token has its own quota.
  EXPECT_EQ(post("other-token", "out/q4")->status, 202);
  // A finished (here: cancelled) job frees its slot.
  httplib::Client c("127.0.0.1", quota.port());
  c.set_bearer_token_auth(kToken);
  ASSERT_EQ(c.Delete("/v1/jobs/" + body(a)["id"].get<std::string>())->status, 200);
  EXPECT_EQ(post(kToken, "out/q5")->status, 202);
  expect_error(post(kToken, "out/q6"), 429, "TOO_MANY_JOBS", "limit is 2");
  // Concurrent submits never pass the limit together.
  c.Delete("/v1/jobs/" +
           body(client()->Get("/v1/jobs?limit=1"))["jobs"][0]["id"].get<std::string>());
  std::atomic<int> accepted{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 6; ++i)
    ts.emplace_back([&, i] {
      auto r = post(kToken, "out/qc" + std::to_string(i));
      if (r && r->status == 202) ++accepted;
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(accepted.load(), 1);
}

// The API without sockets, with Redis unreachable: whatever must not touch
// Redis answers as usual; whatever must, answers 503.
TEST(CoordinatorApi, MalformedIdsAre404WithoutTouchingRedis) {
  CoordinatorOptions o;
  o.redis.host = "127.0.0.1";
  o.redis.port = 1;  // nothing listens there
  o.request_redis_timeout_s = 0.2;
  CoordinatorServer api(o);
  auto call = [&api](const std::string& method, const std::string& target) {
    HttpRequest r;
    r.method = method;
    r.target = target;
    r.path = target.substr(0, target.find('?'));
    if (target.find('?') != std::string::npos) r.query = target.substr(target.find('?') + 1);
    return api.handle(r);
  };
  for (const char* t :
       {"/v1/jobs/j-1700000000000-0123abcd:tasks", "/v1/jobs/j-1700000000000-0123abcd:log",
        "/v1/jobs/nope", "/v1/jobs/j-1-0123abcX", "/v1/jobs/J-1700000000000-0123abcd",
        "/v1/jobs/j--0123abcd", "/v1/jobs/%2e%2e", "/v1/jobs/j-1700000000000-0123abcd0"}) {
    HttpResponse h = call("GET", t);
    EXPECT_EQ(h.status, 404) << t << " " << h.body;
    EXPECT_NE(h.body.find("not a job id"), std::string::npos) << t << " " << h.body;
    EXPECT_EQ(call("DELETE", t).status, 404) << t;
    EXPECT_EQ(call("GET", std::string(t) + "/report").status, 404) << t;
  }
  EXPECT_EQ(call("GET", "/v1/schedules/s-1-abc").status, 404);
  EXPECT_EQ(call("DELETE", "/v1/schedules/job").status, 404);
  EXPECT_EQ(call("GET", "/v1/jobs/").status, 404);
  EXPECT_EQ(call("PATCH", "/v1/jobs").status, 404);
  EXPECT_EQ(call("GET", "/healthz").status, 200);
  // Well-formed ids do reach Redis.
  EXPECT_EQ(call("GET", "/v1/jobs/j-1700000000000-0123abcd").status, 503);
  EXPECT_EQ(call("GET", "/v1/schedules/s-1700000000000-0a1b2c").status, 503);
  // /readyz without a token (auth is off here, so everyone has one): details.
  HttpResponse ready = call("GET", "/readyz");
  EXPECT_EQ(ready.status, 503);
  EXPECT_NE(ready.body.find("127.0.0.1:1"), std::string::npos) << ready.body;
}

TEST(TokenAuthFile, ReloadsWhenTheFileChanges) {
  std::string tmpl = (fs::temp_directory_path() / "qcal_auth_XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
  const std::string file = tmpl + "/tokens";
  std::ofstream(file) << "# comment\n  alpha  \n\nbeta\n";
  TokenAuth auth(file);
  ASSERT_TRUE(auth.load().is_ok());
  EXPECT_EQ(auth.size(), 2u);
  EXPECT_TRUE(auth.check_header("Bearer alpha"));
  EXPECT_TRUE(auth.check_header("bearer beta"));
  EXPECT_FALSE(auth.check_header("Bearer alph"));
  EXPECT_FALSE(auth.check_header("Basic alpha"));
  EXPECT_FALSE(auth.check_header(""));
  EXPECT_FALSE(auth.check_token("# comment"));

  // Rotate: beta out, gamma in; seen after the once-a-second check.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  std::ofstream(file) << "alpha\ngamma\n";
  EXPECT_TRUE(auth.check_header("Bearer gamma"));
  EXPECT_FALSE(auth.check_header("Bearer beta"));
  EXPECT_EQ(auth.identify("Bearer gamma"), auth.identify("bearer  gamma "));
  ASSERT_TRUE(auth.identify("Bearer gamma").has_value());
  EXPECT_EQ(auth.identify("Bearer gamma")->size(), 18u);  // "t-" + 16 hex
  EXPECT_NE(auth.identify("Bearer gamma"), auth.identify("Bearer alpha"));
  EXPECT_EQ(auth.identify("Bearer beta"), std::nullopt);
  // Deleting the file revokes every token ...
  fs::remove(file);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  EXPECT_FALSE(auth.check_header("Bearer gamma"));
  EXPECT_FALSE(auth.check_header("Bearer alpha"));
  EXPECT_EQ(auth.size(), 0u);
  // ... until it holds tokens again.
  std::ofstream(file) << "delta\n";
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  EXPECT_TRUE(auth.check_header("Bearer delta"));
  // Emptying it revokes them too.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  std::ofstream(file, std::ios::trunc).flush();
  EXPECT_FALSE(auth.check_header("Bearer delta"));

  TokenAuth off("");
  EXPECT_FALSE(off.enabled());
  EXPECT_TRUE(off.check_header(""));
  EXPECT_EQ(off.identify(""), "anonymous");
  EXPECT_EQ(TokenAuth(tmpl + "/missing").load().code(), Code::kNotFound);
  fs::remove_all(tmpl);
}

}  // namespace
}  // namespace qcal

// Cron parsing, next_after and min_interval_s (UTC), plus the pure parts of
// schedules: ids, the request parser, template instantiation and the
// regression rule.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <ctime>

#include "coordinator/schedules.h"

namespace qcal {
namespace {

// Unix time of a UTC date-time.
std::time_t utc(int y, int mo, int d, int h = 0, int mi = 0) {
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = mi;
  return timegm(&tm);
}

std::string show(std::time_t t) {
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M %a", &tm);
  return buf;
}

std::time_t next(const std::string& expr, std::time_t after) {
  auto c = parse_cron(expr);
  EXPECT_TRUE(c.is_ok()) << expr << ": " << c.status().to_string();
  if (!c.is_ok()) return 0;
  auto n = c->next_after(after);
  EXPECT_TRUE(n.has_value()) << expr;
  return n ? *n : 0;
}

#define EXPECT_NEXT(expr, after, want) EXPECT_EQ(show(next(expr, after)), show(want)) << (expr)

TEST(Cron, Accepts) {
  for (const char* e : {"* * * * *",
                        "*/5 * * * *",
                        "0 2 * * *",
                        "0,15,30,45 * * * *",
                        "0 9-17 * * MON-FRI",
                        "0 0 1 JAN *",
                        "30 4 1,15 * 5",
                        "0 0 * * 7",
                        "5/10 * * * *",
                        "0 0 29 2 *",
                        "  1   2  3  4  5 ",
                        "@hourly",
                        "@daily",
                        "@weekly",
                        "@monthly",
                        "@yearly",
                        "@annually",
                        "@midnight",
                        "0 0 * * sun",
                        "0 0 1-31/2 * *",
                        "59 23 31 12 *"}) {
    auto c = parse_cron(e);
    EXPECT_TRUE(c.is_ok()) << e << ": " << c.status().to_string();
  }
}

TEST(Cron, RejectsWithTheFieldNamed) {
  struct Case {
    const char* expr;
    const char* msg;
  };
  for (const Case& c : {
           Case{"", "expected 5 fields"},
           Case{"* * * *", "expected 5 fields"},
           Case{"* * * * * *", "expected 5 fields"},
           Case{"60 * * * *", "minute field '60': 60 is out of range 0-59"},
           Case{"* 24 * * *", "hour field"},
           Case{"* * 0 * *", "day-of-month field"},
           Case{"* * 32 * *", "day-of-month field"},
           Case{"* * * 13 *", "month field"},
           Case{"* * * * 8", "day-of-week field"},
           Case{"*/0 * * * *", "step '0' must be a positive number"},
           Case{"*/x * * * *", "step 'x'"},
           Case{"5-1 * * * *", "reversed"},
           Case{"1,,2 * * * *", "empty list item"},
           Case{"a * * * *", "'a' is not a number"},
           Case{"* * * FOO *", "'FOO' is not a number or name"},
           Case{"1-2-3 * * * *", "bad range"},
           Case{"*/2/3 * * * *", "more than one '/'"},
           Case{"-1 * * * *", "empty value"},
           Case{"@reboot", "unknown alias"},
           Case{"0 0 30 2 *", "never fires"},
           Case{"0 0 31 4,6,9,11 *", "never fires"},
       }) {
    auto r = parse_cron(c.expr);
    ASSERT_FALSE(r.is_ok()) << c.expr;
    EXPECT_EQ(r.status().code(), Code::kInvalidInput);
    EXPECT_NE(r.status().message().find(c.msg), std::string::npos)
        << c.expr << " → " << r.status().message();
    EXPECT_EQ(r.status().message().rfind("cron: ", 0), 0u) << r.status().message();
  }
}

TEST(Cron, NextAfterIsStrictlyLaterAndMinuteAligned) {
  const std::time_t t = utc(2024, 3, 10, 12, 30);
  EXPECT_NEXT("* * * * *", t, utc(2024, 3, 10, 12, 31));
  EXPECT_NEXT("* * * * *", t + 59, utc(2024, 3, 10, 12, 31));
  EXPECT_NEXT("30 12 * * *", t, utc(2024, 3, 11, 12, 30));  // not the same minute
  EXPECT_NEXT("0 * * * *", t, utc(2024, 3, 10, 13, 0));
}

TEST(Cron, Steps) {
  const std::time_t t = utc(2024, 3, 10, 12, 31);
  EXPECT_NEXT("*/5 * * * *", t, utc(2024, 3, 10, 12, 35));
  EXPECT_NEXT("*/15 * * * *", utc(2024, 3, 10, 12, 45), utc(2024, 3, 10, 13, 0));
  EXPECT_NEXT("5/20 * * * *", t, utc(2024, 3, 10, 12, 45));  // 5, 25, 45
  EXPECT_NEXT("0 */6 * * *", t, utc(2024, 3, 10, 18, 0));
  EXPECT_NEXT("0 0 1-31/10 * *", t, utc(2024, 3, 11, 0, 0));  // 1, 11, 21, 31
  EXPECT_NEXT("0 0 1-31/10 * *", utc(2024, 3, 21, 0, 0), utc(2024, 3, 31, 0, 0));
}

TEST(Cron, MonthAndYearBoundaries) {
  EXPECT_NEXT("0 0 1 * *", utc(2024, 1, 31, 23, 59), utc(2024, 2, 1));
  EXPECT_NEXT("59 23 31 12 *", utc(2024, 12, 31, 23, 59), utc(2025, 12, 31, 23, 59));
  EXPECT_NEXT("0 0 1 1 *", utc(2023, 12, 31, 23, 59), utc(2024, 1, 1));
  EXPECT_NEXT("@yearly", utc(2024, 6, 1), utc(2025, 1, 1));
  // The 31st skips short months.
  EXPECT_NEXT("0 12 31 * *", utc(2024, 3, 31, 13, 0), utc(2024, 5, 31, 12, 0));
  // Feb 29 waits for a leap year.
  EXPECT_NEXT("0 0 29 2 *", utc(2024, 3, 1), utc(2028, 2, 29));
  EXPECT_NEXT("0 0 29 2 *", utc(2027, 1, 1), utc(2028, 2, 29));
  // 2100 is not a leap year.
  EXPECT_NEXT("0 0 29 2 *", utc(2096, 3, 1), utc(2104, 2, 29));
  EXPECT_NEXT("0 0 * DEC *", utc(2024, 1, 5), utc(2024, 12, 1));
}

TEST(Cron, DayOfWeek) {
  // 2024-03-10 is a Sunday.
  const std::time_t sun = utc(2024, 3, 10, 12, 0);
  EXPECT_NEXT("0 9 * * 1", sun, utc(2024, 3, 11, 9, 0));
  EXPECT_NEXT("0 9 * * MON-FRI", utc(2024, 3, 15, 10, 0), utc(2024, 3, 18, 9, 0));  // Fri → Mon
  EXPECT_NEXT("0 0 * * 0", sun, utc(2024, 3, 17));
  EXPECT_NEXT("0 0 * * 7", sun, utc(2024, 3, 17));  // 7 is Sunday too
  EXPECT_NEXT("0 0 * * sat,sun", utc(2024, 3, 11), utc(2024, 3, 16));
  EXPECT_NEXT("@weekly", utc(2024, 3, 12), utc(2024, 3, 17));
  // Both day fields restricted: either matches (the 13th or any Friday).
  EXPECT_NEXT("0 0 13 * 5", utc(2024, 3, 10), utc(2024, 3, 13));
  EXPECT_NEXT("0 0 13 * 5", utc(2024, 3, 13, 1), utc(2024, 3, 15));
  // Day-of-week restricted with a '*' day-of-month: both must match.
  EXPECT_NEXT("0 0 */2 * 1", utc(2024, 3, 10), utc(2024, 3, 11));
}

TEST(CronInterval, MinimumIntervalBetweenFirings) {
  auto every = [](const std::string& cron) {
    auto c = parse_cron(cron);
    EXPECT_TRUE(c.is_ok()) << cron;
    return c.is_ok() ? c->min_interval_s() : -1;
  };
  EXPECT_EQ(every("* * * * *"), 60);
  EXPECT_EQ(every("*/10 * * * *"), 600);
  EXPECT_EQ(every("*/7 * * * *"), 240);  // 56 → 0 across the hour: 4 minutes
  EXPECT_EQ(every("0 * * * *"), 3600);
  EXPECT_EQ(every("@daily"), 86400);
  EXPECT_EQ(every("@weekly"), 7 * 86400);
  EXPECT_EQ(every("0 2 * * 1-5"), 86400);
  EXPECT_EQ(every("0 2 * * 1,3"), 2 * 86400);
  EXPECT_EQ(every("0,59 0,23 * * *"), 60);       // 23:59 then 00:00 the next day
  EXPECT_EQ(every("0,59 0,23 * * 1"), 59 * 60);  // never on two days in a row
  EXPECT_EQ(every("0 0 1 * *"), 28 * 86400);     // February
  EXPECT_EQ(every("0 0 29 2 *"), 1461 * 86400);  // leap days, 4 years apart
}

// Against the reference: walk next_after over consecutive firings.
TEST(CronInterval, MatchesAWalkOfFirings) {
  for (const char* text :
       {"*/7 * * * *", "5,55 */3 * * *", "0,59 0,23 * * 1", "0 12 * * 6,0", "30 1 1,15 * *",
        "0 0 * * 1-5", "10,20 4 13 * 5", "*/45 22-23,0-1 * * *"}) {
    auto c = parse_cron(text);
    ASSERT_TRUE(c.is_ok()) << text;
    int64_t walk = INT64_MAX;
    std::time_t t = utc(2024, 1, 1);
    for (int i = 0; i < 3000; ++i) {
      auto n = c->next_after(t);
      ASSERT_TRUE(n.has_value()) << text;
      if (i > 0) walk = std::min<int64_t>(walk, *n - t);
      t = *n;
    }
    EXPECT_EQ(c->min_interval_s(), walk) << text;
  }
}

TEST(ScheduleIds, NewIdsHaveTheCheckedForm) {
  for (int i = 0; i < 100; ++i) {
    const std::string id = new_schedule_id();
    EXPECT_TRUE(is_schedule_id(id)) << id;
  }
  for (const char* bad : {"", "s-", "s-1-abc", "s-1-abcdeg", "s-x-abcdef", "S-1-abcdef",
                          "s-1-ABCDEF", "s-1-abcdef:runs", "s--abcdef", "j-1-abcdef"})
    EXPECT_FALSE(is_schedule_id(bad)) << bad;
  EXPECT_TRUE(is_schedule_id("s-1700000000000-0a1b2c"));
}

TEST(ScheduleRequest, ParsesAndRejects) {
  nlohmann::json ok = {{"cron", "0 2 * * *"},
                       {"template", {{"model", "/m"}}},
                       {"thresholds", {{"max_ppl_regression", 0.02}, {"max_kl_regression", 0.01}}}};
  auto r = parse_schedule_request(ok);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_DOUBLE_EQ(*r->thresholds.max_ppl_regression, 0.02);
  EXPECT_DOUBLE_EQ(*r->thresholds.max_kl_regression, 0.01);

  auto bad = [](nlohmann::json j, const std::string& msg) {
    auto r = parse_schedule_request(j);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.status().message().find(msg), std::string::npos) << r.status().message();
  };
  bad(nlohmann::json::array(), "must be a JSON object");
  bad({{"cron", "0 2 * * *"}, {"template", {{"model", "/m"}}}, {"extra", 1}},
      "unknown key 'extra'");
  bad({{"template", {{"model", "/m"}}}}, "cron: required");
  bad({{"cron", "0 99 * * *"}, {"template", {{"model", "/m"}}}}, "hour field");
  bad({{"cron", "0 2 * * *"}}, "template: required");
  bad({{"cron", "0 2 * * *"}, {"template", {{"model", "/m"}}}, {"thresholds", {{"x", 1}}}},
      "thresholds: unknown key 'x'");
  bad({{"cron", "0 2 * * *"},
       {"template", {{"model", "/m"}}},
       {"thresholds", {{"max_kl_regression", -1}}}},
      "non-negative");
}

TEST(ScheduleRequest, TemplatePlaceholders) {
  nlohmann::json t = {{"model", "/m"}, {"output", {{"path", "/out/{schedule}/{time}"}}}};
  auto j = instantiate_template(t, "s-1", utc(2024, 1, 31, 2, 5));
  EXPECT_EQ(j["output"]["path"], "/out/s-1/20240131T0205Z");
  EXPECT_EQ(j["model"], "/m");
  EXPECT_EQ(instantiate_template({{"model", "/m"}}, "s", 0), (nlohmann::json{{"model", "/m"}}));
}

TEST(ScheduleRegression, ComparesWithTheBaseline) {
  JobInfo job;
  job.id = "j-2";
  job.state = JobState::kSucceeded;
  job.report = {{"ppl", 10.5}, {"kl", 0.05}};
  ScheduleThresholds th;
  th.max_ppl_regression = 0.02;
  th.max_kl_regression = 0.01;

  // First run: nothing to compare with.
  ScheduleRun r = evaluate_run(job, nullptr, th);
  EXPECT_TRUE(r.evaluated);
  EXPECT_FALSE(r.regressed);
  EXPECT_EQ(r.state, "succeeded");
  EXPECT_DOUBLE_EQ(*r.ppl, 10.5);

  nlohmann::json base = {{"job", "j-1"}, {"ppl", 10.0}, {"kl", 0.045}};
  r = evaluate_run(job, base, th);  // 10.5 > 10.2: ppl regressed; kl 0.05 ≤ 0.055
  EXPECT_TRUE(r.regressed);
  EXPECT_EQ(r.baseline, "j-1");
  EXPECT_NE(r.reason.find("ppl"), std::string::npos) << r.reason;
  EXPECT_EQ(r.reason.find("kl"), std::string::npos) << r.reason;

  job.report = {{"ppl", 10.1}, {"kl", 0.06}};  // ppl within 2 %, kl + 0.015
  r = evaluate_run(job, base, th);
  EXPECT_TRUE(r.regressed);
  EXPECT_NE(r.reason.find("kl"), std::string::npos) << r.reason;

  job.report = {{"ppl", 10.1}, {"kl", 0.05}};
  EXPECT_FALSE(evaluate_run(job, base, th).regressed);
  EXPECT_FALSE(evaluate_run(job, base, ScheduleThresholds{}).regressed);  // no thresholds

  job.state = JobState::kFailed;  // no report: recorded, never "regressed"
  job.report = nullptr;
  r = evaluate_run(job, base, th);
  EXPECT_FALSE(r.regressed);
  EXPECT_EQ(r.state, "failed");

  // Round trip of the stored record.
  job.state = JobState::kSucceeded;
  job.report = {{"ppl", 11.0}};
  r = evaluate_run(job, base, th);
  ScheduleRun back = ScheduleRun::from_json(r.job_id, r.to_json());
  EXPECT_EQ(back.regressed, r.regressed);
  EXPECT_EQ(back.baseline, "j-1");
  EXPECT_DOUBLE_EQ(*back.ppl, 11.0);
  EXPECT_FALSE(back.kl.has_value());
}

}  // namespace
}  // namespace qcal

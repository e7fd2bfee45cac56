// Recurring jobs: a cron expression, a job-spec template, and regression
// thresholds comparing each run with the previous successful one.
//
// ---- Cron (pure) ----
// Five fields, UTC: minute (0-59) hour (0-23) day-of-month (1-31)
// month (1-12 or JAN-DEC) day-of-week (0-7 or SUN-SAT; 0 and 7 are Sunday).
// Each field is a comma list of `*`, `a`, `a-b`, each optionally `/step`
// (`*/15`, `1-31/2`; `a/step` means `a-max/step`). Names are case-insensitive
// and may be used in ranges (`MON-FRI`). Aliases: @yearly (@annually),
// @monthly, @weekly, @daily (@midnight), @hourly. As in Vixie cron, when both
// day-of-month and day-of-week are restricted (neither starts with `*`) a day
// matches if EITHER matches. An expression that can never fire ("0 0 30 2 *")
// is rejected at parse time.
//
// ---- Storage (Redis, prefix P) ----
//   P:schedules                  set: schedule ids
//   P:schedule:<id>              hash: id, cron, template (job spec JSON),
//                                thresholds (JSON), next_run_at (unix s),
//                                created_at (unix s), last_error, baseline
//                                (JSON {job, ppl, kl} of the last successful run)
//   P:schedule:<id>:runs         list: job ids of its runs, oldest first
//                                (capped at kMaxScheduleRuns)
//   P:schedule:<id>:results      hash: job id → run record JSON, written once
//                                the run is terminal (see ScheduleRun)
//   P:schedule_regressions       counter: runs marked regressed, ever
//
// ---- Firing ----
// scheduler_tick() runs on every coordinator every few seconds. A due
// schedule is claimed by a compare-and-set of next_run_at (Lua): only the
// coordinator whose CAS succeeds creates the run, so several coordinators or
// a restart never fire one slot twice. Firing is at-most-once: a coordinator
// that dies between the CAS and create_job loses that run (logged by no one);
// the next slot fires normally. Slots missed while no coordinator ran are not
// replayed: a late tick fires once and moves next_run_at past `now`.
//
// Templates may use `{time}` (the slot, UTC "20240131T0200Z") and
// `{schedule}` (the id) in output.path, so each run writes its own
// checkpoint.
//
// Thread safety: the pure functions are thread safe; ScheduleStore is not
// (it holds a RedisClient): one per thread.
#pragma once

#include <bitset>
#include <cstdint>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/job_store.h"
#include "common/redis.h"
#include "common/status.h"
#include "common/planner.h"

namespace qcal {

// ------------------------------------------------------------------- cron

struct CronExpr {
  std::bitset<60> minutes;
  std::bitset<24> hours;
  std::bitset<32> days;              // 1..31 (bit 0 unused)
  std::bitset<13> months;            // 1..12 (bit 0 unused)
  std::bitset<7> weekdays;           // 0 = Sunday
  bool days_restricted = false;      // day-of-month field did not start with '*'
  bool weekdays_restricted = false;  // day-of-week field did not start with '*'
  std::string text;                  // as given

  // True when the day (UTC date) matches the month, day and weekday fields.
  bool matches_day(int year, unsigned month, unsigned day) const;
  // The first minute strictly after `t` (UTC) that matches, or nullopt when
  // none does within 28 years (a full cycle of weekdays and leap years).
  std::optional<std::time_t> next_after(std::time_t t) const;
  // The shortest time between two consecutive firings, in seconds: 60 for
  // "* * * * *", 600 for "*/10 * * * *", 86400 for "@daily", 60 for
  // "0,59 0,23 * * *" (23:59 then 00:00). Exact over the 28-year cycle; at
  // most one pass over its days.
  int64_t min_interval_s() const;
};

// Errors are kInvalidInput naming the field and token:
//   "cron: minute field '61': 61 is out of range 0-59".
Result<CronExpr> parse_cron(const std::string& text);

// ------------------------------------------------------------- schedules

inline constexpr int64_t kMaxScheduleRuns = 500;

// A new schedule id: "s-<unix ms>-<6 hex digits>".
std::string new_schedule_id();
// Whether `id` has the form new_schedule_id() gives (checked before any
// Redis key is built from it).
bool is_schedule_id(std::string_view id);

struct ScheduleThresholds {
  // A run regresses when ppl > baseline_ppl · (1 + max_ppl_regression)
  // (a ratio: 0.02 = 2 % worse) ...
  std::optional<double> max_ppl_regression;
  // ... or kl > baseline_kl + max_kl_regression (absolute, nats/token).
  std::optional<double> max_kl_regression;
  nlohmann::json to_json() const;
};

// What became of one run, recorded once its job is terminal.
struct ScheduleRun {
  std::string job_id;
  bool evaluated = false;  // false while the job is not terminal
  std::string state;       // the job's final state ("missing" if it vanished)
  std::optional<double> ppl, kl;
  bool regressed = false;
  std::string baseline;  // the job compared against ("" = first successful run)
  std::string reason;    // why it regressed: "ppl 12.30 > 11.00 · (1 + 0.02)"
  nlohmann::json to_json() const;
  static ScheduleRun from_json(const std::string& job_id, const nlohmann::json& j);
};

struct Schedule {
  std::string id;
  std::string cron;
  nlohmann::json job_template;  // a job spec (validated at creation)
  ScheduleThresholds thresholds;
  int64_t next_run_at = 0;  // unix seconds
  int64_t created_at = 0;
  std::string last_error;         // why the last slot could not start a job
  nlohmann::json baseline;        // {job, ppl, kl} of the last successful run, or null
  std::vector<ScheduleRun> runs;  // oldest first
  // {"id", "cron", "template", "thresholds", "next_run_at", "created_at",
  //  "last_error", "baseline", "runs": [ScheduleRun...], "regressions": n}
  nlohmann::json to_json() const;
};

// The body of POST /v1/schedules:
//   {"cron": "0 2 * * *", "template": {job spec},
//    "thresholds": {"max_ppl_regression": 0.02, "max_kl_regression": 0.01}}
// Pure; unknown keys are errors. Does not plan the template (the server does,
// for the first slot, before storing).
struct ScheduleRequest {
  CronExpr cron;
  nlohmann::json job_template;
  ScheduleThresholds thresholds;
};
Result<ScheduleRequest> parse_schedule_request(const nlohmann::json& j);

// The template with `{time}` and `{schedule}` substituted in output.path for
// the slot `at`.
nlohmann::json instantiate_template(const nlohmann::json& tmpl, const std::string& schedule_id,
                                    std::time_t at);

// Compares a terminal run with the baseline (the previous successful run's
// report, or null). Pure. `job` must be terminal.
ScheduleRun evaluate_run(const JobInfo& job, const nlohmann::json& baseline,
                         const ScheduleThresholds& t);

class ScheduleStore {
 public:
  ScheduleStore(RedisClient& redis, std::string prefix);

  // Stores a new schedule (hash + set, atomically). kInvalidInput if the id exists.
  Status create(const Schedule& s);
  // kNotFound if absent. Includes run records (evaluated or not).
  Result<Schedule> get(const std::string& id);
  Result<std::vector<Schedule>> list();  // by id
  // Removes the schedule, its run list and results. kNotFound if absent. Jobs
  // it started are left alone.
  Status remove(const std::string& id);

  // CAS on next_run_at: true (and next_run_at = `next`) iff it still equals
  // `expected`; false when another coordinator got there first or the
  // schedule is gone.
  Result<bool> claim_slot(const std::string& id, int64_t expected, int64_t next);
  Status add_run(const std::string& id, const std::string& job_id);
  Status set_last_error(const std::string& id, const std::string& error);
  // Records the run's outcome once (later calls for the same job are no-ops),
  // moves the baseline when the run succeeded with a ppl, and counts a
  // regression. False when already recorded or the schedule is gone.
  Result<bool> record_run(const std::string& id, const ScheduleRun& run);
  Result<int64_t> regressions_total();

 private:
  std::string key(const std::string& id) const { return prefix_ + ":schedule:" + id; }
  RedisClient& redis_;
  std::string prefix_;
};

struct TickReport {
  int64_t fired = 0;      // jobs created
  int64_t failed = 0;     // due slots that could not start a job (last_error set)
  int64_t evaluated = 0;  // runs whose outcome was recorded
  int64_t regressed = 0;
};

// One pass of the scheduler at time `now`: for each due schedule, claim the
// slot (CAS), instantiate the template, parse, plan and create_job with the
// schedule id; then record the outcome of finished runs, in order, stopping
// at the first run still in progress. A schedule's own failure (bad template,
// model gone) is stored in last_error and does not stop the others; only
// Redis failures are returned.
Result<TickReport> scheduler_tick(JobStore& jobs, const PlannerLimits& limits, std::time_t now);

}  // namespace qcal

#include "coordinator/schedules.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>

#include "common/limits.h"
#include "common/log.h"
#include "common/sanitize.h"
#include "coordinator/admission.h"

namespace qcal {

// ================================================================== cron

namespace {

namespace chr = std::chrono;

const char* const kMonthNames[] = {"JAN", "FEB", "MAR", "APR", "MAY", "JUN",
                                   "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"};
const char* const kDayNames[] = {"SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"};

struct FieldDef {
  const char* name;
  int min, max;
  const char* const* names;  // nullptr, or max-min+1 names for min..
  int name_base;             // value of names[0]
  int num_names;
};

const FieldDef kFields[5] = {
    {"minute", 0, 59, nullptr, 0, 0},       {"hour", 0, 23, nullptr, 0, 0},
    {"day-of-month", 1, 31, nullptr, 0, 0}, {"month", 1, 12, kMonthNames, 1, 12},
    {"day-of-week", 0, 7, kDayNames, 0, 7},  // 7 = Sunday, folded to 0
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
    if (p == std::string::npos) return out;
    start = p + 1;
  }
}

Status field_error(const FieldDef& f, const std::string& field, const std::string& why) {
  return invalid_input("cron: " + std::string(f.name) + " field '" + field + "': " + why);
}

// A number or (for month / day-of-week) a name.
Result<int> parse_value(const FieldDef& f, const std::string& field, const std::string& tok) {
  if (tok.empty()) return field_error(f, field, "empty value");
  if (std::isdigit(static_cast<unsigned char>(tok[0]))) {
    if (tok.size() > 4) return field_error(f, field, tok + " is out of range");
    int v = 0;
    for (char ch : tok) {
      if (!std::isdigit(static_cast<unsigned char>(ch)))
        return field_error(f, field, "'" + tok + "' is not a number");
      v = v * 10 + (ch - '0');
    }
    if (v < f.min || v > f.max)
      return field_error(
          f, field,
          tok + " is out of range " + std::to_string(f.min) + "-" + std::to_string(f.max));
    return v;
  }
  if (f.names) {
    std::string up;
    for (char ch : tok) up += static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    for (int i = 0; i < f.num_names; ++i)
      if (up == f.names[i]) return f.name_base + i;
  }
  return field_error(
      f, field, "'" + tok + "' is not a " + std::string(f.names ? "number or name" : "number"));
}

// Sets bit v for every matching value in [f.min, f.max].
Result<uint64_t> parse_field(const FieldDef& f, const std::string& field) {
  uint64_t mask = 0;
  for (const std::string& item : split(field, ',')) {
    if (item.empty()) return field_error(f, field, "empty list item");
    auto slash = split(item, '/');
    if (slash.size() > 2) return field_error(f, field, "more than one '/' in '" + item + "'");
    int step = 1;
    if (slash.size() == 2) {
      const std::string& st = slash[1];
      bool digits = !st.empty() && st.size() <= 4 && std::all_of(st.begin(), st.end(), [](char ch) {
        return std::isdigit(static_cast<unsigned char>(ch));
      });
      if (!digits || std::stoi(st) == 0)
        return field_error(f, field, "step '" + st + "' must be a positive number");
      step = std::stoi(st);
    }
    const std::string& range = slash[0];
    int lo, hi;
    if (range == "*") {
      lo = f.min;
      hi = f.max;
    } else {
      auto dash = split(range, '-');
      if (dash.size() > 2) return field_error(f, field, "bad range '" + range + "'");
      QCAL_ASSIGN_OR_RETURN(lo, parse_value(f, field, dash[0]));
      if (dash.size() == 2) {
        QCAL_ASSIGN_OR_RETURN(hi, parse_value(f, field, dash[1]));
        if (hi < lo) return field_error(f, field, "range '" + range + "' is reversed");
      } else {
        hi = slash.size() == 2 ? f.max : lo;  // "a/step" = "a-max/step"
      }
    }
    for (int v = lo; v <= hi; v += step) mask |= uint64_t{1} << v;
  }
  return mask;
}

std::string alias(const std::string& text) {
  std::string t;
  for (char ch : text) t += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (t == "@yearly" || t == "@annually") return "0 0 1 1 *";
  if (t == "@monthly") return "0 0 1 * *";
  if (t == "@weekly") return "0 0 * * 0";
  if (t == "@daily" || t == "@midnight") return "0 0 * * *";
  if (t == "@hourly") return "0 * * * *";
  return "";
}

}  // namespace

bool CronExpr::matches_day(int year, unsigned month, unsigned day) const {
  if (month < 1 || month > 12 || day < 1 || day > 31 || !months[month]) return false;
  const chr::year_month_day ymd{chr::year{year}, chr::month{month}, chr::day{day}};
  if (!ymd.ok()) return false;
  const unsigned wd = chr::weekday{chr::sys_days{ymd}}.c_encoding();
  const bool dom = days[day], dow = weekdays[wd];
  if (days_restricted && weekdays_restricted) return dom || dow;
  return dom && dow;
}

std::optional<std::time_t> CronExpr::next_after(std::time_t t) const {
  // The first whole minute after t.
  const chr::sys_seconds start{chr::seconds{t}};
  const auto first_minute = chr::floor<chr::minutes>(start) + chr::minutes{1};
  auto day = chr::floor<chr::days>(first_minute);
  int minute_of_day = static_cast<int>((first_minute - day).count());
  constexpr int kMaxDays = 28 * 366 + 1;
  for (int i = 0; i < kMaxDays; ++i, day += chr::days{1}, minute_of_day = 0) {
    const chr::year_month_day ymd{day};
    if (!matches_day(static_cast<int>(ymd.year()), static_cast<unsigned>(ymd.month()),
                     static_cast<unsigned>(ymd.day())))
      continue;
    for (int h = minute_of_day / 60; h < 24; ++h) {
      if (!hours[h]) continue;
      const int m0 = h == minute_of_day / 60 ? minute_of_day % 60 : 0;
      for (int m = m0; m < 60; ++m) {
        if (minutes[m]) {
          const auto at = chr::sys_seconds{day} + chr::hours{h} + chr::minutes{m};
          return static_cast<std::time_t>(at.time_since_epoch().count());
        }
      }
    }
  }
  return std::nullopt;
}

int64_t CronExpr::min_interval_s() const {
  std::vector<int> fire;  // minutes of the day, ascending
  for (int h = 0; h < 24; ++h)
    for (int m = 0; m < 60; ++m)
      if (hours[h] && minutes[m]) fire.push_back(h * 60 + m);
  if (fire.empty()) return 0;
  constexpr int64_t kDay = 24 * 60;
  int64_t best = INT64_MAX;  // minutes
  for (size_t i = 1; i < fire.size(); ++i) best = std::min<int64_t>(best, fire[i] - fire[i - 1]);
  // Across midnight: the last firing of a matching day to the first of the
  // next matching day, D days later.
  const int64_t wrap = kDay - fire.back() + fire.front();
  if (wrap < best) {
    int64_t min_days = INT64_MAX;
    int64_t last = -1;
    chr::sys_days day{chr::year{2000} / 1 / 1};
    for (int64_t i = 0; i < 28 * 366 + 31; ++i, day += chr::days{1}) {
      const chr::year_month_day ymd{day};
      if (!matches_day(static_cast<int>(ymd.year()), static_cast<unsigned>(ymd.month()),
                       static_cast<unsigned>(ymd.day())))
        continue;
      if (last >= 0) min_days = std::min(min_days, i - last);
      last = i;
      if (min_days == 1) break;
    }
    if (min_days != INT64_MAX) best = std::min(best, (min_days - 1) * kDay + wrap);
  }
  return best == INT64_MAX ? 0 : best * 60;
}

Result<CronExpr> parse_cron(const std::string& text) {
  std::string expanded = text;
  if (!text.empty() && text[0] == '@') {
    expanded = alias(text);
    if (expanded.empty())
      return invalid_input("cron: unknown alias '" + text +
                           "' (known: @yearly, @annually, @monthly, @weekly, @daily, "
                           "@midnight, @hourly)");
  }
  std::vector<std::string> fields;
  {
    std::string cur;
    for (char ch : expanded) {
      if (std::isspace(static_cast<unsigned char>(ch))) {
        if (!cur.empty()) fields.push_back(cur);
        cur.clear();
      } else {
        cur += ch;
      }
    }
    if (!cur.empty()) fields.push_back(cur);
  }
  if (fields.size() != 5)
    return invalid_input(
        "cron: expected 5 fields (minute hour day-of-month month day-of-week), "
        "got " +
        std::to_string(fields.size()) + " in '" + text + "'");
  uint64_t masks[5];
  for (int i = 0; i < 5; ++i) {
    QCAL_ASSIGN_OR_RETURN(masks[i], parse_field(kFields[i], fields[i]));
  }
  CronExpr c;
  c.text = text;
  c.minutes = std::bitset<60>(masks[0]);
  c.hours = std::bitset<24>(masks[1]);
  c.days = std::bitset<32>(masks[2]);
  c.months = std::bitset<13>(masks[3]);
  uint64_t dow = masks[4];
  if (dow & (uint64_t{1} << 7)) dow = (dow | 1) & ~(uint64_t{1} << 7);
  c.weekdays = std::bitset<7>(dow);
  c.days_restricted = fields[2][0] != '*';
  c.weekdays_restricted = fields[4][0] != '*';
  if (!c.next_after(0)) return invalid_input("cron: '" + text + "' never fires");
  return c;
}

// ============================================================= schedules

std::string new_schedule_id() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  const auto ms =
      chr::duration_cast<chr::milliseconds>(chr::system_clock::now().time_since_epoch()).count();
  char hex[8];
  std::snprintf(hex, sizeof hex, "%06x", static_cast<unsigned>(rng() & 0xffffff));
  return "s-" + std::to_string(ms) + "-" + hex;
}

bool is_schedule_id(std::string_view id) {
  // "s-" digits "-" 6 hex digits
  if (id.size() < 10 || id.size() > 30 || id.substr(0, 2) != "s-") return false;
  const size_t dash = id.find('-', 2);
  if (dash == std::string_view::npos || dash == 2 || id.size() - dash - 1 != 6) return false;
  for (size_t i = 2; i < dash; ++i)
    if (id[i] < '0' || id[i] > '9') return false;
  for (size_t i = dash + 1; i < id.size(); ++i)
    if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f'))) return false;
  return true;
}

nlohmann::json ScheduleThresholds::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  if (max_ppl_regression) j["max_ppl_regression"] = *max_ppl_regression;
  if (max_kl_regression) j["max_kl_regression"] = *max_kl_regression;
  return j;
}

nlohmann::json ScheduleRun::to_json() const {
  nlohmann::json j = {{"job", job_id}, {"evaluated", evaluated}};
  if (!evaluated) return j;
  j["state"] = state;
  j["ppl"] = ppl ? nlohmann::json(*ppl) : nlohmann::json();
  j["kl"] = kl ? nlohmann::json(*kl) : nlohmann::json();
  j["regressed"] = regressed;
  j["baseline"] = baseline.empty() ? nlohmann::json() : nlohmann::json(baseline);
  if (!reason.empty()) j["reason"] = reason;
  return j;
}

ScheduleRun ScheduleRun::from_json(const std::string& job_id, const nlohmann::json& j) {
  ScheduleRun r;
  r.job_id = job_id;
  r.evaluated = true;
  r.state = j.value("state", "");
  if (j.contains("ppl") && j["ppl"].is_number()) r.ppl = j["ppl"].get<double>();
  if (j.contains("kl") && j["kl"].is_number()) r.kl = j["kl"].get<double>();
  r.regressed = j.value("regressed", false);
  if (j.contains("baseline") && j["baseline"].is_string()) r.baseline = j["baseline"];
  r.reason = j.value("reason", "");
  return r;
}

nlohmann::json Schedule::to_json() const {
  nlohmann::json runs_j = nlohmann::json::array();
  int64_t regressions = 0;
  for (const auto& r : runs) {
    runs_j.push_back(r.to_json());
    regressions += r.regressed ? 1 : 0;
  }
  return {{"id", id},
          {"cron", cron},
          {"template", job_template},
          {"thresholds", thresholds.to_json()},
          {"next_run_at", next_run_at},
          {"created_at", created_at},
          {"last_error", last_error},
          {"baseline", baseline},
          {"runs", runs_j},
          {"regressions", regressions}};
}

Result<ScheduleRequest> parse_schedule_request(const nlohmann::json& j) {
  if (!j.is_object()) return invalid_input("schedule: must be a JSON object");
  for (const auto& [k, v] : j.items()) {
    if (k != "cron" && k != "template" && k != "thresholds")
      return invalid_input("schedule: unknown key '" + k +
                           "' (expected cron, template, thresholds)");
  }
  ScheduleRequest r;
  if (!j.contains("cron") || !j["cron"].is_string())
    return invalid_input("cron: required, a string such as \"0 2 * * *\"");
  QCAL_ASSIGN_OR_RETURN(r.cron, parse_cron(j["cron"].get<std::string>()));
  if (!j.contains("template") || !j["template"].is_object())
    return invalid_input("template: required, a job spec object");
  r.job_template = j["template"];
  if (j.contains("thresholds")) {
    const auto& t = j["thresholds"];
    if (!t.is_object()) return invalid_input("thresholds: must be an object");
    for (const auto& [k, v] : t.items()) {
      if (k != "max_ppl_regression" && k != "max_kl_regression")
        return invalid_input("thresholds: unknown key '" + k +
                             "' (expected max_ppl_regression, max_kl_regression)");
      if (!v.is_number() || !(v.get<double>() >= 0) || !std::isfinite(v.get<double>()))
        return invalid_input("thresholds." + k + ": must be a non-negative number");
      if (v.get<double>() > limits::kMaxRegression)
        return invalid_input("thresholds." + k + ": must be at most " +
                             std::to_string(static_cast<int64_t>(limits::kMaxRegression)));
      (k == "max_ppl_regression" ? r.thresholds.max_ppl_regression
                                 : r.thresholds.max_kl_regression) = v.get<double>();
    }
  }
  return r;
}

nlohmann::json instantiate_template(const nlohmann::json& tmpl, const std::string& schedule_id,
                                    std::time_t at) {
  nlohmann::json j = tmpl;
  if (!j.is_object() || !j.contains("output") || !j["output"].is_object() ||
      !j["output"].contains("path") || !j["output"]["path"].is_string())
    return j;
  std::tm tm{};
  gmtime_r(&at, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%MZ", &tm);
  std::string path = j["output"]["path"];
  auto replace_all = [&path](const std::string& from, const std::string& to) {
    for (size_t p = path.find(from); p != std::string::npos; p = path.find(from, p + to.size()))
      path.replace(p, from.size(), to);
  };
  replace_all("{time}", stamp);
  replace_all("{schedule}", schedule_id);
  j["output"]["path"] = path;
  return j;
}

ScheduleRun evaluate_run(const JobInfo& job, const nlohmann::json& baseline,
                         const ScheduleThresholds& t) {
  ScheduleRun r;
  r.job_id = job.id;
  r.evaluated = true;
  r.state = job_state_name(job.state);
  const nlohmann::json& rep = job.report;
  if (rep.is_object()) {
    if (rep.contains("ppl") && rep["ppl"].is_number()) r.ppl = rep["ppl"].get<double>();
    if (rep.contains("kl") && rep["kl"].is_number()) r.kl = rep["kl"].get<double>();
  }
  if (!baseline.is_object()) return r;
  r.baseline = baseline.value("job", "");
  char buf[160];
  if (t.max_ppl_regression && r.ppl && baseline.contains("ppl") && baseline["ppl"].is_number()) {
    const double base = baseline["ppl"].get<double>();
    const double bound = base * (1.0 + *t.max_ppl_regression);
    if (*r.ppl > bound) {
      std::snprintf(buf, sizeof buf, "ppl %.4g > %.4g (baseline %.4g · (1 + %.4g))", *r.ppl, bound,
                    base, *t.max_ppl_regression);
      r.regressed = true;
      r.reason = buf;
    }
  }
  if (t.max_kl_regression && r.kl && baseline.contains("kl") && baseline["kl"].is_number()) {
    const double base = baseline["kl"].get<double>();
    const double bound = base + *t.max_kl_regression;
    if (*r.kl > bound) {
      std::snprintf(buf, sizeof buf, "kl %.4g > %.4g (baseline %.4g + %.4g)", *r.kl, bound, base,
                    *t.max_kl_regression);
      r.regressed = true;
      r.reason += (r.reason.empty() ? "" : "; ") + std::string(buf);
    }
  }
  return r;
}

// ========================================================== ScheduleStore

namespace {

// Creates the hash and adds the id to the set, unless the hash exists.
const char* kCreateScript = R"(
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1)";

const char* kRemoveScript = R"(
local n = redis.call('SREM', KEYS[1], ARGV[1])
local d = redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
if n == 0 and d == 0 then return 0 end
return 1)";

// Compare-and-set of next_run_at: the one coordinator that wins fires the slot.
const char* kClaimScript = R"(
local cur = redis.call('HGET', KEYS[1], 'next_run_at')
if cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'next_run_at', ARGV[2])
return 1)";

// Appends a run, dropping the oldest (and its record) past the cap.
const char* kAddRunScript = R"(
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
while redis.call('LLEN', KEYS[2]) > tonumber(ARGV[2]) do
  local old = redis.call('LPOP', KEYS[2])
  redis.call('HDEL', KEYS[3], old)
end
return 1)";

// Records a run's outcome once; moves the baseline; counts a regression.
const char* kRecordScript = R"(
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] == '1' then redis.call('INCR', KEYS[3]) end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'baseline', ARGV[5]) end
return 1)";

std::map<std::string, std::string> as_map(const RedisReply& r) {
  std::map<std::string, std::string> m;
  for (size_t i = 0; i + 1 < r.array.size(); i += 2) m[r.array[i].str] = r.array[i + 1].str;
  return m;
}

int64_t to_int(const std::string& s) {
  try {
    return std::stoll(s);
  } catch (...) {
    return 0;
  }
}

nlohmann::json parse_or_null(const std::string& s) {
  return nlohmann::json::parse(s, nullptr, /*allow_exceptions=*/false);
}

}  // namespace

ScheduleStore::ScheduleStore(RedisClient& redis, std::string prefix)
    : redis_(redis), prefix_(std::move(prefix)) {}

Status ScheduleStore::create(const Schedule& s) {
  std::vector<std::string> args = {s.id,
                                   "id",
                                   s.id,
                                   "cron",
                                   s.cron,
                                   "template",
                                   s.job_template.dump(),
                                   "thresholds",
                                   s.thresholds.to_json().dump(),
                                   "next_run_at",
                                   std::to_string(s.next_run_at),
                                   "created_at",
                                   std::to_string(s.created_at),
                                   "last_error",
                                   s.last_error};
  QCAL_ASSIGN_OR_RETURN(RedisReply r,
                        redis_.eval(kCreateScript, {key(s.id), prefix_ + ":schedules"}, args));
  if (r.integer == 0) return invalid_input("schedule " + s.id + " already exists");
  return Status::ok();
}

Result<Schedule> ScheduleStore::get(const std::string& id) {
  QCAL_ASSIGN_OR_RETURN(auto replies, redis_.pipeline({{"HGETALL", key(id)},
                                                       {"LRANGE", key(id) + ":runs", "0", "-1"},
                                                       {"HGETALL", key(id) + ":results"}}));
  if (replies.size() != 3) return internal_error("schedule " + id + ": short pipeline reply");
  auto h = as_map(replies[0]);
  if (h.empty()) return not_found("schedule " + id + " not found");
  Schedule s;
  s.id = id;
  s.cron = h["cron"];
  s.job_template = parse_or_null(h["template"]);
  nlohmann::json th = parse_or_null(h["thresholds"]);
  if (th.is_object()) {
    if (th.contains("max_ppl_regression") && th["max_ppl_regression"].is_number())
      s.thresholds.max_ppl_regression = th["max_ppl_regression"].get<double>();
    if (th.contains("max_kl_regression") && th["max_kl_regression"].is_number())
      s.thresholds.max_kl_regression = th["max_kl_regression"].get<double>();
  }
  s.next_run_at = to_int(h["next_run_at"]);
  s.created_at = to_int(h["created_at"]);
  s.last_error = sanitize_text(h["last_error"], kMaxErrorBytes + 512);  // never fails a read
  s.baseline = h.count("baseline") ? parse_or_null(h["baseline"]) : nlohmann::json();
  auto results = as_map(replies[2]);
  for (const auto& e : replies[1].array) {
    auto it = results.find(e.str);
    if (it == results.end()) {
      ScheduleRun r;
      r.job_id = e.str;
      s.runs.push_back(r);
    } else {
      s.runs.push_back(ScheduleRun::from_json(e.str, parse_or_null(it->second)));
    }
  }
  return s;
}

Result<std::vector<Schedule>> ScheduleStore::list() {
  QCAL_ASSIGN_OR_RETURN(RedisReply r, redis_.command({"SMEMBERS", prefix_ + ":schedules"}));
  std::vector<std::string> ids;
  for (const auto& e : r.array) ids.push_back(e.str);
  std::sort(ids.begin(), ids.end());
  std::vector<Schedule> out;
  for (const auto& id : ids) {
    auto s = get(id);
    if (s.is_ok()) {
      out.push_back(std::move(s).value());
    } else if (s.status().code() != Code::kNotFound) {  // removed meanwhile: skip
      return s.status();
    }
  }
  return out;
}

Status ScheduleStore::remove(const std::string& id) {
  QCAL_ASSIGN_OR_RETURN(RedisReply r, redis_.eval(kRemoveScript,
                                                  {prefix_ + ":schedules", key(id),
                                                   key(id) + ":runs", key(id) + ":results"},
                                                  {id}));
  if (r.integer == 0) return not_found("schedule " + id + " not found");
  return Status::ok();
}

Result<bool> ScheduleStore::claim_slot(const std::string& id, int64_t expected, int64_t next) {
  QCAL_ASSIGN_OR_RETURN(
      RedisReply r,
      redis_.eval(kClaimScript, {key(id)}, {std::to_string(expected), std::to_string(next)}));
  return r.integer == 1;
}

Status ScheduleStore::add_run(const std::string& id, const std::string& job_id) {
  QCAL_ASSIGN_OR_RETURN(
      RedisReply r, redis_.eval(kAddRunScript, {key(id), key(id) + ":runs", key(id) + ":results"},
                                {job_id, std::to_string(kMaxScheduleRuns)}));
  (void)r;
  return Status::ok();
}

Status ScheduleStore::set_last_error(const std::string& id, const std::string& error) {
  // Only for a schedule that still exists (HSET would recreate a deleted one).
  static const char* kScript = R"(
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_error', ARGV[1])
return 1)";
  QCAL_ASSIGN_OR_RETURN(RedisReply r,
                        redis_.eval(kScript, {key(id)}, {sanitize_text(error, kMaxErrorBytes)}));
  (void)r;
  return Status::ok();
}

Result<bool> ScheduleStore::record_run(const std::string& id, const ScheduleRun& run) {
  const bool success = run.state == job_state_name(JobState::kSucceeded) && run.ppl.has_value();
  nlohmann::json base = {{"job", run.job_id},
                         {"ppl", run.ppl ? nlohmann::json(*run.ppl) : nlohmann::json()},
                         {"kl", run.kl ? nlohmann::json(*run.kl) : nlohmann::json()}};
  QCAL_ASSIGN_OR_RETURN(
      RedisReply r,
      redis_.eval(kRecordScript, {key(id), key(id) + ":results", prefix_ + ":schedule_regressions"},
                  {run.job_id, run.to_json().dump(), run.regressed ? "1" : "0", success ? "1" : "0",
                   base.dump()}));
  return r.integer == 1;
}

Result<int64_t> ScheduleStore::regressions_total() {
  QCAL_ASSIGN_OR_RETURN(RedisReply r, redis_.command({"GET", prefix_ + ":schedule_regressions"}));
  return r.is_nil() ? 0 : to_int(r.str);
}

// ============================================================ the tick

namespace {

std::string utc_stamp(std::time_t t) {
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%MZ", &tm);
  return buf;
}

// Starts the run of slot `slot`; a non-OK status is the schedule's own problem.
Result<std::string> start_run(JobStore& jobs, const Schedule& s, const PlannerLimits& limits,
                              std::time_t slot) {
  nlohmann::json tmpl = instantiate_template(s.job_template, s.id, slot);
  QCAL_ASSIGN_OR_RETURN(JobSpec spec, parse_job_spec(tmpl));
  // The same admission as POST /v1/jobs: confined paths, plan, data headers.
  QCAL_ASSIGN_OR_RETURN(Admission a, admit_job(spec, limits));
  return jobs.create_job(a.spec, a.plan.tasks, s.id);
}

bool is_redis_failure(const Status& s) { return s.code() == Code::kUnavailable; }

}  // namespace

Result<TickReport> scheduler_tick(JobStore& jobs, const PlannerLimits& limits, std::time_t now) {
  ScheduleStore store(jobs.redis(), jobs.options().prefix);
  TickReport rep;
  QCAL_ASSIGN_OR_RETURN(std::vector<Schedule> all, store.list());
  for (Schedule& s : all) {
    // ---- Fire a due slot.
    if (s.next_run_at <= now) {
      auto cron = parse_cron(s.cron);
      std::optional<std::time_t> next = cron.is_ok() ? cron->next_after(now) : std::nullopt;
      // A stored cron that no longer parses (or never fires) is parked far away.
      const int64_t next_at = next ? static_cast<int64_t>(*next) : INT64_MAX;
      QCAL_ASSIGN_OR_RETURN(bool won, store.claim_slot(s.id, s.next_run_at, next_at));
      if (won) {
        const std::time_t slot = static_cast<std::time_t>(s.next_run_at);
        auto job =
            cron.is_ok() ? start_run(jobs, s, limits, slot) : Result<std::string>(cron.status());
        if (job.is_ok()) {
          QCAL_RETURN_IF_ERROR(store.add_run(s.id, *job));
          if (!s.last_error.empty()) QCAL_RETURN_IF_ERROR(store.set_last_error(s.id, ""));
          ScheduleRun fresh;
          fresh.job_id = *job;
          s.runs.push_back(fresh);
          ++rep.fired;
          LOG_INFO << "schedule " << s.id << ": slot " << utc_stamp(slot) << " started job "
                   << *job;
        } else if (is_redis_failure(job.status())) {
          return job.status();
        } else {
          ++rep.failed;
          const std::string err = "slot " + utc_stamp(slot) + ": " + job.status().to_string();
          LOG_WARN << "schedule " << s.id << ": " << err;
          QCAL_RETURN_IF_ERROR(store.set_last_error(s.id, err));
        }
      }
    }
    // ---- Record finished runs, in order.
    nlohmann::json baseline = s.baseline;
    for (const ScheduleRun& run : s.runs) {
      if (run.evaluated) continue;
      auto job = jobs.get_job(run.job_id);
      ScheduleRun outcome;
      if (!job.is_ok()) {
        if (job.status().code() != Code::kNotFound) return job.status();
        outcome.job_id = run.job_id;
        outcome.evaluated = true;
        outcome.state = "missing";
      } else {
        if (!is_terminal(job->state)) break;  // later runs wait for this one's baseline
        outcome = evaluate_run(*job, baseline, s.thresholds);
      }
      QCAL_ASSIGN_OR_RETURN(bool recorded, store.record_run(s.id, outcome));
      if (!recorded) break;  // another coordinator is recording this schedule's runs
      ++rep.evaluated;
      if (outcome.regressed) {
        ++rep.regressed;
        LOG_WARN << "schedule " << s.id << ": run " << outcome.job_id
                 << " regressed: " << outcome.reason;
      }
      if (outcome.state == job_state_name(JobState::kSucceeded) && outcome.ppl)
        baseline = {{"job", outcome.job_id},
                    {"ppl", *outcome.ppl},
                    {"kl", outcome.kl ? nlohmann::json(*outcome.kl) : nlohmann::json()}};
    }
  }
  return rep;
}

}  // namespace qcal

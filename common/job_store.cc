#include "common/job_store.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>

#include "common/sanitize.h"

namespace qcal {

const char* job_state_name(JobState s) {
  switch (s) {
    case JobState::kQueued: return "queued";
    case JobState::kRunning: return "running";
    case JobState::kValidating: return "validating";
    case JobState::kSucceeded: return "succeeded";
    case JobState::kFailed: return "failed";
    case JobState::kCancelled: return "cancelled";
  }
  return "queued";
}

const char* task_state_name(TaskState s) {
  switch (s) {
    case TaskState::kWaiting: return "waiting";
    case TaskState::kReady: return "ready";
    case TaskState::kRunning: return "running";
    case TaskState::kDone: return "done";
    case TaskState::kFailed: return "failed";
    case TaskState::kCancelled: return "cancelled";
  }
  return "waiting";
}

std::optional<JobState> parse_job_state(const std::string& s) {
  for (JobState st : {JobState::kQueued, JobState::kRunning, JobState::kValidating,
                      JobState::kSucceeded, JobState::kFailed, JobState::kCancelled}) {
    if (s == job_state_name(st)) return st;
  }
  return std::nullopt;
}

bool is_terminal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}

namespace {

using nlohmann::json;

constexpr const char* kPriorities[] = {"high", "normal", "low"};
constexpr const char* kGroup = "workers";
constexpr const char* kBuckets[] = {"1", "10", "60", "600", "3600", "+Inf"};

// ---------------------------------------------------------------------------
// Lua. Every script starts with this prelude; ARGV[1] is always the prefix.
// Times come from the server's clock (TIME), so durations never mix clocks of
// different machines. Invariant: a queue entry is acknowledged and deleted
// together (ack_del), so a stream's length is exactly the number of entries
// not yet delivered plus those pending — queue_depth() relies on it.
const char* kPrelude = R"LUA(
local P = ARGV[1]
local T = redis.call('TIME')
local NOW = tonumber(T[1]) + tonumber(T[2]) / 1000000
local NOWS = string.format('%.6f', NOW)
local MK = P .. ':metrics'
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local function jkey(job) return P .. ':job:' .. job end
local function tkey(job, task) return P .. ':task:' .. job .. ':' .. task end
local function log(job, line, cap)
  local lk = jkey(job) .. ':log'
  redis.call('RPUSH', lk, line)
  redis.call('LTRIM', lk, -cap, -1)
  redis.call('HINCRBY', jkey(job), 'log_total', 1)
end
local function set_job_state(job, new)
  local jk = jkey(job)
  local old = redis.call('HGET', jk, 'state')
  if old == new then
    redis.call('HSET', jk, 'updated_at', NOWS)
    return
  end
  local created = redis.call('HGET', jk, 'created_at')
  if old then redis.call('ZREM', P .. ':jobs:state:' .. old, job) end
  redis.call('ZADD', P .. ':jobs:state:' .. new, created, job)
  redis.call('HSET', jk, 'state', new, 'updated_at', NOWS)
  if TERMINAL[new] then
    redis.call('HINCRBY', MK, 'jobs_' .. new, 1)
    -- The job no longer owns its output path (job_store.h "Output ownership").
    local out = redis.call('HGET', jk, 'output_key')
    if out and out ~= '' then
      local ok = P .. ':output:' .. out
      if redis.call('GET', ok) == job then redis.call('DEL', ok) end
    end
  end
end
local function ack_del(stream, id)
  if stream and id and stream ~= '' and id ~= '' then
    redis.call('XACK', stream, 'workers', id)
    redis.call('XDEL', stream, id)
  end
end
local function drop_entry(tk)
  local s = redis.call('HMGET', tk, 'stream', 'entry')
  ack_del(s[1], s[2])
  redis.call('HSET', tk, 'stream', '', 'entry', '')
end
local function enqueue(job, task)
  local prio = redis.call('HGET', jkey(job), 'priority')
  local q = P .. ':queue:' .. prio
  local id = redis.call('XADD', q, '*', 'job', job, 'task', task)
  redis.call('HSET', tkey(job, task), 'state', 'ready', 'stream', q, 'entry', id, 'worker', '')
end
-- Unfinished deps of a task (its `remaining`).
local function unfinished_deps(job, task)
  local deps = cjson.decode(redis.call('HGET', tkey(job, task), 'deps') or '[]')
  local n = 0
  for _, d in ipairs(deps) do
    if redis.call('HGET', tkey(job, d), 'state') ~= 'done' then n = n + 1 end
  end
  return n
end
-- Ends a job: every unfinished task is cancelled and its queue entry dropped
-- (a running task's worker learns it from its next heartbeat).
local function end_job(job, state, err)
  local tasks = redis.call('LRANGE', jkey(job) .. ':tasks', 0, -1)
  for _, t in ipairs(tasks) do
    local tk = tkey(job, t)
    local s = redis.call('HGET', tk, 'state')
    if s == 'waiting' or s == 'ready' or s == 'running' then
      drop_entry(tk)
      redis.call('HSET', tk, 'state', 'cancelled', 'finished_at', NOWS)
    end
  end
  redis.call('HSET', jkey(job), 'error', err)
  set_job_state(job, state)
end
-- Ownership of a claim: ARGV[2..7] = job, task, attempt, worker, stream, entry.
-- Returns the task's fields, or a reply to return at once.
local function owned_claim()
  local job, task, attempt, worker = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
  local tk = tkey(job, task)
  local ts = redis.call('HMGET', tk, 'state', 'attempts', 'worker', 'started_at', 'dependents',
                        'type', 'deps')
  if not ts[1] then return nil, {'notfound', 'task ' .. task .. ' of job ' .. job .. ' not found'} end
  -- Reclaimed by another worker (or re-enqueued) since: not ours to report.
  if ts[2] ~= attempt or ts[3] ~= worker then return nil, {'stale'} end
  if ts[1] ~= 'running' then
    -- Still ours, but the job ended (or this is a repeat): drop our entry.
    ack_del(ARGV[6], ARGV[7])
    return nil, {'stale'}
  end
  return ts, nil
end
)LUA";

// ARGV: P, job, spec, priority, labels, schedule_id, n tasks, output key, then
// 7 per task. The output key is taken unless a live job holds it (then
// {'conflict', msg}); a holder that ended (or vanished) without releasing it
// (a crash between the two, an old AOF) counts as free.
const char* kCreateJob = R"LUA(
local job = ARGV[2]
local jk = jkey(job)
if redis.call('EXISTS', jk) == 1 then return {'exists'} end
local n = tonumber(ARGV[7])
local out = ARGV[8]
local gen = 0
if out ~= '' then
  local ok = P .. ':output:' .. out
  local owner = redis.call('GET', ok)
  if owner and owner ~= job then
    local os = redis.call('HGET', jkey(owner), 'state')
    if os and not TERMINAL[os] then
      return {'conflict', 'output.path: ' .. out .. ' is the output of job ' .. owner ..
              ', which is ' .. os .. '; cancel it or wait for it to end, or choose another path'}
    end
  end
  redis.call('SET', ok, job)
  gen = redis.call('INCR', P .. ':output_generation')
end
redis.call('HSET', jk, 'spec', ARGV[3], 'state', 'queued', 'priority', ARGV[4], 'labels', ARGV[5],
           'schedule_id', ARGV[6], 'created_at', NOWS, 'updated_at', NOWS, 'error', '',
           'report', 'null', 'tasks_total', n, 'tasks_done', 0, 'log_total', 0,
           'output_key', out, 'output_gen', gen)
redis.call('ZADD', P .. ':jobs', NOWS, job)
redis.call('ZADD', P .. ':jobs:state:queued', NOWS, job)
redis.call('HINCRBY', MK, 'jobs_created', 1)
for i = 0, n - 1 do
  local o = 9 + i * 7
  local id = ARGV[o]
  redis.call('RPUSH', jk .. ':tasks', id)
  redis.call('HSET', tkey(job, id), 'type', ARGV[o + 1], 'deps', ARGV[o + 2], 'params', ARGV[o + 3],
             'mem_bytes', ARGV[o + 4], 'dependents', ARGV[o + 5], 'remaining', ARGV[o + 6],
             'state', 'waiting', 'attempts', 0, 'worker', '', 'started_at', 0, 'finished_at', 0,
             'result', 'null', 'error', '', 'stream', '', 'entry', '')
  if ARGV[o + 6] == '0' then enqueue(job, id) end
end
return {'ok'}
)LUA";

// ARGV: P, worker, lease_ms, max_attempts, log cap.
// Returns {'claim', stream, id, job, task, attempt, job hash, task hash},
// {'none', last id high, normal, low} or {'retry'} (skipped many entries).
const char* kClaim = R"LUA(
local worker, lease = ARGV[2], ARGV[3]
local max_attempts, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local PRIOS = {'high', 'normal', 'low'}
redis.call('ZADD', P .. ':workers', NOWS, worker)
local function autoclaim(q)
  local cursor = '0-0'
  -- COUNT 1 claims at most one entry; the cursor walks the rest of the PEL.
  for _ = 1, 10000 do
    local r = redis.call('XAUTOCLAIM', q, 'workers', worker, lease, cursor, 'COUNT', 1)
    if #r[2] > 0 and r[2][1] then return r[2][1] end
    cursor = r[1]
    if cursor == '0-0' then return nil end
  end
  return nil
end
for _ = 1, 100 do
  local q, e, reclaimed = nil, nil, false
  for _, p in ipairs(PRIOS) do
    local qq = P .. ':queue:' .. p
    local x = autoclaim(qq)
    if x then
      q, e, reclaimed = qq, x, true
      break
    end
  end
  if not e then
    for _, p in ipairs(PRIOS) do
      local qq = P .. ':queue:' .. p
      local r = redis.call('XREADGROUP', 'GROUP', 'workers', worker, 'COUNT', 1, 'STREAMS', qq, '>')
      if r and r[1] and #r[1][2] > 0 then
        q, e = qq, r[1][2][1]
        break
      end
    end
  end
  if not e then
    local out = {'none'}
    for _, p in ipairs(PRIOS) do
      local r = redis.call('XREVRANGE', P .. ':queue:' .. p, '+', '-', 'COUNT', 1)
      table.insert(out, (#r > 0) and r[1][1] or '0-0')
    end
    return out
  end
  local id = e[1]
  local f = {}
  if e[2] then
    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  end
  local job, task = f['job'], f['task']
  local js, ts = nil, {}
  if job and task then
    js = redis.call('HGET', jkey(job), 'state')
    ts = redis.call('HMGET', tkey(job, task), 'state', 'stream', 'entry', 'attempts', 'worker',
                    'error', 'type')
  end
  -- Skip (ack and delete) entries of ended jobs and entries that are not the
  -- task's current one (superseded by a re-enqueue or a reset).
  if not js or not ts[1] or TERMINAL[js] or ts[2] ~= q or ts[3] ~= id or
     (ts[1] ~= 'ready' and ts[1] ~= 'running') then
    ack_del(q, id)
  else
    local tk = tkey(job, task)
    local attempts = tonumber(ts[4]) or 0
    local last_err = ts[6] or ''
    if reclaimed and ts[1] == 'running' then
      last_err = 'worker ' .. (ts[5] or '?') .. ' stopped heartbeating (lease expired) on attempt ' ..
                 attempts
      redis.call('HSET', tk, 'error', last_err)
      redis.call('HINCRBY', MK, 'tasks_reclaimed', 1)
      log(job, 'task ' .. task .. ': ' .. last_err, cap)
    end
    if attempts + 1 > max_attempts then
      ack_del(q, id)
      redis.call('HSET', tk, 'state', 'failed', 'finished_at', NOWS, 'stream', '', 'entry', '')
      local msg = 'task ' .. task .. ' failed ' .. attempts .. ' times: ' .. last_err
      end_job(job, 'failed', msg)
      log(job, 'job failed: ' .. msg, cap)
    else
      redis.call('HSET', tk, 'state', 'running', 'attempts', attempts + 1, 'worker', worker,
                 'started_at', NOWS, 'finished_at', 0)
      if ts[7] == 'validate' then
        set_job_state(job, 'validating')
      elseif js == 'queued' then
        set_job_state(job, 'running')
      end
      log(job, 'task ' .. task .. ' claimed by ' .. worker .. ' (attempt ' .. (attempts + 1) .. ')',
          cap)
      return {'claim', q, id, job, task, attempts + 1, redis.call('HGETALL', jkey(job)),
              redis.call('HGETALL', tk)}
    end
  end
end
return {'retry'}
)LUA";

// ARGV: P, job, task, attempt, worker, stream, entry.  Returns 1 or 0.
const char* kHeartbeat = R"LUA(
local js = redis.call('HGET', jkey(ARGV[2]), 'state')
if not js or TERMINAL[js] then return 0 end
local ts = redis.call('HMGET', tkey(ARGV[2], ARGV[3]), 'state', 'attempts', 'worker')
if ts[1] ~= 'running' or ts[2] ~= ARGV[4] or ts[3] ~= ARGV[5] then return 0 end
local r = redis.call('XCLAIM', ARGV[6], 'workers', ARGV[5], 0, ARGV[7], 'JUSTID')
if #r == 0 then return 0 end
redis.call('ZADD', P .. ':workers', NOWS, ARGV[5])
return 1
)LUA";

// ARGV: P, job, task, attempt, worker, stream, entry, result, gate_failed (0|1),
// report ('' = none), gate error message, log cap.
const char* kComplete = R"LUA(
local ts, early = owned_claim()
if not ts then return early end
local job, task, worker = ARGV[2], ARGV[3], ARGV[5]
local jk, tk = jkey(job), tkey(job, task)
local cap = tonumber(ARGV[12])
local dur = math.max(0, NOW - (tonumber(ts[4]) or NOW))
redis.call('HSET', tk, 'state', 'done', 'finished_at', NOWS, 'result', ARGV[8], 'stream', '',
           'entry', '')
ack_del(ARGV[6], ARGV[7])
redis.call('HINCRBY', MK, 'tasks_completed', 1)
redis.call('HINCRBYFLOAT', MK, 'task_seconds_sum', string.format('%.6f', dur))
redis.call('HINCRBY', MK, 'task_seconds_count', 1)
for _, le in ipairs({1, 10, 60, 600, 3600}) do
  if dur <= le then redis.call('HINCRBY', MK, 'task_seconds_bucket_' .. le, 1) end
end
redis.call('HINCRBY', MK, 'task_seconds_bucket_+Inf', 1)
redis.call('HINCRBY', jk, 'tasks_done', 1)
if ARGV[10] ~= '' then redis.call('HSET', jk, 'report', ARGV[10]) end
log(job, string.format('task %s done by %s in %.3f s', task, worker, dur), cap)
if ARGV[9] == '1' then
  end_job(job, 'failed', ARGV[11])
  log(job, 'job failed: ' .. ARGV[11], cap)
  return {'ok'}
end
-- Invariant: a waiting task's `remaining` counts its deps that are not done
-- (rerun_producer restores it when a done dep is reset).
for _, d in ipairs(cjson.decode(ts[5] or '[]')) do
  local dk = tkey(job, d)
  if redis.call('HGET', dk, 'state') == 'waiting' then
    if redis.call('HINCRBY', dk, 'remaining', -1) <= 0 then enqueue(job, d) end
  end
end
local c = redis.call('HMGET', jk, 'tasks_done', 'tasks_total')
if tonumber(c[1]) >= tonumber(c[2]) then
  set_job_state(job, 'succeeded')
  log(job, 'job succeeded', cap)
else
  redis.call('HSET', jk, 'updated_at', NOWS)
end
return {'ok'}
)LUA";

// ARGV: P, job, task, attempt, worker, stream, entry, error, retryable (0|1),
// max_attempts, log cap.
const char* kFail = R"LUA(
local ts, early = owned_claim()
if not ts then return early end
local job, task, err = ARGV[2], ARGV[3], ARGV[8]
local tk = tkey(job, task)
local attempts, max_attempts, cap = tonumber(ts[2]), tonumber(ARGV[10]), tonumber(ARGV[11])
redis.call('HSET', tk, 'error', err)
redis.call('HINCRBY', MK, 'tasks_failed', 1)
ack_del(ARGV[6], ARGV[7])
if ARGV[9] == '1' and attempts < max_attempts then
  enqueue(job, task)
  log(job, 'task ' .. task .. ' failed on attempt ' .. attempts .. ' (will retry): ' .. err, cap)
  return {'ok'}
end
redis.call('HSET', tk, 'state', 'failed', 'finished_at', NOWS, 'stream', '', 'entry', '')
local msg
if ARGV[9] == '1' then
  msg = 'task ' .. task .. ' failed ' .. attempts .. ' times: ' .. err
else
  msg = 'task ' .. task .. ': ' .. err
end
end_job(job, 'failed', msg)
log(job, 'job failed: ' .. msg, cap)
return {'ok'}
)LUA";

// ARGV: P, job, consumer task, attempt, worker, stream, entry, producer, why, log cap.
const char* kRerun = R"LUA(
local ts, early = owned_claim()
if not ts then return early end
local job, consumer, producer, why = ARGV[2], ARGV[3], ARGV[8], ARGV[9]
local cap = tonumber(ARGV[10])
local jk, ck, pk = jkey(job), tkey(job, ARGV[3]), tkey(job, ARGV[8])
local is_dep = false
for _, d in ipairs(cjson.decode(ts[7] or '[]')) do
  if d == producer then is_dep = true end
end
if not is_dep then
  return {'invalid', 'task ' .. consumer .. ' does not depend on ' .. producer}
end
local ps = redis.call('HGET', pk, 'state')
if ps == 'done' then
  redis.call('HSET', pk, 'result', 'null', 'finished_at', 0,
             'error', 'output found corrupt by ' .. consumer .. ': ' .. why)
  redis.call('HINCRBY', jk, 'tasks_done', -1)
  enqueue(job, producer)
  -- Dependents queued on the bad output wait for the new one instead.
  for _, d in ipairs(cjson.decode(redis.call('HGET', pk, 'dependents') or '[]')) do
    local dk = tkey(job, d)
    local s = redis.call('HGET', dk, 'state')
    if s == 'ready' then
      drop_entry(dk)
      redis.call('HSET', dk, 'state', 'waiting')
    end
    if s == 'ready' or s == 'waiting' then
      redis.call('HSET', dk, 'remaining', unfinished_deps(job, d))
    end
  end
elseif ps ~= 'ready' and ps ~= 'running' then
  return {'invalid', 'producer ' .. producer .. ' is ' .. tostring(ps) .. ', cannot re-run it'}
end
ack_del(ARGV[6], ARGV[7])
redis.call('HSET', ck, 'state', 'waiting', 'worker', '', 'stream', '', 'entry', '',
           'remaining', unfinished_deps(job, consumer),
           'error', 'input from ' .. producer .. ' corrupt: ' .. why)
if redis.call('HGET', jk, 'state') == 'validating' then set_job_state(job, 'running') end
redis.call('HINCRBY', MK, 'tasks_rerun', 1)
log(job, 'task ' .. consumer .. ': output of ' .. producer .. ' is corrupt (' .. why ..
    '); re-running ' .. producer, cap)
return {'ok'}
)LUA";

// The publishing fence (worker/publish.h). ARGV: P, job, task, attempt,
// worker, stream, entry, output key. The claim must still own the task
// (owned_claim: running, same attempt and worker), the job must be live and
// still own the output key. begin marks the task "publishing" by this
// attempt and answers {'ok', generation}; finish checks the same plus the
// mark, records "published" and clears the mark. Anything else: {'stale', why}.
const char* kBeginPublish = R"LUA(
local ts, early = owned_claim()
if not ts then return {'stale', 'the task is no longer this claim\'s'} end
local job, task, out = ARGV[2], ARGV[3], ARGV[8]
local js = redis.call('HGET', jkey(job), 'state')
if not js or TERMINAL[js] then return {'stale', 'job ' .. job .. ' is ' .. tostring(js)} end
if out ~= '' and redis.call('GET', P .. ':output:' .. out) ~= job then
  return {'stale', 'job ' .. job .. ' no longer owns output ' .. out}
end
redis.call('HSET', tkey(job, task), 'publishing', ARGV[4], 'publish_started', NOWS)
return {'ok', redis.call('HGET', jkey(job), 'output_gen') or '0'}
)LUA";

const char* kFinishPublish = R"LUA(
local ts, early = owned_claim()
if not ts then return {'stale', 'the task is no longer this claim\'s'} end
local job, task, out = ARGV[2], ARGV[3], ARGV[8]
local tk = tkey(job, task)
local js = redis.call('HGET', jkey(job), 'state')
if not js or TERMINAL[js] then return {'stale', 'job ' .. job .. ' is ' .. tostring(js)} end
if out ~= '' and redis.call('GET', P .. ':output:' .. out) ~= job then
  return {'stale', 'job ' .. job .. ' no longer owns output ' .. out}
end
if redis.call('HGET', tk, 'publishing') ~= ARGV[4] then
  return {'stale', 'attempt ' .. ARGV[4] .. ' did not begin publishing'}
end
redis.call('HDEL', tk, 'publishing')
redis.call('HSET', tk, 'published', ARGV[4], 'published_at', NOWS)
return {'ok'}
)LUA";

// ARGV: P, job, log cap.
const char* kCancel = R"LUA(
local job = ARGV[2]
local js = redis.call('HGET', jkey(job), 'state')
if not js then return {'notfound', 'job ' .. job .. ' not found'} end
if TERMINAL[js] then return {'invalid', 'job ' .. job .. ' is already ' .. js} end
end_job(job, 'cancelled', '')
log(job, 'job cancelled', tonumber(ARGV[3]))
return {'ok'}
)LUA";

// ARGV: P, job, line, log cap.
const char* kAppendLog = R"LUA(
if redis.call('EXISTS', jkey(ARGV[2])) == 0 then
  return {'notfound', 'job ' .. ARGV[2] .. ' not found'}
end
log(ARGV[2], ARGV[3], tonumber(ARGV[4]))
return {'ok'}
)LUA";

// ARGV: P, job, from (absolute line number). Returns {'ok', lines...}.
const char* kGetLog = R"LUA(
local jk = jkey(ARGV[2])
if redis.call('EXISTS', jk) == 0 then return {'notfound', 'job ' .. ARGV[2] .. ' not found'} end
local total = tonumber(redis.call('HGET', jk, 'log_total') or '0')
local len = redis.call('LLEN', jk .. ':log')
local start = math.max(0, tonumber(ARGV[3]) - (total - len))
local out = {'ok'}
if start < len then
  for _, l in ipairs(redis.call('LRANGE', jk .. ':log', start, -1)) do table.insert(out, l) end
end
return out
)LUA";

// ARGV: P, worker.
const char* kWorkerSeen = R"LUA(
redis.call('ZADD', P .. ':workers', NOWS, ARGV[2])
redis.call('ZREMRANGEBYSCORE', P .. ':workers', '-inf', string.format('%.6f', NOW - 86400))
return {'ok'}
)LUA";

// ARGV: P, within_s.
const char* kLiveWorkers = R"LUA(
return redis.call('ZCOUNT', P .. ':workers', string.format('%.6f', NOW - tonumber(ARGV[2])), '+inf')
)LUA";

// ---------------------------------------------------------------------------

std::string script(const char* body) { return std::string(kPrelude) + body; }

const std::string& script_text(const char* body) {
  // Built once per body; RedisClient caches the SHA per text.
  static thread_local std::unordered_map<const char*, std::string> cache;
  auto it = cache.find(body);
  if (it == cache.end()) it = cache.emplace(body, script(body)).first;
  return it->second;
}

// Stored JSON, read so that bad data never fails a read: invalid UTF-8 (from
// data written before the sanitizer, or by another tool) becomes U+FFFD before
// parsing, and the strings of the result are sanitized like what is written.
json parse_json_or_null(const std::string& s) {
  if (s.empty()) return nullptr;
  std::string text = s;
  if (!is_clean_utf8(text)) {
    text.clear();
    for (unsigned char c : sanitize_text(s)) text += static_cast<char>(c);
    // sanitize_text escaped bad bytes as "\xNN": inside JSON strings that is
    // an invalid escape, so drop the backslash.
    std::string fixed;
    for (size_t i = 0; i < text.size(); ++i) {
      if (text[i] == '\\' && i + 1 < text.size() && text[i + 1] == 'x' && i + 3 < text.size()) {
        fixed += "\\u00";
        i += 1;
        continue;
      }
      fixed += text[i];
    }
    text = std::move(fixed);
  }
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  return j.is_discarded() ? json(nullptr) : sanitize_json(j);
}

// A stored string, read back as valid, bounded UTF-8.
std::string clean(const std::string& s, size_t cap = 0) { return sanitize_text(s, cap); }

double to_double(const std::string& s) { return s.empty() ? 0.0 : std::strtod(s.c_str(), nullptr); }
int64_t to_int(const std::string& s) {
  return s.empty() ? 0 : std::strtoll(s.c_str(), nullptr, 10);
}

std::map<std::string, std::string> hash_of(const RedisReply& r) {
  std::map<std::string, std::string> m;
  for (size_t i = 0; i + 1 < r.array.size(); i += 2) m[r.array[i].str] = r.array[i + 1].str;
  return m;
}

std::string get(const std::map<std::string, std::string>& m, const char* k) {
  auto it = m.find(k);
  return it == m.end() ? std::string() : it->second;
}

std::optional<TaskState> parse_task_state(const std::string& s) {
  for (TaskState st : {TaskState::kWaiting, TaskState::kReady, TaskState::kRunning,
                       TaskState::kDone, TaskState::kFailed, TaskState::kCancelled}) {
    if (s == task_state_name(st)) return st;
  }
  return std::nullopt;
}

Priority parse_priority(const std::string& s) {
  if (s == "high") return Priority::kHigh;
  if (s == "low") return Priority::kLow;
  return Priority::kNormal;
}

JobInfo job_from_hash(const std::string& id, const std::map<std::string, std::string>& h) {
  JobInfo j;
  j.id = id;
  j.state = parse_job_state(get(h, "state")).value_or(JobState::kQueued);
  j.spec = parse_json_or_null(get(h, "spec"));
  j.priority = parse_priority(get(h, "priority"));
  json labels = parse_json_or_null(get(h, "labels"));
  if (labels.is_object()) {
    for (auto it = labels.begin(); it != labels.end(); ++it) {
      if (it->is_string()) j.labels[it.key()] = it->get<std::string>();
    }
  }
  j.created_at = to_double(get(h, "created_at"));
  j.updated_at = to_double(get(h, "updated_at"));
  j.error = clean(get(h, "error"), kMaxErrorBytes + 512);
  j.report = parse_json_or_null(get(h, "report"));
  j.schedule_id = clean(get(h, "schedule_id"), 256);
  j.tasks_total = to_int(get(h, "tasks_total"));
  j.tasks_done = to_int(get(h, "tasks_done"));
  j.output_key = clean(get(h, "output_key"));
  j.output_generation = to_int(get(h, "output_gen"));
  return j;
}

TaskInfo task_from_hash(const std::string& job_id, const std::string& task_id,
                        const std::map<std::string, std::string>& h) {
  TaskInfo t;
  t.job_id = job_id;
  t.def.id = task_id;
  t.def.type = get(h, "type");
  json deps = parse_json_or_null(get(h, "deps"));
  if (deps.is_array()) {
    for (const auto& d : deps) {
      if (d.is_string()) t.def.deps.push_back(d.get<std::string>());
    }
  }
  t.def.params = parse_json_or_null(get(h, "params"));
  if (t.def.params.is_null()) t.def.params = json::object();
  t.def.mem_bytes = static_cast<uint64_t>(std::strtoull(get(h, "mem_bytes").c_str(), nullptr, 10));
  t.state = parse_task_state(get(h, "state")).value_or(TaskState::kWaiting);
  t.attempts = to_int(get(h, "attempts"));
  t.worker = clean(get(h, "worker"), 256);
  t.started_at = to_double(get(h, "started_at"));
  t.finished_at = to_double(get(h, "finished_at"));
  t.result = parse_json_or_null(get(h, "result"));
  t.error = clean(get(h, "error"), kMaxErrorBytes + 512);
  return t;
}

// Scripts answer {'ok', ...} | {'notfound', msg} | {'invalid', msg} | {'stale'} | ...
Status script_status(const RedisReply& r, const std::string& what) {
  if (r.type != RedisReply::Type::kArray || r.array.empty()) {
    return internal_error(what + ": unexpected reply from the store script");
  }
  const std::string& tag = r.array[0].str;
  std::string msg = r.array.size() > 1 ? r.array[1].str : tag;
  if (tag == "notfound") return not_found(msg);
  if (tag == "invalid") return invalid_input(msg);
  if (tag == "conflict") return conflict(msg);
  return Status::ok();
}

std::string new_job_id() {
  static thread_local std::mt19937_64 rng{
      std::random_device{}() ^
      static_cast<uint64_t>(std::hash<std::thread::id>{}(std::this_thread::get_id()))};
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
  char hex[9];
  std::snprintf(hex, sizeof(hex), "%08x", static_cast<unsigned>(rng() & 0xffffffffu));
  return "j-" + std::to_string(ms) + "-" + hex;
}

// Checks the DAG and returns the tasks in a topological order that keeps the
// given order where it already is one.
Result<std::vector<const TaskDef*>> dag_order(const std::vector<TaskDef>& tasks) {
  if (tasks.empty()) return invalid_input("job has no tasks");
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < tasks.size(); ++i) {
    if (tasks[i].id.empty()) return invalid_input("task #" + std::to_string(i) + ": empty id");
    if (!index.emplace(tasks[i].id, i).second) {
      return invalid_input("task " + tasks[i].id + ": duplicate id");
    }
  }
  std::vector<size_t> indegree(tasks.size(), 0);
  std::vector<std::vector<size_t>> out(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    std::set<std::string> seen;
    for (const auto& d : tasks[i].deps) {
      auto it = index.find(d);
      if (it == index.end()) return invalid_input("task " + tasks[i].id + ": unknown dep " + d);
      if (it->second == i) return invalid_input("task " + tasks[i].id + ": depends on itself");
      if (!seen.insert(d).second)
        return invalid_input("task " + tasks[i].id + ": dep " + d + " twice");
      out[it->second].push_back(i);
      ++indegree[i];
    }
  }
  // Kahn's algorithm, always taking the lowest ready index.
  std::set<size_t> ready;
  for (size_t i = 0; i < tasks.size(); ++i) {
    if (indegree[i] == 0) ready.insert(i);
  }
  std::vector<const TaskDef*> order;
  while (!ready.empty()) {
    size_t i = *ready.begin();
    ready.erase(ready.begin());
    order.push_back(&tasks[i]);
    for (size_t j : out[i]) {
      if (--indegree[j] == 0) ready.insert(j);
    }
  }
  if (order.size() != tasks.size()) return invalid_input("task graph has a cycle");
  return order;
}

}  // namespace

bool is_job_id(std::string_view id) {
  // "j-" digits "-" 8 hex digits, as new_job_id writes it
  if (id.size() < 12 || id.size() > 40 || id.substr(0, 2) != "j-") return false;
  const size_t dash = id.find('-', 2);
  if (dash == std::string_view::npos || dash == 2 || id.size() - dash - 1 != 8) return false;
  for (size_t i = 2; i < dash; ++i)
    if (id[i] < '0' || id[i] > '9') return false;
  for (size_t i = dash + 1; i < id.size(); ++i)
    if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f'))) return false;
  return true;
}

JobStore::JobStore(RedisClient& redis, JobStoreOptions opts)
    : redis_(redis), opts_(std::move(opts)) {}

Status JobStore::init() {
  for (const char* p : kPriorities) {
    auto r =
        redis_.command({"XGROUP", "CREATE", opts_.prefix + ":queue:" + p, kGroup, "0", "MKSTREAM"});
    if (!r.is_ok() && r.status().message().find("BUSYGROUP") == std::string::npos) {
      return r.status().with_context("creating consumer group");
    }
  }
  return Status::ok();
}

std::string output_owner_key(const std::string& path) {
  if (path.empty()) return "";
  std::string k = std::filesystem::path(path).lexically_normal().string();
  while (k.size() > 1 && k.back() == '/') k.pop_back();
  return k;
}

Result<std::string> JobStore::create_job(const JobSpec& spec, const std::vector<TaskDef>& tasks,
                                         const std::string& schedule_id) {
  QCAL_ASSIGN_OR_RETURN(auto order, dag_order(tasks));
  std::unordered_map<std::string, std::vector<std::string>> dependents;
  for (const TaskDef* t : order) {
    for (const auto& d : t->deps) dependents[d].push_back(t->id);
  }
  json labels = json::object();
  for (const auto& [k, v] : spec.labels) labels[k] = v;
  std::vector<std::string> args = {opts_.prefix,
                                   "",  // job id, below
                                   sanitize_json(spec.to_json()).dump(),
                                   priority_name(spec.priority),
                                   sanitize_json(labels).dump(),
                                   sanitize_text(schedule_id, 256),
                                   std::to_string(order.size()),
                                   output_owner_key(spec.output.path)};
  for (const TaskDef* t : order) {
    args.push_back(t->id);
    args.push_back(t->type);
    args.push_back(json(t->deps).dump());
    args.push_back(sanitize_json(t->params).dump());
    args.push_back(std::to_string(t->mem_bytes));
    args.push_back(json(dependents[t->id]).dump());
    args.push_back(std::to_string(t->deps.size()));
  }
  for (int attempt = 0; attempt < 5; ++attempt) {
    args[1] = new_job_id();
    QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kCreateJob), {}, args));
    QCAL_RETURN_IF_ERROR(script_status(r, "create_job"));
    if (r.array[0].str == "ok") return args[1];
  }
  return internal_error("create_job: could not find a free job id");
}

Result<JobInfo> JobStore::get_job(const std::string& job_id) {
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.command({"HGETALL", opts_.prefix + ":job:" + job_id}));
  if (r.array.empty()) return not_found("job " + job_id + " not found");
  return job_from_hash(job_id, hash_of(r));
}

Result<std::vector<TaskInfo>> JobStore::get_tasks(const std::string& job_id) {
  const std::string jk = opts_.prefix + ":job:" + job_id;
  QCAL_ASSIGN_OR_RETURN(auto head,
                        redis_.pipeline({{"EXISTS", jk}, {"LRANGE", jk + ":tasks", "0", "-1"}}));
  if (head[0].integer == 0) return not_found("job " + job_id + " not found");
  std::vector<std::vector<std::string>> cmds;
  for (const auto& t : head[1].array) {
    cmds.push_back({"HGETALL", opts_.prefix + ":task:" + job_id + ":" + t.str});
  }
  QCAL_ASSIGN_OR_RETURN(auto hashes, redis_.pipeline(cmds));
  std::vector<TaskInfo> out;
  out.reserve(hashes.size());
  for (size_t i = 0; i < hashes.size(); ++i) {
    out.push_back(task_from_hash(job_id, head[1].array[i].str, hash_of(hashes[i])));
  }
  return out;
}

Result<std::vector<JobInfo>> JobStore::list_jobs(std::optional<JobState> state,
                                                 const std::map<std::string, std::string>& labels,
                                                 int64_t limit) {
  std::vector<JobInfo> out;
  if (limit <= 0) return out;
  const std::string key =
      state ? opts_.prefix + ":jobs:state:" + job_state_name(*state) : opts_.prefix + ":jobs";
  const int64_t page = labels.empty() ? limit : std::max<int64_t>(limit, 100);
  for (int64_t start = 0;; start += page) {
    QCAL_ASSIGN_OR_RETURN(auto ids, redis_.command({"ZREVRANGE", key, std::to_string(start),
                                                    std::to_string(start + page - 1)}));
    if (ids.array.empty()) break;
    std::vector<std::vector<std::string>> cmds;
    for (const auto& id : ids.array) cmds.push_back({"HGETALL", opts_.prefix + ":job:" + id.str});
    QCAL_ASSIGN_OR_RETURN(auto hashes, redis_.pipeline(cmds));
    for (size_t i = 0; i < hashes.size(); ++i) {
      if (hashes[i].array.empty()) continue;  // removed meanwhile
      JobInfo j = job_from_hash(ids.array[i].str, hash_of(hashes[i]));
      bool match = true;
      for (const auto& [k, v] : labels) {
        auto it = j.labels.find(k);
        match = match && it != j.labels.end() && it->second == v;
      }
      if (!match) continue;
      out.push_back(std::move(j));
      if (static_cast<int64_t>(out.size()) >= limit) return out;
    }
    if (static_cast<int64_t>(ids.array.size()) < page) break;
  }
  return out;
}

Status JobStore::cancel_job(const std::string& job_id) {
  QCAL_ASSIGN_OR_RETURN(auto r,
                        redis_.eval(script_text(kCancel), {},
                                    {opts_.prefix, job_id, std::to_string(opts_.log_lines)}));
  return script_status(r, "cancel_job");
}

Status JobStore::append_log(const std::string& job_id, const std::string& line) {
  QCAL_ASSIGN_OR_RETURN(auto r,
                        redis_.eval(script_text(kAppendLog), {},
                                    {opts_.prefix, job_id, sanitize_text(line, kMaxLogLineBytes),
                                     std::to_string(opts_.log_lines)}));
  return script_status(r, "append_log");
}

Result<std::vector<std::string>> JobStore::get_log(const std::string& job_id, int64_t from) {
  QCAL_ASSIGN_OR_RETURN(
      auto r, redis_.eval(script_text(kGetLog), {},
                          {opts_.prefix, job_id, std::to_string(std::max<int64_t>(0, from))}));
  QCAL_RETURN_IF_ERROR(script_status(r, "get_log"));
  std::vector<std::string> lines;
  for (size_t i = 1; i < r.array.size(); ++i)
    lines.push_back(clean(r.array[i].str, kMaxLogLineBytes + 512));
  return lines;
}

Result<std::optional<Claim>> JobStore::claim_task(const std::string& worker_id, int64_t lease_ms,
                                                  int64_t block_ms) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(std::max<int64_t>(0, block_ms));
  const std::vector<std::string> args = {
      opts_.prefix, sanitize_text(worker_id, 256), std::to_string(std::max<int64_t>(0, lease_ms)),
      std::to_string(opts_.max_attempts), std::to_string(opts_.log_lines)};
  bool reinit = false;
  while (true) {
    auto res = redis_.eval(script_text(kClaim), {}, args);
    if (!res.is_ok()) {
      // The streams or the group vanished (FLUSHALL, a fresh server): recreate once.
      if (!reinit && res.status().message().find("NOGROUP") != std::string::npos) {
        reinit = true;
        QCAL_RETURN_IF_ERROR(init());
        continue;
      }
      return res.status();
    }
    const RedisReply& r = *res;
    if (r.type != RedisReply::Type::kArray || r.array.empty()) {
      return internal_error("claim_task: unexpected reply from the store script");
    }
    const std::string& tag = r.array[0].str;
    if (tag == "claim" && r.array.size() >= 8) {
      Claim c;
      c.stream = r.array[1].str;
      c.entry_id = r.array[2].str;
      c.job_id = r.array[3].str;
      c.task_id = r.array[4].str;
      c.attempt = r.array[5].integer;
      c.job = job_from_hash(c.job_id, hash_of(r.array[6]));
      c.task = task_from_hash(c.job_id, c.task_id, hash_of(r.array[7]));
      return std::optional<Claim>(std::move(c));
    }
    if (tag == "retry") continue;
    // Nothing to take: wait for a new entry in any queue, then try again.
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0 || r.array.size() < 4) return std::optional<Claim>();
    // New entries wake the wait at once; a lease that runs out meanwhile does
    // not, so wait at most one lease before looking again.
    const int64_t wait_ms = std::min<int64_t>(left.count(), std::max<int64_t>(50, lease_ms));
    std::vector<std::string> xread = {"XREAD",  "COUNT", "1", "BLOCK", std::to_string(wait_ms),
                                      "STREAMS"};
    for (const char* p : kPriorities) xread.push_back(opts_.prefix + ":queue:" + p);
    for (size_t i = 1; i <= 3; ++i) xread.push_back(r.array[i].str);
    QCAL_ASSIGN_OR_RETURN(auto woke, redis_.command(xread));
    (void)woke;
  }
}

namespace {
std::vector<std::string> claim_args(const std::string& prefix, const Claim& c,
                                    const std::string& worker) {
  return {prefix, c.job_id, c.task_id, std::to_string(c.attempt), worker, c.stream, c.entry_id};
}
}  // namespace

Result<bool> JobStore::heartbeat(const Claim& c, const std::string& worker_id) {
  QCAL_ASSIGN_OR_RETURN(
      auto r, redis_.eval(script_text(kHeartbeat), {}, claim_args(opts_.prefix, c, worker_id)));
  return r.integer == 1;
}

Status JobStore::complete_task(const Claim& c, const nlohmann::json& result) {
  // The claim's own worker id is the one stored on the task at claim time.
  auto args = claim_args(opts_.prefix, c, c.task.worker);
  const bool gate_failed = result.is_object() && result.contains("gate_passed") &&
                           result["gate_passed"].is_boolean() && !result["gate_passed"].get<bool>();
  const json clean_result = sanitize_json(result);
  const std::string result_text = clean_result.dump();
  if (result_text.size() > kMaxResultBytes)
    return fail_task(c,
                     "the task's result is " + std::to_string(result_text.size()) +
                         " bytes of JSON, more than the store keeps (" +
                         std::to_string(kMaxResultBytes) + ")",
                     /*retryable=*/false);
  std::string report;
  if (clean_result.is_object() && clean_result.contains("report")) {
    report = clean_result["report"].dump();
    if (report.size() > kMaxReportBytes)
      report = json{{"truncated", true},
                    {"bytes", report.size()},
                    {"error", "the report exceeds the store's cap of " +
                                  std::to_string(kMaxReportBytes) + " bytes"}}
                   .dump();
  }
  std::string gate_error = "task " + c.task_id + ": validation gate not passed";
  if (clean_result.is_object() && clean_result.contains("error") &&
      clean_result["error"].is_string()) {
    gate_error += ": " + clean_result["error"].get<std::string>();
  } else {
    gate_error += " (see the job's report)";
  }
  args.push_back(result_text);
  args.push_back(gate_failed ? "1" : "0");
  args.push_back(report);
  args.push_back(sanitize_text(gate_error, kMaxErrorBytes));
  args.push_back(std::to_string(opts_.log_lines));
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kComplete), {}, args));
  return script_status(r, "complete_task");
}

Status JobStore::fail_task(const Claim& c, const std::string& error, bool retryable) {
  auto args = claim_args(opts_.prefix, c, c.task.worker);
  args.push_back(sanitize_text(error, kMaxErrorBytes));
  args.push_back(retryable ? "1" : "0");
  args.push_back(std::to_string(opts_.max_attempts));
  args.push_back(std::to_string(opts_.log_lines));
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kFail), {}, args));
  return script_status(r, "fail_task");
}

Status JobStore::rerun_producer(const Claim& c, const std::string& producer,
                                const std::string& why) {
  auto args = claim_args(opts_.prefix, c, c.task.worker);
  args.push_back(producer);
  args.push_back(sanitize_text(why, kMaxErrorBytes));
  args.push_back(std::to_string(opts_.log_lines));
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kRerun), {}, args));
  return script_status(r, "rerun_producer");
}

Result<int64_t> JobStore::begin_publish(const Claim& c) {
  auto args = claim_args(opts_.prefix, c, c.task.worker);
  args.push_back(c.job.output_key);
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kBeginPublish), {}, args));
  QCAL_RETURN_IF_ERROR(script_status(r, "begin_publish"));
  if (r.array[0].str == "stale")
    return conflict("publish fenced: " + (r.array.size() > 1 ? r.array[1].str : "stale claim"));
  return r.array.size() > 1 ? to_int(r.array[1].str) : 0;
}

Status JobStore::finish_publish(const Claim& c) {
  auto args = claim_args(opts_.prefix, c, c.task.worker);
  args.push_back(c.job.output_key);
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kFinishPublish), {}, args));
  QCAL_RETURN_IF_ERROR(script_status(r, "finish_publish"));
  if (r.array[0].str == "stale")
    return conflict("publish fenced: " + (r.array.size() > 1 ? r.array[1].str : "stale claim"));
  return Status::ok();
}

Status JobStore::worker_seen(const std::string& worker_id) {
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kWorkerSeen), {},
                                            {opts_.prefix, sanitize_text(worker_id, 256)}));
  return script_status(r, "worker_seen");
}

Result<int64_t> JobStore::live_workers(double within_s) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6f", within_s);
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.eval(script_text(kLiveWorkers), {}, {opts_.prefix, buf}));
  return r.integer;
}

Result<std::map<std::string, int64_t>> JobStore::job_counts() {
  const JobState all[] = {JobState::kQueued,    JobState::kRunning, JobState::kValidating,
                          JobState::kSucceeded, JobState::kFailed,  JobState::kCancelled};
  std::vector<std::vector<std::string>> cmds;
  for (JobState s : all)
    cmds.push_back({"ZCARD", opts_.prefix + ":jobs:state:" + job_state_name(s)});
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.pipeline(cmds));
  std::map<std::string, int64_t> out;
  for (size_t i = 0; i < cmds.size(); ++i) out[job_state_name(all[i])] = r[i].integer;
  return out;
}

Result<int64_t> JobStore::queue_depth() {
  std::vector<std::vector<std::string>> cmds;
  for (const char* p : kPriorities) cmds.push_back({"XLEN", opts_.prefix + ":queue:" + p});
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.pipeline(cmds));
  int64_t n = 0;
  for (const auto& x : r) n += x.integer;
  return n;
}

Result<std::map<std::string, double>> JobStore::metrics() {
  QCAL_ASSIGN_OR_RETURN(auto r, redis_.command({"HGETALL", opts_.prefix + ":metrics"}));
  std::map<std::string, double> out;
  // Every documented counter is present, 0 until first counted.
  for (const char* k :
       {"tasks_completed", "tasks_failed", "tasks_reclaimed", "tasks_rerun", "task_seconds_sum",
        "task_seconds_count", "jobs_created", "jobs_succeeded", "jobs_failed", "jobs_cancelled"}) {
    out[k] = 0;
  }
  for (const char* le : kBuckets) out[std::string("task_seconds_bucket_") + le] = 0;
  for (const auto& [k, v] : hash_of(r)) out[k] = to_double(v);
  return out;
}

}  // namespace qcal

#include "coordinator/quota.h"

#include <chrono>
#include <cstdio>
#include <random>

namespace qcal {

namespace {

std::string owner_key(const std::string& prefix, const std::string& owner) {
  return prefix + ":owner:" + owner + ":jobs";
}

// KEYS: the owner's zset. ARGV: P, max_live, reservation id, ttl (s).
// Returns {'ok', live} or {'over', live}.
const char* kReserve = R"LUA(
local k, P = KEYS[1], ARGV[1]
local max_live, res, ttl = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local members = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
local live = 0
for i = 1, #members, 2 do
  local m, score = members[i], tonumber(members[i + 1])
  local keep
  if string.sub(m, 1, 2) == 'r:' then
    keep = score > now
  else
    local st = redis.call('HGET', P .. ':job:' .. m, 'state')
    keep = st == 'queued' or st == 'running' or st == 'validating'
  end
  if keep then live = live + 1 else redis.call('ZREM', k, m) end
end
if live >= max_live then return {'over', live} end
redis.call('ZADD', k, string.format('%.6f', now + ttl), res)
return {'ok', live}
)LUA";

std::string random_reservation() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char buf[24];
  std::snprintf(buf, sizeof buf, "r:%016llx", static_cast<unsigned long long>(rng()));
  return buf;
}

}  // namespace

Result<QuotaReservation> reserve_job_slot(RedisClient& redis, const std::string& prefix,
                                          const std::string& owner, int64_t max_live) {
  QuotaReservation q;
  const std::string res = random_reservation();
  QCAL_ASSIGN_OR_RETURN(auto r, redis.eval(kReserve, {owner_key(prefix, owner)},
                                           {prefix, std::to_string(max_live), res,
                                            std::to_string(kQuotaReservationS)}));
  if (r.array.size() != 2) return internal_error("quota script: unexpected reply");
  q.live = r.array[1].integer;
  q.granted = r.array[0].str == "ok";
  if (q.granted) q.reservation = res;
  return q;
}

Status commit_job_slot(RedisClient& redis, const std::string& prefix, const std::string& owner,
                       const std::string& reservation, const std::string& job_id) {
  // Job first, then the reservation: a concurrent reserve may count one too
  // many for an instant, never one too few.
  const std::string k = owner_key(prefix, owner);
  auto t = std::chrono::system_clock::now().time_since_epoch();
  const std::string now = std::to_string(std::chrono::duration<double>(t).count());
  QCAL_ASSIGN_OR_RETURN(auto r,
                        redis.pipeline({{"ZADD", k, now, job_id}, {"ZREM", k, reservation}}));
  (void)r;
  return Status::ok();
}

Status release_job_slot(RedisClient& redis, const std::string& prefix, const std::string& owner,
                        const std::string& reservation) {
  QCAL_ASSIGN_OR_RETURN(auto r, redis.command({"ZREM", owner_key(prefix, owner), reservation}));
  (void)r;
  return Status::ok();
}

}  // namespace qcal

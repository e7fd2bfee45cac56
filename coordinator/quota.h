// Per-token quotas: at most N live (queued, running or validating) jobs
// submitted with one bearer token (--max-jobs-per-token).
//
// Redis layout (prefix P):
//   P:owner:<owner>:jobs   zset: ids of jobs submitted by <owner> (score:
//                          creation time), and reservations "r:<hex>"
//                          (score: when they expire, unix s)
// <owner> is the token's id (TokenAuth::identify: "t-" + 16 hex digits of the
// token's SHA-256, never the token itself), or "anonymous" when
// authentication is off (then the quota is shared by every client).
//
// Submitting is reserve → create_job → commit (or release on failure).
// reserve is one Lua script that drops members whose job is terminal or gone
// and expired reservations, counts the rest and, under the limit, adds a
// reservation: concurrent submits through any number of coordinators never
// exceed the limit. A coordinator that dies between reserve and commit leaves
// a reservation that expires after kQuotaReservationS. Jobs created by
// schedules are not counted (their rate is bounded by the minimum schedule
// interval instead).
//
// Thread safety: free functions over a caller's RedisClient (one per thread).
#pragma once

#include <cstdint>
#include <string>

#include "common/redis.h"
#include "common/status.h"

namespace qcal {

inline constexpr int64_t kQuotaReservationS = 60;

struct QuotaReservation {
  bool granted = false;
  int64_t live = 0;         // the owner's live jobs (reservations included) before this one
  std::string reservation;  // set when granted: pass to commit / release
};

// Grants a reservation when `owner` has fewer than `max_live` live jobs.
// Errors: kUnavailable (Redis).
Result<QuotaReservation> reserve_job_slot(RedisClient& redis, const std::string& prefix,
                                          const std::string& owner, int64_t max_live);
// The reservation became job `job_id` (counted until the job is terminal).
Status commit_job_slot(RedisClient& redis, const std::string& prefix, const std::string& owner,
                       const std::string& reservation, const std::string& job_id);
// The job was not created: frees the reservation.
Status release_job_slot(RedisClient& redis, const std::string& prefix, const std::string& owner,
                        const std::string& reservation);

}  // namespace qcal

// The `qcal` commands that talk to a coordinator over REST (api/openapi.yaml):
// submit, status, wait, jobs, cancel, logs, report, schedules, with their flag
// tables (api/commands.h). Exit codes: 0 success; 2 bad input or a 4xx
// answer; 1 a 5xx answer, an unreachable coordinator, or (wait, submit
// --wait) a job that failed or was cancelled. Errors print as
// "qcal <command>: error: <message> (HTTP <status>)".
#pragma once

#include <vector>

#include "api/commands.h"

namespace qcal {

// The service commands, in `qcal help` order.
std::vector<Command> service_commands();

}  // namespace qcal

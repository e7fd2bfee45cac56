// The `qcal` commands that talk to a coordinator over REST (api/openapi.yaml):
// submit, status, wait, jobs, cancel, logs, report, schedules. Each takes the
// whole argv (argv[1] is the command name) and returns the process exit code:
// 0 success; 2 bad input or a 4xx answer; 1 a 5xx answer, an unreachable
// coordinator, or (wait, submit --wait) a job that failed or was cancelled.
// Errors print as "qcal <command>: error: <message> (HTTP <status>)".
#pragma once

namespace qcal {

int cmd_submit(int argc, char** argv);
int cmd_status(int argc, char** argv);
int cmd_wait(int argc, char** argv);
int cmd_jobs(int argc, char** argv);
int cmd_cancel(int argc, char** argv);
int cmd_logs(int argc, char** argv);
int cmd_report(int argc, char** argv);
int cmd_schedules(int argc, char** argv);

// The usage lines of these commands, for `qcal --help`.
const char* service_usage();

}  // namespace qcal

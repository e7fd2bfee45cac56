// The `qcal` commands as data: each declares one flag table (common/flags.h)
// that both parses its command line and prints its usage, so `qcal CMD --help`
// (or -h) lists exactly the flags CMD takes. main.cc dispatches on this list;
// tests iterate it.
//
// Running a command (run_command): the table parses argv; `--help` / `-h`
// prints command_usage to stdout and exits 0; an unknown flag, a missing value
// or a value of the wrong kind prints "qcal CMD: error: <what>" and exits 2;
// otherwise the command's run function gets the parsed flags and returns the
// exit code (0 success, 2 bad input, 1 anything else; api/cli_util.h).
#pragma once

#include <string>
#include <vector>

#include "common/flags.h"

namespace qcal {

struct Command {
  std::string name;      // "quantize"
  std::string section;   // the heading it is listed under in `qcal help`
  std::string synopsis;  // what follows "qcal NAME" in the usage line: positionals
                         // and required flags, then "[flags]"
  std::string summary;   // one line, for `qcal help`
  std::string details;   // paragraphs printed after the flags; may be empty
  std::vector<FlagSpec> flags;
  int (*run)(const Flags& f) = nullptr;
};

// Every command, in `qcal help` order (embedded, fixtures, service). Built once;
// never empty; names are unique.
const std::vector<Command>& commands();
// nullptr when no command has that name.
const Command* find_command(const std::string& name);

// "usage: qcal NAME SYNOPSIS", the summary, the flag table, the details.
std::string command_usage(const Command& c);
// `qcal help`: every command with its one-line summary, by section.
std::string commands_overview();

// Parses argv[2..argc) with c.flags and runs c (see the top of this file).
int run_command(const Command& c, int argc, char** argv);

}  // namespace qcal

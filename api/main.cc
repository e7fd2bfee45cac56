// qcal — the user's command-line tool: a dispatcher over the commands of
// api/commands.h (`qcal help` lists them; `qcal CMD --help` prints one's flags).
#include <cstdio>
#include <string>

#include "api/commands.h"

int main(int argc, char** argv) {
  using namespace qcal;
  if (argc < 2) {
    std::fputs(commands_overview().c_str(), stderr);
    return 2;
  }
  const std::string name = argv[1];
  if (name == "-h" || name == "--help") {
    std::fputs(commands_overview().c_str(), stdout);
    return 0;
  }
  if (name == "--version") return run_command(*find_command("version"), 2, argv);
  const Command* c = find_command(name);
  if (!c) {
    std::fprintf(stderr, "qcal: unknown command '%s' (try qcal help)\n", name.c_str());
    return 2;
  }
  return run_command(*c, argc, argv);
}

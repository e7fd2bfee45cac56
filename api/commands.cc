#include "api/commands.h"

#include <cstdio>
#include <iostream>

#include "api/cli_util.h"
#include "api/cmd_embedded.h"
#include "api/cmd_service.h"
#include "api/cmd_train.h"
#include "kernels/device.h"

namespace qcal {

namespace {

constexpr const char* kVersion = "0.1.0";

int cmd_help(const Flags& f) {
  const auto& pos = f.positionals();
  if (pos.empty()) {
    std::fputs(commands_overview().c_str(), stdout);
    return 0;
  }
  const Command* c = pos.size() == 1 ? find_command(pos[0]) : nullptr;
  if (!c)
    return cli_fail("help", invalid_input(pos.size() == 1 ? "unknown command '" + pos[0] + "'"
                                                          : "usage: qcal help [COMMAND]"));
  std::fputs(command_usage(*c).c_str(), stdout);
  return 0;
}

int cmd_version(const Flags& f) {
  if (!f.positionals().empty())
    return cli_fail("version", invalid_input("unexpected argument '" + f.positionals()[0] + "'"));
  std::printf("qcal %s (gpu: %s)\n", kVersion, cuda_device_summary().c_str());
  return 0;
}

std::vector<Command> other_commands() {
  const std::string section = "Other commands";
  return {
      {"help",
       section,
       "[COMMAND]",
       "list the commands, or print COMMAND's usage",
       "",
       {},
       cmd_help},
      {"version", section, "", "print the version and the GPU found", "", {}, cmd_version},
  };
}

}  // namespace

const std::vector<Command>& commands() {
  static const std::vector<Command> kCommands = [] {
    std::vector<Command> all;
    for (auto* part : {embedded_commands, fixture_commands, service_commands, other_commands})
      for (Command& c : part()) all.push_back(std::move(c));
    return all;
  }();
  return kCommands;
}

const Command* find_command(const std::string& name) {
  for (const Command& c : commands())
    if (c.name == name) return &c;
  return nullptr;
}

std::string command_usage(const Command& c) {
  std::string out = "usage: qcal " + c.name;
  if (!c.synopsis.empty()) out += " " + c.synopsis;
  out += "\n\n" + c.summary + "\n\n" + format_flag_table(c.flags);
  if (!c.details.empty()) out += "\n" + c.details + (c.details.back() == '\n' ? "" : "\n");
  return out;
}

std::string commands_overview() {
  std::string out = std::string("qcal ") + kVersion +
                    " — post-training quantization for LLaMA-family models\n\n"
                    "usage: qcal COMMAND [flags]; qcal COMMAND --help (or -h) lists its flags\n";
  std::string section;
  for (const Command& c : commands()) {
    if (c.section != section) {
      section = c.section;
      out += "\n" + section + ":\n";
    }
    std::string name = c.name;
    name.resize(std::max<size_t>(name.size() + 2, 18), ' ');
    out += "  " + name + c.summary + "\n";
  }
  out +=
      "\nData files: .jsonl ({\"input_ids\": [...]} per line) or .u32 (little-endian uint32 "
      "tokens).\n"
      "Threads: QCAL_THREADS (default: all cores). Logs: QCAL_LOG_LEVEL=debug|info|warn|error.\n"
      "Service commands talk to a coordinator: --server URL --token T, or $QCAL_SERVER and\n"
      "$QCAL_TOKEN (default http://127.0.0.1:8080).\n";
  return out;
}

int run_command(const Command& c, int argc, char** argv) {
  Flags f(c.flags);
  CLI_TRY(c.name, f.parse(argc, argv, 2));
  if (f.help()) {
    std::fputs(command_usage(c).c_str(), stdout);
    return 0;
  }
  return c.run(f);
}

}  // namespace qcal

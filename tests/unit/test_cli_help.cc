// labels: unit
// Issue #14 part 4, "help everywhere": every command's flag table (api/commands.h)
// both parses and prints its usage. For every command, iterating the tables:
// `qcal CMD --help` and `-h` exit 0 and print exactly command_usage(CMD), which
// names every flag of the table; `qcal CMD --bogus` exits 2 naming the flag.
// Also the table parser itself (common/flags.h) and the two service binaries.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "api/commands.h"
#include "api/spec_flags.h"
#include "common/flags.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;

struct Proc {
  int rc = -1;
  std::string out, err;
};

// Runs `args` (no shell quoting needed: plain words) with stdout and stderr captured.
Proc run(const std::vector<std::string>& args) {
  const fs::path dir = fs::temp_directory_path() / ("qcal_help_" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::string cmd;
  for (const auto& a : args) cmd += "'" + a + "' ";
  cmd += ">" + (dir / "out").string() + " 2>" + (dir / "err").string();
  Proc r;
  const int st = std::system(cmd.c_str());
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  auto slurp = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  r.out = slurp(dir / "out");
  r.err = slurp(dir / "err");
  fs::remove_all(dir);
  return r;
}

std::string binary(const std::string& rel) {
  const std::string p = std::string(QCAL_BINARY_DIR) + "/" + rel;
  EXPECT_TRUE(fs::exists(p)) << p << " is not built (build every target before the tests)";
  return p;
}

std::string qcal_binary() { return binary("api/qcal"); }

bool mentions(const std::string& text, const std::string& flag) {
  // "--w-bits" must not be satisfied by "--w-bits-foo": the next character ends the name.
  for (size_t at = text.find(flag); at != std::string::npos; at = text.find(flag, at + 1)) {
    const size_t end = at + flag.size();
    if (end == text.size() ||
        !(std::isalnum(static_cast<unsigned char>(text[end])) || text[end] == '-'))
      return true;
  }
  return false;
}

// Every line of a usage text fits in 100 columns (UTF-8 aware), unless it is one word.
void expect_fits(const std::string& text, const std::string& what) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    size_t cols = 0;
    for (unsigned char c : line) cols += (c & 0xC0) != 0x80;
    const bool one_word = line.find(' ', line.find_first_not_of(' ')) == std::string::npos;
    EXPECT_TRUE(cols <= 100 || one_word) << what << ": " << cols << " columns: " << line;
  }
}

// ---------------------------------------------------------------- the table parser

TEST(FlagTable, ParsesWhatItDeclares) {
  const std::vector<FlagSpec> table = {
      {"n", "N", "3", "a number", "A"},
      {"name", "S", "", "a string", "A"},
      {"on", "", "", "a switch", "B"},
  };
  ASSERT_TRUE(check_flag_table(table).is_ok());
  Flags f(table);
  ASSERT_TRUE(f.parse({"--n", "7", "--name=x", "--on", "pos"}).is_ok());
  EXPECT_EQ(f.integer("n", 3).value(), 7);
  EXPECT_EQ(f.str("name"), "x");
  EXPECT_TRUE(f.flag("on"));
  EXPECT_EQ(f.positionals(), std::vector<std::string>{"pos"});
  EXPECT_FALSE(f.help());

  Flags bad(table);
  Status s = bad.parse({"--n", "1", "--bogus"});
  EXPECT_EQ(s.code(), Code::kInvalidInput);
  EXPECT_EQ(s.message(), "unknown flag --bogus");
  Flags novalue(table);
  EXPECT_EQ(novalue.parse({"--n"}).message(), "flag --n needs a value");
  Flags boolvalue(table);
  EXPECT_EQ(boolvalue.parse({"--on=1"}).message(), "flag --on takes no value");
}

TEST(FlagTable, HelpStopsParsing) {
  const std::vector<FlagSpec> table = {{"n", "N", "", "", ""}, {"s", "S", "", "", ""}};
  for (const char* h : {"--help", "-h"}) {
    Flags f(table);
    ASSERT_TRUE(f.parse({"--n", "1", h, "--bogus", "x"}).is_ok()) << h;
    EXPECT_TRUE(f.help()) << h;
    EXPECT_EQ(f.str("n"), "1");
    EXPECT_TRUE(f.positionals().empty());
  }
  // An error before --help is still an error; "-h" as a flag's value is a value.
  Flags before(table);
  EXPECT_EQ(before.parse({"--bogus", "--help"}).message(), "unknown flag --bogus");
  Flags value(table);
  ASSERT_TRUE(value.parse({"--s", "-h"}).is_ok());
  EXPECT_FALSE(value.help());
  EXPECT_EQ(value.str("s"), "-h");
}

TEST(FlagTable, CheckRefusesBadTables) {
  EXPECT_NE(check_flag_table({{"a", "", "", "", ""}, {"a", "N", "", "", ""}})
                .message()
                .find("--a declared twice"),
            std::string::npos);
  EXPECT_FALSE(check_flag_table({{"", "", "", "", ""}}).is_ok());
  EXPECT_FALSE(check_flag_table({{"--a", "", "", "", ""}}).is_ok());
  EXPECT_FALSE(check_flag_table({{"help", "", "", "", ""}}).is_ok());
}

TEST(FlagTable, FormatGroupsWrapsAndShowsDefaults) {
  const std::string long_help =
      "a help text long enough that it has to wrap onto a second line and then onto a third "
      "one, because a usage line never passes the width it is given";
  const std::vector<FlagSpec> table = {
      {"first", "N", "128", "the first flag", "Group one"},
      {"switch", "", "", long_help, "Group two"},
      {"second", "X", "", "listed under its group, after the first", "Group one"},
  };
  const std::string u = format_flag_table(table, 80);
  EXPECT_EQ(u,
            "Group one:\n"
            "  --first N     the first flag (default 128)\n"
            "  --second X    listed under its group, after the first\n"
            "\n"
            "Group two:\n"
            "  --switch      a help text long enough that it has to wrap onto a second line\n"
            "                and then onto a third one, because a usage line never passes the\n"
            "                width it is given\n"
            "\n"
            "  -h, --help    print this help and exit\n");
  // No line passes the width; "(default" stays with the default's first word.
  const std::string narrow = format_flag_table({{"n", "N", "1024", "xxxx xxxx xxxx", ""}}, 40);
  EXPECT_EQ(narrow,
            "  --n N         xxxx xxxx xxxx\n"
            "                (default 1024)\n"
            "\n"
            "  -h, --help    print this help and exit\n");
}

// Rows appended at run time (the recipe rows) parse and print like any other.
TEST(FlagTable, RowsAppendedAtRunTime) {
  std::vector<FlagSpec> table = {{"model", "DIR", "", "", "Input"}};
  std::vector<FlagSpec> extra;
  for (int i = 0; i < 3; ++i)
    extra.push_back(
        {"knob-" + std::to_string(i), "N", std::to_string(i), "a generated row", "Generated"});
  table = concat_flags(table, extra);
  Flags f(table);
  ASSERT_TRUE(f.parse({"--knob-2", "5"}).is_ok());
  EXPECT_EQ(f.integer("knob-2", 0).value(), 5);
  const std::string u = format_flag_table(table);
  for (const auto& r : extra) EXPECT_TRUE(mentions(u, "--" + r.name)) << u;
  EXPECT_NE(u.find("Generated:\n"), std::string::npos);
}

// ---------------------------------------------------------------- every command's table

TEST(CliHelp, TablesAreWellFormed) {
  std::set<std::string> names;
  ASSERT_FALSE(commands().empty());
  for (const Command& c : commands()) {
    EXPECT_TRUE(names.insert(c.name).second) << "command " << c.name << " listed twice";
    EXPECT_NE(c.run, nullptr) << c.name;
    EXPECT_FALSE(c.summary.empty()) << c.name;
    EXPECT_FALSE(c.section.empty()) << c.name;
    Status s = check_flag_table(c.flags);
    EXPECT_TRUE(s.is_ok()) << c.name << ": " << s.message();
    for (const FlagSpec& f : c.flags) EXPECT_FALSE(f.help.empty()) << c.name << " --" << f.name;
    EXPECT_EQ(find_command(c.name), &c);
  }
  EXPECT_EQ(find_command("no-such-command"), nullptr);
  for (const char* n : {"synth", "synth-data", "quantize", "plan", "eval", "inspect", "synth-grammar",
                        "train-lm", "inject-outliers", "sinks", "submit", "status", "wait", "jobs",
                        "cancel", "logs", "report", "schedules", "help", "version"})
    EXPECT_EQ(names.count(n), 1u) << n;
}

TEST(CliHelp, UsageNamesEveryFlag) {
  for (const Command& c : commands()) {
    const std::string u = command_usage(c);
    EXPECT_EQ(u.rfind("usage: qcal " + c.name, 0), 0u) << u;
    for (const FlagSpec& f : c.flags)
      EXPECT_TRUE(mentions(u, "--" + f.name)) << c.name << " --" << f.name;
    EXPECT_TRUE(mentions(u, "--help")) << c.name;
    expect_fits(u, c.name);
  }
  const std::string all = commands_overview();
  for (const Command& c : commands())
    EXPECT_NE(all.find("  " + c.name + " "), std::string::npos) << c.name;
  expect_fits(all, "qcal help");
}

// quantize and submit take the recipe rows; their tables parse exactly the
// flag sets the recipe readers know (api/spec_flags.h, from the method registry).
TEST(CliHelp, RecipeRowsInQuantizeAndSubmit) {
  for (const char* name : {"quantize", "plan", "submit"}) {
    const Command* c = find_command(name);
    ASSERT_NE(c, nullptr);
    const std::set<std::string> valued = valued_flag_names(c->flags),
                                booleans = boolean_flag_names(c->flags);
    for (const FlagSpec& r : recipe_flags())
      EXPECT_EQ((r.boolean() ? booleans : valued).count(r.name), 1u) << name << " --" << r.name;
  }
  const Command* submit = find_command("submit");
  for (const auto& k : spec_valued_flags())
    EXPECT_EQ(valued_flag_names(submit->flags).count(k), 1u) << k;
  for (const auto& k : spec_boolean_flags())
    EXPECT_EQ(boolean_flag_names(submit->flags).count(k), 1u) << k;
}

// ---------------------------------------------------------------- the binaries

TEST(CliHelp, EveryCommandHelpExitsZero) {
  const std::string qcal = qcal_binary();
  for (const Command& c : commands()) {
    const std::string expected = command_usage(c);
    for (const char* h : {"--help", "-h"}) {
      Proc r = run({qcal, c.name, h});
      EXPECT_EQ(r.rc, 0) << "qcal " << c.name << " " << h << ": " << r.err;
      EXPECT_EQ(r.out, expected) << "qcal " << c.name << " " << h;
      for (const FlagSpec& f : c.flags)
        EXPECT_TRUE(mentions(r.out, "--" + f.name))
            << "qcal " << c.name << " " << h << ": --" << f.name;
      EXPECT_EQ(r.err, "") << c.name;
    }
    Proc h = run({qcal, "help", c.name});
    EXPECT_EQ(h.rc, 0) << c.name;
    EXPECT_EQ(h.out, expected) << "qcal help " << c.name;
  }
}

TEST(CliHelp, EveryCommandRefusesAnUnknownFlag) {
  const std::string qcal = qcal_binary();
  for (const Command& c : commands()) {
    Proc r = run({qcal, c.name, "--bogus"});
    EXPECT_EQ(r.rc, 2) << "qcal " << c.name << " --bogus: " << r.out << r.err;
    EXPECT_EQ(r.err, "qcal " + c.name + ": error: unknown flag --bogus\n") << c.name;
  }
}

TEST(CliHelp, Overview) {
  const std::string qcal = qcal_binary();
  for (const char* h : {"--help", "-h", "help"}) {
    Proc r = run({qcal, h});
    EXPECT_EQ(r.rc, 0) << h;
    EXPECT_EQ(r.out, commands_overview()) << h;
  }
  Proc none = run({qcal});
  EXPECT_EQ(none.rc, 2);
  EXPECT_EQ(none.err, commands_overview());
  Proc unknown = run({qcal, "frobnicate"});
  EXPECT_EQ(unknown.rc, 2);
  EXPECT_NE(unknown.err.find("unknown command 'frobnicate'"), std::string::npos) << unknown.err;
  Proc help_unknown = run({qcal, "help", "frobnicate"});
  EXPECT_EQ(help_unknown.rc, 2);
  EXPECT_NE(help_unknown.err.find("unknown command 'frobnicate'"), std::string::npos);
  Proc version = run({qcal, "--version"});
  EXPECT_EQ(version.rc, 0);
  EXPECT_EQ(version.out.rfind("qcal ", 0), 0u) << version.out;
}

// The coordinator's and the worker's own tables (in their main.cc).
TEST(CliHelp, ServiceBinaries) {
  struct Bin {
    std::string path;
    std::vector<std::string> flags;
  };
  const std::vector<Bin> bins = {
      {binary("coordinator/qcal-coordinator"),
       {"--host", "--port", "--redis", "--prefix", "--tokens", "--store", "--worker-mem-gb",
        "--max-body-mb"}},
      {binary("worker/qcal-worker"),
       {"--redis", "--store", "--prefix", "--worker-id", "--lease-ms", "--block-ms", "--threads",
        "--once"}},
  };
  for (const Bin& b : bins) {
    for (const char* h : {"--help", "-h"}) {
      Proc r = run({b.path, h});
      EXPECT_EQ(r.rc, 0) << b.path << " " << h << ": " << r.err;
      EXPECT_EQ(r.out.rfind("usage: ", 0), 0u) << r.out;
      for (const auto& f : b.flags)
        EXPECT_TRUE(mentions(r.out, f)) << b.path << " " << h << ": " << f;
      expect_fits(r.out, b.path);
    }
    Proc bad = run({b.path, "--bogus"});
    EXPECT_EQ(bad.rc, 2) << b.path;
    EXPECT_NE(bad.err.find("unknown flag --bogus"), std::string::npos) << bad.err;
  }
}

}  // namespace
}  // namespace qcal

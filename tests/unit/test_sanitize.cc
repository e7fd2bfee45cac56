// common/sanitize.h: what the job store keeps is valid, bounded UTF-8, and
// what the CLI prints cannot drive a terminal.
#include <gtest/gtest.h>

#include <string>

#include "common/sanitize.h"

namespace qcal {
namespace {

using nlohmann::json;

TEST(Sanitize, ValidUtf8IsKeptAsIs) {
  for (const std::string& s : {std::string(""), std::string("plain ascii"),
                               std::string("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"),
                               std::string("tab\tand\nnewline")}) {
    EXPECT_TRUE(is_clean_utf8(s)) << s;
    EXPECT_EQ(sanitize_text(s), s);
  }
}

TEST(Sanitize, InvalidBytesAreEscaped) {
  // The case: a safetensors header of 0xFF bytes quoted in an error.
  EXPECT_EQ(sanitize_text(std::string("header: \xFF\xFF!", 11)), "header: \\xFF\\xFF!");
  struct Case {
    std::string in, out;
  } cases[] = {
      {std::string("\xC0\xAF", 2), "\\xC0\\xAF"},                    // overlong '/'
      {std::string("\xED\xA0\x80", 3), "\\xED\\xA0\\x80"},           // a UTF-16 surrogate
      {std::string("\xF4\x90\x80\x80", 4), "\\xF4\\x90\\x80\\x80"},  // above U+10FFFF
      {std::string("\xE2\x82", 2), "\\xE2\\x82"},                    // truncated sequence
      {std::string("a\0b", 3), "a\\x00b"},                           // NUL
      {std::string("\x80", 1), "\\x80"},                             // stray continuation
  };
  for (const auto& c : cases) {
    EXPECT_FALSE(is_clean_utf8(c.in));
    const std::string got = sanitize_text(c.in);
    EXPECT_EQ(got, c.out);
    EXPECT_TRUE(is_clean_utf8(got));
    EXPECT_EQ(sanitize_text(got), got);  // idempotent
  }
}

TEST(Sanitize, CapCutsAtACharacterBoundaryAndSaysHowMuch) {
  std::string s;
  for (int i = 0; i < 1000; ++i) s += "\xE2\x82\xAC";  // 3000 bytes of euro signs
  const std::string got = sanitize_text(s, 100);
  EXPECT_LE(got.size(), 100u);
  EXPECT_TRUE(is_clean_utf8(got));
  EXPECT_NE(got.find("bytes truncated]"), std::string::npos) << got;
  // The count is of the bytes removed.
  const size_t kept = got.find("...");
  ASSERT_NE(kept, std::string::npos);
  EXPECT_NE(got.find("[" + std::to_string(3000 - kept) + " bytes truncated]"), std::string::npos)
      << got;
  EXPECT_EQ(sanitize_text("short", 100), "short");
}

TEST(Sanitize, JsonStringsKeysAndNonFiniteNumbers) {
  json j = {{"ok", "fine"},
            {std::string("k\xFF", 2), {std::string("v\xFE", 2), 1, 2.5}},
            {"nan", std::nan("")}};
  // nlohmann cannot serialize the raw bytes...
  EXPECT_THROW((void)j.dump(), json::type_error);
  json clean = sanitize_json(j);
  // ...the sanitized copy can, and says what the bytes were.
  const std::string text = clean.dump();
  EXPECT_NE(text.find("k\\\\xFF"), std::string::npos) << text;
  EXPECT_NE(text.find("v\\\\xFE"), std::string::npos) << text;
  EXPECT_TRUE(clean["nan"].is_null());
  EXPECT_EQ(clean["ok"], "fine");
  // Long strings inside are capped too.
  json big = {{"s", std::string(200000, 'x')}};
  EXPECT_LE(sanitize_json(big)["s"].get<std::string>().size(), kMaxJsonStringBytes);
}

TEST(Sanitize, TerminalSafeEscapesControlCharacters) {
  // A label that would clear the screen and set the window title.
  const std::string label = "team\x1b[2J\x1b]0;pwned\x07";
  const std::string shown = terminal_safe(label);
  EXPECT_EQ(shown.find('\x1b'), std::string::npos);
  EXPECT_EQ(shown.find('\x07'), std::string::npos);
  EXPECT_EQ(shown, "team\\x1B[2J\\x1B]0;pwned\\x07");
  // C1 CSI (U+009B) and DEL.
  EXPECT_EQ(terminal_safe("a\xC2\x9B"
                          "1m\x7f"),
            "a\\u009B1m\\x7F");
  // Newlines only where asked for; other text untouched.
  EXPECT_EQ(terminal_safe("a\nb"), "a\\x0Ab");
  EXPECT_EQ(terminal_safe("a\nb", /*keep_newlines=*/true), "a\nb");
  EXPECT_EQ(terminal_safe("caf\xC3\xA9"), "caf\xC3\xA9");
  // Invalid bytes are escaped before anything else.
  EXPECT_EQ(terminal_safe(std::string("\xFF", 1)), "\\xFF");
}

}  // namespace
}  // namespace qcal

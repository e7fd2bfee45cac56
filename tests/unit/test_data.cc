#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "common/data.h"
#include "tests/unit/test_util.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;

// The test's temporary directories: `<tmp>/qcal_data_XXXXXX`.
class TempDir : public ::qcal::testing::TempDir {
 public:
  TempDir() : ::qcal::testing::TempDir("qcal_data_") {}
};

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string u32_bytes(const std::vector<uint32_t>& v) {
  std::string s;
  for (uint32_t x : v)
    for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>((x >> (8 * i)) & 0xff));
  return s;
}

template <typename T>
void expect_error(const Result<T>& r, Code code, std::initializer_list<const char*> words) {
  ASSERT_FALSE(r.is_ok()) << "expected an error containing '" << *words.begin() << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().to_string();
  for (const char* w : words)
    EXPECT_NE(r.status().message().find(w), std::string::npos)
        << "message lacks '" << w << "': " << r.status().message();
}

TEST(Data, JsonlConcatenatesAndCuts) {
  TempDir dir;
  const std::string p = dir.file("cal.jsonl");
  spit(p,
       "{\"input_ids\": [1, 2, 3], \"text\": \"ignored\"}\n"
       "\n"
       "   \n"
       "{\"input_ids\": [4, 5]}\r\n"
       "{\"input_ids\": []}\n"
       "{\"input_ids\": [6, 7, 8, 9, 0]}");  // no trailing newline
  auto r = load_token_sequences(p, 4, 10);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->seqlen, 4);
  EXPECT_EQ(r->count(), 2);  // 10 tokens -> 2 sequences, 2 dropped
  EXPECT_EQ(r->tokens, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(r->seq(1)[0], 5);

  auto one = load_token_sequences(p, 3, 10, 1);
  ASSERT_TRUE(one.is_ok());
  EXPECT_EQ(one->tokens, (std::vector<int32_t>{1, 2, 3}));
  auto exact = load_token_sequences(p, 10, 10);
  ASSERT_TRUE(exact.is_ok());
  EXPECT_EQ(exact->count(), 1);
}

TEST(Data, U32Reads) {
  TempDir dir;
  const std::string p = dir.file("toks.u32");
  std::vector<uint32_t> v(1000);
  std::iota(v.begin(), v.end(), 0u);
  spit(p, u32_bytes(v));
  auto r = load_token_sequences(p, 128, 1000);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->count(), 7);
  ASSERT_EQ(r->tokens.size(), 7u * 128);
  for (size_t i = 0; i < r->tokens.size(); ++i) ASSERT_EQ(r->tokens[i], static_cast<int32_t>(i));
  auto lim = load_token_sequences(p, 100, 1000, 3);
  ASSERT_TRUE(lim.is_ok());
  EXPECT_EQ(lim->count(), 3);
  EXPECT_EQ(lim->seq(2)[99], 299);
}

TEST(Data, WriteThenRead) {
  TempDir dir;
  const std::string p = dir.file("out.jsonl");
  std::vector<int32_t> toks(23);
  std::iota(toks.begin(), toks.end(), 100);
  ASSERT_TRUE(write_tokens_jsonl(p, toks, 5).is_ok());
  std::ifstream in(p);
  std::string first;
  std::getline(in, first);
  EXPECT_EQ(first, "{\"input_ids\": [100, 101, 102, 103, 104]}");
  auto r = load_token_sequences(p, 23, 200);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->tokens, toks);
  EXPECT_FALSE(write_tokens_jsonl(p, toks, 0).is_ok());
}

TEST(Data, JsonlErrorsNameFileAndLine) {
  TempDir dir;
  const std::string p = dir.file("bad.jsonl");
  auto check = [&](const std::string& text, std::initializer_list<const char*> words) {
    spit(p, text);
    expect_error(load_token_sequences(p, 2, 50), Code::kInvalidInput, words);
  };
  const std::string ok = "{\"input_ids\": [1, 2]}\n\n";
  check(ok + "{\"input_ids\": [1, 2]\n", {"bad.jsonl:3: malformed JSON"});
  check(ok + "{\"ids\": [1]}\n", {"bad.jsonl:3: missing input_ids"});
  check(ok + "[1, 2]\n", {"bad.jsonl:3: expected a JSON object"});
  check(ok + "{\"input_ids\": 5}\n", {"bad.jsonl:3: input_ids is not an array"});
  check(ok + "{\"input_ids\": [1, 2.5]}\n", {"bad.jsonl:3: input_ids[1] = 2.5 is not an integer"});
  check(ok + "{\"input_ids\": [1, \"7\"]}\n", {"bad.jsonl:3: input_ids[1]", "not an integer"});
  check(ok + "{\"input_ids\": [50]}\n", {"bad.jsonl:3: input_ids[0] = 50 out of range [0, 50)"});
  check(ok + "{\"input_ids\": [-1]}\n", {"bad.jsonl:3: input_ids[0] = -1 out of range"});
  check(ok + "{\"input_ids\": [18446744073709551615]}\n", {"bad.jsonl:3", "out of range"});
  check("{\"input_ids\": [1]}\n", {"bad.jsonl", "1 tokens, fewer than one sequence of 2"});
  check("", {"bad.jsonl", "0 tokens"});
}

TEST(Data, U32AndGeneralErrors) {
  TempDir dir;
  const std::string p = dir.file("t.u32");
  spit(p, u32_bytes({1, 2, 3}) + "ab");
  expect_error(load_token_sequences(p, 1, 10), Code::kInvalidInput,
               {"t.u32", "size 14 is not a multiple of 4"});
  spit(p, u32_bytes({1, 2, 3, 10, 4}));
  expect_error(load_token_sequences(p, 1, 10), Code::kInvalidInput,
               {"t.u32: token 3 = 10 out of range [0, 10)"});
  spit(p, u32_bytes({1, 0xffffffffu}));
  expect_error(load_token_sequences(p, 1, 10), Code::kInvalidInput,
               {"token 1 = 4294967295 out of range"});
  spit(p, u32_bytes({1, 2}));
  expect_error(load_token_sequences(p, 3, 10), Code::kInvalidInput,
               {"t.u32", "fewer than one sequence"});
  expect_error(load_token_sequences(p, 0, 10), Code::kInvalidInput, {"seqlen"});
  expect_error(load_token_sequences(dir.file("absent.u32"), 2, 10), Code::kNotFound,
               {"absent.u32"});
  spit(dir.file("t.txt"), "1 2 3");
  expect_error(load_token_sequences(dir.file("t.txt"), 1, 10), Code::kInvalidInput,
               {"t.txt", ".jsonl or .u32"});
}

}  // namespace
}  // namespace qcal

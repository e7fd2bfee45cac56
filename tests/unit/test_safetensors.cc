#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/dtype.h"
#include "common/safetensors.h"
#include "tests/unit/test_util.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;

// The test's temporary directories: `<tmp>/qcal_st_XXXXXX`.
class TempDir : public ::qcal::testing::TempDir {
 public:
  TempDir() : ::qcal::testing::TempDir("qcal_st_") {}
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// 8-byte little-endian length + header text + `data_bytes` zero bytes.
std::string make_file(const std::string& header, size_t data_bytes) {
  std::string s(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s + header + std::string(data_bytes, '\0');
}

Result<SafetensorsHeader> parse(const std::string& bytes) {
  return parse_safetensors_header(bytes, bytes.size(), "t.safetensors");
}

// Expects `r` to fail with `code` and a message containing every word in `words`.
template <typename T>
void expect_error(const Result<T>& r, Code code, std::initializer_list<const char*> words) {
  ASSERT_FALSE(r.is_ok()) << "expected an error containing '" << *words.begin() << "'";
  EXPECT_EQ(r.status().code(), code) << r.status().to_string();
  for (const char* w : words)
    EXPECT_NE(r.status().message().find(w), std::string::npos)
        << "message lacks '" << w << "': " << r.status().message();
}

std::vector<float> ramp(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * (static_cast<float>(i) - n / 2.0f) / 3.0f;
  return v;
}

TEST(Safetensors, RoundTripEveryDtype) {
  TempDir dir;
  const std::string path = dir.file("all.safetensors");
  const DType floats[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64};
  const DType ints[] = {DType::kI64, DType::kI32, DType::kI16,
                        DType::kI8,  DType::kU8,  DType::kBool};
  std::vector<float> vals = ramp(3 * 5, 1.7f);
  std::map<std::string, std::string> int_bytes;

  SafetensorsWriter w(path);
  w.set_metadata("producer", "qcal-test");
  for (DType t : floats) w.add(std::string("f_") + dtype_name(t), t, {3, 5});
  for (DType t : ints) {
    std::string name = std::string("i_") + dtype_name(t);
    w.add(name, t, {7});
    std::string b(7 * dtype_size(t), '\0');
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>(i * 37 + 11);
    if (t == DType::kBool)
      for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>(i % 2);
    int_bytes[name] = b;
  }
  w.add("scalar", DType::kF32, {});
  w.add("empty", DType::kF16, {0, 4});
  EXPECT_EQ(w.data_bytes(), 15u * (4 + 2 + 2 + 8) + 7u * (8 + 4 + 2 + 1 + 1 + 1) + 4u);
  ASSERT_TRUE(w.begin().is_ok());
  for (size_t k = 0; k < std::size(floats); ++k)
    ASSERT_TRUE(w.write_f32(vals.data(), vals.size()).is_ok());
  for (DType t : ints) ASSERT_TRUE(w.write(int_bytes[std::string("i_") + dtype_name(t)]).is_ok());
  const float pi = 3.25f;
  ASSERT_TRUE(w.write_f32(&pi, 1).is_ok());
  ASSERT_TRUE(w.write_f32(nullptr, 0).is_ok());
  ASSERT_TRUE(w.finish().is_ok());

  auto f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.is_ok()) << f.status().to_string();
  const SafetensorsHeader& h = (*f)->header();
  EXPECT_EQ(h.data_start % 8, 0u);
  EXPECT_EQ(h.data_start, 8 + h.header_len);
  EXPECT_EQ(h.metadata.at("format"), "pt");
  EXPECT_EQ(h.metadata.at("producer"), "qcal-test");
  EXPECT_EQ(h.tensors.size(), 12u);
  for (size_t i = 1; i < h.tensors.size(); ++i)
    EXPECT_LE(h.tensors[i - 1].begin, h.tensors[i].begin);

  for (DType t : floats) {
    const std::string name = std::string("f_") + dtype_name(t);
    const TensorInfo* ti = (*f)->find(name);
    ASSERT_NE(ti, nullptr) << name;
    EXPECT_EQ(ti->dtype, t);
    EXPECT_EQ(ti->shape, (std::vector<int64_t>{3, 5}));
    EXPECT_EQ(ti->nbytes(), 15 * dtype_size(t));
    auto r = (*f)->read_f32(name);
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    EXPECT_EQ(r->shape, (std::vector<int64_t>{3, 5}));
    for (size_t i = 0; i < vals.size(); ++i)
      EXPECT_EQ(r->data[i], round_to_dtype(vals[i], t)) << name << "[" << i << "]";
  }
  for (DType t : ints) {
    const std::string name = std::string("i_") + dtype_name(t);
    const TensorInfo* ti = (*f)->find(name);
    ASSERT_NE(ti, nullptr) << name;
    EXPECT_EQ(ti->dtype, t);
    EXPECT_EQ(std::string((*f)->raw(*ti)), int_bytes[name]) << name;
    expect_error((*f)->read_f32(name), Code::kInvalidInput, {name.c_str(), "not a float dtype"});
  }
  auto sc = (*f)->read_f32("scalar");
  ASSERT_TRUE(sc.is_ok());
  EXPECT_TRUE(sc->shape.empty());
  ASSERT_EQ(sc->data.size(), 1u);
  EXPECT_EQ(sc->data[0], 3.25f);
  auto em = (*f)->read_f32("empty");
  ASSERT_TRUE(em.is_ok());
  EXPECT_EQ(em->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(em->data.empty());
  expect_error((*f)->read_f32("nope"), Code::kNotFound, {"nope"});
  EXPECT_EQ((*f)->find("nope"), nullptr);

  // Released pages are re-read from the file on the next touch.
  const TensorInfo* f32 = (*f)->find("f_F32");
  (*f)->release(*f32);
  auto again = (*f)->read_f32("f_F32");
  ASSERT_TRUE(again.is_ok());
  EXPECT_EQ(again->data, vals);
}

TEST(Safetensors, FileSizeIsHeaderPlusData) {
  TempDir dir;
  const std::string path = dir.file("a.safetensors");
  SafetensorsWriter w(path);
  w.add("w", DType::kBF16, {2, 3});
  ASSERT_TRUE(w.begin().is_ok());
  std::vector<float> v = {1, 2, 3, 4, 5, 6};
  ASSERT_TRUE(w.write_f32(v.data(), v.size()).is_ok());
  ASSERT_TRUE(w.finish().is_ok());
  std::string bytes = slurp(path);
  auto h = parse(bytes);
  ASSERT_TRUE(h.is_ok()) << h.status().to_string();
  EXPECT_EQ(bytes.size(), h->data_start + 12);
  // The header is compact JSON padded with spaces to a multiple of 8.
  std::string header = bytes.substr(8, h->header_len);
  EXPECT_EQ(header.size() % 8, 0u);
  EXPECT_EQ(header.substr(0, header.find_last_not_of(' ') + 1),
            R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],)"
            R"("data_offsets":[0,12]}})");
}

TEST(Safetensors, RewriteIsByteIdentical) {
  TempDir dir;
  auto write = [&](const std::string& path) {
    SafetensorsWriter w(path);
    w.add("b.weight", DType::kF16, {4, 3});
    w.add("a.weight", DType::kF32, {5});
    w.add("c.idx", DType::kI32, {2});
    EXPECT_TRUE(w.begin().is_ok());
    std::vector<float> x = ramp(12, 0.5f), y = ramp(5, 2.0f);
    EXPECT_TRUE(w.write_f32(x.data(), x.size()).is_ok());
    EXPECT_TRUE(w.write_f32(y.data(), y.size()).is_ok());
    EXPECT_TRUE(w.write(std::string("\x01\x00\x00\x00\x02\x00\x00\x00", 8)).is_ok());
    EXPECT_TRUE(w.finish().is_ok());
  };
  write(dir.file("one.safetensors"));
  write(dir.file("two.safetensors"));
  const std::string one = slurp(dir.file("one.safetensors"));
  EXPECT_EQ(one, slurp(dir.file("two.safetensors")));

  // Copying every tensor through the reader (in file order) reproduces the file.
  auto f = SafetensorsFile::open(dir.file("one.safetensors"));
  ASSERT_TRUE(f.is_ok());
  {
    SafetensorsWriter w(dir.file("copy.safetensors"));
    for (const TensorInfo& t : (*f)->header().tensors) w.add(t.name, t.dtype, t.shape);
    ASSERT_TRUE(w.begin().is_ok());
    for (const TensorInfo& t : (*f)->header().tensors) ASSERT_TRUE(w.write((*f)->raw(t)).is_ok());
    ASSERT_TRUE(w.finish().is_ok());
  }
  EXPECT_EQ(one, slurp(dir.file("copy.safetensors")));
}

TEST(Safetensors, WriterDestroyedBeforeFinishLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  {
    SafetensorsWriter w(path);
    w.add("a", DType::kF32, {4});
    w.add("b", DType::kF32, {4});
    ASSERT_TRUE(w.begin().is_ok());
    std::vector<float> v(4, 1.0f);
    ASSERT_TRUE(w.write_f32(v.data(), 4).is_ok());
    EXPECT_FALSE(fs::exists(path));  // only the temporary exists while writing
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir.path())) << "temporary file left behind";

  // finish() with a tensor unwritten fails, names it, and leaves nothing.
  {
    SafetensorsWriter w(path);
    w.add("a", DType::kF32, {4});
    w.add("b", DType::kF32, {4});
    ASSERT_TRUE(w.begin().is_ok());
    std::vector<float> v(4, 1.0f);
    ASSERT_TRUE(w.write_f32(v.data(), 4).is_ok());
    Status s = w.finish();
    EXPECT_FALSE(s.is_ok());
    EXPECT_NE(s.message().find("'b'"), std::string::npos) << s.message();
    EXPECT_FALSE(w.finish().is_ok());  // the writer stays failed
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(Safetensors, WriterRejectsMisuse) {
  TempDir dir;
  {
    SafetensorsWriter w(dir.file("d.safetensors"));
    w.add("a", DType::kF32, {1});
    w.add("a", DType::kF32, {1});
    Status s = w.begin();
    EXPECT_EQ(s.code(), Code::kInvalidInput);
    EXPECT_NE(s.message().find("duplicate tensor name 'a'"), std::string::npos) << s.message();
  }
  {
    SafetensorsWriter w(dir.file("s.safetensors"));
    w.add("a", DType::kF32, {2});
    ASSERT_TRUE(w.begin().is_ok());
    Status s = w.write(std::string(4, '\0'));  // needs 8 bytes
    EXPECT_FALSE(s.is_ok());
    EXPECT_NE(s.message().find("needs 8 bytes, got 4"), std::string::npos) << s.message();
  }
  {
    SafetensorsWriter w(dir.file("i.safetensors"));
    w.add("a", DType::kI32, {2});
    ASSERT_TRUE(w.begin().is_ok());
    float v[2] = {1, 2};
    EXPECT_FALSE(w.write_f32(v, 2).is_ok());
  }
  {
    SafetensorsWriter w(dir.file("n.safetensors"));
    w.add("a", DType::kF32, {2, -1});
    EXPECT_EQ(w.begin().code(), Code::kInvalidInput);
  }
  {
    SafetensorsWriter w(dir.file("o.safetensors"));
    w.add("ok", DType::kF32, {2});
    w.add("huge", DType::kF32, {int64_t{1} << 40, int64_t{1} << 40});
    Status s = w.begin();
    EXPECT_EQ(s.code(), Code::kInvalidInput);
    EXPECT_NE(s.message().find("'huge' is too large"), std::string::npos) << s.message();
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

// ---------------------------------------------------------------- streaming pieces

// Writes tensors "a" (F16 (7, 5)), "e" (F32 (0, 3)), "b" (BF16 (11)), "i" (I32
// (6)) whole, for comparison with the piecewise forms below.
const std::vector<float> kA = ramp(35, 0.9f), kB = ramp(11, 3.1f);
const std::string kI = std::string("\x01\x00\x00\x00\xff\xff\xff\xff", 8) + std::string(16, '\x07');

void declare_abi(SafetensorsWriter& w) {
  w.add("a", DType::kF16, {7, 5});
  w.add("e", DType::kF32, {0, 3});
  w.add("b", DType::kBF16, {11});
  w.add("i", DType::kI32, {6});
}

std::string write_whole(const std::string& path) {
  SafetensorsWriter w(path);
  declare_abi(w);
  EXPECT_TRUE(w.begin().is_ok());
  EXPECT_TRUE(w.write_f32(kA.data(), kA.size()).is_ok());
  EXPECT_TRUE(w.write({}).is_ok());
  EXPECT_TRUE(w.write_f32(kB.data(), kB.size()).is_ok());
  EXPECT_TRUE(w.write(kI).is_ok());
  EXPECT_TRUE(w.finish().is_ok());
  return slurp(path);
}

TEST(SafetensorsStream, PiecesAndRowSourcesEqualTheWholeWrite) {
  TempDir dir;
  const std::string whole = write_whole(dir.file("whole.safetensors"));
  ASSERT_FALSE(whole.empty());

  // Every piece size, from single bytes up, reproduces the same file.
  std::string a_bytes(35 * 2, '\0'), b_bytes(11 * 2, '\0');
  from_f32(DType::kF16, kA.data(), a_bytes.data(), kA.size());
  from_f32(DType::kBF16, kB.data(), b_bytes.data(), kB.size());
  for (size_t piece : {size_t{1}, size_t{3}, size_t{8}, size_t{64}, size_t{1000}}) {
    const std::string path = dir.file("pieces" + std::to_string(piece) + ".safetensors");
    SafetensorsWriter w(path);
    declare_abi(w);
    ASSERT_TRUE(w.begin().is_ok());
    const std::vector<const std::string*> order = {&a_bytes, nullptr, &b_bytes, &kI};
    for (const std::string* t : order) {
      if (!t) {
        ASSERT_TRUE(w.append({}).is_ok());  // completes the empty tensor
        continue;
      }
      for (size_t off = 0; off < t->size(); off += piece)
        ASSERT_TRUE(w.append(std::string_view(*t).substr(off, piece)).is_ok()) << piece;
    }
    ASSERT_TRUE(w.finish().is_ok());
    EXPECT_EQ(slurp(path), whole) << "pieces of " << piece << " bytes";
  }

  // Row sources: any chunk size (in rows) gives the same bytes; the calls
  // cover the rows once, in order, each within the chunk bound.
  for (uint64_t chunk : {uint64_t{1}, uint64_t{20}, uint64_t{40}, uint64_t{1} << 20}) {
    const std::string path = dir.file("rows" + std::to_string(chunk) + ".safetensors");
    SafetensorsWriter w(path);
    declare_abi(w);
    ASSERT_TRUE(w.begin().is_ok());
    std::vector<std::pair<int64_t, int64_t>> calls;
    const RowFn a_rows = [&](int64_t r0, int64_t n, float* out) {
      calls.push_back({r0, n});
      return rows_of(kA.data(), 5)(r0, n, out);
    };
    ASSERT_TRUE(w.write_rows(a_rows, chunk).is_ok());
    const int64_t bound = std::max<int64_t>(1, static_cast<int64_t>(chunk / (5 * 4)));
    int64_t next = 0;
    for (const auto& [r0, n] : calls) {
      EXPECT_EQ(r0, next);
      EXPECT_GE(n, 1);
      EXPECT_LE(n, bound);
      next = r0 + n;
    }
    EXPECT_EQ(next, 7);
    ASSERT_TRUE(w.write_rows([](int64_t, int64_t, float*) {
                   ADD_FAILURE() << "called for an empty tensor";
                   return Status::ok();
                 }).is_ok());
    ASSERT_TRUE(w.write_rows(rows_of(kB.data(), 1), chunk).is_ok());
    ASSERT_TRUE(w.write(kI).is_ok());
    ASSERT_TRUE(w.finish().is_ok());
    EXPECT_EQ(slurp(path), whole) << "row chunks of " << chunk << " bytes";
  }
}

TEST(SafetensorsStream, DeclaredBytesMustMatchExactly) {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  auto fresh = [&](SafetensorsWriter& w) {
    declare_abi(w);
    ASSERT_TRUE(w.begin().is_ok());
  };
  {  // A piece larger than what the tensor still lacks (spanning into the next).
    SafetensorsWriter w(path);
    fresh(w);
    ASSERT_TRUE(w.append(std::string(60, '\0')).is_ok());
    Status s = w.append(std::string(11, '\0'));
    EXPECT_EQ(s.code(), Code::kInternal);
    EXPECT_NE(s.message().find("tensor 'a' needs 70 bytes, 10 still missing, got a piece of 11"),
              std::string::npos)
        << s.message();
    EXPECT_EQ(w.append(std::string(10, '\0')).code(), Code::kInternal);  // stays failed
  }
  {  // A partly written tensor: finish() names it and its byte counts.
    SafetensorsWriter w(path);
    fresh(w);
    ASSERT_TRUE(w.append(std::string(69, '\0')).is_ok());
    Status s = w.finish();
    EXPECT_EQ(s.code(), Code::kInternal);
    EXPECT_NE(s.message().find("first 'a' (69 of its 70 bytes)"), std::string::npos) << s.message();
  }
  {  // write() and write_rows() need a tensor none of which was written yet.
    SafetensorsWriter w(path);
    fresh(w);
    ASSERT_TRUE(w.append(std::string(2, '\0')).is_ok());
    EXPECT_EQ(w.write_rows(rows_of(kA.data(), 5)).code(), Code::kInternal);
  }
  {  // Bytes after every tensor.
    SafetensorsWriter w(dir.file("one.safetensors"));
    w.add("x", DType::kI32, {1});
    ASSERT_TRUE(w.begin().is_ok());
    ASSERT_TRUE(w.append(std::string(4, '\0')).is_ok());
    Status s = w.append(std::string(1, '\0'));
    EXPECT_EQ(s.code(), Code::kInternal);
    EXPECT_NE(s.message().find("after every declared tensor"), std::string::npos) << s.message();
  }
  {  // write_rows() of an integer tensor.
    SafetensorsWriter w(dir.file("int.safetensors"));
    w.add("x", DType::kI32, {2});
    ASSERT_TRUE(w.begin().is_ok());
    EXPECT_EQ(w.write_rows(rows_of(kA.data(), 1)).code(), Code::kInternal);
  }
  EXPECT_TRUE(fs::is_empty(dir.path())) << "a failed writer left a file";
}

TEST(SafetensorsStream, RowSourceErrorsAndNonFiniteValuesAbortTheFile) {
  TempDir dir;
  const std::string path = dir.file("x.safetensors");
  auto rows_with = [](int64_t bad_row, float bad) {
    return [bad_row, bad](int64_t r0, int64_t n, float* out) {
      for (int64_t r = r0; r < r0 + n; ++r)
        for (int64_t j = 0; j < 5; ++j) out[(r - r0) * 5 + j] = r == bad_row && j == 2 ? bad : 1;
      return Status::ok();
    };
  };
  for (float bad : {NAN, INFINITY}) {
    SafetensorsWriter w(path);
    declare_abi(w);
    ASSERT_TRUE(w.begin().is_ok());
    Status s = w.write_rows(rows_with(4, bad), 40);  // two rows per call
    EXPECT_EQ(s.code(), Code::kInvalidInput);
    EXPECT_NE(s.message().find("tensor a: non-finite value"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("at element 22 (row 4)"), std::string::npos) << s.message();
  }
  {  // Values the source leaves unwritten are caught the same way.
    SafetensorsWriter w(path);
    declare_abi(w);
    ASSERT_TRUE(w.begin().is_ok());
    Status s = w.write_rows([](int64_t, int64_t n, float* out) {
      for (int64_t i = 0; i + 1 < n * 5; ++i) out[i] = 0.5f;
      return Status::ok();
    });
    EXPECT_EQ(s.code(), Code::kInvalidInput);
    EXPECT_NE(s.message().find("at element 34 (row 6)"), std::string::npos) << s.message();
  }
  {  // The source's own error comes back unchanged, on the call that failed.
    SafetensorsWriter w(path);
    declare_abi(w);
    ASSERT_TRUE(w.begin().is_ok());
    int calls = 0;
    Status s = w.write_rows(
        [&](int64_t r0, int64_t n, float* out) {
          ++calls;
          if (r0 >= 4) return unavailable("row store briefly gone");
          return rows_of(kA.data(), 5)(r0, n, out);
        },
        40);
    EXPECT_EQ(s.code(), Code::kUnavailable);
    EXPECT_EQ(s.message(), "row store briefly gone");
    EXPECT_EQ(calls, 3);
    EXPECT_EQ(w.finish().code(), Code::kUnavailable);  // the first error, again
  }
  EXPECT_TRUE(fs::is_empty(dir.path())) << "a failed writer left a file";
}

TEST(SafetensorsStream, ReleaseOfAByteRangeKeepsTheDataReadable) {
  TempDir dir;
  const std::string whole = write_whole(dir.file("w.safetensors"));
  auto f = SafetensorsFile::open(dir.file("w.safetensors"));
  ASSERT_TRUE(f.is_ok());
  const TensorInfo* a = (*f)->find("a");
  ASSERT_NE(a, nullptr);
  const std::string before((*f)->raw(*a));
  (*f)->release(*a, 3, 40);
  (*f)->release(*a, 60, 1000);  // clamped to the tensor
  (*f)->release(*a, 50, 10);    // empty: nothing
  EXPECT_EQ(std::string((*f)->raw(*a)), before);
}

// ---------------------------------------------------------------- malformed input

const char* kGood = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                    R"("b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}})";

TEST(SafetensorsHeader, AcceptsValidAndSortsByOffset) {
  auto h = parse(
      make_file(R"({"z":{"dtype":"I8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"k":"v"},)"
                R"("y":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},)"
                R"("e":{"dtype":"F32","shape":[0],"data_offsets":[11,11]}})",
                11));
  ASSERT_TRUE(h.is_ok()) << h.status().to_string();
  ASSERT_EQ(h->tensors.size(), 3u);
  EXPECT_EQ(h->tensors[0].name, "y");
  EXPECT_EQ(h->tensors[1].name, "z");
  EXPECT_EQ(h->tensors[2].name, "e");
  EXPECT_EQ(h->tensors[1].dtype, DType::kI8);
  EXPECT_EQ(h->tensors[1].begin, 8u);
  EXPECT_EQ(h->tensors[1].end, 11u);
  EXPECT_EQ(h->metadata.at("k"), "v");
  EXPECT_TRUE(parse(make_file(kGood, 24)).is_ok());
  EXPECT_TRUE(parse(make_file(kGood, 100)).is_ok());  // trailing bytes are allowed
}

TEST(SafetensorsHeader, Truncated) {
  std::string good = make_file(kGood, 24);
  expect_error(parse(good.substr(0, 5)), Code::kCorrupt, {"t.safetensors", "truncated"});
  // The caller gave fewer bytes than the header needs.
  expect_error(parse_safetensors_header(std::string_view(good).substr(0, 20), good.size(), "t"),
               Code::kCorrupt, {"truncated"});
  // A file cut inside its header: the length runs past the end.
  expect_error(parse(good.substr(0, 30)), Code::kCorrupt, {"header length", "past end of file"});
  // A file cut inside its data: offsets run past the data buffer.
  expect_error(parse(good.substr(0, good.size() - 1)), Code::kCorrupt,
               {"tensor 'b'", "data_offsets end 24 past data buffer size 23"});

  TempDir dir;
  spit(dir.file("short.safetensors"), good.substr(0, 3));
  expect_error(SafetensorsFile::open(dir.file("short.safetensors")), Code::kCorrupt,
               {"short.safetensors", "truncated"});
  spit(dir.file("empty.safetensors"), "");
  expect_error(SafetensorsFile::open(dir.file("empty.safetensors")), Code::kCorrupt,
               {"empty.safetensors", "truncated"});
  spit(dir.file("cut.safetensors"), good.substr(0, good.size() - 4));
  expect_error(SafetensorsFile::open(dir.file("cut.safetensors")), Code::kCorrupt,
               {"cut.safetensors", "tensor 'b'", "past data buffer size 20"});
  expect_error(SafetensorsFile::open(dir.file("absent.safetensors")), Code::kNotFound,
               {"absent.safetensors"});
}

TEST(SafetensorsHeader, HeaderLengthPastEnd) {
  std::string f = make_file(kGood, 24);
  f[0] = static_cast<char>(0xff);
  f[1] = static_cast<char>(0xff);
  expect_error(parse(f), Code::kCorrupt,
               {"t.safetensors: header length 65535", "past end of file"});
  std::string huge = f;
  for (int i = 0; i < 8; ++i) huge[i] = static_cast<char>(0xff);
  expect_error(parse(huge), Code::kCorrupt, {"header length 18446744073709551615", "past end"});
  // Within the (claimed) file but over the 100 MB limit.
  std::string big = make_file(kGood, 24);
  uint64_t n = 200ull << 20;
  for (int i = 0; i < 8; ++i) big[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  expect_error(parse_safetensors_header(big, n + 100, "t"), Code::kCorrupt, {"100 MB"});
}

TEST(SafetensorsHeader, OverlappingOffsets) {
  expect_error(parse(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                               20)),
               Code::kCorrupt, {"'a' [0, 16)", "'b' [12, 20)", "overlapping"});
  // Identical ranges overlap too.
  expect_error(parse(make_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                               4)),
               Code::kCorrupt, {"overlapping"});
  // A range nested inside a larger one.
  expect_error(parse(make_file(R"({"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},)"
                               R"("b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]},)"
                               R"("c":{"dtype":"U8","shape":[2],"data_offsets":[10,12]}})",
                               12)),
               Code::kCorrupt, {"overlapping"});
}

TEST(SafetensorsHeader, OutOfRangeOffsets) {
  expect_error(
      parse(make_file(R"({"x":{"dtype":"F32","shape":[1024],"data_offsets":[0,4096]}})", 100)),
      Code::kCorrupt,
      {"t.safetensors: tensor 'x': data_offsets end 4096 past data buffer size 100"});
  expect_error(parse(make_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 16)),
               Code::kCorrupt, {"tensor 'x'", "begin 8 > end 4"});
  expect_error(parse(make_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 16)),
               Code::kCorrupt, {"tensor 'x'", "data_offsets"});
  expect_error(parse(make_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 16)),
               Code::kCorrupt, {"tensor 'x'", "[begin, end]"});
  expect_error(parse(make_file(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", 16)),
               Code::kCorrupt, {"tensor 'x'", "not non-negative integers"});
  expect_error(parse(make_file(R"({"x":{"dtype":"F32","shape":[1],)"
                               R"("data_offsets":[18446744073709551612,18446744073709551616]}})",
                               16)),
               Code::kCorrupt, {"tensor 'x'"});
}

TEST(SafetensorsHeader, UnknownDtype) {
  expect_error(parse(make_file(R"({"x":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", 1)),
               Code::kInvalidInput, {"tensor 'x'", "unknown dtype 'F8_E4M3'"});
  expect_error(parse(make_file(R"({"x":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", 1)),
               Code::kCorrupt, {"tensor 'x'", "dtype"});
  expect_error(parse(make_file(R"({"x":{"shape":[1],"data_offsets":[0,1]}})", 1)), Code::kCorrupt,
               {"tensor 'x'", "missing or non-string dtype"});
}

TEST(SafetensorsHeader, SizeShapeMismatch) {
  expect_error(parse(make_file(R"({"w":{"dtype":"F16","shape":[3,4],"data_offsets":[0,48]}})", 48)),
               Code::kCorrupt, {"tensor 'w'", "size mismatch", "span 48", "[3, 4]", "needs 24"});
  expect_error(
      parse(make_file(R"({"w":{"dtype":"F16","shape":[-3,4],"data_offsets":[0,24]}})", 48)),
      Code::kCorrupt, {"tensor 'w'", "shape entry -3"});
  expect_error(parse(make_file(R"({"w":{"dtype":"F16","shape":[2.5],"data_offsets":[0,5]}})", 48)),
               Code::kCorrupt, {"tensor 'w'", "shape entry 2.5"});
  expect_error(parse(make_file(R"({"w":{"dtype":"F16","shape":"3","data_offsets":[0,6]}})", 48)),
               Code::kCorrupt, {"tensor 'w'", "shape"});
  // numel * dtype_size overflowing 64 bits must not wrap around to a match.
  expect_error(parse(make_file(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],)"
                               R"("data_offsets":[0,0]}})",
                               48)),
               Code::kCorrupt, {"tensor 'w'", "too large"});
}

TEST(SafetensorsHeader, DuplicateName) {
  expect_error(parse(make_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                               R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                               2)),
               Code::kCorrupt, {"duplicate name 'a'"});
}

TEST(SafetensorsHeader, BadJson) {
  expect_error(parse(make_file(R"({"a":{"dtype":"U8",)", 2)), Code::kCorrupt, {"bad JSON"});
  expect_error(parse(make_file("", 2)), Code::kCorrupt, {"bad JSON"});
  expect_error(parse(make_file("[1,2]", 2)), Code::kCorrupt, {"bad JSON", "not an object"});
  expect_error(parse(make_file(R"({"a":5})", 2)), Code::kCorrupt, {"tensor 'a'", "not an object"});
  expect_error(parse(make_file(R"({"__metadata__":{"k":1}})", 2)), Code::kCorrupt,
               {"__metadata__", "'k'", "not a string"});
  expect_error(parse(make_file(R"({"__metadata__":[]})", 2)), Code::kCorrupt,
               {"__metadata__", "not an object"});
  std::string nul = make_file(std::string("{\"a\":\0}", 7), 2);
  expect_error(parse(nul), Code::kCorrupt, {"bad JSON"});
}

}  // namespace
}  // namespace qcal

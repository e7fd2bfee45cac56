// labels: slow
// Randomized robustness test of parse_safetensors_header: valid headers are
// mutated (byte flips, truncation, length-field changes, JSON field edits,
// huge/negative numbers, nested garbage) or replaced by random bytes. The
// parser must never crash or throw, must reject with kCorrupt/kInvalidInput
// and a message prefixed by the file name, and every header it accepts must
// satisfy the format invariants. Seeded, so failures reproduce; scale with
// QCAL_FUZZ_ITERS (default sized for ~10-20 s in a release build).
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/safetensors.h"

namespace qcal {
namespace {

using json = nlohmann::ordered_json;
using Rng = std::mt19937_64;

constexpr uint64_t kSeed = 0x5afe7e45u;
constexpr const char* kWhat = "fuzz.safetensors";

int64_t uniform(Rng& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
bool coin(Rng& rng, double p = 0.5) { return std::bernoulli_distribution(p)(rng); }

const char* const kDtypes[] = {"F32", "F16", "BF16", "F64", "I64",
                               "I32", "I16", "I8",   "U8",  "BOOL"};
const size_t kDtypeSizes[] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};

// A valid header as JSON plus the data buffer size it describes.
struct Seed {
  json header;
  uint64_t data_size = 0;
};

Seed random_valid(Rng& rng) {
  Seed s;
  s.header = json::object();
  if (coin(rng, 0.7)) {
    json meta = json::object();
    for (int64_t i = uniform(rng, 0, 3); i > 0; --i)
      meta["k" + std::to_string(uniform(rng, 0, 9))] = "v" + std::to_string(uniform(rng, 0, 99));
    s.header["__metadata__"] = meta;
  }
  std::vector<size_t> order;
  const int64_t n = uniform(rng, 0, 8);
  for (int64_t i = 0; i < n; ++i) order.push_back(static_cast<size_t>(i));
  std::shuffle(order.begin(), order.end(), rng);  // key order independent of offset order
  std::vector<json> entries(order.size());
  uint64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    const size_t d = static_cast<size_t>(uniform(rng, 0, 9));
    json shape = json::array();
    uint64_t numel = 1;
    for (int64_t r = uniform(rng, 0, 3); r > 0; --r) {
      int64_t dim = uniform(rng, 0, 6);
      shape.push_back(dim);
      numel *= static_cast<uint64_t>(dim);
    }
    if (coin(rng, 0.2)) off += static_cast<uint64_t>(uniform(rng, 0, 16));  // gaps are legal
    const uint64_t end = off + numel * kDtypeSizes[d];
    entries[static_cast<size_t>(i)] =
        json{{"dtype", kDtypes[d]}, {"shape", shape}, {"data_offsets", {off, end}}};
    off = end;
  }
  for (size_t i = 0; i < order.size(); ++i)
    s.header["t" + std::to_string(order[i]) + (coin(rng, 0.1) ? ".we\\\"ird\xc3\xa9" : "")] =
        entries[order[i]];
  s.data_size = off + (coin(rng, 0.3) ? static_cast<uint64_t>(uniform(rng, 0, 64)) : 0);
  return s;
}

// The bytes of a file: 8-byte length, header text, padding. The data buffer is
// not materialised; its size travels as `file_size`.
struct Input {
  std::string bytes;
  uint64_t file_size = 0;
};

void put_len(std::string& b, uint64_t n) {
  for (int i = 0; i < 8; ++i) b[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
}

Input encode(const std::string& header_text, uint64_t data_size) {
  Input in;
  in.bytes.assign(8, '\0');
  put_len(in.bytes, header_text.size());
  in.bytes += header_text;
  in.file_size = in.bytes.size() + data_size;
  return in;
}

// ---- JSON-level mutations (operate on a parsed copy of a valid header) ----

json weird_value(Rng& rng) {
  switch (uniform(rng, 0, 13)) {
    case 0: return -1;
    case 1: return std::numeric_limits<int64_t>::min();
    case 2: return std::numeric_limits<uint64_t>::max();
    case 3: return static_cast<uint64_t>(1) << 63;
    case 4: return 1.5;
    case 5: return 1e300;
    case 6: return "12";
    case 7: return nullptr;
    case 8: return true;
    case 9: return json::array();
    case 10: return json::object();
    case 11: return json::array({json::array({1, 2}), json::object({{"a", 1}})});
    case 12: return uniform(rng, 0, 1 << 20);
    default: return static_cast<uint64_t>(uniform(rng, 0, 4)) << 62;
  }
}

std::vector<std::string> tensor_keys(const json& h) {
  std::vector<std::string> k;
  for (auto it = h.begin(); it != h.end(); ++it)
    if (it.key() != "__metadata__") k.push_back(it.key());
  return k;
}

void mutate_json_unchecked(Rng& rng, json& h) {
  std::vector<std::string> keys = tensor_keys(h);
  if (keys.empty() || coin(rng, 0.1)) {
    switch (uniform(rng, 0, 3)) {
      case 0: h["__metadata__"] = weird_value(rng); break;
      case 1: h["__metadata__"] = json{{"k", weird_value(rng)}}; break;
      case 2: h["x"] = weird_value(rng); break;
      default: h = weird_value(rng); break;
    }
    return;
  }
  const std::string key =
      keys[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(keys.size()) - 1))];
  json& e = h[key];
  const std::string other =
      keys[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(keys.size()) - 1))];
  switch (uniform(rng, 0, 15)) {
    case 0: e["dtype"] = coin(rng) ? json(kDtypes[uniform(rng, 0, 9)]) : weird_value(rng); break;
    case 1: e["dtype"] = coin(rng) ? "F8_E5M2" : "f32"; break;
    case 2:
      if (!e["shape"].empty())
        e["shape"]
         [static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(e["shape"].size()) - 1))] =
             weird_value(rng);
      break;
    case 3: e["shape"].push_back(coin(rng) ? weird_value(rng) : json(uniform(rng, 0, 3))); break;
    case 4: e["shape"] = weird_value(rng); break;
    case 5: e["data_offsets"][static_cast<size_t>(uniform(rng, 0, 1))] = weird_value(rng); break;
    case 6: {  // shift both offsets: may overlap a neighbour or leave the buffer
      int64_t d = uniform(rng, -16, 16);
      for (int i = 0; i < 2; ++i) {
        json& o = e["data_offsets"][static_cast<size_t>(i)];
        if (o.is_number_unsigned()) o = o.get<uint64_t>() + static_cast<uint64_t>(d);  // wraps
      }
      break;
    }
    case 7: e["data_offsets"] = h[other]["data_offsets"]; break;  // exact overlap
    case 8: {
      json o = e["data_offsets"];
      e["data_offsets"] = json::array({o[1], o[0]});
      break;
    }
    case 9: e["data_offsets"].push_back(0); break;
    case 10: e.erase(coin(rng) ? "dtype" : (coin(rng) ? "shape" : "data_offsets")); break;
    case 11: e = weird_value(rng); break;
    case 12: h["__metadata__"] = e; break;
    case 13: {  // end one element too far
      json& o = e["data_offsets"][1];
      if (o.is_number_unsigned()) o = o.get<uint64_t>() + static_cast<uint64_t>(uniform(rng, 1, 8));
      break;
    }
    case 14: e["extra"] = weird_value(rng); break;  // unknown fields are ignored
    default: h[key + "_copy"] = e; break;           // a second tensor on the same bytes
  }
}

// Edits may hit values an earlier edit made non-numeric or non-object; such an
// edit is simply skipped.
void mutate_json(Rng& rng, json& h) {
  try {
    mutate_json_unchecked(rng, h);
  } catch (const nlohmann::json::exception&) {
  }
}

// ---- text/byte-level mutations ----

void mutate_text(Rng& rng, std::string& t) {
  static const char* const kNumbers[] = {"18446744073709551615",
                                         "18446744073709551616",
                                         "9223372036854775808",
                                         "-9223372036854775809",
                                         "99999999999999999999999999",
                                         "1e308",
                                         "1e999",
                                         "-0",
                                         "0.0",
                                         "-1",
                                         "1E2",
                                         "00"};
  static const char* const kTokens[] = {"{",
                                        "}",
                                        "[",
                                        "]",
                                        ",",
                                        ":",
                                        "\"",
                                        "\\",
                                        "null",
                                        "true",
                                        "\"dtype\"",
                                        "\"__metadata__\"",
                                        "\"data_offsets\":[0,4]",
                                        "\xff",
                                        "\xc3",
                                        "\\u0000"};
  switch (uniform(rng, 0, 6)) {
    case 0:
    case 1: {  // replace a run of digits by an extreme number, or negate it
      std::vector<size_t> starts;
      for (size_t i = 0; i < t.size(); ++i)
        if (isdigit(static_cast<unsigned char>(t[i])) &&
            (i == 0 || !isdigit(static_cast<unsigned char>(t[i - 1]))))
          starts.push_back(i);
      if (starts.empty()) return;
      size_t
          a = starts[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(starts.size()) - 1))],
          b = a;
      while (b < t.size() && isdigit(static_cast<unsigned char>(t[b]))) ++b;
      if (coin(rng))
        t.replace(a, b - a, kNumbers[uniform(rng, 0, 11)]);
      else
        t.insert(a, "-");
      break;
    }
    case 2: {  // nested garbage
      int depth = static_cast<int>(coin(rng, 0.8) ? uniform(rng, 1, 20) : uniform(rng, 100, 5000));
      std::string g;
      bool obj = coin(rng);
      for (int i = 0; i < depth; ++i) g += obj ? "{\"a\":" : "[";
      g += "0";
      for (int i = 0; i < depth; ++i) g += obj ? "}" : "]";
      size_t pos = static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(t.size())));
      if (coin(rng)) {  // as a value where a value was
        size_t colon = t.find(':', pos);
        if (colon != std::string::npos) pos = colon + 1;
      }
      t.insert(pos, g);
      break;
    }
    case 3:
      t.insert(static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(t.size()))),
               kTokens[uniform(rng, 0, 15)]);
      break;
    case 4:
      if (!t.empty())
        t.erase(static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(t.size()) - 1)),
                static_cast<size_t>(uniform(rng, 1, 4)));
      break;
    case 5: {  // duplicate a key's text
      size_t q = t.find("\"t");
      if (q != std::string::npos) {
        size_t end = t.find("},", q);
        if (end != std::string::npos) t.insert(q, t.substr(q, end + 2 - q));
      }
      break;
    }
    default: t.append(static_cast<size_t>(uniform(rng, 0, 8)), coin(rng) ? ' ' : '\0'); break;
  }
}

void mutate_bytes(Rng& rng, Input& in) {
  std::string& b = in.bytes;
  switch (uniform(rng, 0, 7)) {
    case 0:  // bit flip
      if (!b.empty())
        b[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size()) - 1))] ^=
            static_cast<char>(1 << uniform(rng, 0, 7));
      break;
    case 1:  // random byte
      if (!b.empty())
        b[static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size()) - 1))] =
            static_cast<char>(uniform(rng, 0, 255));
      break;
    case 2: {  // truncate the file (bytes and size together)
      size_t n = static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size())));
      b.resize(n);
      in.file_size = n;
      break;
    }
    case 3:  // give the parser fewer bytes than the header needs
      b.resize(static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size()))));
      break;
    case 4: {  // length field
      if (b.size() < 8) break;
      uint64_t n = 0;
      for (int i = 7; i >= 0; --i)
        n = (n << 8) | static_cast<unsigned char>(b[static_cast<size_t>(i)]);
      switch (uniform(rng, 0, 5)) {
        case 0: n += static_cast<uint64_t>(uniform(rng, -8, 8)); break;
        case 1: n = 0; break;
        case 2:
          n = std::numeric_limits<uint64_t>::max() - static_cast<uint64_t>(uniform(rng, 0, 8));
          break;
        case 3: n = 100ull * 1000 * 1000 + static_cast<uint64_t>(uniform(rng, -2, 2)); break;
        case 4: n = in.file_size - 8 + static_cast<uint64_t>(uniform(rng, -2, 2)); break;
        default: n = static_cast<uint64_t>(rng()); break;
      }
      put_len(b, n);
      break;
    }
    case 5:  // data buffer size
      in.file_size =
          coin(rng) ? in.file_size - std::min<uint64_t>(in.file_size,
                                                        static_cast<uint64_t>(uniform(rng, 0, 32)))
                    : in.file_size + static_cast<uint64_t>(uniform(rng, 0, 32));
      break;
    case 6:  // lying file size, far past anything
      in.file_size =
          coin(rng) ? std::numeric_limits<uint64_t>::max() : static_cast<uint64_t>(rng());
      break;
    default: {  // splice a random block
      size_t pos = static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(b.size())));
      std::string r(static_cast<size_t>(uniform(rng, 1, 16)), '\0');
      for (char& c : r) c = static_cast<char>(uniform(rng, 0, 255));
      b.insert(pos, r);
      break;
    }
  }
}

Input random_bytes(Rng& rng) {
  Input in;
  size_t n = static_cast<size_t>(uniform(rng, 0, 200));
  in.bytes.resize(n);
  for (char& c : in.bytes) c = static_cast<char>(uniform(rng, 0, 255));
  if (n >= 8 && coin(rng))
    put_len(in.bytes, static_cast<uint64_t>(uniform(rng, 0, static_cast<int64_t>(n) - 8)));
  if (n >= 9 && coin(rng)) in.bytes[8] = '{';
  in.file_size = n + (coin(rng) ? static_cast<uint64_t>(uniform(rng, 0, 100)) : 0);
  return in;
}

// ---- invariants of an accepted header ----

::testing::AssertionResult check_accepted(const SafetensorsHeader& h, const Input& in) {
  auto fail = [&](const std::string& why) { return ::testing::AssertionFailure() << why; };
  if (h.header_len + 8 > in.file_size) return fail("header past end of file");
  if (h.header_len + 8 > in.bytes.size()) return fail("header past the given bytes");
  if (h.header_len >= 100ull * 1000 * 1000) return fail("header over 100 MB");
  if (h.data_start != 8 + h.header_len) return fail("data_start != 8 + header_len");
  const uint64_t data_size = in.file_size - h.data_start;
  std::set<std::string> names;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : h.tensors) {
    if (t.name == "__metadata__") return fail("tensor named __metadata__");
    if (!names.insert(t.name).second) return fail("duplicate name " + t.name);
    if (t.begin > t.end) return fail(t.name + ": begin > end");
    if (t.end > data_size) return fail(t.name + ": end past data buffer");
    unsigned __int128 want = dtype_size(t.dtype);
    for (int64_t d : t.shape) {
      if (d < 0) return fail(t.name + ": negative dim");
      want *= static_cast<uint64_t>(d);
      if (want > (static_cast<unsigned __int128>(1) << 64))
        want = static_cast<unsigned __int128>(1) << 64;
    }
    if (want != t.nbytes()) return fail(t.name + ": nbytes != numel * dtype_size");
    if (prev && t.begin < prev->begin) return fail("not sorted by begin");
    if (t.nbytes() > 0) {
      if (prev && prev->end > t.begin) return fail(t.name + " overlaps " + prev->name);
      prev = &t;
    }
  }
  return ::testing::AssertionSuccess();
}

int64_t iterations() {
  const char* e = std::getenv("QCAL_FUZZ_ITERS");
  if (e && *e) {
    long long v = std::atoll(e);
    if (v > 0) return v;
  }
  return 150000;  // ~15 s on the 2-core CI machine
}

TEST(SafetensorsFuzz, ParserSurvivesMutatedAndRandomInput) {
  Rng rng(kSeed);
  const int64_t iters = iterations();
  int64_t accepted = 0, corrupt_n = 0, invalid_n = 0, seeds_ok = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iters; ++it) {
    Input in;
    const int64_t kind = uniform(rng, 0, 9);
    if (kind == 0) {
      in = random_bytes(rng);
    } else {
      Seed s = random_valid(rng);
      if (kind <= 4) {  // structured edits, then maybe byte noise
        for (int64_t m = uniform(rng, 1, 3); m > 0; --m) mutate_json(rng, s.header);
        in = encode(s.header.dump(), s.data_size);
      } else if (kind <= 7) {
        std::string text = s.header.dump();
        for (int64_t m = uniform(rng, 1, 3); m > 0; --m) mutate_text(rng, text);
        in = encode(text, s.data_size);
      } else {
        in = encode(s.header.dump(), s.data_size);
        // The unmutated seed must parse: the generator and parser agree on "valid".
        auto ok = parse_safetensors_header(in.bytes, in.file_size, kWhat);
        ASSERT_TRUE(ok.is_ok()) << "valid seed rejected: " << ok.status().to_string() << "\n"
                                << s.header.dump();
        ASSERT_EQ(ok->tensors.size(), tensor_keys(s.header).size());
        ++seeds_ok;
        for (int64_t m = uniform(rng, 1, 3); m > 0; --m) mutate_bytes(rng, in);
      }
      if (coin(rng, 0.1)) mutate_bytes(rng, in);
    }
    // An exactly-sized heap copy, so ASan catches any read past the given bytes.
    std::unique_ptr<char[]> buf(new char[in.bytes.size() + 1]);
    std::memcpy(buf.get(), in.bytes.data(), in.bytes.size());
    const std::string_view view(buf.get(), in.bytes.size());
    Result<SafetensorsHeader> r = corrupt("unset");
    try {
      r = parse_safetensors_header(view, in.file_size, kWhat);
    } catch (const std::exception& e) {
      FAIL() << "iteration " << it << ": parser threw " << e.what();
    } catch (...) {
      FAIL() << "iteration " << it << ": parser threw a non-std exception";
    }
    if (r.is_ok()) {
      ++accepted;
      ASSERT_TRUE(check_accepted(*r, in)) << "iteration " << it;
    } else {
      const Status& st = r.status();
      ASSERT_TRUE(st.code() == Code::kCorrupt || st.code() == Code::kInvalidInput)
          << "iteration " << it << ": " << st.to_string();
      ASSERT_EQ(st.message().rfind(std::string(kWhat) + ": ", 0), 0u) << st.message();
      (st.code() == Code::kCorrupt ? corrupt_n : invalid_n)++;
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "[fuzz] seed " << kSeed << ": " << iters << " inputs survived in " << secs << " s; "
            << accepted << " accepted, " << corrupt_n << " kCorrupt, " << invalid_n
            << " kInvalidInput (" << seeds_ok << " unmutated seeds checked)\n";
  RecordProperty("inputs", static_cast<int>(iters));
  RecordProperty("accepted", static_cast<int>(accepted));
  // The mutators must keep producing both outcomes, or the test has gone blind.
  EXPECT_GT(accepted, iters / 100);
  EXPECT_GT(corrupt_n, iters / 10);
}

// Pathological shapes too large for the random loop: deep nesting near the
// size limit and a header with very many tensors.
TEST(SafetensorsFuzz, DeepNestingAndManyTensors) {
  std::string deep(4 << 20, '[');
  deep = "{\"a\":" + deep + std::string(4 << 20, ']') + "}";
  Input in = encode(deep, 0);
  auto r = parse_safetensors_header(in.bytes, in.file_size, kWhat);
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("nested deeper"), std::string::npos) << r.status().message();

  nlohmann::json h = nlohmann::json::object();  // ordered_json inserts in O(n)
  uint64_t off = 0;
  for (int i = 0; i < 100000; ++i) {
    h["w" + std::to_string(i)] =
        json{{"dtype", "F16"}, {"shape", {3}}, {"data_offsets", {off, off + 6}}};
    off += 6;
  }
  Input many = encode(h.dump(), off);
  auto m = parse_safetensors_header(many.bytes, many.file_size, kWhat);
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->tensors.size(), 100000u);
  EXPECT_TRUE(check_accepted(*m, many));
}

}  // namespace
}  // namespace qcal

// The artifact store: exact round trips, checksum and size checks, atomic
// writes, and refusal of unknown format versions. Also SHA-256 against the
// FIPS 180-4 test vectors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/fsutil.h"
#include "common/rng.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "worker/artifacts.h"
#include "worker/engine/gptq.h"
#include "worker/engine/quantizer.h"

namespace qcal {
namespace {
namespace fs = std::filesystem;

class Artifacts : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() /
            ("qcal_artifacts_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  static Tensor random(std::vector<int64_t> shape, uint64_t seed) {
    Tensor t(std::move(shape));
    Rng rng(seed);
    for (float& v : t.data) v = static_cast<float>(rng.normal());
    return t;
  }
  static void flip_byte(const std::string& path, uint64_t offset) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x40);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&c, 1);
  }
  // Every regular file under the root (to find leftovers).
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(root_))
      if (e.is_regular_file()) out.push_back(fs::relative(e.path(), root_).string());
    std::sort(out.begin(), out.end());
    return out;
  }

  std::string root_;
};

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  // Streaming in uneven pieces gives the one-shot digest.
  std::string big(1000003, 'a');
  Sha256 h;
  for (size_t off = 0; off < big.size(); off += 4097) h.update(big.substr(off, 4097));
  EXPECT_EQ(h.bytes(), big.size());
  EXPECT_EQ(h.hex_digest(), sha256_hex(big));
}

TEST_F(Artifacts, BlobRoundTripAndChecks) {
  ArtifactStore store(root_);
  std::string data(100000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7 + 3);
  auto ref = store.write_blob("jobs/j/t/a1/blob.bin", data);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  EXPECT_EQ(ref->bytes, data.size());
  EXPECT_EQ(ref->sha256, sha256_hex(data));
  auto file = sha256_file(store.absolute(ref->path));
  ASSERT_TRUE(file.is_ok());
  EXPECT_EQ(file->sha256, ref->sha256);
  auto back = store.read_blob(*ref);
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ(*back, data);

  // JSON form round trip and validation.
  auto parsed = ArtifactRef::from_json(ref->to_json());
  ASSERT_TRUE(parsed.is_ok());
  EXPECT_EQ(parsed->path, ref->path);
  nlohmann::json bad = ref->to_json();
  bad["path"] = "../escape";
  EXPECT_EQ(ArtifactRef::from_json(bad).status().code(), Code::kInvalidInput);
  bad = ref->to_json();
  bad["sha256"] = "xyz";
  EXPECT_EQ(ArtifactRef::from_json(bad).status().code(), Code::kInvalidInput);
  EXPECT_EQ(store.write_blob("/abs/path", "x").status().code(), Code::kInvalidInput);
  EXPECT_EQ(store.write_blob("a/../../b", "x").status().code(), Code::kInvalidInput);
}

TEST_F(Artifacts, QLinearsRoundTripExact) {
  ArtifactStore store(root_);
  std::map<std::string, QuantizedLinear> in;
  // RTN per group, GPTQ with act-order (permuted g_idx), asymmetric 3-bit per channel.
  Tensor w1 = random({32, 64}, 1), w2 = random({48, 64}, 2), w3 = random({16, 40}, 3);
  QuantSpec s1;
  s1.bits = 4;
  s1.group_size = 16;
  auto q1 = rtn_quantize(w1, s1);
  ASSERT_TRUE(q1.is_ok());
  in["model.layers.0.self_attn.q_proj"] = *q1;
  Tensor x = random({256, 64}, 4);
  HessianAccumulator acc(64);
  acc.add_batch(x.ptr(), 256, 4);
  GptqOptions go;
  go.act_order = true;
  QuantSpec s2;
  s2.bits = 8;
  s2.group_size = 32;
  s2.sym = false;
  auto q2 = gptq_quantize(w2, acc.hessian(), s2, go);
  ASSERT_TRUE(q2.is_ok()) << q2.status().to_string();
  ASSERT_TRUE(q2->qlinear.act_order);
  in["model.layers.0.mlp.up_proj"] = q2->qlinear;
  QuantSpec s3;
  s3.bits = 3;
  s3.group_size = -1;
  s3.sym = false;
  s3.mse_clip = true;
  auto q3 = rtn_quantize(w3, s3);
  ASSERT_TRUE(q3.is_ok());
  in["model.layers.1.mlp.down_proj"] = *q3;

  auto ref = store.write_qlinears("jobs/j/calibrate-0000/a1/qlinears.safetensors", in);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  auto out = store.read_qlinears(*ref);
  ASSERT_TRUE(out.is_ok()) << out.status().to_string();
  ASSERT_EQ(out->size(), in.size());
  for (const auto& [name, a] : in) {
    SCOPED_TRACE(name);
    const QuantizedLinear& b = out->at(name);
    EXPECT_EQ(a.out_features, b.out_features);
    EXPECT_EQ(a.in_features, b.in_features);
    EXPECT_EQ(a.spec.bits, b.spec.bits);
    EXPECT_EQ(a.spec.group_size, b.spec.group_size);
    EXPECT_EQ(a.spec.sym, b.spec.sym);
    EXPECT_EQ(a.spec.mse_clip, b.spec.mse_clip);
    EXPECT_EQ(a.act_order, b.act_order);
    EXPECT_EQ(a.q, b.q);
    EXPECT_EQ(a.zeros, b.zeros);
    EXPECT_EQ(a.g_idx, b.g_idx);
    ASSERT_EQ(a.scales.size(), b.scales.size());
    EXPECT_EQ(0, std::memcmp(a.scales.data(), b.scales.data(), a.scales.size() * sizeof(float)));
    Tensor da = a.dequantize(), db = b.dequantize();
    EXPECT_EQ(0, std::memcmp(da.ptr(), db.ptr(), da.data.size() * sizeof(float)));
  }
  // Deterministic bytes: the same map writes the same file.
  auto ref2 = store.write_qlinears("jobs/j/calibrate-0000/a2/qlinears.safetensors", in);
  ASSERT_TRUE(ref2.is_ok());
  EXPECT_EQ(ref2->sha256, ref->sha256);
}

TEST_F(Artifacts, ActivationsRoundTripExact) {
  ArtifactStore store(root_);
  Tensor x = random({3 * 17, 24}, 9);
  x.data[5] = -0.0f;
  x.data[6] = 1e-40f;  // subnormal survives
  auto ref = store.write_activations("jobs/j/capture/a1/x.safetensors", x, 17);
  ASSERT_TRUE(ref.is_ok()) << ref.status().to_string();
  auto a = store.read_activations(*ref);
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  EXPECT_EQ(a->seqlen, 17);
  EXPECT_EQ(a->num_sequences(), 3);
  EXPECT_EQ(a->x.shape, x.shape);
  EXPECT_EQ(0, std::memcmp(a->x.ptr(), x.ptr(), x.data.size() * sizeof(float)));
  EXPECT_TRUE(std::signbit(a->x.data[5]));
  // Rows must be whole sequences.
  EXPECT_EQ(store.write_activations("y.safetensors", x, 5).status().code(), Code::kInvalidInput);
}

TEST_F(Artifacts, ChecksumMismatchIsCorruptWithBothHashes) {
  ArtifactStore store(root_);
  Tensor x = random({4 * 8, 16}, 5);
  auto ref = store.write_activations("jobs/j/capture/a1/x.safetensors", x, 8);
  ASSERT_TRUE(ref.is_ok());
  EXPECT_TRUE(store.verify(*ref).is_ok());
  const std::string path = store.absolute(ref->path);
  flip_byte(path, ref->bytes - 3);  // inside the data
  auto now = sha256_file(path);
  ASSERT_TRUE(now.is_ok());
  ASSERT_NE(now->sha256, ref->sha256);

  Status v = store.verify(*ref);
  EXPECT_EQ(v.code(), Code::kCorrupt);
  EXPECT_NE(v.message().find(path), std::string::npos) << v.message();
  EXPECT_NE(v.message().find(ref->sha256), std::string::npos) << v.message();
  EXPECT_NE(v.message().find(now->sha256), std::string::npos) << v.message();
  auto r = store.read_activations(*ref);
  EXPECT_EQ(r.status().code(), Code::kCorrupt);
  EXPECT_EQ(r.status().message(), v.message());

  // Same for a blob and for qlinears.
  auto b = store.write_blob("b.bin", "hello world");
  ASSERT_TRUE(b.is_ok());
  flip_byte(store.absolute("b.bin"), 0);
  EXPECT_EQ(store.read_blob(*b).status().code(), Code::kCorrupt);
}

TEST_F(Artifacts, TruncatedAndMissingAreCorrupt) {
  ArtifactStore store(root_);
  std::map<std::string, QuantizedLinear> q;
  QuantSpec s;
  s.group_size = 8;
  q["m.layers.0.x"] = *rtn_quantize(random({8, 32}, 6), s);
  auto ref = store.write_qlinears("q.safetensors", q);
  ASSERT_TRUE(ref.is_ok());
  const std::string path = store.absolute(ref->path);
  fs::resize_file(path, ref->bytes - 10);
  Status v = store.verify(*ref);
  EXPECT_EQ(v.code(), Code::kCorrupt);
  EXPECT_NE(v.message().find("truncated"), std::string::npos) << v.message();
  EXPECT_NE(v.message().find(std::to_string(ref->bytes - 10)), std::string::npos);
  EXPECT_EQ(store.read_qlinears(*ref).status().code(), Code::kCorrupt);
  fs::remove(path);
  v = store.verify(*ref);
  EXPECT_EQ(v.code(), Code::kCorrupt);
  EXPECT_NE(v.message().find("missing"), std::string::npos) << v.message();
}

TEST_F(Artifacts, FailedWriteLeavesNothing) {
  ArtifactStore store(root_);
  // A good artifact already in place must survive a failed rewrite untouched.
  Tensor x = random({2 * 4, 8}, 7);
  auto good = store.write_activations("jobs/j/t/a1/x.safetensors", x, 4);
  ASSERT_TRUE(good.is_ok());
  const auto before = files();

  int calls = 0;
  store.set_fault_hook([&](const std::string& path) {
    ++calls;
    // At this point the bytes exist only under a temporary name.
    EXPECT_FALSE(path_exists(path) && path.find("a2") != std::string::npos);
    return io_error(path + ": injected crash before rename");
  });
  auto r1 = store.write_activations("jobs/j/t/a2/x.safetensors", x, 4);
  EXPECT_EQ(r1.status().code(), Code::kIoError);
  std::map<std::string, QuantizedLinear> q;
  QuantSpec s;
  s.group_size = 8;
  q["m.x"] = *rtn_quantize(random({8, 32}, 8), s);
  auto r2 = store.write_qlinears("jobs/j/t/a2/q.safetensors", q);
  EXPECT_EQ(r2.status().code(), Code::kIoError);
  auto r3 = store.write_blob("jobs/j/t/a2/b.bin", "payload");
  EXPECT_EQ(r3.status().code(), Code::kIoError);
  // Overwriting an existing artifact: the old file stays as it was.
  auto r4 = store.write_activations("jobs/j/t/a1/x.safetensors", random({2 * 4, 8}, 99), 4);
  EXPECT_EQ(r4.status().code(), Code::kIoError);
  EXPECT_EQ(calls, 4);

  EXPECT_EQ(files(), before);  // no partial file, no temporary left behind
  EXPECT_TRUE(store.verify(*good).is_ok());
  store.set_fault_hook(nullptr);
  EXPECT_TRUE(store.write_activations("jobs/j/t/a2/x.safetensors", x, 4).is_ok());
}

TEST_F(Artifacts, UnknownFormatVersionRefused) {
  ArtifactStore store(root_);
  // A hand-made v2 activations file, recorded with its true checksum.
  const std::string rel = "v2.safetensors";
  {
    SafetensorsWriter w(store.absolute(rel));
    w.set_metadata("qcal.format", kActivationsFormat);
    w.set_metadata("qcal.version", "2");
    w.set_metadata("qcal.seqlen", "2");
    w.add("x", DType::kF32, {4, 2});
    ASSERT_TRUE(w.begin().is_ok());
    std::vector<float> v(8, 1.0f);
    ASSERT_TRUE(w.write_f32(v.data(), v.size()).is_ok());
    ASSERT_TRUE(w.finish().is_ok());
  }
  auto d = sha256_file(store.absolute(rel));
  ASSERT_TRUE(d.is_ok());
  ArtifactRef ref{rel, d->sha256, d->bytes};
  auto r = store.read_activations(ref);
  EXPECT_EQ(r.status().code(), Code::kInvalidInput);
  EXPECT_NE(r.status().message().find("version 2"), std::string::npos) << r.status().message();
  // The wrong kind of artifact is refused by its magic.
  auto q = store.read_qlinears(ref);
  EXPECT_EQ(q.status().code(), Code::kCorrupt);
  EXPECT_NE(q.status().message().find("not a qcal.qlinears"), std::string::npos);
}

}  // namespace
}  // namespace qcal

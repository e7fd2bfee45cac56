// Peak resident memory of the checkpoint writers: the whole-model writers
// (every quantized linear / the whole NativeModel in memory, as their callers
// must hold them) against the streaming ones (one linear / one layer at a
// time, produced on demand). Each run is one process; the source model is a
// `qcal synth` checkpoint (BF16) created under DIR on first use.
//
// Usage: bench_writers gptq|native map|stream DIR [H L V]
//   defaults H 1024, L 8, V 32000 (intermediate 2.75·H rounded to 256,
//   16 query / 4 KV heads); weights 4-bit, group 128.
// Prints the resident set before the write (after building the inputs) and
// its peak during the write (VmHWM after /proc/self/clear_refs "5"), in MiB.
// Letters: H hidden, L layers, V vocab, O/I out/in features.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "common/fsutil.h"
#include "common/model_dir.h"
#include "common/rng.h"
#include "kernels/qgemm.h"
#include "worker/calib/native.h"
#include "worker/engine/qformats.h"
#include "worker/engine/synth.h"

namespace {

using qcal::Status;

// VmRSS / VmHWM of this process, MiB.
double proc_mib(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(in, line))
    if (line.compare(0, n, key) == 0) return std::atof(line.c_str() + n + 1) / 1024.0;
  return -1;
}

void reset_peak() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
}

uint64_t name_seed(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 0x100000001b3ull;
  return h;
}

// A consistent 4-bit g128 symmetric linear of its own stream.
qcal::QuantizedLinear make_linear(int64_t O, int64_t I, const std::string& name) {
  qcal::Rng rng(name_seed(name));
  qcal::QuantizedLinear q;
  q.out_features = O;
  q.in_features = I;
  q.spec = qcal::QuantSpec{4, 128, true};
  const int64_t G = (I + 127) / 128;
  q.q.resize(static_cast<size_t>(O * I));
  for (auto& c : q.q) c = static_cast<uint8_t>(rng.below(16));
  q.scales.assign(static_cast<size_t>(G * O), 0.0078125f);
  q.zeros.assign(static_cast<size_t>(G * O), 8);
  q.g_idx.resize(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) q.g_idx[i] = static_cast<int32_t>(i / 128);
  return q;
}

// Rows [r0, r0 + n) of a (·, cols) fp32 tensor, each row from its own stream.
Status fill_rows(const std::string& name, int64_t cols, int64_t r0, int64_t n, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    qcal::Rng rng(name_seed(name) ^ static_cast<uint64_t>(r0 + r));
    for (int64_t j = 0; j < cols; ++j)
      out[r * cols + j] = static_cast<float>(0.02 * (rng.uniform() - 0.5));
  }
  return Status::ok();
}

qcal::calib::NativeLayer make_layer(const qcal::ModelConfig& c, int64_t l) {
  qcal::calib::NativeLayer y;
  y.input_norm.assign(static_cast<size_t>(c.hidden_size), 1.0f);
  y.post_norm = y.input_norm;
  for (int p = 0; p < qcal::calib::kNumProj; ++p) {
    const int64_t out = qcal::calib::proj_out(c, p), in = qcal::calib::proj_in(c, p);
    qcal::Rng rng(name_seed(qcal::layer_prefix(l) + qcal::kProjNames[p]));
    std::vector<int8_t> codes(static_cast<size_t>(out * in));
    for (auto& x : codes) x = static_cast<int8_t>(static_cast<int>(rng.below(16)) - 8);
    const std::vector<float> scales(static_cast<size_t>(out * ((in + 127) / 128)), 0.01f);
    y.qw[p] = qcal::pack_weight(codes.data(), scales.data(), out, in, 4, 128);
  }
  return y;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 7) {
    std::fprintf(stderr, "usage: %s gptq|native map|stream DIR [H L V]\n", argv[0]);
    return 2;
  }
  const std::string kind = argv[1], mode = argv[2], dir = argv[3];
  const bool stream = mode == "stream";
  qcal::ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = argc == 7 ? std::atoll(argv[4]) : 1024;
  c.num_hidden_layers = argc == 7 ? std::atoll(argv[5]) : 8;
  c.vocab_size = argc == 7 ? std::atoll(argv[6]) : 32000;
  c.intermediate_size = (c.hidden_size * 11 / 4 + 255) / 256 * 256;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 4;
  c.head_dim = c.hidden_size / 16;
  c.torch_dtype = qcal::DType::kBF16;
  const std::string tag = std::to_string(c.hidden_size) + "_" +
                          std::to_string(c.num_hidden_layers) + "_" + std::to_string(c.vocab_size);
  const std::string out = dir + "/out_" + kind + "_" + mode + "_" + tag;
  std::filesystem::remove_all(out);
  auto t0 = std::chrono::steady_clock::now();
  Status st;
  double before = 0;
  if (kind == "gptq") {
    const std::string src_dir = dir + "/src_" + tag;
    if (!qcal::path_exists(src_dir)) {
      qcal::SynthOptions so;
      so.config = c;
      Status s = qcal::synth_model(so, src_dir);
      if (!s.is_ok()) return std::fprintf(stderr, "%s\n", s.to_string().c_str()), 1;
    }
    auto src = qcal::ModelDir::open(src_dir);
    if (!src.is_ok()) return std::fprintf(stderr, "%s\n", src.status().to_string().c_str()), 1;
    std::map<std::string, std::vector<int64_t>> shapes;
    for (int64_t l = 0; l < c.num_hidden_layers; ++l)
      for (const char* p : qcal::kProjNames)
        shapes[qcal::layer_prefix(l) + p] = qcal::proj_shape(c, p);
    if (stream) {
      qcal::CheckpointStream in;
      for (const auto& [name, s] : shapes)
        in.linears[name] = qcal::LinearDecl{s[0], s[1], qcal::QuantSpec{4, 128, true}, false};
      in.provide = [&](const std::string& name) -> qcal::Result<qcal::QuantizedLinear> {
        return make_linear(shapes[name][0], shapes[name][1], name);
      };
      before = proc_mib("VmRSS:");
      reset_peak();
      t0 = std::chrono::steady_clock::now();
      st = qcal::stream_quantized_checkpoint(**src, in, {}, out);
    } else {
      std::map<std::string, qcal::QuantizedLinear> all;
      for (const auto& [name, s] : shapes) all[name] = make_linear(s[0], s[1], name);
      before = proc_mib("VmRSS:");
      reset_peak();
      t0 = std::chrono::steady_clock::now();
      st = qcal::write_quantized_checkpoint(**src, all, {}, out);
    }
  } else {
    qcal::calib::NativeModel m;
    m.config = c;
    m.w_bits = 4;
    m.w_group = 128;
    const int64_t H = c.hidden_size, V = c.vocab_size;
    if (stream) {
      m.layers.resize(static_cast<size_t>(c.num_hidden_layers));  // for the declaration only
      qcal::calib::NativeSource src;
      src.embed = [H](int64_t r0, int64_t n, float* out) {
        return fill_rows("embed", H, r0, n, out);
      };
      src.layer = [&c](int64_t l) -> qcal::Result<qcal::calib::NativeLayer> {
        return make_layer(c, l);
      };
      src.final_norm = [](int64_t, int64_t n, float* out) {
        std::fill(out, out + n, 1.0f);
        return Status::ok();
      };
      src.lm_head = [H](int64_t r0, int64_t n, float* out) {
        return fill_rows("lm_head", H, r0, n, out);
      };
      before = proc_mib("VmRSS:");
      reset_peak();
      t0 = std::chrono::steady_clock::now();
      st = qcal::calib::stream_native(qcal::calib::native_decl(m), src, out, false);
    } else {
      m.embed.resize(static_cast<size_t>(V * H));
      m.lm_head.resize(static_cast<size_t>(V * H));
      (void)fill_rows("embed", H, 0, V, m.embed.data());
      (void)fill_rows("lm_head", H, 0, V, m.lm_head.data());
      m.final_norm.assign(static_cast<size_t>(H), 1.0f);
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) m.layers.push_back(make_layer(c, l));
      before = proc_mib("VmRSS:");
      reset_peak();
      t0 = std::chrono::steady_clock::now();
      st = qcal::calib::write_native(m, out, false);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!st.is_ok()) return std::fprintf(stderr, "%s\n", st.to_string().c_str()), 1;
  std::printf(
      "%s %s H %lld L %lld V %lld: RSS before write %.1f MiB, peak during write %.1f MiB, "
      "%.2f s\n",
      kind.c_str(), mode.c_str(), static_cast<long long>(c.hidden_size),
      static_cast<long long>(c.num_hidden_layers), static_cast<long long>(c.vocab_size), before,
      proc_mib("VmHWM:"), secs);
  std::filesystem::remove_all(out);
  return 0;
}

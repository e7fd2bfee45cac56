// Small helpers shared by the unit tests (header-only; each test binary is
// standalone).
#pragma once

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common/model_config.h"

namespace qcal::testing {

// A line "VmRSS:  1234 kB" of /proc/self/status, in bytes (0 if absent).
inline uint64_t proc_status_bytes(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream s(line.substr(key.size() + 1));
      uint64_t kb = 0;
      s >> kb;
      return kb * 1024;
    }
  return 0;
}

// A fresh temporary directory `<tmp>/<prefix>XXXXXX`, removed with its
// contents at scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "qcal_") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "XXXXXX")).string();
    if (!::mkdtemp(tmpl.data())) std::abort();
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // A path inside the directory.
  std::string file(const std::string& name) const {
    return (std::filesystem::path(path_) / name).string();
  }
  std::string sub(const std::string& name) const { return file(name); }

 private:
  std::string path_;
};

// The small LLaMA shape most unit tests use: hidden 64, 4 query / 2 KV heads of
// dim 16, RMSNorm eps 1e-5, with the given MLP width, vocabulary and depth
// (everything else at ModelConfig's defaults).
inline ModelConfig small_config(int64_t intermediate, int64_t vocab, int64_t layers = 2) {
  ModelConfig c;
  c.hidden_size = 64;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = vocab;
  c.rms_norm_eps = 1e-5;
  return c;
}

// Mean KL(P_ref ‖ P_q) over every row of two (rows, V) logit matrices, nats
// (NaN-safe: a NaN or a size mismatch gives +inf).
inline double mean_kl(const std::vector<float>& q, const std::vector<float>& ref, int64_t V) {
  if (q.size() != ref.size()) return std::numeric_limits<double>::infinity();
  const int64_t rows = static_cast<int64_t>(ref.size()) / V;
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = ref.data() + r * V;
    const float* b = q.data() + r * V;
    double ma = *std::max_element(a, a + V), mb = *std::max_element(b, b + V), sa = 0, sb = 0;
    for (int64_t i = 0; i < V; ++i) {
      sa += std::exp(a[i] - ma);
      sb += std::exp(b[i] - mb);
    }
    const double la = ma + std::log(sa), lb = mb + std::log(sb);
    double kl = 0;
    for (int64_t i = 0; i < V; ++i) {
      const double lpa = a[i] - la, lpb = b[i] - lb;
      kl += std::exp(lpa) * (lpa - lpb);
    }
    total += kl;
  }
  const double m = total / static_cast<double>(rows);
  return std::isnan(m) ? std::numeric_limits<double>::infinity() : m;
}

}  // namespace qcal::testing

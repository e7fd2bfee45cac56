// `qcal synth-grammar`, `qcal train-lm`, `qcal inject-outliers`, `qcal sinks`
// (cmd_train.h).
//
// train-lm: a LLaMA of the given shape, initialized N(0, 0.02²) (o/down
// projections ÷ sqrt(2L), norms 1) from --seed, trained on random batches of
// --batch sequences (shuffled epochs over the file) with fp32 AdamW
// (decoupled weight decay on matrices only), a linear warmup then cosine
// decay of the learning rate to --min-lr-ratio · --lr, and global gradient
// norm clipping. The loss and every gradient are checked for finiteness at
// every step. Letters: B sequences per batch, T tokens per sequence.
#include "api/cmd_train.h"

#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "api/cli_util.h"
#include "common/data.h"
#include "common/flags.h"
#include "common/fsutil.h"
#include "common/model_config.h"
#include "common/rng.h"
#include "kernels/gemm.h"
#include "worker/calib/fp_model.h"
#include "worker/calib/grammar.h"
#include "worker/calib/intactkv.h"
#include "worker/engine/model.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// User + system CPU time of this process so far (all threads).
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * t.tv_usec; };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// ---------------------------------------------------------------- model init

constexpr double kInitStd = 0.02;

void fill_normal(Rng& rng, std::vector<float>* v, size_t n, double sd) {
  v->resize(n);
  for (float& x : *v) x = static_cast<float>(sd * rng.normal());
}

// A fresh model: one stream from `seed` over the tensors in model order.
calib::FpModel init_model(const ModelConfig& c, uint64_t seed) {
  Rng rng(seed ^ 0x747261696e6c6dull);  // "trainlm"
  const size_t H = static_cast<size_t>(c.hidden_size), V = static_cast<size_t>(c.vocab_size);
  const double depth = 1.0 / std::sqrt(2.0 * static_cast<double>(c.num_hidden_layers));
  calib::FpModel m;
  m.config = c;
  fill_normal(rng, &m.embed, V * H, kInitStd);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    calib::BlockWeightsT<float> w;
    w.input_norm.assign(H, 1.0f);
    w.post_norm.assign(H, 1.0f);
    for (int j = 0; j < calib::kNumProj; ++j) {
      const std::vector<int64_t> s = proj_shape(c, kProjNames[j]);
      const bool residual = j == calib::kO || j == calib::kDown;
      fill_normal(rng, &w.w[j], static_cast<size_t>(s[0] * s[1]),
                  residual ? kInitStd * depth : kInitStd);
      if (j < 3 && c.attention_bias) w.bias[j].assign(static_cast<size_t>(s[0]), 0.0f);
    }
    m.layers.push_back(std::move(w));
  }
  m.final_norm.assign(H, 1.0f);
  if (c.tie_word_embeddings) {
    m.lm_head = m.embed;
  } else {
    fill_normal(rng, &m.lm_head, V * H, kInitStd);
  }
  return m;
}

// A planted attention-sink circuit (--sink-init), the mechanism LLMs grow on
// their own after billions of tokens (methods.md §6.1: a massive activation on
// the first token, which every head can then use as a no-op target), built into
// the model so that one trained for minutes has it too:
//   channel kSinkChannel: embed[BOS] holds `massive`, every other token 0;
//   channel kConstChannel: every token but BOS holds `constant`;
//   every query head reads the constant channel into its lowest-frequency RoPE
//   dim (d/2 − 1: the rotation stays below 0.03 rad over 128 positions) and every
//   KV head reads the sink channel into the same dim of its key, so BOS's key
//   scores high against every query, at any distance;
//   V ignores the sink channel (BOS's value is near zero: attending to it is a
//   no-op); the input norms pass both channels at weight 1; no layer writes
//   either channel (rows 0 and 1 of o_proj and down_proj are zero).
// The circuit is fixed: plant_sink runs again after every optimizer step, and
// everything else trains around it (a head that needs its attention elsewhere
// must outscore the sink with content). The defaults are the grammar-sink
// fixture's. Measured while building it (attention mass on BOS by layer, eval
// ppl; the plain fixture: 0.04, 0.02, 0.03, 0.03, ppl 5.08):
//   planted at init only, all trainable: the model reused the two channels as
//     features; 0.49, 0.03, 0.03, 0.04 (ppl 5.17);
//   channels kept reserved, the rest trainable: 0.48, 0.08, 0.04, 0.03 (5.13):
//     the constant channel's share of the normalized input shrinks as the
//     residual stream grows, and weight decay took the planted q/k from 0.7 to
//     0.55 with nothing pushing back;
//   fixed circuit, q/k 0.5 in every layer: 0.82, 0.17, 0.04, 0.05 (4.59);
//   fixed circuit, q/k 0.5·2^l (--sink-growth 2, the default): 0.92, 0.61,
//     0.13, 0.07 (5.13).
constexpr int64_t kSinkChannel = 0, kConstChannel = 1;

struct SinkInit {
  double massive = 4.0;   // embed[BOS][kSinkChannel]
  double constant = 1.0;  // embed[t][kConstChannel], t ≠ BOS
  double qk = 0.5;        // the planted W_q / W_k entries of layer 0
  double growth = 2.0;    // ... times growth^l in layer l (the residual stream grows
                          // with depth, so the constant channel's normalized share shrinks)
};

void plant_sink(calib::FpModel& m, const SinkInit& s) {
  const ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, V = c.vocab_size, d = c.head_dim;
  const int64_t bos = c.bos_token_id;
  for (int64_t t = 0; t < V; ++t) {
    m.embed[static_cast<size_t>(t * H + kSinkChannel)] =
        t == bos ? static_cast<float>(s.massive) : 0.0f;
    m.embed[static_cast<size_t>(t * H + kConstChannel)] =
        t == bos ? 0.0f : static_cast<float>(s.constant);
  }
  const int64_t dim = d / 2 - 1;
  double qk = s.qk;
  for (auto& w : m.layers) {
    for (int64_t ch : {kSinkChannel, kConstChannel}) w.input_norm[static_cast<size_t>(ch)] = 1.0f;
    for (int64_t h = 0; h < c.num_attention_heads; ++h) {
      float* row = w.w[calib::kQ].data() + (h * d + dim) * H;
      row[kConstChannel] = static_cast<float>(qk);
      row[kSinkChannel] = 0.0f;
    }
    for (int64_t h = 0; h < c.num_key_value_heads; ++h) {
      float* row = w.w[calib::kK].data() + (h * d + dim) * H;
      row[kSinkChannel] = static_cast<float>(qk);
      row[kConstChannel] = 0.0f;
    }
    qk *= s.growth;
    for (int64_t r = 0; r < c.num_key_value_heads * d; ++r)
      w.w[calib::kV][static_cast<size_t>(r * H + kSinkChannel)] = 0.0f;
    for (int p : {calib::kO, calib::kDown}) {
      const int64_t in = p == calib::kO ? c.num_attention_heads * d : c.intermediate_size;
      for (int64_t ch : {kSinkChannel, kConstChannel})
        std::fill_n(w.w[p].begin() + ch * in, in, 0.0f);
    }
  }
  if (c.tie_word_embeddings) m.lm_head = m.embed;
}

// ---------------------------------------------------------------- AdamW

// One trainable tensor and its gradient.
struct Param {
  std::vector<float>* p;
  const std::vector<float>* g;
  bool decay;  // matrices: weight decay; norms and biases: none
};

// Every trainable tensor of `m` with its gradient in `g` (sized by a backward).
// Tied models train `embed` only (its gradient already holds the head's part).
std::vector<Param> params(calib::FpModel& m, const calib::FpModelGrads& g) {
  std::vector<Param> out;
  out.push_back({&m.embed, &g.embed, true});
  for (size_t l = 0; l < m.layers.size(); ++l) {
    calib::BlockWeightsT<float>& w = m.layers[l];
    const calib::BlockWeightsT<float>& gw = g.layers[l].w;
    out.push_back({&w.input_norm, &gw.input_norm, false});
    out.push_back({&w.post_norm, &gw.post_norm, false});
    for (int j = 0; j < calib::kNumProj; ++j) out.push_back({&w.w[j], &gw.w[j], true});
    for (int j = 0; j < 3; ++j)
      if (!w.bias[j].empty()) out.push_back({&w.bias[j], &gw.bias[j], false});
  }
  out.push_back({&m.final_norm, &g.final_norm, false});
  if (!m.config.tie_word_embeddings) out.push_back({&m.lm_head, &g.lm_head, true});
  return out;
}

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

// PyTorch AdamW semantics (bias-corrected moments, decoupled decay p ← p − lr·wd·p),
// fp32 moments; `gscale` multiplies every gradient (clipping).
class AdamW {
 public:
  explicit AdamW(AdamWOptions o) : o_(o) {}
  void step(const std::vector<Param>& ps, double lr, double gscale) {
    if (m_.empty()) {
      for (const Param& p : ps) {
        m_.emplace_back(p.p->size(), 0.0f);
        v_.emplace_back(p.p->size(), 0.0f);
      }
    }
    ++t_;
    const double bc1 = 1.0 - std::pow(o_.beta1, static_cast<double>(t_));
    const double bc2 = 1.0 - std::pow(o_.beta2, static_cast<double>(t_));
    const float b1 = static_cast<float>(o_.beta1), b2 = static_cast<float>(o_.beta2);
    const float step = static_cast<float>(lr / bc1);
    const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
    const float eps = static_cast<float>(o_.eps), gs = static_cast<float>(gscale);
    for (size_t i = 0; i < ps.size(); ++i) {
      float* p = ps[i].p->data();
      const float* g = ps[i].g->data();
      float* m = m_[i].data();
      float* v = v_[i].data();
      const float decay = ps[i].decay ? static_cast<float>(1.0 - lr * o_.weight_decay) : 1.0f;
      for (size_t k = 0; k < ps[i].p->size(); ++k) {
        const float gk = g[k] * gs;
        m[k] = b1 * m[k] + (1 - b1) * gk;
        v[k] = b2 * v[k] + (1 - b2) * gk * gk;
        p[k] = p[k] * decay - step * m[k] / (std::sqrt(v[k]) * inv_sqrt_bc2 + eps);
      }
    }
  }

 private:
  AdamWOptions o_;
  std::vector<std::vector<float>> m_, v_;
  int64_t t_ = 0;
};

// Linear warmup over `warmup` steps, then cosine from `peak` to `floor` at `total`.
double schedule(int64_t step, int64_t total, int64_t warmup, double peak, double floor) {
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(total - warmup, 1));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  return floor + (peak - floor) * 0.5 * (1.0 + std::cos(3.141592653589793 * progress));
}

// Mean next-token NLL of every sequence of `data`, `batch` at a time.
double mean_nll(const calib::FpModel& m, const TokenSequences& data, int64_t batch) {
  double sum = 0;
  int64_t n = 0;
  for (int64_t s = 0; s < data.count(); s += batch) {
    const int64_t b = std::min(batch, data.count() - s);
    sum += calib::fp_model_loss(m, data.seq(s), b, data.seqlen, nullptr) * static_cast<double>(b);
    n += b;
  }
  return n ? sum / static_cast<double>(n) : NAN;
}

// ---------------------------------------------------------------- synth-grammar

std::vector<FlagSpec> synth_grammar_flags() {
  return {
      {"out", "FILE", "", "where to write the tokens (.u32; required)", ""},
      {"tokens", "N", "", "about N tokens: N / --seqlen sequences", ""},
      {"sequences", "N", "", "N sequences (give exactly one of --tokens and --sequences)", ""},
      {"seqlen", "N", "128", "tokens per sequence", ""},
      {"seed", "N", "1", "generator seed", ""},
      {"json", "", "", "print the summary as JSON", ""},
  };
}

int cmd_synth_grammar(const Flags& f) {
  const std::string cmd = "synth-grammar";
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 128));
  CLI_ASSIGN(cmd, int64_t tokens, f.integer("tokens", 0));
  CLI_ASSIGN(cmd, int64_t count, f.integer("sequences", 0));
  CLI_ASSIGN(cmd, int64_t seed, f.integer("seed", 1));
  if (seqlen < 2) return cli_fail(cmd, invalid_input("--seqlen must be ≥ 2"));
  if ((tokens > 0) == (count > 0))
    return cli_fail(cmd,
                    invalid_input("give exactly one of --tokens N and --sequences N (positive)"));
  if (count == 0) count = tokens / seqlen;
  if (count < 1)
    return cli_fail(
        cmd, invalid_input("--tokens " + std::to_string(tokens) +
                           " is less than one sequence of --seqlen " + std::to_string(seqlen)));
  calib::GrammarStats st;
  const std::vector<int32_t> toks =
      calib::grammar_sequences(count, seqlen, static_cast<uint64_t>(seed), &st);
  CLI_TRY(cmd, calib::write_tokens_u32(out, toks));
  if (f.flag("json")) {
    nlohmann::json j = {{"out", out},
                        {"sequences", st.sequences},
                        {"seqlen", seqlen},
                        {"tokens", st.tokens},
                        {"vocab", calib::kGrammarVocab},
                        {"optimal_nll", st.optimal_nll},
                        {"optimal_ppl", st.optimal_ppl}};
    std::cout << j.dump() << std::endl;
  } else {
    std::printf("wrote %s: %lld sequences x %lld tokens, vocab %d; generator NLL %.4f (ppl %.3f)\n",
                out.c_str(), static_cast<long long>(st.sequences), static_cast<long long>(seqlen),
                calib::kGrammarVocab, st.optimal_nll, st.optimal_ppl);
  }
  return 0;
}

// ---------------------------------------------------------------- train-lm

std::vector<FlagSpec> train_lm_flags() {
  const std::string io = "Data and output", train = "Training (AdamW, warmup then cosine)",
                    shape = "Model shape", sink = "Attention-sink circuit";
  const SinkInit si;
  const AdamWOptions ao;
  auto g = [](double x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", x);
    return std::string(buf);
  };
  return {
      {"data", "FILE", "", "training tokens (.u32 or .jsonl; required)", io},
      {"eval", "FILE", "", "held-out tokens: eval NLL at the end (and every --eval-every)", io},
      {"out", "DIR", "", "where to write the trained model (required)", io},
      {"overwrite", "", "", "replace an existing --out", io},
      {"report", "FILE", "", "also write the loss history and timings as JSON", io},
      {"log-every", "N", "25", "print the mean loss every N steps", io},
      {"eval-every", "N", "0 = at the end only", "evaluate on --eval every N steps", io},
      {"seqlen", "N", "128", "tokens per sequence", train},
      {"steps", "N", "1000", "optimizer steps", train},
      {"batch", "N", "16", "sequences per step", train},
      {"lr", "X", "3e-3", "peak learning rate", train},
      {"min-lr-ratio", "X", "0.1", "final learning rate as a fraction of --lr", train},
      {"warmup", "N", "50", "linear warmup steps", train},
      {"weight-decay", "X", g(ao.weight_decay), "decoupled weight decay (matrices only)", train},
      {"beta1", "X", g(ao.beta1), "AdamW β1", train},
      {"beta2", "X", g(ao.beta2), "AdamW β2", train},
      {"clip", "X", "1", "global gradient norm clipping; 0 = off", train},
      {"seed", "N", "1", "seed of the initialization and the batches", train},
      {"layers", "N", "4", "decoder layers", shape},
      {"hidden", "N", "128", "hidden size", shape},
      {"intermediate", "N", "384", "MLP intermediate size", shape},
      {"heads", "N", "4", "attention heads", shape},
      {"kv-heads", "N", "2", "key/value heads", shape},
      {"head-dim", "N", "hidden / heads", "dimension of one head", shape},
      {"vocab", "N", std::to_string(calib::kGrammarVocab), "vocabulary size", shape},
      {"rope-theta", "X", "10000", "RoPE base", shape},
      {"dtype", "NAME", "bfloat16", "float32, float16 or bfloat16: the stored weights' type",
       shape},
      {"tie", "", "", "tie the embedding and lm_head", shape},
      {"sink-init", "", "",
       "plant a fixed attention-sink circuit (a massive activation on BOS that every head can "
       "attend to) and train around it",
       sink},
      {"sink-massive", "X", g(si.massive), "BOS's value in the sink channel", sink},
      {"sink-constant", "X", g(si.constant), "every other token's value in the constant channel",
       sink},
      {"sink-qk", "X", g(si.qk), "the planted query/key weight of layer 0", sink},
      {"sink-growth", "X", g(si.growth), "... times this per layer", sink},
  };
}

int cmd_train_lm(const Flags& f) {
  const std::string cmd = "train-lm";
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  CLI_ASSIGN(cmd, std::string data_path, f.required("data"));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 128));
  CLI_ASSIGN(cmd, int64_t steps, f.integer("steps", 1000));
  CLI_ASSIGN(cmd, int64_t batch, f.integer("batch", 16));
  CLI_ASSIGN(cmd, double lr, f.number("lr", 3e-3));
  CLI_ASSIGN(cmd, double min_lr_ratio, f.number("min-lr-ratio", 0.1));
  CLI_ASSIGN(cmd, int64_t warmup, f.integer("warmup", 50));
  CLI_ASSIGN(cmd, double clip, f.number("clip", 1.0));
  CLI_ASSIGN(cmd, int64_t seed, f.integer("seed", 1));
  CLI_ASSIGN(cmd, int64_t log_every, f.integer("log-every", 25));
  CLI_ASSIGN(cmd, int64_t eval_every, f.integer("eval-every", 0));
  AdamWOptions ao;
  CLI_ASSIGN(cmd, ao.weight_decay, f.number("weight-decay", 0.1));
  CLI_ASSIGN(cmd, ao.beta1, f.number("beta1", 0.9));
  CLI_ASSIGN(cmd, ao.beta2, f.number("beta2", 0.95));
  ModelConfig c;
  c.model_type = "llama";
  CLI_ASSIGN(cmd, c.num_hidden_layers, f.integer("layers", 4));
  CLI_ASSIGN(cmd, c.hidden_size, f.integer("hidden", 128));
  CLI_ASSIGN(cmd, c.intermediate_size, f.integer("intermediate", 384));
  CLI_ASSIGN(cmd, c.num_attention_heads, f.integer("heads", 4));
  CLI_ASSIGN(cmd, c.num_key_value_heads, f.integer("kv-heads", 2));
  CLI_ASSIGN(
      cmd, c.head_dim,
      f.integer("head-dim", c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0));
  CLI_ASSIGN(cmd, c.vocab_size, f.integer("vocab", calib::kGrammarVocab));
  CLI_ASSIGN(cmd, c.rope_theta, f.number("rope-theta", 10000.0));
  c.max_position_embeddings = std::max<int64_t>(seqlen, 2048);
  c.tie_word_embeddings = f.flag("tie");
  c.bos_token_id = calib::kGrammarBos;
  c.eos_token_id = calib::kGrammarEos;
  auto dt = dtype_from_torch_name(f.str("dtype", "bfloat16"));
  if (!dt) return cli_fail(cmd, invalid_input("--dtype must be float32, float16 or bfloat16"));
  c.torch_dtype = *dt;
  if (seqlen < 2 || steps < 1 || batch < 1 || warmup < 0 || log_every < 1 || eval_every < 0)
    return cli_fail(cmd, invalid_input("--seqlen ≥ 2, --steps ≥ 1, --batch ≥ 1, --warmup ≥ 0, "
                                       "--log-every ≥ 1 and --eval-every ≥ 0 are required"));
  if (!(lr > 0) || !std::isfinite(lr) || !(min_lr_ratio >= 0 && min_lr_ratio <= 1) ||
      !(clip >= 0) || !(ao.weight_decay >= 0) || !(ao.beta1 >= 0 && ao.beta1 < 1) ||
      !(ao.beta2 >= 0 && ao.beta2 < 1))
    return cli_fail(cmd, invalid_input("--lr > 0, --min-lr-ratio in [0, 1], --clip ≥ 0, "
                                       "--weight-decay ≥ 0 and betas in [0, 1) are required"));
  CLI_ASSIGN(cmd, ModelConfig checked, parse_model_config(c.to_json(), "--flags"));
  c = checked;
  if (path_exists(out) && !f.flag("overwrite"))
    return cli_fail(cmd, invalid_input(out + ": output exists (pass --overwrite to replace it)"));
  CLI_ASSIGN(cmd, TokenSequences data, load_token_sequences(data_path, seqlen, c.vocab_size));
  TokenSequences eval;
  if (f.has("eval")) {
    CLI_ASSIGN(cmd, eval, load_token_sequences(f.str("eval"), seqlen, c.vocab_size));
  }

  // Every step allocates and frees the same ~100 MB of activations and tapes;
  // keeping them in the heap instead of returning them to the kernel saves
  // ~25k page faults (~20% of the time) per step.
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  calib::FpModel m = init_model(c, static_cast<uint64_t>(seed));
  const bool sink = f.flag("sink-init");
  SinkInit si;
  if (sink) {
    CLI_ASSIGN(cmd, si.massive, f.number("sink-massive", si.massive));
    CLI_ASSIGN(cmd, si.constant, f.number("sink-constant", si.constant));
    CLI_ASSIGN(cmd, si.qk, f.number("sink-qk", si.qk));
    CLI_ASSIGN(cmd, si.growth, f.number("sink-growth", si.growth));
    if (c.hidden_size < 2 || c.head_dim < 2 || c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size)
      return cli_fail(cmd, invalid_input("--sink-init needs hidden ≥ 2, head dim ≥ 2 and a BOS id "
                                         "inside the vocabulary"));
    plant_sink(m, si);
  } else {
    for (const char* k : {"sink-massive", "sink-constant", "sink-qk", "sink-growth"})
      if (f.has(k))
        return cli_fail(cmd, invalid_input(std::string("--") + k + " needs --sink-init"));
  }
  std::printf(
      "train-lm: %lld parameters (%lld layers, hidden %lld, intermediate %lld, heads "
      "%lld/%lld, vocab %lld); %lld training sequences of %lld; %lld steps x %lld "
      "sequences; %d threads\n",
      static_cast<long long>(c.num_parameters()), static_cast<long long>(c.num_hidden_layers),
      static_cast<long long>(c.hidden_size), static_cast<long long>(c.intermediate_size),
      static_cast<long long>(c.num_attention_heads), static_cast<long long>(c.num_key_value_heads),
      static_cast<long long>(c.vocab_size), static_cast<long long>(data.count()),
      static_cast<long long>(seqlen), static_cast<long long>(steps), static_cast<long long>(batch),
      blas_threads());
  std::fflush(stdout);

  AdamW opt(ao);
  Rng rng(static_cast<uint64_t>(seed) ^ 0x626174636865ull);  // "batche"
  std::vector<int64_t> order(static_cast<size_t>(data.count()));
  size_t cursor = order.size();  // forces a shuffle before the first batch
  std::vector<int32_t> tokens(static_cast<size_t>(batch * seqlen));  // (B, T)
  const auto t0 = std::chrono::steady_clock::now();
  const double cpu0 = cpu_seconds();
  double window_loss = 0, last_loss = NAN, last_eval = NAN;
  int64_t window_n = 0;
  nlohmann::json history = nlohmann::json::array();
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t b = 0; b < batch; ++b) {
      if (cursor == order.size()) {  // a new epoch: Fisher-Yates shuffle
        for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
        cursor = 0;
      }
      std::copy_n(data.seq(order[cursor++]), seqlen, tokens.data() + b * seqlen);
    }
    calib::FpModelGrads g;
    const double loss = calib::fp_model_loss(m, tokens.data(), batch, seqlen, &g);
    const std::vector<Param> ps = params(m, g);
    double sq = 0;
    for (const Param& p : ps) {
      if (p.g->size() != p.p->size())
        return cli_fail(cmd, internal_error("step " + std::to_string(step + 1) +
                                            ": a gradient has the wrong size"));
      for (float x : *p.g) sq += static_cast<double>(x) * x;
    }
    const double gnorm = std::sqrt(sq);
    if (!std::isfinite(loss) || !std::isfinite(gnorm))
      return cli_fail(cmd, internal_error("training diverged at step " + std::to_string(step + 1) +
                                          ": loss " + std::to_string(loss) + ", gradient norm " +
                                          std::to_string(gnorm) + " (lower --lr?)"));
    const double rate = schedule(step, steps, warmup, lr, lr * min_lr_ratio);
    opt.step(ps, rate, clip > 0 && gnorm > clip ? clip / gnorm : 1.0);
    if (sink) plant_sink(m, si);
    if (c.tie_word_embeddings) m.lm_head = m.embed;
    window_loss += loss;
    ++window_n;
    last_loss = loss;
    const bool last = step + 1 == steps;
    const bool do_eval =
        !eval.tokens.empty() && (last || (eval_every > 0 && (step + 1) % eval_every == 0));
    if (do_eval) last_eval = mean_nll(m, eval, batch);
    if ((step + 1) % log_every == 0 || last || do_eval) {
      const double secs = seconds_since(t0);
      const double mean = window_loss / static_cast<double>(window_n);
      std::printf("step %5lld/%lld  loss %.4f  lr %.2e  gnorm %.3f  %.1f s  %.0f tok/s",
                  static_cast<long long>(step + 1), static_cast<long long>(steps), mean, rate,
                  gnorm, secs,
                  static_cast<double>((step + 1) * batch * seqlen) / std::max(secs, 1e-9));
      if (do_eval) std::printf("  eval nll %.4f ppl %.3f", last_eval, std::exp(last_eval));
      std::printf("\n");
      std::fflush(stdout);
      nlohmann::json h = {{"step", step + 1}, {"loss", mean}, {"lr", rate}, {"seconds", secs}};
      if (do_eval) h["eval_nll"] = last_eval;
      history.push_back(h);
      window_loss = 0;
      window_n = 0;
    }
  }
  const double train_seconds = seconds_since(t0), train_cpu = cpu_seconds() - cpu0;
  CLI_TRY(cmd, calib::write_fp_model(m, out, f.flag("overwrite")));
  std::printf("wrote %s (%s) after %lld steps in %.1f s (%.1f CPU s): last batch loss %.4f",
              out.c_str(), torch_dtype_name(c.torch_dtype), static_cast<long long>(steps),
              train_seconds, train_cpu, last_loss);
  if (!std::isnan(last_eval))
    std::printf(", eval nll %.4f ppl %.3f (fp32 weights)", last_eval, std::exp(last_eval));
  std::printf("\n");
  if (f.has("report")) {
    nlohmann::json r = {{"out", out},
                        {"parameters", c.num_parameters()},
                        {"steps", steps},
                        {"batch", batch},
                        {"seqlen", seqlen},
                        {"seconds", train_seconds},
                        {"cpu_seconds", train_cpu},
                        {"threads", blas_threads()},
                        {"last_loss", last_loss},
                        {"history", history}};
    if (!std::isnan(last_eval)) r["eval_nll"] = last_eval;
    CLI_TRY(cmd, write_file_atomic(f.str("report"), r.dump(2) + "\n"));
  }
  return 0;
}

// ---------------------------------------------------------------- inject-outliers

std::vector<FlagSpec> inject_outliers_flags() {
  return {
      {"in", "DIR", "", "the FP checkpoint to change (required)", ""},
      {"out", "DIR", "", "where to write the changed checkpoint (required)", ""},
      {"norm-channels", "N", "4",
       "RMSNorm channels scaled ×alpha, the next projections' columns ÷alpha", ""},
      {"up-channels", "N", "4", "up_proj rows scaled ×alpha, down_proj's columns ÷alpha", ""},
      {"v-channels", "N", "2", "v_proj rows scaled ×alpha, o_proj's columns ÷alpha", ""},
      {"alpha", "X", "20", "the outlier factor", ""},
      {"seed", "N", "1", "seed of the channel choice", ""},
      {"overwrite", "", "", "replace an existing --out", ""},
  };
}

int cmd_inject_outliers(const Flags& f) {
  const std::string cmd = "inject-outliers";
  CLI_ASSIGN(cmd, std::string in, f.required("in"));
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  OutlierOptions o;
  CLI_ASSIGN(cmd, o.norm_channels, f.integer("norm-channels", 4));
  CLI_ASSIGN(cmd, o.up_channels, f.integer("up-channels", 4));
  CLI_ASSIGN(cmd, o.v_channels, f.integer("v-channels", 2));
  CLI_ASSIGN(cmd, o.alpha, f.number("alpha", 20.0));
  CLI_ASSIGN(cmd, int64_t seed, f.integer("seed", 1));
  CLI_TRY(cmd, inject_outliers(in, o, static_cast<uint64_t>(seed), out, f.flag("overwrite")));
  CLI_ASSIGN(cmd, ModelConfig c, load_model_config(join_path(out, "config.json")));
  CLI_ASSIGN(cmd, OutlierChannels ch, outlier_channels(c, o, static_cast<uint64_t>(seed)));
  auto list = [](const std::vector<int64_t>& v) {
    std::string s;
    for (int64_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
    return s.empty() ? std::string("-") : s;
  };
  std::printf("wrote %s: alpha %g, norm channels %s, up channels %s, v channels %s\n", out.c_str(),
              o.alpha, list(ch.norm).c_str(), list(ch.up).c_str(), list(ch.v).c_str());
  return 0;
}

// ---------------------------------------------------------------- sinks

std::vector<FlagSpec> sinks_flags() {
  return {
      {"model", "DIR", "", "an FP checkpoint (required)", ""},
      {"data", "FILE", "", "tokens to run (required)", ""},
      {"seqlen", "N", "128", "tokens per sequence", ""},
      {"max-seqs", "N", "16", "at most N sequences", ""},
      {"json", "", "", "print the shares as JSON", ""},
  };
}

int cmd_sinks(const Flags& f) {
  const std::string cmd = "sinks";
  CLI_ASSIGN(cmd, std::string model, f.required("model"));
  CLI_ASSIGN(cmd, std::string data_path, f.required("data"));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 128));
  CLI_ASSIGN(cmd, int64_t max_seqs, f.integer("max-seqs", 16));
  if (seqlen < 2) return cli_fail(cmd, invalid_input("--seqlen must be ≥ 2"));
  CLI_ASSIGN(cmd, auto m, LlamaModel::open(model));
  CLI_ASSIGN(cmd, TokenSequences data,
             load_token_sequences(data_path, seqlen, m->config().vocab_size));
  CLI_ASSIGN(cmd, std::vector<double> share, calib::attention_sink_share(*m, data, max_seqs));
  // What a head that spreads its attention evenly over the causal window puts on
  // position 0: mean over t = 1..T−1 of 1/(t+1).
  double uniform = 0;
  for (int64_t t = 1; t < seqlen; ++t) uniform += 1.0 / static_cast<double>(t + 1);
  uniform /= static_cast<double>(seqlen - 1);
  double mean = 0;
  for (double x : share) mean += x;
  mean /= static_cast<double>(std::max<size_t>(share.size(), 1));
  if (f.flag("json")) {
    nlohmann::json j = {{"model", model},
                        {"seqlen", seqlen},
                        {"per_layer", share},
                        {"mean", mean},
                        {"uniform", uniform}};
    std::cout << j.dump(2) << std::endl;
    return 0;
  }
  std::printf("attention mass on position 0 (mean over heads and query positions 1..%lld)\n",
              static_cast<long long>(seqlen - 1));
  for (size_t l = 0; l < share.size(); ++l) std::printf("  layer %2zu  %.3f\n", l, share[l]);
  std::printf("  mean      %.3f   (uniform attention: %.3f)\n", mean, uniform);
  return 0;
}

}  // namespace

std::vector<Command> fixture_commands() {
  const std::string section = "Fixture commands (tiny trained models, tools/make_fixtures.sh)";
  return {
      {"synth-grammar", section, "--out FILE.u32 (--tokens N | --sequences N) [flags]",
       "write a corpus from a known grammar (.u32) and its generator's NLL", "",
       synth_grammar_flags(), cmd_synth_grammar},
      {"train-lm", section, "--data FILE --out DIR [flags]",
       "train a small LLaMA on a token file (fp32 AdamW) and write it as a checkpoint", "",
       train_lm_flags(), cmd_train_lm},
      {"inject-outliers", section, "--in DIR --out DIR [flags]",
       "give an FP checkpoint function-preserving outlier channels", "", inject_outliers_flags(),
       cmd_inject_outliers},
      {"sinks", section, "--model DIR --data FILE [flags]",
       "the attention mass each layer puts on the first token", "", sinks_flags(), cmd_sinks},
  };
}

}  // namespace qcal

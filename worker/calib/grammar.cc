// The structured corpus of the fixture models (grammar.h). Each emit() records
// the probability the generator gave the token; the factorization below keeps
// every latent choice visible in the emitted token (disjoint token classes), so
// that probability is the exact conditional of the language.
#include "worker/calib/grammar.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "common/fsutil.h"
#include "common/rng.h"

namespace qcal::calib {

namespace {

// ---------------------------------------------------------------- token layout

constexpr int32_t kDot = 3;
constexpr int32_t kKv = 4, kQuery = 5, kBr = 6, kCopy = 7, kRep = 8, kCount = 9;
constexpr int32_t kOpen0 = 10, kClose0 = 14, kBrTypes = 4;
constexpr int32_t kDet0 = 18, kNumDet = 8;
constexpr int32_t kAdj0 = kDet0 + kNumDet, kNumAdj = 28;          // 26
constexpr int32_t kNounSg0 = kAdj0 + kNumAdj, kNumNoun = 32;      // 54
constexpr int32_t kNounPl0 = kNounSg0 + kNumNoun;                 // 86
constexpr int32_t kVerbSg0 = kNounPl0 + kNumNoun, kNumVerb = 24;  // 118
constexpr int32_t kVerbPl0 = kVerbSg0 + kNumVerb;                 // 142
constexpr int32_t kPrep0 = kVerbPl0 + kNumVerb, kNumPrep = 8;     // 166
constexpr int32_t kKey0 = kPrep0 + kNumPrep, kNumKey = 32;        // 174
constexpr int32_t kNum0 = kGrammarVocab - 48, kNumNum = 48;       // 208
static_assert(kKey0 + kNumKey <= kNum0, "token classes overlap");

// ---------------------------------------------------------------- probabilities

constexpr double kZipf = 1.8;  // exponent of the word laws
constexpr double kPSentence = 0.25, kPLookup = 0.15, kPBrackets = 0.15, kPCopy = 0.20;
constexpr double kPCount = 1.0 - kPSentence - kPLookup - kPBrackets - kPCopy;
constexpr double kPAdj = 0.3;  // another adjective
constexpr double kPPp = 0.2;   // an NP takes a PP (depth < kMaxPpDepth)
constexpr int kMaxPpDepth = 2;
constexpr double kPObject = 0.6;     // a VP takes an object
constexpr double kPPreferred = 0.9;  // a word comes from its context's preferred set
constexpr int kLookupMin = 2, kLookupMax = 6, kQueries = 4;
constexpr int kCopyMin = 3, kCopyMax = 8;
// Lookups use keys [0, 16) and every third number as values; copies use keys [16, 32).
constexpr int kLookupKeys = 16, kLookupValues = 16, kValueStride = 3;
constexpr int kCopyKey0 = 16, kCopyAlphabet = 16;
constexpr int kCountMin = 4, kCountMax = 10, kMaxStep = 3;
constexpr int kMaxDepth = 4;

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A Zipf law p(r) ∝ (r+1)^−kZipf over n ranks.
struct Zipf {
  std::vector<double> p, cdf;
  explicit Zipf(int n) {
    double z = 0;
    for (int r = 0; r < n; ++r) z += std::pow(r + 1.0, -kZipf);
    double acc = 0;
    for (int r = 0; r < n; ++r) {
      p.push_back(std::pow(r + 1.0, -kZipf) / z);
      acc += p.back();
      cdf.push_back(acc);
    }
  }
  int sample(Rng& rng) const {
    const double u = rng.uniform() * cdf.back();
    return static_cast<int>(
        std::min<size_t>(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin(), p.size() - 1));
  }
};

// "Source i prefers k targets": with probability kPPreferred a target is one of
// source i's k preferred ones (uniformly), otherwise it follows the Zipf law.
struct Preference {
  std::vector<std::vector<int>> preferred;  // (sources, k) distinct targets
  const Zipf* law = nullptr;
  Preference(Rng& rng, int sources, int targets, int k, const Zipf* zipf) : law(zipf) {
    preferred.resize(static_cast<size_t>(sources));
    for (auto& pref : preferred) {
      while (static_cast<int>(pref.size()) < k) {
        const int t = static_cast<int>(rng.below(static_cast<uint64_t>(targets)));
        if (std::find(pref.begin(), pref.end(), t) == pref.end()) pref.push_back(t);
      }
    }
  }
  int sample(Rng& rng, int source) const {
    const auto& pref = preferred[static_cast<size_t>(source)];
    if (rng.uniform() < kPPreferred) return pref[rng.below(pref.size())];
    return law->sample(rng);
  }
  double p(int source, int t) const {
    const auto& pref = preferred[static_cast<size_t>(source)];
    const bool in = std::find(pref.begin(), pref.end(), t) != pref.end();
    return kPPreferred * (in ? 1.0 / static_cast<double>(pref.size()) : 0.0) +
           (1 - kPPreferred) * law->p[static_cast<size_t>(t)];
  }
};

// The fixed tables of the language (independent of the data seed).
struct Tables {
  Zipf det{kNumDet}, adj{kNumAdj}, noun{kNumNoun}, verb{kNumVerb}, prep{kNumPrep};
  Rng rng{0x6772616d6d6172ull};                             // "grammar"
  Preference adj_noun{rng, kNumAdj, kNumNoun, 2, &noun};    // an adjective's nouns
  Preference subj_verb{rng, kNumNoun, kNumVerb, 2, &verb};  // a subject noun's verbs
  Preference verb_obj{rng, kNumVerb, kNumNoun, 3, &noun};   // a verb's objects
  Preference det_noun{rng, kNumDet, kNumNoun, 4, &noun};    // a determiner's nouns
};

const Tables& tables() {
  static const Tables t;
  return t;
}

class Generator {
 public:
  Generator(uint64_t seed, int64_t index, int64_t seqlen, int32_t* out)
      : rng_(mix64(mix64(seed) ^ mix64(static_cast<uint64_t>(index) + 0x5eedull))),
        out_(out),
        limit_(seqlen) {}

  double run() {
    out_[n_++] = kGrammarBos;
    while (n_ < limit_) segment();
    return nll_;
  }

 private:
  void emit(int32_t tok, double p) {
    if (n_ >= limit_) return;
    out_[n_++] = tok;
    nll_ -= std::log(p);
  }
  bool full() const { return n_ >= limit_; }
  int uniform(int n) { return static_cast<int>(rng_.below(static_cast<uint64_t>(n))); }
  bool coin(double p) { return rng_.uniform() < p; }

  void segment() {
    const double u = rng_.uniform();
    if (u < kPSentence) return sentence(kPSentence);
    if (u < kPSentence + kPLookup) return lookup();
    if (u < kPSentence + kPLookup + kPBrackets) return brackets();
    if (u < 1.0 - kPCount) return copy();
    count();
  }

  // ---- sentence
  // NP with number `pl`: Det Adj* Noun [PP]. `p_first` is the probability of the
  // branch that led to this NP (multiplies the determiner's). Returns the noun index.
  // `verb` >= 0: an object NP whose noun follows the verb's preferences.
  // `p_after_noun_no_pp` / the caller's next token: the PP decision is revealed by
  // the next token (a preposition or not), so it is charged there.
  int noun_phrase(bool pl, double p_first, int verb, int depth, double* p_next) {
    const Tables& t = tables();
    const int det = t.det.sample(rng_);
    emit(kDet0 + det, p_first * t.det.p[det]);
    double p_tok = 1.0;  // probability of the branch leading to the next token
    int last_adj = -1;
    while (coin(kPAdj)) {
      last_adj = t.adj.sample(rng_);
      emit(kAdj0 + last_adj, p_tok * kPAdj * t.adj.p[last_adj]);
      p_tok = 1.0;
    }
    p_tok *= 1 - kPAdj;
    // The noun follows its adjective, else the verb (objects), else the determiner;
    // its number (hidden so far) is revealed by the noun itself.
    int n;
    double p_n;
    if (last_adj >= 0) {
      n = t.adj_noun.sample(rng_, last_adj);
      p_n = t.adj_noun.p(last_adj, n);
    } else if (verb >= 0) {
      n = t.verb_obj.sample(rng_, verb);
      p_n = t.verb_obj.p(verb, n);
    } else {
      n = t.det_noun.sample(rng_, det);
      p_n = t.det_noun.p(det, n);
    }
    emit((pl ? kNounPl0 : kNounSg0) + n, p_tok * 0.5 * p_n);
    // The PP decision is revealed by the next token (a preposition or not), so
    // "no PP" is charged to whatever token follows the phrase.
    double p = 1.0;
    if (depth < kMaxPpDepth) {
      if (coin(kPPp)) {
        const int pr = t.prep.sample(rng_);
        emit(kPrep0 + pr, kPPp * t.prep.p[pr]);
        double inner_next = 1.0;
        noun_phrase(coin(0.5), 1.0, -1, depth + 1, &inner_next);
        p *= inner_next;
      } else {
        p *= 1 - kPPp;
      }
    }
    *p_next = p;
    return n;
  }

  void sentence(double p_segment) {
    const Tables& t = tables();
    const bool pl = coin(0.5);
    double p_next = 1.0;
    // The verb agrees in number with the subject's head noun and follows its
    // preferences, across any PP.
    const int subj = noun_phrase(pl, p_segment, -1, 0, &p_next);
    const int v = t.subj_verb.sample(rng_, subj);
    emit((pl ? kVerbPl0 : kVerbSg0) + v, p_next * t.subj_verb.p(subj, v));
    if (coin(kPObject)) {
      double p_after = 1.0;
      noun_phrase(coin(0.5), kPObject, v, 0, &p_after);
      emit(kDot, p_after);
    } else {
      emit(kDot, 1 - kPObject);
    }
  }

  // ---- lookup: <kv> (k v)^n <q> (k v)^3 "."
  void lookup() {
    emit(kKv, kPLookup);
    const int n = kLookupMin + uniform(kLookupMax - kLookupMin + 1);
    std::array<int, kLookupMax> keys{}, vals{};
    for (int i = 0; i < n; ++i) {
      // Continuing past kLookupMin pairs has probability P(n > i | n ≥ i).
      const double p_cont =
          i < kLookupMin ? 1.0 : static_cast<double>(kLookupMax - i) / (kLookupMax - i + 1);
      int k;
      do {
        k = uniform(kLookupKeys);
      } while (std::find(keys.begin(), keys.begin() + i, k) != keys.begin() + i);
      keys[i] = k;
      vals[i] = kValueStride * uniform(kLookupValues);
      emit(kKey0 + k, p_cont / (kLookupKeys - i));
      emit(kNum0 + vals[i], 1.0 / kLookupValues);
    }
    emit(kQuery, n == kLookupMax ? 1.0 : 1.0 / (kLookupMax - n + 1));
    for (int q = 0; q < kQueries; ++q) {
      const int j = uniform(n);
      emit(kKey0 + keys[j], 1.0 / n);
      emit(kNum0 + vals[j], 1.0);
    }
    emit(kDot, 1.0);
  }

  // ---- brackets: <br> Dyck word with filler words, "."
  void brackets() {
    const Tables& t = tables();
    emit(kBr, kPBrackets);
    std::vector<int> stack;
    bool any = false;
    for (int guard = 0; guard < 4096 && !full(); ++guard) {
      const int d = static_cast<int>(stack.size());
      if (d == 0) {
        const double p_end = any ? 0.4 : 0.0;
        if (coin(p_end)) {
          emit(kDot, p_end);
          return;
        }
        const int b = uniform(kBrTypes);
        emit(kOpen0 + b, (1 - p_end) / kBrTypes);
        stack.push_back(b);
        any = true;
        continue;
      }
      const double p_open = d < kMaxDepth ? 0.3 : 0.0;
      const double p_close = d < kMaxDepth ? 0.45 : 0.7;
      const double u = rng_.uniform();
      if (u < p_open) {
        const int b = uniform(kBrTypes);
        emit(kOpen0 + b, p_open / kBrTypes);
        stack.push_back(b);
      } else if (u < p_open + p_close) {
        emit(kClose0 + stack.back(), p_close);
        stack.pop_back();
      } else {
        // A filler word: mostly the innermost bracket's own word (adjective b).
        const double p_fill = 1 - p_open - p_close;
        const int own = stack.back();
        const int a = coin(kPPreferred) ? own : t.adj.sample(rng_);
        emit(kAdj0 + a, p_fill * (kPPreferred * (a == own) + (1 - kPPreferred) * t.adj.p[a]));
      }
    }
  }

  // ---- copy: <copy> x1..xk <rep> x1..xk "."
  void copy() {
    emit(kCopy, kPCopy);
    const int k = kCopyMin + uniform(kCopyMax - kCopyMin + 1);
    std::array<int, kCopyMax> xs{};
    for (int i = 0; i < k; ++i) {
      const double p_cont =
          i < kCopyMin ? 1.0 : static_cast<double>(kCopyMax - i) / (kCopyMax - i + 1);
      xs[i] = kCopyKey0 + uniform(kCopyAlphabet);
      emit(kKey0 + xs[i], p_cont / kCopyAlphabet);
    }
    emit(kRep, k == kCopyMax ? 1.0 : 1.0 / (kCopyMax - k + 1));
    for (int i = 0; i < k; ++i) emit(kKey0 + xs[i], 1.0);
    emit(kDot, 1.0);
  }

  // ---- count: <count> a, a+s, ... (mod 48) "."
  void count() {
    emit(kCount, kPCount);
    const int len = kCountMin + uniform(kCountMax - kCountMin + 1);
    const int a = uniform(kNumNum), s = 1 + uniform(kMaxStep);
    for (int i = 0; i < len; ++i) {
      const double p_cont =
          i < kCountMin ? 1.0 : static_cast<double>(kCountMax - i) / (kCountMax - i + 1);
      const double p_val = i == 0 ? 1.0 / kNumNum : i == 1 ? 1.0 / kMaxStep : 1.0;
      emit(kNum0 + (a + i * s) % kNumNum, p_cont * p_val);
    }
    emit(kDot, len == kCountMax ? 1.0 : 1.0 / (kCountMax - len + 1));
  }

  Rng rng_;
  int32_t* out_;
  int64_t n_ = 0, limit_;
  double nll_ = 0;
};

}  // namespace

std::vector<int32_t> grammar_sequences(int64_t count, int64_t seqlen, uint64_t seed,
                                       GrammarStats* stats) {
  if (stats) *stats = GrammarStats{};
  if (count <= 0 || seqlen < 2) return {};
  std::vector<int32_t> out(static_cast<size_t>(count * seqlen));
  double nll = 0;
  for (int64_t i = 0; i < count; ++i) {
    Generator g(seed, i, seqlen, out.data() + i * seqlen);
    nll += g.run();
  }
  if (stats) {
    stats->sequences = count;
    stats->tokens = count * seqlen;
    stats->predicted = count * (seqlen - 1);
    stats->optimal_nll = nll / static_cast<double>(stats->predicted);
    stats->optimal_ppl = std::exp(stats->optimal_nll);
  }
  return out;
}

Status write_tokens_u32(const std::string& path, const std::vector<int32_t>& tokens) {
  std::string bytes(tokens.size() * 4, '\0');
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0)
      return invalid_input(path + ": token " + std::to_string(i) + " is negative (" +
                           std::to_string(tokens[i]) + ")");
    const uint32_t v = static_cast<uint32_t>(tokens[i]);
    for (int b = 0; b < 4; ++b) bytes[i * 4 + b] = static_cast<char>((v >> (8 * b)) & 0xff);
  }
  return write_file_atomic(path, bytes);
}

}  // namespace qcal::calib

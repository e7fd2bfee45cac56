// qcal — the user's command-line tool. This file holds the embedded,
// single-process commands: synth, synth-data, quantize, eval, inspect.
// Every command validates its flags before doing work and reports errors as
// "qcal <command>: error: <what went wrong>" with exit code 2 for bad input
// (invalid, missing or corrupt input) and 1 for everything else.
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>

#include "api/spec_flags.h"
#include "api/cli_util.h"
#include "api/cmd_service.h"
#include "api/cmd_train.h"
#include "common/data.h"
#include "common/flags.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/model_dir.h"
#include "kernels/device.h"
#include "kernels/gemm.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/native.h"
#include "worker/calib/native_eval.h"
#include "worker/engine/eval.h"
#include "worker/engine/qformats.h"
#include "common/job_spec.h"
#include "common/plan.h"
#include "worker/local_runner.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {

constexpr const char* kVersion = "0.1.0";

// ---------------------------------------------------------------- synth
int cmd_synth(int argc, char** argv) {
  const std::string cmd = "synth";
  Flags f({"out", "layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate", "vocab",
           "seed", "model-type", "dtype", "rope-theta", "rms-eps", "max-pos", "outlier-norm",
           "outlier-up", "outlier-v", "outlier-alpha", "max-shard-mb"},
          {"tie", "overwrite"});
  CLI_TRY(cmd, f.parse(argc, argv, 2));
  SynthOptions o;
  ModelConfig& c = o.config;
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  c.model_type = f.str("model-type", "llama");
  CLI_ASSIGN(cmd, c.num_hidden_layers, f.integer("layers", 4));
  CLI_ASSIGN(cmd, c.hidden_size, f.integer("hidden", 256));
  CLI_ASSIGN(cmd, c.num_attention_heads, f.integer("heads", 8));
  CLI_ASSIGN(cmd, c.num_key_value_heads, f.integer("kv-heads", c.num_attention_heads));
  CLI_ASSIGN(
      cmd, c.head_dim,
      f.integer("head-dim", c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0));
  CLI_ASSIGN(cmd, c.intermediate_size, f.integer("intermediate", 688));
  CLI_ASSIGN(cmd, c.vocab_size, f.integer("vocab", 512));
  CLI_ASSIGN(cmd, c.rope_theta, f.number("rope-theta", 10000.0));
  CLI_ASSIGN(cmd, c.rms_norm_eps, f.number("rms-eps", 1e-6));
  CLI_ASSIGN(cmd, c.max_position_embeddings, f.integer("max-pos", 2048));
  c.tie_word_embeddings = f.flag("tie");
  c.attention_bias = c.model_type == "qwen2";
  auto dt = dtype_from_torch_name(f.str("dtype", "float32"));
  if (!dt) return cli_fail(cmd, invalid_input("--dtype must be float32, float16 or bfloat16"));
  c.torch_dtype = *dt;
  CLI_ASSIGN(cmd, int64_t seed, f.integer("seed", 1));
  o.seed = static_cast<uint64_t>(seed);
  CLI_ASSIGN(cmd, o.outliers.norm_channels, f.integer("outlier-norm", 0));
  CLI_ASSIGN(cmd, o.outliers.up_channels, f.integer("outlier-up", 0));
  CLI_ASSIGN(cmd, o.outliers.v_channels, f.integer("outlier-v", 0));
  CLI_ASSIGN(cmd, o.outliers.alpha, f.number("outlier-alpha", 20.0));
  CLI_ASSIGN(cmd, int64_t shard_mb, f.integer("max-shard-mb", 2048));
  o.max_shard_bytes = static_cast<uint64_t>(shard_mb) << 20;
  o.overwrite = f.flag("overwrite");
  // Round-trip through the config validator so bad shapes fail here, clearly.
  CLI_ASSIGN(cmd, ModelConfig checked, parse_model_config(c.to_json(), "--flags"));
  (void)checked;
  CLI_TRY(cmd, synth_model(o, out));
  std::printf("wrote %s: %s, %lld layers, hidden %lld, %lld parameters\n", out.c_str(),
              c.model_type.c_str(), static_cast<long long>(c.num_hidden_layers),
              static_cast<long long>(c.hidden_size), static_cast<long long>(c.num_parameters()));
  return 0;
}

// ---------------------------------------------------------------- synth-data
int cmd_synth_data(int argc, char** argv) {
  const std::string cmd = "synth-data";
  Flags f({"out", "vocab", "model", "tokens", "seed", "per-line"}, {});
  CLI_TRY(cmd, f.parse(argc, argv, 2));
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  CLI_ASSIGN(cmd, int64_t vocab, f.integer("vocab", 0));
  if (f.has("model")) {
    CLI_ASSIGN(cmd, ModelConfig c, load_model_config(join_path(f.str("model"), "config.json")));
    vocab = c.vocab_size;
  }
  if (vocab <= 0) return cli_fail(cmd, invalid_input("give --vocab N or --model DIR"));
  CLI_ASSIGN(cmd, int64_t count, f.integer("tokens", 65536));
  CLI_ASSIGN(cmd, int64_t seed, f.integer("seed", 1));
  CLI_ASSIGN(cmd, int64_t per_line, f.integer("per-line", 512));
  if (count <= 0 || per_line <= 0)
    return cli_fail(cmd, invalid_input("--tokens and --per-line must be positive"));
  auto toks = synth_tokens(count, vocab, static_cast<uint64_t>(seed));
  CLI_TRY(cmd, write_tokens_jsonl(out, toks, per_line));
  std::printf("wrote %s: %lld tokens, vocab %lld\n", out.c_str(), static_cast<long long>(count),
              static_cast<long long>(vocab));
  return 0;
}

// ---------------------------------------------------------------- quantize
// The job the flags describe (api/spec_flags.h, the same as `qcal submit`'s), planned
// and run in this process task by task (worker/local_runner.h).
int cmd_quantize(int argc, char** argv) {
  const std::string cmd = "quantize";
  std::set<std::string> valued = spec_valued_flags(), bools = spec_boolean_flags();
  valued.insert({"report", "memory-gb"});
  bools.insert({"json", "quiet", "keep-store"});
  Flags f(valued, bools);
  CLI_TRY(cmd, f.parse(argc, argv, 2));
  if (f.flag("quiet")) set_log_level(LogLevel::kWarn);
  CLI_ASSIGN(cmd, nlohmann::json spec_json, job_spec_json_from_flags(f));
  CLI_ASSIGN(cmd, JobSpec spec, parse_job_spec(spec_json));
  LocalRunOptions o;
  if (f.has("memory-gb")) {
    CLI_ASSIGN(cmd, double gb, f.number("memory-gb", 0));
    if (!(gb > 0)) return cli_fail(cmd, invalid_input("--memory-gb must be positive"));
    o.memory_bytes = static_cast<uint64_t>(gb * 1073741824.0);
  }
  o.keep_store = f.flag("keep-store");
  o.log = [](const std::string& line) { LOG_INFO << line; };
  LOG_INFO << "quantize " << spec.model << ": " << spec.recipe.display_name() << " w"
           << spec.recipe.w_bits() << " a" << spec.recipe.a_bits() << " kv"
           << spec.recipe.kv_bits() << ", " << blas_threads() << " threads";
  CLI_ASSIGN(cmd, LocalRunResult res, run_job_locally(spec, o));
  nlohmann::json j = res.report();
  j["out"] = spec.output.path;
  j["recipe"] = spec.recipe.to_json();
  j["tasks"] = res.plan.tasks.size();
  auto a = res.results.find(plan::kAssemble);
  if (a != res.results.end()) j["format"] = a->second.value("format", "");
  auto v = res.results.find(plan::kValidate);
  if (v != res.results.end() && v->second.contains("report")) j["eval"] = v->second["report"];
  if (f.has("report")) CLI_TRY(cmd, write_file_atomic(f.str("report"), j.dump(2) + "\n"));
  if (f.flag("json")) {
    std::cout << j.dump() << std::endl;
  } else {
    double worst = 0;
    for (const auto& l : j["layers"])
      if (l.contains("rel_output_error")) worst = std::max(worst, l["rel_output_error"].get<double>());
    std::printf("wrote %s (%s, %zu tasks) in %.1f s", spec.output.path.c_str(),
                j.value("format", "").c_str(), res.plan.tasks.size(), res.seconds);
    if (worst > 0) std::printf("; worst layer rel. output error %.3g", worst);
    std::printf("\n");
  }
  return 0;
}

// ---------------------------------------------------------------- eval
// Any checkpoint (FP, GPTQ, compressed-tensors, or native: quantized inference with
// the integer kernels; with IntactKV every sequence must begin with the prefix,
// methods.md §6.2), streamed a layer and an lm_head chunk at a time
// (worker/calib/native_eval.h).
int cmd_eval(int argc, char** argv) {
  const std::string cmd = "eval";
  Flags f({"model", "data", "seqlen", "fp-model", "nsamples", "batch", "head-rows"},
          {"json", "quiet"});
  CLI_TRY(cmd, f.parse(argc, argv, 2));
  if (f.flag("quiet") || f.flag("json")) set_log_level(LogLevel::kWarn);
  CLI_ASSIGN(cmd, std::string model_path, f.required("model"));
  CLI_ASSIGN(cmd, std::string data_path, f.required("data"));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 2048));
  CLI_ASSIGN(cmd, int64_t nsamples, f.integer("nsamples", 0));
  EvalOptions eo;
  CLI_ASSIGN(cmd, eo.batch, f.integer("batch", eo.batch));
  CLI_ASSIGN(cmd, eo.head_rows, f.integer("head-rows", eo.head_rows));
  if (seqlen < 2 || eo.batch <= 0 || eo.head_rows <= 0)
    return cli_fail(cmd, invalid_input("--seqlen must be ≥ 2, --batch and --head-rows > 0"));
  CLI_ASSIGN(cmd, std::unique_ptr<EvalModel> model, calib::open_eval_model(model_path));
  const ModelConfig& c = model->config();
  std::unique_ptr<EvalModel> fp;
  if (f.has("fp-model")) {
    CLI_ASSIGN(cmd, fp, calib::open_eval_model(f.str("fp-model")));
    const ModelConfig& b = fp->config();
    if (c.vocab_size != b.vocab_size || c.hidden_size != b.hidden_size ||
        c.num_hidden_layers != b.num_hidden_layers)
      return cli_fail(cmd, invalid_input("--fp-model " + f.str("fp-model") +
                                         " has a different architecture than --model"));
  }
  CLI_ASSIGN(cmd, TokenSequences data,
             load_token_sequences(data_path, seqlen, c.vocab_size, nsamples));
  CLI_ASSIGN(cmd, EvalResult r, evaluate_stream(*model, fp.get(), data, eo));
  if (f.flag("json")) {
    std::cout << r.to_json().dump() << std::endl;
    return 0;
  }
  std::printf("ppl %.4f  nll %.5f  tokens %lld", r.ppl, r.nll, static_cast<long long>(r.tokens));
  if (r.kl) std::printf("  kl %.5f  top1_agree %.4f  fp_ppl %.4f", *r.kl, *r.top1_agree, *r.fp_ppl);
  std::printf("\n");
  return 0;
}

// ---------------------------------------------------------------- inspect
int cmd_inspect(int argc, char** argv) {
  const std::string cmd = "inspect";
  Flags f({}, {"json"});
  CLI_TRY(cmd, f.parse(argc, argv, 2));
  if (f.positionals().size() != 1)
    return cli_fail(cmd, invalid_input("usage: qcal inspect DIR [--json]"));
  CLI_ASSIGN(cmd, auto dir, ModelDir::open(f.positionals()[0]));
  CLI_ASSIGN(cmd, nlohmann::json j, inspect_checkpoint(*dir));
  if (f.flag("json")) {
    std::cout << j.dump(2) << std::endl;
    return 0;
  }
  // Text form: top-level scalars and objects as "key: value" lines; module lists summarized.
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.value().is_array() && it.value().size() > 8) {
      std::cout << it.key() << ": " << it.value().size() << " entries (see --json)\n";
    } else if (it.value().is_object()) {
      std::cout << it.key() << ":\n";
      for (auto jt = it.value().begin(); jt != it.value().end(); ++jt) {
        std::string v = jt.value().dump();
        if (v.size() > 100) v = v.substr(0, 97) + "...";
        std::cout << "  " << jt.key() << ": " << v << "\n";
      }
    } else {
      std::cout << it.key() << ": " << it.value().dump() << "\n";
    }
  }
  return 0;
}

void usage() {
  std::printf(
      "qcal %s — post-training quantization for LLaMA-family models\n\n"
      "Embedded (single process) commands:\n"
      "  qcal synth      --out DIR [--layers 4 --hidden 256 --heads 8 --kv-heads 8 --intermediate "
      "688\n"
      "                  --vocab 512 --seed 1 --model-type llama|mistral|qwen2 --dtype "
      "float32|float16|bfloat16\n"
      "                  --tie --outlier-norm N --outlier-up N --outlier-v N --outlier-alpha 20]\n"
      "  qcal synth-data --out FILE.jsonl (--vocab N | --model DIR) [--tokens 65536 --seed 1]\n"
      "  qcal quantize   --model DIR --calib FILE --out DIR [--method gptq|rtn --w-bits 4 "
      "--group-size 128\n"
      "                  --sym|--asym --w-grid auto|full|narrow --nsamples 128 --seqlen 2048 --format "
      "gptq|compressed-tensors\n"
      "                  --damp 0.01 --act-order --static-groups --blocksize 128 --mse-clip\n"
      "                  --max-shard-mb 2048 --overwrite --report FILE --json]\n"
      "  qcal quantize   --method smoothquant|quarot|spinquant|flatquant|rtn|gptq --a-bits 4 "
      "--kv-bits 4\n"
      "                  [--weight-solver rtn|gptq --w-bits 4 --group-size -1 --a-clip 1 --kv-clip "
      "1\n"
      "                  --alpha 0.5 (smoothquant) --epochs 15 --flat-lr 5e-3 --cali-bsz 4 "
      "--diag-alpha 0.3\n"
      "                  --no-lwc --no-lac --no-diag (flatquant) --spin-steps 100 --spin-lr 1.5 "
      "(spinquant)\n"
      "                  --intactkv [--intactkv-prefix 1,...] (keep the pivot tokens' FP KV "
      "cache)\n"
      "                  --intactkv-cal [--intactkv-cal-steps 160 --intactkv-cal-lr 2e-4] "
      "(then train it, §6.4)\n"
      "                  --reconstruction none|block|cbq --weight-solver rtn|lora-rounding "
      "--cbq-window 2\n"
      "                  --cbq-overlap 1 --cbq-parallel --cbq-epochs 20 --lora-rank 16 --no-cfp "
      "(CBQ, §7)\n"
      "                  --seed 0 --embed-mean-sub --format auto|native|gptq|compressed-tensors]\n"
      "                  The calibration engine; writes a native qcal checkpoint "
      "(docs/NATIVE_FORMAT.md)\n"
      "                  unless everything folds into the weights.\n"
      "  qcal eval       --model DIR --data FILE [--seqlen 2048 --fp-model DIR --nsamples N "
      "--batch 8 --head-rows 8192 --json]\n"
      "                  (DIR may be a native qcal checkpoint: runs the quantized integer "
      "kernels)\n"
      "  qcal inspect    DIR [--json]\n"
      "  qcal version\n\n"
      "Data files: .jsonl ({\"input_ids\": [...]} per line) or .u32 (little-endian uint32 "
      "tokens).\n"
      "Threads: QCAL_THREADS (default: all cores). Logs: QCAL_LOG_LEVEL=debug|info|warn|error.\n",
      kVersion);
  std::printf("\n%s", train_usage());
  std::printf("\n%s", service_usage());
}

}  // namespace
}  // namespace qcal

int main(int argc, char** argv) {
  using namespace qcal;
  if (argc < 2) {
    usage();
    return 2;
  }
  std::string cmd = argv[1];
  static const std::map<std::string, std::function<int(int, char**)>> kCommands = {
      {"synth", cmd_synth},         {"synth-data", cmd_synth_data},
      {"quantize", cmd_quantize},   {"eval", cmd_eval},
      {"inspect", cmd_inspect},     {"submit", cmd_submit},
      {"status", cmd_status},       {"wait", cmd_wait},
      {"jobs", cmd_jobs},           {"cancel", cmd_cancel},
      {"logs", cmd_logs},           {"report", cmd_report},
      {"schedules", cmd_schedules}, {"synth-grammar", cmd_synth_grammar},
      {"train-lm", cmd_train_lm},   {"inject-outliers", cmd_inject_outliers},
      {"sinks", cmd_sinks},
  };
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    usage();
    return 0;
  }
  if (cmd == "version" || cmd == "--version") {
    std::printf("qcal %s (gpu: %s)\n", kVersion, cuda_device_summary().c_str());
    return 0;
  }
  auto it = kCommands.find(cmd);
  if (it == kCommands.end()) {
    std::fprintf(stderr, "qcal: unknown command '%s' (try qcal --help)\n", cmd.c_str());
    return 2;
  }
  return it->second(argc, argv);
}

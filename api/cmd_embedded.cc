// The embedded, single-process commands of `qcal` (cmd_embedded.h): synth,
// synth-data, quantize, eval, inspect. Every command validates its flags
// before doing work and reports errors as "qcal <command>: error: <what went
// wrong>" with exit code 2 for bad input (invalid, missing or corrupt input)
// and 1 for everything else.
#include "api/cmd_embedded.h"

#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "api/calib_cli.h"
#include "api/cli_util.h"
#include "common/data.h"
#include "common/flags.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/model_dir.h"
#include "kernels/gemm.h"
#include "worker/calib/intactkv.h"
#include "worker/calib/methods.h"
#include "worker/calib/native.h"
#include "worker/engine/eval.h"
#include "worker/engine/qformats.h"
#include "worker/engine/quantize.h"
#include "worker/engine/synth.h"

namespace qcal {
namespace {

// ---------------------------------------------------------------- synth
std::vector<FlagSpec> synth_flags() {
  const std::string shape = "Model shape", out = "Output", outl = "Outlier channels";
  return {
      {"out", "DIR", "", "where to write the model (required)", out},
      {"dtype", "NAME", "float32", "float32, float16 or bfloat16: the stored weights' type", out},
      {"max-shard-mb", "N", "2048", "split the weights into shards of at most N MiB", out},
      {"seed", "N", "1", "seed of the weights (the same flags give byte-identical files)", out},
      {"overwrite", "", "", "replace an existing --out", out},
      {"model-type", "NAME", "llama", "llama, mistral or qwen2 (qwen2: q/k/v biases)", shape},
      {"layers", "N", "4", "decoder layers", shape},
      {"hidden", "N", "256", "hidden size", shape},
      {"heads", "N", "8", "attention heads", shape},
      {"kv-heads", "N", "--heads", "key/value heads", shape},
      {"head-dim", "N", "hidden / heads", "dimension of one head", shape},
      {"intermediate", "N", "688", "MLP intermediate size", shape},
      {"vocab", "N", "512", "vocabulary size", shape},
      {"rope-theta", "X", "10000", "RoPE base", shape},
      {"rms-eps", "X", "1e-06", "RMSNorm epsilon", shape},
      {"max-pos", "N", "2048", "max_position_embeddings", shape},
      {"tie", "", "", "tie the embedding and lm_head", shape},
      {"outlier-norm", "N", "0",
       "RMSNorm channels scaled ×alpha, the next projections' columns ÷alpha (function-preserving)",
       outl},
      {"outlier-up", "N", "0", "up_proj rows scaled ×alpha, down_proj's columns ÷alpha", outl},
      {"outlier-v", "N", "0", "v_proj rows scaled ×alpha, o_proj's columns ÷alpha", outl},
      {"outlier-alpha", "X", "20", "the outlier factor alpha", outl},
  };
}

int cmd_synth(const Flags& f) {
  const std::string cmd = "synth";
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
std::vector<FlagSpec> synth_data_flags() {
  return {
      {"out", "FILE", "", "where to write the tokens (.jsonl; required)", ""},
      {"vocab", "N", "", "draw ids below N", ""},
      {"model", "DIR", "", "... or below this model's vocabulary size", ""},
      {"tokens", "N", "65536", "how many tokens", ""},
      {"per-line", "N", "512", "tokens per JSON line", ""},
      {"seed", "N", "1", "generator seed", ""},
  };
}

int cmd_synth_data(const Flags& f) {
  const std::string cmd = "synth-data";
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

// ---------------------------------------------------------------- quantize (calibration engine)
// --method smoothquant|quarot|spinquant|flatquant, or rtn/gptq with --a-bits/--kv-bits < 16.
int cmd_quantize_calib(const Flags& f) {
  const std::string cmd = "quantize";
  CLI_ASSIGN(cmd, std::string model, f.required("model"));
  CLI_ASSIGN(cmd, std::string calib_path, f.required("calib"));
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  CLI_ASSIGN(cmd, calib::CalibRecipe r, recipe_from_flags(f));
  std::string format = f.str("format", "auto");
  if (format != "auto" && format != "native" && format != "gptq" && format != "compressed-tensors")
    return cli_fail(cmd,
                    invalid_input("--format must be auto, native, gptq or compressed-tensors"));
  if ((format == "gptq" || format == "compressed-tensors") && !r.folds_completely())
    return cli_fail(
        cmd, invalid_input("--format " + format + ": " +
                           (r.transforms_fold() && r.intactkv
                                ? std::string("the IntactKV prefix cache needs the native format")
                                : std::string("this recipe leaves transforms or activation/KV "
                                              "quantizers to run online")) +
                           "; use --format native (or auto)"));
  if (format == "auto") format = r.folds_completely() ? "gptq" : "native";
  const bool overwrite = f.flag("overwrite");
  if (path_exists(out) && !overwrite)
    return cli_fail(cmd, invalid_input(out + ": output exists (pass --overwrite to replace it)"));
  CLI_ASSIGN(cmd, int64_t nsamples, f.integer("nsamples", 128));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 2048));
  if (nsamples <= 0 || seqlen < 2)
    return cli_fail(cmd, invalid_input("--nsamples must be > 0 and --seqlen ≥ 2"));
  CLI_ASSIGN(cmd, ModelConfig c, load_model_config(join_path(model, "config.json")));
  CLI_ASSIGN(cmd, TokenSequences calib,
             load_token_sequences(calib_path, seqlen, c.vocab_size, nsamples));
  LOG_INFO << "quantize " << model << ": " << r.to_json().dump() << ", " << calib.count() << " x "
           << seqlen << " calibration tokens, " << blas_threads() << " threads";
  auto progress = [](const std::string& stage, int64_t i, int64_t n) {
    LOG_INFO << stage << " " << (i + 1) << "/" << n;
  };
  CLI_ASSIGN(cmd, calib::CalibReport rep,
             calib::calibrate_to_dir(model, calib, r, out, format, overwrite, progress));
  nlohmann::json j = rep.to_json();
  j["out"] = out;
  j["recipe"] = r.to_json();
  if (f.has("report")) CLI_TRY(cmd, write_file_atomic(f.str("report"), j.dump(2) + "\n"));
  if (f.flag("json")) {
    std::cout << j.dump() << std::endl;
  } else {
    std::printf("wrote %s in %.1f s\n", out.c_str(), rep.seconds);
  }
  return 0;
}

// ---------------------------------------------------------------- quantize
// Its own rows, then the recipe rows (api/calib_cli.h recipe_flags).
std::vector<FlagSpec> quantize_flags() {
  const std::string io = "Input and output";
  return concat_flags(
      {
          {"model", "DIR", "", "the model to quantize (required)", io},
          {"calib", "FILE", "", "calibration tokens, .jsonl or .u32 (required)", io},
          {"nsamples", "N", "128", "calibration sequences", io},
          {"seqlen", "N", "2048", "tokens per calibration sequence", io},
          {"out", "DIR", "", "where to write the quantized checkpoint (required)", io},
          {"format", "NAME", "gptq weight-only, auto calibration engine",
           "gptq or compressed-tensors; the calibration engine also takes native and auto "
           "(gptq when everything folds into the weights, else native)",
           io},
          {"max-shard-mb", "N", "2048", "weight-only: shards of at most N MiB", io},
          {"overwrite", "", "", "replace an existing --out", io},
          {"report", "FILE", "", "also write the report (per-layer errors, timings) as JSON", io},
          {"json", "", "", "print the report as JSON", io},
          {"quiet", "", "", "log warnings and errors only", io},
      },
      recipe_flags());
}

int cmd_quantize(const Flags& f) {
  const std::string cmd = "quantize";
  if (f.flag("quiet")) set_log_level(LogLevel::kWarn);
  if (wants_calibration(f)) return cmd_quantize_calib(f);
  for (const auto& k : calib_valued_flags())
    if (f.has(k) && k != "a-bits" && k != "kv-bits")
      return cli_fail(cmd, invalid_input("--" + k +
                                         " applies to the calibration methods "
                                         "(--method smoothquant|quarot|spinquant|flatquant) or "
                                         "quantized activations (--a-bits/--kv-bits < 16)"));
  CLI_ASSIGN(cmd, std::string model, f.required("model"));
  CLI_ASSIGN(cmd, std::string calib_path, f.required("calib"));
  CLI_ASSIGN(cmd, std::string out, f.required("out"));
  QuantizeOptions o;
  CLI_ASSIGN(cmd, o.method, parse_weight_method(f.str("method", "gptq")));
  CLI_ASSIGN(cmd, int64_t bits, f.integer("w-bits", 4));
  o.spec.bits = static_cast<int>(bits);
  CLI_ASSIGN(cmd, o.spec.group_size, f.integer("group-size", 128));
  if (f.flag("sym") && f.flag("asym"))
    return cli_fail(cmd, invalid_input("--sym and --asym are exclusive"));
  o.spec.sym = !f.flag("asym");
  o.spec.mse_clip = f.flag("mse-clip");
  CLI_TRY(cmd, o.spec.validate());
  CLI_ASSIGN(cmd, o.gptq.percdamp, f.number("damp", 0.01));
  CLI_ASSIGN(cmd, o.gptq.blocksize, f.integer("blocksize", 128));
  if (o.gptq.percdamp <= 0 || o.gptq.blocksize <= 0)
    return cli_fail(cmd, invalid_input("--damp and --blocksize must be positive"));
  o.gptq.act_order = f.flag("act-order");
  o.gptq.static_groups = f.flag("static-groups");
  o.true_sequential = !f.flag("no-true-sequential");
  CLI_ASSIGN(cmd, o.write.format, parse_checkpoint_format(f.str("format", "gptq")));
  CLI_ASSIGN(cmd, int64_t shard_mb, f.integer("max-shard-mb", 2048));
  if (shard_mb <= 0) return cli_fail(cmd, invalid_input("--max-shard-mb must be positive"));
  o.write.max_shard_bytes = static_cast<uint64_t>(shard_mb) << 20;
  o.write.overwrite = f.flag("overwrite");
  CLI_ASSIGN(cmd, o.batch, f.integer("batch", 8));
  CLI_ASSIGN(cmd, int64_t nsamples, f.integer("nsamples", 128));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 2048));
  if (nsamples <= 0 || seqlen < 2)
    return cli_fail(cmd, invalid_input("--nsamples must be > 0 and --seqlen ≥ 2"));
  if (path_exists(out) && !o.write.overwrite)
    return cli_fail(cmd, invalid_input(out + ": output exists (pass --overwrite to replace it)"));

  CLI_ASSIGN(cmd, ModelConfig c, load_model_config(join_path(model, "config.json")));
  if (seqlen > c.max_position_embeddings)
    LOG_WARN << "--seqlen " << seqlen << " exceeds max_position_embeddings "
             << c.max_position_embeddings;
  CLI_ASSIGN(cmd, TokenSequences calib,
             load_token_sequences(calib_path, seqlen, c.vocab_size, nsamples));
  if (calib.count() < nsamples)
    LOG_WARN << calib_path << " holds " << calib.count() << " sequences of " << seqlen
             << " tokens; using them all (asked for " << nsamples << ")";
  LOG_INFO << "quantize " << model << ": " << (o.method == WeightMethod::kGptq ? "gptq" : "rtn")
           << " w" << o.spec.bits << " g" << o.spec.group_size << (o.spec.sym ? " sym" : " asym")
           << ", " << calib.count() << " x " << seqlen << " calibration tokens, " << blas_threads()
           << " threads";
  CLI_ASSIGN(cmd, QuantizeReport rep, quantize_model(model, calib, o, out));
  nlohmann::json j = rep.to_json();
  j["out"] = out;
  j["format"] = checkpoint_format_name(o.write.format);
  if (f.has("report")) CLI_TRY(cmd, write_file_atomic(f.str("report"), j.dump(2) + "\n"));
  if (f.flag("json")) {
    std::cout << j.dump() << std::endl;
  } else {
    double worst = 0;
    for (const auto& l : rep.layers) worst = std::max(worst, l.rel_output_error);
    std::printf("wrote %s (%s) in %.1f s; worst layer rel. output error %.3g\n", out.c_str(),
                checkpoint_format_name(o.write.format), rep.seconds, worst);
  }
  return 0;
}

// ---------------------------------------------------------------- eval
// On an FP / GPTQ / compressed-tensors checkpoint (worker/engine evaluate), or on a
// native qcal checkpoint: quantized inference with the integer kernels, and with
// IntactKV every sequence must begin with the prefix (methods.md §6.2).
std::vector<FlagSpec> eval_flags() {
  return {
      {"model", "DIR", "",
       "the checkpoint: FP, GPTQ, compressed-tensors, or native qcal (quantized integer "
       "kernels; required)",
       ""},
      {"data", "FILE", "", "evaluation tokens, .jsonl or .u32 (required)", ""},
      {"seqlen", "N", "2048", "tokens per sequence", ""},
      {"nsamples", "N", "0 = all", "evaluation sequences", ""},
      {"batch", "N", "8", "sequences per forward batch (memory only)", ""},
      {"fp-model", "DIR", "",
       "the FP model to compare with: adds KL(FP ‖ model), top-1 agreement and its ppl", ""},
      {"json", "", "", "print the result as JSON", ""},
      {"quiet", "", "", "log warnings and errors only", ""},
  };
}

int cmd_eval(const Flags& f) {
  const std::string cmd = "eval";
  if (f.flag("quiet") || f.flag("json")) set_log_level(LogLevel::kWarn);
  CLI_ASSIGN(cmd, std::string model_path, f.required("model"));
  CLI_ASSIGN(cmd, std::string data_path, f.required("data"));
  CLI_ASSIGN(cmd, int64_t seqlen, f.integer("seqlen", 2048));
  CLI_ASSIGN(cmd, int64_t nsamples, f.integer("nsamples", 0));
  CLI_ASSIGN(cmd, int64_t batch, f.integer("batch", 8));
  if (seqlen < 2 || batch <= 0)
    return cli_fail(cmd, invalid_input("--seqlen must be ≥ 2 and --batch > 0"));
  std::optional<calib::NativeModel> native;
  std::unique_ptr<LlamaModel> model;
  if (calib::is_native_dir(model_path)) {
    CLI_ASSIGN(cmd, native, calib::read_native(model_path));
  } else {
    CLI_ASSIGN(cmd, model, LlamaModel::open(model_path));
  }
  const ModelConfig& c = native ? native->config : model->config();
  std::unique_ptr<LlamaModel> fp;
  if (f.has("fp-model")) {
    CLI_ASSIGN(cmd, fp, LlamaModel::open(f.str("fp-model")));
    const ModelConfig& b = fp->config();
    if (c.vocab_size != b.vocab_size || c.hidden_size != b.hidden_size ||
        c.num_hidden_layers != b.num_hidden_layers)
      return cli_fail(cmd, invalid_input("--fp-model " + f.str("fp-model") +
                                         " has a different architecture than --model"));
  }
  CLI_ASSIGN(cmd, TokenSequences data,
             load_token_sequences(data_path, seqlen, c.vocab_size, nsamples));
  CLI_ASSIGN(cmd, EvalResult r,
             native ? calib::evaluate_native(*native, data, fp.get(), batch)
                    : evaluate(*model, data, fp.get(), batch));
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
int cmd_inspect(const Flags& f) {
  const std::string cmd = "inspect";
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

}  // namespace

std::vector<Command> embedded_commands() {
  const std::string section = "Embedded (single process) commands";
  return {
      {"synth", section, "--out DIR [flags]",
       "write a random LLaMA-family checkpoint (for tests and benchmarks)", "", synth_flags(),
       cmd_synth},
      {"synth-data", section, "--out FILE.jsonl (--vocab N | --model DIR) [flags]",
       "write random token ids as .jsonl", "", synth_data_flags(), cmd_synth_data},
      {"quantize", section, "--model DIR --calib FILE --out DIR [flags]",
       "quantize a model: weight-only rtn/gptq, or a recipe of the calibration engine",
       "--method rtn|gptq with 16-bit activations and KV cache quantizes the weights block by\n"
       "block and writes GPTQ or compressed-tensors. Any calibration-engine flag (a transform\n"
       "--method, --a-bits/--kv-bits below 16, --weight-solver, --reconstruction, --intactkv,\n"
       "--format native) runs the calibration engine, which writes a native qcal checkpoint\n"
       "(docs/NATIVE_FORMAT.md) unless everything folds into the weights. Threads:\n"
       "QCAL_THREADS (default: all cores).",
       quantize_flags(), cmd_quantize},
      {"eval", section, "--model DIR --data FILE [flags]",
       "perplexity of a checkpoint, and KL / top-1 agreement against its FP model",
       "With IntactKV, every sequence must begin with the checkpoint's prefix.", eval_flags(),
       cmd_eval},
      {"inspect",
       section,
       "DIR [flags]",
       "describe a checkpoint (config, quantization, tensors)",
       "",
       {{"json", "", "", "print everything as JSON", ""}},
       cmd_inspect},
  };
}

}  // namespace qcal

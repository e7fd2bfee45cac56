// The embedded, single-process commands of `qcal` (cmd_embedded.h): synth,
// synth-data, quantize, plan, eval, inspect. Every command validates its flags
// before doing work and reports errors as "qcal <command>: error: <what went
// wrong>" with exit code 2 for bad input (invalid, missing or corrupt input)
// and 1 for everything else.
#include "api/cmd_embedded.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "api/cli_util.h"
#include "api/spec_flags.h"
#include "common/data.h"
#include "common/flags.h"
#include "common/fsutil.h"
#include "common/job_spec.h"
#include "common/log.h"
#include "common/method_registry.h"
#include "common/model_dir.h"
#include "common/plan.h"
#include "common/planner.h"
#include "kernels/gemm.h"
#include "worker/calib/native.h"
#include "worker/calib/native_eval.h"
#include "worker/engine/eval.h"
#include "worker/engine/qformats.h"
#include "worker/engine/synth.h"
#include "worker/local_runner.h"

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

// ---------------------------------------------------------------- quantize
// The job the flags describe (api/spec_flags.h, the same as `qcal submit`'s), planned
// and run in this process task by task (worker/local_runner.h).
std::vector<FlagSpec> quantize_flags() {
  const std::string run = "This run";
  return concat_flags(
      spec_flags(),
      {
          {"report", "FILE", "", "also write the report (per-layer errors, timings) as JSON", run},
          {"json", "", "", "print the report as JSON", run},
          {"quiet", "", "", "log warnings and errors only", run},
          {"memory-gb", "X", "physical memory",
           "the memory the planner sizes tasks (micro-batches) to", run},
          {"keep-store", "", "",
           "keep the task artifacts (<out>.qcal-store.<pid>) instead of removing them", run},
      });
}

int cmd_quantize(const Flags& f) {
  const std::string cmd = "quantize";
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
           << spec.recipe.w_bits() << " a" << spec.recipe.a_bits() << " kv" << spec.recipe.kv_bits()
           << ", " << blas_threads() << " threads";
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
      if (l.contains("rel_output_error"))
        worst = std::max(worst, l["rel_output_error"].get<double>());
    std::printf("wrote %s (%s, %zu tasks) in %.1f s", spec.output.path.c_str(),
                j.value("format", "").c_str(), res.plan.tasks.size(), res.seconds);
    if (worst > 0) std::printf("; worst layer rel. output error %.3g", worst);
    std::printf("\n");
  }
  // The gate, as the service fails the job: exit 3 naming what it exceeded.
  if (j.contains("eval") && j["eval"].contains("gate") &&
      !j["eval"]["gate"].value("passed", true)) {
    std::string why;
    for (const auto& v : j["eval"]["gate"].value("violations", nlohmann::json::array()))
      why += (why.empty() ? "" : "; ") + v.get<std::string>();
    std::fprintf(stderr, "qcal %s: the gate failed: %s (the output is at %s)\n", cmd.c_str(),
                 terminal_safe(why).c_str(), spec.output.path.c_str());
    return 3;
  }
  return 0;
}

// ---------------------------------------------------------------- plan
// The plan `qcal quantize` (and the coordinator, for workers of --memory-gb) makes of
// the same flags, without running it: every check of the planner (common/planner.h),
// then the summary (tasks, critical path, peak task, store bytes) and each task
// type's largest estimate by part (common/memory_model.h).
std::vector<FlagSpec> plan_flags() {
  const std::string run = "This plan";
  return concat_flags(spec_flags(),
                      {
                          {"memory-gb", "X", "physical memory",
                           "the memory of one worker (tasks are sized to 0.8 of it)", run},
                          {"tasks", "", "", "also list every task with its estimate", run},
                          {"json", "", "", "print the plan (summary and tasks) as JSON", run},
                      });
}

int cmd_plan(const Flags& f) {
  const std::string cmd = "plan";
  CLI_ASSIGN(cmd, nlohmann::json spec_json, job_spec_json_from_flags(f));
  CLI_ASSIGN(cmd, JobSpec spec, parse_job_spec(spec_json));
  PlannerLimits limits;
  if (f.has("memory-gb")) {
    CLI_ASSIGN(cmd, double gb, f.number("memory-gb", 0));
    if (!(gb > 0) || gb > 1e9) return cli_fail(cmd, invalid_input("--memory-gb must be positive"));
    limits.worker_memory_bytes = static_cast<uint64_t>(gb * 1073741824.0);
  } else {
    limits.worker_memory_bytes = static_cast<uint64_t>(::sysconf(_SC_PHYS_PAGES)) *
                                 static_cast<uint64_t>(::sysconf(_SC_PAGE_SIZE));
  }
  CLI_ASSIGN(cmd, Plan p, plan_job(spec, limits));
  const nlohmann::json& sum = p.summary;
  if (f.flag("json")) {
    nlohmann::json tasks = nlohmann::json::array();
    for (const TaskDef& t : p.tasks)
      tasks.push_back({{"id", t.id},
                       {"type", t.type},
                       {"deps", t.deps},
                       {"params", t.params},
                       {"mem_bytes", t.mem_bytes}});
    std::cout << nlohmann::json{{"summary", sum}, {"tasks", tasks}}.dump() << std::endl;
    return 0;
  }
  auto bytes = [&](const char* key) { return format_bytes(sum[key].get<uint64_t>()); };
  std::printf("%s, %lld layers, format %s, %llu calibration sequences\n",
              sum["method"].get<std::string>().c_str(),
              static_cast<long long>(sum["layers"].get<int64_t>()),
              sum["format"].get<std::string>().c_str(),
              static_cast<unsigned long long>(sum["calib_sequences"].get<uint64_t>()));
  std::printf("  tasks          %zu\n", p.tasks.size());
  std::printf("  critical path  %lld tasks\n",
              static_cast<long long>(sum["critical_path"].get<int64_t>()));
  std::printf("  peak task      %s, %s of %s per worker\n",
              sum["peak"]["task"].get<std::string>().c_str(),
              format_bytes(sum["peak"]["bytes"].get<uint64_t>()).c_str(),
              bytes("worker_memory_bytes").c_str());
  std::printf("  store          %s (artifacts and output)\n", bytes("store_bytes").c_str());
  // Each task type: how many, and its largest estimate by part.
  std::vector<std::string> types;
  for (const TaskDef& t : p.tasks)
    if (std::find(types.begin(), types.end(), t.type) == types.end()) types.push_back(t.type);
  std::printf("\n  %-12s %6s  %-20s %10s  %s\n", "type", "tasks", "largest", "estimate",
              "parts (phase/part: held during that phase only)");
  for (const std::string& type : types) {
    const TaskDef* big = nullptr;
    size_t n = 0;
    for (const TaskDef& t : p.tasks)
      if (t.type == type) {
        ++n;
        if (!big || t.mem_bytes > big->mem_bytes) big = &t;
      }
    std::string parts;
    const nlohmann::json& e = sum["estimates"][big->id];
    for (auto it = e.begin(); it != e.end(); ++it) {
      if (it.key() == "total") continue;
      if (!parts.empty()) parts += ", ";
      parts += it.key() + " " + format_bytes(it.value().get<uint64_t>());
    }
    std::printf("  %-12s %6zu  %-20s %10s  %s\n", type.c_str(), n, big->id.c_str(),
                format_bytes(big->mem_bytes).c_str(), parts.c_str());
  }
  if (f.flag("tasks")) {
    std::printf("\n");
    for (const TaskDef& t : p.tasks) {
      std::string deps;
      for (const std::string& d : t.deps) deps += (deps.empty() ? "" : " ") + d;
      std::printf("  %-20s %10s  <- %s\n", t.id.c_str(), format_bytes(t.mem_bytes).c_str(),
                  deps.empty() ? "-" : deps.c_str());
    }
  }
  return 0;
}

// ---------------------------------------------------------------- eval
// Any checkpoint kind, streamed layer by layer (worker/calib/native_eval.h
// open_eval_model, worker/engine/eval.h evaluate_stream); with IntactKV every
// sequence must begin with the prefix (methods.md §6.2).
std::vector<FlagSpec> eval_flags() {
  const EvalOptions d;
  return {
      {"model", "DIR", "",
       "the checkpoint: FP, GPTQ, compressed-tensors, or native qcal (quantized integer "
       "kernels; required)",
       ""},
      {"data", "FILE", "", "evaluation tokens, .jsonl or .u32 (required)", ""},
      {"seqlen", "N", "2048", "tokens per sequence", ""},
      {"nsamples", "N", "0 = all", "evaluation sequences", ""},
      {"batch", "N", std::to_string(d.batch), "sequences per forward batch (memory only)", ""},
      {"head-rows", "N", std::to_string(d.head_rows),
       "lm_head rows (vocabulary entries) scored at a time (memory only)", ""},
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

// ---------------------------------------------------------------- registry
// The method registry (common/method_registry.h): every method row with its options,
// as a table, as JSON, or as the OpenAPI schema of the recipe object (which
// api/openapi.yaml embeds between its "generated" markers; a test keeps them equal).
int cmd_registry(const Flags& f) {
  const std::string cmd = "registry";
  if (f.flag("openapi")) {
    std::cout << recipe_openapi_yaml();
    return 0;
  }
  nlohmann::json rows = nlohmann::json::array();
  for (const MethodRow& r : method_registry()) {
    nlohmann::json opts = nlohmann::json::array();
    for (const OptionSpec& o : r.options) {
      nlohmann::json j = {{"key", o.key}, {"default", o.def}, {"help", o.help}};
      if (!o.flag.empty()) j["flag"] = "--" + o.flag;
      if (!o.neg_flag.empty()) j["negative_flag"] = "--" + o.neg_flag;
      if (o.type == OptType::kInt || o.type == OptType::kNum) j["range"] = {o.min, o.max};
      if (!o.choices.empty()) j["choices"] = o.choices;
      opts.push_back(j);
    }
    rows.push_back({{"name", r.name},
                    {"kind", method_kind_name(r.kind)},
                    {"summary", r.summary},
                    {"block_task", r.block_task},
                    {"whole_model", r.whole_model},
                    {"rotates_residual", r.rotates_residual},
                    {"independent_blocks", r.independent_blocks},
                    {"needs", {{"fp_inputs", r.needs.fp_inputs}, {"act_stats", r.needs.act_stats}}},
                    {"options", opts}});
  }
  if (f.flag("json")) {
    std::cout << rows.dump(2) << std::endl;
    return 0;
  }
  for (const nlohmann::json& r : rows) {
    std::printf("%-14s %-15s %s\n", r["kind"].get<std::string>().c_str(),
                r["name"].get<std::string>().c_str(), r["summary"].get<std::string>().c_str());
    std::string traits;
    for (const char* t : {"block_task", "whole_model", "rotates_residual"})
      if (r[t].get<bool>()) traits += std::string(traits.empty() ? "" : ", ") + t;
    if (!r["independent_blocks"].get<bool>())
      traits += std::string(traits.empty() ? "" : ", ") + "chained blocks";
    if (!traits.empty()) std::printf("%31s(%s)\n", "", traits.c_str());
    for (const nlohmann::json& o : r["options"]) {
      std::string flag = o.value("flag", o.value("negative_flag", std::string("")));
      std::printf("%31s%-22s %-18s default %s\n", "", o["key"].get<std::string>().c_str(),
                  flag.c_str(), o["default"].dump().c_str());
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
       "quantize a model in this process (the same job as qcal submit)",
       "The same job as `qcal submit` with the same flags, planned into block tasks and run in\n"
       "this process (so the output is byte-identical to the service's). Weight-only rtn/gptq\n"
       "is the recipe without a transform. The output is GPTQ when everything folds into the\n"
       "weights, else a native qcal checkpoint (docs/NATIVE_FORMAT.md); --format chooses.\n"
       "Threads: QCAL_THREADS (default: all cores). Exit status: 0 done, 1 or 2 an error\n"
       "(nothing written), 3 the gate (--max-ppl-increase, --max-kl) failed: the output\n"
       "and --report are written, as the service keeps a failed job's output.",
       quantize_flags(), cmd_quantize},
      {"plan", section, "--model DIR --calib FILE --out DIR [flags]",
       "show the plan of a job (tasks, critical path, memory, store) without running it",
       "The planner's view of the job the same flags describe (`qcal quantize`, `qcal submit`):\n"
       "every check the coordinator makes before accepting it, then the task count, the\n"
       "critical path, the peak task's memory estimate, the store space, and each task\n"
       "type's largest estimate by part. --memory-gb sizes the workers (as the coordinator's\n"
       "--worker-mem-gb); a job that does not fit is refused with the numbers.",
       plan_flags(), cmd_plan},
      {"eval", section, "--model DIR --data FILE [flags]",
       "perplexity of a checkpoint, and KL / top-1 agreement against its FP model",
       "With IntactKV, every sequence must begin with the checkpoint's prefix.", eval_flags(),
       cmd_eval},
      {"registry",
       section,
       "[flags]",
       "the methods and their recipe options (the method registry)",
       "Every method row: its kind (transform, weight solver, reconstruction, add-on), what\n"
       "it needs captured, whether its blocks run as independent tasks, and its options\n"
       "with flag, default and range. --openapi prints the recipe object's OpenAPI schema\n"
       "(what api/openapi.yaml embeds).",
       {{"json", "", "", "print the registry as JSON", ""},
        {"openapi", "", "", "print the recipe object's OpenAPI schema (YAML)", ""}},
       cmd_registry},
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

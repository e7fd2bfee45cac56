#include "worker/engine/quantize.h"

#include <cmath>
#include <map>
#include <memory>

#include "common/clock.h"
#include "common/log.h"
#include "worker/engine/model.h"

namespace qcal {

namespace {

// Capture groups of the sequential walk. Projections in one inner list share
// the same input, so one Hessian serves them all.
using InputGroup = std::vector<std::string>;
std::vector<std::vector<InputGroup>> capture_plan(bool true_sequential) {
  InputGroup qkv = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"};
  InputGroup o = {"self_attn.o_proj"};
  InputGroup gu = {"mlp.gate_proj", "mlp.up_proj"};
  InputGroup down = {"mlp.down_proj"};
  if (true_sequential) return {{qkv}, {o}, {gu}, {down}};
  return {{qkv, o, gu, down}};
}

// Runs the block over every calibration batch on a scratch copy of x, calling
// `hook` with each linear input. Returns the block output when `out` is set.
void run_block(const ModelConfig& c, const LayerWeights& w, const Tensor& x, int64_t n_seq,
               int64_t T, int64_t batch, const LinearInputHook& hook, Tensor* out) {
  const int64_t H = c.hidden_size;
  std::vector<float> scratch;
  if (out) *out = Tensor({n_seq * T, H});
  for (int64_t b0 = 0; b0 < n_seq; b0 += batch) {
    int64_t nb = std::min(batch, n_seq - b0);
    const float* src = x.ptr() + b0 * T * H;
    float* dst;
    if (out) {
      dst = out->ptr() + b0 * T * H;
    } else {
      scratch.assign(src, src + nb * T * H);
      dst = scratch.data();
    }
    if (out) std::copy(src, src + nb * T * H, dst);
    block_forward(c, w, dst, nb, T, hook);
  }
}

double rel_error(const Tensor& ref, const Tensor& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.data.size(); ++i) {
    double d = static_cast<double>(ref.data[i]) - got.data[i];
    num += d * d;
    den += static_cast<double>(ref.data[i]) * ref.data[i];
  }
  return den > 0 ? num / den : num;
}

}  // namespace

Result<WeightMethod> parse_weight_method(const std::string& name) {
  if (name == "rtn") return WeightMethod::kRtn;
  if (name == "gptq") return WeightMethod::kGptq;
  return invalid_input("unknown method '" + name + "' (expected rtn or gptq)");
}

nlohmann::json QuantizeReport::to_json() const {
  nlohmann::json j;
  j["seconds"] = seconds;
  j["layers"] = nlohmann::json::array();
  for (const auto& l : layers) {
    j["layers"].push_back({{"layer", l.layer},
                           {"rel_output_error", l.rel_output_error},
                           {"seconds", l.seconds},
                           {"proj_losses", l.proj_losses}});
  }
  return j;
}

Status check_quantize_inputs(const LlamaModel& model, const QuantizeOptions& opts) {
  QCAL_RETURN_IF_ERROR(opts.spec.validate());
  if (opts.batch <= 0) return invalid_input("batch must be positive");
  if (model.dir().quantization_config())
    return invalid_input(model.dir().dir() +
                         ": model is already quantized (config.json has quantization_config)");
  QCAL_RETURN_IF_ERROR(model.dir().validate_fp_model());
  // Refuse unwritable shapes before hours of work, naming the module.
  for (const char* proj : kProjNames) {
    auto shape = proj_shape(model.config(), proj);
    QuantizedLinear probe;
    probe.out_features = shape[0];
    probe.in_features = shape[1];
    probe.spec = opts.spec;
    probe.act_order = opts.method == WeightMethod::kGptq && opts.gptq.act_order;
    QCAL_RETURN_IF_ERROR(check_writable(probe, opts.write.format).with_context(proj));
  }
  return Status::ok();
}

Result<LayerReport> quantize_layer(const LlamaModel& model, int64_t l, Tensor& x, int64_t T,
                                   const QuantizeOptions& opts,
                                   std::map<std::string, QuantizedLinear>* out,
                                   const HessianReduce& reduce) {
  const double t_layer = steady_seconds();
  const ModelConfig& c = model.config();
  const int64_t N = x.numel() / (T * c.hidden_size);
  LayerReport lr;
  lr.layer = l;
  QCAL_ASSIGN_OR_RETURN(LayerWeights w, model.load_layer(l));
  // The FP output first, so no second copy of the layer's weights is kept.
  Tensor y_fp;
  run_block(c, w, x, N, T, opts.batch, nullptr, &y_fp);

  for (const auto& step : capture_plan(opts.true_sequential)) {
    std::map<std::string, std::unique_ptr<HessianAccumulator>> acc;  // by first proj of group
    if (opts.method == WeightMethod::kGptq) {
      for (const auto& group : step) {
        int64_t in = proj_shape(c, group[0])[1];
        acc[group[0]] = std::make_unique<HessianAccumulator>(in);
      }
      LinearInputHook hook = [&](const std::string& proj, const float* xin, int64_t rows, int64_t) {
        auto it = acc.find(proj);
        if (it != acc.end()) it->second->add_batch(xin, rows, rows / T);
      };
      run_block(c, w, x, N, T, opts.batch, hook, nullptr);
      if (reduce) {
        for (auto& [proj, a] : acc) QCAL_RETURN_IF_ERROR(reduce(*a));
      }
    }
    for (const auto& group : step) {
      Tensor hess;
      if (opts.method == WeightMethod::kGptq) hess = acc[group[0]]->hessian();
      acc.erase(group[0]);
      for (const auto& proj : group) {
        const std::string name = layer_prefix(l) + proj;
        QuantizedLinear q;
        if (opts.method == WeightMethod::kGptq) {
          QCAL_ASSIGN_OR_RETURN(GptqResult r,
                                gptq_quantize(w.proj(proj), hess, opts.spec, opts.gptq));
          if (r.fell_back_to_rtn) LOG_WARN << name << ": GPTQ fell back to RTN";
          lr.proj_losses[proj] = r.loss;
          q = std::move(r.qlinear);
        } else {
          QCAL_ASSIGN_OR_RETURN(q, rtn_quantize(w.proj(proj), opts.spec));
        }
        w.proj(proj) = q.dequantize();
        (*out)[name] = std::move(q);
      }
    }
  }

  // The next layer sees the quantized model's activations (§2.3).
  Tensor y_q;
  run_block(c, w, x, N, T, opts.batch, nullptr, &y_q);
  lr.rel_output_error = rel_error(y_fp, y_q);
  for (float v : y_q.data) {
    if (!std::isfinite(v))
      return internal_error("layer " + std::to_string(l) +
                            ": non-finite activation after quantization");
  }
  x = std::move(y_q);
  lr.seconds = steady_seconds() - t_layer;
  LOG_INFO << "layer " << l << "/" << c.num_hidden_layers << ": rel output error "
           << lr.rel_output_error << " (" << lr.seconds << " s)";
  return lr;
}

Result<QuantizeReport> quantize_model(const std::string& model_dir, const TokenSequences& calib,
                                      const QuantizeOptions& opts, const std::string& out_dir,
                                      const ProgressFn& progress) {
  const double t_start = steady_seconds();
  QCAL_ASSIGN_OR_RETURN(auto model, LlamaModel::open(model_dir));
  QCAL_RETURN_IF_ERROR(check_quantize_inputs(*model, opts));
  if (calib.count() == 0) return invalid_input("calibration data holds no complete sequence");
  const ModelConfig& c = model->config();
  QCAL_ASSIGN_OR_RETURN(Tensor x, model->embed(calib, 0, calib.count()));  // (N*T, H)

  QuantizeReport report;
  std::map<std::string, QuantizedLinear> qlinears;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    QCAL_ASSIGN_OR_RETURN(LayerReport lr,
                          quantize_layer(*model, l, x, calib.seqlen, opts, &qlinears));
    report.layers.push_back(std::move(lr));
    if (progress) progress(l + 1, c.num_hidden_layers);
  }
  QCAL_RETURN_IF_ERROR(
      write_quantized_checkpoint(model->dir(), qlinears, checkpoint_write_options(opts), out_dir));
  report.seconds = steady_seconds() - t_start;
  return report;
}

WriteOptions checkpoint_write_options(const QuantizeOptions& opts) {
  WriteOptions w = opts.write;
  if (opts.method == WeightMethod::kGptq) {
    w.extra_config["damp_percent"] = opts.gptq.percdamp;
    w.extra_config["static_groups"] = opts.gptq.static_groups;
    w.extra_config["true_sequential"] = opts.true_sequential;
  }
  return w;
}

}  // namespace qcal

// weight solver "gptq" (methods.md §2): per linear, Hessian-aware rounding with
// the Hessian H = 2/N Σ x xᵀ of the linear's inputs as the deployed block sees
// them (transformed, activation-quantized), accumulated per micro-batch from
// the block's input stream. True-sequential (the default): the groups
// {q,k,v} → {o} → {gate,up} → {down} are solved in turn, each group's Hessians
// taken on the block whose earlier groups are already quantized (§2.3).
// Data parallel: each rank accumulates its shard of the sequences; the raw sums
// and sample counts are summed across the group before the solver, so a group
// computes one rank's Hessian up to the order of that sum.
#include "worker/engine/gptq.h"

#include <memory>

#include "common/log.h"
#include "worker/calib/method.h"

namespace qcal::calib {
namespace {

int proj_index(const std::string& name) {
  for (int p = 0; p < kNumProj; ++p)
    if (name == kProjNames[p]) return p;
  return -1;
}

class Gptq : public WeightSolverMethod {
 public:
  bool needs_inputs() const override { return true; }
  Status round(const BlockInputs& in, Deployed& dl, const ActivationSource* x,
               std::array<QuantizedLinear, kNumProj>* out, nlohmann::json* report) const override {
    const ModelConfig& c = *in.c;
    const Recipe& r = *in.r;
    if (!x) return internal_error("gptq: layer " + std::to_string(in.layer) + " has no inputs");
    const QuantSpec spec = weight_spec(r);
    GptqOptions go;
    go.percdamp = r.f("gptq.percdamp");
    go.blocksize = r.i("gptq.blocksize");
    go.act_order = r.b("gptq.act_order");
    go.static_groups = r.b("gptq.static_groups");
    const int64_t T = x->seqlen();
    std::vector<std::vector<int>> groups = {{kQ, kK, kV}, {kO}, {kGate, kUp}, {kDown}};
    if (!r.b("gptq.true_sequential")) groups = {{kQ, kK, kV, kO, kGate, kUp, kDown}};
    static const BlockClipT<float> kNoClip;
    for (const auto& group : groups) {
      // One Hessian per linear: each has its own activation quantizer (FlatQuant learns a
      // clip per linear), so q/k/v's inputs differ once quantized.
      std::array<std::unique_ptr<HessianAccumulator>, kNumProj> acc;
      for (int p : group) acc[p] = std::make_unique<HessianAccumulator>(proj_in(c, p));
      LinearInputHook hook = [&](const std::string& proj, const float* xin, int64_t rows,
                                 int64_t cols) {
        const int p = proj_index(proj);
        if (p >= 0 && acc[p] && cols == proj_in(c, p)) acc[p]->add_batch(xin, rows, rows / T);
      };
      QBlock<float> qb(c, &dl.w, &dl.online, &dl.q, &kNoClip);
      QCAL_RETURN_IF_ERROR(stream_block(qb, *x, nullptr, r.batch(), hook));
      if (in.sum_f && in.sum && in.ranks > 1) {
        for (int p : group) {
          if (!acc[p]) continue;
          std::vector<float>& raw = acc[p]->raw_sum();
          QCAL_RETURN_IF_ERROR(in.sum_f(raw.data(), static_cast<int64_t>(raw.size())));
          double ns = static_cast<double>(acc[p]->nsamples());
          QCAL_RETURN_IF_ERROR(in.sum(&ns, 1));
          // rows == 0 only counts sequences: nsamples becomes the group's total.
          acc[p]->add_batch(nullptr, 0, static_cast<int64_t>(ns) - acc[p]->nsamples());
        }
      }
      for (int p : group) {
        Tensor H = acc[p]->hessian();
        acc[p].reset();
        // The solver takes the Hessian (released once factored) and the weight itself
        // (dl.w.w[p] is replaced by the dequantized codes below): no copies held.
        Tensor W;
        W.shape = {proj_out(c, p), proj_in(c, p)};
        W.data = std::move(dl.w.w[p]);
        auto res = gptq_quantize(W, std::move(H), spec, go);
        if (!res.is_ok())
          return res.status().with_context("layer " + std::to_string(in.layer) + " " +
                                           kProjNames[p]);
        if (res->fell_back_to_rtn)
          LOG_WARN << "layer " << in.layer << " " << kProjNames[p] << ": GPTQ fell back to RTN";
        if (report) (*report)["proj_losses"][kProjNames[p]] = res->loss;
        (*out)[p] = std::move(res->qlinear);
        dl.w.w[p] = (*out)[p].dequantize().data;
      }
    }
    return Status::ok();
  }
};

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_WEIGHT_SOLVER("gptq", qcal::calib::Gptq)

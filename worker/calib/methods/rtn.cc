// weight solver "rtn": round to nearest on the recipe's grid (quantizer.h),
// per linear, with the optional MSE range search. Needs no data.
#include "worker/calib/method.h"

namespace qcal::calib {
namespace {

class Rtn : public WeightSolverMethod {
 public:
  bool needs_inputs() const override { return false; }
  Status round(const BlockInputs& in, Deployed& dl, const ActivationSource*,
               std::array<QuantizedLinear, kNumProj>* out, nlohmann::json*) const override {
    const ModelConfig& c = *in.c;
    const QuantSpec spec = weight_spec(*in.r);
    for (int p = 0; p < kNumProj; ++p) {
      auto q = rtn_quantize(proj_tensor(c, dl.w.w[p], p), spec);
      if (!q.is_ok())
        return q.status().with_context("layer " + std::to_string(in.layer) + " " + kProjNames[p]);
      (*out)[p] = std::move(q).value();
      dl.w.w[p] = (*out)[p].dequantize().data;
    }
    return Status::ok();
  }
};

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_WEIGHT_SOLVER("rtn", qcal::calib::Rtn)

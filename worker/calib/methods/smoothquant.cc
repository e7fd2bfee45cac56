// transform "smoothquant" (methods.md §1): per-channel smoothing s_j =
// max|X_j|^α / max|W_j|^(1−α) of the q/k/v and gate/up inputs, from the FP
// capture's activation statistics; γ/s folds into the norms, diag(s) into the
// consumers. Exact in exact arithmetic: nothing stays online.
#include "worker/calib/method.h"

namespace qcal::calib {
namespace {

class SmoothQuant : public TransformMethod {
 public:
  Result<Deployed> deploy(const BlockInputs& in, const Fitted&) const override {
    if (!in.stats)
      return internal_error("smoothquant: layer " + std::to_string(in.layer) +
                            " has no activation statistics");
    Deployed dl;
    dl.w = *in.w;
    smooth_layer(dl.w, in.stats->attn, in.stats->mlp, in.r->f("sq_alpha"));
    dl.q = deployed_spec(*in.r, *in.c, nullptr);
    return dl;
  }
};

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_TRANSFORM("smoothquant", qcal::calib::SmoothQuant)

// transform "none": the block as the checkpoint has it; only the recipe's
// activation / K/V quantizers are added.
#include "worker/calib/method.h"

namespace qcal::calib {
namespace {

class NoTransform : public TransformMethod {
 public:
  Result<Deployed> deploy(const BlockInputs& in, const Fitted&) const override {
    Deployed dl;
    dl.w = *in.w;
    dl.q = deployed_spec(*in.r, *in.c, nullptr);
    return dl;
  }
};

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_TRANSFORM("none", qcal::calib::NoTransform)

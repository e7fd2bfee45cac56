// transform "quarot" (methods.md §3): a random Hadamard R1 = D·H (seeded: every
// task regenerates it) on the residual stream, Hadamards as R2 per head, and the
// online Hadamards when activations or the K/V cache are quantized.
#include "kernels/hadamard.h"
#include "worker/calib/methods/rotation.h"

namespace qcal::calib {
namespace {

class QuaRot : public TransformMethod {
 public:
  Result<Deployed> deploy(const BlockInputs& in, const Fitted&) const override {
    if (in.R1 && !in.R1->empty())
      return deploy_rotated(in, *in.R1, hadamard_matrix(in.c->head_dim), /*heads_online=*/true);
    return deploy_rotated(in, residual_rotation(*in.c, *in.r, nullptr),
                          hadamard_matrix(in.c->head_dim), /*heads_online=*/true);
  }
  std::vector<double> residual_rotation(const ModelConfig& c, const Recipe& r,
                                        const Fitted*) const override {
    return random_hadamard_matrix(c.hidden_size, r.seed());
  }
  bool folds_final_norm() const override { return true; }
};

}  // namespace
}  // namespace qcal::calib

QCAL_REGISTER_TRANSFORM("quarot", qcal::calib::QuaRot)

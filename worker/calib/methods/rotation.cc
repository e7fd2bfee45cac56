#include "worker/calib/methods/rotation.h"

#include "kernels/hadamard.h"

namespace qcal::calib {

Deployed deploy_rotated(const BlockInputs& in, const std::vector<double>& R1,
                        const std::vector<double>& R2, bool heads_online) {
  const ModelConfig& c = *in.c;
  const Recipe& r = *in.r;
  const bool fold = r.transforms_fold();
  BlockWeightsT<float> w = *in.w;
  fold_block_norms(w, c);
  rotate_block(w, c, R1);
  BlockTransformsT<double> t;
  // V/O: pv per head on the V output, folded; on the o input as (po ⊗ pv)⁻ᵀ with the
  // cross-head po online (QuaRot §3.2 step 4; SpinQuant keeps it too, rotation.h).
  t.pv = R2;
  t.pv_it = R2;  // orthogonal
  if (!fold && heads_online) {
    t.po = hadamard_matrix(c.num_attention_heads);
    t.po_it = t.po;
  }
  // R4: W_down ← W_down·H_I offline, z·H_I online (a Kronecker pair for the kernel).
  if (!fold) {
    hadamard_kron_factors(c.intermediate_size, &t.d1, &t.d2);
    t.d1_it = t.d1;
    t.d2_it = t.d2;
  }
  // R3: Hadamard on K (and Q) after RoPE, only when K is quantized.
  if (r.kv_bits() < 16) {
    t.pk = hadamard_matrix(c.head_dim);
    t.pk_it = t.pk;
  }
  static const BlockClipT<double> kNoClip;
  BlockQuantSpec off;  // the effective weights need no quantizer
  Deployed dl = deploy_block(c, std::move(w), t, off, kNoClip);
  dl.q = deployed_spec(r, c, nullptr);
  return dl;
}

}  // namespace qcal::calib

// Checkpoints of every format as EvalModels (see native_eval.h).
// Letters: B sequences, T tokens per sequence, P IntactKV prefix, H hidden.
#include "worker/calib/native_eval.h"

#include <utility>
#include <vector>

namespace qcal::calib {

namespace {

class NativeEvalModel final : public EvalModel {
 public:
  explicit NativeEvalModel(std::unique_ptr<NativeCheckpoint> ck) : ck_(std::move(ck)) {}
  const ModelConfig& config() const override { return ck_->config(); }
  const std::vector<int32_t>& prefix() const override { return ck_->meta().intact_prefix; }
  Status embed(const int32_t* ids, int64_t n, float* x) const override {
    return ck_->read_embed_rows(ids, n, x);
  }
  Status forward_layer(int64_t l, float* x, int64_t B, int64_t T) const override {
    QCAL_ASSIGN_OR_RETURN(const NativeLayer y, ck_->read_layer(l));
    const int64_t P = static_cast<int64_t>(prefix().size());
    std::vector<float> k, v;  // (P, n_kv·d) each
    if (P > 0) QCAL_RETURN_IF_ERROR(ck_->read_intact_kv(l, &k, &v));
    native_layer_forward(config(), ck_->meta().w_bits, y, P > 0 ? k.data() : nullptr,
                         P > 0 ? v.data() : nullptr, P, x, B, T);
    return Status::ok();
  }
  Result<std::vector<float>> final_norm() const override { return ck_->read_final_norm(); }
  Status head_rows(int64_t v0, int64_t n, float* out) const override {
    return ck_->read_lm_head_rows(v0, n, out);
  }
  Status prefix_logits(int64_t p, int64_t v0, int64_t n, float* out) const override {
    return ck_->read_intact_logits(p, v0, n, out);
  }

 private:
  std::unique_ptr<NativeCheckpoint> ck_;
};

}  // namespace

std::unique_ptr<EvalModel> native_eval_model(std::unique_ptr<NativeCheckpoint> ck) {
  return std::make_unique<NativeEvalModel>(std::move(ck));
}

Result<std::unique_ptr<EvalModel>> open_eval_model(const std::string& dir) {
  if (is_native_dir(dir)) {
    QCAL_ASSIGN_OR_RETURN(std::unique_ptr<NativeCheckpoint> ck, NativeCheckpoint::open(dir));
    return native_eval_model(std::move(ck));
  }
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> m, LlamaModel::open(dir));
  return LlamaEvalModel::owning(std::move(m));
}

}  // namespace qcal::calib

#include "worker/calib/method.h"

#include <map>
#include <mutex>

namespace qcal::calib {

namespace {
template <typename M>
std::map<std::string, const M*>& table() {
  static std::map<std::string, const M*> t;
  return t;
}
}  // namespace

Result<Fitted> TransformMethod::learn(const WholeModelInputs&, nlohmann::json*) const {
  return Fitted();
}
Result<Fitted> TransformMethod::fit(const BlockInputs&, nlohmann::json*) const { return Fitted(); }
std::vector<double> TransformMethod::residual_rotation(const ModelConfig&, const Recipe&,
                                                       const Fitted*) const {
  return {};
}

bool register_transform(const std::string& name, const TransformMethod* m) {
  table<TransformMethod>()[name] = m;
  return true;
}
bool register_weight_solver(const std::string& name, const WeightSolverMethod* m) {
  table<WeightSolverMethod>()[name] = m;
  return true;
}

const TransformMethod* transform_method(const std::string& name) {
  auto it = table<TransformMethod>().find(name);
  return it == table<TransformMethod>().end() ? nullptr : it->second;
}
const WeightSolverMethod* weight_solver_method(const std::string& name) {
  auto it = table<WeightSolverMethod>().find(name);
  return it == table<WeightSolverMethod>().end() ? nullptr : it->second;
}

QuantSpec weight_spec(const Recipe& r) {
  QuantSpec s;
  s.bits = r.w_bits();
  s.group_size = r.w_group();
  s.sym = r.w_sym();
  s.mse_clip = r.b("w_mse_clip");
  s.narrow = r.narrow_grid();
  return s;
}

Tensor proj_tensor(const ModelConfig& c, const std::vector<float>& W, int p) {
  Tensor t({proj_out(c, p), proj_in(c, p)});
  std::copy(W.begin(), W.end(), t.data.begin());
  return t;
}

Status stream_block(const QBlock<float>& qb, const ActivationSource& src, ActivationSink* sink,
                    int64_t batch, const LinearInputHook& hook) {
  const int64_t N = src.sequences(), T = src.seqlen(), e = src.seq_elems();
  batch = std::max<int64_t>(1, batch);
  std::vector<float> x(static_cast<size_t>(std::min(batch, std::max<int64_t>(N, 1)) * e)),
      y(x.size());
  for (int64_t b0 = 0; b0 < N; b0 += batch) {
    const int64_t nb = std::min(batch, N - b0);
    QCAL_RETURN_IF_ERROR(src.read(b0, nb, x.data()));
    qb.forward(x.data(), y.data(), nb, T, nullptr, hook);
    if (sink) QCAL_RETURN_IF_ERROR(sink->append(y.data(), nb));
  }
  return Status::ok();
}

}  // namespace qcal::calib

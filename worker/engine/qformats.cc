// Placeholder until the format writer/reader lands: reads FP weights only.
#include "worker/engine/qformats.h"

namespace qcal {

Result<Tensor> read_linear_weight(const ModelDir& dir, const std::string& prefix) {
  return dir.read_f32(prefix + ".weight");
}

}  // namespace qcal

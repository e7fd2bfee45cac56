#include "common/format_rules.h"

#include "common/model_dir.h"

namespace qcal {

namespace {
std::string num(int64_t v) { return std::to_string(v); }
}  // namespace

Status check_linear_writable(int64_t O, int64_t I, int bits, int64_t group,
                             const std::string& format) {
  if (O <= 0 || I <= 0)
    return invalid_input("shape [" + num(O) + ", " + num(I) + "] is not positive");
  if (group == 0 || group < -1) return invalid_input("group size " + num(group) + " is not valid");
  if (format == "native") {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 6 && bits != 8 && bits != 16)
      return invalid_input("the native format holds 2, 3, 4, 6, 8 or 16-bit weights, not " +
                           num(bits));
    return Status::ok();
  }
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    return invalid_input("bits " + num(bits) + " (expected 2, 3, 4 or 8)");
  if (format == "compressed-tensors") {
    if (bits != 4 && bits != 8)
      return invalid_input(
          "compressed-tensors pack-quantized is written for 4 or 8 bits only, got " + num(bits) +
          " (3-bit packing differs between versions; use gptq)");
    return Status::ok();
  }
  if (format != "gptq") return invalid_input("unknown format '" + format + "'");
  const std::string need =
      bits == 3 ? std::string("need a multiple of 32") : "need a multiple of " + num(32 / bits);
  if (I * bits % 32 != 0)
    return invalid_input("GPTQ qweight packs in_features along 32-bit words: in_features " +
                         num(I) + " times " + num(bits) + " bits is not a multiple of 32 (" +
                         need + ")");
  if (O * bits % 32 != 0)
    return invalid_input("GPTQ qzeros packs out_features along 32-bit words: out_features " +
                         num(O) + " times " + num(bits) + " bits is not a multiple of 32 (" +
                         need + ")");
  return Status::ok();
}

Status check_model_writable(const ModelConfig& c, const Recipe& r, const std::string& format) {
  if (r.w_bits() >= 16) {
    if (format != "native")
      return invalid_input("output.format " + format + ": holds quantized weights; w_bits is 16");
    return Status::ok();
  }
  for (const char* proj : kProjNames) {
    const std::vector<int64_t> s = proj_shape(c, proj);
    Status st = check_linear_writable(s[0], s[1], r.w_bits(), r.w_group(), format);
    if (!st.is_ok())
      return st.with_context("output.format " + format + ": model.layers.*." + proj);
  }
  return Status::ok();
}

}  // namespace qcal

// The one quantization recipe (issue #10): every job — weight-only RTN/GPTQ
// included — is a transform × weight solver × reconstruction (× IntactKV)
// with quantizer bit widths, one schema for `qcal quantize` flags, the REST
// API's recipe object and the engine. Its keys, types, defaults and caps are
// the rows of the method registry (common/method_registry.h): a Recipe is a
// value for every key of every row, so a method's options need no field here.
//
// JSON (recipe_from_json / Recipe::to_json): one object whose keys are the
// registry's option keys; a dotted key "gptq.percdamp" is the member
// "percdamp" of the object "gptq". Unknown keys are errors. "method" is an
// alias: rtn | gptq | lora-rounding set weight_solver, a transform name sets
// transform.
//
// The weight-only form of earlier versions ({"method": "gptq", "w_bits",
// "group_size", "sym", "act_order", "static_groups", "damp", "mse_clip",
// "true_sequential", "mode", "window", "overlap", "seed"}: a recipe whose
// method is rtn or gptq and whose keys are all of that list) keeps working and
// is mapped onto the one recipe: group_size → w_group (default 128 in that
// form), sym → w_sym, damp/act_order/static_groups/true_sequential → gptq.*,
// mse_clip → w_mse_clip, window → blocks_per_task; overlap must be 0. A key of
// that form mixed with the one recipe's keys is refused with the key to use.
//
// Thread safety: a Recipe is a value; const methods are safe concurrently.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/model_config.h"
#include "common/status.h"

namespace qcal {

class Recipe {
 public:
  // Every registry key at its default.
  Recipe();

  // Typed reads of a registry key. An unknown key or a read of the wrong type
  // is a programming error and aborts with the key's name.
  int64_t i(const std::string& key) const;
  double f(const std::string& key) const;  // numbers (integers read as doubles too)
  bool b(const std::string& key) const;
  const std::string& s(const std::string& key) const;
  std::vector<int32_t> ids(const std::string& key) const;

  // Sets `key` from a JSON value, checked against its registry row: the type,
  // the range (caps) and the choices. kInvalidInput naming the key and the
  // allowed values ("epochs: must be in [0, 100000] (got 1e9)").
  Status set(const std::string& key, const nlohmann::json& v);
  // set() for code and tests: aborts with the message on an invalid value.
  Recipe& with(const std::string& key, const nlohmann::json& v);
  // Whether the user gave `key` (recipe_from_json / set), as opposed to its default.
  bool given(const std::string& key) const { return given_.count(key) > 0; }

  // ---- The core keys, typed.
  const std::string& transform() const { return s("transform"); }
  const std::string& weight_solver() const { return s("weight_solver"); }
  const std::string& reconstruction() const { return s("reconstruction"); }
  int w_bits() const { return static_cast<int>(i("w_bits")); }
  int64_t w_group() const { return i("w_group"); }
  bool w_sym() const { return b("w_sym"); }
  int a_bits() const { return static_cast<int>(i("a_bits")); }
  int kv_bits() const { return static_cast<int>(i("kv_bits")); }
  bool intactkv() const { return b("intactkv"); }
  bool parallel() const { return s("mode") == "parallel"; }
  uint64_t seed() const { return static_cast<uint64_t>(i("seed")); }
  int64_t batch() const { return i("batch"); }
  bool reconstructs() const { return reconstruction() != "none"; }
  bool gptq() const { return weight_solver() == "gptq" && w_bits() < 16; }
  // FlatQuant learning only what folds into the weights (key flat_fold, weight-only).
  bool flat_fold() const { return transform() == "flatquant" && b("flat_fold"); }
  // The symmetric weight grid (key w_grid): true = narrow, absmax/(2^(b−1)−1); false =
  // full, 2·absmax/(2^b−1) (worker/engine/quantizer.h). auto is full exactly for the
  // weight-only case the ecosystem's tools cover: no transform (or FlatQuant with
  // flat_fold), no reconstruction, activations and K/V unquantized.
  bool narrow_grid() const;

  // True iff every transform folds into the weights offline (weight-only, and not
  // FlatQuant unless flat_fold): no online Hadamard / Kronecker factor is needed.
  bool transforms_fold() const;
  // transforms_fold() and no IntactKV cache: the result can be written as GPTQ /
  // compressed-tensors (a weight-only reconstruction folds completely too).
  bool folds_completely() const;
  // The transform leaves activation-side transforms online (QuaRot/SpinQuant
  // with quantized activations or K/V; FlatQuant unless it folds).
  bool keeps_online() const;
  // The IntactKV prefix: intactkv_prefix, or [c.bos_token_id] when empty.
  std::vector<int32_t> intactkv_prefix_for(const ModelConfig& c) const;

  // Rejects combinations that make no sense, naming the key and why (lora-rounding
  // without a reconstruction, an IntactKV prefix without intactkv,
  // nothing quantized, ...). Ranges are checked by set().
  Status validate() const;
  // The same without the "nothing is quantized" check (the transform-only
  // equivalence check of methods.md §10 item 6 runs all-16-bit recipes).
  Status validate_fields() const;
  // The checks that need the model's shapes: group sizes dividing every linear's
  // input (H, n_h·d, I) unless `allow_partial_groups`, FlatQuant's Kronecker
  // splits of H and I, a CBQ window no longer than the model, IntactKV prefix ids
  // inside the vocabulary. kInvalidInput naming the key, the layer and the sizes,
  // with the nearest group sizes that work.
  Status validate_for(const ModelConfig& c, bool allow_partial_groups = false) const;

  // Every key (dotted keys nested), defaults included: what the engine ran.
  nlohmann::json to_json() const;
  // A short display name: the transform, else the weight solver.
  std::string display_name() const;

 private:
  std::map<std::string, nlohmann::json> v_;
  std::map<std::string, bool> given_;
};

// Parses a recipe object (the one form, or the earlier weight-only form; see the
// top of this file) and checks every value (not validate(): callers do that once
// the whole spec is read). Errors name the key under `where` ("recipe.epochs").
Result<Recipe> recipe_from_json(const nlohmann::json& j, const std::string& where = "recipe");

// True iff `j` is in the earlier weight-only form (see the top of this file).
bool is_weight_only_form(const nlohmann::json& j);

// FlatQuant's get_decompose_dim: the Kronecker split n = a·b with a ≤ b closest
// to √n (smallest a ≥ ⌈√n⌉ with a² − n a square). kInvalidInput for n < 1 or
// n ≡ 2 (mod 4), which is no difference of two squares.
Result<std::pair<int64_t, int64_t>> decompose_dim(int64_t n);

}  // namespace qcal

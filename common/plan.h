// The task DAG of a quantization job: what the coordinator's planner emits
// and what a worker executes. The planner never touches tensors; the worker
// never plans. Both sides agree through these names.
//
// Sequential mode (the faithful one: block l calibrates on the outputs of the
// already-quantized blocks < l):
//
//   capture ──► calibrate-0000 ──► calibrate-0001 ──► … ──► assemble ──► validate
//
//   capture        params {}                     result {"artifacts": {"x": A}}
//                  embeds the job's calibration sequences: X₀ (N*T, H) fp32.
//   calibrate-LLLL params {"layer_begin": l, "layer_end": l+k}
//                  deps: the previous calibrate (or capture)
//                  reads X_l from its dep, quantizes layers [l, l+k) exactly as
//                  `qcal quantize` does (quantize_layer), writes
//                  result {"artifacts": {"qlinears": A, "x": A}, "layers": [LayerReport…]}
//   assemble       deps: every calibrate; reads every "qlinears" artifact and
//                  writes the output checkpoint (atomic publish)
//                  result {"output": path, "bytes": n}
//   validate       deps: assemble; evaluates the output against the FP model
//                  on the job's eval data and applies the gate
//                  result {"report": EvalResult JSON + gate, "gate_passed": bool}
//                  (no eval data → report {"skipped": "..."} and gate_passed true)
//
// Parallel mode: capture also runs the FP model and stores every block's FP
// input X_l; each calibrate then depends on capture only.
//
// An artifact reference A is {"path": relative to the store root,
// "sha256": hex, "bytes": n}; readers verify the checksum and, on mismatch,
// ask the store to re-run the producing task (JobStore::rerun_producer).
#pragma once

namespace qcal::plan {

inline constexpr const char* kCapture = "capture";
inline constexpr const char* kCalibrate = "calibrate";
inline constexpr const char* kAssemble = "assemble";
inline constexpr const char* kValidate = "validate";

}  // namespace qcal::plan

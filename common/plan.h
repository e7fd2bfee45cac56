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
// Calibration recipes (spec.recipe.calib set: the calibration engine's schema,
// worker/calib/recipe.h) get one of two DAGs.
//
// Without reconstruction (transforms, activation / KV quantization, IntactKV):
//
//   calib ──► validate
//
//   calib          params {"format": "native" | "gptq" | "compressed-tensors"}
//                  loads the calibration sequences and runs calib::calibrate_to_dir
//                  into output.path (atomic publish)
//                  result {"output": path, "bytes": n, "format": f, "report": CalibReport}
//
// With reconstruction "cbq" or "block" (windows from calib::cbq_plan):
//
//   capture ──► cbq-window-0000 ──► cbq-window-0001 ──► … ──► assemble ──► validate
//
//   capture        params {"cbq": true}; cbq_prepare + save_cbq_setup
//                  result {"artifacts": {"setup/<file>": A …}, "sequences": N,
//                          "seqlen": T, "windows": W}
//   cbq-window-WWWW params {"window": w, "first": l0, "last": l1, "finalize_last": lf}
//                  deps: capture and the previous window (window 0: capture only);
//                  loads the setup and the previous window's state (window 0:
//                  cbq_initial_state), runs ONE window (cbq_run_window) and saves
//                  the advanced state with the layers this window finalized
//                  result {"artifacts": {"state/<file>": A …}, "window": CbqWindowReport
//                          {"window", "first", "last", "loss_first", "loss_last",
//                          "loss_hard_init", "loss_hard", "steps", "seconds"},
//                          "finalized": [layer …]}
//   assemble       deps: capture and every window; cbq_finish over the finalized
//                  layers of every window's state, write_native (atomic publish)
//                  result {"output": path, "bytes": n, "format": "native", "layers": L}
//   validate       as above; every output format is evaluated by evaluate_stream
//                  (a native one read a layer at a time, worker/calib/native_eval.h)
//
// A directory artifact (a setup or a state directory) is listed file by file:
// key "<name>/<path inside>" → A, every file checksummed; a single-file one is
// key "<name>" → A. A job interrupted anywhere resumes at the first window
// without a result: every earlier window's state is on disk and checksummed.
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
// Calibration recipes (see above). Task ids: "calib", "cbq-window-%04d".
inline constexpr const char* kCalib = "calib";
inline constexpr const char* kCbqWindow = "cbq-window";

}  // namespace qcal::plan

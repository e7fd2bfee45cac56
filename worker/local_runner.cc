#include "worker/local_runner.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "common/clock.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/plan.h"
#include "common/planner.h"
#include "worker/artifacts.h"
#include "worker/tasks.h"

namespace qcal {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

uint64_t physical_memory() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || size <= 0) return 24ull << 30;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(size);
}

std::string unique_suffix() {
  static std::atomic<uint64_t> n{0};
  return std::to_string(::getpid()) + "." + std::to_string(n++);
}

struct RemoveOnExit {
  std::string path;
  bool keep = false;
  ~RemoveOnExit() {
    std::error_code ec;
    if (!keep && !path.empty()) fs::remove_all(path, ec);
  }
};

}  // namespace

json LocalRunResult::report() const {
  json layers = json::array(), windows = json::array(), transform = json::array();
  json learn = json::object();
  for (const TaskDef& t : plan.tasks) {
    auto it = results.find(t.id);
    if (it == results.end()) continue;
    const json& r = it->second;
    if (t.type == ::qcal::plan::kQuantize && r.contains("layers"))
      for (const json& l : r["layers"]) layers.push_back(l);
    if (t.type == ::qcal::plan::kCbqWindow && r.contains("window")) windows.push_back(r["window"]);
    if (t.type == ::qcal::plan::kTransform && r.contains("report")) transform.push_back(r["report"]);
    if (t.type == ::qcal::plan::kLearn && r.contains("report")) learn[t.id] = r["report"];
  }
  return {{"layers", layers}, {"windows", windows}, {"transform", transform}, {"learn", learn},
          {"seconds", seconds}};
}

Result<LocalRunResult> run_job_locally(const JobSpec& spec, const LocalRunOptions& o) {
  const double t0 = steady_seconds();
  PlannerLimits limits;
  limits.worker_memory_bytes = o.memory_bytes > 0 ? o.memory_bytes : physical_memory();
  LocalRunResult res;
  QCAL_ASSIGN_OR_RETURN(res.plan, plan_job(spec, limits));
  RemoveOnExit cleanup;
  std::string root = o.store_dir;
  if (root.empty()) {
    std::error_code ec;
    const fs::path out = fs::absolute(spec.output.path, ec);
    root = out.string() + ".qcal-store." + unique_suffix();
    cleanup.path = root;
    cleanup.keep = o.keep_store;
  }
  {
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec) return io_error(root + ": cannot create the artifact store: " + ec.message());
  }
  ArtifactStore store(root);
  const size_t n = res.plan.tasks.size();
  for (size_t i = 0; i < n; ++i) {
    const TaskDef& t = res.plan.tasks[i];
    TaskContext ctx;
    ctx.job_id = "local";
    ctx.spec = spec;
    ctx.task = t;
    ctx.attempt = 1;
    ctx.store = &store;
    for (const std::string& d : t.deps) {
      auto it = res.results.find(d);
      if (it == res.results.end())
        return internal_error("task " + t.id + " runs before its dep " + d);
      ctx.deps[d] = it->second;
    }
    if (o.log) ctx.log = [&](const std::string& line) { o.log(t.id + ": " + line); };
    const double ts = steady_seconds();
    auto r = run_task(ctx);
    if (!r.is_ok()) return r.status().with_context(t.id);
    res.results[t.id] = std::move(r).value();
    if (o.log) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " done (%zu/%zu) in %.2f s", i + 1, n, steady_seconds() - ts);
      o.log(t.id + buf);
    }
  }
  res.seconds = steady_seconds() - t0;
  return res;
}

namespace {

Status write_u32(const TokenSequences& calib, const std::string& path) {
  std::ofstream f(path, std::ios::binary);
  for (int32_t t : calib.tokens) {
    const uint32_t v = static_cast<uint32_t>(t);
    f.write(reinterpret_cast<const char*>(&v), sizeof v);
  }
  f.close();
  if (!f) return io_error(path + ": cannot write the calibration tokens");
  return Status::ok();
}

JobSpec spec_of(const std::string& model, const std::string& calib_path,
                const TokenSequences& calib, const Recipe& r, const std::string& out,
                const std::string& format, bool overwrite) {
  JobSpec s;
  s.model = model;
  s.recipe = r;
  s.calib.path = calib_path;
  s.calib.nsamples = calib.count();
  s.calib.seqlen = calib.seqlen;
  s.output.path = out;
  s.output.format = format;
  s.output.overwrite = overwrite;
  return s;
}

}  // namespace

Result<json> calibrate_to_dir(const std::string& model_dir, const TokenSequences& calib,
                              const Recipe& r, const std::string& out_dir,
                              const std::string& format, bool overwrite) {
  RemoveOnExit tmp;
  tmp.path = out_dir + ".qcal-calib." + unique_suffix() + ".u32";
  QCAL_RETURN_IF_ERROR(write_u32(calib, tmp.path));
  JobSpec s = spec_of(model_dir, tmp.path, calib, r, out_dir, format, overwrite);
  QCAL_RETURN_IF_ERROR(output_format(s).status());
  QCAL_ASSIGN_OR_RETURN(LocalRunResult res, run_job_locally(s));
  return res.report();
}

Result<calib::NativeModel> calibrate(const calib::FpModel& fp, const TokenSequences& calib,
                                     const Recipe& r, json* report) {
  RemoveOnExit dir;
  dir.path = (fs::temp_directory_path() / ("qcal-calibrate." + unique_suffix())).string();
  std::error_code ec;
  fs::create_directories(dir.path, ec);
  if (ec) return io_error(dir.path + ": " + ec.message());
  const std::string model = dir.path + "/model", out = dir.path + "/out";
  QCAL_RETURN_IF_ERROR(calib::write_fp_model(fp, model, /*overwrite=*/true));
  const std::string data = dir.path + "/calib.u32";
  QCAL_RETURN_IF_ERROR(write_u32(calib, data));
  JobSpec s = spec_of(model, data, calib, r, out, "native", false);
  LocalRunOptions o;
  o.store_dir = dir.path + "/store";
  QCAL_ASSIGN_OR_RETURN(LocalRunResult res, run_job_locally(s, o));
  if (report) *report = res.report();
  return calib::read_native(out);
}

}  // namespace qcal

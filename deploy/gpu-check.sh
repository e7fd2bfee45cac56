#!/usr/bin/env bash
# The GPU check of issue #13: builds the device ops of kernels/cuda_ops.h with
# their tests and bench on a machine with a GPU, runs the gpu-labelled tests,
# the bench (bench_cuda_ops) and its PyTorch peer, and writes a log and a results
# table. The tests are the full build's gpu-labelled ones: test_cuda_ops,
# test_quant_cuda, test_nccl (single rank; built where NCCL is found).
# It builds deploy/gpu-check/CMakeLists.txt, not the whole of qcal: the
# GPU machine has CUDA and CMake but none of the Debian libraries qcal links;
# OpenBLAS (for the CPU references) and GoogleTest's sources travel in a carried
# folder that --prepare fills on a Debian machine (about 12 MB).
#
# Two steps:
#   1. here (Debian, with apt):  bash deploy/gpu-check.sh --prepare
#      fills build-gpucheck-carry/ (ignored by .gitignore's /build*/):
#        debs/       libopenblas0-pthread, libgfortran5, libquadmath0 (.deb, apt-get download)
#        blas/include/  cblas.h, openblas_config.h (from libopenblas-pthread-dev)
#        googletest/    Debian's /usr/src/googletest
#   2. on the GPU machine, through the device tool:
#        run(command="bash deploy/gpu-check.sh --out $OUT", carry=["build-gpucheck-carry"],
#            timeout_s=570)
#
# Run options:
#   --out DIR     where the results go (default $OUT, else build-gpucheck/out)
#   --carry DIR   the prepared folder (default build-gpucheck-carry)
#   --build DIR   the build folder (default build-gpucheck)
#   --arch N      CMAKE_CUDA_ARCHITECTURES (default 90: H100 / H200)
#   --jobs N      build parallelism (default nproc)
#   --T N, --reps N, --shapes LIST   passed to bench_cuda_ops (default 2048, 10, 7b,70b)
#   --tf32        the bench's GEMMs on TF32 tensor cores as well (a second table)
#   --no-bench    the tests only (neither bench_cuda_ops nor the PyTorch peer)
#   --build-only  configure and build, run nothing
#   --filter PAT  gtest filter for the tests (default all)
#   --budget S    seconds for the whole run (default 540): each step's timeout is
#                 capped by what is left (tests 240 s, the benches 180 s each at most),
#                 and results.md is rewritten after every step, so a run cut short
#                 still leaves what it measured
# Results in --out (flat, at most 8 files, as the device tool returns them):
#   gpu-check.log        everything this script printed
#   results.md           device, step timings, test counts, the bench table
#   tests.log            the tests' output (GoogleTest's XML reports stay in --build)
#   bench_cuda_ops.tsv   the bench table (and bench_cuda_ops_tf32.tsv with --tf32)
#   bench_torch.tsv      the same ops in PyTorch (bench/torch_flatquant_ops.py), where
#                        python3 has torch (a failure there is recorded, not fatal)
# Exit: 0 the tests passed on a GPU (and the bench ran), 1 a step failed,
# 2 bad usage, 77 no GPU here: the tests skipped and the bench did not run
# (the rehearsal result on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CARRY=build-gpucheck-carry
BUILD=build-gpucheck
OUTDIR=${OUT:-}
ARCH=90
JOBS=$(nproc 2>/dev/null || echo 4)
BENCH_T=2048
BENCH_REPS=10
BENCH_SHAPES=7b,70b
TF32=0
NO_BENCH=0
BUILD_ONLY=0
PREPARE=0
FILTER=
BUDGET=540

help_text() { sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
usage() {
  help_text >&2
  echo "gpu-check.sh: $1" >&2
  exit 2
}

need_value() { [ $# -ge 2 ] && [ -n "$2" ] || usage "$1 needs a value"; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [ $# -gt 0 ]; do
  case $1 in
    --prepare) PREPARE=1 ;;
    --out) need_value "$@"; OUTDIR=$2; shift ;;
    --carry) need_value "$@"; CARRY=$2; shift ;;
    --build) need_value "$@"; BUILD=$2; shift ;;
    --arch) need_value "$@"; is_uint "$2" || usage "--arch must be a number (90)"; ARCH=$2; shift ;;
    --jobs) need_value "$@"; is_uint "$2" && [ "$2" -ge 1 ] || usage "--jobs must be ≥ 1"; JOBS=$2; shift ;;
    --T) need_value "$@"; is_uint "$2" || usage "--T must be a number"; BENCH_T=$2; shift ;;
    --reps) need_value "$@"; is_uint "$2" || usage "--reps must be a number"; BENCH_REPS=$2; shift ;;
    --shapes) need_value "$@"; BENCH_SHAPES=$2; shift ;;
    --filter) need_value "$@"; FILTER=$2; shift ;;
    --budget) need_value "$@"; is_uint "$2" && [ "$2" -ge 60 ] || usage "--budget must be ≥ 60 (seconds)"; BUDGET=$2; shift ;;
    --tf32) TF32=1 ;;
    --no-bench) NO_BENCH=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    -h | --help) help_text; exit 0 ;;
    *) usage "unknown argument '$1'" ;;
  esac
  shift
done

# Absolute paths (the steps below change directory).
abspath() { case $1 in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
CARRY=$(abspath "$CARRY")
BUILD=$(abspath "$BUILD")

# ---------------------------------------------------------------- --prepare

if [ "$PREPARE" = 1 ]; then
  set -e
  command -v apt-get >/dev/null || { echo "gpu-check.sh --prepare: needs apt-get (a Debian machine)" >&2; exit 1; }
  hdr=/usr/include/x86_64-linux-gnu/openblas-pthread
  [ -f $hdr/cblas.h ] || { echo "gpu-check.sh --prepare: $hdr/cblas.h missing (apt-get install libopenblas-pthread-dev)" >&2; exit 1; }
  [ -f /usr/src/googletest/CMakeLists.txt ] || { echo "gpu-check.sh --prepare: /usr/src/googletest missing (apt-get install googletest)" >&2; exit 1; }
  rm -rf "$CARRY"
  mkdir -p "$CARRY/debs" "$CARRY/blas/include"
  # The runtime packages of the headers' version (the same OpenBLAS as here).
  (cd "$CARRY/debs" && apt-get download libopenblas0-pthread libgfortran5 libquadmath0 2>&1 | grep -v '^W: Download is performed unsandboxed')
  cp $hdr/cblas.h $hdr/openblas_config.h "$CARRY/blas/include/"
  cp -r /usr/src/googletest "$CARRY/googletest"
  {
    echo "prepared $(date -u +%FT%TZ) on $(uname -n)"
    dpkg-query -W libopenblas-pthread-dev googletest 2>/dev/null
    ls -l "$CARRY/debs"
  } >"$CARRY/PREPARED"
  du -sh "$CARRY"
  echo "gpu-check.sh: carry folder ready: $CARRY (name it in the device tool's carry)"
  exit 0
fi

# ---------------------------------------------------------------- run

[ -n "$OUTDIR" ] || OUTDIR=$BUILD/out
OUTDIR=$(abspath "$OUTDIR")
mkdir -p "$OUTDIR" "$BUILD" || { echo "gpu-check.sh: cannot create $OUTDIR / $BUILD" >&2; exit 1; }
LOG=$OUTDIR/gpu-check.log
RESULTS=$OUTDIR/results.md
# A reused --out keeps no results of an earlier run.
rm -f "$OUTDIR"/results.md "$OUTDIR"/tests.log "$OUTDIR"/bench_*.tsv "$OUTDIR"/test_*.xml
exec > >(tee "$LOG") 2>&1

T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
# cap N: N seconds, or what is left of the budget (less 15 s for the summary).
cap() {
  local left=$((DEADLINE - $(date +%s) - 15))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
STEPS=()
step_done() {
  STEPS+=("| $1 | $2 | $(($(date +%s) - $3)) s |")
  write_results "in progress (last step: $1)"
}
say() { echo "== gpu-check: $*"; }
fail() {
  say "FAILED: $*"
  write_results "failed: $*"
  exit 1
}

GPU=none
TESTS="not run"
BENCH="not run"
TORCH="not run"
write_results() {
  {
    echo "# GPU check (issue #13), $(date -u +%FT%TZ)"
    echo
    echo "- outcome: $1"
    echo "- machine: $(uname -n), $(nproc) cores; GPU: $GPU"
    echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo missing); CUDA arch sm_$ARCH"
    echo "- git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$([ -z "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] || echo ' (with local changes)')"
    echo "- gpu tests: $TESTS"
    echo "- bench_cuda_ops: $BENCH"
    echo "- PyTorch peer: $TORCH"
    echo
    echo "| step | result | time |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${STEPS[@]}"
    for tsv in "$OUTDIR"/bench_*.tsv; do
      [ -f "$tsv" ] || continue
      echo
      echo "## $(basename "$tsv")"
      echo
      awk -F'\t' 'NR == 1 { print "| " $1 " | " $2 " | " $3 " | " $4 " | " $5 " |"; print "| --- | --- | --- | ---: | ---: |"; next }
                  { printf "| %s | %s | %s | %s | %s%% |\n", $1, $2, $3, $4, $5 }' "$tsv"
    done
  } >"$RESULTS"
}

say "start $(date -u +%FT%TZ) in $ROOT, out $OUTDIR"
say "environment"
uname -a
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  [ -n "$GPU" ] || GPU="nvidia-smi found no GPU"
else
  echo "nvidia-smi: not found"
fi
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -2 || fail "nvcc not found (PATH, /usr/local/cuda/bin)"
cmake --version | head -1 || fail "cmake not found"

# ---- the carried libraries: OpenBLAS unpacked from its .deb files.
t=$(date +%s)
CMAKE_CARRY=()
if [ -d "$CARRY" ]; then
  [ -f "$CARRY/PREPARED" ] && cat "$CARRY/PREPARED"
  if compgen -G "$CARRY/debs/*.deb" >/dev/null; then
    root=$BUILD/blas-root
    rm -rf "$root" && mkdir -p "$root"
    for deb in "$CARRY"/debs/*.deb; do
      if command -v dpkg-deb >/dev/null && [ -z "${QCAL_GPU_CHECK_NO_DPKG:-}" ]; then
        dpkg-deb -x "$deb" "$root" || fail "unpacking $deb"
      else  # a .deb is an ar archive holding data.tar.{xz,zst,gz}
        member=$(cd "$BUILD" && ar t "$deb" | grep '^data\.tar') || fail "no data.tar in $deb"
        (cd "$BUILD" && ar x "$deb" "$member" && tar -xf "$member" -C "$root" && rm -f "$member") ||
          fail "unpacking $deb (ar + tar)"
      fi
    done
    # libopenblas.so.0 (linked by path) and the libgfortran / libquadmath it loads.
    lib=$(find "$root" -name 'libopenblas.so.0' | head -1)
    [ -n "$lib" ] || fail "no libopenblas.so.0 in $CARRY/debs"
    export LD_LIBRARY_PATH=$(dirname "$lib"):$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "OpenBLAS: $lib; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    CMAKE_CARRY+=(-DQCAL_GPU_BLAS_LIB="$lib")
  fi
  CMAKE_CARRY+=(-DQCAL_GPU_CARRY="$CARRY")
  step_done "carried libraries ($CARRY)" ok "$t"
else
  say "no carry folder $CARRY: OpenBLAS and GoogleTest must be on this system"
  step_done "carried libraries" "none (system)" "$t"
fi

# ---- configure and build the standalone targets.
t=$(date +%s)
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
launcher=()
command -v ccache >/dev/null &&
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
say "configure ($BUILD)"
cmake -S "$ROOT/deploy/gpu-check" -B "$BUILD" "${gen[@]}" "${launcher[@]}" \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_POLICY_VERSION_MINIMUM=3.5 "${CMAKE_CARRY[@]}" ||
  fail "cmake configure"
say "build (-j$JOBS)"
timeout "$(cap 420)" cmake --build "$BUILD" -j"$JOBS" || fail "build (exit $?; 124: out of budget)"
step_done "configure + build (sm_$ARCH, -j$JOBS)" ok "$t"
if [ "$BUILD_ONLY" = 1 ]; then
  write_results "built (--build-only)"
  say "built; --build-only: done in $(($(date +%s) - T0)) s"
  exit 0
fi

# ---- the tests: the gpu-labelled tests of the full build that this one builds.
t=$(date +%s)
: >"$OUTDIR/tests.log"
trc=0 passed=0 failed=0 skipped=0 ran=()
for name in test_cuda_ops test_quant_cuda test_nccl; do
  if [ ! -x "$BUILD/$name" ]; then
    say "$name: not built (see the configure output)" | tee -a "$OUTDIR/tests.log"
    continue
  fi
  say "$name"
  args=(--gtest_output="xml:$BUILD/$name.xml")
  [ -n "$FILTER" ] && args+=(--gtest_filter="$FILTER")
  lim=$(cap 240)
  if [ "$lim" -lt 10 ]; then
    say "$name: not run, the budget is spent" | tee -a "$OUTDIR/tests.log"
    trc=124
    continue
  fi
  timeout "$lim" "$BUILD/$name" "${args[@]}" 2>&1 | tee "$BUILD/$name.log" | tee -a "$OUTDIR/tests.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || trc=$rc
  [ "$rc" = 124 ] && say "$name: timed out after $lim s"
  p=$(grep -c '^\[       OK \]' "$BUILD/$name.log")
  f=$(grep -c '^\[  FAILED  \] [A-Za-z0-9_]*\.[A-Za-z0-9_]* (' "$BUILD/$name.log")
  k=$(grep -c '^\[  SKIPPED \] [A-Za-z0-9_]*\.[A-Za-z0-9_]* (' "$BUILD/$name.log")
  passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + k))
  ran+=("$name exit $rc: $p passed, $f failed, $k skipped")
done
TESTS="$passed passed, $failed failed, $skipped skipped ($(printf '%s; ' "${ran[@]}" | sed 's/; $//'))"
step_done "gpu tests" "$passed passed, $failed failed, $skipped skipped" "$t"
# Without a GPU every device test skips; only the no-GPU checks pass.
no_gpu=0
grep -q 'no GPU:\|built without CUDA' "$OUTDIR/tests.log" && [ "$failed" = 0 ] && no_gpu=1

# ---- the bench.
brc=0
if [ "$NO_BENCH" = 0 ]; then
  t=$(date +%s)
  say "bench_cuda_ops (T $BENCH_T, reps $BENCH_REPS, shapes $BENCH_SHAPES)"
  lim=$(cap 180)
  if [ "$lim" -lt 10 ]; then
    brc=124
  else
    timeout "$lim" "$BUILD/bench_cuda_ops" --T "$BENCH_T" --reps "$BENCH_REPS" --shapes "$BENCH_SHAPES" \
      --out "$OUTDIR/bench_cuda_ops.tsv"
    brc=$?
  fi
  BENCH="exit $brc"
  [ "$brc" = 77 ] && BENCH="skipped (no GPU)"
  [ "$brc" = 124 ] && BENCH="timed out (budget)"
  if [ "$TF32" = 1 ] && [ "$brc" = 0 ] && [ "$(cap 120)" -ge 10 ]; then
    timeout "$(cap 120)" "$BUILD/bench_cuda_ops" --T "$BENCH_T" --reps "$BENCH_REPS" --shapes "$BENCH_SHAPES" \
      --tf32 --out "$OUTDIR/bench_cuda_ops_tf32.tsv" || BENCH="$BENCH; tf32 run failed"
  fi
  step_done "bench_cuda_ops" "$BENCH" "$t"
  t=$(date +%s)
  say "PyTorch peer (bench/torch_flatquant_ops.py)"
  py=$(command -v python3 || true)
  if [ -z "$py" ]; then
    TORCH="skipped (no python3)"
  else
    targs=(--T "$BENCH_T" --reps "$BENCH_REPS" --shapes "$BENCH_SHAPES" --out "$OUTDIR/bench_torch.tsv")
    [ "$TF32" = 1 ] && targs+=(--tf32)
    lim=$(cap 180)
    prc=124
    [ "$lim" -ge 10 ] && {
      PYTHONUNBUFFERED=1 timeout "$lim" "$py" "$ROOT/bench/torch_flatquant_ops.py" "${targs[@]}"
      prc=$?
    }
    TORCH="exit $prc"
    [ "$prc" = 77 ] && TORCH="skipped (no torch or no GPU)"
    [ "$prc" = 124 ] && TORCH="timed out (budget)"
  fi
  step_done "PyTorch peer" "$TORCH" "$t"
fi

say "done in $(($(date +%s) - T0)) s"
if [ "$no_gpu" = 1 ]; then
  write_results "no GPU: the device tests skipped (rehearsal)"
  exit 77
fi
if [ "$trc" != 0 ] || [ "$failed" != 0 ] || { [ "$brc" != 0 ] && [ "$brc" != 77 ]; }; then
  write_results "FAILED (tests exit $trc, bench exit $brc)"
  exit 1
fi
write_results "passed"
exit 0

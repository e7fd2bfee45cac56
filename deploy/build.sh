#!/usr/bin/env bash
# Configures and builds qcal into ./build (or $QCAL_BUILD_DIR). CUDA is used
# when nvcc is found; QCAL_WITH_CUDA=OFF forces a CPU-only build.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${QCAL_BUILD_DIR:-build}
args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-RelWithDebInfo})
if [ -n "${QCAL_WITH_CUDA:-}" ]; then args+=(-DQCAL_WITH_CUDA="$QCAL_WITH_CUDA"); fi
# ccache, when installed, makes rebuilds and parallel checkouts cheap.
if command -v ccache >/dev/null 2>&1; then
  args+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake "${args[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)"

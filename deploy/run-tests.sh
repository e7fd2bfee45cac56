#!/usr/bin/env bash
# Installs the dependencies, builds, and runs the whole test suite with CTest.
# Select with labels: QCAL_TEST_LABELS=unit (or e2e, slow, gpu); default: all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
BUILD_DIR=${QCAL_BUILD_DIR:-build}
args=(--test-dir "$BUILD_DIR" --output-on-failure -j2 --timeout 1200)
if [ -n "${QCAL_TEST_LABELS:-}" ]; then args+=(-L "$QCAL_TEST_LABELS"); fi
# Two tests run at once on the two cores: keep each one's BLAS single-threaded.
export QCAL_THREADS=${QCAL_THREADS:-1}
ctest "${args[@]}"

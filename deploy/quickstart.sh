#!/usr/bin/env bash
# The README's demo command: installs every dependency, builds, and runs the
# main job on the embedded default — a local redis-server (AOF on), a
# qcal-coordinator and a qcal-worker on loopback, a generated demo model —
# submitting a GPTQ job over REST, waiting for it and printing the report.
# deploy/embedded-demo.sh runs the same quantization in one process instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
bash deploy/service-demo.sh

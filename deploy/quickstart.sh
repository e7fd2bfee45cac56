#!/usr/bin/env bash
# The README's demo command: installs every dependency, builds, and runs the
# main jobs on the embedded default — a local redis-server (AOF on), a
# qcal-coordinator and two qcal-workers on loopback, a trained model (the
# shared real model ../shared/models/babyllama-tok361 when ../shared/models
# exists, else the committed fixture tests/fixtures/grammar-tiny) — submitting
# GPTQ W4, RTN W4A4KV4, FlatQuant W4A4KV4 + IntactKV and FlatQuant + CBQ(2,1) +
# IntactKV over REST with one gate, and printing the before/after table
# (deploy/service-demo.sh). deploy/embedded-demo.sh runs the same jobs in one
# process instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
bash deploy/service-demo.sh

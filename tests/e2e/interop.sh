#!/usr/bin/env bash
# labels: interop
# Interop checked by real loaders (issue #14): qcal writes GPTQ v1 (symmetric,
# also with act-order), GPTQ v2 (asymmetric) and compressed-tensors (both) for
# the grammar-tiny fixture; transformers / compressed-tensors / GPTQModel, pinned
# in tools/interop/requirements-loaders.txt, load each and their perplexity must
# equal `qcal eval`'s (1e-6 relative in fp32, 1e-4 in fp16). The loaders live in
# a venv under the build dir (<build>/interop-venv), made on the first run (pip,
# about 3 GB with torch's CUDA wheels) and reused while the requirements file is
# unchanged. Exit 77 (CTest: skipped) only when PyPI is unreachable then.
set -euo pipefail
QCAL=${1:?usage: interop.sh path/to/qcal}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
exec python3 "$ROOT/tools/interop/check_loaders.py" --qcal "$QCAL"

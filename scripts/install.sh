#!/usr/bin/env bash
# Installs wadi and its test tools into the current Python environment.
# A torch that is already installed (a CUDA build, say) is kept; otherwise the CPU build 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# evaluate's InceptionV3 comes from torch-fidelity; without --no-deps its torchvision requirement would pull in
# another torch build (wadi loads only its InceptionV3 module, which needs torch alone)
"$PY" -m pip install --quiet --no-deps "torch-fidelity>=0.3"

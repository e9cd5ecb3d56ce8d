#!/usr/bin/env bash
# Install PyTorch into the given Python's environment, picking the right build:
# CUDA where an NVIDIA driver is present, else the CPU build (never the multi-GB CUDA
# wheel on a CPU-only machine). A locally provided CPU wheel (pip find-links) wins.
set -euo pipefail
PY="${1:-python3}"
if "$PY" -c "import torch" 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch>=2.4"
elif "$PY" -m pip download -q --no-index --no-deps "torch==2.13.0" -d "$(mktemp -d)" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
else
  "$PY" -m pip install -q "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi

#!/usr/bin/env bash
# Install PyTorch into the given Python's environment, picking the right build. Packages come
# from pip's own configuration (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, pip.conf);
# this script names no index.
#   - An NVIDIA driver is present: torch from the configured index (the CUDA build).
#   - Otherwise a CPU wheel that pip finds without any index (PIP_FIND_LINKS, a wheel folder)
#     comes first, so a CPU-only machine never downloads the multi-GB CUDA build by default.
#   - Otherwise torch from the configured indexes: the CPU build when the user has pointed
#     pip at PyTorch's CPU wheel index, as the note printed here explains.
set -euo pipefail
PY="${1:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if "$PY" -c "import torch" 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch>=2.4"
elif "$PY" -m pip download -q --no-index --no-deps "torch==$TORCH_VERSION" -d "$(mktemp -d)" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==$TORCH_VERSION"  # a local +cpu build sorts above the plain version
else
  echo "install_torch.sh: no local CPU wheel of torch $TORCH_VERSION; installing torch from pip's" \
    "configured index. On Linux without a GPU that is the large CUDA build unless" \
    "PIP_EXTRA_INDEX_URL points at PyTorch's CPU wheel index (see README: 'PyTorch: CPU or CUDA build')." >&2
  "$PY" -m pip install -q "torch>=2.4"
fi

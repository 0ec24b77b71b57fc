#!/usr/bin/env bash
# Create .venv-torch in the repository root with a CPU PyTorch + transformers,
# for the PyTorch reference of the alignment-step benchmark
# (bench/pytorch_alignment_step.py).
#
#   bash bench/setup_torch_venv.sh
#
# Cost: PyPI has no CPU-only torch wheel, and PyPI is the only index these
# machines reach, so the default (CUDA-enabled) wheel is installed: with its
# nvidia-* dependencies that is roughly 5 GB of downloads and ~7 GB on disk.
# That is why the PyTorch comparison is opt-in.
#
# Idempotent: when .venv-torch already has exactly the pinned versions,
# nothing is downloaded. Override the interpreter with PYTHON=/path/python3.
set -euo pipefail

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.24.0
NUMPY_VERSION=2.4.6   # torch warns (and some tensor<->numpy paths fail) without numpy

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-torch"
PYTHON="${PYTHON:-python3}"

installed_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" <<'PY' 2>/dev/null
import sys
import torch, transformers
ok = (torch.__version__.split("+")[0] == sys.argv[1]
      and transformers.__version__ == sys.argv[2])
sys.exit(0 if ok else 1)
PY
}

if installed_ok; then
    echo "setup_torch_venv: $VENV already has torch $TORCH_VERSION and transformers $TRANSFORMERS_VERSION"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade --quiet pip
"$VENV/bin/python" -m pip install \
    "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "numpy==$NUMPY_VERSION"

installed_ok || { echo "setup_torch_venv: install finished but the version check failed" >&2; exit 1; }
"$VENV/bin/python" -c 'import torch, transformers; print("setup_torch_venv: torch", torch.__version__, "transformers", transformers.__version__, "in", __import__("sys").prefix)'

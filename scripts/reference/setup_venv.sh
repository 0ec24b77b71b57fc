#!/usr/bin/env bash
# Create .venv-ref in the repository root for the numpy reference scripts
# (scripts/reference/smollm2_reference.py). Small (~60 MB): numpy, gguf,
# tokenizers and regex; no torch. transformers is deliberately absent: its
# GGUF tokenizer loading imports torch (transformers 5.x), which would make
# this a 5 GB venv.
#
#   bash scripts/reference/setup_venv.sh
#
# Idempotent: when .venv-ref already has exactly the pinned versions, nothing
# is downloaded. Override the interpreter with PYTHON=/path/python3.
set -euo pipefail

PINS=(
    "numpy==2.4.6"
    "gguf==0.19.0"
    "tokenizers==0.23.3"
    "regex==2026.11.19"
)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-ref"
PYTHON="${PYTHON:-python3}"

installed_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "${PINS[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
}

if installed_ok; then
    echo "setup_venv: $VENV is up to date (${PINS[*]})"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
installed_ok || { echo "setup_venv: install finished but the version check failed" >&2; exit 1; }
echo "setup_venv: $VENV ready (${PINS[*]})"

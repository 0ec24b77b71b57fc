#!/usr/bin/env bash
# The whole test suite, set-up included: the Rust workspace's tests, then
# the Python package (built from python/ with maturin into a venv under
# target/) and its tests, which start real Flower SuperLinks and
# SuperNodes on 127.0.0.1. Needs Rust (rust-toolchain.toml) and Python
# >= 3.11 with venv and pip; fetches maturin, flwr 1.42, numpy, pytest and
# scipy-openblas32 from PyPI the first time. No GPU, no model downloads.
#
# Both halves run with FEDCMP_BLAS set to that OpenBLAS (unless the caller
# set FEDCMP_BLAS), and FEDCMP_REQUIRE_BLAS=1, so the tests that compare the
# BLAS products with candle's kernels run and cannot skip.
#
#   scripts/test.sh              everything
#   scripts/test.sh --rust-only  cargo test --workspace
#   scripts/test.sh --python-only
set -euo pipefail
cd "$(dirname "$0")/.."

rust=1 python=1
case "${1:-}" in
  --rust-only) python=0 ;;
  --python-only) rust=0 ;;
  "") ;;
  *) echo "usage: scripts/test.sh [--rust-only|--python-only]" >&2; exit 2 ;;
esac

target="${CARGO_TARGET_DIR:-target}"
venv="$target/py-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The same OpenBLAS build as the registry asset `openblas` (ASSETS.md).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "maturin>=1.9,<2" "flwr==1.42.*" "numpy>=1.26" "pytest>=8" "scipy-openblas32==0.3.34.481.3"
if [ -z "${FEDCMP_BLAS:-}" ]; then
  FEDCMP_BLAS="$("$venv/bin/python" -c 'import os, scipy_openblas32 as s; print(os.path.join(s.get_lib_dir(), "libscipy_openblas.so"))')"
fi
export FEDCMP_BLAS FEDCMP_REQUIRE_BLAS=1
echo "tests run with FEDCMP_BLAS=$FEDCMP_BLAS"

if [ "$rust" = 1 ]; then
  cargo test --workspace
fi

if [ "$python" = 1 ]; then
  # The golden outputs the strategy test compares against, bit for bit.
  if [ ! -f "$target/golden/rust-outputs.json" ]; then
    cargo test -p fedcmp-strategy --test strategy golden
  fi
  (cd python && VIRTUAL_ENV="$(cd .. && cd "$venv" && pwd)" \
    PATH="$(cd .. && cd "$venv" && pwd)/bin:$PATH" maturin develop --quiet)
  "$venv/bin/python" -m pytest -q python/tests
fi

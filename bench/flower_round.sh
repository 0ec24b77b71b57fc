#!/usr/bin/env bash
# Flower's cost per round against the in-process simulation, and the cost
# of moving an LLaVA-1.5-7B-size projector (84 MB) through Flower (see
# bench/flower_round.py). Uses the venv that scripts/test.sh builds
# (target/py-venv, with the fedcmp package, flwr 1.42 and numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/py-venv"
if [ ! -x "$venv/bin/python" ]; then
  scripts/test.sh --python-only
fi
PATH="$(cd "$venv" && pwd)/bin:$PATH" "$venv/bin/python" bench/flower_round.py "$@"

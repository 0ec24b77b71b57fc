#!/usr/bin/env bash
# The Fed-CMP server-step benchmark: fedcmp (faer) and numpy/LAPACK on the
# same client deltas, same machine, same run.
#
#   bash bench/server_step.sh                 # LLaVA-1.5-7B projector, 10 clients
#   INPUT=256 HIDDEN=512 OUTPUT=512 bash bench/server_step.sh   # quick
#
# fedcmp aggregates ROUNDS rounds (from round 2 on, OPM transports its
# momentum) and dumps round 1's deltas (~0.8 GB of f32 at full size, in a
# temporary folder removed afterwards); numpy then runs round 1's
# decomposition on them and reports its time and the relative difference
# between the two updates. Needs numpy (the reference venv:
# python3 -m venv .venv-ref && .venv-ref/bin/pip install numpy). Run on an
# idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PY=${PY:-.venv-ref/bin/python}
[ -x "$PY" ] || PY=python3
dump=$(mktemp -d)
trap 'rm -rf "$dump"' EXIT
cargo build --release -q -p fedcmp-bench
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== fedcmp"
RAYON_NUM_THREADS=$THREADS ./target/release/fedcmp-bench server-step \
  --input "${INPUT:-1024}" --hidden "${HIDDEN:-4096}" --output "${OUTPUT:-4096}" \
  --clients "${CLIENTS:-10}" --rounds "${ROUNDS:-2}" --dump "$dump" > "$dump/fedcmp.out"
cat "$dump/fedcmp.out"
ours=$(tail -n 1 "$dump/fedcmp.out")
echo "== numpy"
OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS "$PY" bench/numpy_server_step.py "$dump" > "$dump/numpy.out"
cat "$dump/numpy.out"
theirs=$(tail -n 1 "$dump/numpy.out")
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"\nround-1 ranks: fedcmp {[int(r) for r in a['ranks'][0]]}, numpy {b['ranks']}")
print(f"round 1: fedcmp {a['round_s'][0]:.2f} s, numpy {b['round_s']:.2f} s, "
      f"ratio fedcmp / numpy {a['round_s'][0] / b['round_s']:.2f}; "
      f"later rounds (with OPM transport): {', '.join(f'{x:.2f}' for x in a['round_s'][1:])} s; "
      f"|fedcmp - numpy| / |numpy| = {b['relative_difference']:.1e}")
PY

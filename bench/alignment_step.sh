#!/usr/bin/env bash
# The alignment-step benchmark: fedcmp with its products on the optimised
# BLAS (the registry's OpenBLAS, fetched here), fedcmp on candle's own
# kernels (FEDCMP_BLAS=off), and PyTorch eager + HF transformers; same
# shapes, same machine, same run, THREADS threads each.
#
#   bash bench/alignment_step.sh            # THREADS=2 by default
#
# Needs the PyTorch venv (bash bench/setup_torch_venv.sh, ~5 GB: PyPI has no
# CPU-only torch wheel). Run on an idle machine: a parallel build ruins the
# timings on 2 cores. Prints both JSON lines and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
ARGS=(--batch "${BATCH:-8}" --visual-tokens "${VISUAL:-16}" --caption-tokens "${CAPTION:-16}" --layers "${LAYERS:-30}")
[ -x .venv-torch/bin/python ] || bash bench/setup_torch_venv.sh
cargo build --release -q -p fedcmp-bench -p fedcmp-cli
./target/release/fedcmp assets fetch openblas >/dev/null
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== fedcmp, BLAS"
blas=$(RAYON_NUM_THREADS=$THREADS ./target/release/fedcmp-bench align-step "${ARGS[@]}" | tee /dev/stderr | tail -n 1)
echo "== fedcmp, candle's kernels"
candle=$(FEDCMP_BLAS=off RAYON_NUM_THREADS=$THREADS ./target/release/fedcmp-bench align-step "${ARGS[@]}" | tee /dev/stderr | tail -n 1)
echo "== pytorch"
theirs=$(.venv-torch/bin/python bench/pytorch_alignment_step.py --threads "$THREADS" "${ARGS[@]}" | tee /dev/stderr | tail -n 1)
python3 - "$blas" "$candle" "$theirs" <<'PY'
import json, sys
blas, candle, torch = (json.loads(a) for a in sys.argv[1:4])
print(f"\n{'':>16} {'step':>8} {'forward':>8} {'backward+opt':>13} {'/ pytorch':>10}")
for name, r in (("fedcmp, BLAS", blas), ("fedcmp, candle", candle), ("pytorch", torch)):
    bwd = r.get("backward_median_s", 0) + r.get("optimizer_median_s", 0)
    ratio = r["median_s"] / torch["median_s"]
    print(f"{name:>16} {r['median_s']:>8.3f} {r['forward_median_s']:>8.3f} {bwd:>13.3f} {ratio:>10.2f}")
print(f"products: {blas['products']}")
PY

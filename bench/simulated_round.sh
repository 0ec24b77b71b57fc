#!/usr/bin/env bash
# Samples per second of whole simulated rounds, clients trained one at a
# time vs together (their local steps through the frozen decoder in one
# pass), at the main job's recipe (content captions after a newline, one
# visual token, the default steps-parity recipe: 8 local steps of 2 pairs
# per client and round) on the real backbones:
#
#   bash bench/simulated_round.sh                  # domain-silos and cross-device
#   SCENARIOS=iid PASSES="1 4 8" bash bench/simulated_round.sh
#   RECIPE="--batch-size 16 --local-steps 1" bash bench/simulated_round.sh   # the old one-step recipe
#   PRODUCTS="blas candle" PASSES=8 bash bench/simulated_round.sh   # products on the BLAS vs candle's kernels
#
# Needs the real assets (`fedcmp assets fetch`, or any earlier main-job
# run). Each configuration runs ROUNDS rounds (default 4) with validation
# only after the last; the last round is left out of the rate, so the
# figure is training alone: samples trained / seconds over rounds
# 1..ROUNDS-1, from metrics.jsonl. Run on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
PASSES=${PASSES:-1 8}
RECIPE=${RECIPE:-}
SCENARIOS=${SCENARIOS:-domain-silos cross-device}
PRODUCTS=${PRODUCTS:-blas}   # blas: the default search; candle: FEDCMP_BLAS=off
OUT=${OUT:-runs/bench-simulated-round}
cargo build --release -q -p fedcmp-cli
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), load $(cut -d' ' -f1-3 /proc/loadavg)"
for scenario in $SCENARIOS; do
    for passes in $PASSES; do
      for products in $PRODUCTS; do
        out="$OUT/$scenario-p$passes-$products"
        blas="${FEDCMP_BLAS:-}"
        [ "$products" = candle ] && blas=off
        # shellcheck disable=SC2086  # RECIPE is a list of flags
        FEDCMP_BLAS="$blas" ./target/release/fedcmp run --scenario "$scenario" --captions content \
            --caption-separator '\n' --visual-tokens 1 $RECIPE \
            --rounds "$ROUNDS" --eval-every 1000 --clients-per-pass "$passes" \
            --out "$out" --fresh >/dev/null 2>&1
        metrics=$(find "$out" -name metrics.jsonl | head -n 1)
        python3 - "$scenario" "$passes" "$metrics" "$products" <<'PY'
import json, sys
scenario, passes, path, products = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rounds = [json.loads(line) for line in open(path)][:-1]
samples = sum(r["samples"] for r in rounds)
seconds = sum(r["seconds"] for r in rounds)
clients = sum(len(r["answered"]) for r in rounds) / len(rounds)
print(f"{scenario:>14}  clients/pass {passes:>2}  {products:>6}  {len(rounds)} rounds  "
      f"{clients:.1f} clients/round  {samples} samples  {seconds:7.2f} s  "
      f"{samples / seconds:6.1f} samples/s")
PY
      done
    done
done
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"

#!/usr/bin/env bash
# The evaluation suite's seconds, by part (caption NLL, zero-shot, greedy
# captions), of `fedcmp eval` on one saved projector, for one or more
# fedcmp binaries in one run (so that their ratio is measured under the
# same load), each repeated. The suite's results must be the same for
# every binary (the script compares their printed tables).
#
#   bash bench/eval_suite.sh RUN_DIR [BINARY ...]
#
# RUN_DIR: a run folder (`fedcmp run`) with its projector; BINARY defaults
# to target/release/fedcmp. E.g. against the commit before the batched
# suite: git worktree add /tmp/old 47029b4 && cargo build --release
# --manifest-path /tmp/old/Cargo.toml -p fedcmp-cli, then
#   bash bench/eval_suite.sh runs/x/domain-silos-fedavg-s0 /tmp/old/target/release/fedcmp target/release/fedcmp
set -euo pipefail
run="${1:?usage: bench/eval_suite.sh RUN_DIR [BINARY ...]}"
shift
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release/fedcmp)
repeats="${REPEATS:-2}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-40s %6s %8s %10s %9s %8s\n' binary repeat nll_s zero_shot_s captions_s wall_s
for r in $(seq "$repeats"); do
  for i in "${!bins[@]}"; do
    b="${bins[$i]}"
    start=$(date +%s.%N)
    "$b" eval --run "$run" --log fedcmp=debug,info > "$tmp/out-$i" 2> "$tmp/err-$i"
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    line=$(grep 'evaluation suite timed' "$tmp/err-$i" | tail -1)
    get() { echo "$line" | sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }
    printf '%-40s %6s %8.1f %10.1f %9.1f %8.1f\n' "$b" "$r" "$(get nll_s)" "$(get zero_shot_s)" "$(get captions_s)" "$wall"
    if [ "$i" -gt 0 ] && ! diff -q "$tmp/out-0" "$tmp/out-$i" > /dev/null; then
      echo "results differ between ${bins[0]} and $b:"; diff "$tmp/out-0" "$tmp/out-$i" || true
    fi
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

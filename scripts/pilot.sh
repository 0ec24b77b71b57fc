#!/usr/bin/env bash
# The centralized pilot that fixes the research recipe (ALGORITHMS.md
# §7.1): centralized training on all four labelled domains of domain-silos
# (every shard pooled, content captions: each domain's first template with
# the class's name), one variant per line below, each a plain `fedcmp run`
# whose folder lands in runs/pilot/<variant>/. Then a table of what each
# reached on the test split: caption NLL, calibrated and raw zero-shot
# accuracy, captions that name their class, and the training time.
#
#   bash scripts/pilot.sh             # every variant (about 8 minutes each here)
#   bash scripts/pilot.sh sep-1tok    # only the named ones
#
# Finished variants are kept (their run folder has a summary.json); delete
# runs/pilot/<variant> to run one again.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDCMP="${FEDCMP:-target/release/fedcmp}"
[ -x "$FEDCMP" ] || cargo build --release -p fedcmp-cli

# The centralized reference steps on batch-size x the 8 clients of a
# domain-silos round: --batch-size 2 is the pilot's batch of 16 pairs.
COMMON=(--centralized --scenario domain-silos --captions content --batch-size 2
        --local-steps 8 --eval-every 4)

# name | extra flags
VARIANTS=(
  "nosep-1tok|--visual-tokens 1 --lr 3e-3"
  "sep-1tok|--caption-separator \\n --visual-tokens 1 --lr 3e-3"
  "sep-4tok|--caption-separator \\n --visual-tokens 4 --lr 3e-3"
  "sep-16tok|--caption-separator \\n --visual-tokens 16 --lr 3e-3"
  "sep-1tok-lr1e-2|--caption-separator \\n --visual-tokens 1 --lr 1e-2"
  "sep-1tok-lr1e-3|--caption-separator \\n --visual-tokens 1 --lr 1e-3"
)

OUT=runs/pilot
. scripts/variants.sh
run_variants "$@"

python3 - <<'PY'
import glob, json, os
rows = []
for path in sorted(glob.glob("runs/pilot/*/*/summary.json")):
    name = path.split("/")[2]
    s = json.load(open(path))
    f = s["suite"]["final"]
    rows.append((name, s["samples_total"], s["seconds"], f["macro_nll"],
                 f.get("macro_zero_shot_accuracy"), f.get("macro_zero_shot_raw_accuracy"),
                 f.get("macro_caption_accuracy"), f.get("chance")))
print(f"{'variant':<18} {'samples':>8} {'train s':>8} {'test NLL':>9} {'zero-shot':>10} {'raw':>6} {'captions':>9} {'chance':>7}")
fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"
for r in rows:
    print(f"{r[0]:<18} {r[1]:>8} {r[2]:>8.0f} {r[3]:>9.4f} {fmt(r[4],3):>10} {fmt(r[5],3):>6} {fmt(r[6],3):>9} {fmt(r[7],3):>7}")
PY

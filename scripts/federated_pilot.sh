#!/usr/bin/env bash
# The federated pilot that picks the steps-parity recipe (ALGORITHMS.md
# §7.3): FedAvg on domain-silos (8 clients, all in every round, one pass
# over 2,040 pairs) at the research recipe (content captions after a
# newline, one visual token), on the tuning seed 1000 (never reported).
# Every variant takes 16 sequential rounds x L local steps of b pairs per
# client: (L, b) in {(1,16), (2,8), (4,4), (8,2), (16,1)} x peak lr in
# {3e-3, 1e-2, 2e-2}; the round's 8 clients train through the decoder in
# one pass, so every pass holds 8 b rows. Each variant is a plain
# `fedcmp run` whose folder lands in runs/federated-pilot/<variant>/; the
# table at the end ranks them by final validation NLL (the choice), with
# the test suite beside it for reading.
#
#   bash scripts/federated_pilot.sh            # every variant (~3-5 minutes each here)
#   bash scripts/federated_pilot.sh L8-b2-lr1e-2   # only the named ones
#
# Finished variants are kept (their run folder has a summary.json); delete
# runs/federated-pilot/<variant> to run one again.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDCMP="${FEDCMP:-target/release/fedcmp}"
[ -x "$FEDCMP" ] || cargo build --release -p fedcmp-cli
OUT="${OUT:-runs/federated-pilot}"

COMMON=(--scenario domain-silos --strategy fedavg --captions content
        --caption-separator '\n' --visual-tokens 1 --clients-per-pass 8
        --seed 1000 --eval-every 2)

VARIANTS=()
for lr in 1e-2 3e-3 2e-2; do
  for lb in 8:2 4:4 16:1 2:8 1:16; do
    VARIANTS+=("L${lb%%:*}-b${lb##*:}-lr$lr|--local-steps ${lb%%:*} --batch-size ${lb##*:} --lr $lr")
  done
done

. scripts/variants.sh
run_variants "$@"

# The table (sorted by final validation NLL, the choice) and the curves.
OUT="$OUT" python3 - <<'PY'
import glob, json, os, re
out = os.environ["OUT"]
rows = []
for path in sorted(glob.glob(f"{out}/*/*/summary.json")):
    name = path.split("/")[-3]
    s = json.load(open(path))
    folder = os.path.dirname(path)
    curve = {}
    for line in open(os.path.join(folder, "metrics.jsonl")):
        r = json.loads(line)
        if r.get("val_loss") is not None:
            curve[r["samples_total"]] = r["val_loss"]
    m = re.fullmatch(r"L(\d+)-b(\d+)-lr(.+)", name)
    if not m:
        continue
    L, b, lr = int(m[1]), int(m[2]), m[3]
    f = s["suite"]["final"]
    marks = [curve.get(k) for k in (512, 1024, 1536)]
    rows.append((s["validation_nll"]["final"], name, L, b, lr, s["rounds"], s["rounds"] * L,
                 marks, f["macro_nll"], f.get("macro_zero_shot_accuracy"),
                 f.get("macro_zero_shot_raw_accuracy"), f.get("macro_caption_accuracy"), s["seconds"]))
rows.sort()
fmt = lambda v, d: "-" if v is None else f"{v:.{d}f}"
print(f"{'variant':<16} {'L':>3} {'b':>3} {'lr':>5} {'merges':>6} {'steps':>5} "
      f"{'val NLL @512/1024/1536':>23} {'final':>7} {'test NLL':>8} {'zs cal':>6} {'zs raw':>6} {'capt':>5} {'train s':>7}")
for r in rows:
    marks = "/".join(fmt(m, 3) for m in r[7])
    print(f"{r[1]:<16} {r[2]:>3} {r[3]:>3} {r[4]:>5} {r[5]:>6} {r[6]:>5} {marks:>23} {r[0]:>7.4f} "
          f"{r[8]:>8.4f} {fmt(r[9],3):>6} {fmt(r[10],3):>6} {fmt(r[11],3):>5} {r[12]:>7.0f}")
PY
"$FEDCMP" curves "$OUT"/*/domain-silos-fedavg-s1000 --out "$OUT/curves.png" \
  --title "federated pilot: FedAvg on domain-silos, tuning seed 1000" > /dev/null
echo "curves: $OUT/curves.png"

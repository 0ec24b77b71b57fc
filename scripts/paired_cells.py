#!/usr/bin/env python3
"""Paired differences between the cells of two comparison folders: the
same method and seed trained two ways (e.g. without and with attackers,
or without and with privacy), scored on the same test items.

    scripts/paired_cells.py [--recovery REFS] BASE OTHER SCENARIO METHOD[=OTHER_METHOD] ...

For each method: test NLL (macro over domains of NLL per token) and the
share of greedy captions naming the class, as mean +- sd over seeds in
BASE and OTHER, and the paired difference OTHER - BASE with its 95%
percentile bootstrap interval over seeds x test items, as `fedcmp
compare` computes it within one folder (compare/stats.rs): every
replicate draws seeds with replacement and, per domain, test items with
replacement (the same items for every drawn seed and both sides). Cells
are `<folder>/cells/<scenario>/<method>/g<setting>-s<seed>.json`; the
reported cells are the seeds 0, 1, ... (the tuning seed 1000 is skipped),
at whichever setting each folder chose. With `--recovery REFS` (a folder
holding the `init` and `centralized` cells of the same seeds) it adds
OTHER's recovery of the centralized gain, (init - NLL) / (init -
centralized) per seed with init and centralized their means over seeds
(as `fedcmp compare` takes it), as mean +- sd.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPLICATES = 2000


def cells(folder: Path, scenario: str, method: str) -> dict[int, dict]:
    out = {}
    for path in sorted((folder / "cells" / scenario / method).glob("g*-s*.json")):
        cell = json.loads(path.read_text())
        if cell["seed"] >= 1000 or cell.get("error") or not cell.get("suite"):
            continue
        out[cell["seed"]] = cell
    return out


def per_domain(cell: dict, measure: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per domain: (numerators, weights) per item."""
    out = []
    for d in cell["suite"]["domains"]:
        items = d["items"]
        if measure == "nll":
            out.append((-np.array(items["log_likelihood"]), np.array(items["tokens"], dtype=float)))
        else:
            hits = np.array(items["caption"], dtype=float)
            out.append((hits, np.ones_like(hits)))
    return out


def macro(domains, picks=None) -> float:
    values = []
    for i, (num, w) in enumerate(domains):
        if len(num) == 0:
            continue
        idx = picks[i] if picks is not None else slice(None)
        values.append(num[idx].sum() / w[idx].sum())
    return float(np.mean(values))


def paired(base: dict[int, dict], other: dict[int, dict], measure: str, rng) -> tuple[float, float, float, int]:
    seeds = sorted(set(base) & set(other))
    b = [per_domain(base[s], measure) for s in seeds]
    o = [per_domain(other[s], measure) for s in seeds]
    mean = float(np.mean([macro(y) - macro(x) for x, y in zip(b, o)]))
    sizes = [len(num) for num, _ in b[0]]
    reps = []
    for _ in range(REPLICATES):
        drawn = rng.integers(0, len(seeds), len(seeds))
        picks = [rng.integers(0, n, n) if n else None for n in sizes]
        reps.append(np.mean([macro(o[i], picks) - macro(b[i], picks) for i in drawn]))
    low, high = np.percentile(reps, [2.5, 97.5])
    return mean, float(low), float(high), len(seeds)


def spread(cellset: dict[int, dict], measure: str) -> str:
    key = "macro_nll" if measure == "nll" else "macro_caption_accuracy"
    xs = [c["suite"][key] for c in cellset.values()]
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


def recovery(refs: Path, scenario: str, cellset: dict[int, dict]) -> str:
    # As `fedcmp compare` takes it: the means over seeds of the untrained
    # and the centralized projector's NLL, each seed's NLL of the method.
    init, central = cells(refs, scenario, "init"), cells(refs, scenario, "centralized")
    if not init or not central:
        return "-"
    i = np.mean([c["suite"]["macro_nll"] for c in init.values()])
    z = np.mean([c["suite"]["macro_nll"] for c in central.values()])
    xs = [(i - c["suite"]["macro_nll"]) / (i - z) for c in cellset.values()]
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"


def main(argv: list[str]) -> None:
    refs = None
    if argv[:1] == ["--recovery"]:
        refs, argv = Path(argv[1]), argv[2:]
    if len(argv) < 4:
        sys.exit(__doc__)
    base_dir, other_dir, scenario = Path(argv[0]), Path(argv[1]), argv[2]
    rng = np.random.default_rng(0)
    extra = f" recovery {other_dir.name} |" if refs else ""
    print(f"| method | test NLL {base_dir.name} | test NLL {other_dir.name} | difference | captions {base_dir.name} | captions {other_dir.name} | difference |{extra}")
    print("|---|---|---|---|---|---|---|" + ("---|" if refs else ""))
    for spec in argv[3:]:
        base_method, _, other_method = spec.partition("=")
        other_method = other_method or base_method
        base = cells(base_dir, scenario, base_method)
        other = cells(other_dir, scenario, other_method)
        if not base or not other:
            print(f"| {spec} | missing cells ({len(base)} / {len(other)}) |")
            continue
        row = [spec]
        for measure in ("nll", "captions"):
            mean, low, high, n = paired(base, other, measure, rng)
            diff = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
            if low <= 0 <= high:
                diff = f"no difference ({diff})"
            row += [spread(base, measure), spread(other, measure), f"{diff} (n={n})"]
        if refs:
            row.append(recovery(refs, scenario, other))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python3
"""Per-round server steps and interference diagnostics of a comparison's
reported cells (docs/RESULTS.md §5): for every federated method, at the
setting its tuning chose, the mean over reported seeds of the clients'
mean delta norm, the server's momentum norm, the server step it implies
(the recorded `server_step_norm` where the cells hold it, cells made
by 68ed481 or later; else server lr x momentum norm for
momentum methods, server lr x mean delta norm otherwise, which misses
the EMA form's bias correction) and that step relative to FedAvg's at server lr 1 (the
mean delta), with OPM's dropped momentum share, CRA's mean reliability
rho and cross-client share, and the mean pairwise cosine of client deltas.

    python3 scripts/server_steps.py runs/matrix domain-silos [rounds...]

Reads only the cells' JSON (no dependency beyond the standard library).
"""

import glob
import json
import os
import sys


def server_lr(config):
    if config is None:
        return None
    if "server-lr" in config:
        return config["server-lr"]
    return config.get("cra", {}).get("server-lr")


def chosen_cells(method_dir):
    """The reported cells: seeds 0.. of the setting with the lowest
    validation NLL at the tuning seed (or the only setting there is)."""
    tuning = {}
    for path in glob.glob(os.path.join(method_dir, "g*-s1000.json")):
        cell = json.load(open(path))
        g = os.path.basename(path).split("-")[0]
        if cell.get("val_nll") is not None:
            tuning[g] = cell["val_nll"]
    g = min(tuning, key=tuning.get) if tuning else "g0"
    cells = []
    for path in sorted(glob.glob(os.path.join(method_dir, f"{g}-s*.json"))):
        if path.endswith("-s1000.json"):
            continue
        cells.append(json.load(open(path)))
    return g, cells


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def main():
    out, scenario = sys.argv[1], sys.argv[2]
    rounds = [int(r) for r in sys.argv[3:]] or [1, 2, 4, 8, 12, 16]
    root = os.path.join(out, "cells", scenario)
    methods = sorted(
        m
        for m in os.listdir(root)
        if m not in ("init", "centralized", "local-only")
    )
    rows = []
    for method in methods:
        g, cells = chosen_cells(os.path.join(root, method))
        if not cells:
            continue
        lr = server_lr(cells[0].get("config"))
        for r in rounds:
            diag = [
                next((d for d in c["diagnostics"] if d.get("round") == r), None)
                for c in cells
            ]
            diag = [d for d in diag if d is not None]
            if not diag:
                continue
            delta = mean([d.get("mean_delta_norm") for d in diag])
            momentum = mean([d.get("momentum_norm") for d in diag])
            recorded = mean([d.get("server_step_norm") for d in diag])
            step = (
                recorded
                if recorded is not None
                else lr * (momentum if momentum is not None else delta)
            )
            rows.append(
                (
                    method,
                    g,
                    lr,
                    r,
                    delta,
                    momentum,
                    step,
                    step / delta if delta else None,
                    mean([d.get("opm_dropped_fraction") for d in diag]),
                    mean([d.get("cra_rho_mean") for d in diag]),
                    mean([d.get("cra_shared_share") for d in diag]),
                    mean([d.get("cosine_mean") for d in diag]),
                    len(diag),
                )
            )
    head = (
        "| method | setting | server lr | round | mean delta norm | momentum norm "
        "| server step | step / mean delta | OPM dropped | CRA rho | CRA shared share "
        "| client cosine | seeds |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    for row in rows:
        print(
            "| "
            + " | ".join(
                [row[0], row[1], f"{row[2]:g}", str(row[3])]
                + [fmt(v) for v in row[4:12]]
                + [str(row[12])]
            )
            + " |"
        )


if __name__ == "__main__":
    main()

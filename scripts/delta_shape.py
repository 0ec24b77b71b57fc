#!/usr/bin/env python3
"""The shape of recorded client deltas (RESULTS.md §4): per recorded round
and weight matrix, the clients' pairwise cosines, the cross-client share of
the merged energy in the output-side canonical basis, and the distribution
of CRA v2's shrinkage gain over its directions (ALGORITHMS.md §3.1), and
each client's cosine with its own delta of the round before, from a
`fedcmp harness` recording. Written from the spec's equations (numpy),
independently of the Rust code.

    python3 scripts/delta_shape.py runs/harness/domain-silos/seed-0 2 8

Needs numpy and safetensors (pip install numpy safetensors).
"""

import json
import sys

import numpy as np
from safetensors.numpy import load_file


def shape(seed_dir, rnd):
    d = f"{seed_dir}/round-{rnd:04d}"
    meta = json.load(open(f"{d}/round.json"))
    start = load_file(f"{d}/global.safetensors")
    ids = [c["client"] for c in meta["clients"]]
    n = np.array([c["num_samples"] for c in meta["clients"]], float)
    p = n / n.sum()
    spread = 1.0 - np.sum(p**2)
    for name in sorted(k for k, v in start.items() if v.ndim == 2):
        deltas = [
            load_file(f"{d}/client-{i:04d}.safetensors")[name].astype(np.float64)
            - start[name].astype(np.float64)
            for i in ids
        ]
        flat = np.array([x.ravel() for x in deltas])
        norms = np.linalg.norm(flat, axis=1)
        cos = flat @ flat.T / np.outer(norms, norms)
        gram = sum(pk * x @ x.T for pk, x in zip(p, deltas))
        lam, u = np.linalg.eigh(gram)
        u = u[:, lam > lam.max() * 1e-12]
        coeffs = [u.T @ x for x in deltas]
        gains, cross, merged = [], [], []
        for j in range(u.shape[1]):
            rows = [c[j] for c in coeffs]
            cbar = sum(pk * c for pk, c in zip(p, rows))
            m = float(cbar @ cbar)
            x = m - sum(pk * pk * float(c @ c) for pk, c in zip(p, rows))
            cross.append(x)
            merged.append(m)
            gains.append(min(max(x / (m * spread), 0.0), 1.0) if m > 0 else 0.0)
        gains, merged = np.array(gains), np.array(merged)
        print(f"round {rnd} {name} ({deltas[0].shape[0]} x {deltas[0].shape[1]}), clients {ids}")
        print("  pairwise cosines:")
        for row in cos:
            print("   " + " ".join(f"{v:+.2f}" for v in row))
        print(
            f"  cross-client share of merged energy {sum(cross) / (spread * sum(merged)):.3f}; "
            f"shrinkage gain: energy-weighted mean {np.sum(gains * merged) / np.sum(merged):.3f}, "
            f"10/50/90% {np.round(np.quantile(gains, [0.1, 0.5, 0.9]), 3).tolist()} "
            f"over {len(gains)} directions"
        )


def client_deltas(seed_dir, rnd):
    """Each client's delta of round `rnd` per weight matrix, by client id."""
    d = f"{seed_dir}/round-{rnd:04d}"
    meta = json.load(open(f"{d}/round.json"))
    start = load_file(f"{d}/global.safetensors")
    out = {}
    for c in meta["clients"]:
        mine = load_file(f"{d}/client-{c['client']:04d}.safetensors")
        out[c["client"]] = {
            k: mine[k].astype(np.float64) - v.astype(np.float64)
            for k, v in start.items()
            if v.ndim == 2
        }
    return out


def self_agreement(seed_dir, rnd):
    """Per weight matrix, the cosine of each client's delta at `rnd` with
    its own delta of the round before (clients in both): how consistent a
    client's direction is over time, next to its agreement with others."""
    now, before = client_deltas(seed_dir, rnd), client_deltas(seed_dir, rnd - 1)
    both = sorted(set(now) & set(before))
    for name in sorted(now[both[0]]) if both else []:
        cos = []
        for k in both:
            a, b = now[k][name].ravel(), before[k][name].ravel()
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        print(
            f"round {rnd} {name}: each client's cosine with its own round-{rnd - 1} delta "
            + " ".join(f"{v:+.2f}" for v in cos)
        )


def main():
    seed_dir = sys.argv[1]
    for rnd in (int(r) for r in sys.argv[2:]):
        shape(seed_dir, rnd)
        if rnd > 1:
            self_agreement(seed_dir, rnd)


if __name__ == "__main__":
    main()

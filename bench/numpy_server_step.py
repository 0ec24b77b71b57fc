#!/usr/bin/env python3
"""numpy/LAPACK reference for Fed-CMP's server step (bench/server_step.sh).

Reads the round-1 client deltas that `fedcmp-bench server-step --dump DIR`
wrote, runs the same aggregation with numpy (float64, the strongest plain
numpy route: the Gram matrix sum_k p_k D_k D_k^T with BLAS, LAPACK's
symmetric eigensolver, batched products for the coefficients, vectorised
reliability), times it, and compares the result with fedcmp's update.
Only the first round is compared: there OPM's momentum is zero, so Fed-CMP's
step is eta_s (U C* + residual) for matrices and the weighted mean for
biases. Written from ALGORITHMS.md section 3, not from the Rust code.

Prints one JSON line (last line).
"""

import json
import math
import os
import sys
import time

import numpy as np


PHASES = {}


def phase(name, t0):
    """Adds the time since t0 to a phase; returns now."""
    now = time.perf_counter()
    PHASES[name] = PHASES.get(name, 0.0) + now - t0
    return now


def cra_matrix(ds, p, cfg):
    t = time.perf_counter()
    rows = ds[0].shape[0]
    g = np.zeros((rows, rows))
    for pk, d in zip(p, ds):
        g += pk * (d @ d.T)  # numpy calls BLAS syrk for d @ d.T
    t = phase("gram", t)
    lam, vec = np.linalg.eigh(g)
    t = phase("eigh", t)
    lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
    wide = len(ds) * ds[0].shape[1]
    numerical = int(np.sum(lam > max(rows, wide) * np.finfo(float).eps * lam[0]))
    energy = cfg.get("energy", 0.95)
    if energy >= 1.0:
        r = numerical
    else:
        cum = np.cumsum(lam[:numerical])
        r = int(np.argmax(cum >= energy * cum[-1])) + 1
    if cfg.get("max-rank") is not None:
        r = min(r, cfg["max-rank"])
    u = vec[:, :r]
    c = np.stack([u.T @ d for d in ds])  # (K, r, cols)
    t = phase("coefficients", t)
    pw = np.asarray(p)
    cbar = np.einsum("k,krc->rc", pw, c)
    cn = np.linalg.norm(c, axis=2)  # (K, r)
    bn = np.linalg.norm(cbar, axis=1)  # (r,)
    dots = np.einsum("krc,rc->kr", c, cbar)
    with np.errstate(invalid="ignore", divide="ignore"):
        agree = np.where((cn > 0) & (bn > 0), dots / (cn * bn), 0.0)
    tau = cfg.get("tau", 1.0)
    if tau == "inf" or (isinstance(tau, float) and math.isinf(tau)):
        alpha = np.repeat(pw[:, None], r, axis=1)
    else:
        w = pw[:, None] * np.exp((agree - agree.max(axis=0)) / tau)
        alpha = w / w.sum(axis=0)
    denom = np.einsum("k,kr->r", pw, cn)
    rho = np.where(denom > 0, bn / np.where(denom > 0, denom, 1.0), 0.0)
    fused = np.einsum("kr,krc->rc", alpha, c)
    gamma = cfg.get("confidence-power", 0.0)
    if gamma != 0.0:
        fused *= (rho**gamma)[:, None]
    out = u @ fused
    t = phase("reliability+reconstruct", t)
    lam_res = cfg.get("residual-weight", 0.0)
    if lam_res != 0.0:
        mean = sum(pk * d for pk, d in zip(p, ds))
        out += lam_res * (mean - u @ (u.T @ mean))
    return out, r


def main():
    d = sys.argv[1]
    meta = json.load(open(os.path.join(d, "meta.json")))
    cfg = meta["strategy"]
    layout = meta["layout"]
    sizes = [int(np.prod(s)) for _, s in layout]
    deltas = []
    for k in range(meta["clients"]):
        flat = np.fromfile(os.path.join(d, f"delta-{k}.f32"), dtype="<f4")
        parts, o = [], 0
        for (_, shape), n in zip(layout, sizes):
            parts.append(flat[o : o + n].astype(np.float64).reshape(shape))
            o += n
        deltas.append(parts)
    counts = np.asarray(meta["counts"], dtype=np.float64)
    p = counts / counts.sum()
    lr = cfg.get("server-lr", 1.0)

    t0 = time.perf_counter()
    update, ranks = [], []
    for i, (_, shape) in enumerate(layout):
        ds = [c[i] for c in deltas]
        if len(shape) == 2:
            m, r = cra_matrix(ds, p, cfg)
            ranks.append(r)
        else:
            m = sum(pk * x for pk, x in zip(p, ds))
        update.append(lr * m.reshape(-1))
    secs = time.perf_counter() - t0

    ours = np.fromfile(os.path.join(d, "update.f32"), dtype="<f4").astype(np.float64)
    ref = np.concatenate(update)
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"numpy round 1: {secs:.2f} s, ranks {ranks}, |fedcmp - numpy| / |numpy| = {rel:.2e}")
    print("numpy phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in PHASES.items()))
    print(
        json.dumps(
            {
                "stack": f"numpy {np.__version__}",
                "round_s": secs,
                "ranks": ranks,
                "relative_difference": rel,
                "phases_s": PHASES,
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Independent numpy reference for fedcmp-strategy's golden test.

Written from the papers' equations (not from the Rust code): every
algorithm below is a few lines of float64 numpy. It builds one small
deterministic federation and writes golden.json next to this file:

- a projector of one 3x4 matrix `w` and one 3-vector bias `b` (15 values,
  flattened `w` row-major then `b`, the order of the parameter set);
- N = 5 clients, 3 participating per round, 3 rounds, with unequal sample
  counts and unequal local step counts; updates listed out of id order;
- every algorithm (and a few hyper-parameter variants) run for the 3
  rounds, so that server optimiser state matters.

The global model is f32 (as in the system): each round's new global is
rounded to float32 before the clients start from it, and client parameters
are float32. Deltas and all server math are float64; optimiser state stays
float64 here (the Rust side stores it as f32; the tolerance covers that).

Run:  python3 reference.py   (numpy only; writes golden.json)
"""

import json
import math
import os

import numpy as np

N_CLIENTS = 5
LAYOUT = [("w", [3, 4]), ("b", [3])]
P = 15
PARTICIPANTS = [[2, 0, 1], [3, 1, 4], [0, 4, 2]]  # update order as sent
SAMPLES = {0: [10, 40, 25, 7, 18], 1: [12, 33, 20, 5, 30], 2: [9, 28, 16, 11, 21]}
STEPS = {0: [2, 8, 5, 3, 4], 1: [3, 7, 4, 1, 6], 2: [2, 6, 5, 2, 3]}

rng = np.random.default_rng(20240611)
GLOBAL0 = rng.normal(0.0, 0.5, P).astype(np.float32)
# Client deltas (float64), fixed across algorithms: a shared direction per
# round, client noise, and one client partly against the others, so that
# cosines and TIES sign conflicts are non-trivial.
DELTAS = {}
CONTROL_DELTAS = {}
LOSSES = {}
for r, clients in enumerate(PARTICIPANTS):
    shared = rng.normal(0.0, 0.05, P)
    for i, k in enumerate(clients):
        noise = rng.normal(0.0, 0.04, P)
        sign = -0.6 if i == 2 else 1.0
        DELTAS[(r, k)] = sign * shared + noise
        CONTROL_DELTAS[(r, k)] = rng.normal(0.0, 0.1, P).astype(np.float32)
        LOSSES[(r, k)] = float(2.0 + rng.uniform(-0.5, 0.5))


def f32(x):
    return np.asarray(x, dtype=np.float64).astype(np.float32)


def split(flat):
    """Flat values -> per-tensor lists, in layout order."""
    out, o = [], 0
    for _, shape in LAYOUT:
        n = int(np.prod(shape))
        out.append([float(v) for v in flat[o : o + n]])
        o += n
    return out


def sign(x):
    return np.sign(x)  # sign(0) = 0


# ---- server algorithms, one function per paper ----------------------------
# Each takes (state dict, x float64 from the f32 global, round data) and
# returns (aggregated update Delta, new x float64, extra metrics).


def weighted_mean(ds, w):
    return sum(wi * di for wi, di in zip(w, ds))


def fedavg(cfg, st, x, rd):
    # McMahan et al. 2017 with a server lr: x + eta * sum p_k d_k.
    delta = weighted_mean(rd["d"], rd["p"])
    return delta, x + cfg["server-lr"] * delta, {}


def fedavgm(cfg, st, x, rd):
    # Hsu et al. 2019: v = beta v + Delta; x += eta v (nesterov: beta v + Delta).
    # momentum-form "ema" (ALGORITHMS-NOTES.md section 2): v = beta v +
    # (1 - beta) Delta, x += eta v / (1 - beta^t).
    delta = weighted_mean(rd["d"], rd["p"])
    beta = cfg["momentum"]
    ema = cfg.get("momentum-form", "heavy-ball") == "ema"
    v = beta * st.get("v", np.zeros(P)) + ((1.0 - beta) if ema else 1.0) * delta
    st["v"] = v
    st["t"] = st.get("t", 0) + 1
    step = beta * v + delta if cfg.get("nesterov", False) else v
    if ema:
        step = v / (1.0 - beta ** st["t"])
    return delta, x + cfg["server-lr"] * step, {"momentum_norm": np.linalg.norm(v)}


def fedopt(rule):
    # Reddi et al. 2021, Algorithm 2 (no bias correction), v_{-1} = tau^2.
    def run(cfg, st, x, rd):
        delta = weighted_mean(rd["d"], rd["p"])
        b1, tau = cfg["beta1"], cfg["tau"]
        b2 = cfg.get("beta2", 0.0)
        m = b1 * st.get("m", np.zeros(P)) + (1 - b1) * delta
        v_prev = st.get("v", np.full(P, tau * tau))
        d2 = delta * delta
        if rule == "adagrad":
            v = v_prev + d2
        elif rule == "adam":
            v = b2 * v_prev + (1 - b2) * d2
        else:  # yogi
            v = v_prev - (1 - b2) * d2 * sign(v_prev - d2)
            st.setdefault("yogi_branches", set()).update(np.sign(v_prev - d2).tolist())
        st["m"], st["v"] = m, v
        x_new = x + cfg["server-lr"] * m / (np.sqrt(v) + tau)
        return delta, x_new, {"momentum_norm": np.linalg.norm(m)}

    return run


def scaffold(cfg, st, x, rd):
    # Karimireddy et al. 2020, Alg. 1: x += eta_g mean(dy); c += |S|/N mean(dc).
    s = len(rd["d"])
    w = rd["p"] if cfg.get("weighting") == "samples" else [1.0 / s] * s
    delta = weighted_mean(rd["d"], w)
    c = st.get("c", np.zeros(P)) + (s / N_CLIENTS) * np.mean(rd["dc"], axis=0)
    st["c"] = c
    return delta, x + cfg["server-lr"] * delta, {"control_norm": np.linalg.norm(c)}


def fednova(cfg, st, x, rd):
    # Wang et al. 2020: x - tau_eff sum p_i d_i, d_i = (x - x_i)/||a_i||_1,
    # with a_i the client's step sizes, so ||a_i||_1 = its lr_sum.
    p, tau = np.array(rd["p"]), np.array(rd["lr_sum"], dtype=np.float64)
    tau_eff = float(np.dot(p, tau))
    d_norm = [-(di) / ti for di, ti in zip(rd["d"], tau)]  # (x - x_i)/tau_i
    delta = -tau_eff * sum(pi * di for pi, di in zip(p, d_norm))
    return delta, x + cfg["server-lr"] * delta, {"tau_eff": tau_eff}


def ties(cfg, st, x, rd):
    # Yadav et al. 2023: trim top-k% (whole vector), elect sign of the sum,
    # disjoint mean of the values agreeing with the elected sign.
    keep = min(P, max(1, math.ceil(cfg["top-k-percent"] * P / 100)))
    trimmed = []
    for d in rd["d"]:
        order = np.argsort(-np.abs(d), kind="stable")[:keep]
        t = np.zeros(P)
        t[order] = d[order]
        trimmed.append(t)
    trimmed = np.array(trimmed)
    elected = sign(trimmed.sum(axis=0))
    agree = (sign(trimmed) == elected) & (elected != 0)
    count = agree.sum(axis=0)
    merged = np.where(count > 0, (trimmed * agree).sum(axis=0) / np.maximum(count, 1), 0.0)
    s = sign(trimmed)
    conflict = ((s > 0).any(axis=0) & (s < 0).any(axis=0)).mean()
    extra = {"ties_kept": keep, "ties_sign_conflict_fraction": float(conflict)}
    return merged, x + cfg["server-lr"] * merged, extra


# ---- Fed-CMP (ALGORITHMS.md sections 3 and 4), from the spec's equations ----
W_SHAPE = LAYOUT[0][1]
W_LEN = W_SHAPE[0] * W_SHAPE[1]


def nearest_rank_quantiles(values):
    """min, 10%, 25%, median, 75%, 90%, max: sorted[round(q (n - 1))],
    rounding halves away from zero."""
    v = sorted(values)
    n = len(v)
    return [v[min(int(math.floor(q * (n - 1) + 0.5)), n - 1)] for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1)]


def cra_matrix(cfg, ds, p, st, ids=None):
    """CRA on one matrix: ds are (d_out x d_in) deltas, p the data weights.

    Without basis momentum the basis is the exact thin SVD of S =
    [sqrt(p_k) Delta_k]_k (the Rust side uses a Gram eigendecomposition;
    this checks that they agree). With `basis-beta` (section 3.1 item 4) it
    is the top eigenvectors of G_t = beta G_{t-1} + sum_k p_k Delta_k
    Delta_k^T, G kept in st as float32 (the Rust side's state). With
    `gain = "temporal"` (ALGORITHMS-NOTES.md section 1) each client's
    contribution along u_j is scaled by max(0, cos(c_kj, u_j^T Delta_k^prev)),
    1 without a past; the pasts are kept in st by client id, as float32."""
    beta_b = cfg.get("basis-beta", 0.0)
    s = np.concatenate([np.sqrt(pk) * d for pk, d in zip(p, ds)], axis=1)
    drift = None
    if beta_b > 0:
        g = sum(pk * d @ d.T for pk, d in zip(p, ds))
        prev = st.get("gram")
        if prev is not None:
            drift = 1.0 - float(np.sum(g * prev) / (np.linalg.norm(g) * np.linalg.norm(prev)))
            g = g + beta_b * prev
        st["gram"] = g.astype(np.float32).astype(np.float64)
        lam, vec = np.linalg.eigh(g)
        order = np.argsort(lam)[::-1]
        lam, u = np.clip(lam[order], 0.0, None), vec[:, order]
        sig = np.sqrt(lam)
        # The Gram rule for the numerical rank (as the Rust side's header says).
        tol = max(s.shape) * np.finfo(float).eps * lam[0]
        numerical = int(np.sum(lam > tol))
    else:
        u, sig, _ = np.linalg.svd(s, full_matrices=False)
        numerical = int(np.sum(sig > max(s.shape) * np.finfo(float).eps * sig[0]))
    energy = cfg.get("energy", 0.95)
    if energy >= 1.0:
        r = numerical
    else:
        cum = np.cumsum(sig[:numerical] ** 2)
        r = int(np.argmax(cum >= energy * cum[-1])) + 1
    if cfg.get("max-rank") is not None:
        r = min(r, cfg["max-rank"])
    u = u[:, :r]
    tau = cfg.get("tau", 1.0)
    tau = math.inf if tau == "inf" else tau
    gamma = cfg.get("confidence-power", 0.0)
    lam_res = cfg.get("residual-weight", 0.0)
    loo = cfg.get("agreement", "consensus") == "leave-one-out"
    shrink = cfg.get("gain", "none") == "shrinkage"
    temporal = cfg.get("gain", "none") == "temporal"
    pasts = st.setdefault("past", {})
    past_coeffs = [u.T @ pasts[k] if temporal and k in pasts else None for k in (ids or [])]
    spread = 1.0 - sum(pk * pk for pk in p)
    coeffs = [u.T @ d for d in ds]  # C_k, r x d_in
    fused = np.zeros((r, ds[0].shape[1]))
    rho, gains, cross, merged = [], [], [], []
    for j in range(r):
        rows = [c[j] for c in coeffs]
        cbar = sum(pk * c for pk, c in zip(p, rows))

        def cos(a, b):
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

        if loo:
            agree = np.array([cos(c, cbar - pk * c) for pk, c in zip(p, rows)])
        else:
            agree = np.array([cos(c, cbar) for c in rows])
        if math.isinf(tau):
            alpha = np.array(p)
        else:
            w = np.array(p) * np.exp(agree / tau)
            alpha = w / w.sum()
        rho_j = np.linalg.norm(cbar) / sum(pk * np.linalg.norm(c) for pk, c in zip(p, rows))
        rho.append(rho_j)
        # Cross-client term and merged energy (section 3.1 item 2).
        x_j = sum(
            p[a] * p[b] * float(rows[a] @ rows[b])
            for a in range(len(rows))
            for b in range(len(rows))
            if a != b
        )
        m_j = float(cbar @ cbar)
        cross.append(x_j)
        merged.append(m_j)
        client_gain = [1.0] * len(rows)
        if temporal:
            for i, c in enumerate(rows):
                if past_coeffs[i] is not None:
                    client_gain[i] = max(0.0, cos(c, past_coeffs[i][j]))
            weight = sum(pk * float(c @ c) for pk, c in zip(p, rows))
            kept = sum(pk * g * float(c @ c) for pk, g, c in zip(p, client_gain, rows))
            g_j = kept / weight if weight > 0 else 1.0
        elif not shrink:
            g_j = 1.0
        elif spread <= 16 * np.finfo(float).eps:
            g_j = 1.0
        elif m_j <= 0:
            g_j = 0.0
        else:
            r_j = sum(pk * pk * float(c @ c) for pk, c in zip(p, rows)) / m_j
            g_j = min(max((1.0 - r_j) / spread, 0.0), 1.0)
        gains.append(g_j)
        direction = 1.0 if temporal else g_j
        fused[j] = direction * rho_j**gamma * sum(a * g * c for a, g, c in zip(alpha, client_gain, rows))
    if temporal:
        for k, d in zip(ids, ds):
            pasts[k] = d.astype(np.float32).astype(np.float64)
    residual = lam_res * sum(pk * (d - u @ c) for pk, d, c in zip(p, ds, coeffs))
    alignment_num = [float(np.sum((u @ c) ** 2)) for c in coeffs]
    alignment_den = [float(np.sum(d**2)) for d in ds]
    energy_kept = float(np.sum(sig[:r] ** 2) / np.sum(sig**2))
    return {
        "u": u,
        "c_star": fused,
        "residual": residual,
        "rank": r,
        "energy_kept": energy_kept,
        "rho": rho,
        "gain": gains,
        "cross": cross,
        "merged": merged,
        "spread": spread,
        "drift": drift,
        "align": (alignment_num, alignment_den),
    }


def cra_round(cfg, rd, st):
    """CRA on the round: the matrix `w` merged canonically, the bias `b` by
    the weighted mean. Returns (merged matrix parts, bias mean, metrics)."""
    ds = [d[:W_LEN].reshape(W_SHAPE) for d in rd["d"]]
    m = cra_matrix(cfg, ds, rd["p"], st, rd["ids"])
    bias = weighted_mean([d[W_LEN:] for d in rd["d"]], rd["p"])
    num, den = m["align"]
    extra = {"cra_rho_mean": float(np.mean(m["rho"])), "cra_rho_min": float(np.min(m["rho"]))}
    extra["cra_shared_share"] = sum(m["cross"]) / (m["spread"] * sum(m["merged"]))
    series = {
        "cra_rank": [float(m["rank"])],
        "cra_energy_kept": [m["energy_kept"]],
        "cra_client_alignment": [a / b if b > 0 else 0.0 for a, b in zip(num, den)],
    }
    if cfg.get("gain", "none") in ("shrinkage", "temporal"):
        extra["cra_gain_mean"] = sum(g * x for g, x in zip(m["gain"], m["merged"])) / sum(m["merged"])
        series["cra_gain_quantiles"] = nearest_rank_quantiles(m["gain"])
    if m["drift"] is not None:
        series["cra_basis_drift"] = [m["drift"]]
    return m, bias, extra, series


def cra_only(cfg, st, x, rd):
    # Section 3 with the plain server step: x + eta (U C* + residual).
    m, bias, extra, series = cra_round(cfg, rd, st)
    delta = np.concatenate([(m["u"] @ m["c_star"] + m["residual"]).reshape(-1), bias])
    extra["_series"] = series
    return delta, x + cfg.get("server-lr", 1.0) * delta, extra


def fed_cmp(cfg, st, x, rd):
    # Section 4: momentum (U_m, K_m) transported onto the new basis.
    m, bias, extra, series = cra_round(cfg, rd, st)
    beta, lr = cfg.get("beta", 0.9), cfg.get("server-lr", 1.0)
    nesterov = cfg.get("nesterov", False)
    ema = cfg.get("momentum-form", "heavy-ball") == "ema"
    weight = (1.0 - beta) if ema else 1.0
    st["t"] = st.get("t", 0) + 1
    scale = 1.0 / (1.0 - beta ** st["t"]) if ema else 1.0
    u, c_star = m["u"], m["c_star"]
    dropped = 0.0
    if "u_m" in st:
        k_tilde = (u.T @ st["u_m"]) @ st["k_m"]
        old = float(np.sum(st["k_m"] ** 2))
        dropped = 1.0 - float(np.sum(k_tilde**2)) / old if old > 0 else 0.0
        st.setdefault("dropped", []).append(dropped)
    else:
        k_tilde = np.zeros_like(c_star)
    k = beta * k_tilde + weight * c_star
    v = beta * st.get("v", np.zeros(P - W_LEN)) + weight * bias
    # The server keeps its state in f32 (as the Rust side stores it).
    st["u_m"], st["k_m"], st["v"] = (
        u.astype(np.float32).astype(np.float64),
        k.astype(np.float32).astype(np.float64),
        v.astype(np.float32).astype(np.float64),
    )
    applied_k = beta * k + c_star if nesterov else scale * k
    applied_v = beta * v + bias if nesterov else scale * v
    step = np.concatenate([(u @ applied_k + m["residual"]).reshape(-1), applied_v])
    delta = np.concatenate([(u @ c_star + m["residual"]).reshape(-1), bias])
    extra["momentum_norm"] = math.sqrt(float(np.sum(k**2) + np.sum(v**2)))
    extra["opm_dropped_fraction"] = min(max(dropped, 0.0), 1.0)
    extra["_series"] = series
    return delta, x + lr * step, extra


def opm_only(cfg, st, x, rd):
    # The ablation: energy 1, tau infinite, gamma 0 (FedAvgM in the span).
    full = dict(cfg, energy=1.0, tau="inf")
    return fed_cmp(full, st, x, rd)


# ---- byzantine-robust rules (unweighted, from their papers) --------------


def robust_step(cfg, st, x, delta, extra):
    # The robust rules' server step: heavy ball with beta = server-momentum
    # (0: the plain step x + eta * Delta).
    beta = cfg.get("server-momentum", 0.0)
    v = beta * st.get("v", np.zeros(P)) + delta
    st["v"] = v
    extra["momentum_norm"] = np.linalg.norm(v)
    return delta, x + cfg.get("server-lr", 1.0) * v, extra


def median(cfg, st, x, rd):
    # Yin et al. 2018 Option I; numpy's even-count median (mean of the middle two).
    return robust_step(cfg, st, x, np.median(np.stack(rd["d"]), axis=0), {})


def trimmed_mean(cfg, st, x, rd):
    # Yin et al. 2018 Option II: cut floor(beta k) values at each end.
    k = len(rd["d"])
    b = min(int(math.floor(cfg["trim"] * k + 1e-9)), (k - 1) // 2)
    ordered = np.sort(np.stack(rd["d"]), axis=0)
    delta = ordered[b : k - b].mean(axis=0)
    return robust_step(cfg, st, x, delta, {"robust_trimmed": b})


def krum(cfg, st, x, rd):
    # Blanchard et al. 2017: s(i) = sum of the k - f - 2 smallest squared
    # distances to the others; average the m lowest scores (ties: lower id).
    ds, k, f = rd["d"], len(rd["d"]), cfg["byzantine"]
    m = cfg.get("keep") or k - f
    dist = np.array([[float(np.sum((a - b) ** 2)) for b in ds] for a in ds])
    scores = []
    for i in range(k):
        others = sorted(dist[i, j] for j in range(k) if j != i)
        scores.append(sum(others[: k - f - 2]))
    chosen = sorted(np.argsort(np.array(scores), kind="stable")[:m])
    delta = sum(ds[i] for i in chosen) / len(chosen)
    extra = {"_series": {"robust_selected": [float(rd["ids"][i]) for i in chosen]}}
    return robust_step(cfg, st, x, delta, extra)


def norm_bound(cfg, st, x, rd):
    # Sun et al. 2019: clip each delta to norm M (fixed, or the round's
    # median norm), then the mean (data-weighted, or uniform).
    ds = rd["d"]
    norms = [float(np.linalg.norm(d)) for d in ds]
    bound = float(np.median(norms)) if cfg.get("max-norm", "median") == "median" else cfg["max-norm"]
    clipped = [d * min(1.0, bound / n) if n > 0 else d for d, n in zip(ds, norms)]
    w = rd["p"] if cfg.get("weighting", "samples") == "samples" else np.full(len(ds), 1.0 / len(ds))
    extra = {"robust_bound": bound, "robust_clipped": sum(n > bound for n in norms)}
    return robust_step(cfg, st, x, weighted_mean(clipped, w), extra)


CASES = [
    ("fedavg", {"name": "fedavg", "server-lr": 1.0}, fedavg),
    ("fedavg-lr", {"name": "fedavg", "server-lr": 0.7}, fedavg),
    ("fedprox", {"name": "fedprox", "mu": 0.1, "server-lr": 1.0}, fedavg),
    ("fedavgm", {"name": "fedavgm", "server-lr": 1.0, "momentum": 0.9}, fedavgm),
    (
        "fedavgm-nesterov",
        {"name": "fedavgm", "server-lr": 0.5, "momentum": 0.8, "nesterov": True},
        fedavgm,
    ),
    (
        "fedadagrad",
        {"name": "fedadagrad", "server-lr": 0.1, "beta1": 0.9, "tau": 0.01},
        fedopt("adagrad"),
    ),
    (
        "fedadam",
        {"name": "fedadam", "server-lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01},
        fedopt("adam"),
    ),
    (
        "fedyogi",
        {"name": "fedyogi", "server-lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.05},
        fedopt("yogi"),
    ),
    ("scaffold", {"name": "scaffold", "server-lr": 1.0}, scaffold),
    (
        "scaffold-samples",
        {"name": "scaffold", "server-lr": 0.8, "weighting": "samples"},
        scaffold,
    ),
    ("fednova", {"name": "fednova", "server-lr": 1.0}, fednova),
    ("ties", {"name": "ties", "top-k-percent": 50, "server-lr": 1.0}, ties),
    ("cra-only", {"name": "cra-only"}, cra_only),
    (
        "cra-only-knobs",
        {
            "name": "cra-only",
            "energy": 0.8,
            "tau": 0.5,
            "confidence-power": 2.0,
            "residual-weight": 0.3,
            "server-lr": 0.9,
        },
        cra_only,
    ),
    ("cra-only-tau-inf", {"name": "cra-only", "tau": "inf", "max-rank": 2}, cra_only),
    ("fed-cmp", {"name": "fed-cmp"}, fed_cmp),
    (
        "fed-cmp-knobs",
        {
            "name": "fed-cmp",
            "energy": 0.7,
            "tau": 0.25,
            "confidence-power": 1.0,
            "residual-weight": 0.5,
            "server-lr": 0.8,
            "beta": 0.7,
            "nesterov": True,
        },
        fed_cmp,
    ),
    ("opm-only", {"name": "opm-only", "server-lr": 1.0, "beta": 0.9}, opm_only),
    (
        "cra-only-v2",
        {
            "name": "cra-only",
            "agreement": "leave-one-out",
            "gain": "shrinkage",
            "energy": 1.0,
            "residual-weight": 1.0,
            "tau": 0.5,
        },
        cra_only,
    ),
    (
        "fed-cmp-v2-basis-momentum",
        {
            "name": "fed-cmp",
            "agreement": "leave-one-out",
            "gain": "shrinkage",
            "energy": 0.8,
            "residual-weight": 0.5,
            "basis-beta": 0.6,
            "tau": 1.0,
            "beta": 0.9,
        },
        fed_cmp,
    ),
    (
        "fedavgm-ema",
        {"name": "fedavgm", "server-lr": 1.0, "momentum": 0.9, "momentum-form": "ema"},
        fedavgm,
    ),
    (
        "cra-temporal",
        {"name": "cra-only", "energy": 1.0, "tau": "inf", "gain": "temporal", "server-lr": 1.5},
        cra_only,
    ),
    (
        "fed-cmp-ema-temporal",
        {
            "name": "fed-cmp",
            "energy": 0.9,
            "tau": 0.5,
            "gain": "temporal",
            "residual-weight": 0.5,
            "beta": 0.8,
            "momentum-form": "ema",
        },
        fed_cmp,
    ),
    ("median", {"name": "median"}, median),
    ("median-momentum", {"name": "median", "server-lr": 0.8, "server-momentum": 0.5}, median),
    ("trimmed-mean", {"name": "trimmed-mean", "trim": 0.34}, trimmed_mean),
    ("trimmed-mean-none", {"name": "trimmed-mean", "trim": 0.2, "server-lr": 0.9}, trimmed_mean),
    ("krum", {"name": "krum", "byzantine": 0, "keep": 1}, krum),
    ("multi-krum", {"name": "krum", "byzantine": 0, "keep": 2}, krum),
    ("norm-bound", {"name": "norm-bound", "weighting": "uniform"}, norm_bound),
    (
        "norm-bound-fixed",
        {"name": "norm-bound", "max-norm": 0.15, "server-momentum": 0.9},
        norm_bound,
    ),
]


def common_metrics(rd, ids):
    ds, p = rd["d"], rd["p"]
    k = len(ds)
    norms = [float(np.linalg.norm(d)) for d in ds]
    cos = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            if i == j:
                cos[i, j] = 1.0 if norms[i] > 0 else 0.0
            elif norms[i] > 0 and norms[j] > 0:
                cos[i, j] = float(np.dot(ds[i], ds[j]) / (norms[i] * norms[j]))
    pairs = [cos[i, j] for i in range(k) for j in range(i + 1, k)]
    scalars = {
        "clients": k,
        "samples": float(sum(rd["n"])),
        "loss": float(np.dot(p, rd["loss"])),
        "mean_delta_norm": float(np.linalg.norm(weighted_mean(ds, p))),
        "client_delta_norm_mean": float(np.mean(norms)),
        "cosine_mean": float(np.mean(pairs)),
        "cosine_min": float(np.min(pairs)),
    }
    series = {
        "client_ids": [float(c) for c in ids],
        "client_weights": [float(v) for v in p],
        "client_delta_norms": norms,
        "cosine_matrix": [float(v) for v in cos.reshape(-1)],
    }
    return scalars, series


def run_case(cid, cfg, algo):
    st = {}
    x32 = GLOBAL0.copy()
    rounds = []
    for r, clients in enumerate(PARTICIPANTS):
        updates = []
        for k in clients:
            params = f32(x32.astype(np.float64) + DELTAS[(r, k)])
            updates.append(
                {
                    "client": k,
                    "num_samples": SAMPLES[r][k],
                    "num_steps": STEPS[r][k],
                    # Step sizes differ by client (a schedule read at
                    # different points), so the effective step is not
                    # proportional to the step count.
                    "lr_sum": 0.01 * STEPS[r][k] * (1.0 + 0.25 * k),
                    "mean_loss": LOSSES[(r, k)],
                    "params": split(params),
                    "control_delta": split(CONTROL_DELTAS[(r, k)])
                    if cfg["name"] == "scaffold"
                    else None,
                    "_params": params,
                }
            )
        ids = sorted(clients)  # the server's order: by client id
        by_id = {u["client"]: u for u in updates}
        x = x32.astype(np.float64)
        n = np.array([by_id[k]["num_samples"] for k in ids], dtype=np.float64)
        rd = {
            "d": [by_id[k]["_params"].astype(np.float64) - x for k in ids],
            "n": n,
            "p": n / n.sum(),
            "tau": [by_id[k]["num_steps"] for k in ids],
            "lr_sum": [by_id[k]["lr_sum"] for k in ids],
            "loss": [by_id[k]["mean_loss"] for k in ids],
            "dc": [CONTROL_DELTAS[(r, k)].astype(np.float64) for k in ids],
            "ids": ids,
        }
        c_before = st.get("c")
        delta, x_new, extra = algo(cfg, st, x, rd)
        x32_new = f32(x_new)
        scalars, series = common_metrics(rd, ids)
        scalars["aggregate_norm"] = float(np.linalg.norm(delta))
        scalars["server_step_norm"] = float(np.linalg.norm(x32_new.astype(np.float64) - x))
        series.update(extra.pop("_series", {}))
        scalars.update({k: float(v) for k, v in extra.items()})
        expected = {"params": split(x_new), "scalars": scalars, "series": series}
        if cfg["name"] == "fedprox":
            expected["objective"] = {"proximal_mu": cfg["mu"]}
        if cfg["name"] == "scaffold":
            expected["server_control_before"] = None if c_before is None else split(c_before)
            expected["server_control"] = split(st["c"])
        for u in updates:
            del u["_params"]
        rounds.append({"round": r, "updates": updates, "expected": expected})
        x32 = x32_new
    if cid == "fed-cmp-knobs":
        # The transport must have dropped part of the old momentum.
        assert max(st["dropped"]) > 1e-3, st["dropped"]
    if cid == "fedyogi":
        # Both branches of Yogi's sign must have been exercised.
        assert {-1.0, 1.0} <= st["yogi_branches"], st["yogi_branches"]
    return {"id": cid, "config": cfg, "rounds": rounds}


def dumps(obj, indent=0):
    """JSON with one line per list of numbers (short, diff-friendly)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(obj, list) and all(not isinstance(v, (list, dict)) for v in obj):
        return json.dumps(obj)
    if isinstance(obj, list):
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def main():
    golden = {
        "generator": "crates/fedcmp-strategy/tests/golden/reference.py",
        "num_clients": N_CLIENTS,
        "layout": [[name, shape] for name, shape in LAYOUT],
        "global0": split(GLOBAL0),
        "cases": [run_case(cid, cfg, algo) for cid, cfg, algo in CASES],
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
    with open(path, "w") as f:
        f.write(dumps(golden) + "\n")
    print(f"wrote {path}: {len(golden['cases'])} cases")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference epsilons for fedcmp-strategy's privacy accountant, from
Google's dp-accounting (an independent implementation of the RDP
accountant of the Poisson-subsampled Gaussian mechanism).

Writes dp_accounting.json next to this file: for every (q, z, rounds) of
the grid, epsilon at delta = 1e-5 and its optimal order from
dp_accounting's RdpAccountant (default orders, add-or-remove-one
neighbours), and the per-step RDP at a few orders. The Rust test checks
its accountant against these to 1%.

Run (opt-in, needs PyPI dp-accounting; the JSON is checked in):
    python3 -m venv /tmp/dpa && /tmp/dpa/bin/pip install dp-accounting==0.6.0
    /tmp/dpa/bin/python dp_reference.py
"""

import json
import math
import os

from importlib.metadata import version

from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

DELTA = 1e-5
ORDERS = [1.5, 2.0, 2.5, 8.0, 32.0]


def main():
    cases = []
    for q in (0.01, 0.1, 0.5, 1.0):
        for z in (0.5, 1.0, 2.0, 5.0):
            event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
            per_step = rdp.RdpAccountant(orders=ORDERS)
            per_step.compose(event, 1)
            for rounds in (1, 10, 100, 1000):
                acc = rdp.RdpAccountant()
                acc.compose(event, rounds)
                eps, order = acc.get_epsilon_and_optimal_order(DELTA)
                cases.append(
                    {
                        "q": q,
                        "z": z,
                        "rounds": rounds,
                        "epsilon": eps,
                        "order": order,
                        "rdp_orders": ORDERS,
                        # null: an order whose series did not converge
                        # (dp-accounting drops it; JSON has no infinity).
                        "rdp_per_step": [
                            float(r) if math.isfinite(r) else None for r in per_step._rdp
                        ],
                    }
                )
    out = {
        "generator": "crates/fedcmp-strategy/tests/golden/dp_reference.py",
        "dp_accounting": version("dp-accounting"),
        "delta": DELTA,
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dp_accounting.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(cases)} cases")


if __name__ == "__main__":
    main()

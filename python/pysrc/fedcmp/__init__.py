"""fedcmp for Python: fedcmp's strategies, a site's client node and the
server's round loop (all Rust, in ``fedcmp._native``), and the Flower App
that runs them across real sites (``fedcmp.flower``).

Parameters cross the boundary as lists of ``(name, shape, bytes)`` with
little-endian float32 bytes; :func:`to_numpy` and :func:`from_numpy` turn
them into numpy arrays and back without changing a bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fedcmp._native import (  # noqa: F401  (re-exported)
    Site,
    Strategy,
    backbone_digests,
    export_sites,
    init_logging,
    load_params,
    remove_site_run,
    resolve_settings,
    serve,
    settings_for_sites,
    simulate,
    site_runs,
    tiny_world,
)

WireArray = tuple[str, Sequence[int], bytes]

__all__ = [
    "Site",
    "Strategy",
    "backbone_digests",
    "export_sites",
    "from_numpy",
    "init_logging",
    "load_params",
    "remove_site_run",
    "resolve_settings",
    "serve",
    "settings_for_sites",
    "simulate",
    "site_runs",
    "tiny_world",
    "to_numpy",
]


def to_numpy(arrays: Iterable[WireArray]) -> dict[str, np.ndarray]:
    """Wire arrays as named float32 arrays, in order."""
    out: dict[str, np.ndarray] = {}
    for name, shape, data in arrays:
        out[name] = np.frombuffer(data, dtype="<f4").reshape(tuple(shape))
    return out


def from_numpy(arrays: dict[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> list[WireArray]:
    """Named arrays as wire arrays (float32, little-endian), in order.

    Anything but float32 is refused rather than cast, so a caller never
    loses precision or a bit silently.
    """
    items = arrays.items() if isinstance(arrays, dict) else arrays
    out: list[WireArray] = []
    for name, value in items:
        a = np.asarray(value)
        if a.dtype != np.float32:
            raise TypeError(f"array {name!r} is {a.dtype}, expected float32")
        out.append((name, list(a.shape), a.astype("<f4", copy=False).tobytes()))
    return out

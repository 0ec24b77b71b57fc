"""fedcmp wire messages <-> Flower records (bit for bit: float32 arrays,
their order carried as a list of names)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedcmp import WireArray

CONFIG = "fedcmp"
ARRAYS = "arrays"


def to_records(config: dict, arrays: list[WireArray]) -> RecordDict:
    """A RecordDict with ``config`` and the arrays (names kept in order)."""
    record = ArrayRecord(
        {name: Array(np.frombuffer(data, dtype="<f4").reshape(tuple(shape))) for name, shape, data in arrays}
    )
    return RecordDict(
        {CONFIG: ConfigRecord({**config, "names": [name for name, _, _ in arrays]}), ARRAYS: record}
    )


def from_records(content: RecordDict) -> tuple[ConfigRecord, list[WireArray]]:
    """The config and the arrays of a RecordDict from :func:`to_records`."""
    config = content.config_records[CONFIG]
    record = content.array_records.get(ARRAYS, ArrayRecord())
    names = list(config.get("names", []))
    if sorted(names) != sorted(record.keys()):
        raise ValueError(f"array names {sorted(record.keys())} do not match the listed {names}")
    out: list[WireArray] = []
    for name in names:
        a = record[name].numpy()
        if a.dtype != np.float32:
            raise ValueError(f"array {name!r} is {a.dtype}, expected float32")
        out.append((name, list(a.shape), a.astype("<f4", copy=False).tobytes()))
    return config, out

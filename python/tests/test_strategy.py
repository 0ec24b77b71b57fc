"""fedcmp's strategies through Python give the Rust results bit for bit.

The cases are the strategy crate's golden cases (every algorithm, 3
rounds, SCAFFOLD control deltas, unequal weights; inputs from
crates/fedcmp-strategy/tests/golden/golden.json). The Rust golden test
(`cargo test -p fedcmp-strategy`, run first by scripts/test.sh) writes
its own outputs, as f32 bits, to target/golden/rust-outputs.json; here
the same inputs go through numpy, the wire form and `fedcmp.Strategy`,
and every output bit must match. The replies are built by hand from the
documented wire format, so the format is checked too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import fedcmp

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "crates/fedcmp-strategy/tests/golden/golden.json"
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
RUST = TARGET / "golden" / "rust-outputs.json"


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)


def reply(round_: int, layout, update: dict) -> tuple[str, list]:
    client = update["client"]
    header = {
        "round": round_,
        "status": {"client": client, "samples_left": 0, "consumed": update["num_samples"]},
        "update": {
            "client": client,
            "num_samples": update["num_samples"],
            "num_steps": update["num_steps"],
            "lr_sum": update["lr_sum"],
            "mean_loss": update["mean_loss"],
            "control_delta": update.get("control_delta") is not None,
        },
    }
    arrays = []
    for group in ("params", "control_delta"):
        values = update.get(group)
        if values is None:
            continue
        for (name, shape), v in zip(layout, values):
            arrays.append((f"{group}/{name}", shape, f32(v).reshape(shape).astype("<f4").tobytes()))
    return json.dumps(header), arrays


def test_every_golden_case_gives_the_rust_bits():
    if not RUST.exists():
        pytest.fail(f"{RUST} is missing: run `cargo test -p fedcmp-strategy --test strategy golden` first")
    golden = json.loads(GOLDEN.read_text())
    rust = json.loads(RUST.read_text())
    layout = [(name, shape) for name, shape in golden["layout"]]
    assert set(rust) == {case["id"] for case in golden["cases"]}
    for case in golden["cases"]:
        strategy = fedcmp.Strategy(json.dumps(case["config"]), golden["num_clients"])
        global_ = fedcmp.from_numpy(
            [(name, f32(v).reshape(shape)) for (name, shape), v in zip(layout, golden["global0"])]
        )
        for r, round_ in enumerate(case["rounds"]):
            replies = [reply(round_["round"], layout, u) for u in round_["updates"]]
            out, metrics = strategy.aggregate(round_["round"], global_, replies)
            assert [name for name, _, _ in out] == [name for name, _ in layout]
            got = [list(np.frombuffer(data, dtype="<u4")) for _, _, data in out]
            want = rust[case["id"]][r]
            assert got == want, f"{case['id']} round {round_['round']}: bits differ"
            assert isinstance(json.loads(metrics), dict)
            global_ = out
        # The state survives a JSON round trip through Python.
        twin = fedcmp.Strategy(json.dumps(case["config"]), golden["num_clients"])
        twin.load_state(strategy.state())
        assert twin.state() == strategy.state()


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="not a strategy configuration"):
        fedcmp.Strategy("no-such-rule", 2)
    s = fedcmp.Strategy("fedavg", 2)
    glob = fedcmp.from_numpy({"w": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="bad reply header"):
        s.aggregate(1, glob, [("{}", [])])
    with pytest.raises(TypeError, match="expected float32"):
        fedcmp.from_numpy({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="whole number of f32"):
        s.aggregate(1, [("w", [2], b"abc")], [])

"""Sends an LLaVA-style projector (linear_1: rows x cols-in, linear_2:
rows x rows, with biases) to every node each round and times the round
trip; writes the times to `out` (JSON)."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from fedcmp.flower.codec import to_records

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    c = context.run_config
    rows, cols, rounds, nodes = int(c["rows"]), int(c["cols-in"]), int(c["rounds"]), int(c["nodes"])
    rng = np.random.default_rng(0)
    params = [
        ("linear_1.weight", rng.standard_normal((rows, cols), dtype=np.float32)),
        ("linear_1.bias", rng.standard_normal(rows, dtype=np.float32)),
        ("linear_2.weight", rng.standard_normal((rows, rows), dtype=np.float32)),
        ("linear_2.bias", rng.standard_normal(rows, dtype=np.float32)),
    ]
    arrays = [(f"global/{n}", list(a.shape), a.tobytes()) for n, a in params]
    size = sum(len(b) for _, _, b in arrays)
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(0.5)
    ids = list(grid.get_node_ids())
    times = []
    for r in range(rounds):
        started = time.perf_counter()
        msgs = [
            Message(to_records({"header": "{}"}, arrays), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in ids
        ]
        replies = list(grid.send_and_receive(msgs, timeout=600))
        assert len(replies) == len(ids) and not any(m.has_error() for m in replies)
        times.append(time.perf_counter() - started)
    Path(str(c["out"])).write_text(json.dumps({"bytes": size, "nodes": len(ids), "round_seconds": times}))

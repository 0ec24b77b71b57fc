"""Shared set-up: the generated tiny world of the Rust tests (a tiny GGUF
decoder, 48 8x8 images, a two-client scenario), run settings on it, and
its scenario dealt into site folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedcmp


# Each site trains its own client alone, so the simulation that sites
# reproduce bit for bit is the one that passes one client at a time through
# the decoder; the default (a round's clients together) differs only in
# the order of float sums.
ONE_CLIENT_PER_PASS = "clients-per-pass = 1"


def settings_text(world: dict, out: Path, strategy: str = '"fed-cmp"', rounds: int = 3, extra: str = "") -> str:
    return f"""
scenario = "{world['scenario']}"
llm = "{world['gguf']}"
vision = "patch-means"
image-size = 8
local-steps = 1
batch-size = 2
lr = 1e-2
eval-every = 1
checkpoint-every = 1
rounds = {rounds}
seed = 0
out = "{out}"
strategy = {strategy}
{extra}
"""


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world")
    gguf, scenario = fedcmp.tiny_world(str(root))
    cache = root / "cache"
    settings = fedcmp.resolve_settings(settings_text({"gguf": gguf, "scenario": scenario}, root / "unused"))
    exported = json.loads(fedcmp.export_sites(settings, str(root / "sites"), str(cache)))
    return {"root": root, "gguf": gguf, "scenario": scenario, "cache": cache, "exported": exported}

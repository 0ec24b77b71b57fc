"""The ServerApp: fedcmp's round loop (Rust) over Flower's Grid.

Run config (pyproject ``[tool.flwr.app.config]``, or ``flwr run
--run-config``):

- ``settings``: the run settings TOML on the server (absolute path; the
  keys of ``fedcmp show-config``: strategy, recipe, backbones, ``out``);
- ``cache-dir``: assets and features ("" = $FEDCMP_CACHE_DIR or
  ~/.cache/fedcmp);
- ``validation``: a held-out manifest the server validates on ("" = none);
- ``llm``: the server's copy of the LLM where the settings name another
  path ("" = the settings');
- ``min-sites``: sites to wait for before the first round;
- ``wait-for-sites``, ``round-timeout``, ``query-timeout``: seconds;
- ``fresh``: start over even where the run folder holds a checkpoint.

Started again on the same settings after a crash, it resumes from the run
folder's newest checkpoint; each site resumes from its own state.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import fedcmp
from fedcmp.flower.transport import FlowerTransport

log = logging.getLogger("fedcmp.flower")
app = ServerApp()


def _path(value) -> str | None:
    text = str(value or "").strip()
    return str(Path(text).expanduser()) if text else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    settings_file = _path(config.get("settings"))
    if settings_file is None:
        raise ValueError("run config `settings` names no settings file")
    fedcmp.init_logging(os.environ.get("RUST_LOG", "info"))
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    settings = fedcmp.resolve_settings(Path(settings_file).read_text())
    cache_dir = _path(config.get("cache-dir")) or os.environ.get(
        "FEDCMP_CACHE_DIR", str(Path.home() / ".cache" / "fedcmp")
    )
    timeout = float(config.get("round-timeout", 0) or 0)
    # What the backbones are, by content: every site checks its own files
    # against these before it trains.
    backbones = fedcmp.backbone_digests(settings, cache_dir, _path(config.get("llm")))
    log.info("backbones: %s", backbones)
    transport = FlowerTransport(
        grid,
        # Sites receive the settings without the server's paths; they load
        # their backbones from their own node config and check the digests.
        fedcmp.settings_for_sites(settings),
        min_sites=int(config.get("min-sites", 1)),
        wait_for_sites=float(config.get("wait-for-sites", 300)),
        query_timeout=float(config.get("query-timeout", 300)),
        round_timeout=timeout if timeout > 0 else None,
        backbones=backbones,
    )
    folder, summary = fedcmp.serve(
        settings,
        transport,
        cache_dir,
        validation=_path(config.get("validation")),
        llm=_path(config.get("llm")),
        fresh=bool(config.get("fresh", False)),
        # One line per round through Python's stderr, which Flower streams
        # to `flwr run --stream` and `flwr log`.
        on_line=lambda line: log.info("%s", line),
    )
    log.info("run folder %s\n%s", folder, summary)
    print(f"fedcmp: run folder {folder}", flush=True)

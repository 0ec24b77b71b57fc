"""Flower's cost, measured (bash bench/flower_round.sh runs this):

1. fedcmp on Flower vs the in-process simulation at the same settings (the
   tests' tiny world, 3 rounds of Fed-CMP, 2 sites on 127.0.0.1): wall
   time per round (the round loop's own `seconds` in metrics.jsonl) and
   peak memory (the sum of every process's RSS: SuperLink, SuperNodes and
   their children, ServerApp, site processes; vs the simulation's own);
2. moving an LLaVA-1.5-7B-size projector (linear_1 4096x1024, linear_2
   4096x4096, biases: 84 MB of f32) to 2 SuperNodes and back per round,
   through fedcmp's record codec, against the same with a tiny one: the
   difference is Flower's transfer cost per round at that size.

Prints a markdown table; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python" / "tests"))

import fedcmp  # noqa: E402
from conftest import settings_text  # noqa: E402
from flower_net import Federation  # noqa: E402


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(roots: set[int]) -> set[int]:
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


class PeakMemory:
    """Samples the summed RSS of a federation's processes every 0.2 s."""

    def __init__(self, net: Federation, sites: list[Path]):
        self.net, self.sites, self.peak, self.stop = net, sites, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop:
            roots = set(self.net.pids.values())
            for state in self.sites:
                try:
                    roots.add(int((state / "site.pid").read_text()))
                except (OSError, ValueError):
                    pass
            self.peak = max(self.peak, sum(rss_kib(p) for p in descendants(roots)))
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def round_seconds(folder: Path) -> list[float]:
    return [json.loads(l)["seconds"] for l in (folder / "metrics.jsonl").read_text().splitlines()]


def fedcmp_rounds(work: Path) -> dict:
    root = work / "world"
    root.mkdir()
    gguf, scenario = fedcmp.tiny_world(str(root))
    world = {"gguf": gguf, "scenario": scenario}
    cache = root / "cache"
    sim_text = fedcmp.resolve_settings(settings_text(world, work / "sim"))
    code = (
        "import fedcmp, resource, sys, time; t = time.perf_counter(); "
        f"f = fedcmp.simulate(sys.stdin.read(), {str(cache)!r}); "
        "print(f, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], input=sim_text, capture_output=True, text=True, check=True)
    sim_folder, _, sim_rss = out.stdout.split()
    settings = work / "settings.toml"
    settings.write_text(settings_text(world, work / "out"))
    exported = json.loads(fedcmp.export_sites(fedcmp.resolve_settings(settings.read_text()), str(work / "sites"), str(cache)))
    states = [work / f"state{c}" for c in (0, 1)]
    with Federation(work / "net") as net:
        net.start_superlink()
        for c in (0, 1):
            net.start_site(f"site{c}", c, exported["sites"][c]["manifest"], states[c], cache)
        with PeakMemory(net, states) as peak:
            run = net.run({"settings": str(settings), "cache-dir": str(cache), "min-sites": 2})
            status = net.wait(run, 300)
    assert status == "finished:completed", status
    return {
        "simulation_round_s": round_seconds(Path(sim_folder)),
        "simulation_peak_rss_mib": int(sim_rss) / 1024,
        "flower_round_s": round_seconds(work / "out" / "sites-fed-cmp-s0"),
        "flower_peak_rss_mib": peak.peak / 1024,
    }


def echo(work: Path, rows: int, cols: int, rounds: int) -> dict:
    net_dir = work / f"echo-{rows}x{cols}"
    net_dir.mkdir()
    out = net_dir / "times.json"
    with Federation(net_dir) as net:
        net.start_superlink()
        for c in (0, 1):
            net.start_site(f"node{c}", c, "unused.jsonl", net_dir / f"state{c}", net_dir)
        with PeakMemory(net, []) as peak:
            run = net.run_app(
                REPO / "bench" / "flower_echo",
                {"rows": rows, "cols-in": cols, "rounds": rounds, "nodes": 2, "out": str(out)},
            )
            status = net.wait(run, 900)
    assert status == "finished:completed", status
    result = json.loads(out.read_text())
    result["peak_rss_mib"] = peak.peak / 1024
    return result


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="echo rounds per size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {
            "load_before": os.getloadavg(),
            "fedcmp": fedcmp_rounds(work),
            "echo_llava": echo(work, 4096, 1024, args.rounds),
            "echo_tiny": echo(work, 8, 4, args.rounds),
            "load_after": os.getloadavg(),
        }
    f, big, tiny = result["fedcmp"], result["echo_llava"], result["echo_tiny"]
    print("| what | in process | on Flower (2 sites, 127.0.0.1) |")
    print("|---|---|---|")
    print(
        f"| tiny world, Fed-CMP, s per round (median of 3) | {median(f['simulation_round_s']):.3f} "
        f"| {median(f['flower_round_s']):.2f} |"
    )
    print(f"| tiny world, peak memory (MiB, all processes) | {f['simulation_peak_rss_mib']:.0f} | {f['flower_peak_rss_mib']:.0f} |")
    print(
        f"| {big['bytes'] / 1e6:.1f} MB projector to 2 sites and back, s per round (median of {args.rounds}) "
        f"| | {median(big['round_seconds']):.2f} (tiny payload: {median(tiny['round_seconds']):.2f}; "
        f"transfer cost {median(big['round_seconds']) - median(tiny['round_seconds']):.2f}) |"
    )
    print(f"| peak memory moving it (MiB, all processes) | | {big['peak_rss_mib']:.0f} (tiny: {tiny['peak_rss_mib']:.0f}) |")
    print(f"\nload average before {result['load_before']}, after {result['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

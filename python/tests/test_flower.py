"""fedcmp across real sites on Flower (127.0.0.1 only): a SuperLink and
SuperNodes running the App in python/app on the generated tiny world.

- with TLS and SuperNode authentication, the registered sites train 3
  rounds of Fed-CMP and the final projector equals the in-process
  simulation bit for bit; each site loads its backbones once and logs its
  rounds; the ServerApp's line per round reaches `flwr log`; a SuperNode
  with an unregistered key is refused;
- a SuperNode killed mid-round: the round closes with that site failed,
  the restarted site (a new node id) is found again, the run completes;
- the ServerApp killed after a checkpoint and started again resumes, and
  its final projector equals an uninterrupted run's;
- a federation under differential privacy (DP-FedAvg around FedAvgM)
  completes and reports the epsilon it spent every round and in its
  summary; a site's malformed records are skipped, shown with file and
  line in its log and counted in the server's metrics and summary;
- a site whose decoder differs from the server's (by sha256) refuses
  before it trains, with its reason in the run's log, and the federation
  goes on without it;
- a federation with one site configured to misbehave (sending -10 times
  its update) completes under the coordinate-wise median, and its final
  projector is the simulation's with that client attacking, bit for bit
  (so the site really sent the attack, and nothing else differed); a
  site's process ends with its SuperNode.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np

import fedcmp
from conftest import ONE_CLIENT_PER_PASS, settings_text
from fedcmp.certs import write_node_key
from flower_net import Federation, stop

def projector(folder: Path) -> dict[str, np.ndarray]:
    return fedcmp.to_numpy(fedcmp.load_params(str(folder / "projector.safetensors")))


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name


def simulated(
    world, tmp_path: Path, rounds: int = 3, strategy: str = '"fed-cmp"', extra: str = ""
) -> dict[str, np.ndarray]:
    text = fedcmp.resolve_settings(
        settings_text(
            world, tmp_path / "sim", strategy=strategy, rounds=rounds, extra=ONE_CLIENT_PER_PASS + "\n" + extra
        )
    )
    return projector(Path(fedcmp.simulate(text, str(world["cache"]))))


def prepare(
    world, tmp_path: Path, rounds: int = 3, extra: str = "", strategy: str = '"fed-cmp"'
) -> tuple[dict, Path]:
    """The server's settings file and run-config overrides; the run folder."""
    out = tmp_path / "out"
    settings = tmp_path / "settings.toml"
    settings.write_text(settings_text(world, out, rounds=rounds, extra=extra, strategy=strategy))
    overrides = {
        "settings": str(settings),
        "cache-dir": str(world["cache"]),
        "validation": world["exported"]["validation"],
        "min-sites": 2,
        "wait-for-sites": 60,
        "query-timeout": 120,
    }
    method = strategy.strip('"')
    return overrides, out / f"sites-{method}-s0"


def manifest(world, client: int) -> str:
    return world["exported"]["sites"][client]["manifest"]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tls_and_node_auth_train_what_the_simulation_trains(world, tmp_path):
    overrides, folder = prepare(world, tmp_path)
    with Federation(tmp_path / "net", tls=True, site_llm=world["gguf"]) as net:
        net.start_superlink()
        keys = [tmp_path / f"node{i}" for i in range(3)]
        for k in keys:
            write_node_key(k)
        net.register(keys[0].with_name("node0.pub"))
        net.register(keys[1].with_name("node1.pub"))
        for client in (0, 1):
            net.start_site(
                f"site{client}", client, manifest(world, client), tmp_path / f"state{client}", world["cache"], keys[client]
            )
        # The third key was never registered: its SuperNode is refused.
        net.start_site("intruder", 1, manifest(world, 1), tmp_path / "state-intruder", world["cache"], keys[2])
        started = time.monotonic()
        code = net.exited("intruder", timeout=90)
        print(f"intruder refused after {time.monotonic() - started:.1f} s with exit code {code}")
        assert code not in (None, 0), f"an unregistered SuperNode was not refused:\n{net.log('intruder')}"
        assert "Failed to activate SuperNode" in net.log("intruder"), net.log("intruder")

        started = time.monotonic()
        run = net.run(overrides)
        status = net.wait(run, timeout=300)
        print(f"3 rounds across sites in {time.monotonic() - started:.1f} s")
        run_log = net.run_log(run)
        assert status == "finished:completed", f"{status}\n{run_log}"
        # The operator's view: one line per round in Flower's log stream.
        for r in (1, 2, 3):
            assert f"round {r}: 2 of 2 answered" in run_log, run_log
        assert "validation NLL" in run_log, run_log

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["clients"] == 2
    assert all(r["answered"] == [0, 1] and r["aggregated"] for r in records(folder))
    assert summary["validation_nll"]["final"] < summary["validation_nll"]["init"]
    assert_bitwise_equal(projector(folder), simulated(world, tmp_path))
    # Each site loaded its backbones once for the whole run (Flower starts
    # a fresh ClientApp process per message; the site process stays).
    for client in (0, 1):
        stats = json.loads((tmp_path / f"state{client}" / "site-stats.json").read_text())
        assert stats["loads"] == 1 and stats["requests"] >= 4, stats
        site_log = (tmp_path / f"state{client}" / "site.log").read_text()
        assert site_log.count("round trained") == 3, site_log[-3000:]
    assert not (tmp_path / "state-intruder" / "site-stats.json").exists()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout:.0f} s")


def test_a_site_killed_mid_round_fails_that_round_and_the_run_completes(world, tmp_path):
    # Enough rounds for the restarted SuperNode to register (~15 s here)
    # while site 0 goes on alone (rounds of ~4 s).
    overrides, folder = prepare(world, tmp_path, rounds=6)
    states = [tmp_path / f"state{c}" for c in (0, 1)]
    with Federation(tmp_path / "net", site_llm=world["gguf"]) as net:
        net.start_superlink()
        for client in (0, 1):
            net.start_site(f"site{client}", client, manifest(world, client), states[client], world["cache"])
        run = net.run(overrides)
        # Site 1 has trained round 1 (its state after it is saved): kill its
        # SuperNode now, while its reply may still be on the way, and start
        # it again (a new SuperNode and site process; its state stays).
        def trained() -> bool:
            return any(states[1].glob("runs/*/client-0001/round-000001.safetensors"))

        wait_for(trained, 120, "site 1 never trained round 1")
        stop(net.pids["site1"])
        net.start_site("site1-again", 1, manifest(world, 1), states[1], world["cache"])
        status = net.wait(run, timeout=300)
        run_log = net.run_log(run)
        assert status == "finished:completed", f"{status}\n{run_log}"

    rounds = records(folder)
    assert len(rounds) == 6, run_log
    assert all(r["answered"][:1] == [0] and r["aggregated"] for r in rounds)
    failed = [r["round"] for r in rounds if [f["client"] for f in r["failures"]] == [1]]
    answered = [r["round"] for r in rounds if 1 in r["answered"]]
    # The round it was killed in closed with it failed (the SuperLink's
    # "node unavailable"); it came back under its new node id and trained
    # again; no round had any other failure.
    assert failed and failed[0] in (1, 2), rounds
    first = next(r for r in rounds if r["round"] == failed[0])
    assert "Node Unavailable" in first["failures"][0]["message"] or first["failures"][0]["kind"] == "timeout"
    assert answered and answered[-1] > failed[-1], rounds
    assert "site 1 is now node" in run_log
    assert all({f["client"] for f in r["failures"]} <= {1} for r in rounds)
    # Nothing trained twice: 2 pairs per round site 1 trained, where its
    # lost round-1 reply still counts (its state after round 1 was saved).
    consumed = dict(json.loads((folder / "summary.json").read_text())["consumed_per_client"])
    trained_rounds = len(answered) + (0 if 1 in answered else 1)
    assert consumed[1] == 2 * trained_rounds, (consumed, rounds)
    assert consumed[0] == 12


def test_a_federation_waits_for_its_only_site_to_come_back(world, tmp_path):
    # One site: once it is gone no task can be sent. The round loop waits
    # for it (Flower refuses a restarted SuperNode for a while) instead of
    # failing round after round until the site is retired with its data
    # unused.
    overrides, folder = prepare(world, tmp_path, rounds=4)
    overrides["min-sites"] = 1
    state = tmp_path / "state0"
    with Federation(tmp_path / "net", site_llm=world["gguf"]) as net:
        net.start_superlink()
        net.start_site("site0", 0, manifest(world, 0), state, world["cache"])
        run = net.run(overrides)
        wait_for(
            lambda: any(state.glob("runs/*/client-0000/round-000001.safetensors")), 120, "the site never trained round 1"
        )
        stop(net.pids["site0"])
        net.start_site("site0-again", 0, manifest(world, 0), state, world["cache"])
        status = net.wait(run, timeout=300)
        run_log = net.run_log(run)
        assert status == "finished:completed", f"{status}\n{run_log}"
    rounds = records(folder)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4], run_log
    # At most the round it was stopped in failed; the site trained after
    # it and was never retired.
    assert sum(1 for r in rounds if r["failures"]) <= 1, rounds
    assert rounds[-1]["answered"] == [0], rounds
    print("waited for the site:", "waiting up to" in run_log)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["retired"] == [], summary


def test_a_restarted_serverapp_resumes_and_ends_as_an_uninterrupted_run(world, tmp_path):
    overrides, folder = prepare(world, tmp_path)
    with Federation(tmp_path / "net", site_llm=world["gguf"]) as net:
        net.start_superlink()
        for client in (0, 1):
            net.start_site(f"site{client}", client, manifest(world, client), tmp_path / f"state{client}", world["cache"])
        first = net.run(overrides)
        checkpoints = folder / "checkpoints"
        wait_for(
            lambda: (checkpoints.exists() and any(checkpoints.iterdir())) or net.status(first).startswith("finished"),
            180,
            "no checkpoint",
        )
        assert not net.status(first).startswith("finished"), net.run_log(first)
        pid = net.serverapp_pid()
        assert pid is not None, "no ServerApp process found"
        os.kill(pid, signal.SIGKILL)
        resumed_after = len(records(folder))
        assert 1 <= resumed_after < 3
        second = net.run(overrides)
        status = net.wait(second, timeout=300)
        assert status == "finished:completed", f"{status}\n{net.run_log(second)}"
        assert net.status(first) != "finished:completed"
        # Another run (other settings) on the same sites and state dirs:
        # the state of the run above is kept apart, never resumed.
        (tmp_path / "again").mkdir()
        other, other_folder = prepare(world, tmp_path / "again", rounds=2)
        third = net.run(other)
        status = net.wait(third, timeout=300)
        assert status == "finished:completed", f"{status}\n{net.run_log(third)}"

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["resumed_after"] is not None and summary["resumed_after"] >= 1
    assert [r["round"] for r in records(folder)] == [1, 2, 3]
    assert_bitwise_equal(projector(folder), simulated(world, tmp_path))
    assert json.loads((other_folder / "summary.json").read_text())["resumed_after"] is None
    assert_bitwise_equal(projector(other_folder), simulated(world, tmp_path / "again", rounds=2))
    for client in (0, 1):
        assert len(list((tmp_path / f"state{client}").glob("runs/*/settings.toml"))) == 2


def test_a_private_federation_reports_its_epsilon_every_round(world, tmp_path):
    privacy = "[privacy]\nclip-norm = 0.5\nnoise-multiplier = 1.1\n"
    overrides, folder = prepare(world, tmp_path, rounds=2, extra=privacy, strategy='"fedavgm"')
    # Site 1's manifest with two bad records: they are skipped, counted
    # and shown (file and line at the site, counts at the server).
    good = Path(manifest(world, 1))
    bad = good.with_name("with-bad-lines.jsonl")
    lines = good.read_text().splitlines()
    bad.write_text("\n".join(lines + ["not json", '{"image": "images/missing.png", "caption": "a dog"}']) + "\n")
    with Federation(tmp_path / "net", site_llm=world["gguf"]) as net:
        net.start_superlink()
        for client, data in ((0, manifest(world, 0)), (1, str(bad))):
            net.start_site(f"site{client}", client, data, tmp_path / f"state{client}", world["cache"])
        run = net.run(overrides)
        status = net.wait(run, timeout=300)
        run_log = net.run_log(run)
        assert status == "finished:completed", f"{status}\n{run_log}"
        assert "site 1 skipped 2 records" in run_log, run_log

    rounds = records(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    eps = [r["metrics"]["scalars"]["dp_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1], eps
    assert all(r["metrics"]["scalars"]["dp_clip_norm"] == 0.5 for r in rounds)
    assert "[privacy]" in (folder / "settings.toml").read_text()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == eps[-1], summary
    assert summary["skipped_per_site"] == {"1": 2}, summary
    assert all(r["skipped"] == {"1": 2} for r in rounds), rounds
    site_log = (tmp_path / "state1" / "site.log").read_text()
    assert f"{bad}:{len(lines) + 1}" in site_log and f"{bad}:{len(lines) + 2}" in site_log, site_log[-3000:]


def test_a_site_with_another_decoder_refuses_before_training(world, tmp_path):
    # Site 1's copy of the decoder differs from the server's by one byte.
    other = tmp_path / "other.gguf"
    other.write_bytes(Path(world["gguf"]).read_bytes() + b"\0")
    overrides, folder = prepare(world, tmp_path, rounds=2)
    with Federation(tmp_path / "net", site_llm=world["gguf"]) as net:
        net.start_superlink()
        net.start_site("site0", 0, manifest(world, 0), tmp_path / "state0", world["cache"])
        net.start_site("site1", 1, manifest(world, 1), tmp_path / "state1", world["cache"], llm=str(other))
        run = net.run(overrides)
        status = net.wait(run, timeout=300)
        run_log = net.run_log(run)
        assert status == "finished:completed", f"{status}\n{run_log}"
    assert "site 1 refuses the task" in run_log and "its decoder" in run_log, run_log
    assert all(r["answered"] == [0] for r in records(folder)), records(folder)
    assert not any((tmp_path / "state1").glob("runs/*/client-*/round-*.safetensors"))
    # Asked again every round, the refusing site answered from its first
    # attempt instead of reloading its backbones each time.
    stats = json.loads((tmp_path / "state1" / "site-stats.json").read_text())
    assert stats["opens"] == 1 and stats["loads"] == 0 and stats["requests"] >= 2, stats
    # What site 0 received (pinned beside its state) names no path of the
    # server's: not its run folder, decoder or scenario file.
    (received,) = (tmp_path / "state0").glob("runs/*/settings.toml")
    text = received.read_text()
    for server_path in (str(tmp_path / "out"), world["gguf"], world["scenario"]):
        assert server_path not in text, (server_path, text)


def test_a_misbehaving_site_sends_its_attack_and_the_federation_completes(world, tmp_path):
    attack = '{ kind = "scaled", factor = -10.0 }'
    overrides, folder = prepare(world, tmp_path, rounds=2, strategy='"median"')
    with Federation(tmp_path / "net", site_llm=world["gguf"]) as net:
        net.start_superlink()
        for client in (0, 1):
            extra = f"misbehave='{attack}'" if client == 1 else ""
            net.start_site(
                f"site{client}", client, manifest(world, client), tmp_path / f"state{client}", world["cache"], extra=extra
            )
        run = net.run(overrides)
        status = net.wait(run, timeout=300)
        assert status == "finished:completed", f"{status}\n{net.run_log(run)}"
        # A site's process ends with its SuperNode.
        site_pid = int((tmp_path / "state0" / "site.pid").read_text())
        assert alive(site_pid)
        stop(net.pids["site0"])
        wait_for(lambda: not alive(site_pid), 30, "the site process outlived its SuperNode")
        assert "its SuperNode" in (tmp_path / "state0" / "site.log").read_text()
    rounds = records(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["answered"] == [0, 1] and r["aggregated"] for r in rounds), rounds
    assert "misbehave" in (tmp_path / "state1" / "site.log").read_text()
    across = projector(folder)
    attacked = simulated(
        world, tmp_path / "attacked", rounds=2, strategy='"median"', extra="[attack]\nkind = \"scaled\"\nclients = [1]\n"
    )
    honest = simulated(world, tmp_path / "honest", rounds=2, strategy='"median"')
    assert_bitwise_equal(across, attacked)
    assert any(not np.array_equal(across[k], honest[k]) for k in across)

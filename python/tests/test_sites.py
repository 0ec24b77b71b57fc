"""Sites and the server's round loop through the Python boundary, without
Flower: a transport that calls in-process sites. The federation across
sites must train exactly what the simulation trains, and the server must
refuse bad updates with a reason and go on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import fedcmp
from conftest import ONE_CLIENT_PER_PASS, settings_text


class Loopback:
    """A transport whose sites live in this process; `tamper` may change
    a reply (header, arrays) of a client before it reaches the server."""

    def __init__(self, sites: dict[int, fedcmp.Site], tamper=None):
        self.sites = sites
        self.tamper = tamper
        self.seen_rounds = []

    def status(self, round_):
        return [site.status(round_) for site in self.sites.values()]

    def run_round(self, tasks, timeout):
        replies, failures = [], []
        for client, header, arrays in tasks:
            round_ = json.loads(header)["round"]
            self.seen_rounds.append(round_)
            reply = self.sites[client].handle(header, arrays)
            if self.tamper is not None:
                reply = self.tamper(client, round_, reply)
            replies.append((client, *reply))
        return replies, failures, []


def open_sites(world, settings, state: Path) -> dict[int, fedcmp.Site]:
    return {
        # As a server sends them (no path of its disk), each site with its
        # own decoder.
        s["client"]: fedcmp.Site(
            fedcmp.settings_for_sites(settings),
            s["client"],
            s["manifest"],
            str(state / f"site-{s['client']}"),
            str(world["cache"]),
            llm=world["gguf"],
        )
        for s in world["exported"]["sites"]
    }


def projector(folder: str) -> dict[str, np.ndarray]:
    return fedcmp.to_numpy(fedcmp.load_params(str(Path(folder) / "projector.safetensors")))


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name


def test_sites_train_exactly_what_the_simulation_trains(world, tmp_path):
    sim = fedcmp.resolve_settings(settings_text(world, tmp_path / "sim", extra=ONE_CLIENT_PER_PASS))
    sim_folder = fedcmp.simulate(sim, str(world["cache"]))

    settings = fedcmp.resolve_settings(settings_text(world, tmp_path / "sites"))
    sites = open_sites(world, settings, tmp_path / "state")
    folder, summary = fedcmp.serve(
        settings,
        Loopback(sites),
        str(world["cache"]),
        validation=world["exported"]["validation"],
    )
    summary = json.loads(summary)
    assert summary["rounds"] == 3 and summary["failures"]["refused"] == 0
    assert_bitwise_equal(projector(folder), projector(sim_folder))
    # Same validation curve as the simulation (the exported split).
    sim_val = [json.loads(l)["val_loss"] for l in Path(sim_folder, "metrics.jsonl").read_text().splitlines()]
    val = [json.loads(l)["val_loss"] for l in Path(folder, "metrics.jsonl").read_text().splitlines()]
    assert val == sim_val
    # The default simulation (clients together) trains the same projector
    # up to float rounding.
    together = fedcmp.simulate(fedcmp.resolve_settings(settings_text(world, tmp_path / "together")), str(world["cache"]))
    for name, values in projector(together).items():
        np.testing.assert_allclose(values, projector(folder)[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_bad_updates_are_refused_with_a_reason_and_training_goes_on(world, tmp_path):
    settings = fedcmp.resolve_settings(
        settings_text(world, tmp_path / "run", strategy='"fedavg"', rounds=4, extra="failure-limit = 10")
    )
    sites = open_sites(world, settings, tmp_path / "state")

    def tamper(client, round_, reply):
        header, arrays = reply
        if client != 1:
            return reply
        h = json.loads(header)
        if round_ == 1:  # a wrong shape
            name, shape, data = arrays[0]
            arrays = [(name, [shape[0] * shape[1]] + shape[2:] if len(shape) > 1 else shape + [1], data)] + arrays[1:]
        elif round_ == 2:  # a NaN
            name, shape, data = arrays[0]
            values = np.frombuffer(data, dtype="<f4").copy()
            values[3] = np.nan
            arrays = [(name, shape, values.tobytes())] + arrays[1:]
        elif round_ == 3:  # a stale round
            h["round"] = 1
        elif round_ == 4:  # claims to be another client
            h["status"]["client"] = 0
            h["update"]["client"] = 0
        return json.dumps(h), arrays

    folder, summary = fedcmp.serve(settings, Loopback(sites, tamper), str(world["cache"]))
    summary = json.loads(summary)
    assert summary["rounds"] == 4
    records = [json.loads(l) for l in Path(folder, "metrics.jsonl").read_text().splitlines()]
    assert summary["failures"]["refused"] == 4, [r["failures"] for r in records]
    reasons = [r["failures"][0]["message"] for r in records]
    kinds = {f["kind"] for r in records for f in r["failures"]}
    assert kinds == {"refused"}
    assert "do not match the global model" in reasons[0], reasons[0]
    assert "non-finite value (NaN" in reasons[1], reasons[1]
    assert "answers round 1, not round 3" in reasons[2], reasons[2]
    assert "answered as client 0" in reasons[3], reasons[3]
    # Client 0's updates went on being aggregated every round.
    assert all(r["aggregated"] and r["answered"] == [0] for r in records)


def test_a_sites_state_belongs_to_one_run_and_can_be_listed_and_removed(world, tmp_path):
    cache = str(world["cache"])
    first = fedcmp.resolve_settings(settings_text(world, tmp_path / "first", strategy='"fedavg"', rounds=1))
    other = fedcmp.resolve_settings(settings_text(world, tmp_path / "other", strategy='"fedavg"', rounds=2))
    state = tmp_path / "state"
    fedcmp.serve(first, Loopback(open_sites(world, first, state)), cache)
    # The same run, reopened: its state after round 1 is there.
    again = open_sites(world, first, state)
    assert json.loads(again[0].status(1))["consumed"] > 0
    # Another run over the same state folders starts from nothing.
    fresh = open_sites(world, other, state)
    assert json.loads(fresh[0].status(1))["consumed"] == 0
    site0 = str(state / "site-0")
    runs = json.loads(fedcmp.site_runs(site0))
    assert [r["newest_round"] for r in runs] == [1, None] or [r["newest_round"] for r in runs] == [None, 1], runs
    assert all(r["key"].startswith("sites-fedavg-s0-") for r in runs), runs
    done = next(r["key"] for r in runs if r["newest_round"] == 1)
    fedcmp.remove_site_run(site0, done)
    assert [r["key"] for r in json.loads(fedcmp.site_runs(site0))] != [] and all(
        r["key"] != done for r in json.loads(fedcmp.site_runs(site0))
    )
    try:
        fedcmp.remove_site_run(site0, done)
    except ValueError as e:
        assert "holds no run" in str(e), e
    else:
        raise AssertionError("a removed run was removed again")

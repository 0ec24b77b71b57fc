"""A site's long-lived process: it holds the site's client node (frozen
backbones loaded once, features cached, state on the site's disk) and
answers round tasks over a local socket.

Flower starts a fresh ClientApp process for every message, which would
reload the frozen backbones every round. The ClientApp therefore forwards
each task to this process (starting it on first use) and returns its
answer: the backbones are loaded once per site and run settings, not once
per round. The socket is a Unix socket in the site's state folder,
protected by a random key kept there (mode 0600); nothing listens on the
network.

Run by hand (or let the ClientApp start it)::

    python -m fedcmp.site --client-id 0 --manifest site/data.jsonl \\
        --state-dir site/state [--cache-dir DIR] [--llm FILE] [--vision DIR] \\
        [--idle-timeout 3600] [--misbehave '{ kind = "scaled", factor = -10.0 }']

The site's backbones are its own: the decoder ``--llm`` (node config
``llm``; default the registry's SmolLM2 in its cache) and, when the
federation uses a CLIP/SigLIP encoder, its copy of that folder
``--vision`` (node config ``vision``). No path the server sends is ever
opened; the server announces its backbones' sha256 and a site whose
files differ refuses to train.

``--misbehave`` (node config ``misbehave``) makes the site replace every
update it sends, as a simulated attack does (kinds ``sign-flip``,
``scaled`` with ``factor``, ``random`` with ``std``): for trying robust
aggregation on a real deployment, never for production.

The state of each run lives in ``<state-dir>/runs/<key>/`` (the key is
the run's name and a hash of its settings): a site never resumes another
run's state. List and remove them::

    python -m fedcmp.site --state-dir site/state --list-runs
    python -m fedcmp.site --state-dir site/state --remove-run sites-fed-cmp-s0-0123456789ab

It exits after ``--idle-timeout`` seconds without a request, and (started
by the ClientApp) within seconds of its SuperNode's end: the ClientApp
passes the SuperNode's pid (``--supernode-pid``), which the site watches. Its log is
``<state-dir>/site.log`` when started by the ClientApp; ``site-stats.json``
counts the requests it answered, how often it tried to open the site
(``opens``) and how often that loaded the backbones (``loads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

SOCKET = "site.sock"
KEY = "site.key"
PID = "site.pid"
LOCK = "site.lock"
LOG = "site.log"
STATS = "site-stats.json"
# Seconds a site that could not open (other backbones, no usable data)
# answers with the same reason before it tries again: a fixed file is
# picked up by then, or at once when its SuperNode is restarted.
REOPEN_AFTER = 300.0


@dataclass(frozen=True)
class SiteOptions:
    """Where a site finds its data and keeps its state (the SuperNode's
    node config: ``client-id``, ``manifest``, ``state-dir``, optional
    ``cache-dir``, ``llm``, ``vision``, ``site-idle-timeout`` and
    ``misbehave``)."""

    client_id: int
    manifest: Path
    state_dir: Path
    cache_dir: Path
    llm: Path | None = None
    vision: Path | None = None
    idle_timeout: float = 3600.0
    misbehave: str | None = None
    # The SuperNode the site serves (found by the ClientApp at start-up):
    # the site process ends with it.
    supernode_pid: int | None = None

    @staticmethod
    def from_node_config(config: dict[str, Any]) -> "SiteOptions":
        missing = [k for k in ("client-id", "manifest", "state-dir") if k not in config]
        if missing:
            raise ValueError(
                "the SuperNode's --node-config lacks "
                + ", ".join(missing)
                + " (e.g. --node-config 'client-id=0 manifest=\"/data/site.jsonl\" "
                "state-dir=\"/var/fedcmp/site0\"')"
            )
        cache = config.get("cache-dir") or os.environ.get("FEDCMP_CACHE_DIR") or str(
            Path.home() / ".cache" / "fedcmp"
        )
        llm = config.get("llm") or None
        vision = config.get("vision") or None
        return SiteOptions(
            client_id=int(config["client-id"]),
            manifest=Path(str(config["manifest"])).expanduser().resolve(),
            state_dir=Path(str(config["state-dir"])).expanduser().resolve(),
            cache_dir=Path(str(cache)).expanduser().resolve(),
            llm=Path(str(llm)).expanduser().resolve() if llm else None,
            vision=Path(str(vision)).expanduser().resolve() if vision else None,
            idle_timeout=float(config.get("site-idle-timeout", 3600.0)),
            misbehave=str(config["misbehave"]) if config.get("misbehave") else None,
        )

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "fedcmp.site",
            "--client-id",
            str(self.client_id),
            "--manifest",
            str(self.manifest),
            "--state-dir",
            str(self.state_dir),
            "--cache-dir",
            str(self.cache_dir),
            "--idle-timeout",
            str(self.idle_timeout),
        ]
        if self.llm is not None:
            cmd += ["--llm", str(self.llm)]
        if self.vision is not None:
            cmd += ["--vision", str(self.vision)]
        if self.misbehave is not None:
            cmd += ["--misbehave", self.misbehave]
        if self.supernode_pid is not None:
            cmd += ["--supernode-pid", str(self.supernode_pid)]
        return cmd


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def find_supernode_pid() -> int | None:
    """The pid of the SuperNode this process descends from (None outside
    one, or where /proc is not available)."""
    pid = os.getppid()
    while pid > 1:
        if "flower-supernode" in _cmdline(pid):
            return pid
        pid = _parent(pid)
    return None


def _supernode_alive(pid: int) -> bool:
    # The pid reused by another program counts as gone.
    return "flower-supernode" in _cmdline(pid)


def _key(state_dir: Path, create: bool) -> bytes:
    path = state_dir / KEY
    if create and not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


class _Server:
    """The process's state: one open site per run settings."""

    def __init__(self, options: SiteOptions) -> None:
        self.options = options
        self.site = None
        self.loads = 0
        self.opens = 0
        self.requests = 0
        self.last = time.monotonic()
        self.busy = False
        self.backbones = ""
        # The last failure to open the site (its settings and backbones,
        # when, why): a site that refuses (other backbones, no data) is asked
        # again every round, and reloading its backbones each time to fail
        # the same way would cost seconds per round.
        self.refusal: tuple[str, str, float, str] | None = None

    def _site_for(self, settings: str, backbones: str = ""):
        if self.site is None or self.site.settings != settings or self.backbones != backbones:
            from fedcmp import Site

            if self.refusal is not None:
                refused_settings, refused_backbones, when, why = self.refusal
                fresh = time.monotonic() - when < REOPEN_AFTER
                if fresh and (refused_settings, refused_backbones) == (settings, backbones):
                    raise RuntimeError(why)
            self.site = None
            self.backbones = backbones
            try:
                self.site = self._open(Site, settings, backbones)
            except Exception as e:
                why = str(e)
                self.refusal = (settings, backbones, time.monotonic(), why)
                print(f"site {self.options.client_id}: cannot take part: {why}", file=sys.stderr, flush=True)
                raise RuntimeError(why) from e
            self.refusal = None
            self.loads += 1
            print(
                f"site {self.options.client_id}: backbones loaded (load {self.loads}), "
                f"{self.site.num_samples} pairs, skipped {self.site.skipped()}",
                file=sys.stderr,
                flush=True,
            )
        return self.site

    def _open(self, Site, settings: str, backbones: str):
        self.opens += 1
        return Site(
            settings,
            self.options.client_id,
            str(self.options.manifest),
            str(self.options.state_dir),
            str(self.options.cache_dir),
            str(self.options.llm) if self.options.llm else None,
            self.options.misbehave,
            backbones or None,
            str(self.options.vision) if self.options.vision else None,
        )

    def answer(self, request: tuple) -> tuple:
        kind = request[0]
        if kind == "status":
            _, settings, round_, *rest = request
            return ("ok", self._site_for(settings, *rest).status(int(round_)))
        if kind == "train":
            _, settings, header, arrays, *rest = request
            reply_header, reply_arrays = self._site_for(settings, *rest).handle(header, arrays)
            return ("ok", reply_header, reply_arrays)
        if kind == "ping":
            return ("ok", os.getpid())
        return ("error", f"unknown request {kind!r}")

    def write_stats(self) -> None:
        stats = {"pid": os.getpid(), "loads": self.loads, "opens": self.opens, "requests": self.requests}
        path = self.options.state_dir / STATS
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, path)


def run_site(options: SiteOptions) -> None:
    """Serves requests until idle for ``options.idle_timeout`` seconds."""
    state = options.state_dir
    state.mkdir(parents=True, exist_ok=True)
    sock = state / SOCKET
    if sock.exists():
        sock.unlink()
    key = _key(state, create=True)
    server = _Server(options)
    listener = Listener(str(sock), family="AF_UNIX", authkey=key)
    (state / PID).write_text(str(os.getpid()))
    server.write_stats()

    def leave(why: str) -> None:
        print(f"site {options.client_id}: {why}, exiting", file=sys.stderr, flush=True)
        try:
            sock.unlink()
            (state / PID).unlink(missing_ok=True)
        finally:
            os._exit(0)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if server.busy:
                continue
            if time.monotonic() - server.last > options.idle_timeout:
                leave("idle")
            if options.supernode_pid is not None and not _supernode_alive(options.supernode_pid):
                leave(f"its SuperNode (pid {options.supernode_pid}) has stopped")

    threading.Thread(target=watchdog, daemon=True).start()
    while True:
        try:
            conn = listener.accept()
        except Exception as e:  # a peer with a wrong key, a dropped connection
            print(f"site {options.client_id}: refused a connection: {e}", file=sys.stderr, flush=True)
            continue
        with conn:
            server.busy = True
            try:
                request = conn.recv()
                try:
                    reply = server.answer(request)
                except Exception as e:  # the site's own error: the round gets it
                    reply = ("error", f"{type(e).__name__}: {e}")
                server.requests += 1
                server.write_stats()
                conn.send(reply)
            except (EOFError, OSError) as e:
                print(f"site {options.client_id}: connection lost: {e}", file=sys.stderr, flush=True)
            finally:
                server.busy = False
                server.last = time.monotonic()


def _connect(options: SiteOptions):
    return Client(str(options.state_dir / SOCKET), family="AF_UNIX", authkey=_key(options.state_dir, False))


def ensure_site(options: SiteOptions, start_timeout: float = 300.0):
    """A connection to the site's process, starting it when none runs."""
    try:
        return _connect(options)
    except (FileNotFoundError, ConnectionRefusedError, OSError):
        pass
    options.state_dir.mkdir(parents=True, exist_ok=True)
    _key(options.state_dir, create=True)
    if options.supernode_pid is None:
        options = dataclasses.replace(options, supernode_pid=find_supernode_pid())
    with open(options.state_dir / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _connect(options)
        except (FileNotFoundError, ConnectionRefusedError, OSError):
            pass
        log = open(options.state_dir / LOG, "ab")
        process = subprocess.Popen(
            options.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (options.state_dir / LOG).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the site process exited with {process.returncode}:\n{tail}")
            try:
                return _connect(options)
            except (FileNotFoundError, ConnectionRefusedError, OSError):
                time.sleep(0.2)
        process.kill()
        raise RuntimeError(f"the site process did not start within {start_timeout:.0f} s")


def call_site(options: SiteOptions, request: tuple) -> tuple:
    """Sends one request to the site's process and returns its answer;
    an error there is raised here, with its message."""
    with ensure_site(options) as conn:
        conn.send(request)
        reply = conn.recv()
    if reply[0] != "ok":
        raise RuntimeError(f"site {options.client_id}: {reply[1]}")
    return reply[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedcmp.site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--client-id", type=int)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--list-runs", action="store_true", help="list the runs whose state is kept, and exit")
    parser.add_argument("--remove-run", metavar="KEY", help="remove one run's state, and exit")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("FEDCMP_CACHE_DIR", Path.home() / ".cache" / "fedcmp")),
    )
    parser.add_argument("--llm", type=Path, default=None, help="the site's decoder (default: SmolLM2 in its cache)")
    parser.add_argument("--vision", type=Path, default=None, help="the site's CLIP/SigLIP folder, where the run uses one")
    parser.add_argument("--idle-timeout", type=float, default=3600.0)
    parser.add_argument("--misbehave", default=None)
    parser.add_argument("--supernode-pid", type=int, default=None, help="exit when this SuperNode stops")
    parser.add_argument("--log", default=os.environ.get("RUST_LOG", "info"))
    args = parser.parse_args(argv)
    if args.list_runs or args.remove_run:
        from fedcmp import remove_site_run, site_runs

        if args.remove_run:
            try:
                remove_site_run(str(args.state_dir), args.remove_run)
            except ValueError as e:
                parser.exit(2, f"python -m fedcmp.site: {e}\n")
            print(f"removed {args.remove_run}")
        for run in json.loads(site_runs(str(args.state_dir))):
            newest = "no round yet" if run["newest_round"] is None else f"round {run['newest_round']}"
            print(f"{run['key']}\t{newest}\t{run['bytes'] / 1e6:.1f} MB")
        return
    if args.client_id is None or args.manifest is None:
        parser.error("--client-id and --manifest are needed to serve")
    from fedcmp import init_logging

    init_logging(args.log)
    run_site(
        SiteOptions(
            client_id=args.client_id,
            manifest=args.manifest.resolve(),
            state_dir=args.state_dir.resolve(),
            cache_dir=args.cache_dir.resolve(),
            llm=args.llm.resolve() if args.llm else None,
            vision=args.vision.resolve() if args.vision else None,
            idle_timeout=args.idle_timeout,
            misbehave=args.misbehave,
            supernode_pid=args.supernode_pid,
        )
    )


if __name__ == "__main__":
    main()

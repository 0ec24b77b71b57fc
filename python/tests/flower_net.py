"""A real Flower deployment on 127.0.0.1 for the tests: a SuperLink,
SuperNodes (each a fedcmp site), `flwr run` of the App in python/app, and
polling `flwr ls` until the run ends (`flwr run` returns at once and
exits 0 even when the ServerApp fails).

Every process is started in its own session and stopped by its pid (its
process group: a SuperNode's `flower-superexec` child goes with it), and
every wait is bounded. Site processes started by the ClientApp write
their pid into their state folder and are stopped the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedcmp.certs import write_tls

APP = Path(__file__).resolve().parents[1] / "app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(pid: int, grace: float = 5.0) -> None:
    """Stops a process group started here (by its leader's pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@dataclass
class Federation:
    """One SuperLink and its SuperNodes under `dir`, torn down on exit."""

    dir: Path
    tls: bool = False
    port: int = field(default_factory=free_port)
    pids: dict[str, int] = field(default_factory=dict)
    site_states: list[Path] = field(default_factory=list)
    # Every site's own decoder (node config `llm`): sites never load the
    # path the server's settings name.
    site_llm: str | None = None

    def __post_init__(self) -> None:
        self.home = self.dir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.ca = None
        if self.tls:
            self.ca, self.cert, self.key = write_tls(self.dir / "tls")
            connection = f'root-certificates = "{self.ca}"'
        else:
            connection = "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{connection}\n'
        )

    def _start(self, name: str, cmd: list[str]) -> int:
        log = open(self.dir / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids[name] = p.pid
        self._popen = getattr(self, "_popen", {})
        self._popen[name] = p
        return p.pid

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--disable-runtime-dependency-installation", "--database", str(self.dir / "state.db")]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(self.cert)]
            cmd += ["--ssl-keyfile", str(self.key), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        self._start("superlink", cmd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the SuperLink did not come up:\n{self.log('superlink')}")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def register(self, public_key: Path) -> None:
        done = self.flwr("supernode", "register", str(public_key), "test")
        if done.returncode != 0:
            raise RuntimeError(f"registering {public_key} failed:\n{done.stdout}\n{done.stderr}")

    def start_site(
        self,
        name: str,
        client: int,
        manifest: str,
        state: Path,
        cache: Path,
        key: Path | None = None,
        extra: str = "",
        llm: str | None = None,
    ) -> int:
        self.site_states.append(state)
        llm = llm or self.site_llm
        config = (
            f'client-id={client} manifest="{manifest}" state-dir="{state}" '
            f'cache-dir="{cache}" site-idle-timeout=300 {extra}'
        )
        if llm:
            config += f' llm="{llm}"'
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        cmd += ["--port", str(free_port()), "--node-config", config]
        if self.tls:
            cmd += ["--root-certificates", str(self.ca)]
            if key is not None:
                cmd += ["--auth-supernode-private-key", str(key)]
        else:
            cmd += ["--insecure"]
        return self._start(name, cmd)

    def exited(self, name: str, timeout: float) -> int | None:
        """The exit code of process `name` once it exits within `timeout` s."""
        try:
            return self._popen[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def run(self, overrides: dict[str, object]) -> str:
        """Submits fedcmp's App with run-config overrides; returns the run id."""
        return self.run_app(APP, overrides)

    def run_app(self, app: Path, overrides: dict[str, object]) -> str:
        """Submits the App in `app` with run-config overrides; returns the run id."""
        lines = [f"{k} = {json.dumps(v)}" for k, v in overrides.items()]
        path = self.dir / "run-config.toml"
        path.write_text("\n".join(lines) + "\n")
        done = self.flwr("run", str(app), "test", "--run-config", str(path), "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{done.stdout}\n{done.stderr}")
        return str(json.loads(done.stdout)["run-id"])

    def run_log(self, run_id: str) -> str:
        """The ServerApp's log of a run (what `flwr log` shows)."""
        done = self.flwr("log", run_id, "test", timeout=60)
        return done.stdout[-6000:] + done.stderr[-2000:]

    def status(self, run_id: str) -> str:
        done = self.flwr("ls", "test", "--format", "json", timeout=60)
        for run in json.loads(done.stdout).get("runs", []):
            if str(run["run-id"]) == run_id:
                return run["status"]
        return "unknown"

    def wait(self, run_id: str, timeout: float) -> str:
        """Polls until the run is finished; returns its status."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2.0)
        raise TimeoutError(f"run {run_id} still {status} after {timeout:.0f} s")

    def serverapp_pid(self) -> int | None:
        """The pid of this SuperLink's running ServerApp process, if any."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = b" ".join(cmdline).decode(errors="replace")
            if "flwr-serverapp" in text and str(self.port) in text:
                return int(entry.name)
        return None

    def close(self) -> None:
        for pid in self.pids.values():
            stop(pid)
        for state in self.site_states:
            pid_file = state / "site.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

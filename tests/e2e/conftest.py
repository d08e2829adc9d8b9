"""E2E fixtures: ``fleet up`` run as a user runs it, in a fresh state dir, on an embedded Redis.

One fleet serves the whole session (``fleet up`` trains the demo models into an empty store first, as a user
sees it). Its teardown is a test in itself: Ctrl-C (SIGINT) must stop it with exit code 0 within 90 s and leave
none of the processes it started behind. Tests talk to it through HTTP, WebSocket and Flower's API only.
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp
import psutil
import pytest

from shared.settings import FleetSettings
from tests.helpers import fleet_cmd, free_port, python_env, wait_for

#: Seconds ``fleet up`` may take to answer /readyz on a fresh store (training the demo models included).
READY_TIMEOUT_S = 240
#: Seconds Ctrl-C may take to stop the whole fleet (the brief's bound; it takes a few seconds when idle).
STOP_TIMEOUT_S = 90
#: Env names of fleet settings: stripped from the runner's environment so that the fleet under test is hermetic.
_SETTING_NAMES = frozenset(name.upper() for name in FleetSettings.model_fields)
_SECTION_PREFIXES = ("SIMPLE_", "TORCHSCRIPT_", "TRITON_", "TORCHSERVE_", "BATCH_")
#: libc, loaded here rather than between fork and exec (only async-signal-safe work belongs there).
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _stop_with_the_runner() -> None:  # pragma: no cover - runs in the child between fork and exec
    # NOTE: a runner killed outright (SIGKILL, a CI timeout) runs no teardown; the kernel then sends fleet up a
    # SIGTERM, which stops the fleet in order, instead of leaving it running on a shared machine.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessTree:
    """Every process a root started, seen while it runs: its descendants and the members of their sessions.

    ``fleet up`` starts each child in a session of its own, and a child that outlives its parent is re-parented,
    so walking ``ppid`` links alone could miss it; the session ids catch it. A background thread samples the
    tree until :meth:`close`; processes are remembered with their start time so that a recycled pid is not
    mistaken for a survivor.
    """

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root_pid = root_pid
        self.seen: dict[int, tuple[float, str]] = {}
        self.sessions: set[int] = {root_pid}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="process-tree", daemon=True)
        self._thread.start()

    def _remember(self, proc: psutil.Process) -> None:
        try:
            key = (proc.create_time(), " ".join(proc.cmdline())[:160] or proc.name())
            sid = os.getsid(proc.pid)
        except (psutil.Error, OSError):
            return
        with self._lock:
            self.seen.setdefault(proc.pid, key)
            self.sessions.add(sid)

    def sample(self) -> None:
        """Record the root's descendants now, then every process in one of their sessions."""
        try:
            root = psutil.Process(self.root_pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            family = []
        for proc in family:
            self._remember(proc)
        with self._lock:
            sessions = set(self.sessions)
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) in sessions:
                    self._remember(proc)
            except OSError:
                continue

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def survivors(self) -> list[str]:
        """Processes seen in the tree that still run (zombies are dead: only their exit status is left)."""
        left = []
        with self._lock:
            seen = dict(self.seen)
        for pid, (created, cmd) in seen.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {cmd}")
            except psutil.Error:
                continue
        return left

    def kill_survivors(self) -> None:
        """Last-resort cleanup after a failed check, so a broken shutdown does not leak into the machine."""
        with self._lock:
            seen = dict(self.seen)
        for pid, (created, _) in seen.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) < 0.01:
                    proc.kill()
            except psutil.Error:
                continue


def fleet_env(state_home: Path, store: Path) -> dict[str, str]:
    """The runner's environment without any fleet setting (REDIS_URL above all), plus a fresh state dir."""
    env = {name: value for name, value in python_env().items()
           if name not in _SETTING_NAMES and not name.startswith(_SECTION_PREFIXES)}
    env.update(XDG_STATE_HOME=str(state_home), MODEL_STORE_DIR=str(store), LOG_LEVEL="INFO",
               COLUMNS="120")  # rich renders to a file at 80 columns otherwise; the demo table is wider
    return env


def basic_auth(user: str, password: str) -> dict[str, str]:
    """An ``Authorization: Basic`` header (aiohttp deprecates its ``BasicAuth`` helper)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class FleetUp:
    """One ``fleet up`` process with its own state dir, output file and process-tree watch.

    Args:
        home: A fresh directory: ``XDG_STATE_HOME``, the working directory (no stray ``.env``), the output file.
        store: The model store (``MODEL_STORE_DIR``).
        port: The API port.
        args: More arguments after ``fleet up --port PORT``.
    """

    def __init__(self, home: Path, store: Path, port: int, *args: str) -> None:
        self.home = home
        self.api_url = f"http://127.0.0.1:{port}"
        self.logs_dir = home / "finsight-fleet" / "logs"
        self.out_path = home / "fleet-up.out"
        self._out = open(self.out_path, "wb")
        # A session of its own: a Ctrl-C in the runner's terminal must not reach it; the teardown sends its own.
        self.proc = subprocess.Popen(fleet_cmd("up", "--port", str(port), *args), env=fleet_env(home, store),
                                     cwd=home, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_stop_with_the_runner)
        self.tree = ProcessTree(self.proc.pid)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def diagnostics(self) -> str:
        """The fleet's output and the tail of each child's log, for failure messages."""
        parts = [f"--- fleet up output ---\n{self.output()[-4000:]}"]
        for log in sorted(self.logs_dir.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)

    @property
    def flower_url(self) -> str:
        """Flower's URL as the start-up panel prints it (``fleet up`` picks another port if ours was taken)."""
        found = self.printed(r"Flower\s+(http://[\w.:]+)", "Flower URL")
        return found.group(1)

    @property
    def grpc_address(self) -> str:
        """The API's gRPC ``host:port`` as the start-up panel prints it."""
        return self.printed(r"gRPC\s+([\d.]+:\d+)", "gRPC address").group(1)

    def printed(self, pattern: str, what: str) -> re.Match:
        """``pattern`` in the start-up panel, waiting for it: /readyz answers before the panel is printed."""
        try:
            return wait_for(lambda: re.search(pattern, self.output()), 30, what)
        except TimeoutError:
            raise AssertionError(f"no {what} in the output:\n{self.diagnostics()}") from None

    @property
    def api_key(self) -> str:
        """The admin key as the start-up panel prints it; it must be the one written, 0600, to the state dir."""
        found = self.printed(r"API key\s+(fsk_[\w-]+)", "API key")
        path = self.home / "finsight-fleet" / "api-key"
        assert path.read_text().strip() == found.group(1) and path.stat().st_mode & 0o777 == 0o600
        return found.group(1)

    @property
    def flower_credentials(self) -> tuple[str, str]:
        """Flower's user and password as the panel prints them (and as stored, 0600, in the state dir)."""
        found = self.printed(r"user (\w+), password ([\w-]+);", "Flower credentials")
        path = self.home / "finsight-fleet" / "flower-password"
        assert path.read_text().strip() == found.group(2) and path.stat().st_mode & 0o777 == 0o600
        return found.group(1), found.group(2)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet up exited with {self.proc.returncode}:\n{self.diagnostics()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/readyz", timeout=2) as resp:
                    return resp.status == 200
            except (OSError, urllib.error.HTTPError):
                return False

        try:
            wait_for(ready, timeout, "fleet up to answer /readyz", interval=0.25)
        except TimeoutError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def interrupt(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int | None, float]:
        """Ctrl-C: SIGINT to ``fleet up`` alone (as a terminal would, its children are in other sessions)."""
        self.tree.sample()  # the tree as it stands at the moment of the signal
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        return self.wait_exit(timeout), time.monotonic() - started

    def stop(self) -> None:
        """Best-effort stop for fixtures that fail early: SIGINT, then kill whatever is left."""
        if self.proc.poll() is None:
            self.interrupt(30)
        self.finish()

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.tree.close()
        self.tree.kill_survivors()
        self._out.close()

    def assert_nothing_left(self) -> None:
        """No process of the tree still runs (a grace of a few seconds lets SIGKILLed ones be reaped)."""
        try:
            wait_for(lambda: not self.tree.survivors(), 10, "the fleet's processes to end", interval=0.1)
        except TimeoutError:
            raise AssertionError(f"processes left running: {self.tree.survivors()}\n{self.diagnostics()}") from None


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store: ``fleet up`` trains the demo models into it, as it does for a new user."""
    return tmp_path_factory.mktemp("model-store")


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[FleetUp]:
    """``fleet up -c 2`` on free ports with an embedded Redis; stopped with Ctrl-C at the end of the session."""
    up = FleetUp(tmp_path_factory.mktemp("state-home"), model_store, free_port(),
                 "--flower-port", str(free_port()), "--grpc-port", str(free_port()), "-c", "2")
    up.wait_ready()
    yield up
    try:
        rc, took = up.interrupt()
        assert rc is not None, f"fleet up still runs {STOP_TIMEOUT_S} s after Ctrl-C:\n{up.diagnostics()}"
        assert rc == 0, f"fleet up exited with {rc} after Ctrl-C:\n{up.diagnostics()}"
        assert "Stopped." in up.output()
        up.assert_nothing_left()
        print(f"\nfleet up stopped in {took:.1f} s after SIGINT; {len(up.tree.seen)} processes tracked")
    finally:
        up.finish()


@pytest.fixture()
async def api(fleet: FleetUp) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client on the fleet's API (relative URLs) that sends the key ``fleet up`` printed."""
    async with aiohttp.ClientSession(base_url=fleet.api_url, timeout=aiohttp.ClientTimeout(total=90),
                                     headers={"X-API-Key": fleet.api_key}) as session:
        yield session

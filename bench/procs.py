"""Processes the benchmark starts: each in its own process group, pinned to the server cores, stopped for sure.

Every :class:`Proc` is registered; :func:`stop_all` (called from ``finally``, ``atexit`` and SIGTERM) stops the
ones still running. Children also get ``PR_SET_PDEATHSIG`` so that a bench killed with SIGKILL takes its
servers with it. Start processes from the main thread only: the death signal follows the creating *thread*.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import psutil

_PR_SET_PDEATHSIG = 1
_started: list["Proc"] = []
_groups: list[int] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_split(n_server: int) -> tuple[set[int] | None, set[int] | None]:
    """(server cores, client cores): disjoint when the machine has room for both, else (None, None): shared."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2 * n_server:
        return set(cores[:n_server]), set(cores[n_server:])
    return None, None


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:  # pragma: no cover - runs in the child between fork and exec
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


class Proc:
    """One server process (and whatever it forks): own process group, log file, CPU accounting."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 cpus: set[int] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_child_setup(cpus))
        self._ps = psutil.Process(self.proc.pid)
        _started.append(self)
        _groups.append(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The process and its descendants now."""
        try:
            return [self._ps, *self._ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the whole group, wait ``grace``, SIGKILL what is left of it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(grace if sig == signal.SIGTERM else 10)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the leader is gone; kill stragglers of its group (pool children)
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            break
        if not self._log.closed:
            self._log.close()
        if self in _started:
            _started.remove(self)


def tree_cpu_seconds(procs: Iterable[Proc]) -> float:
    """User + system CPU seconds of every process in the trees of ``procs`` (processes that exited are lost)."""
    total = 0.0
    for proc in procs:
        for p in proc.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def own_cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores) since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) pids still in process group ``pgid``."""
    pids = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.info["pid"]) == pgid:
                pids.append(p.info["pid"])
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def orphans(wait_s: float = 5.0) -> list[str]:
    """Processes of our groups still alive after stopping: waited for, then killed; what survives is reported."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = {pgid: group_alive(pgid) for pgid in _groups}
        alive = {pgid: pids for pgid, pids in alive.items() if pids}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pgid in alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    time.sleep(0.5 if alive else 0)
    survivors = []
    for pgid in alive:
        for pid in group_alive(pgid):
            try:
                survivors.append(f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:80]})")
            except psutil.NoSuchProcess:
                pass
    return survivors


def started_groups() -> list[int]:
    """Process group ids of every process this run started (each leads its own group)."""
    return list(_groups)


def _quiet_unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    # NOTE: once Redis is stopped, Celery AsyncResults still pending in client threads fail in __del__ while
    # unsubscribing; that is expected at shutdown and would bury the real output under tracebacks.
    if "AsyncResult" not in repr(unraisable.object):
        sys.__unraisablehook__(unraisable)


def stop_all() -> None:
    """Stop every process this run started (newest first: Redis, started first, goes last)."""
    sys.unraisablehook = _quiet_unraisable
    for proc in list(reversed(_started)):
        try:
            proc.stop(5)
        except Exception as exc:  # keep stopping the others
            print(f"bench: could not stop {proc.name}: {exc}", file=sys.stderr)


def install_cleanup() -> None:
    """Stop every started process at exit, and turn SIGTERM / SIGHUP into a normal exit (finally blocks run)."""
    atexit.register(stop_all)

    def _exit(signum: int, _frame: object) -> None:
        # NOTE: stop the servers first: the SystemExit below can be swallowed where it lands (a ``__del__``,
        # a gevent hub), and a second signal then ends the process at once.
        if getattr(_exit, "seen", False):
            os._exit(128 + signum)
        _exit.seen = True  # type: ignore[attr-defined]
        stop_all()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


def wait_until(condition: Callable[[], object], timeout: float, what: str, procs: Iterable[Proc] = (),
               interval: float = 0.1) -> object:
    """Poll ``condition`` until truthy; fail early if one of ``procs`` died, and at the deadline."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check()
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f": {last}" if last else ""))


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env

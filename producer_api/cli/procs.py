"""Child processes of ``fleet up``: started in their own process groups, tied to the parent's life."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # NOTE: if ``fleet up`` itself is killed with SIGKILL it cannot stop its children; the kernel does it.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def fleet_argv(*args: str) -> list[str]:
    """Run a ``fleet`` subcommand with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-c", "from producer_api.cli import main; main()", *args]


class Child:
    """One supervised process: its own process group (so Ctrl-C reaches only the supervisor), a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process, wait up to ``timeout``, then SIGKILL whatever is left of its group.

        NOTE: only the leader gets the polite signal: a Celery worker's pool children must be shut down by
        their parent (warm shutdown), not signalled mid-job.
        """
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # grandchildren (prefork pool) that outlived their parent
        except (ProcessLookupError, PermissionError):
            pass
        if self.alive():
            self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

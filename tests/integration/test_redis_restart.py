"""Redis SIGKILLed under HTTP load and restarted (AOF on): the API answers 503 promptly while it is down and 202
again within seconds of its return, the workers reconnect by themselves, and every job accepted more than 1 s
before the crash or after the restart ends succeeded. Both engines."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import redis as redis_lib

from shared.keys import Keys
from shared.settings import FleetSettings
from tests.helpers import fleet_cmd, free_port, redis_server_binary, wait_for
from tests.integration.conftest import WorkerProcess, fleet_env
from workers.training.synthetic import generate_bars

BODY = json.dumps({"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "n_steps": 4,
                   "inputs": {"series": generate_bars("AAPL", "1h", n_bars=300, seed=3).values[-120:].tolist()}})


class AofRedis:
    """A redis-server of the test's own with AOF (everysec), restartable on the same port and data dir."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_lib.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: client.ping(), 15, "redis-server to start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture()
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    yield server
    server.stop()


def post(url: str, key: str) -> tuple[int, str | None, float]:
    started = time.monotonic()
    req = urllib.request.Request(url, data=BODY.encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-API-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())["job_id"], time.monotonic() - started
    except urllib.error.HTTPError as err:
        return err.code, None, time.monotonic() - started
    except OSError:
        return 0, None, time.monotonic() - started


def test_redis_killed_under_load_and_restarted(engine, aof_redis, model_store, tmp_path) -> None:
    settings = FleetSettings(redis_url=f"redis://127.0.0.1:{aof_redis.port}/0", redis_key_prefix="restart",
                             model_store_dir=model_store)
    env = fleet_env(settings)
    made = subprocess.run(fleet_cmd("keys", "create", "load", "--scopes", "submit,read", "--rate-limit",
                                    "1000000/minute"), env=env, capture_output=True, text=True, timeout=60, check=True)
    key = made.stdout.strip().splitlines()[-1]
    worker = WorkerProcess(settings, tmp_path / "worker.log", engine=engine)
    port = free_port()
    api_log = open(tmp_path / "api.log", "w")
    api = subprocess.Popen(fleet_cmd("api", "--host", "127.0.0.1", "--port", str(port)), env=env, stdout=api_log,
                           stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1/predict"
    answers: list[tuple[float, int, str | None, float]] = []  # (sent at, status, job id, seconds to answer)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            status, job_id, took = post(url, key)
            answers.append((sent, status, job_id, took))

    try:
        wait_for(lambda: post(url, key)[0] == 202, 60, "the API to accept jobs")
        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(1 for a in answers if a[1] == 202) >= 40, 60, "jobs accepted before the crash")
        crashed_at = time.monotonic()
        aof_redis.kill()
        # an outage of a few seconds: the API keeps answering 503 for all of it
        wait_for(lambda: any(a[0] > crashed_at + 3 and a[1] == 503 for a in answers), 30,
                 "503s for 3 s while Redis is down")
        aof_redis.start()
        back_at = time.monotonic()
        wait_for(lambda: any(a[0] > back_at and a[1] == 202 for a in answers), 10, "202 again after the restart")
        wait_for(lambda: sum(1 for a in answers if a[0] > back_at and a[1] == 202) >= 40, 60,
                 "jobs accepted after the restart")
        stop.set()
        for thread in threads:
            thread.join(15)

        during = [a for a in answers if crashed_at + 0.5 < a[0] < back_at - 0.5]
        assert during and all(status in (503, 0) for _, status, _, _ in during), {a[1] for a in during}
        assert all(took < 1.5 for _, status, _, took in during if status == 503), max(a[3] for a in during)
        # every job accepted more than 1 s before the crash, or after the restart, ends succeeded
        due = [job_id for sent, status, job_id, took in answers
               if status == 202 and (sent + took < crashed_at - 1.0 or sent > back_at)]
        client = redis_lib.Redis(port=aof_redis.port)
        keys = Keys(settings.redis_key_prefix)

        def statuses() -> dict[str, int]:
            found: dict[str, int] = {}
            for job_id in due:
                raw = client.hget(keys.job(job_id), "status")
                found[raw.decode() if raw else "missing"] = found.get(raw.decode() if raw else "missing", 0) + 1
            return found

        wait_for(lambda: statuses() == {"succeeded": len(due)}, 90, f"every due job to succeed ({statuses()})",
                 interval=0.5)
    finally:
        stop.set()
        api.terminate()
        api.wait(15)
        api_log.close()
        worker.stop()

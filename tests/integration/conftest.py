"""Integration fixtures: the real Redis, a model store trained once per session, real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis as redis_lib

from shared.celery_app import create_celery_app
from shared.keys import Keys
from shared.settings import FleetSettings
from shared.stats import StatsReader
from tests.helpers import RedisServer, fleet_cmd, python_env, wait_for

#: The Redis database the integration tier owns (flushed before and after; the default db 0 is never touched).
#: FLEET_TEST_DB moves it, so that two sessions on one machine do not flush each other's keys.
TEST_DB = int(os.environ.get("FLEET_TEST_DB", "12"))
SYMBOLS = ["AAPL", "MSFT"]
TYPES = ["patchtst", "patchtsmixer", "enhanced_transformer", "sentiment"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real models, trained on the project's own synthetic data and headlines, once for the session."""
    from workers.store import ModelStore
    from workers.training.train import create_models

    root = tmp_path_factory.mktemp("model-store")
    create_models(ModelStore(root), SYMBOLS, ["1h"], TYPES, seed=0)
    return root


@pytest.fixture(scope="session")
def fleet_settings(redis_server: RedisServer, model_store: Path) -> Iterator[FleetSettings]:
    settings = FleetSettings(redis_url=redis_server.url(TEST_DB), redis_key_prefix=f"it-{uuid.uuid4().hex[:8]}",
                             model_store_dir=model_store)
    client = redis_lib.Redis.from_url(settings.redis_url)
    client.flushdb()
    yield settings
    client.flushdb()


@pytest.fixture(scope="session")
def api_key(fleet_settings: FleetSettings) -> str:
    """An admin key on the test database, with a rate limit no test reaches (auth is on, as by default)."""
    import asyncio

    from redis.asyncio import Redis

    from producer_api.security.keystore import KeyStore

    async def make() -> str:
        client = Redis.from_url(fleet_settings.redis_url)
        try:
            return await KeyStore(client, Keys(fleet_settings.redis_key_prefix)).create(
                "integration", ["admin"], "1000000/minute")
        finally:
            await client.aclose()

    return asyncio.run(make())


@pytest.fixture()
def redis_client(fleet_settings: FleetSettings) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(fleet_settings.redis_url)


@pytest.fixture()
def stats(fleet_settings: FleetSettings, redis_client: redis_lib.Redis) -> StatsReader:
    return StatsReader(redis_client, Keys(fleet_settings.redis_key_prefix))


@pytest.fixture(scope="session")
def producer(fleet_settings: FleetSettings):
    """A plain Celery producer on the test database: it sends jobs by public name, like any other service."""
    app = create_celery_app(fleet_settings, name="test-producer")
    yield app
    app.close()


def fleet_env(settings: FleetSettings, **extra: str) -> dict[str, str]:
    return python_env(REDIS_URL=settings.redis_url, REDIS_KEY_PREFIX=settings.redis_key_prefix,
                      MODEL_STORE_DIR=str(settings.model_store_dir), LOG_LEVEL="INFO", **extra)


def send(producer, name: str, job: dict):
    """Send a fleet job by its public task name, as any Celery producer does."""
    return producer.send_task(name, kwargs={"job": job})


def failure(result, timeout: float) -> tuple[str, str]:
    """The typed error of a job that must fail, as the result backend stores it: (type, message)."""
    result.get(timeout=timeout, propagate=False)
    assert result.state == "FAILURE", result.state
    return type(result.result).__name__, str(result.result)


class WorkerProcess:
    """A real ``fleet worker`` process consuming one pool's queue."""

    def __init__(self, settings: FleetSettings, log_path: Path, adapter: str = "simple", concurrency: int = 1,
                 pool: str = "prefork", engine: str = "batching", device: str = "cpu", **env: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.engine = engine
        args = ["worker", "--engine", engine, "--adapter", adapter, "--device", device, "-c", str(concurrency)]
        args += ["-P", pool] if engine == "celery" else []
        self.proc = subprocess.Popen(
            fleet_cmd(*args),
            env=fleet_env(settings, **env), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        reader = StatsReader(redis_lib.Redis.from_url(settings.redis_url), Keys(settings.redis_key_prefix))
        try:
            self.ids = wait_for(lambda: self._alive() and [w for w in reader.live_workers()
                                                           if self._is_mine(reader, w)], 60, "a worker process")
        except TimeoutError:
            self.stop()
            raise AssertionError(f"worker did not start:\n{log_path.read_text()[-3000:]}")

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return True

    def _is_mine(self, reader: StatsReader, worker_id: str) -> bool:
        raw = reader.redis.hget(reader.keys.worker_stats(worker_id), "pid")
        if raw is None:
            return False
        pid = int(raw)
        try:
            return os.getpgid(pid) == self.proc.pid  # children share the worker's process group
        except ProcessLookupError:
            return False

    def processes(self) -> list[int]:
        """Pids of the processes that run jobs (heart-beating now)."""
        reader = StatsReader(redis_lib.Redis.from_url(self.settings.redis_url), Keys(self.settings.redis_key_prefix))
        return sorted(int(reader.redis.hget(reader.keys.worker_stats(w), "pid")) for w in reader.live_workers()
                      if self._is_mine(reader, w))

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


class ApiProcess:
    """A real ``fleet api`` process on free loopback ports (HTTP, and gRPC at :attr:`grpc_address`), ready once
    ``ready_path`` answers 200."""

    def __init__(self, settings: FleetSettings, log_path: Path, ready_path: str = "/readyz") -> None:
        import urllib.request

        from tests.helpers import free_port

        self.log_path = log_path
        self.log = open(log_path, "w")
        self.address = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.address}"
        self.grpc_address = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(fleet_cmd("api", "--host", "127.0.0.1", "--port", self.address.split(":")[1],
                                               "--grpc-port", self.grpc_address.split(":")[1]),
                                     env=fleet_env(settings), stdout=self.log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet api exited:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}{ready_path}", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        try:
            wait_for(ready, 60, "fleet api to be ready")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.log.close()

    def unhandled_errors(self) -> list[str]:
        """Lines where the API logged a true bug (a 500); a clean run has none."""
        return [line for line in self.log_path.read_text().splitlines() if "unhandled error" in line]


#: The two worker engines: every contract test runs on both (dramatiq-style backend fixtures).
ENGINES = ["batching", "celery"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture()
def start_worker(fleet_settings: FleetSettings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**kwargs) -> WorkerProcess:
        worker = WorkerProcess(fleet_settings, tmp_path / f"worker-{len(started)}.log", **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()

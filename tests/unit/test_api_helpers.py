"""Fixtures and fakes shared by the ``test_api_*`` modules (imported by them; this module has no tests).

The API runs on fakeredis' asyncio client; a sync fakeredis client on the same server plays the worker
(``shared.jobs.JobRecorder`` and Celery's result writes); :class:`FakeBroker` reads the messages the API pushed
onto the queues' lists and records revokes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import fakeredis.aioredis
import pytest

from producer_api.app import create_app
from producer_api.security.keystore import KeyStore
from shared import routing
from shared.celery_wire import read_message
from shared.jobs import JobRecorder
from shared.keys import Keys
from shared.settings import FleetSettings

PREFIX = "t"
KEYS = Keys(PREFIX)
SERIES = [[1.0, 2.0], [1.5, 2.5], [2.0, 3.0]]
PREDICT = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": SERIES}}


class FakeBroker:
    """The API's Celery stand-in (``control.revoke`` only) and a view of the messages on the queues' lists."""

    def __init__(self, sredis: fakeredis.FakeRedis) -> None:
        self.sredis = sredis
        self.revoked: list[str] = []
        self.control = SimpleNamespace(revoke=self.revoked.append)

    @property
    def sent(self) -> list[tuple[str, dict[str, Any]]]:
        """``(task name, {task_id, queue, priority, exchange, kwargs})`` of every queued message, oldest first."""
        out = []
        for key in sorted(self.sredis.keys(f"{routing.QUEUE_PREFIX}.*")):
            for raw in reversed(self.sredis.lrange(key, 0, -1)):  # LPUSHed: the oldest is last
                envelope = json.loads(raw)
                msg = read_message(raw)
                props = envelope["properties"]
                out.append((msg.task, {"task_id": msg.task_id, "queue": props["delivery_info"]["routing_key"],
                                       "exchange": props["delivery_info"]["exchange"],
                                       "priority": props["priority"], "kwargs": msg.kwargs, "list": key.decode()}))
        return out


def make_store(root: Path) -> Path:
    """A model store with AAPL 1h patchtst (versions 1, 2) and AAPL 1h sentiment (version 1)."""
    for model_type, versions in (("patchtst", ("1", "2")), ("sentiment", ("1",))):
        for version in versions:
            d = root / "AAPL" / "1h" / model_type / version
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
            (d / "meta.json").write_text(json.dumps({"trained_on": version}))
    return root


def settings_for(store: Path, **overrides: Any) -> FleetSettings:
    return FleetSettings(_env_file=None, model_store_dir=store, redis_key_prefix=PREFIX, pools="simple:cpu",
                         **overrides)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
async def aredis(server: fakeredis.FakeServer) -> Any:
    client = fakeredis.aioredis.FakeRedis(server=server)
    yield client
    await client.aclose()


@pytest.fixture
def sredis(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    """The worker side: a sync client on the same fake server."""
    return fakeredis.FakeRedis(server=server)


class WorkerRecorder(JobRecorder):
    """The worker's record writes, as a test plays the worker: ``running`` writes what the executor's begin
    script writes (which needs Lua, which fakeredis lacks); the rest is the worker's own :class:`JobRecorder`."""

    def running(self, job_id: str, worker: str, started_at: float, total: int | None = None) -> None:
        fields: dict[str, Any] = {"status": "running", "worker": worker, "started_at": started_at, "deliveries": 1}
        if total is not None:
            fields.update(progress_done=0, progress_total=total)
        self._write(job_id, fields, "running")


@pytest.fixture
def recorder(sredis: fakeredis.FakeRedis) -> WorkerRecorder:
    return WorkerRecorder(sredis, KEYS, 3600)


@pytest.fixture
def celery(server: fakeredis.FakeServer) -> FakeBroker:
    return FakeBroker(fakeredis.FakeRedis(server=server))


@pytest.fixture
def settings(tmp_path: Path) -> FleetSettings:
    return settings_for(make_store(tmp_path / "store"))


async def make_key(aredis: Any, name: str = "tester", scopes: tuple[str, ...] = ("admin",),
                   rate_limit: str | None = "100000/minute") -> str:
    """A real API key in the (fake) Redis; its secret. Tests of other concerns get a limit they never reach."""
    return await KeyStore(aredis, KEYS, cache_seconds=0).create(name, scopes, rate_limit)


@pytest.fixture
async def admin_key(aredis: Any) -> str:
    return await make_key(aredis)


@pytest.fixture
async def client(aiohttp_client: Any, settings: FleetSettings, aredis: Any, celery: FakeBroker, admin_key: str) -> Any:
    """A test client of the API that sends an admin key with every request (auth is on, as by default)."""
    return await aiohttp_client(create_app(settings, redis=aredis, celery_app=celery),
                                headers={"X-API-Key": admin_key})


def store_result(sredis: fakeredis.FakeRedis, job_id: str, status: str = "SUCCESS", result: Any = None) -> None:
    """Store an outcome the way the executor does in one MULTI: Celery's result meta (SET and PUBLISH), and
    the record's final status with its event (the channel the API watches)."""
    meta = json.dumps({"status": status, "result": result, "traceback": None, "children": [],
                       "date_done": "2024-01-01T00:00:00", "task_id": job_id})
    pipe = sredis.pipeline()
    pipe.set(Keys.celery_result(job_id), meta)
    pipe.publish(Keys.celery_result(job_id), meta)
    if status in ("SUCCESS", "FAILURE"):
        error = result if status == "FAILURE" else None
        final = "succeeded" if error is None else (
            "cancelled" if error.get("exc_type") == "JobCancelledError" else "failed")
        JobRecorder(sredis, KEYS, 3600).finished(
            job_id, error is None, status=final, pipe=pipe,
            error={"type": error["exc_type"], "message": error["exc_message"][0]} if error else None)
    pipe.execute()


def failure(exc_type: str, message: str) -> dict[str, Any]:
    return {"exc_type": exc_type, "exc_message": [message], "exc_module": "shared.errors"}


async def enqueue(client: Any, body: dict[str, Any] | None = None, path: str = "/v1/predict") -> str:
    resp = await client.post(path, json=body or PREDICT)
    assert resp.status == 202, await resp.text()
    return (await resp.json())["job_id"]

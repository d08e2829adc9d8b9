"""The batching engine seen from outside: Celery remote control through kombu's pidbox, and Celery events.

Everything runs against a real Redis (database 13, flushed before and after): the node under test is a
:class:`RemoteControl` / :class:`WorkerHeartbeat` / :class:`TaskEvents` in this process with a fake node, and
the clients are Celery's own (``app.control``, the ``celery`` CLI with nothing but the broker URL) and the real
Flower.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_lib
from celery import Celery

from shared import tasks as names
from shared.celery_app import create_celery_app
from shared.settings import FleetSettings
from tests.helpers import ROOT, RedisServer, free_port, python_env, redis_server_binary, wait_for, wait_for_async
from workers.engines.batching.events import TaskEvents, WorkerHeartbeat
from workers.engines.batching.remote import POOL_IMPLEMENTATION, RemoteControl

DB = 13
CELERY = str(ROOT / ".venv" / "bin" / "celery")
QUEUE = "infer.simple.cpu"


@dataclass
class FakeNode:
    """A batching node as its supervisor would describe it."""

    hostname: str
    queues: list[str] = field(default_factory=lambda: [QUEUE])
    concurrency: int = 2
    jobs: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, int] = field(default_factory=lambda: {names.PREDICT: 7, names.LOAD: 1})

    def child_pids(self) -> list[int]:
        return [4101, 4102]

    def active(self) -> list[dict[str, Any]]:
        return list(self.jobs)

    def processed(self) -> dict[str, int]:
        return dict(self.done)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer()
    url = server.url(DB)
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    server.stop()


@pytest.fixture()
def app(redis_url: str) -> Iterator[Celery]:
    """The fleet's own app, as the supervisor builds it."""
    app = create_celery_app(FleetSettings(redis_url=redis_url, redis_key_prefix=f"brc-{uuid.uuid4().hex[:8]}"))
    yield app
    app.close()


@pytest.fixture()
def node() -> FakeNode:
    return FakeNode(hostname=f"batching-simple-cpu-{uuid.uuid4().hex[:6]}@test")


class Shutdowns:
    def __init__(self) -> None:
        self.requested = threading.Event()

    def __call__(self) -> None:
        self.requested.set()


@pytest.fixture()
def shutdowns() -> Shutdowns:
    return Shutdowns()


def fleet_test(**arguments: Any) -> dict[str, Any]:
    return {"echo": arguments}


def broken(**_: Any) -> Any:
    raise RuntimeError("boom")


@pytest.fixture()
def remote(app: Celery, node: FakeNode, shutdowns: Shutdowns) -> Iterator[RemoteControl]:
    """A listening node: it answers ping before the test starts."""
    control = RemoteControl(app, node, shutdowns, extra={"fleet_test": fleet_test, "fleet_broken": broken})
    control.start()
    wait_for(lambda: ping(app, node.hostname), 10, "the node to answer ping")
    yield control
    control.stop()


def ping(app: Celery, hostname: str) -> dict | None:
    return app.control.inspect(timeout=0.5, destination=[hostname]).ping()


def inspect(app: Celery, hostname: str, method: str, **kwargs: Any) -> Any:
    replies = getattr(app.control.inspect(timeout=2, destination=[hostname]), method)(**kwargs)
    assert replies and hostname in replies, f"{method}: no reply from {hostname}: {replies}"
    return replies[hostname]


def test_inspect_commands_answer_as_a_celery_worker(app: Celery, node: FakeNode, remote: RemoteControl):
    started = time.time() - 3
    node.jobs.append({"id": "job-1", "name": names.PREDICT, "time_start": started, "worker_pid": 4101})

    assert ping(app, node.hostname) == {node.hostname: {"ok": "pong"}}

    stats = inspect(app, node.hostname, "stats")
    assert {"pid", "clock", "uptime", "pool", "total", "broker", "prefetch_count", "rusage"} <= stats.keys()
    assert stats["pool"]["implementation"] == POOL_IMPLEMENTATION
    assert stats["pool"]["max-concurrency"] == 2 and stats["pool"]["processes"] == [4101, 4102]
    assert stats["total"] == {names.PREDICT: 7, names.LOAD: 1}
    assert stats["broker"]["transport"] == "redis" and "password" not in stats["broker"]
    assert isinstance(stats["rusage"]["maxrss"], int)

    (job,) = inspect(app, node.hostname, "active")
    assert job["id"] == "job-1" and job["name"] == job["type"] == names.PREDICT
    assert job["hostname"] == node.hostname and job["worker_pid"] == 4101 and job["time_start"] == started
    assert job["args"] == [] and job["kwargs"] == {} and job["acknowledged"] is False
    assert job["delivery_info"]["routing_key"] == QUEUE and job["delivery_info"]["exchange"] == "infer"
    (safe_job,) = inspect(app, node.hostname, "active", safe=True)  # as Flower asks
    assert safe_job["args"] == "[]" and safe_job["kwargs"] == "{}"

    (queue,) = inspect(app, node.hostname, "active_queues")
    assert queue["name"] == QUEUE and queue["routing_key"] == QUEUE
    assert queue["exchange"]["name"] == "infer" and queue["exchange"]["type"] == "direct"

    assert inspect(app, node.hostname, "registered") == sorted(names.ALL)
    assert inspect(app, node.hostname, "reserved") == []
    assert inspect(app, node.hostname, "scheduled") == []
    assert inspect(app, node.hostname, "revoked") == []
    conf = inspect(app, node.hostname, "conf")
    assert conf["task_acks_late"] is True and conf["accept_content"] == ["json", "msgpack"]
    assert "ok" in inspect(app, node.hostname, "report")

    replies = app.control.broadcast("fleet_test", arguments={"x": 1}, destination=[node.hostname], reply=True,
                                    timeout=2)
    assert replies == [{node.hostname: {"echo": {"x": 1}}}]


def test_failing_and_unknown_commands_answer_errors_and_the_node_goes_on(app: Celery, node: FakeNode,
                                                                        remote: RemoteControl):
    (reply,) = app.control.broadcast("fleet_broken", destination=[node.hostname], reply=True, timeout=2)
    assert reply == {node.hostname: {"error": "RuntimeError: boom"}}
    (reply,) = app.control.broadcast("no_such_command", destination=[node.hostname], reply=True, timeout=2)
    assert "error" in reply[node.hostname]
    assert ping(app, node.hostname) == {node.hostname: {"ok": "pong"}}


def plain_celery(tmp_path: Path, redis_url: str, *args: str) -> subprocess.Popen:
    """The ``celery`` CLI with nothing but the broker URL: no app, default json-only serializers."""
    return subprocess.Popen([CELERY, "--broker", redis_url, *args], cwd=tmp_path, env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_plain_celery_client_pings_and_reads_stats(tmp_path: Path, redis_url: str, node: FakeNode,
                                                     remote: RemoteControl):
    # NOTE: run side by side: the ping is a broadcast (it waits its whole timeout), stats names the node.
    ping_cmd = plain_celery(tmp_path, redis_url, "inspect", "ping", "--timeout", "5")
    stats_cmd = plain_celery(tmp_path, redis_url, "inspect", "stats", "--timeout", "5", "-d", node.hostname)
    ping_out, _ = ping_cmd.communicate(timeout=60)
    stats_out, _ = stats_cmd.communicate(timeout=60)
    assert ping_cmd.returncode == 0 and f"{node.hostname}: OK" in ping_out and "pong" in ping_out, ping_out
    assert stats_cmd.returncode == 0 and f"{node.hostname}: OK" in stats_out, stats_out
    assert POOL_IMPLEMENTATION in stats_out and '"max-concurrency": 2' in stats_out, stats_out


def test_control_shutdown_calls_on_shutdown(app: Celery, node: FakeNode, shutdowns: Shutdowns,
                                            remote: RemoteControl):
    other = f"someone-else-{uuid.uuid4().hex[:6]}@test"
    app.control.shutdown(destination=[other])  # not this node: nothing happens
    assert ping(app, node.hostname)  # the node has read (and skipped) the other node's shutdown by now
    assert not shutdowns.requested.is_set()
    app.control.shutdown(destination=[node.hostname])
    assert shutdowns.requested.wait(10), "on_shutdown was not called"


def subscribe_events(redis_url: str) -> redis_lib.client.PubSub:
    pubsub = redis_lib.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"/{DB}.celeryev/*")
    wait_for(lambda: pubsub.get_message(timeout=0.1) is None and pubsub.subscribed, 5, "the subscription")
    return pubsub


def next_event_message(pubsub: redis_lib.client.PubSub, timeout: float) -> tuple[str, Any]:
    """(routing key, decoded body) of the next kombu message on the events exchange."""
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), timeout, "an event message")
    envelope = json.loads(message["data"])
    assert envelope["content-type"] == "application/json"  # a plain client accepts nothing else
    body = json.loads(base64.b64decode(envelope["body"]))
    return message["channel"].decode().rsplit("/", 1)[1], body


def test_task_events_flush_as_one_task_multi_message(app: Celery, redis_url: str, node: FakeNode):
    pubsub = subscribe_events(redis_url)
    events = TaskEvents(app, node.hostname)
    try:
        assert events.flush() == 0  # nothing buffered: nothing published
        events.received("job-a", names.PREDICT, kwargsrepr="{'job': {}}", routing_key=QUEUE)
        events.started("job-a")
        events.succeeded("job-a", 0.25, result_repr="'ok'")
        events.received("job-b", names.PREDICT)
        events.started("job-b")
        events.failed("job-b", 0.5, exception="ValueError('bad input')")
        assert pubsub.get_message(timeout=0.3) is None  # buffered, not published per event
        assert events.flush() == 6
        routing_key, body = next_event_message(pubsub, 5)
        assert pubsub.get_message(timeout=0.3) is None  # one message for the whole batch
    finally:
        events.close()
        pubsub.close()
    assert routing_key == "task.multi"
    assert [e["type"] for e in body] == ["task-received", "task-started", "task-succeeded",
                                         "task-received", "task-started", "task-failed"]
    received, started, succeeded, _, _, failed = body
    assert all(e["hostname"] == node.hostname and e["uuid"].startswith("job-") for e in body)
    assert {"uuid", "name", "args", "kwargs", "root_id", "parent_id", "retries", "eta", "expires"} <= received.keys()
    assert received["name"] == names.PREDICT and received["kwargs"] == "{'job': {}}"
    assert isinstance(started["pid"], int)
    assert succeeded["result"] == "'ok'" and succeeded["runtime"] == 0.25
    assert failed["exception"] == "ValueError('bad input')" and failed["runtime"] == 0.5 and "traceback" in failed
    assert [e["clock"] for e in body] == sorted(e["clock"] for e in body)


def test_heartbeat_sends_online_heartbeats_and_offline(app: Celery, redis_url: str, node: FakeNode):
    node.jobs.append({"id": "job-1", "name": names.PREDICT, "time_start": time.time(), "worker_pid": 4101})
    pubsub = subscribe_events(redis_url)
    heart = WorkerHeartbeat(app, node, interval=0.2)
    try:
        heart.start()
        seen = [next_event_message(pubsub, 5) for _ in range(3)]
        heart.stop()
        while True:  # drain to the offline event
            seen.append(next_event_message(pubsub, 5))
            if seen[-1][1]["type"] == "worker-offline":
                break
    finally:
        heart.stop()
        pubsub.close()
    types = [body["type"] for _, body in seen]
    assert types[0] == "worker-online" and types[1:3] == ["worker-heartbeat"] * 2 and types[-1] == "worker-offline"
    assert {key for key, _ in seen} == {"worker.online", "worker.heartbeat", "worker.offline"}
    beat = seen[1][1]
    assert beat["hostname"] == node.hostname and beat["freq"] == 0.2
    assert beat["active"] == 1 and beat["processed"] == 8 and len(beat["loadavg"]) == 3
    assert beat["sw_ident"] == "py-celery" and beat["sw_ver"] and beat["sw_sys"]


class Flower:
    """The real Flower (``celery flower``) with nothing but the broker URL."""

    def __init__(self, redis_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        # NOTE: the unauthenticated API only here, for this Flower on 127.0.0.1.
        self.proc = subprocess.Popen(
            [CELERY, "--broker", redis_url, "flower", f"--port={self.port}", "--address=127.0.0.1"],
            cwd=log_path.parent, env=python_env(FLOWER_UNAUTHENTICATED_API="true"), stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture()
def flower(redis_url: str, tmp_path: Path) -> Iterator[Flower]:
    server = Flower(redis_url, tmp_path / "flower.log")
    yield server
    server.stop()


async def test_flower_lists_the_node_and_its_task(app: Celery, node: FakeNode, remote: RemoteControl,
                                                  flower: Flower):
    heart = WorkerHeartbeat(app, node, interval=0.5)
    heart.start()
    events = TaskEvents(app, node.hostname)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async def get(path: str) -> Any:
                assert flower.proc.poll() is None, f"Flower exited:\n{flower.output()}"
                async with session.get(f"{flower.url}{path}") as resp:
                    assert resp.status == 200, f"{path}: {resp.status} {await resp.text()}"
                    return await resp.json()

            async def inspected() -> dict | None:
                info = (await get("/api/workers?refresh=1")).get(node.hostname) or {}
                return info if info.get("stats") and info.get("active_queues") else None

            info = await wait_for_async(inspected, 45, "Flower to inspect the node", interval=0.5)
            assert info["stats"]["pool"]["max-concurrency"] == 2
            assert [q["name"] for q in info["active_queues"]] == [QUEUE]
            assert info["registered"] == sorted(names.ALL)

            # Flower's event receiver is subscribed once it has the node's heartbeats: events sent after
            # that reach it (pub/sub keeps nothing for late subscribers).
            async def alive() -> bool:
                return (await get("/api/workers?status=1")).get(node.hostname) is True

            await wait_for_async(alive, 30, "Flower to see the node's heartbeats", interval=0.25)

            job_id = str(uuid.uuid4())
            events.received(job_id, names.PREDICT, kwargsrepr="{'job': {}}", routing_key=QUEUE)
            events.started(job_id)
            events.succeeded(job_id, 0.01, result_repr="'ok'")
            assert events.flush() == 3

            async def task_seen() -> dict | None:
                task = (await get("/api/tasks")).get(job_id)
                return task if task and task.get("state") == "SUCCESS" else None

            task = await wait_for_async(task_seen, 20, "Flower to show the task as SUCCESS", interval=0.25)
            assert task["name"] == names.PREDICT and task["worker"] == node.hostname, task
    finally:
        events.close()
        heart.stop()


def threads_of(hostname: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(hostname)]


class OwnRedis:
    """A redis-server of our own on a free port, to kill and restart (the shared one must never be killed)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: redis_lib.Redis(port=self.port, socket_connect_timeout=0.5).ping(), 10, "our redis-server")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


@pytest.fixture()
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    yield server
    server.kill()


def test_the_node_comes_back_with_redis(own_redis: OwnRedis, node: FakeNode):
    app = Celery("plain", broker=own_redis.url)
    remote = RemoteControl(app, node, lambda: None)
    heart = WorkerHeartbeat(app, node, interval=0.2)
    remote.start()
    heart.start()
    try:
        wait_for(lambda: ping(app, node.hostname), 10, "the node to answer ping")
        own_redis.kill()
        own_redis.start()  # same port, empty: the node must subscribe again
        wait_for(lambda: ping(app, node.hostname), 20, "the node to answer ping after Redis came back")
        pubsub = redis_lib.Redis(port=own_redis.port).pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("/0.celeryev/worker.heartbeat")
        try:
            wait_for(lambda: pubsub.get_message(timeout=0.1), 10, "a heartbeat after Redis came back")
        finally:
            pubsub.close()
    finally:
        heart.stop()
        remote.stop()


def test_stop_returns_quickly_when_redis_is_gone(own_redis: OwnRedis, node: FakeNode,
                                                 caplog: pytest.LogCaptureFixture):
    app = Celery("plain", broker=own_redis.url)
    remote = RemoteControl(app, node, lambda: None)
    heart = WorkerHeartbeat(app, node, interval=0.2)
    events = TaskEvents(app, node.hostname)
    remote.start()
    heart.start()
    try:
        wait_for(lambda: ping(app, node.hostname), 10, "the node to answer ping")
        assert len(threads_of(node.hostname)) == 2
        events.received("job-1", names.PREDICT)
        assert events.flush() == 1

        own_redis.kill()

        def retries(logger: str, text: str) -> int:
            return sum(1 for r in caplog.records if r.name == logger and text in r.getMessage())

        # Stop once both threads are in their reconnection path: the drop, then a refused connection.
        wait_for(lambda: retries("workers.engines.batching.remote", "reconnecting") >= 2, 10,
                 "the remote control to retry connecting")
        wait_for(lambda: retries("workers.engines.batching.events", "heartbeat: could not send") >= 1, 10,
                 "the heartbeat to fail")
        events.started("job-1")
        began = time.monotonic()
        assert events.flush() == 0  # logged and dropped, not raised
        events.succeeded("job-1", 0.1)
        assert events.flush() == 0  # and again, now on a fresh connection that cannot connect
        events.close()
        heart.stop(timeout=5)
        remote.stop(timeout=5)
        took = time.monotonic() - began
    finally:
        heart.stop(timeout=1)
        remote.stop(timeout=1)
    assert took < 3, f"flush + stop took {took:.1f}s with Redis gone"
    # Stopped, not left behind as daemons still blocked on the dead connection.
    assert threads_of(node.hostname) == []

"""The batching engine's fetch script on the real Redis: one call takes a batch (highest-priority list first,
FIFO within a list, any job but a predict closing it), records every message unacknowledged in kombu's form and
as held by this process, and begins every job it takes with the shared begin function (running record, counted
delivery, running event) — except a job that already finished or was cancelled — and survives messages it
cannot read."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Iterator

import pytest
import redis as redis_lib

from shared import celery_wire, routing, tasks
from shared.keys import Keys
from tests.helpers import wait_for
from workers.engines.batching.fetch import UNACKED, UNACKED_INDEX, BatchFetcher, Fetched, Waker
from workers.executor.delivery import Begun

pytestmark = pytest.mark.integration
RUN = uuid.uuid4().hex[:8]
#: A queue of this module's own: the integration database is shared with real workers (of this session or of
#: another one), which consume the fleet's real pool queues and sweep kombu's unacked hash.
QUEUE = f"infer.fetch-test-{RUN}.cpu"
LISTS = routing.redis_list_keys(QUEUE)
WORKER = f"w-fetch-test-{RUN}|1"
JOB = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": [[1.0]]}}


class Env:
    """A fetcher on the test queue, and what each test made (removed after: the job records, the queue lists,
    the holdings hash, and its own entries of kombu's ``unacked`` hash and ``unacked_index``, which other
    processes on this database share)."""

    def __init__(self, redis_client: Any, keys: Keys) -> None:
        self.redis = redis_client
        self.keys = keys
        self.held_key = keys.worker_deliveries(WORKER)
        self.fetcher = BatchFetcher(redis_client, LISTS, keys, WORKER, 60, max_messages=8)
        self.job_ids: list[str] = []
        self.tags: set[str] = set()

    def job_id(self, name: str) -> str:
        job_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.job_ids.append(job_id)
        return job_id

    def push(self, task: str, job_id: str, broker_priority: int = 0) -> tuple[str, bytes]:
        """LPUSH a Celery task message as any producer would: returns ``(delivery tag, raw message)``."""
        key, raw = celery_wire.task_message(task, job_id, {"job": JOB}, QUEUE, broker_priority)
        assert key == routing.priority_list(QUEUE, broker_priority)
        self.redis.lpush(key, raw)
        tag = json.loads(raw)["properties"]["delivery_tag"]
        self.tags.add(tag)
        return tag, raw

    def record(self, job_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.keys.job(job_id)).items()}

    def held(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.held_key).items()}

    def index(self) -> dict[str, float]:
        """This test's entries of ``unacked_index``: tag -> fetch time."""
        tags = sorted(self.tags)
        scores = self.redis.zmscore(UNACKED_INDEX, tags) if tags else []
        return {t: s for t, s in zip(tags, scores) if s is not None}

    def unacked(self) -> dict[str, list[Any]]:
        """This test's entries of ``unacked``: tag -> [message, exchange, routing key]."""
        tags = sorted(self.tags)
        raws = self.redis.hmget(UNACKED, tags) if tags else []
        return {t: json.loads(r) for t, r in zip(tags, raws) if r is not None}

    def clean(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*LISTS, self.held_key, *(self.keys.job(j) for j in self.job_ids),
                    *(self.keys.job_cancelled(j) for j in self.job_ids))
        if self.tags:
            pipe.hdel(UNACKED, *self.tags).zrem(UNACKED_INDEX, *self.tags)
        pipe.execute()


@pytest.fixture()
def env(redis_client, fleet_settings) -> Iterator[Env]:
    env = Env(redis_client, Keys(fleet_settings.redis_key_prefix))
    yield env
    env.clean()


def ids(batch: Fetched) -> list[str]:
    return [json.loads(r)["headers"]["id"] for r in batch.raws]


def events(env: Env, pubsub: Any) -> list[dict[str, Any]]:
    """Every event published so far on the subscribed channels: read up to a marker published after them (the
    fetch published its events before it returned), so that no event also means none, without a fixed wait."""
    channel = next(iter(pubsub.channels))
    env.redis.publish(channel, json.dumps({"marker": True}))
    out = []
    while True:
        msg = pubsub.get_message(timeout=5)
        assert msg is not None, "the marker never came"
        if msg["type"] != "message":
            continue
        event = json.loads(msg["data"])
        if event.get("marker"):
            return out
        out.append(event)


def subscribe(env: Env, *job_ids: str) -> Any:
    pubsub = env.redis.pubsub()
    pubsub.subscribe(*(env.keys.job_events(j) for j in job_ids))
    for _ in job_ids:  # wait for every confirmation before anything is published
        assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    return pubsub


def test_a_batch_is_taken_recorded_and_every_job_begun_in_one_call(env: Env) -> None:
    urgent_later = env.job_id("p2")  # pushed first but to a lower-priority list: taken last
    p1, l1 = env.job_id("p1"), env.job_id("l1")
    pubsub = subscribe(env, p1, l1, urgent_later)
    tag_p2, _ = env.push(tasks.PREDICT, urgent_later, broker_priority=4)
    tag_p1, raw_p1 = env.push(tasks.PREDICT, p1)
    tag_l1, _ = env.push(tasks.LOAD, l1)
    batch = env.fetcher.fetch(block_s=0)
    # FIFO within list 0, which comes before list 3; the load (not a predict) closes the batch
    assert ids(batch) == [p1, l1] and batch.raws[0] == raw_p1
    assert batch.begun == [Begun(batch.started_at, False, 1, False), Begun(batch.started_at, False, 1, False)]
    assert env.redis.llen(routing.priority_list(QUEUE, 4)) == 1
    # every job taken is begun: the load too (the record names the worker, the start, the delivery count)
    for job_id in (p1, l1):
        record = env.record(job_id)
        assert record["status"] == "running" and record["worker"] == WORKER and record["deliveries"] == "1"
        assert float(record["started_at"]) == batch.started_at
        assert 0 < env.redis.ttl(env.keys.job(job_id)) <= 60
    seen = events(env, pubsub)
    assert [(e["job_id"], e["status"]) for e in seen] == [(p1, "running"), (l1, "running")]
    assert all(e["ts"] == batch.started_at for e in seen)
    # kombu's unacked bookkeeping ([message, exchange, routing key], indexed by the fetch time) and the holdings
    assert env.index() == {tag_p1: pytest.approx(batch.started_at), tag_l1: pytest.approx(batch.started_at)}
    stored = env.unacked()
    assert set(stored) == {tag_p1, tag_l1}
    assert stored[tag_p1] == [json.loads(raw_p1), "", QUEUE]
    # job id, task and the fetch time (which tells deliveries of one tag apart)
    now = repr(batch.started_at)
    assert env.held() == {tag_p1: f"{p1} {tasks.PREDICT} {now}", tag_l1: f"{l1} {tasks.LOAD} {now}"}

    rest = env.fetcher.fetch(block_s=0)
    assert ids(rest) == [urgent_later] and rest.begun == [Begun(rest.started_at, False, 1, False)]
    assert all(env.redis.llen(name) == 0 for name in LISTS)
    assert set(env.index()) == set(env.unacked()) == set(env.held()) == {tag_p1, tag_l1, tag_p2}
    pubsub.close()


@pytest.mark.parametrize("long_task", [tasks.LOAD, tasks.UNLOAD, tasks.BATCH_PREDICT])
def test_a_job_other_than_a_predict_closes_the_batch(env: Env, long_task: str) -> None:
    p1, long_job, p2 = env.job_id("p1"), env.job_id("long"), env.job_id("p2")
    env.push(tasks.PREDICT, p1)
    env.push(long_task, long_job)
    env.push(tasks.PREDICT, p2)
    assert ids(env.fetcher.fetch(block_s=0)) == [p1, long_job]
    assert env.redis.llen(QUEUE) == 1 and env.record(p2) == {}  # what was not taken is not begun
    first = env.job_id("first")
    env.push(long_task, first)
    assert ids(env.fetcher.fetch(block_s=0)) == [p2, first]


def test_a_long_job_first_takes_nothing_else(env: Env) -> None:
    b1, p5 = env.job_id("b1"), env.job_id("p5")
    env.push(tasks.BATCH_PREDICT, b1)
    env.push(tasks.PREDICT, p5)
    batch = env.fetcher.fetch(block_s=0)
    assert ids(batch) == [b1] and env.redis.llen(QUEUE) == 1 and env.record(b1)["status"] == "running"


def test_a_message_that_arrives_while_the_fetch_waits_is_taken_at_once(env: Env) -> None:
    job_id = env.job_id("late")
    timer = threading.Timer(0.3, lambda: env.push(tasks.PREDICT, job_id, broker_priority=6))  # any of the lists
    started = time.monotonic()
    timer.start()
    batch = env.fetcher.fetch(block_s=5)
    took = time.monotonic() - started
    assert ids(batch) == [job_id] and took < 2, took
    assert batch.begun == [Begun(batch.started_at, False, 1, False)] and set(env.held()) == set(env.unacked())
    env.fetcher.close()


def test_waiting_never_takes_a_message_out_of_redis(env: Env) -> None:
    # The wait peeks (BLMOVE of a list onto itself): while it runs, a message is on its list or recorded as
    # held, never only in this process (a BRPOP would take it out, and a process killed then would lose it).
    job_id = env.job_id("peeked")
    waker = Waker(env.redis, LISTS)
    try:
        assert not waker.wait(0.2)  # nothing queued: it waits out its timeout
        env.push(tasks.PREDICT, job_id)
        assert waker.wait(2) and env.redis.llen(LISTS[0]) + sum(env.redis.llen(k) for k in LISTS[1:]) == 1
        assert waker.wait(2)  # level-triggered: still there, still wakes
        assert ids(env.fetcher.fetch(block_s=0)) == [job_id]
    finally:
        waker.stop()


def test_the_batch_is_at_most_max_messages(env: Env, redis_client) -> None:
    small = BatchFetcher(redis_client, LISTS, env.keys, WORKER, 60, max_messages=2)
    jobs = [env.job_id(f"p{i}") for i in range(3)]
    for job_id in jobs:
        env.push(tasks.PREDICT, job_id)
    assert ids(small.fetch(block_s=0)) == jobs[:2] and ids(small.fetch(block_s=0)) == jobs[2:]


def test_each_delivery_of_a_job_is_counted(env: Env) -> None:
    job_id = env.job_id("again")
    env.push(tasks.PREDICT, job_id)
    first = env.fetcher.fetch(block_s=0)
    env.push(tasks.PREDICT, job_id)  # the same job delivered again (given back after its process died, say)
    second = env.fetcher.fetch(block_s=0)
    assert [b.deliveries for b in first.begun + second.begun] == [1, 2]
    record = env.record(job_id)
    assert record["deliveries"] == "2" and float(record["started_at"]) == second.started_at


@pytest.mark.parametrize("status", ["succeeded", "failed", "expired"])
def test_a_job_that_already_finished_comes_back_finished_with_its_record_untouched(env: Env, status: str) -> None:
    job_id = env.job_id("done")
    before = {"status": status, "worker": "w-old|9", "started_at": "1.5", "finished_at": "2.5", "deliveries": "1"}
    env.redis.hset(env.keys.job(job_id), mapping=before)
    env.redis.expire(env.keys.job(job_id), 3600)
    pubsub = subscribe(env, job_id)
    tag, _ = env.push(tasks.PREDICT, job_id)
    batch = env.fetcher.fetch(block_s=0)
    assert batch.begun == [Begun(batch.started_at, False, 0, True)]
    assert env.record(job_id) == before and env.redis.ttl(env.keys.job(job_id)) > 60  # not even its TTL
    assert events(env, pubsub) == []
    # still recorded, so that the duplicate is acknowledged like any other message
    assert tag in env.unacked() and tag in env.held() and tag in env.index()
    pubsub.close()


@pytest.mark.parametrize("how", ["flag", "record"])
def test_a_cancelled_job_comes_back_cancelled_and_is_not_marked_running(env: Env, how: str) -> None:
    job_id = env.job_id("cancelled")
    if how == "flag":  # cancelled by the API while queued: the flag (the record may still say queued)
        env.redis.hset(env.keys.job(job_id), mapping={"status": "queued"})
        env.redis.set(env.keys.job_cancelled(job_id), 1)
    else:
        env.redis.hset(env.keys.job(job_id), mapping={"status": "cancelled"})
    status_before = env.record(job_id)["status"]
    pubsub = subscribe(env, job_id)
    tag, _ = env.push(tasks.PREDICT, job_id)
    other = env.job_id("other")
    env.push(tasks.PREDICT, other)
    batch = env.fetcher.fetch(block_s=0)
    assert ids(batch) == [job_id, other]
    if how == "flag":  # begun as cancelled: its delivery counts, and the executor fails it as cancelled
        assert batch.begun == [Begun(batch.started_at, True, 1, False), Begun(batch.started_at, False, 1, False)]
    else:  # the API marked it cancelled while queued: it ended already, and is skipped without a rewrite
        assert batch.begun == [Begun(batch.started_at, False, 0, True), Begun(batch.started_at, False, 1, False)]
    record = env.record(job_id)
    assert record["status"] == status_before and "worker" not in record and "started_at" not in record
    assert record.get("deliveries") == ("1" if how == "flag" else None)
    assert events(env, pubsub) == []  # no running event
    assert env.record(other)["status"] == "running"
    assert tag in env.unacked() and tag in env.held()  # held until its cancelled outcome is acknowledged
    pubsub.close()


def test_messages_that_are_not_kombu_envelopes_are_returned_unrecorded(env: Env) -> None:
    no_id = json.dumps({"properties": {"delivery_tag": f"no-id-{RUN}"}, "headers": {"task": tasks.PREDICT}})
    env.tags.add(f"no-id-{RUN}")
    unreadable = [b"\x80 not json", json.dumps({"properties": "not a table"}).encode(), no_id.encode(),
                  b"[1, 2, 3]"]
    for raw in unreadable:
        env.redis.lpush(QUEUE, raw)
    p3 = env.job_id("p3")
    tag, _ = env.push(tasks.PREDICT, p3)
    batch = env.fetcher.fetch(block_s=0)
    assert batch.raws[:4] == unreadable and ids(Fetched(batch.raws[4:], 0, [])) == [p3]
    assert batch.begun == [None, None, None, None, Begun(batch.started_at, False, 1, False)]
    assert set(env.index()) == set(env.unacked()) == set(env.held()) == {tag}
    assert env.record(p3)["status"] == "running"


def test_unreadable_messages_survive_behind_and_between_good_ones(env: Env) -> None:
    p1, p2 = env.job_id("p1"), env.job_id("p2")
    tag1, _ = env.push(tasks.PREDICT, p1)
    env.redis.lpush(QUEUE, b"garbage")
    tag2, _ = env.push(tasks.PREDICT, p2)
    batch = env.fetcher.fetch(block_s=0)
    assert batch.raws[1] == b"garbage" and [b is None for b in batch.begun] == [False, True, False]
    assert set(env.held()) == {tag1, tag2} and env.record(p2)["status"] == "running"


def test_an_empty_queue_blocks_then_takes_what_arrives(env: Env, fleet_settings) -> None:
    empty = env.fetcher.fetch(block_s=0.05)
    assert empty.raws == [] and empty.begun == []
    name = f"fetch-test-{uuid.uuid4().hex[:8]}"
    client = redis_lib.Redis.from_url(fleet_settings.redis_url, client_name=name)
    blocking = BatchFetcher(client, LISTS, env.keys, WORKER, 60, max_messages=8)
    got: list[Fetched] = []
    fetching = threading.Thread(target=lambda: got.append(blocking.fetch(block_s=5)))
    started = time.monotonic()
    fetching.start()
    try:
        wait_for(lambda: any(c.get("name") == name and c.get("cmd") == "blmove" for c in env.redis.client_list()),
                 5, "the fetch to wait (a blocking peek)")
        p4 = env.job_id("p4")
        tag, _ = env.push(tasks.PREDICT, p4)
    finally:
        fetching.join(6)
        blocking.close()
        client.close()
    assert not fetching.is_alive() and time.monotonic() - started < 5  # woken by the message, not the timeout
    (batch,) = got
    assert ids(batch) == [p4] and batch.begun == [Begun(batch.started_at, False, 1, False)]
    assert set(env.unacked()) == set(env.held()) == {tag} and env.record(p4)["status"] == "running"

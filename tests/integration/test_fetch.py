"""The direct engine's fetch script on the real Redis: one call takes a batch, records it unacknowledged in
kombu's form, marks predict jobs running, reads their cancel flags, and survives messages it cannot read."""

from __future__ import annotations

import json

import pytest

from shared import celery_wire, tasks
from shared.keys import Keys
from workers.engines.batching.fetch import UNACKED, UNACKED_INDEX, BatchFetcher

pytestmark = pytest.mark.integration
QUEUE = "infer.simple.cpu"


@pytest.fixture()
def fetcher(redis_client, fleet_settings):
    keys = Keys(fleet_settings.redis_key_prefix)
    yield BatchFetcher(redis_client, [QUEUE, f"{QUEUE}:3"], keys, "w-test|1", 60, max_messages=8), keys
    redis_client.delete(QUEUE, f"{QUEUE}:3", UNACKED, UNACKED_INDEX)


def push(redis_client, task: str, job_id: str, priority: int = 0) -> str:
    key, raw = celery_wire.task_message(task, job_id, {"job": {"symbol": "AAPL"}}, QUEUE, priority)
    redis_client.lpush(key, raw)
    return json.loads(raw)["properties"]["delivery_tag"]


def test_a_batch_is_taken_recorded_and_marked_running_in_one_call(fetcher, redis_client) -> None:
    fetch, keys = fetcher
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.job_events("p1"))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    tags = [push(redis_client, tasks.PREDICT, "p1"), push(redis_client, tasks.LOAD, "l1"),
            push(redis_client, tasks.PREDICT, "p2", priority=4)]
    redis_client.set(keys.job_cancelled("p2"), 1)
    batch = fetch.fetch(block_s=0)
    ids = [json.loads(r)["headers"]["id"] for r in batch.raws]
    # FIFO within a priority list, list 0 before list 3; a job other than a predict closes the batch
    assert ids == ["p1", "l1"] and batch.cancelled == [False, None]
    assert redis_client.llen(f"{QUEUE}:3") == 1
    rest = fetch.fetch(block_s=0)
    assert [json.loads(r)["headers"]["id"] for r in rest.raws] == ["p2"] and rest.cancelled == [True]
    assert redis_client.llen(QUEUE) == 0 and redis_client.llen(f"{QUEUE}:3") == 0
    # kombu's unacked bookkeeping: [message, exchange, routing key], indexed by the fetch time
    assert sorted(t.decode() for t in redis_client.zrange(UNACKED_INDEX, 0, -1)) == sorted(tags)
    stored = json.loads(redis_client.hget(UNACKED, tags[0]))
    assert stored[1:] == ["", QUEUE] and stored[0]["headers"]["id"] == "p1"
    record = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.job("p1")).items()}
    assert record["status"] == "running" and record["worker"] == "w-test|1"
    assert float(record["started_at"]) == pytest.approx(batch.started_at, abs=1e-3)
    assert 0 < redis_client.ttl(keys.job("p1")) <= 60
    assert redis_client.exists(keys.job("l1")) == 0  # a load is marked running when it runs, not when taken
    event = json.loads(pubsub.get_message(timeout=1)["data"])
    assert event["job_id"] == "p1" and event["status"] == "running"
    pubsub.close()


def test_a_long_job_popped_by_the_blocking_pop_takes_nothing_else(fetcher, redis_client) -> None:
    fetch, _ = fetcher
    assert fetch.fetch(block_s=0.05).raws == []
    push(redis_client, tasks.BATCH_PREDICT, "b1")
    push(redis_client, tasks.PREDICT, "p5")
    popped = redis_client.brpop([QUEUE], timeout=1)[1]
    batch = fetch._run([popped])
    assert [json.loads(r)["headers"]["id"] for r in batch.raws] == ["b1"] and redis_client.llen(QUEUE) == 1


def test_an_unreadable_message_does_not_stop_the_batch(fetcher, redis_client) -> None:
    fetch, keys = fetcher
    redis_client.lpush(QUEUE, b"\x80 not json")
    redis_client.lpush(QUEUE, json.dumps({"properties": "not a table"}))
    tag = push(redis_client, tasks.PREDICT, "p3")
    batch = fetch.fetch(block_s=0)
    assert len(batch.raws) == 3 and batch.cancelled == [None, None, False]
    assert [t.decode() for t in redis_client.zrange(UNACKED_INDEX, 0, -1)] == [tag]
    assert redis_client.hget(keys.job("p3"), "status") == b"running"


def test_an_empty_queue_blocks_then_takes_what_arrives(fetcher, redis_client) -> None:
    fetch, _ = fetcher
    assert fetch.fetch(block_s=0.2).raws == []
    push(redis_client, tasks.PREDICT, "p4")
    batch = fetch.fetch(block_s=1)
    assert [json.loads(r)["headers"]["id"] for r in batch.raws] == ["p4"] and batch.cancelled == [False]

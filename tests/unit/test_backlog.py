"""Each pool's backlog (shared.backlog): queued in every priority list, routed to own queues, in hand."""

from __future__ import annotations

import json

import fakeredis
import fakeredis.aioredis
import pytest

from shared import routing
from shared.backlog import KOMBU_UNACKED, PoolBacklog, pool_backlogs, tally_unacked, unacked_by_routing_key
from shared.celery_wire import task_message
from shared.keys import Keys
# The fake server and its asyncio (the API's) and sync (the workers') clients, as the API tests have them.
from tests.unit.test_api_helpers import aredis, server, sredis  # noqa: F401
from workers.engines.batching.fetch import BatchFetcher

KEYS = Keys("t")
SIMPLE, TRITON = routing.queue_name("simple", "cpu"), routing.queue_name("triton", "cpu")


def push(redis: fakeredis.FakeRedis, queue: str, broker_priority: int, job_id: str, target: str | None = None) -> None:
    """One real task message for ``queue`` at ``broker_priority``, on the pool's list or on ``target``'s lists."""
    key, raw = task_message("fleet.predict", job_id, {"job": {}}, queue, broker_priority)
    if target is not None:  # an own queue: the same priority step, under the process's base name
        key = routing.priority_list(KEYS.worker_queue(target), broker_priority)
    redis.lpush(key, raw)


def hold(redis: fakeredis.FakeRedis, tag: str, queue: str) -> None:
    """An unacknowledged delivery as kombu's Celery consumer stores it (``dumps([raw, exchange, routing key])``)."""
    _, raw = task_message("fleet.predict", f"job-{tag}", {"job": {"text": 'a "quoted"] body'}}, queue, 0)
    redis.hset(KOMBU_UNACKED, tag, json.dumps([json.loads(raw), "infer", queue]))


async def test_each_kind_is_counted_for_its_pool(aredis, sredis) -> None:
    # queued: one message per priority step (kombu keeps a list for each), and two at the top step
    for n, priority in enumerate((0, 3, 6, 9, 9)):
        push(sredis, SIMPLE, priority, f"q{n}")
    push(sredis, TRITON, 0, "tq")
    # routed: two members of the simple pool, one with messages on two priority steps; a triton member
    sredis.zadd(KEYS.routing_members(SIMPLE), {"w1": 0.0, "w2": 0.5})
    sredis.zadd(KEYS.routing_members(TRITON), {"w3": 0.0})
    push(sredis, SIMPLE, 0, "r1", target="w1")
    push(sredis, SIMPLE, 6, "r2", target="w1")
    push(sredis, SIMPLE, 9, "r3", target="w2")
    push(sredis, TRITON, 3, "r4", target="w3")
    push(sredis, TRITON, 3, "r5", target="w3")
    # in hand: Celery's reserved / running deliveries, by routing key
    for tag in ("a", "b", "c"):
        hold(sredis, tag, SIMPLE)
    hold(sredis, "d", TRITON)
    backlogs = await pool_backlogs(aredis, KEYS)
    assert set(backlogs) == {q.name for q in routing.all_queues()}
    assert backlogs[SIMPLE] == PoolBacklog(queued=5, routed=3, in_hand=3) and backlogs[SIMPLE].total == 11
    assert backlogs[TRITON] == PoolBacklog(queued=1, routed=2, in_hand=1)
    assert backlogs[routing.queue_name("simple", "cuda")] == PoolBacklog()
    assert backlogs[SIMPLE].kinds() == {"queued": 5, "routed": 3, "in_hand": 3}


async def test_a_fetch_moves_jobs_from_queued_to_in_hand_and_an_ack_ends_them(aredis, sredis) -> None:
    for n in range(5):
        push(sredis, SIMPLE, (0, 3, 9)[n % 3], f"j{n}")
    assert (await pool_backlogs(aredis, KEYS, [SIMPLE]))[SIMPLE] == PoolBacklog(queued=5)
    # the batching engine's own fetch script (it writes unacked entries itself, in kombu's form)
    fetcher = BatchFetcher(sredis, routing.redis_list_keys(SIMPLE), KEYS, "w1", 60, max_messages=3)
    batch = fetcher.fetch(block_s=0)
    assert len(batch.raws) == 3
    assert (await pool_backlogs(aredis, KEYS, [SIMPLE]))[SIMPLE] == PoolBacklog(queued=2, in_hand=3)
    sredis.hdel(KOMBU_UNACKED, json.loads(batch.raws[0])["properties"]["delivery_tag"])  # acknowledged
    assert (await pool_backlogs(aredis, KEYS, [SIMPLE]))[SIMPLE] == PoolBacklog(queued=2, in_hand=2)


async def test_a_large_unacked_hash_is_read_in_chunks_and_sampled_past_the_bound(aredis, sredis) -> None:
    assert await unacked_by_routing_key(aredis) == {}  # empty: nothing but HLEN
    for n in range(600):
        hold(sredis, f"t{n}", SIMPLE if n % 3 else TRITON)
    assert await unacked_by_routing_key(aredis, chunk=50) == {SIMPLE: 400, TRITON: 200}
    estimate = await unacked_by_routing_key(aredis, max_scan=200, chunk=50)
    assert sum(estimate.values()) == pytest.approx(600, abs=2)
    assert estimate[SIMPLE] == pytest.approx(400, abs=60) and estimate[TRITON] == pytest.approx(200, abs=60)


def test_tally_scales_only_an_unfinished_scan() -> None:
    done = [[b"17", 2, b"infer.simple.cpu", 2], [b"0", 2, b"infer.simple.cpu", 1, b"", 1]]
    assert tally_unacked(done, 4) == ({"infer.simple.cpu": 3, "": 1}, False)
    partial = [[b"17", 100, b"infer.simple.cpu", 75, b"infer.triton.cpu", 25]]
    assert tally_unacked(partial, 1000) == ({"infer.simple.cpu": 750, "infer.triton.cpu": 250}, True)
    assert tally_unacked([], 10) == ({}, False)


async def test_a_fetch_from_an_own_queue_moves_jobs_from_routed_to_in_hand(aredis, sredis) -> None:
    sredis.zadd(KEYS.routing_members(SIMPLE), {"w1": 0.0})
    for n in range(3):
        push(sredis, SIMPLE, 0, f"r{n}", target="w1")
    push(sredis, SIMPLE, 0, "q0")
    assert (await pool_backlogs(aredis, KEYS, [SIMPLE]))[SIMPLE] == PoolBacklog(queued=1, routed=3)
    fetcher = BatchFetcher(sredis, routing.redis_list_keys(SIMPLE), KEYS, "w1", 60, max_messages=2,
                           own_lists=routing.redis_list_keys(KEYS.worker_queue("w1")))
    assert len(fetcher.fetch(block_s=0).raws) == 2
    backlog = (await pool_backlogs(aredis, KEYS, [SIMPLE]))[SIMPLE]
    assert backlog.total == 4 and backlog.in_hand == 2 and backlog.queued + backlog.routed == 2

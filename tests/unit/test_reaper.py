"""The reaper on fakeredis (with Lua): a lost node's deliveries go back once, a live node's never."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from shared import routing
from shared.keys import Keys
from workers.engines.batching.fetch import UNACKED, UNACKED_INDEX
from workers.reaper import Reaper

KEYS = Keys("rp")
QUEUE = "infer.simple.cpu"


def hold(redis: fakeredis.FakeRedis, holder: str, tag: str, fetched_at: float) -> None:
    payload = {"body": "e30=", "headers": {"id": tag, "task": "fleet.predict"}, "properties": {"priority": 0}}
    redis.hset(UNACKED, tag, json.dumps([payload, "", QUEUE]))
    redis.zadd(UNACKED_INDEX, {tag: fetched_at})
    redis.hset(KEYS.worker_deliveries(holder), tag, f"job-{tag} fleet.predict {fetched_at!r}")
    redis.sadd(KEYS.delivery_holders(), holder)


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def ready_reaper(redis: fakeredis.FakeRedis, lost_after: float = 30) -> Reaper:
    reaper = Reaper(redis, KEYS, lost_after)
    reaper._up_since = time.monotonic() - 3600  # as if it had been up for long
    return reaper


def test_a_lost_node_s_deliveries_go_back_to_the_head_of_their_queue(redis):
    now = time.time()
    hold(redis, "lost@host|11", "t1", now - 100)
    hold(redis, "lost@host|main", "t2", now - 90)
    hold(redis, "live@host|12", "t3", now - 5000)  # a long job of a live node: never taken from it
    redis.zadd(KEYS.workers(), {"lost@host|11": now - 60, "lost@host|13": now - 45, "live@host|14": now - 2})
    assert ready_reaper(redis).run_once() == 2
    back = [json.loads(m)["headers"]["id"] for m in redis.lrange(routing.priority_list(QUEUE, 0), 0, -1)]
    assert sorted(back) == ["t1", "t2"]
    assert redis.hexists(UNACKED, "t3") and not redis.hexists(UNACKED, "t1")
    assert {h.decode() for h in redis.smembers(KEYS.delivery_holders())} == {"live@host|12"}
    assert ready_reaper(redis).run_once() == 0  # nothing goes back twice


def test_a_delivery_taken_again_meanwhile_is_left_alone(redis):
    now = time.time()
    hold(redis, "lost@host|11", "t1", now - 100)
    redis.zadd(UNACKED_INDEX, {"t1": now - 1})  # swept and taken again by someone else since
    assert ready_reaper(redis).run_once() == 0 and redis.hexists(UNACKED, "t1")


def test_one_reaper_at_a_time_and_none_right_after_an_outage(redis):
    hold(redis, "lost@host|11", "t1", time.time() - 100)
    redis.set(KEYS.reaper_lock(), "another worker", ex=30)
    assert ready_reaper(redis).run_once() == 0
    redis.delete(KEYS.reaper_lock())
    fresh = Reaper(redis, KEYS, 30)  # just (re)connected: every heartbeat looks stale until they resume
    assert fresh.run_once() == 0 and redis.hexists(UNACKED, "t1")
    assert ready_reaper(redis).run_once() == 1


def test_a_failing_round_is_logged_not_raised(redis, caplog):
    reaper = ready_reaper(redis)
    redis.set(KEYS.delivery_holders(), "not a set")
    assert reaper.maybe_run() == 0 and "reaping lost workers failed" in caplog.text
    assert reaper._up_since is None


def test_the_sweep_gives_back_only_what_no_live_worker_holds(redis):
    now = time.time()
    hold(redis, "live@host|12", "long-job", now - 5000)  # a long job of a live worker of another pool
    hold(redis, "lost@host|11", "t-lost", now - 5000)
    redis.hset(UNACKED, "orphan", redis.hget(UNACKED, "t-lost").replace(b"t-lost", b"orphan"))
    redis.zadd(UNACKED_INDEX, {"orphan": now - 5000})  # unacked, held by nobody known
    redis.zadd(KEYS.workers(), {"live@host|14": now - 2})
    reaper = Reaper(redis, KEYS, 30, visibility_timeout_s=1200)
    reaper._up_since = time.monotonic() - 3600
    assert reaper.run_once() == 2  # the lost worker's, then the orphan
    assert redis.hexists(UNACKED, "long-job") and not redis.hexists(UNACKED, "orphan")


def test_nothing_is_reaped_right_after_redis_itself_restarted(redis, monkeypatch):
    # every heartbeat is stale after a Redis restart, whether or not this reaper saw the outage
    hold(redis, "live@host|12", "t1", time.time() - 100)
    redis.zadd(KEYS.workers(), {"live@host|12": time.time() - 40})  # its last beat before the outage
    reaper = ready_reaper(redis)
    monkeypatch.setattr(redis, "info", lambda section=None: {"uptime_in_seconds": 3})
    assert reaper.run_once() == 0 and redis.hexists(UNACKED, "t1")
    monkeypatch.setattr(redis, "info", lambda section=None: {"uptime_in_seconds": 3600})
    assert reaper.run_once() == 1  # a node silent that long with Redis up all along is lost

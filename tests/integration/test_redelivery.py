"""Giving messages back on the real Redis: what a dead process held (its supervisor, at once) and what nobody
acknowledged within the visibility timeout (the sweep) go back to the head of their priority list, marked
redelivered, and leave kombu's ``unacked`` bookkeeping and the holdings hash; the one give-back primitive never
delivers a message twice, and an acknowledgement removes all three entries."""

from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest

from shared import celery_wire, routing, tasks
from shared.keys import Keys
from tests.helpers import wait_for
from workers.engines.batching.fetch import UNACKED, UNACKED_INDEX, UNACKED_MUTEX, BatchFetcher
from workers.engines.batching import redelivery as redelivery_module
from workers.engines.batching.redelivery import Redelivery, ack

pytestmark = pytest.mark.integration
RUN = uuid.uuid4().hex[:8]
#: A queue of this module's own: the integration database is shared with real workers (of this session or of
#: another one), which consume the fleet's real pool queues and sweep kombu's unacked hash.
QUEUE = f"infer.redelivery-test-{RUN}.cpu"
LISTS = routing.redis_list_keys(QUEUE)
WORKER = f"w-redelivery-test-{RUN}|1"
OTHER = f"w-redelivery-test-{RUN}|2"
#: Deliveries made to look this old, and the visibility timeout the sweeps here use: far beyond any real
#: worker's, so that a sweep here gives back only this module's own entries of the shared unacked hash.
OLD_S = 10 * 86400
VISIBILITY_S = 9 * 86400
JOB = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": [[1.0]]}}


class Env:
    def __init__(self, redis_client: Any, keys: Keys) -> None:
        self.redis = redis_client
        self.keys = keys
        self.held_key = keys.worker_deliveries(WORKER)
        self.fetcher = BatchFetcher(redis_client, LISTS, keys, WORKER, 60, max_messages=8)
        self.other_fetcher = BatchFetcher(redis_client, LISTS, keys, OTHER, 60, max_messages=8)
        self.redelivery = Redelivery(redis_client, keys)
        self.job_ids: list[str] = []
        self.tags: set[str] = set()

    def push(self, name: str, broker_priority: int = 0, task: str = tasks.PREDICT) -> tuple[str, str]:
        """LPUSH a Celery task message: returns ``(job id, delivery tag)``."""
        job_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.job_ids.append(job_id)
        key, raw = celery_wire.task_message(task, job_id, {"job": JOB}, QUEUE, broker_priority)
        self.redis.lpush(key, raw)
        tag = json.loads(raw)["properties"]["delivery_tag"]
        self.tags.add(tag)
        return job_id, tag

    def queued(self, name: str) -> list[dict[str, Any]]:
        """A list's messages in consume order (RPOP order: the head first)."""
        return [json.loads(m) for m in reversed(self.redis.lrange(name, 0, -1))]

    def queued_ids(self) -> list[str]:
        return [m["headers"]["id"] for name in LISTS for m in self.queued(name)]

    def bookkeeping(self, held_key: str | None = None) -> tuple[set[str], set[str], set[str]]:
        """This test's tags in ``unacked`` and ``unacked_index`` (shared with other processes), and the tags in
        a holdings hash."""
        tags = sorted(self.tags)
        unacked = self.redis.hmget(UNACKED, tags) if tags else []
        index = self.redis.zmscore(UNACKED_INDEX, tags) if tags else []
        return ({t for t, m in zip(tags, unacked) if m is not None}, {t for t, s in zip(tags, index) if s is not None},
                {t.decode() for t in self.redis.hkeys(held_key or self.held_key)})

    def age(self, tag: str, seconds: float = OLD_S) -> None:
        """Make a delivery look ``seconds`` old (as if its fetch happened then: the index and its holder's entry,
        which carries the fetch time that tells deliveries of one tag apart)."""
        fetched_at = time.time() - seconds
        self.redis.zadd(UNACKED_INDEX, {tag: fetched_at}, xx=True)
        for held_key in (self.held_key, self.keys.worker_deliveries(OTHER)):
            entry = self.redis.hget(held_key, tag)
            if entry is not None:
                job_id, task, _ = entry.decode().split(" ", 2)
                self.redis.hset(held_key, tag, f"{job_id} {task} {fetched_at!r}")

    def in_window(self, redelivery: Redelivery, between: Callable[[list[str]], None]) -> None:
        """Run ``between(args)`` once, after ``redelivery`` read a message and before its give-back script runs
        (the window in which another process may act on the same tag)."""
        script = redelivery._give_back
        done: list[bool] = []

        def racing(keys: list[str], args: list[str]) -> Any:
            if not done:
                done.append(True)
                between(args)
            return script(keys=keys, args=args)

        redelivery._give_back = racing

    def sweep(self, redelivery: Redelivery | None = None, visibility_timeout: float = VISIBILITY_S) -> int:
        """A sweep, once no other sweeper (a real worker's, on this shared database) holds the lock."""
        wait_for(lambda: not self.redis.exists(UNACKED_MUTEX), 10, "the unacked mutex to be free")
        return (redelivery or self.redelivery).sweep(visibility_timeout)

    def clean(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(*LISTS, self.held_key, self.keys.worker_deliveries(OTHER),
                    *(self.keys.job(j) for j in self.job_ids))
        if self.tags:  # only this test's entries: kombu's unacked hash and index are shared
            pipe.hdel(UNACKED, *self.tags).zrem(UNACKED_INDEX, *self.tags)
            pipe.hdel(self.keys.worker_deliveries("unknown"), *self.tags)
        pipe.execute()


@pytest.fixture()
def env(redis_client, fleet_settings) -> Iterator[Env]:
    env = Env(redis_client, Keys(fleet_settings.redis_key_prefix))
    yield env
    env.clean()


def test_what_a_dead_process_held_goes_back_to_the_head_of_its_priority_list(env: Env) -> None:
    p1, tag1 = env.push("p1")
    p2, tag2 = env.push("p2", broker_priority=4)
    held = env.fetcher.fetch(block_s=0)
    assert len(held.raws) == 2 and env.redelivery.held(WORKER) == {tag1: (p1, tasks.PREDICT),
                                                                  tag2: (p2, tasks.PREDICT)}
    waiting, _ = env.push("waiting")  # arrived while the process held p1: it queues behind p1 when p1 is back

    assert env.redelivery.give_back_held(WORKER) == 2
    assert env.bookkeeping() == (set(), set(), set()) and env.redis.exists(env.held_key) == 0
    first, second = env.queued(QUEUE)
    assert first["headers"]["id"] == p1 and second["headers"]["id"] == waiting
    (back,) = env.queued(routing.priority_list(QUEUE, 4))  # the list of its own priority, not list 0
    assert back["headers"]["id"] == p2
    for message, tag in ((first, tag1), (back, tag2)):
        assert message["headers"]["redelivered"] is True
        assert message["properties"]["delivery_tag"] == tag  # otherwise the message it was
        assert celery_wire.read_message(json.dumps(message)).kwargs == {"job": JOB}
    assert "redelivered" not in second["headers"]

    again = env.other_fetcher.fetch(block_s=0)  # any process takes it first, and it counts as a second delivery
    assert [json.loads(r)["headers"]["id"] for r in again.raws] == [p1, waiting, p2]
    assert [b.deliveries for b in again.begun] == [2, 1, 2]


def test_a_process_that_held_nothing_gives_nothing_back(env: Env) -> None:
    env.push("p1")
    assert env.redelivery.give_back_held(WORKER) == 0
    assert len(env.queued(QUEUE)) == 1 and env.bookkeeping() == (set(), set(), set())


def test_a_message_acknowledged_already_is_not_given_back(env: Env) -> None:
    _, tag1 = env.push("p1")
    p2, tag2 = env.push("p2")
    env.fetcher.fetch(block_s=0)
    pipe = env.redis.pipeline(transaction=True)
    ack(pipe, env.held_key, [tag1])
    pipe.execute()
    env.redis.hset(env.held_key, tag1, "stale entry")  # a holdings entry that outlived its message
    assert env.redelivery.give_back_held(WORKER) == 1
    assert env.queued_ids() == [p2] and env.bookkeeping() == (set(), set(), set())
    assert env.sweep() == 0 and env.queued_ids() == [p2]


def test_the_sweep_gives_back_only_what_is_older_than_the_visibility_timeout(env: Env) -> None:
    old, old_tag = env.push("old")
    fresh, fresh_tag = env.push("fresh")
    env.fetcher.fetch(block_s=0)
    env.age(old_tag)
    assert env.sweep() == 1
    (back,) = env.queued(QUEUE)
    assert back["headers"]["id"] == old and back["headers"]["redelivered"] is True
    unacked, index, held = env.bookkeeping()
    assert unacked == index == {fresh_tag}
    assert held == {old_tag, fresh_tag}  # the sweep does not know the holder: its entry is left to its supervisor
    assert env.sweep() == 0  # the fresh one is not due, the old one is gone
    # the holder dies later: only what it still holds goes back, the swept message is not delivered again
    assert env.redelivery.give_back_held(WORKER) == 1
    assert env.queued_ids() == [fresh, old] and env.bookkeeping() == (set(), set(), set())


def test_the_sweep_waits_for_another_sweeper_and_releases_its_own_lock(env: Env, monkeypatch) -> None:
    _, tag = env.push("p1")
    env.fetcher.fetch(block_s=0)
    env.age(tag)
    theirs = f"a celery worker's restore {RUN}"
    wait_for(lambda: env.redis.set(UNACKED_MUTEX, theirs, nx=True, ex=60), 10, "the unacked mutex")
    try:
        assert env.redelivery.sweep(VISIBILITY_S) == 0 and env.queued_ids() == []
        assert env.redis.get(UNACKED_MUTEX) == theirs.encode()  # not its lock: left alone
    finally:
        if env.redis.get(UNACKED_MUTEX) == theirs.encode():
            env.redis.delete(UNACKED_MUTEX)
    ours = f"our lock {RUN}"
    monkeypatch.setattr(redelivery_module, "uuid", SimpleNamespace(uuid4=lambda: ours))
    during: list[bytes | None] = []
    env.in_window(env.redelivery, lambda _: during.append(env.redis.get(UNACKED_MUTEX)))
    assert env.sweep() == 1
    assert during == [ours.encode()] and env.redis.get(UNACKED_MUTEX) != ours.encode()  # held, then released


def test_an_unreadable_unacked_entry_is_dropped_not_given_back(env: Env) -> None:
    bad = f"bad-tag-{RUN}"
    env.tags.add(bad)
    env.redis.hset(UNACKED, bad, "not json")
    env.redis.zadd(UNACKED_INDEX, {bad: time.time() - OLD_S})
    assert env.sweep() == 0
    assert env.bookkeeping() == (set(), set(), set()) and env.queued_ids() == []


def test_the_sweep_and_the_supervisor_racing_on_one_tag_deliver_it_once(env: Env, redis_client) -> None:
    p1, tag = env.push("p1")
    env.fetcher.fetch(block_s=0)
    env.age(tag)
    supervisor = Redelivery(redis_client, env.keys)
    given: list[int] = []
    # the supervisor gives the dead process's message back after the sweep read it, before the sweep moves it
    env.in_window(env.redelivery, lambda _: given.append(supervisor.give_back_held(WORKER)))
    swept = env.sweep()
    assert given == [1] and swept == 0
    assert env.queued_ids() == [p1] and env.bookkeeping() == (set(), set(), set())


def test_the_supervisor_and_the_sweep_racing_the_other_way_deliver_it_once(env: Env, redis_client) -> None:
    p1, tag = env.push("p1")
    env.fetcher.fetch(block_s=0)
    env.age(tag)
    sweeper = Redelivery(redis_client, env.keys)
    swept: list[int] = []
    env.in_window(env.redelivery, lambda _: swept.append(sweeper.sweep(VISIBILITY_S)))
    assert env.redelivery.give_back_held(WORKER) == 0 and swept == [1]
    assert env.queued_ids() == [p1] and env.bookkeeping() == (set(), set(), set())


def test_a_message_acknowledged_while_it_was_being_given_back_stays_acknowledged(env: Env) -> None:
    _, tag = env.push("p1")
    env.fetcher.fetch(block_s=0)
    env.age(tag)

    def acknowledged(_: list[str]) -> None:  # the holder finished the job just in time
        pipe = env.redis.pipeline(transaction=True)
        ack(pipe, env.held_key, [tag])
        pipe.execute()

    env.in_window(env.redelivery, acknowledged)
    assert env.sweep() == 0
    assert env.queued_ids() == [] and env.bookkeeping() == (set(), set(), set())


def test_a_message_given_back_and_taken_again_in_the_window_is_not_given_back_twice(env: Env, redis_client) -> None:
    p1, tag = env.push("p1")
    env.fetcher.fetch(block_s=0)
    env.age(tag)
    supervisor = Redelivery(redis_client, env.keys)

    def given_back_and_taken_again(_: list[str]) -> None:
        assert supervisor.give_back_held(WORKER) == 1
        taken = env.other_fetcher.fetch(block_s=0)  # a live process takes it: recorded again, same tag
        assert [json.loads(r)["headers"]["id"] for r in taken.raws] == [p1]

    env.in_window(env.redelivery, given_back_and_taken_again)
    env.sweep()
    # the live process holds it: it must be neither queued nor dropped from the unacked bookkeeping
    assert env.queued_ids() == []
    assert env.bookkeeping(env.keys.worker_deliveries(OTHER)) == ({tag}, {tag}, {tag})


def test_a_swept_message_taken_by_another_process_is_not_given_back_when_its_first_holder_dies(env: Env) -> None:
    p1, tag = env.push("p1")
    env.fetcher.fetch(block_s=0)  # WORKER takes it and goes quiet past the visibility timeout
    env.age(tag)
    assert env.sweep() == 1
    taken = env.other_fetcher.fetch(block_s=0)  # OTHER, alive, runs it now
    assert [json.loads(r)["headers"]["id"] for r in taken.raws] == [p1]
    env.redelivery.give_back_held(WORKER)  # then WORKER dies: its supervisor gives back what it held
    assert env.queued_ids() == []
    assert env.bookkeeping(env.keys.worker_deliveries(OTHER)) == ({tag}, {tag}, {tag})


def test_an_ack_removes_all_three_entries_in_the_callers_multi(env: Env) -> None:
    tags = [env.push(f"p{i}")[1] for i in range(3)]
    env.fetcher.fetch(block_s=0)
    pipe = env.redis.pipeline(transaction=True)
    pipe.set(env.keys.job("marker"), 1)  # the outcome the ack goes with
    ack(pipe, env.held_key, tags[:2])
    assert len(pipe) == 4  # ZREM, HDEL, HDEL joined the MULTI, nothing ran yet
    assert env.bookkeeping() == (set(tags), set(tags), set(tags))
    pipe.execute()
    env.job_ids.append("marker")
    assert env.bookkeeping() == ({tags[2]}, {tags[2]}, {tags[2]})


def test_an_ack_of_nothing_adds_nothing(env: Env) -> None:
    pipe = env.redis.pipeline(transaction=True)
    ack(pipe, env.held_key, [])
    assert len(pipe) == 0

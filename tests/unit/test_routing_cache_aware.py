"""Cache-aware routing on fakeredis (with Lua): the router's choices, leaving routing, and the fetch's share."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from shared import celery_wire, routing
from shared.keys import MODEL_HOLDERS_TTL_S, Keys
from shared.settings import FleetSettings
from workers.engines.batching.fetch import BatchFetcher
from workers.engines.batching.membership import RoutingMember
from workers.reaper import Reaper

KEYS = Keys("rt")
QUEUE = "infer.simple.cpu"
MODEL = "AAPL_1h_patchtst"


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def router(**routing_env: object) -> routing.JobRouter:
    settings = FleetSettings(redis_key_prefix="rt", worker_lost_after_seconds=30,
                             routing={"max_backlog": 2, **routing_env})
    return routing.JobRouter(KEYS, settings)


def message(job_id: str, task: str = "fleet.predict") -> bytes:
    return celery_wire.task_message(task, job_id, {"job": {}}, QUEUE, 4)[1]


def send(redis, r: routing.JobRouter, job_id: str, model: str | None = MODEL) -> None:
    pipe = redis.pipeline(transaction=True)
    r.route(pipe, QUEUE, model, message(job_id), 4)
    pipe.execute()


def join(redis, worker: str, held: tuple[str, ...] = (), cost: float = 0.0, beat: float | None = None) -> RoutingMember:
    member = RoutingMember(redis, KEYS, worker, QUEUE, router())
    member.publish(held, cost)
    redis.zadd(KEYS.workers(), {worker: time.time() if beat is None else beat})
    return member


def own(redis, worker: str) -> list[str]:
    """Job ids waiting in a process's own queue, oldest first."""
    lists = routing.redis_list_keys(KEYS.worker_queue(worker))
    return [json.loads(m)["headers"]["id"] for key in lists for m in reversed(redis.lrange(key, 0, -1))]


def pool(redis) -> list[str]:
    return [json.loads(m)["headers"]["id"] for key in routing.redis_list_keys(QUEUE)
            for m in reversed(redis.lrange(key, 0, -1))]


def test_without_routing_members_every_job_goes_to_the_pool_queue(redis):
    send(redis, router(), "j1")
    send(redis, router(cache_aware=False), "j2")
    assert pool(redis) == ["j1", "j2"]


def test_a_job_goes_to_the_live_holder_of_its_model(redis):
    join(redis, "n@h|1", held=("OTHER_1h_patchtst",))
    join(redis, "n@h|2", held=(MODEL,), cost=0.5)
    send(redis, router(), "j1")
    assert own(redis, "n@h|2") == ["j1"] and own(redis, "n@h|1") == [] and pool(redis) == []
    # The message is unchanged: its routing key is still the pool queue, so any redelivery returns it there.
    raw = redis.lrange(routing.redis_list_keys(KEYS.worker_queue("n@h|2"))[1], 0, -1)[0]
    assert json.loads(raw)["properties"]["delivery_info"]["routing_key"] == QUEUE


def test_a_model_nobody_holds_is_placed_where_loading_it_evicts_least_and_its_next_jobs_follow(redis):
    join(redis, "n@h|1", cost=0.9)  # full, its coldest model used a moment ago
    join(redis, "n@h|2", cost=0.1)  # full, its coldest model idle for long
    send(redis, router(), "j1")
    send(redis, router(), "j2")  # not loaded yet: follows the assignment instead of being placed again
    assert own(redis, "n@h|2") == ["j1", "j2"]
    assert redis.get(KEYS.model_assigned(QUEUE, MODEL)) == b"n@h|2"


def test_a_holder_over_the_backlog_bound_makes_a_copy_then_jobs_spread_over_both(redis):
    join(redis, "n@h|1", held=(MODEL,), cost=0.0)
    join(redis, "n@h|2", cost=0.3)
    for i in range(4):
        send(redis, router(), f"j{i}")
    # Two fit under the bound at the holder; the third is a copy on the other process, which now has the
    # lower backlog, so it gets the fourth too.
    assert own(redis, "n@h|1") == ["j0", "j1"]
    assert own(redis, "n@h|2") == ["j2", "j3"]
    assert pool(redis) == []
    for i in range(4, 6):
        send(redis, router(), f"j{i}")
    assert pool(redis) == ["j4", "j5"]  # every process over the bound: any process takes them


def test_a_process_with_a_stale_heartbeat_or_out_of_routing_is_never_chosen(redis):
    join(redis, "n@h|1", held=(MODEL,), beat=time.time() - 60)  # its host is gone (lost after 30 s)
    gone = join(redis, "n@h|2", held=(MODEL,))
    gone.leave()
    send(redis, router(), "j1")
    assert pool(redis) == ["j1"] and own(redis, "n@h|1") == [] and own(redis, "n@h|2") == []


def test_leaving_gives_the_own_queue_back_to_the_head_of_the_pool_queue_in_order(redis):
    member = join(redis, "n@h|1", held=(MODEL,))
    redis.lpush(routing.priority_list(QUEUE, 4), message("older-pool-job"))
    for i in range(2):
        send(redis, router(), f"j{i}")
    assert member.leave() == 2
    assert pool(redis) == ["j0", "j1", "older-pool-job"]
    assert redis.zscore(KEYS.routing_members(QUEUE), "n@h|1") is None
    assert not redis.sismember(KEYS.model_holders(QUEUE, MODEL), "n@h|1")
    assert member.leave() == 0  # again: nothing left, no error


def test_publishing_drops_the_models_a_process_no_longer_holds(redis):
    member = join(redis, "n@h|1", held=(MODEL, "B_1h_patchtst"))
    member.publish(["B_1h_patchtst"], 0.4)
    assert not redis.sismember(KEYS.model_holders(QUEUE, MODEL), "n@h|1")
    assert redis.sismember(KEYS.model_holders(QUEUE, "B_1h_patchtst"), "n@h|1")
    assert redis.zscore(KEYS.routing_members(QUEUE), "n@h|1") == pytest.approx(0.4)


def test_after_a_predict_s_cold_load_only_the_change_is_published_and_routing_follows_it(redis):
    from types import SimpleNamespace

    from workers.heartbeat import Heartbeat

    member = join(redis, "n@h|1", held=(MODEL, "B_1h_patchtst"))
    join(redis, "n@h|2")
    held = ["B_1h_patchtst", "C_1h_patchtst"]  # C came in, the cache made room by evicting MODEL
    pool_ = SimpleNamespace(loaded_models=lambda: [SimpleNamespace(model_id=m) for m in held],
                            placement_cost=lambda: 0.75, copies_elsewhere=frozenset({MODEL, "B_1h_patchtst"}))
    stats = SimpleNamespace(heartbeat=lambda *a, **k: pytest.fail("the full heartbeat waits for its beat"))
    Heartbeat(stats, pool_, [QUEUE], member).cache_changed()
    holders = {m: redis.smembers(KEYS.model_holders(QUEUE, m)) for m in (MODEL, "B_1h_patchtst", "C_1h_patchtst")}
    assert holders == {MODEL: set(), "B_1h_patchtst": {b"n@h|1"}, "C_1h_patchtst": {b"n@h|1"}}
    assert 0 < redis.ttl(KEYS.model_holders(QUEUE, "C_1h_patchtst")) <= MODEL_HOLDERS_TTL_S
    assert redis.zscore(KEYS.routing_members(QUEUE), "n@h|1") == pytest.approx(0.75)
    assert pool_.copies_elsewhere == {"B_1h_patchtst"}  # the evicted model is no copy of anything any more
    r = router()
    send(redis, r, "j-c", "C_1h_patchtst")
    assert own(redis, "n@h|1") == ["j-c"]  # the next job for the new model goes to its holder
    # the full publish that follows at the beat agrees with the update (nothing to drop, nothing to add)
    assert member.publish(held, 0.75) == frozenset()
    assert redis.smembers(KEYS.model_holders(QUEUE, "C_1h_patchtst")) == {b"n@h|1"}
    Heartbeat(stats, pool_, [QUEUE], None).cache_changed()  # outside routing: nothing to tell


def test_the_reaper_gives_a_lost_node_s_routed_jobs_back_to_the_pool_queue(redis):
    join(redis, "lost@h|1", held=(MODEL,))
    send(redis, router(), "j1")
    redis.zadd(KEYS.workers(), {"lost@h|1": time.time() - 60, "live@h|2": time.time()})
    reaper = Reaper(redis, KEYS, 30)
    reaper._up_since = time.monotonic() - 3600  # as if it had been up for long
    assert reaper.run_once() == 1
    assert pool(redis) == ["j1"] and own(redis, "lost@h|1") == []
    assert redis.zscore(KEYS.routing_members(QUEUE), "lost@h|1") is None


def test_send_job_routes_like_the_api(redis):
    join(redis, "n@h|1", held=(MODEL,))

    class App:
        def AsyncResult(self, job_id):  # noqa: N802 (Celery's name)
            return job_id

    settings = FleetSettings(redis_key_prefix="rt")
    job = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "adapter": "simple", "device": "cpu"}
    assert routing.send_job(App(), redis, "fleet.predict", job, job_id="j1", settings=settings) == "j1"
    assert own(redis, "n@h|1") == ["j1"]


def fetcher(redis, max_messages: int) -> BatchFetcher:
    return BatchFetcher(redis, routing.redis_list_keys(QUEUE), KEYS, "n@h|1", 60, max_messages,
                        own_lists=routing.redis_list_keys(KEYS.worker_queue("n@h|1")))


def test_the_fetch_serves_the_own_queue_first_but_never_starves_the_pool_queue(redis):
    join(redis, "n@h|1", held=(MODEL,))
    for i in range(8):
        redis.lpush(routing.priority_list(KEYS.worker_queue("n@h|1"), 4), message(f"own{i}"))
        redis.lpush(routing.priority_list(QUEUE, 4), message(f"pool{i}"))
    batch = fetcher(redis, 4).fetch(block_s=0)
    ids = [json.loads(m)["headers"]["id"] for m in batch.raws]
    assert ids == ["own0", "own1", "own2", "pool0"]  # 3 of 4 (OWN_SHARE) from the own queue, then the pool's
    redis.delete(*routing.redis_list_keys(QUEUE))
    ids = [json.loads(m)["headers"]["id"] for m in fetcher(redis, 4).fetch(block_s=0).raws]
    assert ids == ["own3", "own4", "own5", "own6"]  # the pool empty: the own queue fills the batch


def test_the_fetch_keeps_priority_across_the_own_and_the_pool_queue(redis):
    redis.lpush(routing.priority_list(KEYS.worker_queue("n@h|1"), 9), message("own-low"))
    redis.lpush(routing.priority_list(QUEUE, 0), message("pool-urgent"))
    ids = [json.loads(m)["headers"]["id"] for m in fetcher(redis, 4).fetch(block_s=0).raws]
    assert ids == ["pool-urgent", "own-low"]


def test_publishing_tells_which_held_models_other_processes_hold_too(redis):
    join(redis, "n@h|2", held=(MODEL,))
    member = join(redis, "n@h|1")
    assert member.publish([MODEL, "B_1h_patchtst"], 0.1) == {MODEL}
    RoutingMember(redis, KEYS, "n@h|2", QUEUE, router()).leave()  # the other copy goes: none left elsewhere
    assert member.publish([MODEL, "B_1h_patchtst"], 0.1) == frozenset()


def test_a_full_cache_makes_room_by_dropping_a_cold_copy_rather_than_the_fleet_s_only_copy():
    from types import SimpleNamespace

    from workers.serving.cache import ModelCache
    from workers.serving.pool import AdapterPool

    cache = ModelCache(max_models=3, max_bytes=10**9, ttl_seconds=3600, sizeof=lambda _: 1)
    pool = AdapterPool(FleetSettings())
    adapter = SimpleNamespace(cache=cache)
    for i, model in enumerate(("only-here", "copy", "hot")):
        cache.put(model, object())
        pool._last_used[model] = float(i)
    pool._drop_a_cold_copy(adapter, "incoming")
    assert "copy" in cache  # nothing is held elsewhere: the cache's own LRU decides
    pool.copies_elsewhere = frozenset({"copy"})
    pool._drop_a_cold_copy(adapter, "incoming")
    assert "copy" not in cache and "only-here" in cache
    assert cache.counters.evictions["copy"] == 1


def test_an_idle_process_steals_half_of_what_waits_behind_the_busiest_one(redis):
    busy = join(redis, "n@h|2", held=(MODEL,))
    idle = join(redis, "n@h|1")
    assert idle.busiest(2) is None
    for i in range(6):
        send(redis, router(max_backlog=10), f"j{i}")
    assert own(redis, "n@h|2") == [f"j{i}" for i in range(6)]
    lists, waiting = idle.busiest(2)
    assert lists == busy.lists and waiting == 6
    batch = fetcher(redis, 32).steal(lists, (waiting + 1) // 2)
    assert [json.loads(m)["headers"]["id"] for m in batch.raws] == ["j0", "j1", "j2"]  # the oldest
    assert own(redis, "n@h|2") == ["j3", "j4", "j5"]
    # recorded as held by the thief (given back by its supervisor if it dies), begun as its own fetch
    assert redis.hlen(KEYS.worker_deliveries("n@h|1")) == 3 and all(b is not None for b in batch.begun)

"""The per-process model cache: LRU count bound, memory budget and idle TTL, each with a fake clock."""

from __future__ import annotations

import pytest

from shared.errors import ModelLoadError
from workers.serving.cache import ModelCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(max_models: int = 2, max_bytes: int = 100, ttl: float = 10.0):
    clock, evicted = Clock(), []
    cache = ModelCache(max_models, max_bytes, ttl, sizeof=lambda v: v,
                       on_evict=lambda k, v, reason: evicted.append((k, reason)), timer=clock)
    return cache, clock, evicted


def test_lru_evicts_least_recently_used_when_count_is_full() -> None:
    cache, _, evicted = make(max_models=2)
    cache.put("a", 1)
    cache.put("b", 1)
    assert cache.get("a") == 1  # a is now more recent than b
    cache.put("c", 1)
    assert evicted == [("b", "lru")]
    assert sorted(k for k, _ in cache.items()) == ["a", "c"]
    assert cache.counters.evictions["lru"] == 1


def test_memory_budget_evicts_until_it_fits() -> None:
    cache, _, evicted = make(max_models=10, max_bytes=100)
    cache.put("a", 40)
    cache.put("b", 40)
    cache.put("c", 50)  # 130 > 100: the LRU entry goes
    assert evicted == [("a", "memory")]
    assert cache.current_bytes == 90


def test_model_larger_than_budget_is_refused_with_typed_error() -> None:
    cache, _, evicted = make(max_bytes=100)
    cache.put("a", 10)
    with pytest.raises(ModelLoadError, match="more than the whole cache budget"):
        cache.put("huge", 101)
    assert evicted == [] and "a" in cache


def test_idle_ttl_counts_from_last_use_not_from_insert() -> None:
    cache, clock, evicted = make(ttl=10)
    cache.put("a", 1)
    clock.now = 8
    assert cache.get("a") == 1  # use at t=8 restarts the idle clock
    clock.now = 15
    assert cache.get("a") == 1
    clock.now = 26
    assert cache.get("a") is None
    assert evicted == [("a", "ttl")]


def test_expire_evicts_idle_entries_without_a_lookup() -> None:
    cache, clock, evicted = make(ttl=5)
    cache.put("a", 1)
    cache.put("b", 1)
    clock.now = 6
    assert sorted(cache.expire()) == ["a", "b"]
    assert sorted(evicted) == [("a", "ttl"), ("b", "ttl")]
    assert len(cache) == 0


def test_hit_miss_counters_and_manual_pop() -> None:
    cache, _, evicted = make()
    assert cache.get("x") is None
    cache.put("x", 1)
    assert cache.get("x") == 1
    assert cache.pop("x") == 1
    assert evicted == [("x", "manual")]
    snap = cache.counters.snapshot()
    assert (snap["hits"], snap["misses"], snap["evictions"], snap["evictions_manual"]) == (1, 1, 0, 1)


def test_reinserting_a_key_replaces_it() -> None:
    cache, _, evicted = make(max_models=2)
    cache.put("a", 10)
    cache.put("a", 20)
    assert cache.peek("a") == 20 and cache.current_bytes == 20 and len(cache) == 1


def test_listing_and_peeking_do_not_change_the_lru_order() -> None:
    cache, _, evicted = make(max_models=2)
    cache.put("a", 1)
    cache.put("b", 1)
    cache.get("a")  # order now: b, a
    cache.items()
    cache.peek("b")
    assert "b" in cache
    cache.put("c", 1)
    assert evicted == [("b", "lru")]


def test_loads_load_time_and_age_at_eviction_are_counted() -> None:
    cache, clock, _ = make(max_models=2, max_bytes=100, ttl=100)
    cache.put("a", 1, load_seconds=0.0124)
    clock.now = 10
    cache.put("b", 1, load_seconds=0.0031)
    clock.now = 25
    cache.put("c", 1, load_seconds=0.0050)  # count bound: a goes, 25 s after it was loaded
    snap = cache.counters.snapshot()
    assert (snap["loads"], snap["load_ms"], snap["evicted_age_s"], snap["evictions_lru"]) == (3, 20, 25, 1)
    clock.now = 30
    cache.pop("b")  # an unload is not an eviction: its age is not counted
    clock.now = 140
    cache.expire()  # idle TTL: c goes, 115 s after it was loaded
    snap = cache.counters.snapshot()
    assert (snap["evicted_age_s"], snap["evictions"], snap["evictions_manual"]) == (140, 2, 1)


def test_age_counts_from_the_load_not_from_the_last_use_and_sums_are_not_rounded_per_event() -> None:
    cache, clock, _ = make(max_models=1, ttl=100)
    for i in range(4):
        clock.now = i * 0.6
        cache.put(f"m{i}", 1, load_seconds=0.0004)  # 0.4 ms each: 1.6 ms in all, not 4 x 0
        clock.now += 0.5
        assert cache.get(f"m{i}") == 1  # a use does not restart its age
    snap = cache.counters.snapshot()
    assert (snap["loads"], snap["load_ms"], snap["evicted_age_s"]) == (4, 2, 2)  # 3 x 0.6 s resident
    cache.put("m3", 1)  # a reload of a cached key replaces it: no eviction
    assert cache.counters.snapshot()["evicted_age_s"] == 2

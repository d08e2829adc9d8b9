"""Async reads of the fleet's shared state: live workers, what they hold, their stats, the queues and each pool's
backlog (:mod:`shared.backlog`).

Workers write these hashes (see :mod:`shared.stats`); this module reads them with the API's asyncio client,
batching each step into one pipeline, and turns them into :class:`shared.schemas.ServingStats` with the same
pure helper the sync reader uses. Models whose stats hash expired are left out (of ``/v1/stats`` and
``/metrics`` alike) and forgotten, as :func:`shared.stats.forget_models` does for the sync reader.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from redis.exceptions import WatchError

from producer_api.jobdoc import decode_hash
from shared.backlog import PoolBacklog, pool_backlogs
from shared.keys import WORKER_HEARTBEAT_TTL_S, Keys
from shared.schemas import ServingStats
from shared.stats import stats_from_hash


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def live_workers(redis: Any, keys: Keys, now: float | None = None) -> list[str]:
    """Worker ids whose heartbeat is fresher than :data:`WORKER_HEARTBEAT_TTL_S`."""
    now = now if now is not None else time.time()
    ids = await redis.zrangebyscore(keys.workers(), now - WORKER_HEARTBEAT_TTL_S, "+inf")
    return [_text(i) for i in ids]


async def models_held(redis: Any, keys: Keys, workers: list[str]) -> dict[str, list[str]]:
    """Model id -> the live workers holding it now."""
    pipe = redis.pipeline(transaction=False)
    for worker in workers:
        pipe.hkeys(keys.worker_models(worker))
    held: dict[str, list[str]] = {}
    for worker, model_ids in zip(workers, await pipe.execute()):
        for model_id in model_ids:
            held.setdefault(_text(model_id), []).append(worker)
    return held


async def workers_by_queue(redis: Any, keys: Keys) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Queue -> live healthy workers consuming it, and queue -> {unhealthy worker: its reason}, from the
    ``queues``, ``healthy`` and ``unhealthy_reason`` fields workers put in their stats hash."""
    workers = await live_workers(redis, keys)
    pipe = redis.pipeline(transaction=False)
    for worker in workers:
        pipe.hmget(keys.worker_stats(worker), "queues", "healthy", "unhealthy_reason")
    healthy: dict[str, list[str]] = {}
    unhealthy: dict[str, dict[str, str]] = {}
    for worker, (queues, ok, reason) in zip(workers, await pipe.execute()):
        for queue in filter(None, _text(queues or b"").split(",")):
            if _text(ok or b"1") == "1":
                healthy.setdefault(queue.strip(), []).append(worker)
            else:
                unhealthy.setdefault(queue.strip(), {})[worker] = _text(reason or b"") or "unhealthy"
    return healthy, unhealthy


async def serving_stats(redis: Any, keys: Keys) -> dict[str, Any]:
    """``{"fleet": ServingStats, "workers": {id: ServingStats}, "models": {model_id: ServingStats}}``."""
    now = time.time()
    workers = await live_workers(redis, keys, now)
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.fleet_stats())
    pipe.smembers(keys.stats_models())
    for worker in workers:
        pipe.hgetall(keys.worker_stats(worker))
    fleet_raw, model_ids, *worker_raw = await pipe.execute()
    held = await models_held(redis, keys, workers)
    per_worker = {w: stats_from_hash(raw, now=now) for w, raw in zip(workers, worker_raw)}
    # A model loaded but never served has no stats hash yet; it is listed all the same.
    listed = {_text(m) for m in model_ids}
    models = sorted(listed | set(held))
    pipe = redis.pipeline(transaction=False)
    for model_id in models:
        pipe.hgetall(keys.model_stats(model_id))
    raws = dict(zip(models, await pipe.execute()))
    gone = [m for m in sorted(listed) if not raws[m]]
    if gone:
        await forget_models(redis, keys, gone)
    per_model = {m: stats_from_hash(raw, now=now, models_loaded=len(held.get(m, ())))
                 for m, raw in raws.items() if raw or m in held}
    fleet = stats_from_hash(fleet_raw, now=now,
                            models_loaded=sum(s.models_loaded for s in per_worker.values()),
                            memory_mb=sum(s.total_memory_mb for s in per_worker.values()))
    return {"fleet": fleet, "workers": per_worker, "models": per_model}


async def forget_models(redis: Any, keys: Keys, model_ids: Iterable[str]) -> None:
    """Drop from the set of models with stats those of ``model_ids`` whose hash is (still) gone.

    NOTE: WATCHed, like :func:`shared.stats.forget_models`: a worker writing a model's stats meanwhile (its SADD
    rides in the MULTI of its counters) makes the removal fail rather than hide a live model.
    """
    ids = list(model_ids)
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(*(keys.model_stats(m) for m in ids))
            gone = [m for m in ids if not await pipe.exists(keys.model_stats(m))]
            if gone:
                pipe.multi()
                pipe.srem(keys.stats_models(), *gone)
                await pipe.execute()
        except WatchError:
            pass  # a model came back meanwhile: the next reader tries again


@dataclass
class FleetSnapshot:
    """What ``/metrics`` reports about the fleet, read in one go before rendering."""

    fleet: ServingStats
    latency_sum_ms: float
    workers_live: int
    #: Pool queue -> messages waiting in its lists (every priority step): the backlog's ``queued``.
    queue_depths: dict[str, int] = field(default_factory=dict)
    #: Pool queue -> its backlog (queued + routed + in hand), the autoscaling signal.
    backlogs: dict[str, PoolBacklog] = field(default_factory=dict)
    #: The model caches' cold loads over the fleet: how many, their summed time, and the summed age (time since
    #: load) of the models evicted.
    cache_loads: int = 0
    cache_load_ms: float = 0.0
    cache_evicted_age_s: float = 0.0


def _number(raw: dict[str, Any], name: str) -> float:
    try:
        return float(raw.get(name) or 0.0)
    except ValueError:  # a field another writer spells differently must not fail the scrape
        return 0.0


async def snapshot(redis: Any, keys: Keys) -> FleetSnapshot:
    stats = await serving_stats(redis, keys)
    raw = decode_hash(await redis.hgetall(keys.fleet_stats()))
    backlogs = await pool_backlogs(redis, keys)
    # NOTE: the cache's load and eviction-age counters come from the raw hash (as the workers write them), not
    # from ServingStats, so that /metrics does not depend on that schema carrying them.
    return FleetSnapshot(fleet=stats["fleet"], latency_sum_ms=_number(raw, "latency_sum_ms"),
                         workers_live=len(stats["workers"]),
                         queue_depths={queue: b.queued for queue, b in backlogs.items()}, backlogs=backlogs,
                         cache_loads=int(_number(raw, "cache_loads")), cache_load_ms=_number(raw, "cache_load_ms"),
                         cache_evicted_age_s=_number(raw, "cache_evicted_age_s"))

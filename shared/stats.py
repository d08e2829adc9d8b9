"""Serving stats in Redis: atomic writes by workers, typed reads by anyone.

Counters live in three hashes (per model, per worker process, whole fleet) and move together in one
``MULTI``/``EXEC`` pipeline per job (or per batch of jobs), so a reader never sees a model count that the fleet
count does not include. The latency histogram is stored per bucket (``h:<le>`` fields, not cumulative) and
made cumulative on read.

Model stats exist only for models in the store: a prediction that failed with ``ModelNotFoundError`` counts for
its worker and the fleet, not for the id it named. Each model hash expires :data:`MODEL_STATS_TTL_S` after its
last write, and readers drop (and forget) the ids of the set ``Keys.stats_models()`` whose hash is gone.
"""

from __future__ import annotations

import bisect
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from redis.exceptions import WatchError

from shared.errors import FleetError, ModelNotFoundError
from shared.keys import LATENCY_BUCKETS_MS, MODEL_STATS_TTL_S, WORKER_HEARTBEAT_TTL_S, Keys
from shared.schemas import ModelInfo, ServingStats

_BUCKET_FIELDS = [f"h:{b:g}" for b in LATENCY_BUCKETS_MS] + ["h:+Inf"]


@dataclass(frozen=True)
class JobOutcome:
    """What one finished prediction adds to the counters; ``model_id`` None counts for the worker and the fleet
    only."""

    model_id: str | None
    ok: bool
    latency_ms: float

    @classmethod
    def of(cls, model_id: str, outcome: Any, latency_ms: float = 0.0) -> "JobOutcome":
        """The outcome of one prediction of ``model_id``: its result, or the :class:`FleetError` it failed with."""
        failed = isinstance(outcome, FleetError)
        # NOTE: a model the store lacks gets no stats: every id a client made up would leave a hash behind.
        counted = None if isinstance(outcome, ModelNotFoundError) else model_id
        return cls(counted, not failed, 0.0 if failed else latency_ms)


def bucket_field(latency_ms: float) -> str:
    return _BUCKET_FIELDS[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)]


class StatsWriter:
    """Writes one worker process's counters. Every public method is one Redis round trip."""

    def __init__(self, redis: Any, keys: Keys, worker_id: str, started_at: float | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.worker_id = worker_id
        self.started_at = started_at if started_at is not None else time.time()

    def record(self, outcomes: Iterable[JobOutcome], cache: Mapping[str, int] | None = None) -> None:
        """Add finished predictions and cache counter deltas (``hits``, ``misses``, ``evictions``,
        ``evictions_<reason>``, ``loads``, ``load_ms``, ``evicted_age_s``), atomically."""
        pipe = self.redis.pipeline(transaction=True)
        self.add(pipe, outcomes, cache)
        if len(pipe):
            pipe.execute()

    def add(self, pipe: Any, outcomes: Iterable[JobOutcome], cache: Mapping[str, int] | None = None) -> None:
        """Queue the commands of :meth:`record` on the caller's pipeline (to share its round trip)."""
        worker_key, fleet_key = self.keys.worker_stats(self.worker_id), self.keys.fleet_stats()
        # NOTE: aggregated in Python first: a batch of 32 jobs of one model costs a dozen commands, not 400.
        counts: dict[tuple[str, str], int] = defaultdict(int)
        latency: dict[str, float] = defaultdict(float)
        models: set[str] = set()
        for outcome in outcomes:
            keys = [worker_key, fleet_key]
            if outcome.model_id is not None:
                models.add(outcome.model_id)
                keys.append(self.keys.model_stats(outcome.model_id))
            for key in keys:
                counts[(key, "total")] += 1
                counts[(key, "ok" if outcome.ok else "failed")] += 1
                if outcome.ok:
                    latency[key] += outcome.latency_ms
                    counts[(key, bucket_field(outcome.latency_ms))] += 1
        for name, delta in (cache or {}).items():
            if delta:
                counts[(worker_key, f"cache_{name}")] += delta
                counts[(fleet_key, f"cache_{name}")] += delta
        if models:
            pipe.sadd(self.keys.stats_models(), *sorted(models))
        for (key, field), delta in counts.items():
            pipe.hincrby(key, field, delta)
        for key, total in latency.items():
            pipe.hincrbyfloat(key, "latency_sum_ms", total)
        if models:
            for model_id in sorted(models):
                pipe.expire(self.keys.model_stats(model_id), MODEL_STATS_TTL_S)
            pipe.expire(self.keys.stats_models(), MODEL_STATS_TTL_S)

    def heartbeat(self, models: list[ModelInfo], now: float | None = None, **fields: Any) -> None:
        """Publish this process's loaded models, memory and liveness (plus ``fields``: queues, health)."""
        now = now if now is not None else time.time()
        worker_key, models_key = self.keys.worker_stats(self.worker_id), self.keys.worker_models(self.worker_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(worker_key, mapping={
            "models_loaded": len(models),
            "memory_mb": sum(m.memory_usage_mb for m in models),
            "started_at": self.started_at,
            "heartbeat": now,
            **{k: str(v) for k, v in fields.items()},
        })
        pipe.hsetnx(self.keys.fleet_stats(), "started_at", self.started_at)
        pipe.delete(models_key)
        if models:
            pipe.hset(models_key, mapping={m.model_id: m.model_dump_json() for m in models})
        pipe.expire(models_key, WORKER_HEARTBEAT_TTL_S * 4)
        pipe.zadd(self.keys.workers(), {self.worker_id: now})
        pipe.execute()

    def retire(self) -> None:
        """Remove this process from the live set (clean shutdown); its counters stay."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.workers(), self.worker_id)
        pipe.delete(self.keys.worker_models(self.worker_id))
        pipe.hset(self.keys.worker_stats(self.worker_id), mapping={"models_loaded": 0, "memory_mb": 0})
        pipe.execute()


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def forget_models(redis: Any, keys: Keys, model_ids: Iterable[str]) -> None:
    """Drop from the set of models with stats those of ``model_ids`` whose hash is (still) gone (sync client).

    NOTE: WATCHed: a worker that writes a model's stats between this check and the removal (its SADD rides in
    the same MULTI as its counters) makes the removal fail instead of hiding a live model.
    """
    ids = list(model_ids)
    with redis.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(*(keys.model_stats(m) for m in ids))
            gone = [m for m in ids if not pipe.exists(keys.model_stats(m))]
            if gone:
                pipe.multi()
                pipe.srem(keys.stats_models(), *gone)
                pipe.execute()
        except WatchError:
            pass  # a model came back meanwhile: the next reader tries again


def stats_from_hash(raw: Mapping[Any, Any], *, now: float | None = None, models_loaded: int | None = None,
                    memory_mb: float | None = None) -> ServingStats:
    """Turn one stats hash into :class:`ServingStats` (pure: the caller fetched the hash, sync or async)."""
    h = _decode(raw)
    now = now if now is not None else time.time()
    total, ok, failed = int(h.get("total", 0)), int(h.get("ok", 0)), int(h.get("failed", 0))
    latency_sum = float(h.get("latency_sum_ms", 0.0))
    cumulative, running = {}, 0
    for field in _BUCKET_FIELDS:
        running += int(h.get(field, 0))
        cumulative[field[2:]] = running
    started = float(h["started_at"]) if "started_at" in h else None
    return ServingStats(
        total_predictions=total,
        successful_predictions=ok,
        failed_predictions=failed,
        average_inference_time_ms=latency_sum / ok if ok else 0.0,
        models_loaded=models_loaded if models_loaded is not None else int(float(h.get("models_loaded", 0))),
        total_memory_mb=memory_mb if memory_mb is not None else float(h.get("memory_mb", 0.0)),
        uptime_seconds=max(0.0, now - started) if started else 0.0,
        success_rate=ok / total if total else 0.0,
        cache_hits=int(h.get("cache_hits", 0)),
        cache_misses=int(h.get("cache_misses", 0)),
        cache_evictions=int(h.get("cache_evictions", 0)),
        cache_loads=int(h.get("cache_loads", 0)),
        cache_load_ms_total=int(h.get("cache_load_ms", 0)),
        cache_evicted_age_seconds_total=int(h.get("cache_evicted_age_s", 0)),
        latency_histogram_ms=cumulative,
        cache_evictions_by_reason={k[len("cache_evictions_"):]: int(v) for k, v in h.items()
                                   if k.startswith("cache_evictions_")},
    )


class StatsReader:
    """Reads stats back with a synchronous Redis client (the CLI, tests); the API does the same with asyncio."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    def live_workers(self, now: float | None = None) -> list[str]:
        now = now if now is not None else time.time()
        ids = self.redis.zrangebyscore(self.keys.workers(), now - WORKER_HEARTBEAT_TTL_S, "+inf")
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    def worker(self, worker_id: str) -> ServingStats:
        return stats_from_hash(self.redis.hgetall(self.keys.worker_stats(worker_id)))

    def worker_models(self, worker_id: str) -> list[ModelInfo]:
        raw = _decode(self.redis.hgetall(self.keys.worker_models(worker_id)))
        return [ModelInfo.model_validate(json.loads(v)) for v in raw.values()]

    def model(self, model_id: str) -> ServingStats:
        holders = [w for w in self.live_workers() if model_id in self.loaded_model_ids(w)]
        return stats_from_hash(self.redis.hgetall(self.keys.model_stats(model_id)), models_loaded=len(holders))

    def models(self) -> dict[str, ServingStats]:
        """Stats of every model that has some (a stats hash), by id; ids whose hash expired are forgotten."""
        ids = sorted(_text(m) for m in self.redis.smembers(self.keys.stats_models()))
        pipe = self.redis.pipeline(transaction=False)
        for model_id in ids:
            pipe.hgetall(self.keys.model_stats(model_id))
        raws = dict(zip(ids, pipe.execute()))
        gone = [m for m, raw in raws.items() if not raw]
        if gone:
            forget_models(self.redis, self.keys, gone)
        return {m: self.model(m) for m, raw in raws.items() if raw}

    def loaded_model_ids(self, worker_id: str) -> set[str]:
        return {k.decode() if isinstance(k, bytes) else k for k in self.redis.hkeys(self.keys.worker_models(worker_id))}

    def fleet(self) -> ServingStats:
        workers = [self.worker(w) for w in self.live_workers()]
        return stats_from_hash(
            self.redis.hgetall(self.keys.fleet_stats()),
            models_loaded=sum(w.models_loaded for w in workers),
            memory_mb=sum(w.total_memory_mb for w in workers),
        )

"""The adapters one worker process serves, created after the fork, and running predictions through them.

A pool's adapter is set up when the process starts (:meth:`AdapterPool.setup`). One that cannot be (a device
without CUDA, a runtime that is not installed) is a state, not a crash: the process keeps serving its other
pools, reports itself unhealthy with the reason, and jobs routed to the broken one fail with its typed error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Sequence

from billiard.exceptions import SoftTimeLimitExceeded

from shared import routing, store_layout
from shared.errors import FleetError, ModelNotFoundError, as_fleet_error
from shared.schemas import ModelInfo, ModelKey, PredictJob, PredictionResult
from shared.settings import FleetSettings
from workers.serving.adapters import create_adapter
from workers.serving.adapters.base import ServingAdapter

log = logging.getLogger(__name__)
PoolKey = tuple[str, str]
#: Models whose last use the pool remembers at most (past it, those it no longer holds are forgotten).
LAST_USED_MAX = 4096
#: How far from the least recently used end a copy held elsewhere is evicted in its stead.
COPY_WINDOW = 4


def placement_cost(fill: float, coldest_idle_s: float) -> float:
    """What loading one more model into a cache costs, for the router's placement (lower is cheaper).

    Below 0.5 while the cache has room (``fill`` < 1, counting models and memory): its fill, so that new models
    spread over emptier processes first. Full: ``0.5 + 0.5 / (1 + s)``, ``s`` being how long ago the model it
    would evict was last used: the process whose coldest model has idled longest evicts least (ModelMesh's
    cache age).
    """
    if fill < 1.0:
        return 0.5 * max(0.0, fill)
    return 0.5 + 0.5 / (1.0 + max(0.0, coldest_idle_s))


class AdapterPool:
    """Adapters by ``(adapter, device)``, their set-up failures, their caches' counters."""

    def __init__(self, settings: FleetSettings, adapters: dict[PoolKey, ServingAdapter] | None = None) -> None:
        self.settings = settings
        self._adapters: dict[PoolKey, ServingAdapter] = dict(adapters or {})
        self._failed: dict[PoolKey, FleetError] = {}
        self._lock = threading.RLock()
        self._reported: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        """Model id -> when a job last used it (monotonic): how cold the model a new load would evict is."""
        self.copies_elsewhere: frozenset[str] = frozenset()
        """Models this process holds that other live processes of its pool hold too (the router's view, renewed
        with each heartbeat): the first to make room for a new one."""

    def setup(self, pools: Sequence[PoolKey]) -> None:
        """Create the adapter of each pool now; a failure is recorded (see :meth:`health`), never raised."""
        for adapter, device in pools:
            try:
                self.get(adapter, device)
            except FleetError as err:
                log.error("adapter %s on %s failed to set up in process %s: %s", adapter, device, os.getpid(), err)

    def get(self, adapter: str | None = None, device: str | None = None) -> ServingAdapter:
        """The adapter of a pool, created on first use; raises the typed error its set-up failed with."""
        key = routing.pool_of(adapter, device, self.settings)
        with self._lock:
            if key not in self._adapters:
                try:
                    self._adapters[key] = create_adapter(key[0], self.settings, key[1])
                except Exception as exc:
                    self._failed[key] = as_fleet_error(exc)
                    raise self._failed[key] from None
                self._failed.pop(key, None)
                log.info("adapter %s on %s ready in process %s", key[0], key[1], os.getpid())
            return self._adapters[key]

    def health(self) -> tuple[bool, str]:
        """``(healthy, reason)``: every adapter set up and reporting healthy, else what is wrong."""
        with self._lock:
            problems = [f"{a}:{d}: {err.type}: {err.message}" for (a, d), err in self._failed.items()]
            for (a, d), adapter in list(self._adapters.items()):
                status = adapter.health_check()
                if not status.get("healthy", False):
                    problems.append(f"{a}:{d}: {status.get('reason') or status.get('error') or 'unhealthy'}")
        return not problems, "; ".join(problems)

    def loaded_models(self) -> list[ModelInfo]:
        return [info for adapter in list(self._adapters.values()) for info in adapter.list_loaded_models()]

    def cache_deltas(self) -> dict[str, int]:
        """Cache counters (hits, misses, evictions by reason) since the last call, for the stats."""
        totals: dict[str, int] = defaultdict(int)
        with self._lock:
            for adapter in list(self._adapters.values()):
                for k, v in adapter.cache_counters().items():
                    totals[k] += v
            deltas = {k: v - self._reported.get(k, 0) for k, v in totals.items()}
            self._reported = dict(totals)
        return deltas

    def placement_cost(self) -> float:
        """What loading one more model here costs, for the router's placement (:func:`placement_cost`); the
        cheapest of this process's adapters."""
        now = time.monotonic()
        costs = []
        for adapter in list(self._adapters.values()):
            cache = getattr(adapter, "cache", None)
            if cache is None:
                continue
            entries = cache.items()
            fill = len(entries) / cache.max_models
            if entries:  # memory: room for one more of the average size
                fill = max(fill, (cache.current_bytes + cache.current_bytes / len(entries)) / cache.max_bytes)
            coldest = min((self._last_used.get(str(key), 0.0) for key, _ in entries), default=now)
            costs.append(placement_cost(fill, now - coldest))
        return min(costs, default=0.0)

    def expire_idle(self) -> None:
        """Idle-TTL evictions happen even when no job arrives."""
        for adapter in list(self._adapters.values()):
            cache = getattr(adapter, "cache", None)
            if cache is not None:
                cache.expire()

    def ensure_loaded(self, adapter: ServingAdapter, key: ModelKey, version: str | None) -> float:
        """Make sure the model is loaded in ``adapter``; returns the milliseconds loading took (0 on a hit)."""
        touch = getattr(adapter, "touch", None)
        hit = touch(key.model_id) if touch else adapter.is_loaded(key.model_id)
        self._last_used[key.model_id] = time.monotonic()
        if len(self._last_used) > LAST_USED_MAX:  # bounded: forget the models no longer held
            held = {m.model_id for m in self.loaded_models()}
            self._last_used = {k: v for k, v in self._last_used.items() if k in held}
        if hit and version is None:
            return 0.0
        if not hit:
            self._drop_a_cold_copy(adapter, key.model_id)
        started = time.perf_counter()
        path = store_layout.model_dir(self.settings.model_store_dir, key, version)
        adapter.load_model(path, key.symbol, key.timeframe, key.model_type)
        return (time.perf_counter() - started) * 1000

    def _drop_a_cold_copy(self, adapter: ServingAdapter, incoming: str) -> None:
        """Before a load into a full cache: among its :data:`COPY_WINDOW` least recently used models, evict one that
        other processes hold too (``copies_elsewhere``), rather than the least recent model, which may be the
        only copy in the fleet. A hot model's extra copies go first once it cooled down."""
        cache = getattr(adapter, "cache", None)
        if cache is None or not self.copies_elsewhere or len(cache) < cache.max_models:
            return
        coldest = sorted((str(k) for k, _ in cache.items()), key=lambda k: self._last_used.get(k, 0.0))
        victim = next((k for k in coldest[:COPY_WINDOW] if k in self.copies_elsewhere and k != incoming), None)
        if victim is not None:
            cache.pop(victim, reason="copy")

    def predict(self, jobs: Sequence[PredictJob]) -> tuple[list[PredictionResult | FleetError], float]:
        """Run predict jobs, those of one model as shared forwards; returns (outcome per job, load ms).

        A batch runs as forwards of the preferred size: on CPU a forward of 32 rows costs more per row than four
        of 8 (the benchmark's (a) shows it), and each job still gets its own outcome.
        """
        outcomes: list[PredictionResult | FleetError] = [ModelNotFoundError("no outcome")] * len(jobs)
        groups: dict[tuple[str, str, str, str | None], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(*routing.pool_of(job.adapter, job.device, self.settings), job.model_id, job.version)].append(i)
        load_ms = 0.0
        rows = self.settings.batch.forward_rows
        for (adapter_name, device, model_id, version), members in groups.items():
            try:
                adapter = self.get(adapter_name, device)
                load_ms += self.ensure_loaded(adapter, jobs[members[0]], version)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:
                for i in members:
                    outcomes[i] = as_fleet_error(exc)
                continue
            for lo in range(0, len(members), rows):
                chunk = members[lo:lo + rows]
                try:
                    results = adapter.predict_many(model_id, [(jobs[i].inputs, jobs[i].n_steps) for i in chunk])
                except SoftTimeLimitExceeded:
                    raise
                except Exception as exc:
                    results = [as_fleet_error(exc)] * len(chunk)
                for i, res in zip(chunk, results):
                    outcomes[i] = res
        return outcomes, load_ms

    def close(self) -> None:
        for adapter in list(self._adapters.values()):
            try:
                adapter.close()
            except Exception:
                log.exception("closing adapter failed")

"""What one worker process holds: its adapters, its Redis clients, its stats and job records.

Created once per process after the fork (see :mod:`workers.signals`). Tasks call into it; it knows nothing of
Celery, so the same core can sit under another transport (the benchmark drives it directly too).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import redis as redis_lib

from shared.errors import (DeadlineExceededError, FleetError, InvalidInputError, JobCancelledError,
                           ModelNotFoundError, as_fleet_error)
from shared.jobs import JobRecorder
from shared.keys import WORKER_HEARTBEAT_INTERVAL_S, Keys
from shared.schemas import (BatchItemResult, BatchPredictJob, BatchPredictResult, JobErrorBody, LoadJob,
                            ModelInfo, ModelKey, PredictJob, PredictionResult, UnloadJob, UnloadResult)
from shared.settings import FleetSettings
from shared.stats import JobOutcome, StatsWriter
from shared import store_layout
from workers.adapters import create_adapter
from workers.adapters.base import ServingAdapter
from workers.results import Begun, CeleryResultEncoder, FinishedJob, OutcomeWriter

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


class WorkerRuntime:
    """The per-process core under the Celery tasks."""

    def __init__(self, settings: FleetSettings, worker_id: str, *, queues: Sequence[str] = (),
                 redis: Any = None, adapters: dict[tuple[str, str], ServingAdapter] | None = None,
                 result_backend: Any = None) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.queues = list(queues)
        self.redis = redis or redis_lib.Redis.from_url(settings.redis_url, socket_connect_timeout=5,
                                                       socket_timeout=30, health_check_interval=30)
        self.keys = Keys(settings.redis_key_prefix)
        self.stats = StatsWriter(self.redis, self.keys, worker_id)
        self.jobs = JobRecorder(self.redis, self.keys, settings.result_ttl_seconds)
        self.outcomes = OutcomeWriter(self.redis, self.jobs, self.stats,
                                      CeleryResultEncoder(result_backend) if result_backend is not None else None,
                                      settings.result_ttl_seconds)
        self._adapters: dict[tuple[str, str], ServingAdapter] = dict(adapters or {})
        self._lock = threading.RLock()
        self._reported: dict[str, int] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.batcher = None
        if settings.batch.enabled:
            from workers.batching import DynamicBatcher

            self.batcher = DynamicBatcher(self.serve,
                                          settings.batch.max_batch_size, settings.batch.max_batch_delay_ms / 1000)

    # -- adapters --------------------------------------------------------------------------------------------
    def adapter(self, name: str | None = None, device: str | None = None) -> ServingAdapter:
        """The adapter of a pool, created on first use in this process."""
        key = (name or self.settings.serving_adapter_type, device or self.settings.default_device)
        with self._lock:
            if key not in self._adapters:
                self._adapters[key] = create_adapter(key[0], self.settings, key[1])
                log.info("adapter %s on %s ready in process %s", key[0], key[1], os.getpid())
            return self._adapters[key]

    def loaded_models(self) -> list[ModelInfo]:
        return [info for adapter in list(self._adapters.values()) for info in adapter.list_loaded_models()]

    # -- jobs ------------------------------------------------------------------------------------------------
    def ensure_loaded(self, adapter: ServingAdapter, key: ModelKey, version: str | None) -> tuple[bool, float]:
        """Make sure the model is loaded here: (cache hit?, load milliseconds)."""
        touch = getattr(adapter, "touch", None)
        hit = touch(key.model_id) if touch else adapter.is_loaded(key.model_id)
        if hit and version is None:
            return True, 0.0
        started = time.perf_counter()
        path = store_layout.model_dir(self.settings.model_store_dir, key, version)
        adapter.load_model(path, key.symbol, key.timeframe, key.model_type)
        self.publish_state()
        return hit, (time.perf_counter() - started) * 1000

    def load(self, job: LoadJob) -> tuple[ModelInfo, float]:
        adapter = self.adapter(job.adapter, job.device)
        _, load_ms = self.ensure_loaded(adapter, job, job.version)
        info = next(i for i in adapter.list_loaded_models() if i.model_id == job.model_id)
        self.flush([])
        return info, load_ms

    def unload(self, job: UnloadJob) -> UnloadResult:
        adapter = self.adapter(job.adapter, job.device)
        unloaded = adapter.unload_model(job.model_id)
        self.publish_state()
        return UnloadResult(model_id=job.model_id, unloaded=unloaded)

    def _run_predictions(self, jobs: Sequence[PredictJob]) -> tuple[list[PredictionResult | FleetError], float]:
        """Run predict jobs, batching those of one model into shared forwards. Returns (outcomes, load ms)."""
        outcomes: list[PredictionResult | FleetError | None] = [None] * len(jobs)
        groups: dict[tuple[str, str, str, str | None], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            adapter_name = job.adapter or self.settings.serving_adapter_type
            groups[(adapter_name, job.device or self.settings.default_device, job.model_id, job.version)].append(i)
        load_ms = 0.0
        # NOTE: a batch of many jobs runs as forwards of the preferred size: on CPU a forward of 32 rows costs
        # more per row than four of 8 (the benchmark's (a) shows it), and each job still gets its own outcome.
        max_rows = self.settings.batch.forward_rows
        for (adapter_name, device, model_id, version), members in groups.items():
            try:
                adapter = self.adapter(adapter_name, device)
                _, ms = self.ensure_loaded(adapter, jobs[members[0]], version)
                load_ms += ms
            except Exception as exc:
                err = as_fleet_error(exc)
                for i in members:
                    outcomes[i] = err
                continue
            for lo in range(0, len(members), max_rows):
                chunk = members[lo:lo + max_rows]
                try:
                    results = adapter.predict_many(model_id, [(jobs[i].inputs, jobs[i].n_steps) for i in chunk])
                except Exception as exc:
                    results = [as_fleet_error(exc)] * len(chunk)
                for i, res in zip(chunk, results):
                    outcomes[i] = res
        return [o if o is not None else ModelNotFoundError("no outcome") for o in outcomes], load_ms

    def predict_many(self, jobs: Sequence[PredictJob]) -> tuple[list[PredictionResult | FleetError], float]:
        """Run predict jobs (no job records); their stats go to Redis in one round trip."""
        final, load_ms = self._run_predictions(jobs)
        self.flush([JobOutcome(j.model_id, not isinstance(o, FleetError),
                               0.0 if isinstance(o, FleetError) else o.inference_time_ms)
                    for j, o in zip(jobs, final)])
        return final, load_ms

    def serve(self, items: Sequence[tuple[str, PredictJob]], also: Callable[[Any], None] | None = None,
              begun: Begun | None = None) -> list[PredictionResult | FleetError]:
        """Serve predict jobs end to end: two Redis round trips for the whole batch (one with ``begun``).

        The first marks every job running (and reads cancellations), unless the caller did (``begun``); the
        second stores every result, final record, event and the stats. Cancelled and expired jobs fail with
        their typed error without running.
        """
        if begun is None:
            started = time.time()
            cancelled = self.outcomes.begin([job_id for job_id, _ in items], self.worker_id, started)
        else:
            started, cancelled = begun.started_at, begun.cancelled
        outcomes: list[PredictionResult | FleetError | None] = [None] * len(items)
        runnable = []
        for k, ((job_id, job), was_cancelled) in enumerate(zip(items, cancelled)):
            if was_cancelled:
                outcomes[k] = JobCancelledError(f"job {job_id} was cancelled before it started")
            elif job.deadline_passed(started):
                outcomes[k] = DeadlineExceededError(f"job {job_id} waited past its deadline of {job.deadline_s} s")
            else:
                runnable.append(k)
        results, load_ms = self._run_predictions([items[k][1] for k in runnable])
        for k, res in zip(runnable, results):
            outcomes[k] = res
        final = [o if o is not None else ModelNotFoundError("no outcome") for o in outcomes]
        with self._lock:
            deltas = self._cache_deltas()
        self.outcomes.finish([FinishedJob(job_id, job.model_id, out, load_ms)
                              for (job_id, job), out in zip(items, final)], deltas, also)
        return final

    def reject(self, job_id: str, error: FleetError) -> None:
        """Store the failure of a job whose payload could not even be read (no model, no stats)."""
        self.outcomes.finish([FinishedJob(job_id, None, error)], {})

    def batch_predict(self, job: BatchPredictJob, progress: Progress | None = None,
                      cancelled: Callable[[], bool] | None = None) -> tuple[BatchPredictResult, float, float]:
        """Run a batch job in chunks of the pool's max batch size, reporting progress after each chunk."""
        total = len(job.requests)
        items: list[BatchItemResult | None] = [None] * total
        valid: list[tuple[int, PredictJob]] = []
        for i, raw in enumerate(job.requests):
            try:
                merged = {"adapter": job.adapter, "device": job.device, **raw} if isinstance(raw, dict) else raw
                valid.append((i, PredictJob.model_validate(merged)))
            except Exception as exc:
                err = InvalidInputError(f"request {i} is invalid: {_first_error(exc)}", field=f"requests.{i}")
                items[i] = BatchItemResult(index=i, error=JobErrorBody(**err.to_dict()))
        done = total - len(valid)
        load_ms = inference_ms = 0.0
        step = self.settings.batch.max_batch_size
        if progress:
            progress(done, total)
        for lo in range(0, len(valid), step):
            if cancelled and cancelled():
                raise JobCancelledError("batch job cancelled")
            chunk = valid[lo:lo + step]
            started = time.perf_counter()
            results, ms = self.predict_many([j for _, j in chunk])
            load_ms += ms
            inference_ms += (time.perf_counter() - started) * 1000 - ms
            for (i, _), res in zip(chunk, results):
                items[i] = (BatchItemResult(index=i, error=JobErrorBody(**res.to_dict()))
                            if isinstance(res, FleetError) else BatchItemResult(index=i, result=res))
            done += len(chunk)
            if progress:
                progress(done, total)
        final = [it for it in items if it is not None]
        failed = sum(1 for it in final if it.error is not None)
        return (BatchPredictResult(items=final, total=total, succeeded=total - failed, failed=failed),
                load_ms, inference_ms)

    # -- stats -----------------------------------------------------------------------------------------------
    def _cache_deltas(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for adapter in list(self._adapters.values()):
            for k, v in adapter.cache_counters().items():
                totals[k] += v
        deltas = {k: v - self._reported.get(k, 0) for k, v in totals.items()}
        self._reported = dict(totals)
        return deltas

    def flush(self, outcomes: list[JobOutcome]) -> None:
        """Write job outcomes and cache counter deltas in one round trip."""
        with self._lock:
            deltas = self._cache_deltas()
        self.stats.record(outcomes, cache=deltas)

    def publish_state(self) -> None:
        """Heartbeat: loaded models, memory, health and queues of this process (and evictions since)."""
        healthy = all(a.health_check().get("healthy", False) for a in list(self._adapters.values()))
        self.flush([])
        extra = {"batches": self.batcher.batches, "batched_jobs": self.batcher.jobs} if self.batcher else {}
        self.stats.heartbeat(self.loaded_models(), queues=",".join(self.queues), healthy=int(healthy),
                             pid=os.getpid(), **extra)

    def _beat_loop(self) -> None:
        while not self._stop.wait(WORKER_HEARTBEAT_INTERVAL_S):
            try:
                for adapter in list(self._adapters.values()):
                    cache = getattr(adapter, "cache", None)
                    if cache is not None:
                        cache.expire()  # idle TTL evictions happen even when no job arrives
                self.publish_state()
            except Exception:  # a failing heartbeat is logged and retried, never fatal
                log.exception("heartbeat failed")

    def start(self) -> None:
        self.publish_state()
        self._beat = threading.Thread(target=self._beat_loop, name="fleet-heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        self._stop.set()
        if self.batcher is not None:
            self.batcher.close()
        for adapter in list(self._adapters.values()):
            try:
                adapter.close()
            except Exception:
                log.exception("closing adapter failed")
        try:
            self.stats.retire()
        except Exception:
            log.warning("could not retire worker %s from Redis", self.worker_id)


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
    return str(exc)

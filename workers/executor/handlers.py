"""The handler table: what each public task does, on one process's adapter pool.

Each handler returns :class:`FinishedJob` outcomes with their load and inference times; the executor stores
them. Predict jobs come as a list and run as one forward per model (see :meth:`AdapterPool.predict`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ValidationError

from shared import tasks as names
from shared.errors import FleetError, InvalidInputError, JobCancelledError
from shared.schemas import (BatchItemResult, BatchPredictJob, BatchPredictResult, JobErrorBody, LoadJob, PredictJob,
                            UnloadJob, UnloadResult)
from shared.stats import JobOutcome
from workers.executor.outcomes import FinishedJob, OutcomeWriter
from workers.executor.payloads import first_error
from workers.serving.pool import AdapterPool

#: Public task name -> the schema of its ``job`` argument.
SCHEMAS: dict[str, type[BaseModel]] = {
    names.LOAD: LoadJob, names.PREDICT: PredictJob, names.BATCH_PREDICT: BatchPredictJob, names.UNLOAD: UnloadJob,
}


class Handlers:
    """Load, predict, batch_predict and unload on one adapter pool."""

    def __init__(self, pool: AdapterPool, outcomes: OutcomeWriter, cancelled: Callable[[str], bool],
                 models_changed: Callable[[], None], cache_changed: Callable[[], None] | None = None) -> None:
        self.pool = pool
        self.outcomes = outcomes
        self.cancelled = cancelled
        self.models_changed = models_changed
        """After a load or unload job: publish everything this process holds now."""
        self.cache_changed = cache_changed or models_changed
        """After a predict loaded a model on its way: what the router needs now (the rest at the next beat)."""
        self.table: dict[str, Callable[[str, Any], FinishedJob]] = {
            names.LOAD: self.load, names.UNLOAD: self.unload, names.BATCH_PREDICT: self.batch_predict}

    def load(self, job_id: str, job: LoadJob) -> FinishedJob:
        adapter = self.pool.get(job.adapter, job.device)
        load_ms = self.pool.ensure_loaded(adapter, job, job.version)
        self.models_changed()
        info = next(i for i in adapter.list_loaded_models() if i.model_id == job.model_id)
        return FinishedJob(job_id, None, info, load_ms=load_ms)

    def unload(self, job_id: str, job: UnloadJob) -> FinishedJob:
        unloaded = self.pool.get(job.adapter, job.device).unload_model(job.model_id)
        self.models_changed()
        return FinishedJob(job_id, None, UnloadResult(model_id=job.model_id, unloaded=unloaded))

    def predict(self, items: Sequence[tuple[str, PredictJob]]) -> list[FinishedJob]:
        results, load_ms = self.pool.predict([job for _, job in items])
        if load_ms:  # a model came in (and maybe another went): the router should know now, not at the next beat
            self.cache_changed()
        return [FinishedJob(job_id, job.model_id, res, load_ms=load_ms,
                            inference_ms=0.0 if isinstance(res, FleetError) else res.inference_time_ms)
                for (job_id, job), res in zip(items, results)]

    def batch_predict(self, job_id: str, job: BatchPredictJob) -> FinishedJob:
        """Items in chunks of the max batch size; progress (and the chunk's stats) stored after each chunk."""
        total = len(job.requests)
        items: list[BatchItemResult | None] = [None] * total
        valid: list[tuple[int, PredictJob]] = []
        for i, raw in enumerate(job.requests):
            try:
                merged = {"adapter": job.adapter, "device": job.device, **raw} if isinstance(raw, dict) else raw
                valid.append((i, PredictJob.model_validate(merged)))
            except ValidationError as exc:
                err = InvalidInputError(f"request {i} is invalid: {first_error(exc)}", field=f"requests.{i}")
                items[i] = BatchItemResult(index=i, error=JobErrorBody(**err.to_dict()))
        done = total - len(valid)
        load_ms = inference_ms = 0.0
        self.outcomes.progress(job_id, done, total)
        step = self.pool.settings.batch.max_batch_size
        for lo in range(0, len(valid), step):
            if self.cancelled(job_id):
                raise JobCancelledError(f"batch job {job_id} was cancelled after {done} of {total} items")
            chunk = valid[lo:lo + step]
            started = time.perf_counter()
            results, ms = self.pool.predict([j for _, j in chunk])
            load_ms += ms
            inference_ms += (time.perf_counter() - started) * 1000 - ms
            for (i, _), res in zip(chunk, results):
                items[i] = (BatchItemResult(index=i, error=JobErrorBody(**res.to_dict()))
                            if isinstance(res, FleetError) else BatchItemResult(index=i, result=res))
            done += len(chunk)
            self.outcomes.progress(job_id, done, total, [
                JobOutcome.of(j.model_id, r, getattr(r, "inference_time_ms", 0.0))
                for (_, j), r in zip(chunk, results)], self.pool.cache_deltas())
        final = [it for it in items if it is not None]
        failed = sum(1 for it in final if it.error is not None)
        result = BatchPredictResult(items=final, total=total, succeeded=total - failed, failed=failed)
        return FinishedJob(job_id, None, result, load_ms=load_ms, inference_ms=inference_ms)

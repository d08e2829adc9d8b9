"""Enqueueing jobs: validate, check the store, record, send. The routes only decode and encode around this.

The ``queued`` record and the message go in one MULTI (see :func:`submit`): a worker that takes the job at
once always finds a record to update, and with Redis down neither is written and the client gets a 503.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from producer_api.context import ApiContext
from producer_api.errors import validation_error
from shared import celery_wire, routing, store_layout, tasks
from shared.errors import InvalidInputError
from shared.schemas import BatchPredictJob, LoadJob, ModelKey, PredictJob, UnloadJob, model_id_for

#: Job kind (as in :data:`shared.jobs.JOB_KINDS`) -> (payload schema, public task name).
KINDS: dict[str, tuple[type[BaseModel], str]] = {
    "load": (LoadJob, tasks.LOAD),
    "unload": (UnloadJob, tasks.UNLOAD),
    "predict": (PredictJob, tasks.PREDICT),
    "batch_predict": (BatchPredictJob, tasks.BATCH_PREDICT),
}


def _check_finite(job: PredictJob, prefix: str = "") -> None:
    # NOTE: the schema accepts NaN and inf (floats, "NaN" strings, 1e400, NaN in a tensor); no model output
    # is meaningful for them, so they are refused here rather than failing in a worker.
    series = job.inputs.series_array()
    if series is not None and not np.isfinite(series).all():
        field = f"{prefix}inputs.{'tensor' if job.inputs.tensor is not None else 'series'}"
        raise InvalidInputError(f"{field}: values must be finite numbers (no NaN or infinity)", field=field)


def _check_store(ctx: ApiContext, job: LoadJob | PredictJob) -> None:
    # NOTE: only models found are remembered (for STORE_CHECK_TTL_S): a model added to the store is seen at
    # once, and one deleted within the TTL fails its jobs in the worker with the same typed error.
    seen = (job.model_id, job.version)
    if seen in ctx.models_seen:
        return
    key = ModelKey(symbol=job.symbol, timeframe=job.timeframe, model_type=job.model_type)
    store_layout.model_dir(ctx.settings.model_store_dir, key, job.version)  # ModelNotFoundError -> 404
    ctx.models_seen[seen] = True


def _batch_items(job: BatchPredictJob, now: float) -> list[dict[str, Any]]:
    items = []
    for index, raw in enumerate(job.requests):
        try:
            item = PredictJob.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc, prefix=("requests", index)) from None
        _check_finite(item, prefix=f"requests.{index}.")
        item.enqueued_at = now
        items.append(item.model_dump(mode="json"))
    return items


def parse_job(ctx: ApiContext, kind: str, body: Any) -> BaseModel:
    """Validate a decoded body as a ``kind`` job and stamp its enqueue time.

    Raises:
        InvalidInputError: the body or a batch item does not fit the schema, or series values are not finite
            (422, naming the field).
        ModelNotFoundError: a load or predict names a model (or version) the store lacks (404).
    """
    schema, _ = KINDS[kind]
    try:
        job = schema.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    now = time.time()
    if isinstance(job, BatchPredictJob):
        # NOTE: items are normalised here so that a bad one is a 422 now; a model missing from the store fails
        # only its own item, in the worker, like any other per-item error.
        job.requests = _batch_items(job, now)
    if isinstance(job, PredictJob):
        _check_finite(job)
    if isinstance(job, (PredictJob, BatchPredictJob)):
        job.enqueued_at = now
    # An unload must work for a model already deleted from the store, so only loads and predicts are checked.
    if isinstance(job, (LoadJob, PredictJob)):
        _check_store(ctx, job)
    return job


def _model_id(job: BaseModel) -> str:
    if isinstance(job, BatchPredictJob):
        return ",".join(sorted({model_id_for(i["symbol"], i["timeframe"], i["model_type"]) for i in job.requests}))
    return job.model_id  # type: ignore[attr-defined]


async def submit(ctx: ApiContext, kind: str, job: BaseModel, job_id: str | None = None) -> tuple[str, float]:
    """Record and enqueue a validated job in one MULTI; returns its id and enqueue time.

    The message is the one ``send_task`` would write (see :mod:`shared.celery_wire`); writing it with the
    ``queued`` record makes the two atomic: no record without a message, no message without a record.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: Redis is unreachable (503).
    """
    _, task_name = KINDS[kind]
    job_id = job_id or str(uuid.uuid4())
    payload = job.model_dump()
    adapter, device = routing.pool_of(payload.get("adapter"), payload.get("device"), ctx.settings)
    queue = routing.queue_name(adapter, device)
    enqueued_at = payload.get("enqueued_at") or time.time()
    model_id = _model_id(job)
    # kwargsrepr is what Flower shows for the arguments; Celery would saferepr the whole payload, series included.
    list_key, message = celery_wire.task_message(task_name, job_id, {"job": payload}, queue,
                                                 routing.broker_priority(payload.get("priority", 5)),
                                                 kwargsrepr=f"{{'job': <{kind} {model_id}>}}")
    pipe = ctx.redis.pipeline(transaction=True)
    ctx.records.enqueued(pipe, job_id, kind, model_id, adapter, device, queue, enqueued_at)
    pipe.lpush(list_key, message)
    try:
        await pipe.execute()
    except Exception:
        ctx.metrics.jobs.labels(kind=kind, status="rejected").inc()
        raise
    ctx.metrics.jobs.labels(kind=kind, status="queued").inc()
    return job_id, enqueued_at

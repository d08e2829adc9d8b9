"""Enqueueing jobs: validate, bound, check the store, record, send. The routes only decode and encode around this.

Bounds come before the work they spare: a series over its rows or channels is refused from the decoded body's
list lengths, before pydantic builds a float per value; a job whose result would hold more than
``API_MAX_RESULT_VALUES`` numbers is refused before it is sent. The ``queued`` record (naming the job's owner)
and the message go in one MULTI (see :func:`submit`): a worker that takes the job at once always finds a record
to update, and with Redis down neither is written and the client gets a 503.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from producer_api.context import ApiContext
from producer_api.errors import validation_error
from producer_api.security.principal import Principal
from shared import celery_wire, routing, store_layout, tasks
from shared.errors import InvalidInputError, ModelNotFoundError
from shared.schemas import (MAX_CHANNELS, MAX_N_STEPS, MAX_SERIES_ROWS, BatchPredictJob, LoadJob, ModelKey, PredictJob,
                            UnloadJob, model_id_for)

#: Job kind (as in :data:`shared.jobs.JOB_KINDS`) -> (payload schema, public task name).
KINDS: dict[str, tuple[type[BaseModel], str]] = {
    "load": (LoadJob, tasks.LOAD),
    "unload": (UnloadJob, tasks.UNLOAD),
    "predict": (PredictJob, tasks.PREDICT),
    "batch_predict": (BatchPredictJob, tasks.BATCH_PREDICT),
}
#: Kinds whose message the router sends to a process holding (or best placed for) their one model.
ROUTED_KINDS = frozenset({"predict", "load"})
#: The field naming where a body of each kind holds series rows (see :func:`producer_api.body.read_body`).
ROW_FIELDS = {"predict": "inputs.series", "batch_predict": "requests"}
#: Numbers per text in a sentiment result: one probability per class (negative, neutral, positive).
SENTIMENT_CLASSES = 3
_UNSEEN = object()  # a model not in ctx.models_seen (None there means "found, horizon unknown")


def _check_series_bounds(body: Any, prefix: str = "") -> None:
    """Refuse a series over its row or channel bound from the decoded body, before pydantic sees it.

    NOTE: the schema bounds the same, but only after building a float per value: a row of a million zeros
    would cost ~40 MB and a second of CPU before its 422. Lengths of the decoded lists cost nothing.
    """
    inputs = body.get("inputs") if isinstance(body, dict) else None
    series = inputs.get("series") if isinstance(inputs, dict) else None
    if not isinstance(series, list):
        return  # absent or not a list: the schema says what is wrong
    field = f"{prefix}inputs.series"
    if len(series) > MAX_SERIES_ROWS:
        raise InvalidInputError(f"{field}: {len(series)} rows; at most {MAX_SERIES_ROWS} are allowed", field=field)
    for index, row in enumerate(series):
        if isinstance(row, list) and len(row) > MAX_CHANNELS:
            raise InvalidInputError(f"{field}.{index}: {len(row)} channels; at most {MAX_CHANNELS} are allowed",
                                    field=f"{field}.{index}")


def _check_finite(job: PredictJob, prefix: str = "") -> None:
    # NOTE: the schema accepts NaN and inf (floats, "NaN" strings, NaN in a tensor); no model output is
    # meaningful for them, so they are refused here rather than failing in a worker.
    series = job.inputs.series_array()
    if series is not None and not np.isfinite(series).all():
        field = f"{prefix}inputs.{'tensor' if job.inputs.tensor is not None else 'series'}"
        raise InvalidInputError(f"{field}: values must be finite numbers (no NaN or infinity)", field=field)


def _check_store(ctx: ApiContext, job: LoadJob | PredictJob) -> int | None:
    """Check that the job's model is in the store; returns its horizon (``prediction_length``) when its config
    tells it, which is the ``n_steps`` a worker forecasts when the job gives none."""
    # NOTE: only models found are remembered (for STORE_CHECK_TTL_S): a model added to the store is seen at
    # once, and one deleted within the TTL fails its jobs in the worker with the same typed error.
    seen = (job.model_id, job.version)
    known = ctx.models_seen.get(seen, _UNSEEN)  # one lookup: an entry may expire between two
    if known is not _UNSEEN:
        return known
    key = ModelKey(symbol=job.symbol, timeframe=job.timeframe, model_type=job.model_type)
    found = store_layout.model_dir(ctx.settings.model_store_dir, key, job.version)  # ModelNotFoundError -> 404
    horizon = _horizon(found) if key.model_type.is_forecaster else None
    ctx.models_seen[seen] = horizon
    return horizon


def _horizon(model_dir: Path) -> int | None:
    try:
        value = store_layout.read_json(model_dir / store_layout.CONFIG_FILE).get("prediction_length")
    except (OSError, ValueError, InvalidInputError):
        return None  # the worker reports a broken config when it loads the model; the bound assumes the worst
    return value if isinstance(value, int) and value > 0 else None


def _result_values(job: PredictJob, horizon: int | None) -> int:
    """How many numbers the job's result holds: n_steps x channels (texts x classes for sentiment).

    Without ``n_steps`` a worker forecasts the model's horizon; when the store does not tell it, the estimate
    takes the longest forecast the schema admits (:data:`MAX_N_STEPS`).
    """
    if job.inputs.texts is not None:
        return len(job.inputs.texts) * SENTIMENT_CLASSES
    return (job.n_steps or horizon or MAX_N_STEPS) * (job.inputs.channels or 1)


def _check_result_size(ctx: ApiContext, values: int, field: str) -> None:
    bound = ctx.settings.api_max_result_values
    if values > bound:
        raise InvalidInputError(
            f"{field}: the result would hold {values} values (items x n_steps x channels; without n_steps the "
            f"model's horizon, or {MAX_N_STEPS} when the store does not tell it), over API_MAX_RESULT_VALUES="
            f"{bound}; ask for fewer steps or split the job", field=field)


def _batch_items(ctx: ApiContext, job: BatchPredictJob, now: float) -> list[dict[str, Any]]:
    items = []
    values = 0
    for index, raw in enumerate(job.requests):
        prefix = f"requests.{index}"
        _check_series_bounds(raw, prefix=f"{prefix}.")
        try:
            item = PredictJob.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc, prefix=("requests", index)) from None
        _check_finite(item, prefix=f"{prefix}.")
        try:
            horizon = _check_store(ctx, item)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{prefix}: {exc.message}", field=prefix) from None
        values += _result_values(item, horizon)
        item.enqueued_at = now
        items.append(item.model_dump(mode="json"))
    _check_result_size(ctx, values, "requests")
    return items


def parse_job(ctx: ApiContext, kind: str, body: Any) -> BaseModel:
    """Validate a decoded body as a ``kind`` job and stamp its enqueue time.

    Raises:
        InvalidInputError: the body or a batch item does not fit the schema, series values are not finite, or
            the result would be larger than ``API_MAX_RESULT_VALUES`` (422, naming the field).
        ModelNotFoundError: a load, predict or batch item names a model (or version) the store lacks (404; a
            batch item's field is ``requests.<i>``).
    """
    schema, _ = KINDS[kind]
    if schema is PredictJob:
        _check_series_bounds(body)
    try:
        job = schema.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    now = time.time()
    if isinstance(job, BatchPredictJob):
        # NOTE: items are normalised here so that a bad one (or one whose model the store lacks) is refused
        # now, naming its index, rather than failing in a worker.
        job.requests = _batch_items(ctx, job, now)
    if isinstance(job, PredictJob):
        _check_finite(job)
    if isinstance(job, (PredictJob, BatchPredictJob)):
        job.enqueued_at = now
    # An unload must work for a model already deleted from the store, so only loads and predicts are checked.
    if isinstance(job, (LoadJob, PredictJob)):
        horizon = _check_store(ctx, job)
        if isinstance(job, PredictJob):
            _check_result_size(ctx, _result_values(job, horizon), "n_steps")
    return job


def _model_id(job: BaseModel) -> str:
    if isinstance(job, BatchPredictJob):
        return ",".join(sorted({model_id_for(i["symbol"], i["timeframe"], i["model_type"]) for i in job.requests}))
    return job.model_id  # type: ignore[attr-defined]


async def submit(ctx: ApiContext, kind: str, job: BaseModel, principal: Principal,
                 job_id: str | None = None) -> tuple[str, float]:
    """Record and enqueue a validated job in one MULTI; returns its id and enqueue time.

    The message is the one ``send_task`` would write (see :mod:`shared.celery_wire`), pushed to the list the
    router picks (:class:`shared.routing.JobRouter`); writing it with the ``queued`` record makes the two
    atomic: no record without a message, no message without a record. The record names ``principal`` as the
    job's owner: only it (or an admin) may read or cancel the job.

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
    priority = routing.broker_priority(payload.get("priority", 5))
    _, message = celery_wire.task_message(task_name, job_id, {"job": payload}, queue, priority,
                                          kwargsrepr=f"{{'job': <{kind} {model_id}>}}")
    pipe = ctx.redis.pipeline(transaction=True)
    ctx.records.enqueued(pipe, job_id, kind, model_id, adapter, device, queue, enqueued_at, owner=principal.name)
    # A predict or a load goes where its model is (or is best placed); a batch (many models) and an unload
    # (every holder's business) go to the pool queue.
    ctx.router.route(pipe, queue, model_id if kind in ROUTED_KINDS else None, message, priority)
    try:
        await pipe.execute()
    except Exception:
        ctx.metrics.jobs.labels(kind=kind, status="rejected").inc()
        raise
    ctx.metrics.jobs.labels(kind=kind, status="queued").inc()
    return job_id, enqueued_at

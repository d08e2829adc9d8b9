"""The job document: one view of a job joined from its fleet record and Celery's result.

Sources: the record hash ``Keys.job(id)`` (see :mod:`shared.jobs`) and Celery's result meta
``celery-task-meta-<id>``. Status precedence, kept simple:

1. A terminal Celery state wins: ``SUCCESS`` -> succeeded; ``FAILURE`` -> failed, except a
   ``JobCancelledError`` (cancelled) and a ``DeadlineExceededError`` (expired: the job waited in the queue past
   its deadline); ``REVOKED`` -> cancelled. So a job cancelled while running that still finishes reads
   succeeded.
2. Else a final record status (``cancelled`` written by ``DELETE /v1/jobs/{id}``).
3. Else ``running`` when Celery says STARTED/PROGRESS/RETRY, otherwise the record's status (``queued``).

No record and no Celery meta means unknown (404). A record that expired while its result lives on still
reads from the result alone (kind, worker and timings are then null).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

import orjson
from pydantic import BaseModel, Field

from shared.jobs import FINAL_STATUSES
from shared.schemas import JobErrorBody

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
_CELERY_RUNNING = frozenset({"STARTED", "PROGRESS", "RETRY"})
_STATUS_BY_ERROR = {"JobCancelledError": "cancelled", "DeadlineExceededError": "expired"}


class Progress(BaseModel):
    """Items done out of total (batch jobs)."""

    done: int
    total: int


class Timings(BaseModel):
    """Milliseconds; null while unknown. queued = started - enqueued, total = finished - enqueued."""

    queued_ms: float | None = None
    load_ms: float | None = None
    inference_ms: float | None = None
    total_ms: float | None = None


class JobDocument(BaseModel):
    """What ``GET /v1/jobs/{id}`` answers."""

    job_id: str
    kind: str | None = None
    status: JobStatus
    progress: Progress | None = None
    result: Any = None
    """The task's result: ``ModelInfo``, ``PredictionResult``, ``BatchPredictResult`` or ``UnloadResult``."""
    error: JobErrorBody | None = None
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    adapter: str | None = None
    device: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


def decode_meta(raw: Any) -> dict[str, Any] | None:
    """Celery's JSON result meta, or None when absent or unreadable (a foreign serializer, say)."""
    if raw is None:
        return None
    try:
        meta = orjson.loads(raw)
    except (ValueError, TypeError):
        log.warning("unreadable Celery result meta: %.200r", raw)
        return None
    return meta if isinstance(meta, dict) else None


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in raw.items()}


def _num(record: Mapping[str, str], name: str) -> float | None:
    try:
        return float(record[name]) if record.get(name) else None
    except ValueError:
        return None


def _span_ms(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000.0, 3) if start is not None and end is not None else None


def _celery_error(meta: Mapping[str, Any]) -> JobErrorBody:
    exc = meta.get("result")
    if not isinstance(exc, dict):
        return JobErrorBody(type="InternalError", message=str(exc))
    raw = exc.get("exc_message", "")
    if isinstance(raw, (list, tuple)):
        message = str(raw[0]) if len(raw) == 1 else " ".join(str(part) for part in raw)
    else:
        message = str(raw)
    kind = str(exc.get("exc_type") or "InternalError")
    if meta.get("status") == "REVOKED":  # Celery's TaskRevokedError: to clients it is a cancellation
        kind = "JobCancelledError"
    return JobErrorBody(type=kind, message=message)


def _record_error(record: Mapping[str, str]) -> JobErrorBody | None:
    try:
        return JobErrorBody.model_validate_json(record["error"]) if record.get("error") else None
    except ValueError:
        return None


def _progress(record: Mapping[str, str], meta: Mapping[str, Any] | None) -> Progress | None:
    if meta and meta.get("status") == "PROGRESS" and isinstance(meta.get("result"), dict):
        try:
            return Progress.model_validate(meta["result"])
        except ValueError:
            pass
    done, total = _num(record, "progress_done"), _num(record, "progress_total")
    return Progress(done=int(done), total=int(total)) if done is not None and total is not None else None


def _status(record: Mapping[str, str], meta: Mapping[str, Any] | None, error: JobErrorBody | None) -> JobStatus:
    state = meta.get("status") if meta else None
    if state == "SUCCESS":
        return "succeeded"
    if state == "REVOKED":
        return "cancelled"
    if state == "FAILURE":
        return _STATUS_BY_ERROR.get(error.type if error else "", "failed")  # type: ignore[return-value]
    recorded = record.get("status") or "queued"
    if recorded in FINAL_STATUSES:
        return recorded  # type: ignore[return-value]
    if state in _CELERY_RUNNING:
        return "running"
    return recorded if recorded in ("queued", "running") else "queued"  # type: ignore[return-value]


def build_document(job_id: str, record: Mapping[str, str], meta: Mapping[str, Any] | None) -> JobDocument | None:
    """Join a decoded record and Celery meta into a document; None when the job is unknown."""
    if not record and not meta:
        return None
    state = meta.get("status") if meta else None
    error = _celery_error(meta) if meta and state in ("FAILURE", "REVOKED") else None
    status = _status(record, meta, error)
    if error is None and status in ("failed", "cancelled", "expired"):
        error = _record_error(record)
    enqueued = _num(record, "enqueued_at")
    return JobDocument(
        job_id=job_id,
        kind=record.get("kind") or None,
        status=status,
        progress=_progress(record, meta),
        result=meta.get("result") if meta and state == "SUCCESS" else None,
        error=error,
        timings=Timings(
            queued_ms=_span_ms(enqueued, _num(record, "started_at")),
            load_ms=_num(record, "load_ms"),
            inference_ms=_num(record, "inference_ms"),
            total_ms=_span_ms(enqueued, _num(record, "finished_at")),
        ),
        worker=record.get("worker") or None,
        adapter=record.get("adapter") or None,
        device=record.get("device") or None,
    )

"""Job records: what the fleet knows about a job besides Celery's result.

The producer creates the record when it enqueues (kind, model, pool, enqueue time); the worker adds the
running state, progress, timings and the worker id, and publishes every change on the job's event channel.
Celery's result backend keeps the result or the error; the API joins both into the job document.

Record fields (all strings in one Redis hash): ``kind``, ``model_id``, ``adapter``, ``device``, ``queue``,
``owner`` (the name of the API key that submitted the job), ``status`` (queued | running | succeeded | failed |
cancelled), ``enqueued_at``, ``started_at``, ``finished_at`` (unix seconds), ``worker``, ``load_ms``,
``inference_ms``, ``progress_done``, ``progress_total``, ``deliveries`` (how many times a worker took the job),
``error`` (JSON ``{type, message}``). :data:`RECORD_FIELDS` lists them.

One writer per field: the producer writes the first six and ``enqueued_at``; the worker's begin script
(:mod:`workers.executor.begin`) ``running``, ``worker``, ``started_at`` and ``deliveries``; the worker's outcome
writer the rest; the API only the ``cancelled`` state (status, ``finished_at``, ``error``) of a job it cancels
while queued, which the begin script then treats as ended. A job without ``owner`` (sent by a plain Celery
producer) is visible to admin keys only.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared.keys import Keys

JOB_KINDS = ("load", "predict", "batch_predict", "unload")
#: Every field of a job record, producer's first (see the module docstring for who writes which).
RECORD_FIELDS = ("kind", "model_id", "adapter", "device", "queue", "owner", "status", "enqueued_at", "started_at",
                 "finished_at", "worker", "load_ms", "inference_ms", "progress_done", "progress_total",
                 "deliveries", "error")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "expired"})


def event_message(job_id: str, status: str, **extra: Any) -> str:
    """The JSON pushed on a job's event channel for one state change."""
    return json.dumps({"job_id": job_id, "status": status, "ts": time.time(), **extra})


class JobRecorder:
    """Writes job records with a synchronous Redis client (workers, CLI); one round trip per call."""

    def __init__(self, redis: Any, keys: Keys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl_seconds

    def _write(self, job_id: str, fields: dict[str, Any], event: str | None, pipe: Any = None) -> None:
        """Write fields (and publish the event) now, or add the commands to ``pipe`` for the caller to run."""
        key = self.keys.job(job_id)
        own = pipe is None
        pipe = self.redis.pipeline(transaction=True) if own else pipe
        pipe.hset(key, mapping={k: ("" if v is None else v) for k, v in fields.items()})
        pipe.expire(key, self.ttl)
        if event:
            extra = {}
            if "progress_done" in fields:
                extra["progress"] = {"done": fields["progress_done"], "total": fields["progress_total"]}
            if "error" in fields and fields["error"]:
                extra["error"] = json.loads(fields["error"])
            pipe.publish(self.keys.job_events(job_id), event_message(job_id, event, **extra))
        if own:
            pipe.execute()

    def progress(self, job_id: str, done: int, total: int, pipe: Any = None) -> None:
        self._write(job_id, {"progress_done": done, "progress_total": total}, "progress", pipe)

    def finished(self, job_id: str, ok: bool, *, load_ms: float = 0.0, inference_ms: float = 0.0,
                 error: dict[str, Any] | None = None, status: str | None = None, pipe: Any = None) -> None:
        status = status or ("succeeded" if ok else "failed")
        self._write(job_id, {"status": status, "finished_at": time.time(), "load_ms": round(load_ms, 3),
                             "inference_ms": round(inference_ms, 3),
                             "error": json.dumps(error) if error else ""}, status, pipe)

"""Job records from the API side: the asyncio twin of :class:`shared.jobs.JobRecorder`.

Same hash, same field names, same events: the API writes the ``queued`` record with the message and the
``cancelled`` state on ``DELETE``; workers write the rest. Reads fetch the record and Celery's result meta in
one round trip so that a document is never joined from two moments.
"""

from __future__ import annotations

import json
import time
from typing import Any

from producer_api.jobdoc import JobDocument, build_document, decode_hash, decode_meta
from shared.errors import JobNotFoundError
from shared.jobs import event_message
from shared.keys import Keys

#: The error a job cancelled by a client carries (as workers would record it).
CANCELLED_ERROR = {"type": "JobCancelledError", "message": "the job was cancelled by a client"}


class JobRecords:
    """Writes and reads job records with an asyncio Redis client; each public method is one round trip."""

    def __init__(self, redis: Any, keys: Keys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl_seconds

    def enqueued(self, pipe: Any, job_id: str, kind: str, model_id: str, adapter: str, device: str, queue: str,
                 enqueued_at: float) -> None:
        """Add the ``queued`` record and event to ``pipe`` (the MULTI that also enqueues the job), field for
        field as :meth:`JobRecorder.enqueued` writes them."""
        key = self.keys.job(job_id)
        pipe.hset(key, mapping={"kind": kind, "model_id": model_id, "adapter": adapter, "device": device,
                                "queue": queue, "status": "queued", "enqueued_at": enqueued_at})
        pipe.expire(key, self.ttl)
        pipe.publish(self.keys.job_events(job_id), event_message(job_id, "queued"))

    async def cancel(self, job_id: str) -> None:
        """Flag the job for workers, mark its record cancelled and publish the ``cancelled`` event, atomically."""
        key = self.keys.job(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.job_cancelled(job_id), 1, ex=self.ttl)
        pipe.hset(key, mapping={"status": "cancelled", "finished_at": time.time(),
                                "error": json.dumps(CANCELLED_ERROR)})
        pipe.expire(key, self.ttl)
        pipe.publish(self.keys.job_events(job_id), event_message(job_id, "cancelled", error=CANCELLED_ERROR))
        await pipe.execute()

    async def document(self, job_id: str) -> JobDocument | None:
        """The job document now (record + Celery meta, read together); None for an unknown job."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.keys.job(job_id))
        pipe.get(self.keys.celery_result(job_id))
        record, meta = await pipe.execute()
        return build_document(job_id, decode_hash(record or {}), decode_meta(meta))

    async def require(self, job_id: str) -> JobDocument:
        """The job document now; :class:`JobNotFoundError` (404) for an unknown job."""
        doc = await self.document(job_id)
        if doc is None:
            raise JobNotFoundError(f"no job {job_id!r} (never enqueued, or its record expired)", field="job_id")
        return doc

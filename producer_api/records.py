"""Job records from the API side: the asyncio twin of :class:`shared.jobs.JobRecorder`.

Same hash, same field names, same events: the API writes the ``queued`` record (with the job's ``owner``) with
the message, and the ``cancelled`` state of a job it cancels while queued; workers write the rest. Reads fetch
the record and Celery's result meta in one round trip so that a document is never joined from two moments.

Every read of a job by id starts with :meth:`JobRecords.require` (or :meth:`JobRecords.cancel`): the id's format
is checked, and a job the caller does not own answers exactly as an unknown one, 404.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any

import orjson
from redis.exceptions import WatchError

from producer_api.errors import JobFinishedError
from producer_api.jobdoc import JobDocument, build_document, decode_hash, decode_meta
from producer_api.security.principal import Principal
from shared.errors import BrokerUnavailableError, InvalidInputError, JobCancelledError, JobNotFoundError
from shared.jobs import event_message
from shared.keys import Keys

#: What a job id may be: the API's UUIDs, and the safe ids a Celery producer may choose as task ids.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The error a job cancelled by a client carries (as workers would record it).
CANCELLED_ERROR = {"type": "JobCancelledError", "message": "the job was cancelled by a client"}
#: Tries of the cancel transaction: each lost race means a worker changed the record meanwhile, which it does
#: only a few times per job (running, then progress per chunk), so a handful of tries always suffices.
CANCEL_ATTEMPTS = 8


def check_job_id(job_id: str) -> str:
    """``job_id`` when it can be a job id; :class:`InvalidInputError` (422) naming ``job_id`` otherwise."""
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidInputError(f"job_id: {job_id[:140]!r} is not a job id (1-128 characters of letters, digits, "
                                "'.', '_', ':' or '-'; the API's own ids are UUIDs)", field="job_id")
    return job_id


def _not_found(job_id: str) -> JobNotFoundError:
    return JobNotFoundError(f"no job {job_id!r} (never enqueued, or its record expired)", field="job_id")


def _cancelled_meta(job_id: str) -> bytes:
    """Celery's result meta of a job cancelled while queued, as its Redis backend (JSON) stores a failure, so
    that a plain Celery client waiting on the job gets its typed error too."""
    exc = {"exc_type": JobCancelledError.__name__, "exc_message": [CANCELLED_ERROR["message"]],
           "exc_module": JobCancelledError.__module__}
    return orjson.dumps({"status": "FAILURE", "result": exc, "traceback": None, "children": [],
                         "date_done": datetime.now(timezone.utc).isoformat(), "task_id": job_id})


class JobRecords:
    """Writes and reads job records with an asyncio Redis client; each public method is one round trip
    (a cancel: one transaction)."""

    def __init__(self, redis: Any, keys: Keys, ttl_seconds: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl = ttl_seconds

    def enqueued(self, pipe: Any, job_id: str, kind: str, model_id: str, adapter: str, device: str, queue: str,
                 enqueued_at: float, owner: str) -> None:
        """Add the ``queued`` record and event to ``pipe`` (the MULTI that also enqueues the job), field for
        field as :class:`shared.jobs.JobRecorder` names them; ``owner`` is the name of the submitting key."""
        key = self.keys.job(job_id)
        pipe.hset(key, mapping={"kind": kind, "model_id": model_id, "adapter": adapter, "device": device,
                                "queue": queue, "status": "queued", "enqueued_at": enqueued_at, "owner": owner})
        pipe.expire(key, self.ttl)
        pipe.publish(self.keys.job_events(job_id), event_message(job_id, "queued"))

    async def _read(self, job_id: str) -> tuple[dict[str, str], dict[str, Any] | None]:
        """The decoded record and Celery meta, read together."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.keys.job(job_id))
        pipe.get(self.keys.celery_result(job_id))
        record, meta = await pipe.execute()
        return decode_hash(record or {}), decode_meta(meta)

    async def document(self, job_id: str) -> JobDocument | None:
        """The job document now (record + Celery meta, read together); None for an unknown job.

        NOTE: no ownership check: only for a job the caller was let see by :meth:`require` (watches re-read).
        """
        return build_document(job_id, *(await self._read(job_id)))

    @staticmethod
    def _visible(job_id: str, record: dict[str, str], meta: dict[str, Any] | None,
                 principal: Principal) -> JobDocument:
        doc = build_document(job_id, record, meta)
        # NOTE: no owner (a job sent by a plain Celery producer, or a record expired before its result) is
        # owned by nobody: only admins see it. Another key's job reads as unknown, so ids cannot be probed.
        if doc is None or not principal.owns(record.get("owner") or None):
            raise _not_found(job_id)
        return doc

    async def require(self, job_id: str, principal: Principal) -> JobDocument:
        """The job document now, for ``principal``.

        Raises:
            InvalidInputError: ``job_id`` cannot be a job id (422).
            JobNotFoundError: no such job, or one that ``principal`` does not own (404, the same answer).
        """
        check_job_id(job_id)
        return self._visible(job_id, *(await self._read(job_id)), principal)

    async def cancel(self, job_id: str, principal: Principal) -> tuple[JobDocument, bool]:
        """Cancel a job; returns its document after the cancel and whether this call ended it.

        The cancel flag is always set: workers honour it before a job starts and between batch items. A job
        whose record still says queued is also marked cancelled (record, Celery result, event) in the same
        transaction, WATCHed on the record and result so that a worker beginning the job meanwhile makes this
        try again (the job is running then). A running job keeps running until its worker notices the flag or
        finishes: its final status is whatever the worker records.

        Raises:
            InvalidInputError, JobNotFoundError: as :meth:`require`.
            JobFinishedError: the job already ended (409); nothing was written.
        """
        check_job_id(job_id)
        key, meta_key = self.keys.job(job_id), self.keys.celery_result(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(CANCEL_ATTEMPTS):
                try:
                    await pipe.watch(key, meta_key)
                    # In immediate mode after WATCH: each read answers at once, and any write to the two keys
                    # before EXEC makes EXEC fail (WatchError) instead of applying a stale decision.
                    record, meta = await pipe.hgetall(key), await pipe.get(meta_key)
                    doc = self._visible(job_id, decode_hash(record or {}), decode_meta(meta), principal)
                    if doc.final:
                        raise JobFinishedError(f"job {job_id} is already {doc.status}; it can no longer be "
                                               "cancelled", field="job_id")
                    queued = doc.status == "queued"
                    pipe.multi()
                    pipe.set(self.keys.job_cancelled(job_id), 1, ex=self.ttl)
                    if queued:
                        self._mark_cancelled(pipe, job_id)
                    await pipe.execute()
                except WatchError:
                    continue
                return (await self.document(job_id) or doc) if queued else doc, queued
        raise BrokerUnavailableError(f"job {job_id} kept changing while it was being cancelled; try again")

    def _mark_cancelled(self, pipe: Any, job_id: str) -> None:
        key, meta_key = self.keys.job(job_id), self.keys.celery_result(job_id)
        pipe.hset(key, mapping={"status": "cancelled", "finished_at": time.time(),
                                "error": json.dumps(CANCELLED_ERROR)})
        pipe.expire(key, self.ttl)
        meta = _cancelled_meta(job_id)
        pipe.set(meta_key, meta, ex=self.ttl)
        pipe.publish(meta_key, meta)  # what Celery's result consumer listens on
        pipe.publish(self.keys.job_events(job_id), event_message(job_id, "cancelled", error=CANCELLED_ERROR))

"""Jobs, transport-neutral: enqueue one (and wait for its end), read one (waiting), cancel one.

The REST routes (:mod:`producer_api.routes.submit`, :mod:`producer_api.routes.jobs`) and the gRPC job service
(:mod:`producer_api.grpc.jobs`) both call these, so a job submitted or cancelled either way is recorded, sent,
counted and revoked the same way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid

from pydantic import BaseModel

from producer_api.context import ApiContext
from producer_api.enqueue import submit
from producer_api.jobdoc import JobDocument
from producer_api.security.principal import Principal
from producer_api.watch import JobWatch

log = logging.getLogger(__name__)


async def enqueue(c: ApiContext, kind: str, job: BaseModel, principal: Principal,
                  wait: float | None = None) -> tuple[str, JobDocument | None]:
    """Record and send a validated ``kind`` job; with ``wait``, await its end for at most that many seconds.

    Returns:
        The job id, and its final document when it ended within ``wait`` (None otherwise, or without a wait).
    """
    if wait is None:
        job_id, _ = await submit(c, kind, job, principal)
        return job_id, None
    job_id = str(uuid.uuid4())
    # Subscribed (and confirmed) before the job exists: its end cannot slip by unseen.
    async with JobWatch(c.channels, c.records, job_id, principal) as watch:
        _, enqueued_at = await submit(c, kind, job, principal, job_id)
        doc, _ = await watch.until_final(wait, first=JobDocument(job_id=job_id, kind=kind, status="queued"))
    if not doc.final:
        return job_id, None
    c.metrics.job_latency.labels(kind=kind).observe(max(0.0, time.time() - enqueued_at))
    return job_id, doc


async def read(c: ApiContext, job_id: str, principal: Principal, wait: float | None = None) -> JobDocument:
    """The job's document; with ``wait``, the final one if the job ends within that many seconds.

    Raises:
        InvalidInputError: not a job id (422). JobNotFoundError: unknown, or not ``principal``'s (404).
    """
    if wait is None:
        return await c.records.require(job_id, principal)
    async with JobWatch(c.channels, c.records, job_id, principal) as watch:
        doc, was_final = await watch.until_final(wait)
    if doc.final and not was_final:  # this caller saw the job end: one end-to-end sample
        enqueued_at = await c.redis.hget(c.keys.job(job_id), "enqueued_at")
        if enqueued_at:
            c.metrics.job_latency.labels(kind=doc.kind or "unknown").observe(
                max(0.0, time.time() - float(enqueued_at)))
    return doc


async def cancel(c: ApiContext, job_id: str, principal: Principal) -> tuple[JobDocument, bool]:
    """Cancel a job: a queued one at once (True), a running one by request (False: its worker records the end).

    Raises:
        InvalidInputError, JobNotFoundError: as :func:`read`. JobFinishedError: the job already ended (409).
    """
    doc, cancelled = await c.records.cancel(job_id, principal)
    if not cancelled:
        c.metrics.jobs.labels(kind=doc.kind or "unknown", status="cancel_requested").inc()
        return doc, False
    # NOTE: the cancel flag (set with the record) is what workers honour; the revoke only spares a queued message
    # a trip through a worker, so its failure is logged, not raised. It never terminates a running job: that
    # would kill a worker process holding models.
    revoke = functools.partial(c.celery.control.revoke, job_id)
    try:
        await asyncio.get_running_loop().run_in_executor(None, revoke)
    except Exception as exc:
        log.warning("revoke of job %s failed (the cancel flag stands): %s", job_id, exc)
    c.metrics.jobs.labels(kind=doc.kind or "unknown", status="cancelled").inc()
    return doc, True

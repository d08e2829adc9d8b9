"""Job documents: read one (optionally waiting for it to end) and cancel one.

Every job is read through :meth:`JobRecords.require` or a :class:`JobWatch`, with the caller's principal: a job
of another key answers 404, as an unknown one does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from aiohttp import web

from producer_api.body import wait_param
from producer_api.context import ctx
from producer_api.responses import CancelRequested, json_document
from producer_api.security.principal import principal_of
from producer_api.watch import JobWatch

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.get("/v1/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    c, job_id, principal = ctx(request), request.match_info["id"], principal_of(request)
    wait = wait_param(request)
    if wait is None:
        return json_document(await c.records.require(job_id, principal))
    async with JobWatch(c.channels, c.records, job_id, principal) as watch:
        doc, was_final = await watch.until_final(wait)
    if doc.final and not was_final:  # this request saw the job end: one end-to-end sample
        enqueued_at = await c.redis.hget(c.keys.job(job_id), "enqueued_at")
        if enqueued_at:
            c.metrics.job_latency.labels(kind=doc.kind or "unknown").observe(
                max(0.0, time.time() - float(enqueued_at)))
    return json_document(doc)


@routes.delete("/v1/jobs/{id}")
async def cancel_job(request: web.Request) -> web.Response:
    """A queued job is cancelled at once (200, its cancelled document); a running one is asked to stop (202, its
    document now with ``cancel_requested``): its worker records how it ends. A final one is a 409."""
    c, job_id = ctx(request), request.match_info["id"]
    doc, cancelled = await c.records.cancel(job_id, principal_of(request))
    if not cancelled:
        c.metrics.jobs.labels(kind=doc.kind or "unknown", status="cancel_requested").inc()
        return json_document(CancelRequested(**doc.model_dump()), status=202)
    # NOTE: the cancel flag (set with the record) is what workers honour; the revoke only spares a queued message
    # a trip through a worker, so its failure is logged, not raised. It never terminates a running job: that
    # would kill a worker process holding models.
    revoke = functools.partial(c.celery.control.revoke, job_id)
    try:
        await asyncio.get_running_loop().run_in_executor(None, revoke)
    except Exception as exc:
        log.warning("revoke of job %s failed (the cancel flag stands): %s", job_id, exc)
    c.metrics.jobs.labels(kind=doc.kind or "unknown", status="cancelled").inc()
    return json_document(doc)

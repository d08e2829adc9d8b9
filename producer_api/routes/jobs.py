"""Job documents: read one (optionally waiting for it to end) and cancel one.

Every job is read with the caller's principal (:mod:`producer_api.service.jobs`): a job of another key answers
404, as an unknown one does.
"""

from __future__ import annotations

from aiohttp import web

from producer_api.body import wait_param
from producer_api.context import ctx
from producer_api.responses import CancelRequested, json_document
from producer_api.security.principal import principal_of
from producer_api.service import jobs

routes = web.RouteTableDef()


@routes.get("/v1/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    return json_document(await jobs.read(ctx(request), request.match_info["id"], principal_of(request),
                                         wait_param(request)))


@routes.delete("/v1/jobs/{id}")
async def cancel_job(request: web.Request) -> web.Response:
    """A queued job is cancelled at once (200, its cancelled document); a running one is asked to stop (202, its
    document now with ``cancel_requested``): its worker records how it ends. A final one is a 409."""
    doc, cancelled = await jobs.cancel(ctx(request), request.match_info["id"], principal_of(request))
    if cancelled:
        return json_document(doc)
    return json_document(CancelRequested(**doc.model_dump()), status=202)

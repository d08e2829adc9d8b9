"""WebSocket ``/v1/jobs/{id}/events``: the job document now, then at each change, closed after the final one.

Sockets are bounded, together with gRPC ``WatchJob`` streams (:mod:`producer_api.service.streams`):
``API_MAX_WEBSOCKETS_PER_KEY`` per API key (429 before the upgrade) and ``API_MAX_WEBSOCKETS`` per API process
(503), and each is closed after ``API_WEBSOCKET_MAX_SECONDS`` or when its
job's record expires, so that no socket holds a subscription (and a re-read every few seconds) forever.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from producer_api.context import ctx
from producer_api.jobdoc import JobDocument
from producer_api.security.principal import principal_of
from producer_api.watch import JobWatch
from shared.errors import JobNotFoundError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: Seconds between pings, so that a vanished client is noticed and its subscription dropped.
HEARTBEAT_S = 30.0


async def _send_changes(ws: web.WebSocketResponse, watch: JobWatch, first: JobDocument) -> None:
    await ws.send_json(first.model_dump(mode="json"))
    async for doc in watch.changes(first):
        await ws.send_json(doc.model_dump(mode="json"))


async def _until_client_leaves(ws: web.WebSocketResponse) -> None:
    async for msg in ws:  # clients have nothing to say; this only notices a close
        if msg.type == WSMsgType.ERROR:
            return


async def _close(ws: web.WebSocketResponse, sender: asyncio.Task, done: set[asyncio.Task], job_id: str) -> None:
    """Close with what ended the stream: the final document or the client (normal), expiry, age, or a failure."""
    failure = sender.exception() if sender in done else None
    if not done:  # neither the job ended nor the client left: the socket's time is up
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER,
                       message=b"open for API_WEBSOCKET_MAX_SECONDS; reconnect to go on watching")
    elif failure is None:
        await ws.close()
    elif isinstance(failure, JobNotFoundError):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"the job's record expired")
    else:
        # NOTE: the socket is open: the JSON error middleware cannot answer any more, so say it in the close.
        log.warning("event stream of job %s failed: %s", job_id, failure)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"event stream failed; see the job document")


@routes.get("/v1/jobs/{id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    c, principal = ctx(request), principal_of(request)
    with c.streams.hold(principal):  # 429 / 503 before anything else, the upgrade included
        async with JobWatch(c.channels, c.records, request.match_info["id"], principal) as watch:
            # Subscribed before reading, and read before upgrading: an unknown job is a plain JSON 404.
            first = await watch.current()
            ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S)
            await ws.prepare(request)
            c.websockets.add(ws)
            try:
                sender = asyncio.create_task(_send_changes(ws, watch, first))
                reader = asyncio.create_task(_until_client_leaves(ws))
                try:
                    done, _ = await asyncio.wait({sender, reader}, timeout=c.settings.api_websocket_max_seconds,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (sender, reader):
                        task.cancel()  # a task already done keeps its outcome
                    await asyncio.gather(sender, reader, return_exceptions=True)
                await _close(ws, sender, done, watch.job_id)
            finally:
                c.websockets.discard(ws)
    return ws

"""WebSocket ``/v1/jobs/{id}/events``: the job document now, then at each change, closed after the final one."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from producer_api.context import ctx
from producer_api.jobdoc import JobDocument
from producer_api.watch import JobWatch

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


@routes.get("/v1/jobs/{id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    c = ctx(request)
    async with JobWatch(c.channels, c.records, request.match_info["id"]) as watch:
        # Subscribed before reading, and read before upgrading: an unknown job is a plain JSON 404.
        first = await watch.current()
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        c.websockets.add(ws)
        sender = asyncio.create_task(_send_changes(ws, watch, first))
        reader = asyncio.create_task(_until_client_leaves(ws))
        try:
            await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, reader):
                task.cancel()
            await asyncio.gather(sender, reader, return_exceptions=True)
        if sender.done() and not sender.cancelled() and sender.exception() is not None:
            # NOTE: the socket is open: the JSON error middleware cannot answer any more, so say it in the close.
            log.warning("event stream of job %s failed: %s", watch.job_id, sender.exception())
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"event stream failed; see the job document")
        else:
            await ws.close()
    return ws

"""WebSocket ``/v1/jobs/{id}/events``: the job document now, then at each change, closed after the final one.

Sockets are bounded: ``API_MAX_WEBSOCKETS_PER_KEY`` per API key (429 before the upgrade) and
``API_MAX_WEBSOCKETS`` per API process (503), and each is closed after ``API_WEBSOCKET_MAX_SECONDS`` or when its
job's record expires, so that no socket holds a subscription (and a re-read every few seconds) forever.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from aiohttp import WSCloseCode, WSMsgType, web

from producer_api.context import ctx
from producer_api.jobdoc import JobDocument
from producer_api.security.principal import Principal, principal_of
from producer_api.watch import JobWatch
from shared.errors import FleetError, JobNotFoundError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

#: Seconds between pings, so that a vanished client is noticed and its subscription dropped.
HEARTBEAT_S = 30.0


class TooManySocketsError(FleetError):
    """The API key holds ``API_MAX_WEBSOCKETS_PER_KEY`` event sockets already; close one first."""

    http_status = 429
    retryable = True


class SocketsExhaustedError(FleetError):
    """This API process holds ``API_MAX_WEBSOCKETS`` event sockets already; retry later."""

    http_status = 503
    retryable = True


class SocketSlots:
    """Open event sockets of one app, counted overall and per key.

    A slot is taken before anything is awaited (the check and the count are one step), so that concurrent
    upgrades cannot overshoot the caps. Without authentication every caller is the same anonymous one: only the
    overall cap applies then.
    """

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self.held: Counter[str] = Counter()

    @contextmanager
    def hold(self, principal: Principal) -> Iterator[None]:
        """Hold one slot for ``principal`` while the block runs.

        Raises:
            TooManySocketsError: the key's cap is reached (429).
            SocketsExhaustedError: the process's cap is reached (503).
        """
        name = principal.name
        if principal.authenticated and self.held[name] >= self.per_key:
            raise TooManySocketsError(f"API key {name!r} holds {self.held[name]} event sockets, the most "
                                      f"API_MAX_WEBSOCKETS_PER_KEY allows; close one first")
        if sum(self.held.values()) >= self.total:
            raise SocketsExhaustedError(f"this API process holds {self.total} event sockets, the most "
                                        "API_MAX_WEBSOCKETS allows; retry later")
        self.held[name] += 1
        try:
            yield
        finally:
            self.held[name] -= 1
            if not self.held[name]:
                del self.held[name]


# NOTE: one per app, made on its first socket: the app is frozen by then and takes no new state of its own.
_SLOTS: weakref.WeakKeyDictionary[web.Application, SocketSlots] = weakref.WeakKeyDictionary()


def slots_of(request: web.Request) -> SocketSlots:
    """The socket slots of the app serving ``request``."""
    slots = _SLOTS.get(request.app)
    if slots is None:
        settings = ctx(request).settings
        slots = _SLOTS[request.app] = SocketSlots(settings.api_max_websockets, settings.api_max_websockets_per_key)
    return slots


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
    with slots_of(request).hold(principal):  # 429 / 503 before anything else, the upgrade included
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

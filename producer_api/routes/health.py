"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web

from producer_api import fleetview
from producer_api.context import ctx
from producer_api.errors import NotReadyError
from producer_api.metrics import CONTENT_TYPE
from producer_api.responses import Health
from shared import routing

routes = web.RouteTableDef()
metrics_routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process serves requests; nothing else is checked (a liveness probe must not depend on Redis)."""
    return web.json_response(Health(status="ok").model_dump(exclude_none=True))


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Redis answers, and every configured pool (``POOLS``) has a live worker consuming its queue."""
    c = ctx(request)
    await c.redis.ping()  # unreachable Redis -> 503 BrokerUnavailableError through the middleware
    try:
        required = routing.pools_from_spec(c.settings.pools)
    except ValueError as exc:
        raise NotReadyError(f"POOLS is invalid: {exc}", field="pools") from None
    by_queue, unhealthy = await fleetview.workers_by_queue(c.redis, c.keys)
    missing = [queue for queue in required if not by_queue.get(queue)]
    if missing:
        why = [f"{queue}: " + ("; ".join(f"{w} unhealthy: {r}" for w, r in unhealthy[queue].items())
                               if unhealthy.get(queue) else "no live worker")
               for queue in missing]
        raise NotReadyError(f"pools not ready: {' | '.join(why)}", field="pools")
    return web.json_response(Health(status="ready", workers={q: len(by_queue[q]) for q in required}).model_dump())


@metrics_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    c = ctx(request)
    body = await c.metrics.render(c.redis, c.keys)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

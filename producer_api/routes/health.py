"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web

from producer_api.context import ctx
from producer_api.metrics import CONTENT_TYPE
from producer_api.responses import Health
from producer_api.service.health import readiness

routes = web.RouteTableDef()
metrics_routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process serves requests; nothing else is checked (a liveness probe must not depend on Redis)."""
    return web.json_response(Health(status="ok").model_dump(exclude_none=True))


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Redis answers, and every configured pool (``POOLS``) has a live worker consuming its queue."""
    workers = await readiness(ctx(request))
    return web.json_response(Health(status="ready", workers=workers).model_dump())


@metrics_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    c = ctx(request)
    body = await c.metrics.render(c.redis, c.keys)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

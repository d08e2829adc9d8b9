"""HTTP routes, one module per concern. Handlers only decode, delegate and encode (errors: see
:mod:`producer_api.errors`)."""

from __future__ import annotations

from aiohttp import web

from shared.settings import FleetSettings


def tables(settings: FleetSettings) -> list[web.RouteTableDef]:
    """The route tables to mount for ``settings`` (``/metrics`` only when metrics are enabled)."""
    from producer_api.routes import deadletters, docs, events, health, jobs, keys, models, oip, submit

    found = [submit.routes, jobs.routes, events.routes, models.routes, keys.routes, deadletters.routes, health.routes,
             oip.routes, docs.routes]
    if settings.enable_metrics:
        found.append(health.metrics_routes)
    return found

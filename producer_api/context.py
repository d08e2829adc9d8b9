"""What every handler needs, built once per app by :func:`producer_api.app.create_app`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from producer_api.metrics import ApiMetrics
from producer_api.records import JobRecords
from shared.keys import Keys
from shared.settings import FleetSettings


@dataclass
class ApiContext:
    """The app's settings and clients.

    Attributes:
        settings: The fleet settings the app was built with.
        redis: An asyncio Redis client (``redis.asyncio.Redis`` or fakeredis' twin).
        celery: A Celery app used only as a producer (``send_task``, ``control.revoke``), called in threads.
        keys: Fleet key names under the settings' prefix.
        records: Job record reads and writes.
        metrics: The app's own Prometheus registry and metrics.
        websockets: Open event sockets, closed on shutdown.
    """

    settings: FleetSettings
    redis: Any
    celery: Any
    keys: Keys
    records: JobRecords
    metrics: ApiMetrics
    websockets: weakref.WeakSet = field(default_factory=weakref.WeakSet)


CTX = web.AppKey("fleet_context", ApiContext)


def ctx(request: web.Request) -> ApiContext:
    """The context of the app serving ``request``."""
    return request.app[CTX]

"""What every handler needs, built once per app by :func:`producer_api.app.create_app`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cachetools import TTLCache

from producer_api.metrics import ApiMetrics
from producer_api.records import JobRecords
from producer_api.security.keystore import KeyStore
from producer_api.service.streams import SocketSlots
from producer_api.watch import JobChannels
from shared.keys import Keys
from shared.routing import JobRouter
from shared.settings import FleetSettings

#: Seconds a model found in the store is not looked up again.
STORE_CHECK_TTL_S = 5.0


@dataclass
class ApiContext:
    """The app's settings and clients.

    Attributes:
        settings: The fleet settings the app was built with.
        redis: An asyncio Redis client (``redis.asyncio.Redis`` or fakeredis' twin).
        celery: A Celery app used only for ``control.revoke`` (called in a thread); jobs are enqueued by
            :func:`producer_api.enqueue.submit` in the MULTI that records them.
        keys: Fleet key names under the settings' prefix.
        records: Job record reads and writes.
        channels: The shared pub/sub connection that job watches (``?wait``, event sockets) subscribe on.
        metrics: The app's own Prometheus registry and metrics.
        keystore: API keys (``/v1/keys`` manages them; the auth middleware checks them).
        guard: What the auth middleware and the gRPC interceptor check keys and rate limits with (None with
            ``API_AUTH_ENABLED=false``).
        streams: Open event streams (WebSockets and gRPC ``WatchJob``), capped per key and per process.
        websockets: Open event sockets, closed on shutdown.
        router: Decides which list each job's message goes to (cache-aware routing, ``shared.routing``).
        models_seen: ``(model id, version)`` found in the store lately: a predict checks the disk once per
            model per :data:`STORE_CHECK_TTL_S`, not once per request.
    """

    settings: FleetSettings
    redis: Any
    celery: Any
    keys: Keys
    records: JobRecords
    channels: JobChannels
    metrics: ApiMetrics
    keystore: KeyStore
    guard: Any
    streams: SocketSlots
    router: JobRouter
    websockets: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    models_seen: TTLCache = field(default_factory=lambda: TTLCache(maxsize=4096, ttl=STORE_CHECK_TTL_S))


CTX = web.AppKey("fleet_context", ApiContext)


def ctx(request: web.Request) -> ApiContext:
    """The context of the app serving ``request``."""
    return request.app[CTX]

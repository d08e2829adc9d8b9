"""The producer API's app factory.

The API is a thin producer: it validates requests, writes job records, sends Celery messages by task name and
reads results and stats straight from Redis. It never imports torch or :mod:`workers` (a unit test checks).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import WSCloseCode, web
from celery import Celery
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from producer_api import routes
from producer_api.context import CTX, ApiContext
from producer_api.errors import error_middleware
from producer_api.metrics import ApiMetrics
from producer_api.records import JobRecords
from producer_api.security.keystore import KeyStore, static_keys
from producer_api.security.middleware import Guard, auth_middleware
from producer_api.security.ratelimit import RateLimits
from producer_api.service.streams import SocketSlots
from producer_api.watch import JobChannels
from shared.celery_app import create_celery_app
from shared.keys import Keys
from shared.routing import JobRouter
from shared.settings import FleetSettings, get_settings

#: Seconds to wait for a TCP connection to Redis: an unreachable Redis must be a prompt 503, not a hang.
REDIS_CONNECT_TIMEOUT_S = 1.0
#: Seconds to wait for one Redis reply (pub/sub waits are unbounded on the socket, bounded by their caller).
REDIS_SOCKET_TIMEOUT_S = 5.0


def create_redis(settings: FleetSettings) -> Redis:
    """The API's asyncio Redis client: short timeouts and one immediate retry (a stale pooled connection).

    NOTE: waiting requests share one pub/sub connection (:class:`JobChannels`); the pool, sized by
    ``API_REDIS_MAX_CONNECTIONS``, serves the commands of requests in flight and blocks (briefly) rather than
    failing when it runs dry.
    """
    from shared import redis_options

    pool = BlockingConnectionPool.from_url(
        redis_options.url(settings), **redis_options.client_kwargs(settings),
        max_connections=settings.api_redis_max_connections, timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S, socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1))
    return Redis(connection_pool=pool)


def create_producer_celery(settings: FleetSettings) -> Celery:
    """The fleet's Celery app, tuned for a producer that must fail fast."""
    app = create_celery_app(settings, name="finsight-fleet-api")
    app.conf.update(
        # NOTE: the API reads results from Redis itself. Celery's Redis result backend would SUBSCRIBE to the
        # result channel of every task sent and never read it, growing a pub/sub buffer without end.
        result_backend="disabled://",
        broker_connection_timeout=REDIS_CONNECT_TIMEOUT_S,
        broker_connection_retry=False,
        broker_transport_options={
            **app.conf.broker_transport_options,
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
            # kombu's default is to retry connecting for seconds; one quick retry, then a 503.
            "max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
        },
    )
    return app


def create_app(settings: FleetSettings | None = None, redis: Any = None, celery_app: Any = None) -> web.Application:
    """Build the API.

    Args:
        settings: Fleet settings; the process-wide ones when omitted.
        redis: An asyncio Redis client (tests pass ``fakeredis.aioredis.FakeRedis``); one is built from
            ``settings.redis_url`` and closed with the app when omitted.
        celery_app: Anything with ``control.revoke`` (tests pass a recorder); a producer Celery app from
            :func:`create_producer_celery` when omitted.

    Returns:
        The aiohttp application, ready for ``web.run_app`` or a test client.
    """
    settings = settings or get_settings()
    owned_redis = redis is None
    owned_celery = celery_app is None
    redis = create_redis(settings) if owned_redis else redis
    celery_app = create_producer_celery(settings) if owned_celery else celery_app
    keys = Keys(settings.redis_key_prefix)
    keystore = KeyStore(redis, keys, settings.api_key_cache_seconds,
                        static=static_keys(settings.api_keys_file, settings.api_metrics_key_file))
    guard = Guard(keystore, RateLimits(redis, keys.rate_limits(), settings.api_rate_limit,
                                       settings.api_rate_limits)) if settings.api_auth_enabled else None
    app = web.Application(client_max_size=settings.api_max_body_bytes,
                          middlewares=[error_middleware, auth_middleware(guard)],
                          handler_args={"auto_decompress": False})
    channels = JobChannels(redis, keys.api_watch_idle())
    app[CTX] = ApiContext(settings=settings, redis=redis, celery=celery_app, keys=keys,
                          records=JobRecords(redis, keys, settings.result_ttl_seconds), channels=channels,
                          metrics=ApiMetrics(), keystore=keystore, guard=guard,
                          streams=SocketSlots(settings.api_max_websockets, settings.api_max_websockets_per_key),
                          router=JobRouter(keys, settings))
    for table in routes.tables(settings):
        app.add_routes(table)
    if settings.api_grpc_port is not None:
        from producer_api.grpc.server import attach

        attach(app, settings.api_grpc_host, settings.api_grpc_port)
    app.on_shutdown.append(_close_websockets)

    async def _close_clients(app: web.Application) -> None:
        await channels.close()
        if owned_redis:
            await redis.aclose()
        if owned_celery:
            await asyncio.get_running_loop().run_in_executor(None, celery_app.close)

    app.on_cleanup.append(_close_clients)
    return app


async def _close_websockets(app: web.Application) -> None:
    # Event sockets would otherwise hold the shutdown until their jobs end.
    for ws in list(app[CTX].websockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

"""The API's gRPC server: one ``grpc.aio`` server on the API process's event loop, beside the HTTP one.

It serves :mod:`producer_api.grpc.inference` (KServe v2), :mod:`producer_api.grpc.jobs` (the fleet's job service)
and the standard ``grpc.health.v1.Health`` service (public, like ``/healthz``), sharing the app's
:class:`~producer_api.context.ApiContext`: the same Redis pool, pub/sub watches, keys, rate limits and stream caps.
:func:`attach` starts it with the aiohttp app and stops it, gracefully, before the app's clients close.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from producer_api.context import CTX, ApiContext
from producer_api.grpc import handlers
from producer_api.grpc import inference as inference_service
from producer_api.grpc import jobs as job_service

log = logging.getLogger(__name__)

#: Seconds calls in flight get to finish when the API stops.
GRACE_S = 5.0
#: Services the health service reports on ("" is the server as a whole).
SERVICES = ("", inference_service.SERVICE.full_name, job_service.SERVICE.full_name)


class GrpcServer:
    """The started server, its port, and its health servicer (set NOT_SERVING as it stops)."""

    def __init__(self, api: ApiContext, host: str, port: int) -> None:
        settings = api.settings
        # NOTE: the same bound as an HTTP body; answers carry up to API_MAX_RESULT_VALUES float32s plus framing.
        options = [("grpc.max_receive_message_length", settings.api_max_body_bytes),
                   ("grpc.max_send_message_length", settings.api_max_result_values * 8 + 2**20),
                   ("grpc.so_reuseport", 0)]  # a port in use must fail the start, not be shared
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers((
            handlers.generic_handler(api, inference_service.SERVICE, inference_service.InferenceServicer(),
                                     inference_service.METHODS),
            handlers.generic_handler(api, job_service.SERVICE, job_service.JobServicer(), job_service.METHODS),
        ))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = f"{host}:{port}"
        self.port = self.server.add_insecure_port(self.address)
        if not self.port:
            raise OSError(f"gRPC could not listen on {self.address}")

    async def start(self) -> None:
        await self.server.start()
        for name in SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s", self.address)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(GRACE_S)


@dataclass
class GrpcSlot:
    """Where an app keeps its gRPC server once started (the app is frozen by then; the slot is not)."""

    server: GrpcServer | None = None


GRPC = web.AppKey("fleet_grpc", GrpcSlot)


def attach(app: web.Application, host: str, port: int) -> None:
    """Run a gRPC server on ``host:port`` (0: a free port) for as long as ``app`` runs; ``app[GRPC]`` holds it.

    NOTE: started in the app's start-up, on its running event loop (a ``grpc.aio`` server belongs to one loop), and
    stopped first among its clean-ups, before the Redis clients it uses close.
    """
    slot = app[GRPC] = GrpcSlot()

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        server = GrpcServer(app[CTX], host, port)
        await server.start()
        slot.server = server
        try:
            yield
        finally:
            slot.server = None
            await server.stop()

    app.cleanup_ctx.append(lifetime)

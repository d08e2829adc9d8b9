"""``fleet api``: the producer API. It imports what it runs inside its body and never imports torch."""

from __future__ import annotations

import logging

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on, HTTP and gRPC (loopback by default; 0.0.0.0 in a container, behind its "
                   "network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve gRPC (Open Inference Protocol, job service, health) on this port; 0: any free port. "
                   "Default: API_GRPC_PORT, unset: no gRPC.")
def api(host: str, port: int, grpc_port: int | None) -> None:
    """Run the producer API (HTTP + WebSocket with aiohttp, and gRPC when asked)."""
    from aiohttp import web

    from producer_api.app import create_app
    from shared.settings import get_settings

    settings = get_settings()
    if grpc_port is not None or settings.api_grpc_port is not None:
        settings = settings.model_copy(update={"api_grpc_host": host, "api_grpc_port": (
            grpc_port if grpc_port is not None else settings.api_grpc_port)})
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(create_app(settings), host=host, port=port, access_log_format='%a "%r" %s %b %Tfs')

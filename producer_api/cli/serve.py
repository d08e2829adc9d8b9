"""``fleet api``: the producer API. It imports what it runs inside its body and never imports torch."""

from __future__ import annotations

import logging

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (loopback by default; 0.0.0.0 in a container, behind its network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
def api(host: str, port: int) -> None:
    """Run the producer API (HTTP + WebSocket) with aiohttp."""
    from aiohttp import web

    from producer_api.app import create_app
    from shared.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    web.run_app(create_app(settings), host=host, port=port, access_log_format='%a "%r" %s %b %Tfs')


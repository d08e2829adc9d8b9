"""``fleet worker`` and ``fleet flower``: start a worker pool or the Flower dashboard."""

from __future__ import annotations

import os
import uuid

import click

from shared.routing import ADAPTERS, DEVICES, queue_name


def worker_argv(adapter: str, device: str, concurrency: int, pool: str, loglevel: str,
                name: str | None = None) -> list[str]:
    """The ``celery worker`` arguments of one pool: exactly its queue, a unique node name."""
    node = name or f"{adapter}-{device}-{uuid.uuid4().hex[:6]}@%h"
    return ["worker", "-Q", queue_name(adapter, device), "-c", str(concurrency), "-P", pool,
            "-n", node, "-l", loglevel, "-E", "--without-gossip", "--without-mingle"]


@click.command()
@click.option("--adapter", type=click.Choice(ADAPTERS), default=None,
              help="Adapter this pool serves (SERVING_ADAPTER_TYPE by default).")
@click.option("--device", type=click.Choice(DEVICES), default=None, help="Device (DEFAULT_DEVICE by default).")
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes; default: one per core.")
@click.option("--engine", type=click.Choice(["batching", "celery"]), default=None,
              help="batching: consumers that take a batch per fetch (the default, WORKER_ENGINE). "
                   "celery: Celery's own worker (-P picks its pool).")
@click.option("--pool", "-P", type=click.Choice(["prefork", "threads", "solo"]), default="prefork",
              help="Celery engine only: its execution pool.")
@click.option("--loglevel", "-l", default=None, help="Log level (LOG_LEVEL by default).")
@click.option("--name", "-n", default=None, help="Node name (unique by default).")
def worker(adapter: str | None, device: str | None, concurrency: int | None, engine: str | None, pool: str,
           loglevel: str | None, name: str | None) -> None:
    """Run a worker pool that consumes exactly the queue infer.<adapter>.<device>."""
    from shared.routing import pool_of
    from shared.settings import get_settings
    from workers.process import cpu_count

    settings = get_settings()
    adapter, device = pool_of(adapter, device, settings)
    loglevel = loglevel or settings.log_level
    if (engine or settings.worker_engine) == "batching":
        from workers.engines.batching.supervisor import run  # imported here: only this subcommand needs workers

        run(adapter, device, concurrency or cpu_count(), loglevel, name)
        return
    concurrency = concurrency or (1 if pool == "solo" else cpu_count())
    from workers.app import app  # imported here: only this subcommand needs torch

    app.worker_main(worker_argv(adapter, device, concurrency, pool, loglevel, name))


@click.command()
@click.option("--port", type=int, default=5555)
@click.option("--address", default="127.0.0.1")
def flower(port: int, address: str) -> None:
    """Run the Flower dashboard against the fleet's broker, behind basic auth (FLOWER_BASIC_AUTH=user:password).

    Flower's API can shut workers down and revoke jobs; it never runs open, and never with its unauthenticated
    API (which would also let any web page in a local browser call it: no CORS or CSRF checks without auth).
    """
    from shared.settings import get_settings

    if get_settings().flower_basic_auth is None or ":" not in get_settings().flower_basic_auth.get_secret_value():
        raise click.ClickException("Flower needs credentials: set FLOWER_BASIC_AUTH=user:password "
                                   "(`fleet up` makes them for you)")
    if os.environ.get("FLOWER_UNAUTHENTICATED_API", "").lower() in ("1", "true", "yes", "on"):
        raise click.ClickException("FLOWER_UNAUTHENTICATED_API opens Flower's control API to anyone; unset it")
    from shared.celery_app import app

    # Flower reads FLOWER_BASIC_AUTH from the environment itself: the password never shows in `ps`.
    app.start(["flower", f"--port={port}", f"--address={address}"])

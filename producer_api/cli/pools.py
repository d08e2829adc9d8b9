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
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes (prefork) or threads; default: one per core.")
@click.option("--pool", "-P", type=click.Choice(["prefork", "threads", "solo"]), default="prefork")
@click.option("--loglevel", "-l", default=None, help="Log level (LOG_LEVEL by default).")
@click.option("--name", "-n", default=None, help="Celery node name (unique by default).")
@click.option("--batching/--no-batching", default=None,
              help="Dynamic batching of predict jobs (BATCH_ENABLED by default); runs the thread pool.")
@click.option("--engine", type=click.Choice(["celery", "direct"]), default="celery", show_default=True,
              help="celery: a Celery worker. direct: batch consumers reading the queue directly (-c processes).")
def worker(adapter: str | None, device: str | None, concurrency: int | None, pool: str,
           loglevel: str | None, name: str | None, batching: bool | None, engine: str) -> None:
    """Run a worker pool that consumes exactly the queue infer.<adapter>.<device>."""
    from shared.settings import get_settings

    if batching is not None:
        os.environ["BATCH_ENABLED"] = "true" if batching else "false"
        get_settings.cache_clear()
    settings = get_settings()
    adapter = adapter or settings.serving_adapter_type
    device = device or settings.default_device
    from workers.process import cpu_count

    if engine == "direct":
        from workers.direct import run  # imported here: only this subcommand needs torch

        run(adapter, device, concurrency or cpu_count(), loglevel or settings.log_level)
        return
    if settings.batch.enabled:
        # NOTE: one process; its task threads feed the batcher, so the thread count bounds the batch size.
        # Run one such worker per core (each gets one torch thread) to use every core.
        pool = "threads"
        concurrency = concurrency or settings.batch.max_batch_size
    concurrency = concurrency or (1 if pool == "solo" else cpu_count())
    from workers.app import app  # imported here: only this subcommand needs torch

    app.worker_main(worker_argv(adapter, device, concurrency, pool, loglevel or settings.log_level, name))


@click.command()
@click.option("--port", type=int, default=5555)
@click.option("--address", default="127.0.0.1")
def flower(port: int, address: str) -> None:
    """Run the Flower dashboard against the fleet's broker."""
    from shared.celery_app import app

    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    app.start(["flower", f"--port={port}", f"--address={address}"])

"""Entry point of the direct-consumer engine: one consumer per process, N processes, one torch thread each."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from typing import Any

from shared.routing import queue_name
from shared.settings import FleetSettings

log = logging.getLogger(__name__)


def consume(adapter: str, device: str, processes: int) -> None:
    """Run one consumer in this process until SIGTERM/SIGINT."""
    from workers import process
    from workers.consumer import DirectConsumer

    queue = queue_name(adapter, device)
    process.node["processes"] = processes
    process.node["hostname"] = f"direct-{adapter}-{device}@{os.uname().nodename}"
    runtime = process.init_process(queues=[queue])
    settings: FleetSettings = runtime.settings
    consumer = DirectConsumer(runtime, queue, settings.batch.max_batch_size, 2 * settings.job_time_limit_seconds)
    consumer.install_signal_handlers()
    try:
        consumer.run()
    finally:
        process.shutdown_process()


def run(adapter: str, device: str, processes: int, loglevel: str) -> None:
    """Start ``processes`` consumers (forked before torch is imported) and supervise them."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(processName)s %(message)s")
    if processes <= 1:
        consume(adapter, device, 1)
        return
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=consume, args=(adapter, device, processes), name=f"consumer-{i}")
                for i in range(processes)]
    for child in children:
        child.start()

    def forward(signum: int, _: Any) -> None:
        for child in children:
            if child.is_alive() and child.pid:
                os.kill(child.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for child in children:
        child.join()

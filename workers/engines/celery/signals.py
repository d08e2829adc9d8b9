"""Celery signal hooks: per-process set-up after the fork, and clean shutdown.

A failing hook is logged and never kills the pool: a process whose adapter cannot start reports itself
unhealthy in its heartbeat instead.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (celeryd_init, task_received, worker_process_init, worker_process_shutdown, worker_ready,
                            worker_shutdown)

from workers import process
from workers.engines.celery import holdings

log = logging.getLogger(__name__)


@celeryd_init.connect
def _remember_node(sender: str | None = None, instance: Any = None, options: dict | None = None, **_: Any) -> None:
    """Runs in the parent before the fork: children inherit the node's name, queues and process count."""
    options = options or {}
    if sender:
        process.node["hostname"] = sender
    queues = options.get("queues") or []
    if isinstance(queues, str):
        queues = [q for q in queues.split(",") if q]
    process.node["queues"] = list(queues)
    process.node["processes"] = processes_sharing_cores(options.get("pool"), options.get("concurrency"))


def processes_sharing_cores(pool: Any, concurrency: Any) -> int:
    """How many job runners share the cores: prefork children, or the threads of a thread pool (solo: 1).

    NOTE: Celery hands ``pool`` over as the pool class (``celery.concurrency.prefork.TaskPool``), not its name.
    """
    name = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}"
    name = (name or "prefork").lower()
    runners = int(concurrency or process.cpu_count())
    return runners if any(kind in name for kind in ("prefork", "processes", "thread")) else 1


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    try:
        process.init_process()
    except Exception:
        log.exception("worker process set-up failed; jobs will retry it")


@worker_ready.connect
def _init_single_process(sender: Any = None, **_: Any) -> None:
    """Solo and thread pools have no child processes: set the runtime up in the worker itself."""
    if sender is not None and getattr(sender, "hostname", None):
        process.node["hostname"] = sender.hostname
    pool = getattr(sender, "pool", None)
    if pool is not None and "prefork" not in type(pool).__module__:
        try:
            process.init_process()
        except Exception:
            log.exception("worker set-up failed; jobs will retry it")


@worker_ready.connect
def _start_holdings(sender: Any = None, **_: Any) -> None:
    """The main process records what it reserves and reaps lost workers (see ``holdings``)."""
    try:
        holdings.start(getattr(sender, "hostname", None) or process.node.get("hostname") or "celery")
    except Exception:
        log.exception("recording deliveries for the reaper failed to start; lost workers wait for the timeout")


@task_received.connect
def _hold(request: Any = None, **_: Any) -> None:
    """Runs in the main process as a message is received: it is held until acknowledged."""
    if request is not None:
        holdings.hold(getattr(request.message, "delivery_tag", None), request.id, request.name)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    holdings.stop()
    process.shutdown_process()

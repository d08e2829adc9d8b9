"""Per-process set-up: the one :class:`WorkerRuntime` of this process, torch threads, worker identity.

Celery signals call :func:`init_process` after the fork (prefork children) or at worker start (solo and
thread pools); tasks call :func:`get_runtime`, which also builds the runtime lazily if no signal did (for
example under ``celery.contrib.testing.worker``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Sequence

from shared.settings import FleetSettings, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_runtime = None  # type: ignore[var-annotated]
_runtime_pid: int | None = None
#: Filled in the parent before the fork (``celeryd_init``) so that children inherit them.
node = {"hostname": socket.gethostname(), "queues": [], "processes": 1}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads_for(settings: FleetSettings, processes: int) -> int:
    """Threads per process so that processes x threads never exceeds the cores (oversubscription costs 10x)."""
    if settings.worker_torch_threads:
        return settings.worker_torch_threads
    return max(1, cpu_count() // max(1, processes))


def worker_id() -> str:
    return f"{node['hostname']}|{os.getpid()}"


def init_process(settings: FleetSettings | None = None, queues: Sequence[str] | None = None):
    """Build this process's runtime (idempotent per process) and set torch's thread count."""
    global _runtime, _runtime_pid
    with _lock:
        if _runtime is not None and _runtime_pid == os.getpid():
            return _runtime
        import torch  # NOTE: imported here, in the worker process, after the fork

        from workers.runtime import WorkerRuntime

        settings = settings or get_settings()
        threads = torch_threads_for(settings, int(node["processes"]))
        torch.set_num_threads(threads)
        queues = list(queues if queues is not None else node["queues"])
        from shared.celery_app import app  # the worker's app: its backend encodes results for the predict path

        runtime = WorkerRuntime(settings, worker_id(), queues=queues, result_backend=app.backend)
        for queue in queues:
            try:
                from shared.routing import parse_queue_name

                runtime.adapter(*parse_queue_name(queue))
            except Exception as exc:  # a pool that cannot set up stays up and reports itself unhealthy
                log.error("adapter for %s failed to start in process %s: %s", queue, os.getpid(), exc)
        runtime.start()
        log.info("worker process %s ready: %d torch thread(s), queues %s", worker_id(), threads, queues)
        _runtime, _runtime_pid = runtime, os.getpid()
        return runtime


def get_runtime():
    """The runtime of this process, built on first use."""
    if _runtime is None or _runtime_pid != os.getpid():
        return init_process()
    return _runtime


def shutdown_process() -> None:
    global _runtime
    with _lock:
        if _runtime is not None and _runtime_pid == os.getpid():
            _runtime.close()
            _runtime = None

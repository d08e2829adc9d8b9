"""Per-process set-up: one :class:`ProcessContext` per worker process, built after the fork.

Both engines call :func:`init_process` in each process that runs jobs (Celery's prefork children through its
signals, the batching engine's consumers at their start); Celery tasks call :func:`current`, which also builds
the context lazily if no signal did (for example under ``celery.contrib.testing.worker``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import redis as redis_lib

from shared import redis_options
from shared.settings import FleetSettings, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_context: "ProcessContext | None" = None
_context_pid: int | None = None
#: Filled in the parent before the fork (``celeryd_init``, the batching supervisor) so that children inherit them.
node: dict[str, Any] = {"hostname": socket.gethostname(), "queues": [], "processes": 1}


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


def worker_id(pid: int | None = None) -> str:
    return f"{node['hostname']}|{pid or os.getpid()}"


def redis_client(settings: FleetSettings) -> redis_lib.Redis:
    """The worker side's Redis client: fails fast on a dead server, notices a dropped connection."""
    return redis_options.client(settings, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


@dataclass
class ProcessContext:
    """What one worker process holds: its adapters, its Redis client, its heartbeat and its executor."""

    settings: FleetSettings
    worker_id: str
    redis: Any
    keys: Any  # shared.keys.Keys
    pool: Any  # workers.serving.pool.AdapterPool
    heartbeat: Any  # workers.heartbeat.Heartbeat
    executor: Any  # workers.executor.executor.JobExecutor
    member: Any = None  # workers.engines.batching.membership.RoutingMember, for a process with an own queue

    def close(self) -> None:
        self.heartbeat.stop()
        self.pool.close()


def build_context(settings: FleetSettings, queues: Sequence[str], *, arm_soft_limit: bool, redis: Any = None,
                  routed: bool = False) -> ProcessContext:
    """Wire one process's parts: adapter pool (set up now), outcome writer, policies, executor, heartbeat.

    ``routed``: the process consumes an own queue besides its pool's (a batching-engine consumer), so it tells
    the router what it holds (``ProcessContext.member``)."""
    from shared.keys import Keys
    from shared.routing import parse_queue_name
    from shared.stats import StatsWriter
    from workers.executor.begin import BeginScript
    from workers.executor.executor import JobExecutor
    from workers.executor.handlers import Handlers
    from workers.executor import deadletters
    from workers.executor.outcomes import outcome_writer
    from workers.executor.policies import TimeLimit, default_policies
    from workers.heartbeat import Heartbeat
    from workers.serving.pool import AdapterPool

    me = worker_id()
    redis = redis or redis_client(settings)
    keys = Keys(settings.redis_key_prefix)
    stats = StatsWriter(redis, keys, me)
    pool = AdapterPool(settings)
    pool.setup([parse_queue_name(q) for q in queues])
    member = None
    if routed:
        from shared.routing import JobRouter
        from workers.engines.batching.membership import RoutingMember

        member = RoutingMember(redis, keys, me, queues[0], JobRouter(keys, settings))
    heartbeat = Heartbeat(stats, pool, queues, member)
    outcomes = outcome_writer(redis, settings, stats)
    handlers = Handlers(pool, outcomes, cancelled=lambda job_id: bool(redis.exists(keys.job_cancelled(job_id))),
                        models_changed=heartbeat.publish, cache_changed=heartbeat.cache_changed)
    executor = JobExecutor(handlers, outcomes, BeginScript(redis, keys, me, settings.result_ttl_seconds),
                           default_policies(settings.job_max_deliveries,
                                            lambda job_id: deadletters.last_failure(redis, keys, job_id)),
                           TimeLimit(settings.job_time_limit_seconds, arm_soft=arm_soft_limit))
    return ProcessContext(settings, me, redis, keys, pool, heartbeat, executor, member)


def init_process(settings: FleetSettings | None = None, queues: Sequence[str] | None = None, *,
                 arm_soft_limit: bool = False, routed: bool = False) -> ProcessContext:
    """Build this process's context (idempotent per process) and set torch's thread count."""
    global _context, _context_pid
    with _lock:
        if _context is not None and _context_pid == os.getpid():
            return _context
        import torch  # NOTE: imported here, in the worker process, after the fork

        settings = settings or get_settings()
        threads = torch_threads_for(settings, int(node["processes"]))
        torch.set_num_threads(threads)
        queues = list(queues if queues is not None else node["queues"])
        context = build_context(settings, queues, arm_soft_limit=arm_soft_limit, routed=routed)
        context.heartbeat.start()
        log.info("worker process %s ready: %d torch thread(s), queues %s", context.worker_id, threads, queues)
        _context, _context_pid = context, os.getpid()
        return context


def current() -> ProcessContext:
    """The context of this process, built on first use."""
    if _context is None or _context_pid != os.getpid():
        return init_process()
    return _context


def shutdown_process() -> None:
    global _context
    with _lock:
        if _context is not None and _context_pid == os.getpid():
            _context.close()
            _context = None

"""(b) Plain Celery, one task per prediction: JSON, Redis broker and backend, prefork 2, one torch thread each.

The producer sends the series as JSON lists and waits with ``AsyncResult.get``, one blocking client thread per
request in flight (Celery's client API is blocking). The task module is :mod:`bench.systems.plain_tasks`.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from celery import Celery

from bench.loadgen import Call
from bench.procs import Proc, python_env, wait_until
from bench.systems.base import BenchContext, Point, System, model_of, threaded_calls

ROOT = Path(__file__).resolve().parents[2]
#: Producer connections: one per client thread, so that no request waits for a pooled connection.
CLIENT_POOL_LIMIT = 256
#: Client-side settings of every Celery producer of the bench. The bounded retry policy matters at the end:
#: an unconsumed AsyncResult collected after Redis stopped would otherwise retry its unsubscribe forever.
CLIENT_CONF = {"broker_pool_limit": CLIENT_POOL_LIMIT,
               "result_backend_transport_options": {"retry_policy": {"max_retries": 2, "interval_start": 0,
                                                                     "interval_step": 0.2, "interval_max": 0.5}}}


def producer_app(name: str, url: str, serializer: str) -> Celery:
    app = Celery(name, broker=url, backend=url)
    app.conf.update(task_serializer=serializer, result_serializer=serializer, accept_content=[serializer],
                    result_accept_content=[serializer], **CLIENT_CONF)
    return app


def celery_worker(ctx: BenchContext, name: str, module: str, queue: str, pool: str, concurrency: int,
                  env: dict[str, str]) -> Proc:
    """A ``celery worker`` of a bench task module, in its own process group on the server cores."""
    argv = [sys.executable, "-m", "celery", "-A", module, "worker", "-Q", queue, "-P", pool, "-c", str(concurrency),
            "-n", f"{name}@%h", "-l", "WARNING"]
    full_env = python_env(PYTHONPATH=str(ROOT), BENCH_STORE_DIR=str(ctx.store_dir), OMP_NUM_THREADS="1", **env)
    return Proc(name, argv, full_env, ctx.log_dir, cpus=ctx.server_cpus, cwd=ROOT)


def drop_results(redis_url: str) -> None:
    """Delete stored Celery results (outside measurement windows: results would otherwise pile up in Redis)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    batch = []
    for key in client.scan_iter(match="celery-task-meta-*", count=2000):
        batch.append(key)
        if len(batch) >= 2000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
    client.close()


def wait_first_result(send: Callable[[], Any], procs: list[Proc], what: str, timeout: float = 120) -> None:
    """Send until one answer comes back (the workers are up and have loaded the models)."""
    def attempt() -> bool:
        send()
        return True
    wait_until(attempt, timeout, what, procs, interval=0.5)


class PlainCelery(System):
    key = "b"
    name = "plain Celery (prefork 2, JSON)"
    uses_redis = True
    default_encoding = "json-list"

    def __init__(self, ctx: BenchContext, db: int = 1) -> None:
        super().__init__(ctx, "prefork 2 x 1 thread")
        self.url = ctx.redis_db_url(db)
        from bench.systems import plain_tasks

        self.tasks = plain_tasks
        self.app = producer_app("bench-plain-producer", self.url, "json")
        self.notes.append("Celery defaults otherwise (prefetch multiplier 4, early ack); series sent as JSON lists, "
                          "forecast returned as JSON lists")

    def start(self) -> None:
        self.procs.append(celery_worker(self.ctx, "plain-celery", "bench.systems.plain_tasks", self.tasks.QUEUE,
                                        "prefork", 2, {"BENCH_REDIS_URL": self.url}))
        series = self.ctx.inputs["ref"][0].tolist()
        wait_first_result(lambda: self.app.send_task(self.tasks.TASK, args=("ref", series),
                                                     queue=self.tasks.QUEUE).get(timeout=5),
                          self.procs, "the plain Celery worker")

    def between_reps(self) -> None:
        drop_results(self.url)

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        model = model_of(point)
        payloads = [s.tolist() for s in self.ctx.inputs[point.model]]

        def blocking(i: int) -> None:
            result = self.app.send_task(self.tasks.TASK, args=(point.model, payloads[i % len(payloads)]),
                                        queue=self.tasks.QUEUE)
            out = result.get(timeout=60)
            if len(out) != model.horizon or len(out[0]) != model.channels:
                raise RuntimeError(f"forecast of shape {len(out)}x{len(out[0])}")

        async with threaded_calls(blocking, point.concurrency) as call:
            yield call

    def stop(self) -> None:
        super().stop()
        self.app.close()

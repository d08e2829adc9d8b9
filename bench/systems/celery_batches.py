"""(b2) celery-batches: requests buffered in the worker and run as one forward (flush 32 / 10 ms), msgpack.

Two solo workers with one torch thread each and 64 prefetched messages; the producer sends the series as raw
float32 bytes in msgpack and waits with ``AsyncResult.get``. Task module: :mod:`bench.systems.batches_tasks`.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from bench.config import CELERY_BATCHES
from bench.loadgen import Call
from bench.systems.base import BenchContext, Point, System, model_of, threaded_calls
from bench.systems.plain_celery import celery_worker, drop_results, producer_app, wait_first_result


class CeleryBatches(System):
    key = "b2"
    name = "celery-batches (2 solo workers, msgpack)"
    uses_redis = True
    default_encoding = "msgpack-tensor"

    def __init__(self, ctx: BenchContext, db: int = 2) -> None:
        cfg = CELERY_BATCHES
        super().__init__(ctx, f"flush {cfg['flush_every']} / {cfg['flush_interval_s'] * 1000:.0f} ms, "
                              f"prefetch {cfg['prefetch']}")
        self.url = ctx.redis_db_url(db)
        from bench.systems import batches_tasks

        self.tasks = batches_tasks
        self.app = producer_app("bench-batches-producer", self.url, "msgpack")
        self.notes.append("series sent as raw float32 bytes in msgpack, forecast returned as msgpack lists")

    def start(self) -> None:
        cfg = CELERY_BATCHES
        env = {"BENCH_REDIS_URL": self.url, "BENCH_FLUSH_EVERY": str(cfg["flush_every"]),
               "BENCH_FLUSH_INTERVAL_S": str(cfg["flush_interval_s"]), "BENCH_PREFETCH": str(cfg["prefetch"])}
        for k in range(cfg["workers"]):
            self.procs.append(celery_worker(self.ctx, f"celery-batches-{k}", "bench.systems.batches_tasks",
                                            self.tasks.QUEUE, "solo", 1, env))
        wait_first_result(lambda: self._send("ref", 0).get(timeout=5), self.procs, "the celery-batches workers")

    def _send(self, model: str, i: int):  # type: ignore[no-untyped-def]
        series = self.ctx.inputs[model][i % len(self.ctx.inputs[model])]
        return self.app.send_task(self.tasks.TASK, kwargs={"model": model, "shape": list(series.shape),
                                                           "data": series.astype("<f4").tobytes()},
                                  queue=self.tasks.QUEUE, serializer="msgpack")

    def between_reps(self) -> None:
        drop_results(self.url)

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        model = model_of(point)

        def blocking(i: int) -> None:
            out = self._send(point.model, i).get(timeout=60)
            if len(out) != model.horizon or len(out[0]) != model.channels:
                raise RuntimeError(f"forecast of shape {len(out)}x{len(out[0])}")

        async with threaded_calls(blocking, point.concurrency) as call:
            yield call

    def stop(self) -> None:
        super().stop()
        self.app.close()

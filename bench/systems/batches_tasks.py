"""(b2) The celery-batches baseline's task module: requests buffered and run as one batched forward.

Flushes every ``BENCH_FLUSH_EVERY`` requests or ``BENCH_FLUSH_INTERVAL_S`` seconds, msgpack on the wire (the
series as raw float32 bytes), ``BENCH_PREFETCH`` messages prefetched. Run as solo workers (one process, one
torch thread each): ``celery -A bench.systems.batches_tasks worker -P solo``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from celery import Celery
from celery.signals import worker_init
from celery_batches import Batches, SimpleRequest

QUEUE = "bench.batches"
TASK = "bench.batches.predict"

app = Celery("bench-batches", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2"),
             backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2"))
app.conf.update(task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack"],
                result_accept_content=["msgpack"], task_default_queue=QUEUE, result_expires=300,
                worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "64")),
                broker_connection_retry_on_startup=True)
_models: dict[str, Any] = {}


@worker_init.connect
def _init(**_: Any) -> None:
    import torch

    from bench.systems.forecaster import load_all

    torch.set_num_threads(1)
    _models.update(load_all(os.environ["BENCH_STORE_DIR"], threads=1))


@app.task(base=Batches, name=TASK, flush_every=int(os.environ.get("BENCH_FLUSH_EVERY", "32")),
          flush_interval=float(os.environ.get("BENCH_FLUSH_INTERVAL_S", "0.01")))
def predict(requests: list[SimpleRequest]) -> None:
    import numpy as np

    if not _models:
        _init()
    groups: dict[str, list[SimpleRequest]] = defaultdict(list)
    for request in requests:
        groups[request.kwargs["model"]].append(request)
    for model, members in groups.items():
        series = [np.frombuffer(r.kwargs["data"], dtype="<f4").reshape(r.kwargs["shape"]) for r in members]
        try:
            forecasts = _models[model].predict_batch(series)
        except Exception as exc:  # fail the requests of this model, keep the worker
            for request in members:
                app.backend.mark_as_failure(request.id, exc, request=request)
            continue
        for request, forecast in zip(members, forecasts):
            app.backend.mark_as_done(request.id, forecast.tolist(), request=request)

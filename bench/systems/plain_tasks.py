"""(b) The plain Celery baseline's task module: one task per prediction, JSON, the tuning users start from.

Started as ``celery -A bench.systems.plain_tasks worker -P prefork -c 2`` with ``BENCH_REDIS_URL`` and
``BENCH_STORE_DIR`` in the environment. Each pool child sets one torch thread and loads both models after the
fork (``worker_process_init``); the task takes the series as JSON lists and returns the forecast as lists.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

QUEUE = "bench.plain"
TASK = "bench.plain.predict"

app = Celery("bench-plain", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1"),
             backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                task_default_queue=QUEUE, result_expires=300, broker_connection_retry_on_startup=True)
_models: dict[str, Any] = {}


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    import torch

    from bench.systems.forecaster import load_all

    torch.set_num_threads(1)
    _models.update(load_all(os.environ["BENCH_STORE_DIR"], threads=1))


@app.task(name=TASK)
def predict(model: str, series: list[list[float]]) -> list[list[float]]:
    import numpy as np

    if not _models:
        _init_child()
    (forecast,) = _models[model].predict_batch([np.asarray(series, dtype=np.float32)])
    return forecast.tolist()

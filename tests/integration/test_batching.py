"""Dynamic batching in a real worker on the real Redis: right results, per-job errors, no loss on SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from celery.result import AsyncResult

from shared import tasks
from shared.keys import Keys
from shared.schemas import PredictInputs
from shared.settings import FleetSettings
from shared.store_layout import model_dir
from shared.schemas import ModelKey
from tests.helpers import wait_for
from workers.adapters.simple import SimpleServingAdapter
from workers.training.synthetic import generate_bars

KEY = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst"}


def windows(n: int) -> list[np.ndarray]:
    bars = generate_bars("AAPL", "1h", n_bars=400 + n * 7, seed=321).values
    return [bars[i * 7:i * 7 + 300] for i in range(n)]


def reference(settings: FleetSettings, series: np.ndarray, n_steps: int | None = None) -> np.ndarray:
    """The unbatched prediction, in this process, through the same loading code."""
    adapter = SimpleServingAdapter(settings)
    adapter.load_model(model_dir(settings.model_store_dir, ModelKey(**KEY)), "AAPL", "1h", "patchtst")
    return np.asarray(adapter.predict("AAPL_1h_patchtst", PredictInputs(series=series.tolist()), n_steps).predictions)


def test_batched_jobs_get_their_own_results_and_errors(start_worker, producer, fleet_settings, stats) -> None:
    inputs = windows(24)
    bad_index = 5
    jobs = [{**KEY, "inputs": {"series": s.tolist()}} for s in inputs]
    jobs[bad_index]["inputs"] = {"series": inputs[bad_index][:, :2].tolist()}
    load = producer.send_task(tasks.LOAD, kwargs={"job": KEY})
    with ThreadPoolExecutor(8) as pool:  # several producers at once, as in production
        results = list(pool.map(lambda j: producer.send_task(tasks.PREDICT, kwargs={"job": j}), jobs))
    # The jobs are queued before the worker starts, so its task threads take many at once: a backlog is what
    # batching is for (and it makes the batching here deterministic rather than a race with the producer).
    worker = start_worker(batching=True, BATCH_MAX_BATCH_DELAY_MS="30", BATCH_MAX_BATCH_SIZE="16")
    load.get(timeout=60)
    for i, res in enumerate(results):
        res.get(timeout=60, propagate=False)
        if i == bad_index:
            assert res.state == "FAILURE" and type(res.result).__name__ == "InvalidInputError"
        else:
            assert res.state == "SUCCESS", res.result
            np.testing.assert_allclose(np.asarray(res.result["predictions"]), reference(fleet_settings, inputs[i]),
                                       rtol=1e-4, atol=1e-3)
    (worker_id,) = worker.ids
    key = Keys(fleet_settings.redis_key_prefix).worker_stats(worker_id)
    counts = wait_for(lambda: (b := stats.redis.hmget(key, "batches", "batched_jobs")) and b[0] and
                      int(b[1]) >= 24 and b, 15, "the batch counters in the heartbeat")
    batches, batched = int(counts[0]), int(counts[1])
    assert batched / batches > 1.5, f"{batched} jobs in {batches} batches: no real batching"


def test_worker_killed_mid_batch_loses_no_job(start_worker, producer, fleet_settings, redis_client) -> None:
    # A short job time limit makes the visibility timeout (2x) short, so redelivery happens within the test.
    env = {"JOB_TIME_LIMIT_SECONDS": "3", "BATCH_MAX_BATCH_DELAY_MS": "20", "BATCH_MAX_BATCH_SIZE": "8"}
    worker = start_worker(batching=True, **env)
    producer.send_task(tasks.LOAD, kwargs={"job": KEY}).get(timeout=60)
    keys = Keys(fleet_settings.redis_key_prefix)
    # long autoregressive roll-outs keep each batch busy long enough to be killed in the middle of one
    jobs = [{**KEY, "inputs": {"series": s.tolist()}, "n_steps": 1024} for s in windows(24)]
    results = [producer.send_task(tasks.PREDICT, kwargs={"job": j}) for j in jobs]
    wait_for(lambda: any(redis_client.hget(keys.job(r.id), "status") == b"running" for r in results), 30,
             "a job of the first batch to start")
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    killed_at = time.time()
    unfinished = [r for r in results if AsyncResult(r.id, app=producer).state != "SUCCESS"]
    assert unfinished, "every job finished before the kill; the test proves nothing"
    start_worker(batching=True, **env)
    for res in results:
        out = res.get(timeout=90)
        assert len(out["predictions"]) == 1024 and np.isfinite(np.asarray(out["predictions"])).all()
    assert time.time() - killed_at >= 6 - 1  # redelivered by the visibility timeout, not by luck

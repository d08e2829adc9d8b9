"""The direct-consumer engine on the real Redis: same contract as the Celery worker, batches, no loss on SIGKILL."""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
from celery.result import AsyncResult

from shared import tasks
from shared.keys import Keys
from tests.helpers import wait_for
from workers.training.synthetic import generate_bars

KEY = {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtst"}


def series(i: int) -> list[list[float]]:
    return generate_bars("MSFT", "1h", n_bars=500 + i, seed=77).values[-200:].tolist()


def test_direct_engine_serves_every_task_with_typed_errors(start_worker, producer, fleet_settings, stats) -> None:
    worker = start_worker(engine="direct", concurrency=1)
    info = producer.send_task(tasks.LOAD, kwargs={"job": KEY}).get(timeout=60)
    assert info["is_loaded"]
    sent = [producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(i)}}},
                               serializer="msgpack" if i % 2 else "json") for i in range(12)]
    bad = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"texts": ["hi"]}}})
    garbage = producer.send_task(tasks.PREDICT, kwargs={"job": "not an object"})
    for res in sent:
        preds = np.asarray(res.get(timeout=60)["predictions"])
        assert preds.shape == (24, 5) and np.isfinite(preds).all()
    for res in (bad, garbage):
        res.get(timeout=60, propagate=False)
        assert res.state == "FAILURE" and type(res.result).__name__ == "InvalidInputError"
    batch = producer.send_task(tasks.BATCH_PREDICT, kwargs={"job": {"requests": [
        {**KEY, "inputs": {"series": series(1)}}, {**KEY, "symbol": "NOPE", "inputs": {"series": series(2)}}]}})
    out = batch.get(timeout=60)
    assert (out["succeeded"], out["failed"]) == (1, 1)
    assert out["items"][1]["error"]["type"] == "ModelNotFoundError"
    assert producer.send_task(tasks.UNLOAD, kwargs={"job": KEY}).get(timeout=60)["unloaded"] is True
    (worker_id,) = worker.ids
    assert stats.worker(worker_id).successful_predictions >= 12
    assert not stats.redis.hlen("unacked"), "every message was acknowledged with its result"
    record = stats.redis.hgetall(Keys(fleet_settings.redis_key_prefix).job(sent[0].id))
    assert record[b"status"] == b"succeeded"  # the record is final as soon as the result is (same MULTI)


def test_direct_engine_killed_mid_batch_loses_no_job(start_worker, producer) -> None:
    env = {"JOB_TIME_LIMIT_SECONDS": "3", "BATCH_MAX_BATCH_SIZE": "4"}  # visibility timeout: 6 s
    worker = start_worker(engine="direct", concurrency=1, **env)
    producer.send_task(tasks.LOAD, kwargs={"job": KEY}).get(timeout=60)
    results = [producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(i)},
                                                                   "n_steps": 1024}}) for i in range(16)]
    wait_for(lambda: stats_unacked(producer) > 0, 30, "a batch in hand")
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    killed_at = time.time()
    assert any(AsyncResult(r.id, app=producer).state != "SUCCESS" for r in results)
    start_worker(engine="direct", concurrency=1, **env)
    for res in results:
        assert len(res.get(timeout=90)["predictions"]) == 1024
    assert time.time() - killed_at >= 6 - 1  # came back through the visibility timeout
    assert stats_unacked(producer) == 0


def stats_unacked(producer) -> int:
    with producer.connection_for_write() as conn:
        return conn.default_channel.client.hlen("unacked")


def test_direct_engine_does_not_run_a_job_cancelled_while_queued(start_worker, producer, fleet_settings) -> None:
    job_id = "cancelled-before-start"
    keys = Keys(fleet_settings.redis_key_prefix)
    with producer.connection_for_write() as conn:
        conn.default_channel.client.set(keys.job_cancelled(job_id), 1, ex=60)  # what DELETE /v1/jobs/{id} sets
    result = producer.send_task(tasks.BATCH_PREDICT, task_id=job_id,
                                kwargs={"job": {"requests": [{**KEY, "inputs": {"series": series(1)}}]}})
    start_worker(engine="direct", concurrency=1)
    result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE" and type(result.result).__name__ == "JobCancelledError"


def test_direct_engine_fails_a_pickled_job_with_a_typed_error(start_worker, producer, fleet_settings) -> None:
    # Celery's own worker drops such a message with a log line; the direct engine also fails the job, so that
    # a client waiting on it gets an answer instead of a timeout.
    from kombu import Exchange, Producer

    from shared import routing

    start_worker(engine="direct", concurrency=1)
    job_id, queue = f"pickled-{uuid.uuid4()}", routing.queue_name("simple", "cpu")
    with producer.connection_for_write() as conn:  # the app's transport options (priority lists, separator)
        Producer(conn).publish(
            {"job": "whatever"}, serializer="pickle", exchange=Exchange(routing.QUEUE_PREFIX, type="direct"),
            routing_key=queue, declare=[q for q in routing.all_queues() if q.name == queue],
            headers={"task": tasks.PREDICT, "id": job_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""})
    res = AsyncResult(job_id, app=producer)
    res.get(timeout=60, propagate=False)
    assert res.state == "FAILURE" and type(res.result).__name__ == "InvalidInputError"
    assert "pickle" in str(res.result) or "content type" in str(res.result)
    keys = Keys(fleet_settings.redis_key_prefix)
    assert wait_for(lambda: producer.backend.client.hget(keys.job(job_id), "status") == b"failed", 10, "record")
    ok = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(3)}}})
    assert np.isfinite(np.asarray(ok.get(timeout=60)["predictions"])).all()
    assert not producer.backend.client.hlen("unacked"), "the refused message was acknowledged"

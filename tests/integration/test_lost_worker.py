"""A whole worker lost (main process and pool SIGKILLed together, as a host going away): what it held goes back
to its queue within WORKER_LOST_AFTER_SECONDS of its last heartbeat, not the visibility timeout (20 minutes at
the defaults), and every job ends succeeded on the worker that takes over. Both engines."""

from __future__ import annotations

import os
import signal
import time

from shared import tasks
from shared.keys import Keys
from tests.helpers import wait_for
from tests.integration.test_engine_contract import KEY, TIMEOUT, record, series, slow_batch


def test_a_lost_worker_s_jobs_succeed_on_another_within_seconds(engine, start_worker, producer, redis_client,
                                                                fleet_settings) -> None:
    keys = Keys(fleet_settings.redis_key_prefix)
    lost = start_worker(engine=engine, concurrency=1)
    # the batch runs for seconds; the predicts queue behind it (the Celery engine reserves one of them)
    batch = producer.send_task(tasks.BATCH_PREDICT, kwargs={"job": slow_batch(6)})
    predicts = [producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(i)}}})
                for i in range(4)]
    wait_for(lambda: record(redis_client, fleet_settings, batch.id).get("status") == "running", TIMEOUT,
             "the batch to run on the first worker")
    holders = {h.decode() for h in redis_client.smembers(keys.delivery_holders())}
    held = {tag for h in holders for tag in redis_client.hkeys(keys.worker_deliveries(h))}
    assert held, f"no delivery is recorded as held by {holders}"

    os.killpg(lost.proc.pid, signal.SIGKILL)  # the whole worker at once: no supervisor is left to give back
    lost.proc.wait(10)
    killed_at = time.monotonic()
    start_worker(engine=engine, concurrency=1, WORKER_LOST_AFTER_SECONDS="3")

    assert batch.get(timeout=60)["total"] == 6
    for result in predicts:
        assert len(result.get(timeout=60)["predictions"]) > 0
    took = time.monotonic() - killed_at
    assert took < 60, took
    rec = record(redis_client, fleet_settings, batch.id)
    assert rec["status"] == "succeeded" and int(rec["deliveries"]) == 2, rec
    # the lost worker is no longer listed as a holder, and nothing it held is left unacknowledged
    assert not {h.decode() for h in redis_client.smembers(keys.delivery_holders())} & holders
    assert not {t.decode() for t in redis_client.hkeys("unacked")} & {t.decode() for t in held}

"""The job contract, run against both worker engines (real Redis, real worker processes).

Every test takes the ``engine`` fixture (``batching`` and ``celery``), so the two engines are held to one
contract: cancel while queued and while running, deadlines, time limits, a process SIGKILLed mid-batch, a job
that kills every process it runs in, and plain Celery clients (inspect, priorities, the stock Flower) that
know nothing but the broker URL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from celery import Celery
from celery.result import AsyncResult

from shared import routing, tasks
from shared.keys import Keys
from tests.helpers import free_port, python_env, wait_for
from workers.training.synthetic import generate_bars
from tests.integration.conftest import failure

KEY = {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtst"}
TIMEOUT = 90


def series(i: int) -> list[list[float]]:
    return generate_bars("MSFT", "1h", n_bars=500 + i, seed=77).values[-200:].tolist()


def slow_batch(items: int) -> dict:
    """A batch job that takes seconds: forecasts of 1024 steps roll the model forward ~43 times each."""
    return {"requests": [{**KEY, "inputs": {"series": series(i % 7)}, "n_steps": 1024} for i in range(items)]}


def record(redis_client, settings, job_id: str) -> dict[str, str]:
    raw = redis_client.hgetall(Keys(settings.redis_key_prefix).job(job_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running_pid(redis_client, settings, job_ids) -> int | None:
    """The pid of the worker process running one of ``job_ids`` now, from the job records."""
    for job_id in job_ids:
        rec = record(redis_client, settings, job_id)
        if rec.get("status") == "running" and rec.get("worker"):
            pid = int(rec["worker"].rsplit("|", 1)[1])
            if alive(pid):
                return pid
    return None


def test_every_job_kind_with_typed_errors_and_acks(engine, start_worker, producer, redis_client, fleet_settings,
                                                   stats) -> None:
    worker = start_worker(engine=engine, concurrency=1)
    info = producer.send_task(tasks.LOAD, kwargs={"job": KEY}).get(timeout=TIMEOUT)
    assert info["is_loaded"]
    sent = [producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(i)}}},
                               serializer="msgpack" if i % 2 else "json") for i in range(12)]
    bad = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"texts": ["hi"]}}})
    garbage = producer.send_task(tasks.PREDICT, kwargs={"job": "not an object"})
    unknown_task = producer.send_task("fleet.nope", kwargs={"job": {}}, queue=routing.queue_name("simple", "cpu"))
    for res in sent:
        preds = np.asarray(res.get(timeout=TIMEOUT)["predictions"])
        assert preds.shape == (24, 5) and np.isfinite(preds).all()
    for res in (bad, garbage):
        assert failure(res, TIMEOUT)[0] == "InvalidInputError"
    batch = producer.send_task(tasks.BATCH_PREDICT, kwargs={"job": {"requests": [
        {**KEY, "inputs": {"series": series(1)}}, {**KEY, "symbol": "NOPE", "inputs": {"series": series(2)}}]}})
    out = batch.get(timeout=TIMEOUT)
    assert (out["succeeded"], out["failed"]) == (1, 1)
    assert out["items"][1]["error"]["type"] == "ModelNotFoundError"
    assert producer.send_task(tasks.UNLOAD, kwargs={"job": KEY}).get(timeout=TIMEOUT)["unloaded"] is True
    (worker_id,) = worker.ids
    assert stats.worker(worker_id).successful_predictions >= 12
    # load and batch jobs record their timings too (one executor for every kind)
    assert float(record(redis_client, fleet_settings, info_id := batch.id)["inference_ms"]) > 0, info_id
    rec = record(redis_client, fleet_settings, sent[0].id)
    assert rec["status"] == "succeeded" and rec["deliveries"] == "1"  # the record is final with the result
    wait_for(lambda: redis_client.hlen("unacked") == 0, 10, "every message acknowledged with its result")
    if engine == "batching":  # Celery's worker drops a message for an unknown task; the batching engine fails it
        assert failure(unknown_task, TIMEOUT)[0] == "InvalidInputError"


def test_a_job_cancelled_while_queued_never_runs(engine, start_worker, producer, redis_client,
                                                 fleet_settings) -> None:
    job_id = f"cancelled-before-start-{engine}"
    redis_client.set(Keys(fleet_settings.redis_key_prefix).job_cancelled(job_id), 1, ex=60)  # what DELETE sets
    result = producer.send_task(tasks.BATCH_PREDICT, task_id=job_id, kwargs={"job": slow_batch(2)})
    start_worker(engine=engine, concurrency=1)
    assert failure(result, TIMEOUT)[0] == "JobCancelledError"
    rec = record(redis_client, fleet_settings, job_id)
    assert rec["status"] == "cancelled" and "started_at" not in rec  # it never ran


def test_a_batch_job_cancelled_while_running_stops_between_chunks(engine, start_worker, producer, redis_client,
                                                                  fleet_settings) -> None:
    start_worker(engine=engine, concurrency=1, BATCH_MAX_BATCH_SIZE="2")
    result = producer.send_task(tasks.BATCH_PREDICT, kwargs={"job": slow_batch(200)})
    wait_for(lambda: int(record(redis_client, fleet_settings, result.id).get("progress_done") or 0) > 0, TIMEOUT,
             "the batch job to make progress")
    redis_client.set(Keys(fleet_settings.redis_key_prefix).job_cancelled(result.id), 1, ex=60)
    kind, message = failure(result, TIMEOUT)
    assert kind == "JobCancelledError" and "of 200 items" in message
    rec = record(redis_client, fleet_settings, result.id)
    assert rec["status"] == "cancelled" and int(rec["progress_done"]) < 200


def test_a_job_past_its_deadline_is_not_run(engine, start_worker, producer, redis_client, fleet_settings) -> None:
    start_worker(engine=engine, concurrency=1)
    job = {**KEY, "inputs": {"series": series(0)}, "deadline_s": 1, "enqueued_at": time.time() - 5}
    assert failure(producer.send_task(tasks.PREDICT, kwargs={"job": job}), TIMEOUT)[0] == "DeadlineExceededError"
    fresh = {**job, "enqueued_at": time.time(), "deadline_s": 60}
    assert len(producer.send_task(tasks.PREDICT, kwargs={"job": fresh}).get(timeout=TIMEOUT)["predictions"]) == 24


def test_a_job_over_its_time_limit_fails_typed_and_is_not_run_twice(engine, start_worker, producer, redis_client,
                                                                    fleet_settings) -> None:
    worker = start_worker(engine=engine, concurrency=1, JOB_TIME_LIMIT_SECONDS="2", BATCH_MAX_BATCH_SIZE="2")
    result = producer.send_task(tasks.BATCH_PREDICT, kwargs={"job": slow_batch(400)})
    kind, message = failure(result, TIMEOUT)
    assert kind == "JobTimeoutError" and "time limit of 2 s" in message, message
    # Past two visibility timeouts (2 x 2 s each): the message is acknowledged, nobody runs the job again.
    def run_again() -> bool:
        rec = record(redis_client, fleet_settings, result.id)
        return rec["status"] != "failed" or rec["deliveries"] != "1"
    with pytest.raises(TimeoutError):
        wait_for(run_again, 9, "a second run of the timed-out job")
    assert redis_client.hlen("unacked") == 0
    ok = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(1)}}})
    assert len(ok.get(timeout=TIMEOUT)["predictions"]) == 24  # the pool serves on
    assert worker.proc.poll() is None


def test_a_process_killed_mid_batch_is_replaced_and_loses_no_job(engine, start_worker, producer, redis_client,
                                                                 fleet_settings) -> None:
    worker = start_worker(engine=engine, concurrency=2)
    producer.send_task(tasks.LOAD, kwargs={"job": KEY}).get(timeout=TIMEOUT)
    results = [producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(i)},
                                                                 "n_steps": 1024}}) for i in range(48)]
    ids = [r.id for r in results]
    before = wait_for(lambda: len(p := worker.processes()) == 2 and p, 30, "two job processes")
    victim = wait_for(lambda: running_pid(redis_client, fleet_settings, ids), TIMEOUT, "a job running")
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replaced = wait_for(lambda: len(p := [q for q in worker.processes() if alive(q)]) == 2 and victim not in p and p,
                        10, "the pool to be whole again")
    # the batching supervisor replaces its consumer within 5 s; Celery's pool (billiard) within the 10 s waited
    assert engine != "batching" or time.monotonic() - killed_at < 5, "replaced within 5 s"
    assert set(replaced) - set(before), "a new process took the dead one's place"
    for res in results:  # nothing lost: the dead process's jobs ran elsewhere, well before a visibility timeout
        assert len(res.get(timeout=TIMEOUT)["predictions"]) == 1024
    assert time.monotonic() - killed_at < 60
    wait_for(lambda: redis_client.hlen("unacked") == 0, 10, "every message acknowledged")


def test_a_job_that_kills_every_process_it_runs_in_is_stopped(engine, start_worker, producer, redis_client,
                                                              fleet_settings) -> None:
    worker = start_worker(engine=engine, concurrency=1, JOB_MAX_DELIVERIES="2", BATCH_MAX_BATCH_SIZE="2")
    result = producer.send_task(tasks.BATCH_PREDICT, kwargs={"job": slow_batch(300)})
    for delivery in ("1", "2"):  # the fault: its process dies on each delivery (an OOM kill, a segfault)
        pid = wait_for(lambda: record(redis_client, fleet_settings, result.id).get("deliveries") == delivery
                       and running_pid(redis_client, fleet_settings, [result.id]), TIMEOUT, f"delivery {delivery}")
        os.kill(pid, signal.SIGKILL)
    kind, message = failure(result, TIMEOUT)
    assert kind == "PoisonJobError" and "delivered 3 times" in message, message
    assert "signal 9" in message, message  # the last known cause, as the engine saw the process die
    assert record(redis_client, fleet_settings, result.id)["status"] == "failed"
    wait_for(lambda: redis_client.hlen("unacked") == 0, 10, "the poison job acknowledged, not requeued")
    # its message waits in the pool's dead letters, with its payload (it can be requeued once the cause is fixed)
    letters = [json.loads(raw) for raw in
               redis_client.lrange(Keys(fleet_settings.redis_key_prefix).dead_letters("infer.simple.cpu"), 0, -1)]
    (letter,) = [entry for entry in letters if entry["job_id"] == result.id]
    assert letter["reason"] == "poison" and letter["task"] == tasks.BATCH_PREDICT and letter["deliveries"] == 3
    assert letter["error"]["type"] == "PoisonJobError" and len(letter["payload"]["requests"]) == 300
    # the pool kept its size: the killed process was replaced each time, and the replacement serves
    ok = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(3)}}})
    assert len(ok.get(timeout=TIMEOUT)["predictions"]) == 24
    assert len(wait_for(lambda: len(worker.processes()) == 1 and worker.processes(), 30, "one live process")) == 1


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def plain_client(url: str) -> Celery:
    """A Celery client configured with nothing but the broker URL (and a result backend to read results)."""
    return Celery("plain", broker=url, backend=url)


def test_plain_celery_clients_see_and_reach_the_fleet(engine, start_worker, fleet_settings) -> None:
    start_worker(engine=engine, concurrency=1)
    url = fleet_settings.redis_url
    out = subprocess.run([sys.executable, "-m", "celery", "--broker", url, "inspect", "ping", "--timeout", "5"],
                         capture_output=True, text=True, timeout=60, env=python_env())
    assert out.returncode == 0 and "pong" in out.stdout, out.stdout + out.stderr
    client = plain_client(url)
    try:
        sent = {p: client.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(p)}}},
                                    queue=routing.queue_name("simple", "cpu"), priority=p) for p in range(10)}
        for priority, res in sent.items():  # every priority list a default client writes is consumed
            assert len(res.get(timeout=TIMEOUT)["predictions"]) == 24, priority
    finally:
        client.close()


def test_the_stock_flower_lists_the_workers_and_their_jobs(engine, start_worker, producer, fleet_settings,
                                                          tmp_path) -> None:
    port = free_port()
    log = open(tmp_path / "flower.log", "w")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", fleet_settings.redis_url, "flower", f"--port={port}",
         "--address=127.0.0.1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=python_env(FLOWER_UNAUTHENTICATED_API="true"))  # only inside this test: Flower on loopback
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(f"{base}/healthcheck", timeout=2).status == 200, 60,
                 "Flower to answer")
        start_worker(engine=engine, concurrency=1)

        def listed() -> str | None:
            workers = get_json(f"{base}/api/workers?refresh=1")
            names = [n for n, info in workers.items() if n.startswith("simple-cpu-") and info.get("stats")]
            return names[0] if names else None
        name = wait_for(listed, 60, "Flower to list the worker", interval=0.5)
        # Flower's event receiver is subscribed once it has seen the worker's heartbeat: then send the job.
        wait_for(lambda: get_json(f"{base}/api/workers?status=1").get(name), 30,
                 "Flower to see the worker online", interval=0.5)
        job = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(3)}}})
        job.get(timeout=TIMEOUT)

        def seen() -> dict | None:
            task = get_json(f"{base}/api/tasks").get(job.id)
            return task if task and task.get("state") == "SUCCESS" else None
        task = wait_for(seen, 30, "Flower to show the job as SUCCESS", interval=0.25)
        assert task["name"] == tasks.PREDICT and task["worker"] == name, task
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(20)
        log.close()


def test_a_result_read_back_by_a_celery_client_after_a_restart_is_the_same(engine, start_worker, producer) -> None:
    # The executor stores results in Celery's own format: any AsyncResult reads them, live or later.
    start_worker(engine=engine, concurrency=1)
    res = producer.send_task(tasks.PREDICT, kwargs={"job": {**KEY, "inputs": {"series": series(5)}}})
    first = res.get(timeout=TIMEOUT)
    again = AsyncResult(res.id, app=producer).get(timeout=5)
    assert again == first and again["model_info"]["model_id"] == "MSFT_1h_patchtst"


def test_a_pool_whose_adapter_cannot_set_up_reports_unhealthy_with_the_reason(engine, start_worker, stats) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the cuda pool sets up fine")
    worker = start_worker(engine=engine, concurrency=1, device="cuda")
    (worker_id,) = worker.ids
    raw = {k.decode(): v.decode() for k, v in stats.redis.hgetall(stats.keys.worker_stats(worker_id)).items()}
    assert raw["healthy"] == "0" and "cuda" in raw["unhealthy_reason"], raw
    assert raw["queues"] == "infer.simple.cuda" and worker.proc.poll() is None  # a state, not a crash

"""Job documents (GET, with and without ?wait), cancellation (DELETE) and job id formats."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from shared.jobs import event_message
from shared.keys import Keys
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, enqueue, failure,  # noqa: F401
                                         recorder, server, settings, sredis, store_result)


async def test_queued_job_document(client):
    job_id = await enqueue(client)
    resp = await client.get(f"/v1/jobs/{job_id}")
    assert resp.status == 200
    doc = await resp.json()
    assert doc == {"job_id": job_id, "kind": "predict", "status": "queued", "progress": None, "result": None,
                   "error": None, "timings": {"queued_ms": None, "load_ms": None, "inference_ms": None,
                                              "total_ms": None},
                   "worker": None, "adapter": "simple", "device": "cpu"}


async def test_running_then_succeeded_with_timings(client, recorder, sredis):
    job_id = await enqueue(client)
    enqueued = float(sredis.hget(KEYS.job(job_id), "enqueued_at"))
    recorder.running(job_id, "host|42", enqueued + 0.5)
    doc = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert doc["status"] == "running" and doc["worker"] == "host|42"
    assert doc["timings"]["queued_ms"] == pytest.approx(500, abs=1)
    store_result(sredis, job_id, "SUCCESS", {"predictions": [[2.0]]})
    recorder.finished(job_id, True, load_ms=12.5, inference_ms=3.25)
    doc = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert doc["status"] == "succeeded" and doc["result"] == {"predictions": [[2.0]]} and doc["error"] is None
    assert doc["timings"]["load_ms"] == 12.5 and doc["timings"]["inference_ms"] == 3.25
    assert doc["timings"]["total_ms"] > 0


async def test_batch_progress_from_celery_and_record(client, recorder, sredis):
    job_id = await enqueue(client, {"requests": [{"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment",
                                                  "inputs": {"texts": ["up"]}}]}, "/v1/predict/batch")
    recorder.running(job_id, "w|1", time.time(), total=4)
    recorder.progress(job_id, 1, 4)
    doc = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert doc["kind"] == "batch_predict" and doc["progress"] == {"done": 1, "total": 4}
    store_result(sredis, job_id, "PROGRESS", {"done": 3, "total": 4})
    doc = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert doc["status"] == "running" and doc["progress"] == {"done": 3, "total": 4}


@pytest.mark.parametrize("exc_type, status", [("PredictionError", "failed"), ("JobCancelledError", "cancelled"),
                                              ("DeadlineExceededError", "expired")])
async def test_failure_maps_to_status_and_typed_error(client, sredis, exc_type, status):
    job_id = await enqueue(client)
    store_result(sredis, job_id, "FAILURE", failure(exc_type, "why"))
    doc = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert doc["status"] == status and doc["error"]["type"] == exc_type and doc["error"]["message"] == "why"


async def test_unknown_job_is_404(client):
    resp = await client.get("/v1/jobs/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "JobNotFoundError"
    assert (await client.get("/v1/jobs/nope?wait=1")).status == 404


async def test_result_outliving_its_record_still_reads(client, sredis):
    store_result(sredis, "orphan", "SUCCESS", {"model_id": "X", "unloaded": True})
    doc = await (await client.get("/v1/jobs/orphan")).json()
    assert doc["status"] == "succeeded" and doc["kind"] is None and doc["result"]["unloaded"] is True


async def test_get_wait_returns_promptly_on_the_final_record_event(client, recorder, sredis):
    job_id = await enqueue(client)

    async def worker() -> float:
        await asyncio.sleep(0.15)
        store_result(sredis, job_id, "SUCCESS", {"ok": 1})
        return time.perf_counter()

    task = asyncio.create_task(worker())
    doc = await (await client.get(f"/v1/jobs/{job_id}?wait=5")).json()
    assert time.perf_counter() - await task < 0.1
    assert doc["status"] == "succeeded"


async def test_get_wait_on_a_running_job_answers_its_state_after_the_wait(client):
    job_id = await enqueue(client)
    started = time.perf_counter()
    doc = await (await client.get(f"/v1/jobs/{job_id}?wait=0.1")).json()
    assert doc["status"] == "queued" and time.perf_counter() - started >= 0.1


async def test_cancel_a_queued_job(client, celery, sredis):
    job_id = await enqueue(client)
    pubsub = sredis.pubsub()
    pubsub.subscribe(KEYS.job_events(job_id), Keys.celery_result(job_id))
    resp = await client.delete(f"/v1/jobs/{job_id}")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["status"] == "cancelled" and doc["error"]["type"] == "JobCancelledError"
    assert doc["timings"]["total_ms"] is not None and "cancel_requested" not in doc
    assert sredis.exists(KEYS.job_cancelled(job_id)) and celery.revoked == [job_id]
    assert sredis.hget(KEYS.job(job_id), "status") == b"cancelled"
    # Celery's result too, as its Redis backend stores a failure: a plain Celery client waiting on it gets it
    meta = json.loads(sredis.get(Keys.celery_result(job_id)))
    assert meta["status"] == "FAILURE" and meta["task_id"] == job_id and meta["date_done"]
    assert meta["result"] == {"exc_type": "JobCancelledError", "exc_message": ["the job was cancelled by a client"],
                              "exc_module": "shared.errors"}
    messages = [pubsub.get_message(timeout=0.1) for _ in range(4)]
    published = [(m["channel"].decode(), json.loads(m["data"])) for m in messages if m and m["type"] == "message"]
    assert [(ch, body["status"]) for ch, body in published] == [
        (Keys.celery_result(job_id), "FAILURE"), (KEYS.job_events(job_id), "cancelled")]
    # Once cancelled, it is final: a second cancel is a 409 and changes nothing.
    before = (sredis.hgetall(KEYS.job(job_id)), sredis.get(Keys.celery_result(job_id)))
    resp = await client.delete(f"/v1/jobs/{job_id}")
    assert resp.status == 409 and (await resp.json())["error"]["type"] == "JobFinishedError"
    assert (sredis.hgetall(KEYS.job(job_id)), sredis.get(Keys.celery_result(job_id))) == before
    assert pubsub.get_message(timeout=0.05) is None and celery.revoked == [job_id]


async def test_cancel_a_running_job_asks_it_to_stop_and_its_worker_decides(client, celery, recorder, sredis):
    job_id = await enqueue(client)
    recorder.running(job_id, "w|1", time.time())
    pubsub = sredis.pubsub()
    pubsub.subscribe(KEYS.job_events(job_id))
    resp = await client.delete(f"/v1/jobs/{job_id}")
    assert resp.status == 202
    doc = await resp.json()
    assert doc["status"] == "running" and doc["cancel_requested"] is True and doc["error"] is None
    assert sredis.exists(KEYS.job_cancelled(job_id))  # what workers honour, between batch items
    assert sredis.hget(KEYS.job(job_id), "status") == b"running" and not sredis.exists(Keys.celery_result(job_id))
    assert pubsub.get_message(timeout=0.05)["type"] == "subscribe" and pubsub.get_message(timeout=0.05) is None
    assert celery.revoked == []  # a revoke would not stop it; it only spares queued messages a trip
    # the worker finishes it anyway (a single predict is never interrupted): it succeeded, and stays so
    store_result(sredis, job_id, "SUCCESS", {"predictions": [[1.0]]})
    doc = await (await client.get(f"/v1/jobs/{job_id}")).json()
    assert doc["status"] == "succeeded" and doc["error"] is None
    assert (await client.delete(f"/v1/jobs/{job_id}")).status == 409
    # a running batch stopped between items by its worker ends cancelled
    batch = await enqueue(client, {"requests": [PREDICT] * 2}, "/v1/predict/batch")
    recorder.running(batch, "w|1", time.time(), total=2)
    assert (await client.delete(f"/v1/jobs/{batch}")).status == 202
    store_result(sredis, batch, "FAILURE", failure("JobCancelledError", "cancelled after 1 of 2 items"))
    assert (await (await client.get(f"/v1/jobs/{batch}")).json())["status"] == "cancelled"


async def test_a_worker_beginning_the_job_during_the_cancel_makes_it_a_cancel_request(client, aredis, sredis,
                                                                                      recorder, monkeypatch):
    """The queued -> cancelled write is WATCHed: a job that a worker marked running in between is not flipped."""
    job_id = await enqueue(client)
    original = type(aredis.pipeline()).multi
    raced = []

    def multi(pipe):
        if not raced:  # the worker's begin script lands between the API's read and its MULTI
            raced.append(1)
            recorder.running(job_id, "w|1", time.time())
        return original(pipe)

    monkeypatch.setattr(type(aredis.pipeline()), "multi", multi)
    resp = await client.delete(f"/v1/jobs/{job_id}")
    assert resp.status == 202 and (await resp.json())["status"] == "running"
    assert sredis.hget(KEYS.job(job_id), "status") == b"running" and sredis.exists(KEYS.job_cancelled(job_id))


async def test_cancel_survives_a_failing_revoke(client, celery, sredis):
    def broken(job_id: str) -> None:
        raise ConnectionError("broker gone")

    celery.control.revoke = broken
    job_id = await enqueue(client)
    resp = await client.delete(f"/v1/jobs/{job_id}")
    assert resp.status == 200 and sredis.exists(KEYS.job_cancelled(job_id))


async def test_cancel_a_finished_job_is_409_and_changes_nothing_and_unknown_is_404(client, celery, sredis):
    job_id = await enqueue(client)
    store_result(sredis, job_id, "SUCCESS", {})
    before = sredis.hgetall(KEYS.job(job_id))
    resp = await client.delete(f"/v1/jobs/{job_id}")
    assert resp.status == 409 and (await resp.json())["error"]["field"] == "job_id"
    assert sredis.hgetall(KEYS.job(job_id)) == before and not sredis.exists(KEYS.job_cancelled(job_id))
    assert celery.revoked == []
    assert (await client.delete("/v1/jobs/unknown")).status == 404


@pytest.mark.parametrize("job_id", ["a" * 129, "a%20b", "semi;colon", "%2e%2e%2fetc", "quote%22", "tab%09",
                                    "%C3%A9t%C3%A9", "new%0Aline"])
async def test_ids_that_cannot_be_job_ids_are_422_naming_job_id(client, job_id):
    for method, path in (("get", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}?wait=1"),
                         ("delete", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}/events")):
        resp = await getattr(client, method)(path)
        error = (await resp.json())["error"]
        assert resp.status == 422 and error["field"] == "job_id", (method, path, error)


@pytest.mark.parametrize("job_id", ["3f2c1b9e-8a8f-4a5e-9d7c-0123456789ab", "a", "a" * 128,
                                    "celery:task.1-A_b", "report.2026-12-01"])
async def test_uuids_and_safe_ids_are_job_ids(client, job_id):
    resp = await client.get(f"/v1/jobs/{job_id}")
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "JobNotFoundError"


async def test_record_event_alone_wakes_a_wait(client, aredis):
    """A cancel by another API replica (record + event, no Celery meta) ends a wait too."""
    job_id = await enqueue(client)

    async def other_replica() -> float:
        await asyncio.sleep(0.1)
        await aredis.hset(KEYS.job(job_id), "status", "cancelled")
        await aredis.publish(KEYS.job_events(job_id), event_message(job_id, "cancelled"))
        return time.perf_counter()

    task = asyncio.create_task(other_replica())
    doc = await (await client.get(f"/v1/jobs/{job_id}?wait=5")).json()
    assert doc["status"] == "cancelled" and time.perf_counter() - await task < 0.1

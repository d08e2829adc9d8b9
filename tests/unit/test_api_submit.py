"""Job submission: load, unload, predict (JSON and msgpack), batch, ?wait, and the broker being down."""

from __future__ import annotations

import asyncio
import base64
import time

import msgpack
import numpy as np
import pytest

from producer_api.app import create_app
from shared import tasks
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, enqueue, failure,  # noqa: F401
                                         recorder, server, settings, sredis, store_result)

LOAD = {"symbol": "aapl", "timeframe": "1h", "model_type": "patchtst"}


@pytest.mark.parametrize("path, task, kind", [("/v1/models/load", tasks.LOAD, "load"),
                                              ("/v1/models/unload", tasks.UNLOAD, "unload")])
async def test_load_and_unload_are_sent_to_the_default_pool(client, celery, sredis, path, task, kind):
    resp = await client.post(path, json=LOAD)
    assert resp.status == 202
    body = await resp.json()
    assert body["status_url"] == f"/v1/jobs/{body['job_id']}"
    (name, options), = celery.sent
    assert name == task
    assert options["task_id"] == body["job_id"] and options["queue"] == "infer.simple.cpu"
    assert options["priority"] == 4 and options["exchange"] == "" and options["list"] == "infer.simple.cpu\x06\x163"
    assert options["kwargs"]["job"]["symbol"] == "AAPL"
    record = {k.decode(): v.decode() for k, v in sredis.hgetall(KEYS.job(body["job_id"])).items()}
    assert record["kind"] == kind and record["status"] == "queued" and record["model_id"] == "AAPL_1h_patchtst"
    assert record["adapter"] == "simple" and record["device"] == "cpu" and record["queue"] == "infer.simple.cpu"
    assert float(record["enqueued_at"]) == pytest.approx(time.time(), abs=5)


async def test_predict_routes_by_adapter_device_and_priority(client, celery):
    job_id = await enqueue(client, {**PREDICT, "adapter": "torchscript", "device": "cuda", "priority": 9,
                                    "n_steps": 3, "deadline_s": 5})
    (name, options), = celery.sent
    assert name == tasks.PREDICT and options["task_id"] == job_id
    assert options["queue"] == "infer.torchscript.cuda" and options["priority"] == 0
    job = options["kwargs"]["job"]
    assert job["inputs"]["series"] == [[1.0, 2.0], [1.5, 2.5], [2.0, 3.0]]
    assert job["enqueued_at"] == pytest.approx(time.time(), abs=5)


async def test_predict_accepts_a_base64_tensor_in_json(client, celery):
    data = base64.b64encode(np.arange(6, dtype="<f4").tobytes()).decode()
    await enqueue(client, {**PREDICT, "inputs": {"tensor": {"dtype": "float32", "shape": [3, 2], "data": data}}})
    assert celery.sent[0][1]["kwargs"]["job"]["inputs"]["tensor"]["data"] == base64.b64decode(data)


async def test_predict_accepts_msgpack_with_binary_tensor(client, celery):
    raw = np.arange(6, dtype="<f4").tobytes()
    body = msgpack.packb({**PREDICT, "inputs": {"tensor": {"dtype": "float32", "shape": [3, 2], "data": raw}}})
    resp = await client.post("/v1/predict", data=body, headers={"Content-Type": "application/msgpack"})
    assert resp.status == 202 and resp.content_type == "application/json"
    sent = celery.sent[0][1]["kwargs"]["job"]["inputs"]["tensor"]
    assert sent["data"] == raw and sent["shape"] == [3, 2]


@pytest.mark.parametrize("body, field", [
    ({**PREDICT, "symbol": "MSFT"}, "symbol"),
    ({**PREDICT, "version": "7"}, "version"),
])
async def test_unknown_model_is_404_before_enqueueing(client, celery, body, field):
    resp = await client.post("/v1/predict", json=body)
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["type"] == "ModelNotFoundError" and error["field"] == field
    assert celery.sent == []


async def test_batch_validates_each_item(client, celery):
    good = {k: v for k, v in PREDICT.items()}
    resp = await client.post("/v1/predict/batch", json={"requests": [good, good, good, {**good, "inputs": {}}]})
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["type"] == "InvalidInputError" and error["field"] == "requests.3.inputs"
    resp = await client.post("/v1/predict/batch", json={"requests": [good, {**good, "inputs": {"series": [["x"]]}}]})
    assert (await resp.json())["error"]["field"] == "requests.1.inputs.series.0.0"
    assert celery.sent == []


async def test_batch_is_one_job_with_normalised_items(client, celery, sredis):
    other = {"symbol": "aapl", "timeframe": "1h", "model_type": "sentiment", "inputs": {"texts": ["up"]}}
    job_id = await enqueue(client, {"requests": [PREDICT, other], "priority": 7}, "/v1/predict/batch")
    (name, options), = celery.sent
    assert name == tasks.BATCH_PREDICT and options["task_id"] == job_id and options["priority"] == 2
    items = options["kwargs"]["job"]["requests"]
    assert [i["symbol"] for i in items] == ["AAPL", "AAPL"] and all(i["enqueued_at"] for i in items)
    assert sredis.hget(KEYS.job(job_id), "model_id") == b"AAPL_1h_patchtst,AAPL_1h_sentiment"


@pytest.mark.parametrize("item, message", [({"symbol": "msft"}, "not in the model store"),
                                           ({"version": "7"}, "has no version 7")])
async def test_a_batch_item_of_a_model_not_in_the_store_is_404_naming_it(client, celery, sredis, item, message):
    resp = await client.post("/v1/predict/batch", json={"requests": [PREDICT, PREDICT, {**PREDICT, **item}]})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["type"] == "ModelNotFoundError" and error["field"] == "requests.2" and message in error["message"]
    assert celery.sent == [] and sredis.keys(f"{KEYS.prefix}:job:*") == []


async def test_wait_returns_the_document_within_100ms_of_the_result(client, celery, sredis, recorder):
    async def worker() -> float:
        while not celery.sent:
            await asyncio.sleep(0.005)
        job_id = celery.sent[0][1]["task_id"]
        recorder.running(job_id, "w1|1", time.time())
        await asyncio.sleep(0.2)
        published = time.perf_counter()
        store_result(sredis, job_id, "SUCCESS", {"predictions": [[1.0]]})
        return published

    task = asyncio.create_task(worker())
    resp = await client.post("/v1/predict?wait=5", json=PREDICT)
    answered = time.perf_counter()
    published = await task
    assert resp.status == 200
    doc = await resp.json()
    assert doc["status"] == "succeeded" and doc["result"] == {"predictions": [[1.0]]} and doc["worker"] == "w1|1"
    assert answered - published < 0.1


async def test_wait_that_times_out_answers_202(client):
    started = time.perf_counter()
    resp = await client.post("/v1/predict?wait=0.2", json=PREDICT)
    assert resp.status == 202 and "job_id" in await resp.json()
    assert 0.2 <= time.perf_counter() - started < 1.0


async def test_wait_for_a_failed_job_answers_its_typed_error(client, celery, sredis):
    async def worker() -> None:
        while not celery.sent:
            await asyncio.sleep(0.005)
        store_result(sredis, celery.sent[0][1]["task_id"], "FAILURE", failure("PredictionError", "boom"))

    task = asyncio.create_task(worker())
    resp = await client.post("/v1/predict?wait=5", json=PREDICT)
    await task
    doc = await resp.json()
    assert resp.status == 200 and doc["status"] == "failed"
    assert doc["error"] == {"type": "PredictionError", "message": "boom", "field": None,
                            "retryable": False}


@pytest.mark.parametrize("wait", ["0", "-1", "61", "abc", "nan", "inf", ""])
async def test_bad_wait_is_422_naming_wait_and_sends_nothing(client, celery, wait):
    resp = await client.post(f"/v1/predict?wait={wait}", json=PREDICT)
    assert resp.status == 422
    assert (await resp.json())["error"]["field"] == "wait"
    assert celery.sent == []


async def test_redis_down_at_enqueue_is_503_and_leaves_nothing(client, celery, sredis, server):
    server.connected = False  # every command now fails as on a refused connection
    resp = await client.post("/v1/predict", json=PREDICT)
    server.connected = True
    assert resp.status == 503
    assert (await resp.json())["error"]["type"] == "BrokerUnavailableError"
    assert sredis.keys(f"{KEYS.prefix}:job:*") == [] and celery.sent == []


async def test_record_and_message_are_one_transaction(client, celery, sredis, monkeypatch):
    # A MULTI that fails part-way applies nothing: no record without its message, no message without its record.
    from redis.exceptions import ResponseError

    def refuse(self, *args, **kwargs):
        raise ResponseError("WRONGTYPE simulated")

    monkeypatch.setattr("fakeredis.aioredis.FakeRedis.pipeline", lambda self, transaction=True:
                        _FailingPipeline(self, refuse))
    resp = await client.post("/v1/predict", json=PREDICT)
    assert resp.status == 500
    assert sredis.keys(f"{KEYS.prefix}:job:*") == [] and celery.sent == []


class _FailingPipeline:
    """Queues commands like a pipeline and fails at EXEC, before anything is applied."""

    def __init__(self, redis, fail) -> None:
        self.fail = fail

    def __getattr__(self, name):
        return lambda *args, **kwargs: self

    async def execute(self):
        self.fail(self)


async def test_unreachable_redis_answers_503_at_once(aiohttp_client, settings, celery):
    unreachable = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    # The key is never checked: its lookup is the first thing that needs Redis.
    client = await aiohttp_client(create_app(unreachable, celery_app=celery), headers={"X-API-Key": "fsk_x"})
    for method, path, body in (("post", "/v1/predict", PREDICT), ("get", "/v1/jobs/x", None),
                               ("get", "/v1/stats", None), ("get", "/readyz", None)):
        started = time.perf_counter()
        resp = await getattr(client, method)(path, json=body)
        assert resp.status == 503, path
        assert (await resp.json())["error"]["type"] == "BrokerUnavailableError"
        assert time.perf_counter() - started < 1.0
    assert celery.sent == []

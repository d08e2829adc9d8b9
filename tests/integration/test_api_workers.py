"""The API against real Redis and real workers: messages it builds itself (no Celery producer), the shared
job-watch connection, and what Celery's own producer writes for the same job."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import msgpack
import numpy as np
import pytest
import redis as redis_lib

from producer_api.app import create_app, create_redis
from shared import celery_wire, routing, tasks
from shared.celery_app import create_celery_app
from shared.keys import Keys
from tests.helpers import wait_for_async

from workers.training.synthetic import generate_bars

pytestmark = pytest.mark.integration

# Data the model has not seen (another seed than training), in the model's own width.
SERIES = np.ascontiguousarray(generate_bars("AAPL", "1h", n_bars=700, seed=123).values[-200:], dtype="<f4")
PREDICT = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "adapter": "simple", "device": "cpu"}


def tensor_body() -> bytes:
    return msgpack.packb({**PREDICT, "inputs": {"tensor": {"dtype": "float32", "shape": list(SERIES.shape),
                                                           "data": SERIES.tobytes()}}})


@pytest.fixture()
async def api(aiohttp_client, fleet_settings, api_key):
    return await aiohttp_client(create_app(fleet_settings), headers={"X-API-Key": api_key})


def test_built_message_matches_what_send_task_writes(fleet_settings, redis_client) -> None:
    app = create_celery_app(fleet_settings, name="wire-check")
    queue, job_id, job = "infer.simple.cpu", str(uuid.uuid4()), {"symbol": "AAPL", "data": b"\x00\x01\x02"}
    try:
        app.send_task(tasks.PREDICT, kwargs={"job": job}, task_id=job_id, queue=queue, priority=4, exchange="",
                      serializer="msgpack", retry=False)
    finally:
        app.close()
    key, ours = celery_wire.task_message(tasks.PREDICT, job_id, {"job": job}, queue, 4)
    assert key == "infer.simple.cpu\x06\x163" and redis_client.llen(key) == 1
    theirs = json.loads(redis_client.rpop(key))
    mine = json.loads(ours)
    assert base64.b64decode(mine["body"]) == base64.b64decode(theirs["body"])
    assert {k: v for k, v in mine.items() if k not in ("body", "headers", "properties")} == \
        {k: v for k, v in theirs.items() if k not in ("body", "headers", "properties")}
    # ignore_result: Celery 5.6 writes False, 5.7 None (both leave it to the task); ours is None on purpose
    assert mine["headers"]["ignore_result"] is None and not theirs["headers"]["ignore_result"]
    volatile_headers, volatile_props = {"origin", "kwargsrepr", "ignore_result"}, {"delivery_tag", "reply_to"}
    assert {k: v for k, v in mine["headers"].items() if k not in volatile_headers} == \
        {k: v for k, v in theirs["headers"].items() if k not in volatile_headers}
    assert {k: v for k, v in mine["properties"].items() if k not in volatile_props} == \
        {k: v for k, v in theirs["properties"].items() if k not in volatile_props}


async def test_api_jobs_are_served_by_both_engines(api, start_worker, redis_client, engine) -> None:
    start_worker(engine=engine, concurrency=1)
    headers = {"Content-Type": "application/msgpack"}
    resp = await api.post("/v1/predict?wait=30", data=tensor_body(), headers=headers)
    doc = await resp.json()
    assert resp.status == 200 and doc["status"] == "succeeded", doc["error"]
    assert np.asarray(doc["result"]["predictions"]).shape[1] == SERIES.shape[1]
    # The stored result is the forecast itself: a Celery worker never writes its task summary over it. Both
    # engines acknowledge only after every write of theirs, so once the message is acked nothing comes later.
    async def acked() -> bool:
        return redis_client.hlen("unacked") == 0 and redis_client.llen(routing.queue_name("simple", "cpu")) == 0
    await wait_for_async(acked, 10, "the job's message to be acknowledged")
    again = await (await api.get(f"/v1/jobs/{doc['job_id']}")).json()
    assert again["status"] == "succeeded" and again["result"]["predictions"] == doc["result"]["predictions"]
    # Many requests waiting at once share one pub/sub connection, and each gets its own job's document.
    resps = await asyncio.gather(*(api.post("/v1/predict?wait=30", data=tensor_body(), headers=headers)
                                   for _ in range(24)))
    docs = [await r.json() for r in resps]
    assert all(r.status == 200 for r in resps) and len({d["job_id"] for d in docs}) == 24
    assert all(d["status"] == "succeeded" for d in docs), [d["error"] for d in docs if d["error"]][:1]
    for d in docs:  # the same input: the same forecast (a batched forward differs only in rounding)
        np.testing.assert_allclose(d["result"]["predictions"], doc["result"]["predictions"], rtol=1e-4, atol=1e-4)
    subscribers = [c for c in redis_client.client_list(_type="pubsub") if "api-watch-idle" in c.get("cmd", "")
                   or int(c.get("sub", 0)) > 0]
    assert len(subscribers) <= 1  # the API's shared connection (and no per-request subscriptions left over)


async def test_watch_survives_a_dropped_connection(api, start_worker, fleet_settings) -> None:
    # The job waits in the queue while the watch connection is killed; its end is still seen.
    resp = await api.post("/v1/predict", data=tensor_body(), headers={"Content-Type": "application/msgpack"})
    job_id = (await resp.json())["job_id"]
    waiter = asyncio.create_task(api.get(f"/v1/jobs/{job_id}?wait=30"))
    killer = redis_lib.Redis.from_url(fleet_settings.redis_url)

    async def watching() -> bool:  # the wait's subscription is live on the shared connection
        return killer.pubsub_numsub(Keys(fleet_settings.redis_key_prefix).job_events(job_id))[0][1] == 1
    await wait_for_async(watching, 10, "the wait to subscribe")
    assert killer.client_kill_filter(_type="pubsub") >= 1
    start_worker(concurrency=1)
    resp = await asyncio.wait_for(waiter, 40)
    doc = await resp.json()
    assert resp.status == 200 and doc["status"] == "succeeded", doc["error"]


async def test_submit_without_a_live_redis_is_503(fleet_settings, api_key) -> None:
    # The enqueue MULTI is the only write: with Redis gone nothing is half-done and the client hears so at once.
    down = fleet_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    redis = create_redis(down)
    try:
        from aiohttp.test_utils import TestClient, TestServer

        async with TestClient(TestServer(create_app(down, redis=redis))) as client:
            resp = await client.post("/v1/predict?wait=5", data=tensor_body(),
                                     headers={"Content-Type": "application/msgpack", "X-API-Key": api_key})
            assert resp.status == 503 and (await resp.json())["error"]["type"] == "BrokerUnavailableError"
    finally:
        await redis.aclose()


def test_priority_lists_follow_kombu() -> None:
    sep = "\x06\x16"  # kombu's default separator: a client configured with the broker URL alone uses it
    assert [routing.priority_list("q", p) for p in range(10)] == \
        ["q", "q", "q", f"q{sep}3", f"q{sep}3", f"q{sep}3", f"q{sep}6", f"q{sep}6", f"q{sep}6", f"q{sep}9"]
    assert routing.redis_list_keys("q") == ["q", f"q{sep}3", f"q{sep}6", f"q{sep}9"]

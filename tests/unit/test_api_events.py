"""The job events WebSocket: current state first, each change, close after the final one."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from producer_api import watch

from tests.unit.test_api_helpers import (aredis, celery, client, enqueue, recorder, server,  # noqa: F401
                                         settings, sredis, store_result)


async def _next(ws: aiohttp.ClientWebSocketResponse) -> dict:
    return await asyncio.wait_for(ws.receive_json(), 2)


async def test_stream_pushes_each_state_then_closes(client, recorder, sredis):
    job_id = await enqueue(client, {"requests": [{"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment",
                                                  "inputs": {"texts": ["up"]}}]}, "/v1/predict/batch")
    async with client.ws_connect(f"/v1/jobs/{job_id}/events") as ws:
        assert (await _next(ws))["status"] == "queued"
        recorder.running(job_id, "w|1", time.time(), total=2)
        doc = await _next(ws)
        assert doc["status"] == "running" and doc["progress"] == {"done": 0, "total": 2}
        recorder.progress(job_id, 1, 2)
        assert (await _next(ws))["progress"] == {"done": 1, "total": 2}
        store_result(sredis, job_id, "SUCCESS", {"items": [], "total": 1, "succeeded": 1, "failed": 0})
        final = await _next(ws)
        assert final["status"] == "succeeded" and final["result"]["succeeded"] == 1
        closing = await asyncio.wait_for(ws.receive(), 2)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_stream_of_a_finished_job_sends_one_document(client, sredis):
    job_id = await enqueue(client)
    store_result(sredis, job_id, "SUCCESS", {})
    async with client.ws_connect(f"/v1/jobs/{job_id}/events") as ws:
        assert (await _next(ws))["status"] == "succeeded"
        assert (await asyncio.wait_for(ws.receive(), 2)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_unknown_job_is_404_before_upgrading(client):
    resp = await client.get("/v1/jobs/nope/events", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                               "Sec-WebSocket-Version": "13",
                                                               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "JobNotFoundError"


async def test_client_leaving_early_ends_the_stream(client, monkeypatch):
    # NOTE: fakeredis keeps a closed pub/sub's channels subscribed (real Redis drops them with the connection),
    # so the test watches the subscription being closed rather than the server's subscriber count.
    closed: list[str] = []
    original = watch.JobWatch.__aexit__

    async def spy(self, *exc):
        await original(self, *exc)
        closed.append(self.job_id)

    monkeypatch.setattr(watch.JobWatch, "__aexit__", spy)
    job_id = await enqueue(client)
    async with client.ws_connect(f"/v1/jobs/{job_id}/events") as ws:
        assert (await _next(ws))["status"] == "queued"
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed == [job_id]

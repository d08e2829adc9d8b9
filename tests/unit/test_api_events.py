"""The job events WebSocket: current state first, each change, close after the final one; caps per key and
overall, a longest life, and a close when the job's record expires."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from producer_api import watch
from producer_api.app import create_app
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, enqueue, make_key,  # noqa: F401
                                         make_store, recorder, server, settings, settings_for, sredis, store_result)


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


UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture
async def capped(aiohttp_client, tmp_path, aredis, celery):
    """An app with small socket caps (2 per key, 3 in all) and sockets that live 0.3 s."""
    settings = settings_for(make_store(tmp_path / "store"), api_max_websockets=3, api_max_websockets_per_key=2,
                            api_websocket_max_seconds=0.3)
    return await aiohttp_client(create_app(settings, redis=aredis, celery_app=celery))


async def _key(aredis, name: str) -> dict[str, str]:
    return {"X-API-Key": await make_key(aredis, name, ("submit", "read"))}


async def test_sockets_are_capped_per_key_and_overall_before_the_upgrade(capped, aredis):
    alice, bob = await _key(aredis, "alice"), await _key(aredis, "bob")
    job_id = (await (await capped.post("/v1/predict", json=PREDICT, headers=alice)).json())["job_id"]
    bob_job = (await (await capped.post("/v1/predict", json=PREDICT, headers=bob)).json())["job_id"]
    async with capped.ws_connect(f"/v1/jobs/{job_id}/events", headers=alice) as a1, \
            capped.ws_connect(f"/v1/jobs/{job_id}/events", headers=alice) as a2:
        await _next(a1), await _next(a2)
        resp = await capped.get(f"/v1/jobs/{job_id}/events", headers={**UPGRADE, **alice})
        error = (await resp.json())["error"]
        assert resp.status == 429 and error["type"] == "TooManySocketsError" and error["retryable"] is True
        async with capped.ws_connect(f"/v1/jobs/{bob_job}/events", headers=bob) as b1:
            await _next(b1)
            resp = await capped.get(f"/v1/jobs/{bob_job}/events", headers={**UPGRADE, **bob})
            error = (await resp.json())["error"]
            assert resp.status == 503 and error["type"] == "SocketsExhaustedError"
    # closed sockets give their slots back
    async with capped.ws_connect(f"/v1/jobs/{job_id}/events", headers=alice) as again:
        assert (await _next(again))["status"] == "queued"


async def test_a_socket_is_closed_after_its_max_seconds(capped, aredis):
    alice = await _key(aredis, "alice")
    job_id = (await (await capped.post("/v1/predict", json=PREDICT, headers=alice)).json())["job_id"]
    started = time.perf_counter()
    async with capped.ws_connect(f"/v1/jobs/{job_id}/events", headers=alice) as ws:
        assert (await _next(ws))["status"] == "queued"
        closing = await asyncio.wait_for(ws.receive(), 2)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
    assert 0.3 <= time.perf_counter() - started < 1.5


async def test_a_socket_is_closed_when_its_jobs_record_expires(client, sredis, monkeypatch):
    monkeypatch.setattr(watch, "RECHECK_S", 0.05)  # the re-read that notices: no event announces an expiry
    job_id = await enqueue(client)
    async with client.ws_connect(f"/v1/jobs/{job_id}/events") as ws:
        assert (await _next(ws))["status"] == "queued"
        sredis.delete(KEYS.job(job_id))  # as its TTL would
        closing = await asyncio.wait_for(ws.receive(), 2)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY

"""Jobs belong to the key that submitted them: another key reads, waits on, watches and cancels them exactly as
it would an unknown job (404); admin keys see every job; without auth there is one caller, who sees all."""

from __future__ import annotations

import asyncio

import pytest

from producer_api.app import create_app
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, make_key, server, settings,  # noqa: F401
                                         sredis, store_result)

UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@pytest.fixture
async def api(aiohttp_client, settings, aredis, celery):
    """A client that sends no key of its own: each request names its caller."""
    return await aiohttp_client(create_app(settings, redis=aredis, celery_app=celery))


@pytest.fixture
async def keys(aredis) -> dict[str, dict[str, str]]:
    """Headers of two ordinary keys (submit + read) and an admin."""
    found = {}
    for name, scopes in (("alice", ("submit", "read")), ("bob", ("submit", "read")), ("root", ("admin",))):
        found[name] = {"X-API-Key": await make_key(aredis, name, scopes)}
    return found


async def _submit(api, headers, path: str = "/v1/predict", body: dict | None = None) -> str:
    resp = await api.post(path, json=body or PREDICT, headers=headers)
    assert resp.status == 202, await resp.text()
    return (await resp.json())["job_id"]


def _same_as_unknown(error: dict, job_id: str) -> dict:
    """The error with the job id taken out: a job of another key must read exactly as an unknown one."""
    return {**error, "message": error["message"].replace(job_id, "<id>")}


async def test_the_owner_is_recorded_and_not_shown(api, keys, sredis):
    job_id = await _submit(api, keys["alice"])
    assert sredis.hget(KEYS.job(job_id), "owner") == b"alice"
    doc = await (await api.get(f"/v1/jobs/{job_id}", headers=keys["alice"])).json()
    assert doc["status"] == "queued" and "owner" not in doc


async def test_another_key_gets_404_exactly_as_for_an_unknown_job(api, keys, sredis):
    job_id = await _submit(api, keys["alice"])
    unknown_id = "00000000-0000-4000-8000-000000000000"
    unknown = await api.get(f"/v1/jobs/{unknown_id}", headers=keys["bob"])
    expected = _same_as_unknown((await unknown.json())["error"], unknown_id)
    for method, path in (("get", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}?wait=0.05"),
                         ("delete", f"/v1/jobs/{job_id}")):
        resp = await getattr(api, method)(path, headers=keys["bob"])
        assert resp.status == 404, (method, path)
        assert _same_as_unknown((await resp.json())["error"], job_id) == expected, (method, path)
    resp = await api.get(f"/v1/jobs/{job_id}/events", headers={**UPGRADE, **keys["bob"]})
    assert resp.status == 404 and _same_as_unknown((await resp.json())["error"], job_id) == expected
    # bob's attempts changed nothing: the job is still queued, not flagged for cancelling
    assert sredis.hget(KEYS.job(job_id), "status") == b"queued" and not sredis.exists(KEYS.job_cancelled(job_id))


async def test_the_owner_and_admins_see_the_job_everywhere(api, keys, sredis):
    job_id = await _submit(api, keys["alice"], "/v1/predict/batch", {"requests": [PREDICT]})
    for who in ("alice", "root"):
        assert (await api.get(f"/v1/jobs/{job_id}", headers=keys[who])).status == 200
        async with api.ws_connect(f"/v1/jobs/{job_id}/events", headers=keys[who]) as ws:
            assert (await asyncio.wait_for(ws.receive_json(), 2))["job_id"] == job_id
    store_result(sredis, job_id, "SUCCESS", {"items": [], "total": 1, "succeeded": 1, "failed": 0})
    doc = await (await api.get(f"/v1/jobs/{job_id}?wait=1", headers=keys["root"])).json()
    assert doc["status"] == "succeeded"
    other = await _submit(api, keys["bob"])
    resp = await api.delete(f"/v1/jobs/{other}", headers=keys["root"])
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"


async def test_submitting_with_wait_reads_back_the_callers_own_job(api, keys, celery, sredis):
    async def worker() -> None:
        while not celery.sent:
            await asyncio.sleep(0.005)
        store_result(sredis, celery.sent[0][1]["task_id"], "SUCCESS", {"predictions": [[1.0]]})

    task = asyncio.create_task(worker())
    resp = await api.post("/v1/predict?wait=5", json=PREDICT, headers=keys["alice"])
    await task
    assert resp.status == 200 and (await resp.json())["status"] == "succeeded"


async def test_a_job_without_an_owner_is_seen_by_admins_only(api, keys, sredis):
    # what a plain Celery producer leaves: a result (and maybe a record) that names no owner
    store_result(sredis, "celery-made-1", "SUCCESS", {"model_id": "X", "unloaded": True})
    assert (await api.get("/v1/jobs/celery-made-1", headers=keys["alice"])).status == 404
    assert (await api.get("/v1/jobs/celery-made-1", headers=keys["root"])).status == 200


async def test_without_auth_the_one_caller_sees_every_job(aiohttp_client, settings, aredis, celery, sredis):
    open_api = await aiohttp_client(create_app(settings.model_copy(update={"api_auth_enabled": False}),
                                               redis=aredis, celery_app=celery))
    job_id = await _submit(open_api, {})
    assert sredis.hget(KEYS.job(job_id), "owner") == b"anonymous"
    assert (await open_api.get(f"/v1/jobs/{job_id}")).status == 200
    sredis.hdel(KEYS.job(job_id), "owner")
    assert (await open_api.get(f"/v1/jobs/{job_id}")).status == 200

"""The real Flower that ``fleet up`` starts: it sees the worker pool and the jobs it ran (through Celery events)."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.e2e.conftest import FleetUp, basic_auth
from tests.helpers import wait_for_async
from workers.training.synthetic import generate_bars

FORECAST = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "n_steps": 12,
            "inputs": {"series": generate_bars("AAPL", "1h", n_bars=200, seed=5).values[-96:].tolist()}}


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, f"{url}: {resp.status} {await resp.text()}"
        return await resp.json()


async def test_flower_lists_the_worker_and_a_finished_predict(fleet: FleetUp, api: aiohttp.ClientSession):
    flower = fleet.flower_url
    credentials = basic_auth(*fleet.flower_credentials)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), headers=credentials) as session:
        async def pool_worker() -> tuple[str, dict] | None:
            # NOTE: refresh=1 makes Flower ask the workers now (inspect) instead of answering from its cache.
            workers = await get_json(session, f"{flower}/api/workers?refresh=1")
            found = [(name, info) for name, info in workers.items()
                     if name.startswith("simple-cpu-") and info.get("stats") and info.get("active_queues")]
            return found[0] if found else None

        name, info = await wait_for_async(pool_worker, 60, "Flower to list the worker pool", interval=0.5)
        assert info["stats"]["pool"]["max-concurrency"] == 2, info["stats"]["pool"]  # fleet up -c 2
        assert [q["name"] for q in info["active_queues"]] == ["infer.simple.cpu"]

        async with api.post("/v1/predict?wait=10", json=FORECAST) as resp:
            assert resp.status == 200
            job_id = (await resp.json())["job_id"]

        async def task_seen() -> dict | None:
            tasks = await get_json(session, f"{flower}/api/tasks")
            task = tasks.get(job_id)
            return task if task and task.get("state") == "SUCCESS" else None

        task = await wait_for_async(task_seen, 30, "Flower to show the predict as SUCCESS", interval=0.25)
        assert task["name"] == "fleet.predict" and task["worker"] == name, task
        info = await get_json(session, f"{flower}/api/task/info/{job_id}")
        assert info["state"] == "SUCCESS" and info["uuid"] == job_id


async def test_flower_needs_its_credentials_and_its_control_api_is_closed(fleet: FleetUp):
    flower = fleet.flower_url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for method, path in (("GET", "/"), ("GET", "/api/workers"), ("POST", "/api/worker/shutdown/any"),
                             ("POST", "/api/task/revoke/any?terminate=true"),
                             ("POST", "/api/worker/queue/cancel-consumer/any?queue=infer.simple.cpu")):
            async with session.request(method, f"{flower}{path}", headers={"Origin": "http://evil.example"}) as resp:
                # 401 without credentials; a cross-site POST is refused earlier still, by Flower's XSRF check
                assert resp.status in ((401,) if method == "GET" else (401, 403)), (method, path, resp.status)
                assert resp.headers.get("Access-Control-Allow-Origin") is None
        wrong = basic_auth(fleet.flower_credentials[0], "not-the-password")
        async with session.get(f"{flower}/api/workers", headers=wrong) as resp:
            assert resp.status == 401

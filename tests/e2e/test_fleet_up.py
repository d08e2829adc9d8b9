"""``fleet up`` as a user runs it: jobs through HTTP and WebSocket, stats, metrics, errors, the docs and the demo.

Jobs that must be seen ``queued`` are sent while :class:`Busy` holds every worker process (``fleet up -c 2``;
each process prefetches one message, so a third waits in Redis until a process is free). The test decides
when they start by releasing the hold, so nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import FleetUp
from tests.helpers import free_port, wait_for, wait_for_async
from workers.training.synthetic import generate_bars

MODEL = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst"}
MODEL_ID = "AAPL_1h_patchtst"
#: A window the model has not trained on (another seed), as long as the model's context.
SERIES = generate_bars("AAPL", "1h", n_bars=400, seed=11).values[-96:]
#: The same window in the compact wire form (base64 float32): 2.6 kB an item instead of 10.
TENSOR = {"dtype": "float32", "shape": list(SERIES.shape),
          "data": base64.b64encode(np.ascontiguousarray(SERIES, dtype="<f4").tobytes()).decode()}
#: Worker processes of the fleet under test (``fleet up -c 2``).
PROCESSES = 2
FINAL = ("succeeded", "failed", "cancelled", "expired")


def forecast(n_steps: int = 12, channels: int = 5, **extra: Any) -> dict[str, Any]:
    return {**MODEL, "inputs": {"series": SERIES[:, :channels].tolist()}, "n_steps": n_steps, **extra}


def compact_forecast(n_steps: int = 12) -> dict[str, Any]:
    return {**MODEL, "inputs": {"tensor": TENSOR}, "n_steps": n_steps}


def long_batch() -> dict[str, Any]:
    """A batch that keeps a worker process busy for seconds: 32 chunks of 32 forecasts of 256 steps (11 forwards
    each). Workers check for a cancel between chunks, so a cancelled one stops within a chunk."""
    return {"requests": [compact_forecast(n_steps=256)] * 1024}


def json_body(body: Any) -> dict[str, Any]:
    """Request arguments for a JSON body (a stream: aiohttp warns about raw bodies over 1 MB)."""
    if body is None:
        return {}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return {"data": io.BytesIO(raw), "headers": {"Content-Type": "application/json"}}


async def send(api: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with api.request(method, path, **json_body(body)) as resp:
        return resp.status, await resp.json()


async def submit(api: aiohttp.ClientSession, path: str, body: Any) -> str:
    status, accepted = await send(api, "POST", path, body)
    assert status == 202, accepted
    assert accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    return accepted["job_id"]


async def document(api: aiohttp.ClientSession, job_id: str, wait: float | None = None) -> dict[str, Any]:
    status, doc = await send(api, "GET", f"/v1/jobs/{job_id}" + (f"?wait={wait}" if wait else ""))
    assert status == 200, doc
    return doc


async def settled(api: aiohttp.ClientSession, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The job's document once it is final and its worker wrote its outcome (a cancelled job is final as soon
    as the API marks it; the worker that stops it or drops its message writes later)."""
    async def done() -> dict[str, Any] | None:
        doc = await document(api, job_id, wait=5)
        return doc if doc["status"] in FINAL and doc["timings"]["inference_ms"] is not None else None

    return await wait_for_async(done, timeout, f"job {job_id} to settle")


async def events(api: aiohttp.ClientSession, job_id: str, first: asyncio.Event | None = None,
                 timeout: float = 60) -> list[tuple[float, dict]]:
    """Every document the job's event socket sends, with its arrival time, until the server closes it.

    Args:
        first: Set once the first document (the state when the socket opened) has arrived.
    """
    received: list[tuple[float, dict]] = []
    async with asyncio.timeout(timeout):
        async with api.ws_connect(f"/v1/jobs/{job_id}/events") as ws:
            async for msg in ws:
                assert msg.type == aiohttp.WSMsgType.TEXT, msg
                received.append((time.time(), json.loads(msg.data)))
                if first is not None:
                    first.set()
    return received


async def running(api: aiohttp.ClientSession, job_ids: list[str], timeout: float = 30) -> None:
    async def all_running() -> bool:
        docs = [await document(api, job) for job in job_ids]
        if any(d["status"] in FINAL for d in docs):
            raise AssertionError(f"a job ended before the test released it: {docs}")
        return all(d["status"] == "running" for d in docs)

    deadline = time.monotonic() + timeout
    while not await all_running():
        assert time.monotonic() < deadline, f"jobs {job_ids} not running within {timeout} s"
        await asyncio.sleep(0.05)


class Busy:
    """Hold every worker process with a :func:`long_batch` until :meth:`release` (or the end of the block)."""

    def __init__(self, api: aiohttp.ClientSession) -> None:
        self.api = api
        self.jobs: list[str] = []
        self.released = False

    async def __aenter__(self) -> "Busy":
        self.jobs = [await submit(self.api, "/v1/predict/batch", long_batch()) for _ in range(PROCESSES)]
        await running(self.api, self.jobs)
        return self

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        for job in self.jobs:
            status, doc = await send(self.api, "DELETE", f"/v1/jobs/{job}")
            # 202: a running job is asked to stop (its worker records how it ends)
            assert status == 202 and doc["cancel_requested"], \
                f"the hold ended before its release, so the test proved nothing: {doc}"

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()
        for job in self.jobs:  # no work of this test may leak into the next one
            assert (await settled(self.api, job))["status"] == "cancelled"


def assert_forecast(result: dict[str, Any], n_steps: int = 12) -> None:
    preds = result["predictions"]
    assert len(preds) == n_steps and all(len(row) == 5 for row in preds)
    assert all(math.isfinite(v) for row in preds for v in row)
    assert 0 <= result["confidence_score"] <= 1 and result["model_info"]["model_id"] == MODEL_ID


async def test_fleet_runs_on_embedded_redis_in_the_state_dir(fleet: FleetUp, model_store: Path, api):
    out = fleet.output()
    assert "Embedded Redis on redis://127.0.0.1:" in out, out
    state = fleet.home / "finsight-fleet"
    assert any(path.name.startswith("appendonly") for path in (state / "redis").iterdir())  # AOF on
    assert {"api.log", "worker.log", "flower.log", "redis.log"} <= {log.name for log in fleet.logs_dir.iterdir()}
    assert "Demo models created" in out  # the store was empty: fleet up trained the demo models into it
    status, listed = await send(api, "GET", "/v1/models")
    assert status == 200
    assert {m["model_id"] for m in listed["models"]} == {MODEL_ID, "AAPL_1h_sentiment"}
    assert {path.name for path in (model_store / "AAPL" / "1h").iterdir()} == {"patchtst", "sentiment"}
    status, ready = await send(api, "GET", "/readyz")
    assert status == 200 and ready["status"] == "ready" and ready["workers"]["infer.simple.cpu"] >= 1, ready


async def test_every_v1_route_needs_the_key_fleet_up_printed(fleet: FleetUp, api):
    async with aiohttp.ClientSession(base_url=fleet.api_url) as anonymous:
        async with anonymous.post("/v1/predict", json=MODEL) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["type"] == "AuthenticationError"
        async with anonymous.get("/healthz") as resp:
            assert resp.status == 200
    status, made = await send(api, "POST", "/v1/keys", {"name": "e2e-reader", "scopes": ["read"]})
    assert status == 201, made
    async with aiohttp.ClientSession(base_url=fleet.api_url, headers={"X-API-Key": made["key"]}) as reader:
        async with reader.post("/v1/predict", json=MODEL) as resp:
            assert resp.status == 403
        async with reader.get("/v1/models") as resp:
            assert resp.status == 200


def test_tritonclient_grpc_forecasts_through_the_fleet(fleet: FleetUp):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(fleet.grpc_address)
    try:
        headers = {"x-api-key": fleet.api_key}
        assert client.is_server_ready()
        meta = client.get_model_metadata(MODEL_ID, headers=headers, as_json=True)
        assert meta["inputs"][0]["shape"] == ["-1", "5"]
        series = np.ascontiguousarray(generate_bars("AAPL", "1h", n_bars=300, seed=5).values[-200:], dtype="<f4")
        tensor = grpcclient.InferInput("series", list(series.shape), "FP32")
        tensor.set_data_from_numpy(series)
        result = client.infer(MODEL_ID, [tensor], headers=headers, parameters={"n_steps": 12})
        predictions = result.as_numpy("predictions")
        assert predictions.shape == (12, 5) and np.isfinite(predictions).all()
    finally:
        client.close()


async def test_load_job_loads_the_model(api):
    job_id = await submit(api, "/v1/models/load", MODEL)
    doc = await document(api, job_id, wait=30)
    assert doc["status"] == "succeeded" and doc["kind"] == "load", doc
    assert doc["result"]["is_loaded"] is True and doc["result"]["model_id"] == MODEL_ID

    async def listed_as_loaded() -> bool:
        status, body = await send(api, "GET", "/v1/models")
        assert status == 200
        return any(m["model_id"] == MODEL_ID and m["loaded_on"] for m in body["models"])

    await wait_for_async(listed_as_loaded, 15, "/v1/models to show the model loaded on a worker")


async def test_predict_with_wait_answers_the_forecast(api):
    status, doc = await send(api, "POST", "/v1/predict?wait=10", forecast(n_steps=12))
    assert status == 200, doc
    assert doc["status"] == "succeeded" and doc["kind"] == "predict" and doc["error"] is None
    assert_forecast(doc["result"])
    assert doc["worker"] and doc["adapter"] == "simple" and doc["device"] == "cpu"


async def test_batch_progress_streams_over_the_websocket(api):
    # Three chunks of the worker's batch size (32); 360 steps make each chunk last tens of milliseconds, so the
    # stream has time to show each step instead of coalescing them.
    good, bad_index, steps = 70, 33, 360
    requests = [forecast(n_steps=steps) for _ in range(good)]
    requests.insert(bad_index, forecast(n_steps=steps, channels=3))
    async with Busy(api) as busy:
        job_id = await submit(api, "/v1/predict/batch", {"requests": requests})
        opened = asyncio.Event()
        stream = asyncio.create_task(events(api, job_id, first=opened))
        await asyncio.wait_for(opened.wait(), 10)
        await busy.release()
        docs = [doc for _, doc in await stream]
    statuses = [doc["status"] for doc in docs]
    assert statuses[0] == "queued", statuses
    progress = [doc["progress"] for doc in docs if doc["status"] == "running" and doc["progress"]]
    assert any(p["done"] < p["total"] for p in progress), statuses
    assert all(p["total"] == good + 1 for p in progress), progress
    dones = [doc["progress"]["done"] for doc in docs if doc["progress"]]
    assert dones == sorted(dones), dones
    assert statuses[-1] == "succeeded" and statuses.count("succeeded") == 1, statuses  # closed after the final
    last = docs[-1]
    assert last["progress"] == {"done": good + 1, "total": good + 1}
    result = last["result"]
    assert (result["total"], result["succeeded"], result["failed"]) == (good + 1, good, 1)
    assert [item["index"] for item in result["items"]] == list(range(good + 1))
    bad = result["items"][bad_index]
    assert bad["result"] is None and bad["error"]["type"] == "InvalidInputError", bad
    assert "channels" in bad["error"]["message"]
    for item in result["items"][:bad_index] + result["items"][bad_index + 1:]:
        assert item["error"] is None
        assert_forecast(item["result"], n_steps=steps)
    assert (await document(api, job_id))["result"] == result


async def test_cancel_a_queued_batch(api):
    async with Busy(api):
        job_id = await submit(api, "/v1/predict/batch", {"requests": [compact_forecast()] * 300})
        assert (await document(api, job_id))["status"] == "queued"
        status, doc = await send(api, "DELETE", f"/v1/jobs/{job_id}")
        assert status == 200, doc
        assert doc["status"] == "cancelled" and doc["error"]["type"] == "JobCancelledError", doc
        behind = await submit(api, "/v1/predict", compact_forecast())  # queued behind the cancelled batch
    # once the job queued behind it ran, a worker has taken the cancelled batch off the queue: it skipped it
    # (its record said cancelled) without running an item or rewriting the API's account
    assert (await document(api, behind, wait=30))["status"] == "succeeded"
    after = await document(api, job_id)
    assert after["status"] == "cancelled" and after["error"] == doc["error"], after
    assert after["result"] is None and after["progress"] is None, after  # not one item ran
    status, again = await send(api, "DELETE", f"/v1/jobs/{job_id}")
    assert status == 409 and again["error"]["type"] == "JobFinishedError", again


async def test_cancel_a_running_batch_stops_it_between_chunks(api):
    job_id = await submit(api, "/v1/predict/batch", long_batch())
    total = len(long_batch()["requests"])
    async with api.ws_connect(f"/v1/jobs/{job_id}/events") as ws:
        async with asyncio.timeout(60):
            async for msg in ws:
                doc = json.loads(msg.data)
                assert doc["status"] in ("queued", "running"), doc
                if doc["progress"] and 0 < doc["progress"]["done"] < total:
                    break
        status, doc = await send(api, "DELETE", f"/v1/jobs/{job_id}")
    assert status == 202 and doc["cancel_requested"] and doc["status"] == "running", doc
    doc = await settled(api, job_id)
    assert doc["status"] == "cancelled" and doc["error"]["type"] == "JobCancelledError", doc
    assert doc["result"] is None and doc["progress"]["done"] < total, doc["progress"]


async def test_wait_returns_as_soon_as_a_queued_job_ends(api):
    async with Busy(api) as busy:
        sent_at = time.time()
        job_id = await submit(api, "/v1/predict", forecast())
        assert (await document(api, job_id))["status"] == "queued"
        opened = asyncio.Event()
        stream = asyncio.create_task(events(api, job_id, first=opened))
        await asyncio.wait_for(opened.wait(), 10)
        wait_sent_at = time.time()
        waiting = asyncio.create_task(document(api, job_id, wait=10))
        await asyncio.sleep(0)  # the wait's request goes out before the release lets the job start
        await busy.release()
        doc = await waiting
        returned_at = time.time()
        stream_docs = await stream
    assert doc["status"] == "succeeded", doc
    assert stream_docs[0][1]["status"] == "queued" and stream_docs[-1][1]["status"] == "succeeded"
    ws_final_at = stream_docs[-1][0]
    timings = (await settled(api, job_id))["timings"]
    # The API stamps enqueued_at after we sent the request: the job finished at this time or later, so ``late``
    # is an upper bound of how long after the job's end the wait answered.
    finished_at_least = sent_at + timings["total_ms"] / 1000
    late = returned_at - finished_at_least
    print(f"\nwait: held {1000 * (returned_at - wait_sent_at):.0f} ms, answered at most {1000 * late:.1f} ms after "
          f"the job finished; websocket final event {1000 * (ws_final_at - returned_at):+.1f} ms from it")
    # The job could only start once the hold was released, after the wait went out: its start (bounded from
    # below like its end) comes after the wait, so the wait was pending while the job ran. (A fixed margin on
    # the end time, 20 ms, failed once the fleet got fast enough to run the job in 17.)
    started_at_least = sent_at + timings["queued_ms"] / 1000
    assert started_at_least > wait_sent_at, "the wait must have been pending while the job ran"
    assert late < 0.1, (late, timings)
    assert abs(ws_final_at - returned_at) < 0.1


async def test_stats_count_the_predictions(api):
    status, before = await send(api, "GET", "/v1/stats")
    assert status == 200
    for _ in range(3):
        status, doc = await send(api, "POST", "/v1/predict?wait=10", forecast())
        assert status == 200 and doc["status"] == "succeeded", doc
    status, after = await send(api, "GET", "/v1/stats")
    fleet, model = after["fleet"], after["models"][MODEL_ID]
    assert fleet["total_predictions"] == before["fleet"]["total_predictions"] + 3
    assert fleet["successful_predictions"] == before["fleet"]["successful_predictions"] + 3
    assert model["successful_predictions"] == before["models"][MODEL_ID]["successful_predictions"] + 3
    assert fleet["models_loaded"] >= 1 and model["models_loaded"] >= 1 and 0 < fleet["success_rate"] <= 1
    assert fleet["average_inference_time_ms"] > 0 and fleet["latency_histogram_ms"]["+Inf"] >= 3
    assert len(after["workers"]) == PROCESSES, after["workers"]  # one entry per worker process
    served = sum(w["successful_predictions"] for w in after["workers"].values())
    assert served - sum(w["successful_predictions"] for w in before["workers"].values()) == 3


async def test_metrics_parse_as_prometheus_text(api):
    status, _ = await send(api, "POST", "/v1/predict?wait=10", forecast())
    assert status == 200
    async with api.get("/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        text = await resp.text()
    status, stats = await send(api, "GET", "/v1/stats")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {name: fam.samples for name, fam in families.items()}

    jobs = {(s.labels["kind"], s.labels["status"]) for s in samples["fleet_api_jobs"] if s.name.endswith("_total")}
    assert ("predict", "queued") in jobs, jobs
    for histogram in ("fleet_api_job_latency_seconds", "fleet_inference_latency_seconds"):
        assert families[histogram].type == "histogram"
        assert any(s.name == f"{histogram}_count" and s.value >= 1 for s in samples[histogram]), histogram
        assert any(s.name == f"{histogram}_bucket" and s.labels["le"] == "+Inf" for s in samples[histogram])
    depth = {s.labels["queue"]: s.value for s in samples["fleet_queue_depth"]}
    assert depth["infer.simple.cpu"] == 0, depth
    assert samples["fleet_models_loaded"][0].value >= 1
    assert samples["fleet_workers_live"][0].value == PROCESSES
    assert 0 < samples["fleet_cache_hit_ratio"][0].value <= 1
    assert samples["fleet_cache_hit_ratio"][0].value == pytest.approx(stats["fleet"]["cache_hit_ratio"])
    ok = [s.value for s in samples["fleet_predictions"] if s.labels.get("status") == "ok"]
    assert ok == [stats["fleet"]["successful_predictions"]]


ERROR_CASES = [
    # (method, path, body (bytes: sent as they are), status, error type, field)
    ("POST", "/v1/predict", forecast(n_steps=0), 422, "InvalidInputError", "n_steps"),
    ("POST", "/v1/predict", {**MODEL, "n_steps": 3}, 422, "InvalidInputError", "inputs"),
    ("POST", "/v1/predict/batch", {"requests": [{**MODEL, "inputs": {}}]}, 422, "InvalidInputError",
     "requests.0.inputs"),
    ("POST", "/v1/predict?wait=999", forecast(), 422, "InvalidInputError", "wait"),
    ("POST", "/v1/predict", b'{"symbol": "AAPL", ', 400, "BadRequestError", None),
    ("POST", "/v1/predict", {**forecast(), "symbol": "ZZZZ"}, 404, "ModelNotFoundError", None),
    ("POST", "/v1/models/load", {**MODEL, "model_type": "sentiment", "version": "99"}, 404,
     "ModelNotFoundError", None),
    ("GET", "/v1/jobs/no-such-job", None, 404, "JobNotFoundError", "job_id"),
    ("GET", "/v1/jobs/no-such-job?wait=1", None, 404, "JobNotFoundError", "job_id"),
    ("DELETE", "/v1/jobs/no-such-job", None, 404, "JobNotFoundError", "job_id"),
    ("GET", "/v1/jobs/no-such-job/events", None, 404, "JobNotFoundError", "job_id"),
    ("POST", "/v1/predict", b"[" * 10 + b"0" + b"]" * 10 + b" " * (9 * 1024 * 1024), 413,
     "PayloadTooLargeError", None),
    ("GET", "/v1/predict", None, 405, "MethodNotAllowedError", None),
    ("GET", "/v1/nothing", None, 404, "RouteNotFoundError", None),  # (/v2 answers in the OIP shape)
]


@pytest.mark.parametrize("method,path,body,status,error_type,field", ERROR_CASES,
                         ids=[f"{c[3]}-{c[0]}-{c[1]}" for c in ERROR_CASES])
async def test_errors_answer_the_json_error_shape(api, method, path, body, status, error_type, field):
    async with api.request(method, path, **json_body(body)) as resp:
        assert resp.status == status, await resp.text()
        assert resp.content_type == "application/json"
        payload = await resp.json()
    assert set(payload) == {"error"} and {"type", "message"} <= set(payload["error"]), payload
    assert payload["error"]["type"] == error_type and payload["error"]["message"], payload
    if field is not None:
        assert payload["error"]["field"] == field, payload
        assert field in payload["error"]["message"] or field == "job_id"


async def test_openapi_document_is_valid(api):
    status, spec = await send(api, "GET", "/openapi.json")
    assert status == 200
    validate(spec)
    for path in ("/v1/models/load", "/v1/predict", "/v1/predict/batch", "/v1/jobs/{id}", "/v1/stats"):
        assert path in spec["paths"], sorted(spec["paths"])
    async with api.get("/docs") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"


def test_demo_runs_and_exits_cleanly(fleet: FleetUp, model_store: Path, tmp_path: Path):
    # NOTE: the session's store, trained by the fleet fixture: this test is about the demo, not training again.
    demo = FleetUp(tmp_path, model_store, free_port(), "--flower-port", str(free_port()), "-c", "1",
                   "--demo", "--exit-after-demo")
    try:
        rc = demo.wait_exit(150)
        assert rc == 0, f"fleet up --demo exited with {rc}:\n{demo.diagnostics()}"
        demo.assert_nothing_left()
    finally:
        demo.finish()
    out = demo.output()
    assert "FinSight Fleet is up" in out and "Demo forecast: AAPL 1h patchtst" in out, out
    table = [line for line in out.splitlines() if line.lstrip("│ ").startswith("+")]
    assert len(table) == 12, out  # one row per forecast step: "│   +1 │ 153.12 │ ..."
    assert "batch item 0: ok 12 steps x 5 channels" in out
    assert "batch item 1: InvalidInputError" in out and "channels" in out
    assert "batch item 2: ok [" in out  # the sentiment labels of the two headlines
    assert out.rstrip().endswith("Stopped."), out[-500:]


def test_ctrl_c_during_start_up_stops_what_was_started(tmp_path: Path):
    # An empty store: the signal arrives while fleet up trains the demo models, its embedded Redis already up.
    up = FleetUp(tmp_path, tmp_path / "empty-store", free_port(), "--flower-port", str(free_port()), "-c", "1")
    try:
        wait_for(lambda: "Embedded Redis on" in up.output(), 60, "the embedded Redis to start")
        rc, took = up.interrupt(60)
        assert rc is not None, f"fleet up still runs 60 s after Ctrl-C:\n{up.diagnostics()}"
        up.assert_nothing_left()
    finally:
        up.finish()
    out = up.output()
    assert "FinSight Fleet is up" not in out, "Ctrl-C waited for the start-up to finish instead of aborting it"
    assert rc == 1 and "Stopped." in out and out.rstrip().endswith("Aborted!"), (rc, out[-800:])

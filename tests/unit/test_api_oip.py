"""The Open Inference Protocol (KServe v2) over REST: metadata from the store, JSON and binary tensors (encoded and
decoded by tritonclient's own helpers), infer as a predict job, the protocol's error shape, scopes and readiness."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tritonclient.http as httpclient

from producer_api import oip
from producer_api.app import create_app
from producer_api.service import inference as oip_service
from shared import tasks
from shared.errors import InvalidInputError
from shared.schemas import ModelInfo, ModelKey
from shared.settings import FleetSettings
from shared.stats import StatsWriter
from tests.unit.test_api_helpers import (KEYS, FakeBroker, aredis, celery, client, failure, make_key,  # noqa: F401
                                         server, settings_for, sredis, store_result)

FORECASTER = "AAPL_1h_patchtst"
SENTIMENT = "AAPL_1h_sentiment"
SERIES = np.array([[1.0, 2.0], [1.5, 2.5], [2.0, 3.0], [2.5, 3.5]], dtype=np.float32)
CONFIGS = {
    ("patchtst", "1"): {"model_type": "patchtst", "context_length": 3, "n_channels": 3, "prediction_length": 4},
    ("patchtst", "2"): {"model_type": "patchtst", "context_length": 3, "n_channels": 2, "prediction_length": 2},
    ("sentiment", "1"): {"model_type": "sentiment", "labels": ["negative", "neutral", "positive"], "max_len": 32},
}


@pytest.fixture
def settings(tmp_path: Path) -> FleetSettings:
    """A store whose configs say what the store writes (``fleet models create``): channels, lengths, labels."""
    root = tmp_path / "store"
    for (model_type, version), config in CONFIGS.items():
        d = root / "AAPL" / "1h" / model_type / version
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config))
        (d / "meta.json").write_text(json.dumps({"version": version}))
    return settings_for(root)


@pytest.fixture
async def anon(aiohttp_client, settings, aredis, celery):
    """A client that sends no key; tests add one per request."""
    return await aiohttp_client(create_app(settings, redis=aredis, celery_app=celery))


def _result(job: dict[str, Any]) -> dict[str, Any]:
    """What a worker answers, computed from the job: a forecast repeats the series' last row n_steps times (2, the
    horizon, without one), sentiment is sure of 'positive' for every text."""
    info = ModelInfo(model_id=ModelKey(symbol=job["symbol"], timeframe=job["timeframe"],
                                       model_type=job["model_type"]).model_id,
                     symbol=job["symbol"], timeframe=job["timeframe"], model_type=job["model_type"],
                     model_path="/store", version=job.get("version") or "2").model_dump(mode="json")
    inputs = job["inputs"]
    if inputs.get("texts") is not None:
        n = len(inputs["texts"])
        return {"predictions": [[0.1, 0.2, 0.7]] * n, "labels": ["positive"] * n, "confidence_score": 0.7,
                "inference_time_ms": 1.5, "model_info": info}
    tensor = inputs["tensor"]
    series = np.frombuffer(tensor["data"], dtype="<f4").reshape(tensor["shape"])
    return {"predictions": [series[-1].tolist()] * (job.get("n_steps") or 2), "confidence_score": 0.8,
            "inference_time_ms": 1.5, "model_info": info}


def play_worker(celery: FakeBroker, sredis, outcome: Callable[[dict[str, Any]], tuple[str, Any]] | None = None,
                jobs: list[dict[str, Any]] | None = None) -> asyncio.Task:
    """Take the first message off the queues and store its outcome (success from :func:`_result` by default)."""
    async def run() -> None:
        while not celery.sent:
            await asyncio.sleep(0.005)
        _, message = celery.sent[0]
        job = message["kwargs"]["job"]
        if jobs is not None:
            jobs.append(job)
        status, result = outcome(job) if outcome else ("SUCCESS", _result(job))
        store_result(sredis, message["task_id"], status, result)

    return asyncio.create_task(run())


def tensor_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


async def post_infer(client, model: str, inputs: list, outputs: list | None = None, headers: dict | None = None,
                     version: str = "", **kwargs: Any) -> Any:
    """POST an infer encoded by tritonclient; returns the response (its body read)."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kwargs)
    headers = dict(headers or {})
    if json_size is not None:
        headers[oip.HEADER_LENGTH] = str(json_size)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    resp = await client.post(path, data=body, headers=headers)
    await resp.read()
    return resp


async def parsed(resp) -> httpclient.InferResult:
    assert resp.status == 200, await resp.text()
    length = resp.headers.get(oip.HEADER_LENGTH)
    return httpclient.InferenceServerClient.parse_response_body(await resp.read(),
                                                                header_length=int(length) if length else None)


async def oip_error(resp, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert isinstance(body["error"], str) and body["type"]  # what KServe clients read, then the fleet's type
    return body


def heartbeat(sredis, worker: str, models: list[tuple[str, str]] = (), queues: str = "infer.simple.cpu",
              now: float | None = None) -> None:
    infos = []
    for model_id, version in models:
        key = ModelKey.parse(model_id)
        infos.append(ModelInfo(model_id=model_id, symbol=key.symbol, timeframe=key.timeframe,
                               model_type=key.model_type, model_path="/store", version=version, is_loaded=True))
    StatsWriter(sredis, KEYS, worker).heartbeat(infos, now=now, queues=queues)


# --- health and metadata ---------------------------------------------------------------------------------------

async def test_health_probes_need_no_key_and_ready_is_the_readyz_check(anon, sredis):
    live = await anon.get("/v2/health/live")
    assert live.status == 200 and await live.read() == b""
    body = await oip_error(await anon.get("/v2/health/ready"), 503)  # no worker heart-beats yet
    assert body["type"] == "NotReadyError" and "infer.simple.cpu" in body["error"]
    heartbeat(sredis, "alpha@host|1")
    ready = await anon.get("/v2/health/ready")
    assert ready.status == 200 and await ready.read() == b""


async def test_server_metadata(client):
    body = await (await client.get("/v2")).json()
    assert body["name"] == "finsight-fleet" and body["version"]
    assert "binary_tensor_data" in body["extensions"]


async def test_forecaster_metadata_comes_from_the_stored_config(client):
    resp = await client.get(f"/v2/models/{FORECASTER}")
    body = oip.ModelMetadata.model_validate(await resp.json()).model_dump()
    assert body["name"] == FORECASTER and body["versions"] == ["1", "2"] and body["platform"] == "finsight-fleet"
    assert body["inputs"] == [{"name": "series", "datatype": "FP32", "shape": [-1, 2]}]
    assert body["outputs"] == [{"name": "predictions", "datatype": "FP32", "shape": [-1, 2]},
                               {"name": "confidence", "datatype": "FP32", "shape": [1]}]
    assert body["parameters"] == {"context_length": 3, "prediction_length": 2, "n_steps": 2, "n_steps_max": 1024}
    # one version: its own config (version 1 has three channels and a longer horizon)
    first = await (await client.get(f"/v2/models/{FORECASTER}/versions/1")).json()
    assert first["inputs"][0]["shape"] == [-1, 3] and first["parameters"]["n_steps"] == 4
    assert first["versions"] == ["1", "2"]


async def test_sentiment_metadata(client):
    body = await (await client.get(f"/v2/models/{SENTIMENT}")).json()
    assert body["inputs"] == [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "labels", "datatype": "BYTES", "shape": [-1]}]
    assert body["parameters"] == {"labels": "negative,neutral,positive"}


def test_a_config_that_tells_nothing_gives_unknown_dimensions():
    sig = oip.signature(ModelKey.parse(FORECASTER), {})
    assert sig.inputs[0].shape == [-1, -1] and sig.parameters == {"n_steps_max": 1024}
    assert oip.signature(ModelKey.parse(SENTIMENT), {"labels": "bad"}).outputs[0].shape == [-1, 3]


async def test_v1_models_lists_each_signature(client):
    body = await (await client.get("/v1/models")).json()
    by_id = {m["model_id"]: m for m in body["models"]}
    assert by_id[FORECASTER]["signature"]["inputs"] == [{"name": "series", "datatype": "FP32", "shape": [-1, 2]}]
    assert by_id[SENTIMENT]["signature"]["outputs"][1]["name"] == "labels"


@pytest.mark.parametrize("path, field", [
    ("/v2/models/nonsense", "name"),
    ("/v2/models/AAPL_7h_patchtst", "name"),
    ("/v2/models/MSFT_1h_patchtst", "name"),
    ("/v2/models/AAPL_1h_patchtsmixer/ready", "name"),
    (f"/v2/models/{FORECASTER}/versions/7", "version"),
    (f"/v2/models/{FORECASTER}/versions/abc/ready", "version"),
])
async def test_unknown_models_are_404_in_the_protocol_shape(client, path, field):
    body = await oip_error(await client.get(path), 404)
    assert body["type"] == "ModelNotFoundError" and body["field"] == field and body["retryable"] is False


async def test_an_infer_on_an_unknown_model_is_404_and_sends_nothing(client, celery):
    resp = await post_infer(client, "MSFT_1h_patchtst", [tensor_input("series", SERIES, "FP32", False)])
    body = await oip_error(resp, 404)
    assert "MSFT_1h_patchtst" in body["error"] and celery.sent == []


# --- infer -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (False, True), (True, False)])
async def test_infer_is_a_predict_job_and_answers_its_forecast(client, celery, sredis, binary_in, binary_out):
    jobs: list[dict[str, Any]] = []
    worker = play_worker(celery, sredis, jobs=jobs)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary_out) for name in ("predictions", "confidence")]
    resp = await post_infer(client, FORECASTER, [tensor_input("series", SERIES, "FP32", binary_in)], outputs,
                            request_id="req-1", parameters={"n_steps": 3})
    await worker
    result = await parsed(resp)
    assert (resp.headers.get(oip.HEADER_LENGTH) is not None) is binary_out
    np.testing.assert_array_equal(result.as_numpy("predictions"), np.repeat(SERIES[-1:], 3, axis=0))
    assert result.as_numpy("confidence").dtype == np.float32 and result.as_numpy("confidence").shape == (1,)
    np.testing.assert_allclose(result.as_numpy("confidence"), [0.8])
    response = result.get_response()
    assert response["model_name"] == FORECASTER and response["model_version"] == "2" and response["id"] == "req-1"
    assert response["parameters"]["job_id"] == celery.sent[0][1]["task_id"]
    assert response["parameters"]["inference_time_ms"] == 1.5
    # the job is the one /v1/predict sends: the compact tensor, n_steps from the parameters, on the simple pool
    (job,) = jobs
    assert job["inputs"]["tensor"]["shape"] == [4, 2] and job["n_steps"] == 3 and job["priority"] == 5
    assert celery.sent[0][0] == tasks.PREDICT and celery.sent[0][1]["queue"] == "infer.simple.cpu"
    if not binary_out:
        oip.InferenceResponse.model_validate(json.loads(await resp.read()))  # the documented schema is the wire's


async def test_without_requested_outputs_every_output_is_binary(client, celery, sredis):
    worker = play_worker(celery, sredis)
    resp = await post_infer(client, FORECASTER, [tensor_input("series", SERIES, "FP32", True)])
    await worker
    result = await parsed(resp)
    assert resp.content_type == "application/octet-stream"
    assert {o["name"] for o in result.get_response()["outputs"]} == {"predictions", "confidence"}
    assert result.as_numpy("predictions").shape == (2, 2)  # the horizon


async def test_only_the_outputs_asked_for_come_back(client, celery, sredis):
    worker = play_worker(celery, sredis)
    resp = await post_infer(client, FORECASTER, [tensor_input("series", SERIES, "FP32", False)],
                            [httpclient.InferRequestedOutput("confidence", binary_data=False)])
    await worker
    result = await parsed(resp)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["confidence"]


async def test_a_versioned_infer_asks_for_that_version(client, celery, sredis):
    jobs: list[dict[str, Any]] = []
    worker = play_worker(celery, sredis, jobs=jobs)
    three = np.ones((3, 3), dtype=np.float32)
    resp = await post_infer(client, FORECASTER, [tensor_input("series", three, "FP32", True)], version="1")
    await worker
    assert (await parsed(resp)).get_response()["model_version"] == "1" and jobs[0]["version"] == "1"


@pytest.mark.parametrize("binary", [False, True])
async def test_sentiment_infer_takes_bytes_texts(client, celery, sredis, binary):
    jobs: list[dict[str, Any]] = []
    worker = play_worker(celery, sredis, jobs=jobs)
    texts = np.array(["Shares soar on record profit", "Ça baisse"], dtype=object)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "labels")]
    resp = await post_infer(client, SENTIMENT, [tensor_input("texts", texts, "BYTES", binary)], outputs)
    await worker
    result = await parsed(resp)
    assert jobs[0]["inputs"]["texts"] == ["Shares soar on record profit", "Ça baisse"]
    assert result.as_numpy("probabilities").shape == (2, 3)
    assert [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("labels")] == \
        ["positive", "positive"]


async def test_an_infer_belongs_to_the_key_that_sent_it(anon, aredis, celery, sredis):
    submitter = await make_key(aredis, "submitter", ("submit",))
    worker = play_worker(celery, sredis)
    resp = await post_infer(anon, FORECASTER, [tensor_input("series", SERIES, "FP32", True)],
                            headers={"X-API-Key": submitter})
    await worker
    job_id = (await parsed(resp)).get_response()["parameters"]["job_id"]
    assert sredis.hget(KEYS.job(job_id), "owner") == b"submitter"


def test_tritons_priority_becomes_the_fleets():
    assert [oip.fleet_priority(level) for level in (0, 1, 2, 9, 10, 99)] == [5, 9, 8, 1, 0, 0]
    assert oip.fleet_priority(-1) == -1 and oip.fleet_priority("high") == "high"  # the job's schema refuses them


@pytest.mark.parametrize("outcome, status, kind, in_message", [
    (("FAILURE", failure("InvalidInputError", "series has 4 rows, the model needs at least 96")), 422,
     "InvalidInputError", "needs at least 96"),
    (("FAILURE", failure("PredictionError", "boom")), 500, "PredictionError", "boom"),
    (("FAILURE", failure("AdapterUnavailableError", "triton is down")), 503, "AdapterUnavailableError", "down"),
])
async def test_a_failed_job_answers_its_typed_error(client, celery, sredis, outcome, status, kind, in_message):
    worker = play_worker(celery, sredis, lambda job: outcome)
    resp = await post_infer(client, FORECASTER, [tensor_input("series", SERIES, "FP32", True)])
    await worker
    body = await oip_error(resp, status)
    assert body["type"] == kind and in_message in body["error"]


async def test_an_infer_that_does_not_end_in_time_is_504_naming_its_job(client, celery, monkeypatch):
    monkeypatch.setattr(oip_service, "INFER_WAIT_S", 0.2)
    started = time.perf_counter()
    resp = await post_infer(client, FORECASTER, [tensor_input("series", SERIES, "FP32", True)])
    body = await oip_error(resp, 504)
    job_id = celery.sent[0][1]["task_id"]
    assert body["type"] == "InferTimeoutError" and job_id in body["error"] and body["field"] == "job_id"
    assert 0.2 <= time.perf_counter() - started < 2.0
    assert (await (await client.get(f"/v1/jobs/{job_id}")).json())["status"] == "queued"  # it goes on


def _json_request(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


_SERIES_JSON = {"name": "series", "datatype": "FP32", "shape": [4, 2], "data": SERIES.reshape(-1).tolist()}
_NAN = np.array([[1.0, np.nan], [1.0, 2.0], [1.0, 2.0]], dtype="<f4").tobytes()


@pytest.mark.parametrize("body, headers, status, field, in_message", [
    (_json_request([{**_SERIES_JSON, "name": "x"}]), {}, 422, "x", "no such input"),
    (_json_request([_SERIES_JSON, {**_SERIES_JSON, "name": "x"}]), {}, 422, "x", "no such input"),
    (_json_request([_SERIES_JSON, _SERIES_JSON]), {}, 422, "series", "given twice"),
    (_json_request([{**_SERIES_JSON, "datatype": "FP64"}]), {}, 422, "series", "FP32"),
    (_json_request([{**_SERIES_JSON, "shape": [8]}]), {}, 422, "series", "[-1, 2]"),
    (_json_request([{**_SERIES_JSON, "shape": [2, 4]}]), {}, 422, "series", "[-1, 2]"),
    (_json_request([{**_SERIES_JSON, "shape": [3, 2]}]), {}, 422, "series", "8 values"),
    (_json_request([{**_SERIES_JSON, "data": ["a"] * 8}]), {}, 422, "series", "numbers"),
    (_json_request([{**_SERIES_JSON, "data": [[1, 2], [3]]}]), {}, 422, "series", "numbers"),
    (_json_request([{**_SERIES_JSON, "data": None}]), {}, 422, "series", "no data"),
    (_json_request([{**_SERIES_JSON, "shape": [0, 2], "data": []}]), {}, 422, "series.shape.0", "series"),
    (_json_request([{**_SERIES_JSON, "data": [1e39] * 8}]), {}, 422, "series", "finite"),
    (_json_request([_SERIES_JSON], parameters={"n_steps": 0}), {}, 422, "n_steps", "n_steps"),
    (_json_request([_SERIES_JSON], parameters={"priority": -1}), {}, 422, "priority", "priority"),
    (_json_request([_SERIES_JSON], outputs=[{"name": "logits"}]), {}, 422, "logits", "no such output"),
    (_json_request([]), {}, 422, "inputs", "at least 1"),
    (b'{"inputs": [', {}, 400, None, "malformed JSON"),
    (b"", {}, 400, None, "malformed JSON"),
    (_json_request([_SERIES_JSON]), {oip.HEADER_LENGTH: "999999"}, 400, oip.HEADER_LENGTH, "byte length"),
    (_json_request([_SERIES_JSON]), {oip.HEADER_LENGTH: "-1"}, 400, oip.HEADER_LENGTH, "byte length"),
    (_json_request([_SERIES_JSON]) + b"\0\0\0\0", {}, 400, None, "malformed JSON"),
])
async def test_bad_requests_are_4xx_naming_what_is_wrong_and_send_nothing(client, celery, body, headers, status,
                                                                          field, in_message):
    resp = await client.post(f"/v2/models/{FORECASTER}/infer", data=body, headers=headers)
    error = await oip_error(resp, status)
    assert error.get("field") == field and in_message in error["error"], error
    assert celery.sent == []


def _binary(header: dict[str, Any], raw: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + raw, {oip.HEADER_LENGTH: str(len(head))}


@pytest.mark.parametrize("header, raw, status, field, in_message", [
    ({"inputs": [{"name": "series", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": 24}}]},
     _NAN, 422, "series", "finite"),
    ({"inputs": [{"name": "series", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": 20}}]},
     _NAN[:20], 422, "series", "needs 24"),
    ({"inputs": [{"name": "series", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": 99}}]},
     _NAN, 400, "series", "binary_data_size"),
    ({"inputs": [{"name": "series", "datatype": "FP32", "shape": [3, 2], "parameters": {"binary_data_size": 8}}]},
     _NAN, 400, None, "belong to no input"),
    ({"inputs": [{"name": "series", "datatype": "FP32", "shape": [3, 2], "data": [0] * 6,
                  "parameters": {"binary_data_size": 24}}]}, _NAN, 422, "series", "both"),
    ({"inputs": [{"name": "series", "datatype": "FP32", "shape": [100_001, 2],
                  "parameters": {"binary_data_size": 800_008}}]}, bytes(800_008), 422, "series", "100000 rows"),
])
async def test_bad_binary_tensors_are_4xx_naming_the_input(client, celery, header, raw, status, field, in_message):
    body, headers = _binary(header, raw)
    error = await oip_error(await client.post(f"/v2/models/{FORECASTER}/infer", data=body, headers=headers), status)
    assert error.get("field") == field and in_message in error["error"], error
    assert celery.sent == []


@pytest.mark.parametrize("raw, in_message", [
    (struct.pack("<I", 9) + b"short", "malformed BYTES"),
    (struct.pack("<I", 2) + b"\xff\xfe", "UTF-8"),
    (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", "2 elements"),
])
async def test_bad_bytes_tensors_are_422_naming_texts(client, celery, raw, in_message):
    body, headers = _binary({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1],
                                         "parameters": {"binary_data_size": len(raw)}}]}, raw)
    error = await oip_error(await client.post(f"/v2/models/{SENTIMENT}/infer", data=body, headers=headers), 422)
    assert error["field"] == "texts" and in_message in error["error"], error
    assert celery.sent == []


async def test_json_texts_must_be_strings(client, celery):
    body = _json_request([{"name": "texts", "datatype": "BYTES", "shape": [2], "data": ["fine", 3]}])
    error = await oip_error(await client.post(f"/v2/models/{SENTIMENT}/infer", data=body), 422)
    assert error["field"] == "texts" and "strings" in error["error"]


def test_job_fields_are_renamed_as_the_protocol_names_them():
    err = oip.renamed(InvalidInputError("inputs.tensor: values must be finite", field="inputs.tensor"))
    assert (err.field, err.message, str(err)) == ("series", "series: values must be finite",
                                                  "series: values must be finite")
    worker_side = oip.renamed(InvalidInputError("series has 1 channels, the model needs 5", field="inputs.series"))
    assert worker_side.field == "series" and worker_side.message == "series has 1 channels, the model needs 5"
    assert oip.renamed(InvalidInputError("n_steps: too big", field="n_steps")).field == "n_steps"


# --- auth, scopes and readiness --------------------------------------------------------------------------------

async def test_every_v2_route_but_the_probes_needs_a_key(anon):
    for method, path in (("get", "/v2"), ("get", f"/v2/models/{FORECASTER}"),
                         ("get", f"/v2/models/{FORECASTER}/versions/2"), ("get", f"/v2/models/{FORECASTER}/ready"),
                         ("get", f"/v2/models/{FORECASTER}/versions/2/ready"),
                         ("post", f"/v2/models/{FORECASTER}/infer"),
                         ("post", f"/v2/models/{FORECASTER}/versions/2/infer")):
        resp = await getattr(anon, method)(path)
        assert resp.status == 401, (method, path)


async def test_metadata_needs_read_and_infer_needs_submit(anon, aredis, celery):
    reader = {"X-API-Key": await make_key(aredis, "reader", ("read",))}
    submitter = {"X-API-Key": await make_key(aredis, "submitter", ("submit",))}
    assert (await anon.get(f"/v2/models/{FORECASTER}", headers=reader)).status == 200
    assert (await anon.get("/v2", headers=reader)).status == 200
    assert (await anon.get(f"/v2/models/{FORECASTER}", headers=submitter)).status == 403
    resp = await post_infer(anon, FORECASTER, [tensor_input("series", SERIES, "FP32", True)], headers=reader)
    assert resp.status == 403 and celery.sent == []
    # Bearer works as on every route
    assert (await anon.get("/v2", headers={"Authorization": f"Bearer {reader['X-API-Key']}"})).status == 200


async def test_model_ready_when_a_live_worker_holds_it(client, sredis):
    assert (await client.get(f"/v2/models/{FORECASTER}/ready")).status == 503
    heartbeat(sredis, "gone@host|9", [(FORECASTER, "2")], now=time.time() - 3600)  # stale: not live
    body = await oip_error(await client.get(f"/v2/models/{FORECASTER}/ready"), 503)
    assert body["type"] == "ModelNotReadyError" and "/v1/models/load" in body["error"]
    heartbeat(sredis, "alpha@host|1", [(FORECASTER, "2")])
    ready = await client.get(f"/v2/models/{FORECASTER}/ready")
    assert ready.status == 200 and await ready.read() == b""
    assert (await client.get(f"/v2/models/{FORECASTER}/versions/2/ready")).status == 200
    assert (await client.get(f"/v2/models/{FORECASTER}/versions/1/ready")).status == 503  # stored, not held
    assert (await client.get(f"/v2/models/{SENTIMENT}/ready")).status == 503


async def test_redis_down_is_503_in_the_protocol_shape(anon, server):
    server.connected = False  # every command now fails as on a refused connection
    try:
        resp = await anon.get("/v2/health/ready")
    finally:
        server.connected = True
    assert (await oip_error(resp, 503))["type"] == "BrokerUnavailableError"

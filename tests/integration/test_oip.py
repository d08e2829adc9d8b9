"""The Open Inference Protocol against the real thing: tritonclient's own InferenceServerClients (HTTP and gRPC)
talk to a ``fleet api`` process and a real worker on real Redis, and get the numbers ``/v1/predict`` gets; a client
of the fleet's gRPC job service submits, watches a batch job to its end, and cancels."""

from __future__ import annotations

from typing import Iterator

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from producer_api.grpc.protos import jobs_pb2, jobs_pb2_grpc

from shared.settings import FleetSettings
from tests.helpers import wait_for
from tests.integration.conftest import ApiProcess, WorkerProcess
from workers.training.synthetic import generate_bars

pytestmark = pytest.mark.integration

FORECASTER = "AAPL_1h_patchtst"
SENTIMENT = "AAPL_1h_sentiment"
#: Loaded by the readiness test only: no other test here sends it a job.
READY_MODEL = "MSFT_1h_patchtsmixer"
# Data the model has not seen (another seed than training), in the model's own width.
SERIES = np.ascontiguousarray(generate_bars("AAPL", "1h", n_bars=700, seed=123).values[-200:], dtype="<f4")
TEXTS = ["Shares soar after record quarterly profit", "Company warns of steep losses and layoffs"]
POOL = {"adapter": "simple", "device": "cpu"}


@pytest.fixture(scope="module")
def fleet_apis(fleet_settings: FleetSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """A worker on the simple pool and a ``fleet api`` process serving HTTP and gRPC.

    The worker forwards at most two rows at a time (``BATCH_MAX_BATCH_SIZE``), so that a batch job of many items
    reports its progress in many steps.

    NOTE: one worker for the module, not one per test (``start_worker``): each start imports torch, which costs
    more than the tests themselves on a shared box.
    """
    logs = tmp_path_factory.mktemp("oip")
    worker = WorkerProcess(fleet_settings, logs / "worker.log", BATCH_MAX_BATCH_SIZE="2")
    try:
        api = ApiProcess(fleet_settings, logs / "api.log", ready_path="/v2/health/ready")
    except BaseException:
        worker.stop()
        raise
    try:
        yield api
    finally:
        api.stop()
        worker.stop()
        errors = api.unhandled_errors()
        assert not errors, "the API logged unhandled errors:\n" + "\n".join(errors[:20])


@pytest.fixture(scope="module")
def fleet_api(fleet_apis: ApiProcess) -> str:
    """The API's HTTP ``host:port`` (tritonclient's form)."""
    return fleet_apis.address


@pytest.fixture()
def triton(fleet_api: str) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(url=fleet_api, network_timeout=90)
    yield client
    client.close()


@pytest.fixture()
def key(api_key: str) -> dict[str, str]:
    """tritonclient's way of sending a custom header: the fleet's key."""
    return {"X-API-Key": api_key}


def v1_predict(address: str, key: dict[str, str], body: dict) -> dict:
    resp = requests.post(f"http://{address}/v1/predict?wait=30", json=body, headers=key, timeout=60)
    doc = resp.json()
    assert resp.status_code == 200 and doc["status"] == "succeeded", doc
    return doc["result"]


def series_input(array: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("series", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def test_tritonclient_sees_a_live_ready_server_and_the_models_signatures(triton, key) -> None:
    assert triton.is_server_live() and triton.is_server_ready()  # probes: no key needed
    assert triton.get_server_metadata(headers=key)["name"] == "finsight-fleet"
    meta = triton.get_model_metadata(FORECASTER, headers=key)
    assert meta["name"] == FORECASTER and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "series", "datatype": "FP32", "shape": [-1, SERIES.shape[1]]}]
    assert [o["name"] for o in meta["outputs"]] == ["predictions", "confidence"]
    assert meta["parameters"]["context_length"] <= len(SERIES)
    sentiment = triton.get_model_metadata(SENTIMENT, headers=key)
    assert sentiment["inputs"] == [{"name": "texts", "datatype": "BYTES", "shape": [-1]}]
    # an unknown model: a clean InferenceServerException carrying the fleet's message
    with pytest.raises(InferenceServerException) as unknown:
        triton.get_model_metadata("AAPL_1h_nomodel", headers=key)
    assert unknown.value.status() == "404" and "unknown model" in str(unknown.value)
    with pytest.raises(InferenceServerException) as no_key:
        triton.get_model_metadata(FORECASTER)
    assert no_key.value.status() == "401"


def test_infer_with_json_and_binary_tensors_returns_what_v1_predict_does(fleet_api, triton, key) -> None:
    expected = v1_predict(fleet_api, key, {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", **POOL,
                                           "inputs": {"series": SERIES.tolist()}})
    as_json = triton.infer(FORECASTER, [series_input(SERIES, binary=False)], headers=key,
                           outputs=[httpclient.InferRequestedOutput(name, binary_data=False)
                                    for name in ("predictions", "confidence")])
    as_binary = triton.infer(FORECASTER, [series_input(SERIES, binary=True)], headers=key)  # binary outputs too
    for result in (as_json, as_binary):
        np.testing.assert_allclose(result.as_numpy("predictions"), expected["predictions"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result.as_numpy("confidence"), [expected["confidence_score"]], rtol=1e-5)
        assert result.get_response()["model_version"] == "1"
    longer = triton.infer(FORECASTER, [series_input(SERIES, binary=True)], headers=key, parameters={"n_steps": 30})
    assert longer.as_numpy("predictions").shape == (30, SERIES.shape[1])
    # A tensor that does not fit the signature is refused by the API; one the model refuses, by the worker.
    with pytest.raises(InferenceServerException) as narrow:
        triton.infer(FORECASTER, [series_input(np.ascontiguousarray(SERIES[:, :1]), binary=True)], headers=key)
    assert narrow.value.status() == "422" and "'series'" in str(narrow.value)
    with pytest.raises(InferenceServerException) as short:
        triton.infer(FORECASTER, [series_input(SERIES[-10:], binary=True)], headers=key)
    assert short.value.status() == "422" and "rows" in str(short.value) and "series" in str(short.value)


@pytest.mark.parametrize("binary", [True, False])
def test_sentiment_infer_takes_bytes_texts(fleet_api, triton, key, binary) -> None:
    expected = v1_predict(fleet_api, key, {"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment", **POOL,
                                           "inputs": {"texts": TEXTS}})
    texts = httpclient.InferInput("texts", [len(TEXTS)], "BYTES")
    texts.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object), binary_data=binary)
    result = triton.infer(SENTIMENT, [texts], headers=key,
                          outputs=[httpclient.InferRequestedOutput(name, binary_data=binary)
                                   for name in ("probabilities", "labels")])
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("labels")]
    assert labels == expected["labels"]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["predictions"], rtol=1e-5, atol=1e-6)


def test_a_model_is_ready_once_a_load_job_loaded_it(fleet_api, triton, key) -> None:
    assert not triton.is_model_ready(READY_MODEL, headers=key)
    symbol, timeframe, model_type = READY_MODEL.split("_", 2)
    resp = requests.post(f"http://{fleet_api}/v1/models/load?wait=30", headers=key, timeout=60,
                         json={"symbol": symbol, "timeframe": timeframe, "model_type": model_type, **POOL})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    # The worker publishes what it holds with its heartbeat: readiness follows within one.
    wait_for(lambda: triton.is_model_ready(READY_MODEL, headers=key), 30, f"{READY_MODEL} to be ready")
    assert triton.is_model_ready(READY_MODEL, "1", headers=key)
    assert not triton.is_model_ready(READY_MODEL, "9", headers=key)  # no such version


# --- gRPC: the protocol through tritonclient.grpc, and the fleet's job service ------------------------------------

@pytest.fixture()
def triton_grpc(fleet_apis: ApiProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(url=fleet_apis.grpc_address)
    yield client
    client.close()


@pytest.fixture()
def jobs(fleet_apis: ApiProcess) -> Iterator[jobs_pb2_grpc.JobServiceStub]:
    with grpc.insecure_channel(fleet_apis.grpc_address) as channel:
        yield jobs_pb2_grpc.JobServiceStub(channel)


def grpc_key(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", api_key),)


@pytest.fixture()
def grpc_headers(api_key: str) -> dict[str, str]:
    """gRPC metadata keys are lower-case."""
    return {"x-api-key": api_key}


def test_tritonclient_grpc_gets_the_signature_and_the_forecast_of_v1_predict(fleet_api, triton_grpc, key,
                                                                           grpc_headers) -> None:
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready()
    meta = triton_grpc.get_model_metadata(FORECASTER, headers=grpc_headers, as_json=True)
    assert meta["inputs"] == [{"name": "series", "datatype": "FP32", "shape": ["-1", str(SERIES.shape[1])]}]
    expected = v1_predict(fleet_api, key, {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", **POOL,
                                           "inputs": {"series": SERIES.tolist()}})
    tensor = grpcclient.InferInput("series", list(SERIES.shape), "FP32")
    tensor.set_data_from_numpy(SERIES)
    result = triton_grpc.infer(FORECASTER, [tensor], headers=grpc_headers)
    np.testing.assert_allclose(result.as_numpy("predictions"), expected["predictions"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("confidence"), [expected["confidence_score"]], rtol=1e-5)
    response = result.get_response()
    assert response.model_version == "1" and response.parameters["worker"].string_param
    texts = grpcclient.InferInput("texts", [len(TEXTS)], "BYTES")
    texts.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    sentiment = triton_grpc.infer(SENTIMENT, [texts], headers=grpc_headers)
    expected = v1_predict(fleet_api, key, {"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment", **POOL,
                                           "inputs": {"texts": TEXTS}})
    assert [label.decode() for label in sentiment.as_numpy("labels")] == expected["labels"]
    with pytest.raises(InferenceServerException) as no_key:
        triton_grpc.get_model_metadata(FORECASTER)
    assert no_key.value.status() == "StatusCode.UNAUTHENTICATED"


def _series_job(array: np.ndarray) -> jobs_pb2.PredictJob:
    return jobs_pb2.PredictJob(model=jobs_pb2.ModelRef(symbol="AAPL", timeframe="1h", model_type="patchtst"),
                               series=jobs_pb2.Series(shape=list(array.shape), data=array.tobytes()))


def test_watch_job_streams_a_batch_job_from_queued_through_progress_to_its_result(jobs, api_key) -> None:
    items = 24  # twelve forwards of two rows: progress in twelve steps
    batch = jobs_pb2.SubmitRequest(batch_predict=jobs_pb2.BatchPredictJob(
        requests=[_series_job(SERIES) for _ in range(items)], placement=jobs_pb2.Placement(**POOL)))
    submitted = jobs.Submit(batch, metadata=grpc_key(api_key), timeout=30)
    docs = list(jobs.WatchJob(jobs_pb2.GetJobRequest(job_id=submitted.job_id), metadata=grpc_key(api_key),
                              timeout=120))
    statuses = [doc.status for doc in docs]
    assert statuses[0] in ("queued", "running") and statuses[-1] == "succeeded", statuses
    assert "running" in statuses
    partial = [doc.progress.done for doc in docs if doc.status == "running" and 0 < doc.progress.done < items]
    assert partial and partial == sorted(partial), [(d.status, d.progress.done) for d in docs]
    final = docs[-1]
    assert final.final and final.result["succeeded"] == items and len(final.result["items"]) == items
    assert final.progress.done == final.progress.total == items  # the stream ended after the final document


def test_cancel_job_of_a_queued_job_and_what_its_watchers_see(jobs, api_key) -> None:
    # Routed to the TorchScript pool, which has no worker here: the job stays queued until cancelled.
    queued = jobs_pb2.SubmitRequest(predict=_series_job(SERIES))
    queued.predict.placement.adapter = "torchscript"
    job_id = jobs.Submit(queued, metadata=grpc_key(api_key), timeout=30).job_id
    stream = jobs.WatchJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=grpc_key(api_key), timeout=60)
    assert next(stream).status == "queued"
    reply = jobs.CancelJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=grpc_key(api_key), timeout=30)
    assert reply.cancelled and reply.job.status == "cancelled"
    rest = list(stream)
    assert [doc.status for doc in rest] == ["cancelled"] and rest[-1].error.type == "JobCancelledError"
    assert jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=grpc_key(api_key)).status == "cancelled"

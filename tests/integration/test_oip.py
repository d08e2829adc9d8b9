"""The Open Inference Protocol against the real thing: tritonclient.http's own InferenceServerClient talks to a
``fleet api`` process and a real worker on real Redis, and gets the numbers ``/v1/predict`` gets."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

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
def fleet_api(fleet_settings: FleetSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker on the simple pool and a ``fleet api`` process; the API's ``host:port`` (tritonclient's form).

    NOTE: one worker for the module, not one per test (``start_worker``): each start imports torch, which costs
    more than the tests themselves on a shared box.
    """
    logs = tmp_path_factory.mktemp("oip")
    worker = WorkerProcess(fleet_settings, logs / "worker.log")
    try:
        api = ApiProcess(fleet_settings, logs / "api.log", ready_path="/v2/health/ready")
    except BaseException:
        worker.stop()
        raise
    try:
        yield api.address
    finally:
        api.stop()
        worker.stop()
        errors = api.unhandled_errors()
        assert not errors, "the API logged unhandled errors:\n" + "\n".join(errors[:20])


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

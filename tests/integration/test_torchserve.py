"""A real TorchServe 0.12 (token authorization on) behind a real ``fleet worker --adapter torchserve`` pool.

load job -> model registered on TorchServe -> predict jobs agree with the simple adapter (every model type) ->
unload job -> unregistered; an eviction unregisters too; with TorchServe stopped, jobs fail with a retryable
``AdapterUnavailableError`` within the configured timeout, and the pool serves again once TorchServe is back (the
model registered again by itself).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import pytest

from tests.helpers import wait_for
from tests.torchserve_server import TorchServeServer, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

from shared import tasks  # noqa: E402
from shared.errors import AdapterUnavailableError, error_from_dict  # noqa: E402
from shared.keys import WORKER_HEARTBEAT_INTERVAL_S, Keys  # noqa: E402
from shared.schemas import ModelKey  # noqa: E402
from shared.settings import FleetSettings  # noqa: E402
from tests.integration.compare import assert_same_prediction, inputs_for  # noqa: E402
from workers.serving.adapters.simple import SimpleServingAdapter  # noqa: E402
from workers.store import ModelStore  # noqa: E402
from tests.integration.conftest import failure, send  # noqa: E402

TIMEOUT = 180
TYPES = ["patchtst", "patchtsmixer", "enhanced_transformer", "sentiment"]
#: Network timeout of the workers under test: a dead server must fail a job within it.
CALL_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeServer]:
    base = tmp_path_factory.mktemp("torchserve")
    server = TorchServeServer(base / "model-store", base / "server")
    server.start()
    yield server
    server.close()


def ts_env(server: TorchServeServer, **extra: str) -> dict[str, str]:
    return {"TORCHSERVE_INFERENCE_URL": server.inference_url, "TORCHSERVE_MANAGEMENT_URL": server.management_url,
            "TORCHSERVE_MODEL_STORE": str(server.model_store), "TORCHSERVE_KEY_FILE": str(server.key_file),
            "TORCHSERVE_TIMEOUT_SECONDS": str(CALL_TIMEOUT_S), "TORCHSERVE_BATCH_SIZE": "8",
            "TORCHSERVE_MAX_BATCH_DELAY": "5", **extra}


def test_pool_registers_predicts_and_unregisters_through_torchserve(torchserve: TorchServeServer, start_worker,
                                                                    producer, fleet_settings: FleetSettings) -> None:
    start_worker(adapter="torchserve", concurrency=1, **ts_env(torchserve))
    simple = SimpleServingAdapter(fleet_settings)
    store = ModelStore(fleet_settings.model_store_dir)
    symbol = "AAPL"
    for mtype in TYPES:
        key = {"symbol": symbol, "timeframe": "1h", "model_type": mtype, "adapter": "torchserve"}
        model_id = f"{symbol}_1h_{mtype}"
        started = time.monotonic()
        info = send(producer, tasks.LOAD, key).get(timeout=TIMEOUT)
        print(f"\n{model_id}: load (compile, archive, register) {time.monotonic() - started:.2f} s, "
              f"register {info['metadata']['torchserve']['register_ms']:.0f} ms")
        assert info["is_loaded"] and info["metadata"]["adapter"] == "torchserve"
        status, described = torchserve.management("GET", f"/models/{model_id}")
        assert status == 200 and [w["status"] for w in described[0]["workers"]] == ["READY"], described
        assert (torchserve.model_store / f"{model_id}.mar").is_file()

        job_inputs, data = inputs_for(symbol, mtype, seed=123)
        res = send(producer, tasks.PREDICT, {**key, "inputs": job_inputs}).get(timeout=TIMEOUT)
        assert res["model_info"]["metadata"]["adapter"] == "torchserve"
        want_info = simple.load_model(store.model_dir(ModelKey.parse(model_id)), symbol, "1h", mtype)
        want = simple.predict(model_id, data)
        print(f"{model_id}: max |torchserve - simple| "
              f"{np.abs(np.asarray(res['predictions']) - np.asarray(want.predictions)).max():.3g}")
        assert_same_prediction(res, want, mtype, want_info.metadata["config"], data)

    # A batch job goes through the same batching: windows in TorchServe requests, one bad item alone.
    _, series = inputs_for(symbol, "patchtsmixer", seed=123)
    good = {"symbol": symbol, "timeframe": "1h", "model_type": "patchtsmixer", "inputs": {"series": series.tolist()}}
    bad = {**good, "inputs": {"series": series[:, :2].tolist()}}
    out = send(producer, tasks.BATCH_PREDICT, {"requests": [good, bad, good], "adapter": "torchserve"}).get(
        timeout=TIMEOUT)
    assert (out["succeeded"], out["failed"]) == (2, 1)
    assert out["items"][1]["error"]["type"] == "InvalidInputError"
    assert out["items"][0]["result"]["predictions"] == out["items"][2]["result"]["predictions"]

    for mtype in TYPES:
        unload = {"symbol": symbol, "timeframe": "1h", "model_type": mtype, "adapter": "torchserve"}
        assert send(producer, tasks.UNLOAD, unload).get(timeout=TIMEOUT)["unloaded"] is True
    assert not {f"{symbol}_1h_{t}" for t in TYPES} & torchserve.registered()


def test_an_eviction_unregisters_and_a_dead_server_fails_retryable_then_serves_again(
        torchserve: TorchServeServer, start_worker, producer, redis_client, fleet_settings: FleetSettings) -> None:
    worker = start_worker(adapter="torchserve", concurrency=1, **ts_env(torchserve, TORCHSERVE_MAX_MODELS_LOADED="1"))
    first = {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtst", "adapter": "torchserve"}
    second = {**first, "model_type": "patchtsmixer"}
    assert send(producer, tasks.LOAD, first).get(timeout=TIMEOUT)["is_loaded"]
    assert "MSFT_1h_patchtst" in torchserve.registered()
    assert send(producer, tasks.LOAD, second).get(timeout=TIMEOUT)["is_loaded"]
    registered = torchserve.registered()
    assert "MSFT_1h_patchtsmixer" in registered and "MSFT_1h_patchtst" not in registered  # evicted: unregistered

    job = {**second, "inputs": inputs_for("MSFT", "patchtsmixer", seed=123)[0]}
    before = send(producer, tasks.PREDICT, job).get(timeout=TIMEOUT)["predictions"]
    torchserve.stop()
    try:
        started = time.monotonic()
        kind, message = failure(send(producer, tasks.PREDICT, job), TIMEOUT)
        elapsed = time.monotonic() - started
        print(f"\nTorchServe down: {kind} after {elapsed:.2f} s")
        assert kind == "AdapterUnavailableError" and torchserve.inference_url in message
        assert error_from_dict({"type": kind, "message": message}).retryable
        assert isinstance(error_from_dict({"type": kind}), AdapterUnavailableError)
        assert elapsed < CALL_TIMEOUT_S + 5, elapsed
        wait_for(lambda: all(redis_client.hget(Keys(fleet_settings.redis_key_prefix).worker_stats(w), "healthy")
                             == b"0" for w in worker.ids), WORKER_HEARTBEAT_INTERVAL_S * 3, "an unhealthy heartbeat")
    finally:
        torchserve.start()  # the same ports; new tokens in the same key file (the adapter reads them on a 401)

    after = send(producer, tasks.PREDICT, job).get(timeout=TIMEOUT)["predictions"]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert "registering it again" in worker.output()
    assert "MSFT_1h_patchtsmixer" in torchserve.registered()
    assert send(producer, tasks.UNLOAD, second).get(timeout=TIMEOUT)["unloaded"] is True

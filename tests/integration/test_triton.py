"""A real ``tritonserver`` (explicit model control) behind a real ``fleet worker --adapter triton`` pool.

load job -> model ready on Triton -> predict jobs over HTTP and gRPC agree with the simple adapter (every model
type) -> unload job -> model no longer ready; with Triton stopped, jobs fail with a retryable
``AdapterUnavailableError`` within the configured timeout, and the pool serves again once Triton is back.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator

import numpy as np
import pytest

from tests.helpers import wait_for
from tests.triton_server import TritonServer, unavailable_reason

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

from shared import tasks  # noqa: E402
from shared.keys import WORKER_HEARTBEAT_INTERVAL_S, Keys  # noqa: E402
from shared.errors import AdapterUnavailableError, InvalidInputError, error_from_dict  # noqa: E402
from shared.schemas import ModelKey  # noqa: E402
from shared.settings import FleetSettings, TritonSettings  # noqa: E402
from workers.serving.adapters.simple import SimpleServingAdapter  # noqa: E402
from workers.store import ModelStore  # noqa: E402
from tests.integration.compare import assert_same_prediction, inputs_for  # noqa: E402
from tests.integration.conftest import failure, send  # noqa: E402

TIMEOUT = 180
TYPES = ["patchtst", "patchtsmixer", "enhanced_transformer", "sentiment"]
#: Network timeout of the workers under test: a dead server must fail a job within it.
CALL_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    base = tmp_path_factory.mktemp("triton")
    server = TritonServer(base / "repository", base / "server")
    server.start()
    yield server
    server.stop()


def triton_env(server: TritonServer, grpc: bool) -> dict[str, str]:
    return {"TRITON_SERVER_URL": server.http_url, "TRITON_SERVER_GRPC_URL": server.grpc_url,
            "TRITON_USE_GRPC": str(grpc).lower(), "TRITON_MODEL_REPOSITORY": str(server.repository),
            "TRITON_TIMEOUT_SECONDS": str(CALL_TIMEOUT_S), "TRITON_MAX_BATCH_SIZE": "16"}


def server_client(server: TritonServer):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.http_url, connection_timeout=5, network_timeout=30)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_pool_loads_predicts_and_unloads_through_triton(protocol: str, triton: TritonServer, start_worker,
                                                        producer, fleet_settings: FleetSettings) -> None:
    grpc = protocol == "grpc"
    start_worker(adapter="triton", concurrency=1, **triton_env(triton, grpc))
    client = server_client(triton)
    simple = SimpleServingAdapter(fleet_settings)
    store = ModelStore(fleet_settings.model_store_dir)
    symbol = "AAPL"
    for mtype in TYPES:
        key = {"symbol": symbol, "timeframe": "1h", "model_type": mtype, "adapter": "triton"}
        model_id = f"{symbol}_1h_{mtype}"
        info = send(producer, tasks.LOAD, key).get(timeout=TIMEOUT)
        meta = info["metadata"]["triton"]
        assert info["is_loaded"] and info["metadata"]["adapter"] == "triton"
        assert (meta["protocol"], meta["model_name"], meta["backend"]) == (protocol, model_id, "python")
        assert client.is_model_ready(model_id, meta["model_version"])
        assert (triton.repository / model_id / "config.pbtxt").is_file()

        job_inputs, data = inputs_for(symbol, mtype, seed=123)
        res = send(producer, tasks.PREDICT, {**key, "inputs": job_inputs}).get(timeout=TIMEOUT)
        assert res["model_info"]["metadata"]["triton"]["protocol"] == protocol
        want_info = simple.load_model(store.model_dir(ModelKey.parse(model_id)), symbol, "1h", mtype)
        assert_same_prediction(res, simple.predict(model_id, data), mtype, want_info.metadata["config"], data)

    # A batch job goes through the same batching: two windows in one Triton request, one bad item alone.
    _, series = inputs_for(symbol, "patchtsmixer", seed=123)
    good = {"symbol": symbol, "timeframe": "1h", "model_type": "patchtsmixer", "inputs": {"series": series.tolist()}}
    bad = {**good, "inputs": {"series": series[:, :2].tolist()}}
    out = send(producer, tasks.BATCH_PREDICT, {"requests": [good, bad, good], "adapter": "triton"}).get(
        timeout=TIMEOUT)
    assert (out["succeeded"], out["failed"]) == (2, 1)
    assert out["items"][1]["error"]["type"] == "InvalidInputError"
    assert out["items"][0]["result"]["predictions"] == out["items"][2]["result"]["predictions"]
    assert "nv_inference_count{model=\"AAPL_1h_patchtsmixer\"" in triton.metrics()

    unload_key = {"symbol": symbol, "timeframe": "1h", "model_type": "patchtst", "adapter": "triton"}
    assert send(producer, tasks.UNLOAD, unload_key).get(timeout=TIMEOUT)["unloaded"] is True
    assert not client.is_model_ready("AAPL_1h_patchtst")
    client.close()


def test_adapter_in_process_checks_shapes_and_measures_latency(triton: TritonServer,
                                                               fleet_settings: FleetSettings) -> None:
    """The adapter itself, in this process: Triton's shape errors are typed, and the infer latency."""
    import torch

    from workers.serving.adapters.triton import TritonServingAdapter

    store = ModelStore(fleet_settings.model_store_dir)
    key = ModelKey(symbol="AAPL", timeframe="1h", model_type="patchtsmixer")
    for grpc in (False, True):
        settings = fleet_settings.model_copy(update={"triton": TritonSettings(
            server_url=triton.http_url, server_grpc_url=triton.grpc_url, use_grpc=grpc,
            model_repository=triton.repository, timeout_seconds=CALL_TIMEOUT_S)})
        adapter = TritonServingAdapter(settings, "cpu")
        info = adapter.load_model(store.model_dir(key), key.symbol, "1h", key.model_type)
        entry = adapter.cache.peek(key.model_id)
        with pytest.raises(InvalidInputError, match="unexpected shape"):
            entry.forward(torch.zeros(1, 50, 5))
        x = torch.zeros(1, info.metadata["config"]["context_length"], 5)
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            entry.forward(x)
            timings.append((time.perf_counter() - started) * 1000)
        print(f"\nTriton infer ({'grpc' if grpc else 'http'}), batch 1: median {statistics.median(timings):.2f} ms, "
              f"min {min(timings):.2f} ms")
        adapter.server.close()  # NOTE: not adapter.close(): the model stays loaded for the other tests


def test_pool_fails_retryable_while_triton_is_down_and_serves_again(
        triton: TritonServer, start_worker, producer, redis_client, fleet_settings: FleetSettings) -> None:
    worker = start_worker(adapter="triton", concurrency=1, **triton_env(triton, grpc=False))
    key = {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtsmixer", "adapter": "triton"}
    job = {**key, "inputs": inputs_for("MSFT", "patchtsmixer", seed=123)[0]}
    assert send(producer, tasks.LOAD, key).get(timeout=TIMEOUT)["is_loaded"]
    before = send(producer, tasks.PREDICT, job).get(timeout=TIMEOUT)["predictions"]

    triton.stop()
    try:
        started = time.monotonic()
        kind, message = failure(send(producer, tasks.PREDICT, job), TIMEOUT)
        elapsed = time.monotonic() - started
        assert kind == "AdapterUnavailableError" and triton.http_url in message
        assert error_from_dict({"type": kind, "message": message}).retryable
        assert isinstance(error_from_dict({"type": kind}), AdapterUnavailableError)
        assert elapsed < CALL_TIMEOUT_S + 5, elapsed
        # A model this process never loaded fails the same way (the load itself needs the server).
        other = {**key, "model_type": "enhanced_transformer"}
        assert failure(send(producer, tasks.LOAD, other), TIMEOUT)[0] == "AdapterUnavailableError"
        # The heartbeat reports the pool unhealthy (the adapter's health check asks the server's live/ready).
        wait_for(lambda: all(redis_client.hget(Keys(fleet_settings.redis_key_prefix).worker_stats(w), "healthy")
                             == b"0" for w in worker.ids), WORKER_HEARTBEAT_INTERVAL_S * 3, "an unhealthy heartbeat")
    finally:
        triton.start()  # the same ports: the worker's settings still point there

    after = send(producer, tasks.PREDICT, job).get(timeout=TIMEOUT)["predictions"]
    np.testing.assert_allclose(after, before, rtol=1e-6)
    assert worker.proc.poll() is None
    assert "loading it again" in worker.output()
    wait_for(lambda: all(redis_client.hget(Keys(fleet_settings.redis_key_prefix).worker_stats(w), "healthy")
                         == b"1" for w in worker.ids), WORKER_HEARTBEAT_INTERVAL_S * 3, "a healthy heartbeat")

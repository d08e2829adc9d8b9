"""The shared contract: schemas, routing, errors, settings, Celery configuration."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from shared import routing
from shared.celery_app import create_celery_app
from shared.errors import AdapterUnavailableError, FleetError, InternalError, ModelNotFoundError, error_from_dict
from shared.schemas import BatchPredictJob, EncodedTensor, ModelKey, PredictInputs, PredictJob, TimeFrame
from shared.settings import FleetSettings


def test_import_shared_does_not_import_torch() -> None:
    code = ("import sys, shared, shared.settings, shared.schemas, shared.routing, shared.celery_app, "
            "shared.errors, shared.keys, shared.stats, shared.jobs, shared.store_layout, shared.tasks; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("symbol", ["AAPL", "brk.b", "BTC-USD", "ES_F", "A" * 16])
def test_valid_symbols_are_upper_cased(symbol: str) -> None:
    key = ModelKey(symbol=symbol, timeframe="1h", model_type="patchtst")
    assert key.symbol == symbol.upper()
    assert key.model_id == f"{symbol.upper()}_1h_patchtst"


@pytest.mark.parametrize("symbol", ["", "..", ".hidden", "A/B", "A" * 17, "a b", "ÄPL", "../../etc"])
def test_invalid_symbols_are_refused(symbol: str) -> None:
    with pytest.raises(ValidationError):
        ModelKey(symbol=symbol, timeframe="1h", model_type="patchtst")


def test_timeframes_and_model_id_round_trip() -> None:
    assert [t.value for t in TimeFrame] == ["1m", "5m", "15m", "30m", "1h", "4h", "1d", "1w"]
    key = ModelKey.parse("BRK_B_4h_enhanced_transformer")
    assert (key.symbol, key.timeframe.value, key.model_type.value) == ("BRK_B", "4h", "enhanced_transformer")


def test_inputs_need_exactly_one_form_and_rectangular_series() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        PredictInputs()
    with pytest.raises(ValidationError, match="exactly one"):
        PredictInputs(series=[[1.0]], texts=["x"])
    with pytest.raises(ValidationError, match="rectangular"):
        PredictInputs(series=[[1.0, 2.0], [3.0]])


def test_compact_tensor_round_trips_through_json_and_bytes() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(6, 2) / 7
    job = PredictJob(symbol="X", timeframe="1h", model_type="patchtst",
                     inputs={"tensor": EncodedTensor.from_numpy(arr)})
    as_json = job.model_dump(mode="json")
    assert isinstance(as_json["inputs"]["tensor"]["data"], str)  # base64 in JSON
    back = PredictJob.model_validate(as_json).inputs.series_array()
    np.testing.assert_array_equal(back, arr)
    raw = job.model_dump()  # python mode keeps raw bytes (msgpack bin)
    assert isinstance(raw["inputs"]["tensor"]["data"], bytes)
    np.testing.assert_array_equal(PredictJob.model_validate(raw).inputs.series_array(), arr)


def test_tensor_size_must_match_shape() -> None:
    with pytest.raises(ValidationError, match="needs 24"):
        EncodedTensor(shape=[3, 2], data=b"\0" * 20)


def test_batch_items_stay_unvalidated_until_the_worker() -> None:
    job = BatchPredictJob(requests=[{"symbol": "!!"}, {"anything": 1}])
    assert len(job.requests) == 2
    with pytest.raises(ValidationError):
        BatchPredictJob(requests=[])


def test_routing_is_public_and_defaults_from_settings() -> None:
    assert routing.queue_name("simple", "cpu") == "infer.simple.cpu"
    assert routing.parse_queue_name("infer.triton.cuda") == ("triton", "cuda")
    settings = FleetSettings(serving_adapter_type="torchscript")
    assert routing.queue_for_job({}, settings) == "infer.torchscript.cpu"
    assert routing.queue_for_job({"adapter": "triton", "device": "cuda"}, settings) == "infer.triton.cuda"
    with pytest.raises(ValueError, match="unknown adapter"):
        routing.queue_name("onnx", "cpu")
    assert {q.name for q in routing.all_queues()} >= {"infer.simple.cpu", "infer.triton.cuda"}
    assert routing.route_task("fleet.predict", (), {"job": {"adapter": "triton"}}, {})["queue"] == "infer.triton.cpu"
    assert routing.route_task("other.task", (), {}, {}) is None
    assert routing.broker_priority(9) == 0 and routing.broker_priority(0) == 9


def test_errors_cross_processes_as_type_and_message() -> None:
    err = AdapterUnavailableError("triton down", field="adapter")
    body = err.to_dict()
    assert body == {"type": "AdapterUnavailableError", "message": "triton down", "field": "adapter",
                    "retryable": True}
    back = error_from_dict(body)
    assert isinstance(back, AdapterUnavailableError) and back.retryable and back.http_status == 503
    assert isinstance(error_from_dict({"type": "Nope", "message": "x"}), InternalError)
    assert issubclass(ModelNotFoundError, FleetError) and ModelNotFoundError.http_status == 404
    assert err.args == ("triton down",)  # Celery's JSON encoding of exceptions keeps args only


def test_settings_read_env_names_of_the_serving_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_ADAPTER_TYPE", "triton")
    monkeypatch.setenv("SIMPLE_MAX_MODELS_IN_MEMORY", "2")
    monkeypatch.setenv("TRITON_SERVER_URL", "10.0.0.1:8000")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/3")
    s = FleetSettings()
    assert (s.serving_adapter_type, s.simple.max_models_in_memory, s.triton.server_url, s.redis_url) == (
        "triton", 2, "10.0.0.1:8000", "redis://example:6379/3")
    assert FleetSettings.model_fields["simple"].default_factory().model_timeout_seconds == 3600


def test_celery_app_never_accepts_pickle_and_acks_late() -> None:
    app = create_celery_app(FleetSettings(job_time_limit_seconds=100))
    conf = app.conf
    assert "pickle" not in conf.accept_content and "pickle" not in conf.result_accept_content
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] >= 2 * conf.task_time_limit
    assert conf.result_expires == FleetSettings().result_ttl_seconds

"""The API over gRPC, on fakeredis: the KServe v2 service through the real ``tritonclient.grpc`` (metadata, ready,
infer as a predict job, typed errors as statuses), the fleet's job service through its generated stub (submit,
get, watch to the end, cancel), the health service, keys and scopes on every method, and the generated modules
matching the ``.proto``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from producer_api.app import create_app
from producer_api.grpc import codegen, inference, jobs
from producer_api.grpc.protos import jobs_pb2, jobs_pb2_grpc
from producer_api.grpc.server import GRPC
from producer_api.grpc.status import FIELD_KEY, RETRYABLE_KEY, TYPE_KEY
from producer_api.security.middleware import GRPC_ROUTES, PUBLIC, ROUTE_SCOPES, SUBMIT_ROUTES
from shared.settings import FleetSettings
from tests.unit.test_api_helpers import (aredis, celery, make_key, recorder, server, sredis,  # noqa: F401
                                         store_result)
from tests.unit.test_api_oip import FORECASTER, SENTIMENT, SERIES, heartbeat, play_worker, settings  # noqa: F401


@pytest.fixture
async def grpc_port(aiohttp_client, settings: FleetSettings, aredis, celery) -> int:
    """The API with gRPC on a free port; the port."""
    app = create_app(settings.model_copy(update={"api_grpc_port": 0}), redis=aredis, celery_app=celery)
    await aiohttp_client(app)
    return app[GRPC].server.port


@pytest.fixture
async def triton(grpc_port: int, admin_key: str):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    yield client
    await client.close()


@pytest.fixture
async def channel(grpc_port: int):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


def auth(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def meta(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def series_input(array: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("series", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in (err.trailing_metadata() or ())}


# --- the Open Inference Protocol ---------------------------------------------------------------------------------

async def test_server_probes_need_no_key_and_ready_is_the_readyz_check(triton, sredis):
    assert await triton.is_server_live()
    assert not await triton.is_server_ready()  # no worker heart-beats yet
    heartbeat(sredis, "alpha@host|1")
    assert await triton.is_server_ready()


async def test_metadata_shows_the_signature(triton, admin_key):
    server_meta = await triton.get_server_metadata(headers=auth(admin_key), as_json=True)
    assert server_meta["name"] == "finsight-fleet" and "binary_tensor_data" in server_meta["extensions"]
    model = await triton.get_model_metadata(FORECASTER, "2", headers=auth(admin_key), as_json=True)
    assert model["name"] == FORECASTER and model["versions"] == ["1", "2"]
    assert model["inputs"] == [{"name": "series", "datatype": "FP32", "shape": ["-1", "2"]}]
    assert [o["name"] for o in model["outputs"]] == ["predictions", "confidence"]
    sentiment = await triton.get_model_metadata(SENTIMENT, headers=auth(admin_key), as_json=True)
    assert sentiment["inputs"][0]["datatype"] == "BYTES"


async def test_model_ready_when_a_live_worker_holds_it(triton, admin_key, sredis):
    assert not await triton.is_model_ready(FORECASTER, headers=auth(admin_key))
    heartbeat(sredis, "alpha@host|1", [(FORECASTER, "2")])
    assert await triton.is_model_ready(FORECASTER, headers=auth(admin_key))
    assert not await triton.is_model_ready(FORECASTER, "1", headers=auth(admin_key))


async def test_infer_is_a_predict_job_and_answers_its_forecast(triton, admin_key, celery, sredis):
    sent: list[dict[str, Any]] = []
    worker = play_worker(celery, sredis, jobs=sent)
    result = await triton.infer(FORECASTER, [series_input(SERIES)], model_version="2", headers=auth(admin_key),
                                parameters={"n_steps": 3})
    await worker
    assert sent[0]["n_steps"] == 3 and sent[0]["version"] == "2"
    np.testing.assert_array_equal(result.as_numpy("predictions"), np.repeat(SERIES[-1:], 3, axis=0))
    assert result.as_numpy("confidence").tolist() == pytest.approx([0.8])
    response = result.get_response()
    assert response.model_name == FORECASTER and response.model_version == "2"
    assert response.parameters["job_id"].string_param == celery.sent[0][1]["task_id"]


async def test_sentiment_infer_takes_bytes_texts(triton, admin_key, celery, sredis):
    worker = play_worker(celery, sredis)
    texts = grpcclient.InferInput("texts", [2], "BYTES")
    texts.set_data_from_numpy(np.array([b"shares jump", b"profit warning"], dtype=object))
    result = await triton.infer(SENTIMENT, [texts], headers=auth(admin_key),
                                outputs=[grpcclient.InferRequestedOutput("labels")])
    await worker
    assert result.as_numpy("labels").tolist() == [b"positive", b"positive"]
    assert result.as_numpy("probabilities") is None  # only what was asked for


async def test_typed_contents_work_as_raw_ones(channel, admin_key, celery, sredis):
    worker = play_worker(celery, sredis)
    stub = service_pb2.ModelInferRequest(model_name=FORECASTER)
    tensor = stub.inputs.add(name="series", datatype="FP32", shape=list(SERIES.shape))
    tensor.contents.fp32_contents.extend(SERIES.reshape(-1).tolist())
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                               response_deserializer=service_pb2.ModelInferResponse.FromString)
    response = await call(stub, metadata=meta(admin_key))
    await worker
    values = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_array_equal(values, np.repeat(SERIES[-1:], 2, axis=0))


@pytest.mark.parametrize("shape, datatype, field", [([4, 5], "FP32", "series"), ([4, 2], "FP64", "series")])
async def test_an_input_off_the_signature_is_invalid_argument_naming_it(triton, admin_key, celery, shape, datatype,
                                                                        field):
    tensor = grpcclient.InferInput("series", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.float64))
    with pytest.raises(InferenceServerException) as info:
        await triton.infer(FORECASTER, [tensor], model_version="2", headers=auth(admin_key))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "'series'" in info.value.message()
    assert celery.sent == []


async def test_errors_carry_the_typed_fields_in_trailing_metadata(channel, admin_key):
    stub = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                               request_serializer=service_pb2.ModelMetadataRequest.SerializeToString,
                               response_deserializer=service_pb2.ModelMetadataResponse.FromString)
    err = await rpc_error(stub(service_pb2.ModelMetadataRequest(name="NOPE_1h_patchtst"), metadata=meta(admin_key)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert trailers(err)[TYPE_KEY] == "ModelNotFoundError" and trailers(err)[FIELD_KEY] == "name"
    assert trailers(err)[RETRYABLE_KEY] == "false"


async def test_a_failed_job_answers_its_typed_error(triton, admin_key, celery, sredis):
    from tests.unit.test_api_helpers import failure

    worker = play_worker(celery, sredis, lambda job: ("FAILURE", failure("AdapterUnavailableError", "Triton down")))
    with pytest.raises(InferenceServerException) as info:
        await triton.infer(FORECASTER, [series_input(SERIES)], model_version="2", headers=auth(admin_key))
    await worker
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "Triton down" in info.value.message()


# --- keys and scopes ---------------------------------------------------------------------------------------------

async def test_every_method_but_the_probes_needs_a_valid_key(triton, aredis):
    for call in (triton.get_server_metadata(), triton.get_model_metadata(FORECASTER),
                 triton.is_model_ready(FORECASTER, headers=auth("fsk_wrong"))):
        with pytest.raises(InferenceServerException) as info:
            await call
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"


async def test_infer_needs_submit_and_loads_need_admin(triton, channel, aredis, celery):
    reader = await make_key(aredis, "reader", ("read",))
    with pytest.raises(InferenceServerException) as info:
        await triton.infer(FORECASTER, [series_input(SERIES)], headers=auth(reader))
    assert info.value.status() == "StatusCode.PERMISSION_DENIED"
    submitter = await make_key(aredis, "submitter", ("submit",))
    load = jobs_pb2.SubmitRequest(load=jobs_pb2.LoadJob(model=jobs_pb2.ModelRef(
        symbol="AAPL", timeframe="1h", model_type="patchtst")))
    err = await rpc_error(jobs_pb2_grpc.JobServiceStub(channel).Submit(load, metadata=meta(submitter)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in err.details()
    assert celery.sent == []


async def test_the_rate_limit_is_resource_exhausted_with_retry_after(channel, aredis):
    key = await make_key(aredis, "slow", ("read",), rate_limit="1/minute")
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    first = await rpc_error(stub.GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32), metadata=meta(key)))
    assert first.code() == grpc.StatusCode.NOT_FOUND
    second = await rpc_error(stub.GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32), metadata=meta(key)))
    assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and int(trailers(second)["retry-after"]) >= 1


def test_every_served_method_takes_a_routes_scope():
    served = [f"/{inference.SERVICE.full_name}/{m}" for m in inference.METHODS] + \
             [f"/{jobs.SERVICE.full_name}/{m}" for m in jobs.METHODS]
    for method in served:
        if method.endswith("/Submit"):
            assert all(route in ROUTE_SCOPES for route in SUBMIT_ROUTES.values())
            continue
        route = GRPC_ROUTES[method]
        assert route in PUBLIC or route in ROUTE_SCOPES, method
    assert set(SUBMIT_ROUTES) == {"load", "unload", "predict", "batch_predict"}


async def test_the_health_service_is_public(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "finsight.fleet.v1.JobService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- the job service ---------------------------------------------------------------------------------------------

def predict_request(array: np.ndarray = SERIES, **extra: Any) -> jobs_pb2.SubmitRequest:
    return jobs_pb2.SubmitRequest(predict=jobs_pb2.PredictJob(
        model=jobs_pb2.ModelRef(symbol="AAPL", timeframe="1h", model_type="patchtst", version="2"),
        series=jobs_pb2.Series(shape=list(array.shape), data=np.ascontiguousarray(array, "<f4").tobytes()), **extra))


async def test_submit_then_get_a_predict_job(channel, admin_key, celery, sredis):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    reply = await stub.Submit(predict_request(n_steps=3, priority=9), metadata=meta(admin_key))
    assert reply.job.status == "queued" and not reply.job.final
    (name, message), = celery.sent
    job = message["kwargs"]["job"]
    assert message["task_id"] == reply.job_id and job["n_steps"] == 3 and job["priority"] == 9
    np.testing.assert_array_equal(np.frombuffer(job["inputs"]["tensor"]["data"], "<f4").reshape(4, 2), SERIES)
    store_result(sredis, reply.job_id, "SUCCESS", {"predictions": [[1.0, 2.0]], "confidence_score": 0.5})
    doc = await stub.GetJob(jobs_pb2.GetJobRequest(job_id=reply.job_id), metadata=meta(admin_key))
    assert doc.status == "succeeded" and doc.final and doc.result["predictions"] == [[1.0, 2.0]]


async def test_watch_streams_queued_running_progress_and_the_result(channel, admin_key, recorder, sredis):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    batch = jobs_pb2.SubmitRequest(batch_predict=jobs_pb2.BatchPredictJob(requests=[
        jobs_pb2.PredictJob(model=jobs_pb2.ModelRef(symbol="AAPL", timeframe="1h", model_type="sentiment"),
                            texts=jobs_pb2.Texts(texts=[text])) for text in ("up", "down")]))
    job_id = (await stub.Submit(batch, metadata=meta(admin_key))).job_id
    stream = stub.WatchJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=meta(admin_key))

    async def next_doc() -> jobs_pb2.Job:
        return await asyncio.wait_for(stream.read(), 5)

    assert (await next_doc()).status == "queued"
    recorder.running(job_id, "w|1", time.time(), total=2)
    doc = await next_doc()
    assert doc.status == "running" and (doc.progress.done, doc.progress.total) == (0, 2)
    recorder.progress(job_id, 1, 2)
    assert (await next_doc()).progress.done == 1
    store_result(sredis, job_id, "SUCCESS", {"items": [], "total": 2, "succeeded": 2, "failed": 0})
    final = await next_doc()
    assert final.status == "succeeded" and final.final and final.result["succeeded"] == 2
    assert await asyncio.wait_for(stream.read(), 5) is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK


async def test_cancel_a_queued_job_then_a_finished_one(channel, admin_key, celery):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = (await stub.Submit(predict_request(), metadata=meta(admin_key))).job_id
    reply = await stub.CancelJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=meta(admin_key))
    assert reply.cancelled and not reply.cancel_requested and reply.job.status == "cancelled"
    assert celery.revoked == [job_id]
    err = await rpc_error(stub.CancelJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=meta(admin_key)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and trailers(err)[TYPE_KEY] == "JobFinishedError"


async def test_a_job_of_another_key_is_not_found(channel, admin_key, aredis):
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = (await stub.Submit(predict_request(), metadata=meta(admin_key))).job_id
    other = await make_key(aredis, "other", ("submit", "read"))
    for call in (stub.GetJob, stub.CancelJob):
        err = await rpc_error(call(jobs_pb2.GetJobRequest(job_id=job_id), metadata=meta(other)))
        assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("request_, field", [
    (jobs_pb2.SubmitRequest(), "job"),
    (jobs_pb2.SubmitRequest(predict=jobs_pb2.PredictJob(model=jobs_pb2.ModelRef(
        symbol="AAPL", timeframe="1h", model_type="patchtst"))), "series"),
    (jobs_pb2.SubmitRequest(predict=jobs_pb2.PredictJob(
        model=jobs_pb2.ModelRef(symbol="AAPL", timeframe="1h", model_type="patchtst"),
        series=jobs_pb2.Series(shape=[4, 2], data=b"\0" * 5))), "series"),
    (jobs_pb2.SubmitRequest(predict=jobs_pb2.PredictJob(
        model=jobs_pb2.ModelRef(symbol="aapl!", timeframe="1h", model_type="patchtst"),
        texts=jobs_pb2.Texts(texts=["x"]))), "model.symbol"),
    (jobs_pb2.SubmitRequest(predict=jobs_pb2.PredictJob(
        model=jobs_pb2.ModelRef(symbol="AAPL", timeframe="1h", model_type="patchtst"),
        placement=jobs_pb2.Placement(adapter="nope"), texts=jobs_pb2.Texts(texts=["x"]))), "placement.adapter"),
])
async def test_bad_submissions_are_invalid_argument_naming_the_proto_field(channel, admin_key, celery, request_,
                                                                          field):
    err = await rpc_error(jobs_pb2_grpc.JobServiceStub(channel).Submit(request_, metadata=meta(admin_key)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert trailers(err)[FIELD_KEY].startswith(field), trailers(err)
    assert celery.sent == []


async def test_an_unknown_model_is_not_found(channel, admin_key, celery):
    request_ = jobs_pb2.SubmitRequest(load=jobs_pb2.LoadJob(model=jobs_pb2.ModelRef(
        symbol="MSFT", timeframe="1h", model_type="patchtst")))
    err = await rpc_error(jobs_pb2_grpc.JobServiceStub(channel).Submit(request_, metadata=meta(admin_key)))
    assert err.code() == grpc.StatusCode.NOT_FOUND and celery.sent == []


async def test_redis_down_is_unavailable_and_retryable(channel, admin_key, server):
    server.connected = False
    err = await rpc_error(jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(job_id="0" * 32),
                                                                       metadata=meta(admin_key)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_the_generated_modules_match_the_proto(tmp_path: Path):
    pytest.importorskip("grpc_tools")
    for name, data in codegen.generate(tmp_path).items():
        committed = (codegen.ROOT / codegen.PROTO.parent / name).read_bytes()
        assert committed == data, f"{name} is stale: run python -m producer_api.grpc.codegen"

"""One JSON error shape for every failure, and no input that makes the API answer 500."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from aiohttp import web

from producer_api.app import create_app
from tests.unit.test_api_helpers import (PREDICT, aredis, celery, client, server, settings,  # noqa: F401
                                         settings_for)

JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}


def _predict(**changes: Any) -> bytes:
    return json.dumps({**PREDICT, **changes}).encode()


def _inputs(inputs: Any) -> bytes:
    return _predict(inputs=inputs)


# (path, raw body, headers, expected status)
BAD_INPUTS: list[tuple[str, bytes, dict[str, str], int]] = [
    ("/v1/predict", b"", JSON, 400),
    ("/v1/predict", b"{", JSON, 400),
    ("/v1/predict", b"\xff\xfe\x00garbage", JSON, 400),
    ("/v1/predict", b"[1, 2, 3]", JSON, 422),
    ("/v1/predict", b'"just a string"', JSON, 422),
    ("/v1/predict", b"null", JSON, 422),
    ("/v1/predict", b"{}", JSON, 422),
    ("/v1/predict", json.dumps(PREDICT).encode(), {"Content-Type": "text/plain"}, 400),
    ("/v1/predict", json.dumps(PREDICT).encode(), {"Content-Type": "application/x-www-form-urlencoded"}, 400),
    ("/v1/predict", b"\xc1\xc1\xc1", MSGPACK, 400),
    ("/v1/predict", msgpack.packb([1, 2]), MSGPACK, 422),
    ("/v1/predict", msgpack.packb({1: 2}), MSGPACK, 400),
    ("/v1/predict", msgpack.packb({**PREDICT, "inputs": {"series": [[float("nan")]]}}), MSGPACK, 422),
    ("/v1/predict", _predict(symbol=None), JSON, 422),
    ("/v1/predict", _predict(symbol=123), JSON, 422),
    ("/v1/predict", _predict(symbol="€URO"), JSON, 422),
    ("/v1/predict", _predict(symbol="日本株"), JSON, 422),
    ("/v1/predict", _predict(symbol="../../etc"), JSON, 422),
    ("/v1/predict", _predict(symbol="A" * 10_000), JSON, 422),
    ("/v1/predict", _predict(timeframe="7m"), JSON, 422),
    ("/v1/predict", _predict(model_type=["patchtst"]), JSON, 422),
    ("/v1/predict", _predict(adapter="onnx"), JSON, 422),
    ("/v1/predict", _predict(device="tpu"), JSON, 422),
    ("/v1/predict", _predict(version="../1"), JSON, 422),
    ("/v1/predict", _predict(priority=10**30), JSON, 422),
    ("/v1/predict", _predict(priority="high"), JSON, 422),
    ("/v1/predict", _predict(n_steps=-1), JSON, 422),
    ("/v1/predict", _predict(deadline_s=1e308), JSON, 422),
    ("/v1/predict", _predict(unknown_field=1), JSON, 422),
    ("/v1/predict", _predict(enqueued_at="yesterday"), JSON, 422),
    ("/v1/predict", b'{"symbol": "AAPL", "priority": ' + b"9" * 5000 + b"}", JSON, 400),
    ("/v1/predict", b'{"inputs": {"series": [[NaN]]}}', JSON, 400),
    ("/v1/predict", b'{"inputs": {"series": [[Infinity]]}}', JSON, 400),
    ("/v1/predict", _inputs({"series": [["NaN"]]}), JSON, 422),
    ("/v1/predict", _inputs({"series": [["inf", 1.0]]}), JSON, 422),
    # a number that overflows a double is refused by the (strict) JSON decoder itself
    ("/v1/predict", _predict(inputs={"series": [[1e400]]}).replace(b"Infinity", b"1e400"), JSON, 400),
    ("/v1/predict", b'{"symbol": "' + b"\\ud800" + b'"}', JSON, 400),  # a lone surrogate
    ("/v1/predict", _inputs(None), JSON, 422),
    ("/v1/predict", _inputs({}), JSON, 422),
    ("/v1/predict", _inputs({"series": []}), JSON, 422),
    ("/v1/predict", _inputs({"series": [[]]}), JSON, 422),
    ("/v1/predict", _inputs({"series": [[1.0], [1.0, 2.0]]}), JSON, 422),
    ("/v1/predict", _inputs({"series": [[{"a": [1]}]]}), JSON, 422),
    ("/v1/predict", _inputs({"series": [[1.0]], "texts": ["x"]}), JSON, 422),
    ("/v1/predict", _inputs({"texts": [""]}), JSON, 422),
    ("/v1/predict", _inputs({"texts": "not a list"}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"dtype": "float64", "shape": [1, 1], "data": "AAAAAA=="}}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"shape": [2, 2], "data": "AAAAAA=="}}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"shape": [1, 1], "data": "%%%not base64"}}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"shape": [1, 1], "data": "AADAfw=="}}), JSON, 422),  # a NaN float32
    ("/v1/predict", _inputs({"tensor": {"shape": [0, 1], "data": ""}}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"shape": [10**12, 10**12], "data": ""}}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"shape": [2**32, 2**32], "data": ""}}), JSON, 422),  # wraps to 0 in int64
    ("/v1/predict", _inputs({"tensor": {"shape": [2**64, 1], "data": ""}}), JSON, 422),
    ("/v1/predict", _inputs({"tensor": {"shape": [1, 257], "data": "A" * 1370}}), JSON, 422),
    ("/v1/predict", _inputs({"series": [[0.0] * 257]}), JSON, 422),
    ("/v1/predict", _inputs({"series": [[0.0]] * 100_001}), JSON, 422),
    ("/v1/predict", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400),
    ("/v1/predict/batch", b'{"requests": []}', JSON, 422),
    ("/v1/predict/batch", b'{"requests": [null]}', JSON, 422),
    ("/v1/predict/batch", b'{"requests": "all"}', JSON, 422),
    ("/v1/predict/batch", b'{"requests": [{"symbol": "AAPL"}]}', JSON, 422),
    ("/v1/models/load", b'{"symbol": "AAPL"}', JSON, 422),
    ("/v1/models/load", b'{"symbol": "ZZZ", "timeframe": "1h", "model_type": "patchtst"}', JSON, 404),
    ("/v1/models/unload", b'{"symbol": {"$gt": ""}, "timeframe": "1h", "model_type": "patchtst"}', JSON, 422),
    ("/v1/predict?wait=1e999", json.dumps(PREDICT).encode(), JSON, 422),
]


@pytest.mark.parametrize("path, raw, headers, status", BAD_INPUTS)
async def test_bad_inputs_get_a_typed_4xx_never_500(client, celery, path, raw, headers, status):
    resp = await client.post(path, data=raw, headers=headers)
    body = await resp.json()
    assert resp.status == status, body
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"])
    assert celery.sent == []


async def test_validation_names_the_field(client):
    resp = await client.post("/v1/predict", data=_inputs({"series": [[1.0, "x"]]}), headers=JSON)
    error = (await resp.json())["error"]
    assert error == {"type": "InvalidInputError", "field": "inputs.series.0.1", "message": error["message"],
                     "retryable": False}
    assert error["message"].startswith("inputs.series.0.1: ")


async def test_unknown_route_and_method_use_the_json_shape(client):
    resp = await client.get("/v1/nothing")
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "RouteNotFoundError"
    # under /v2 the Open Inference Protocol's shape: "error" is the message (tritonclient reads a string)
    resp = await client.get("/v2/nothing")
    body = await resp.json()
    assert resp.status == 404 and body["type"] == "RouteNotFoundError" and isinstance(body["error"], str)
    resp = await client.put("/v1/predict", json=PREDICT)
    assert resp.status == 405 and "POST" in resp.headers["Allow"]
    assert (await resp.json())["error"]["type"] == "MethodNotAllowedError"


async def test_body_over_the_limit_is_413(aiohttp_client, tmp_path, aredis, celery, admin_key):
    from tests.unit.test_api_helpers import make_store

    small = settings_for(make_store(tmp_path / "s"), api_max_body_bytes=1024)
    client = await aiohttp_client(create_app(small, redis=aredis, celery_app=celery),
                                  headers={"X-API-Key": admin_key})
    resp = await client.post("/v1/predict", data=_inputs({"series": [[1.0]] * 500}), headers=JSON)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "PayloadTooLargeError"


async def test_a_true_bug_is_a_logged_500_without_details(client, caplog, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("shared.celery_wire.task_message", bug)
    resp = await client.post("/v1/predict", json=PREDICT)
    assert resp.status == 500
    error = (await resp.json())["error"]
    assert error["type"] == "InternalError" and "secret" not in error["message"]
    assert "secret internals" in caplog.text


async def test_http_exceptions_raised_by_handlers_keep_their_status(aiohttp_client, settings, aredis, celery):
    app = create_app(settings.model_copy(update={"api_auth_enabled": False}), redis=aredis, celery_app=celery)

    async def teapot(request: web.Request) -> web.Response:
        raise web.HTTPConflict(text="busy")

    app.router.add_get("/teapot", teapot)
    client = await aiohttp_client(app)
    resp = await client.get("/teapot")
    assert resp.status == 409 and (await resp.json())["error"]["message"] == "busy"

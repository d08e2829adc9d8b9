"""Bounds on what a request may cost: compressed bodies inflated within API_MAX_BODY_BYTES, series and tensor
shapes, and the size of the result a job asks for."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
import zlib
from typing import Any

import msgpack
import pytest

from producer_api.app import create_app
from producer_api.body import Inflater
from producer_api.context import CTX
from producer_api.errors import BadRequestError, PayloadTooLargeError
from shared.schemas import MAX_CHANNELS
from tests.unit.test_api_helpers import (KEYS, PREDICT, aredis, celery, client, make_store, server,  # noqa: F401
                                         settings, settings_for, sredis)

JSON = {"Content-Type": "application/json"}
#: What one bad request may cost the API, by the acceptance criteria of the input bounds.
MAX_SECONDS = 0.3
MAX_GROWTH_BYTES = 32 * 1024 * 1024


@pytest.fixture
async def api(aiohttp_client, tmp_path, aredis, celery, admin_key):
    """A client factory: an app with settings overridden (``api(api_max_body_bytes=...)``)."""
    async def make(**overrides: Any) -> Any:
        app = create_app(settings_for(make_store(tmp_path / f"store{len(overrides)}{id(overrides)}"), **overrides),
                         redis=aredis, celery_app=celery)
        return await aiohttp_client(app, headers={"X-API-Key": admin_key})
    return make


def _gzip_stream(prefix: bytes, filler: bytes, count: int, suffix: bytes) -> bytes:
    """gzip of ``prefix + filler * count + suffix``, compressed piece by piece (never held inflated here)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(prefix)]
    step = max(1, (1 << 20) // len(filler))
    for start in range(0, count, step):
        parts.append(packer.compress(filler * min(step, count - start)))
    parts += [packer.compress(suffix), packer.flush()]
    return b"".join(parts)


def _zeros_body(inflated_size: int) -> tuple[bytes, int]:
    """A predict body of one series row of zeros, gzipped, that inflates to at most ``inflated_size`` bytes."""
    head = b'{"symbol":"AAPL","timeframe":"1h","model_type":"patchtst","inputs":{"series":[[0'
    tail = b"]]}}"
    zeros = 1 + (inflated_size - len(head) - len(tail)) // 2
    return _gzip_stream(head, b",0", zeros - 1, tail), zeros


async def _measured(client: Any, body: bytes) -> tuple[int, dict, float, int]:
    """Post ``body`` twice: timed, then under tracemalloc; ``(status, error, seconds, peak growth in bytes)``."""
    headers = {**JSON, "Content-Encoding": "gzip"}
    started = time.perf_counter()
    resp = await client.post("/v1/predict", data=body, headers=headers)
    seconds = time.perf_counter() - started
    error = (await resp.json())["error"]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        again = await client.post("/v1/predict", data=body, headers=headers)
        assert again.status == resp.status
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return resp.status, error, seconds, peak - before


@pytest.mark.parametrize("encoding, pack", [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 defines it
    ("deflate", lambda raw: zlib.compress(raw)[2:-4]),  # raw deflate, as some clients send it
    ("gzip", lambda raw: gzip.compress(raw[:10]) + gzip.compress(raw[10:])),  # two members (RFC 1952)
    ("identity", lambda raw: raw),
])
async def test_compressed_bodies_are_inflated_by_the_api(client, celery, encoding, pack):
    # NOTE: this also proves aiohttp did not inflate them first: the app turns auto_decompress off through its
    # handler_args, which the test server (an AppRunner, like web.run_app) honours; a body inflated twice would
    # be a 400 here, not a 202.
    body = msgpack.packb({**PREDICT, "n_steps": 3})
    resp = await client.post("/v1/predict", data=pack(body),
                             headers={"Content-Type": "application/msgpack", "Content-Encoding": encoding})
    assert resp.status == 202, await resp.text()
    assert celery.sent[0][1]["kwargs"]["job"]["inputs"]["series"] == PREDICT["inputs"]["series"]


@pytest.mark.parametrize("body, encoding, status, kind", [
    (b'{"a": 1}', "br", 415, "UnsupportedEncodingError"),
    (b'{"a": 1}', "gzip, gzip", 415, "UnsupportedEncodingError"),
    (b"not gzip at all", "gzip", 400, "BadRequestError"),
    (gzip.compress(json.dumps(PREDICT).encode())[:-12], "gzip", 400, "BadRequestError"),  # truncated
    (gzip.compress(json.dumps(PREDICT).encode()) + b"trailing", "gzip", 400, "BadRequestError"),
    (zlib.compress(json.dumps(PREDICT).encode()) + b"x", "deflate", 400, "BadRequestError"),
    (gzip.compress(b"{"), "gzip", 400, "BadRequestError"),  # inflates fine, to bad JSON
    (gzip.compress(b""), "gzip", 400, "BadRequestError"),  # inflates to nothing
])
async def test_bad_encodings_and_streams_are_typed_4xx(client, celery, body, encoding, status, kind):
    resp = await client.post("/v1/predict", data=body, headers={**JSON, "Content-Encoding": encoding})
    error = (await resp.json())["error"]
    assert resp.status == status and error["type"] == kind, error
    assert celery.sent == []


async def test_a_compressed_body_is_bounded_before_and_after_inflating(api):
    client = await api(api_max_body_bytes=4096)
    noise = bytes(range(256)) * 64  # does not compress: 16 KiB on the wire
    resp = await client.post("/v1/predict", data=gzip.compress(noise, 0), headers={**JSON, "Content-Encoding": "gzip"})
    assert resp.status == 413 and "compressed" in (await resp.json())["error"]["message"]

    async def chunked():  # no Content-Length: counted while read
        yield gzip.compress(noise, 0)

    resp = await client.post("/v1/predict", data=chunked(), headers={**JSON, "Content-Encoding": "gzip"})
    assert resp.status == 413
    small_bomb = gzip.compress(b" " * 5000)  # ~50 bytes that inflate to 5000
    resp = await client.post("/v1/predict", data=small_bomb, headers={**JSON, "Content-Encoding": "gzip"})
    error = (await resp.json())["error"]
    assert resp.status == 413 and error["type"] == "PayloadTooLargeError" and "decompressed" in error["message"]


def test_the_inflater_stops_one_byte_past_the_limit():
    bomb = _gzip_stream(b"", b"\0" * 1024, 64 * 1024, b"")  # 64 MiB of zeros in ~64 KiB
    inflater = Inflater("gzip", 1000)
    with pytest.raises(PayloadTooLargeError):
        for start in range(0, len(bomb), 4096):
            inflater.feed(bomb[start:start + 4096])
    assert len(inflater.out) == 1001
    exact = Inflater("deflate", 5)
    exact.feed(zlib.compress(b"12345"))
    assert exact.finish() == b"12345"
    with pytest.raises(BadRequestError):
        Inflater("gzip", 10).feed(b"\x1f\x8b garbage")


async def test_a_gzip_bomb_past_the_body_limit_is_413_quickly_and_within_32_mb(client):
    limit = client.app[CTX].settings.api_max_body_bytes  # the default, 8 MiB
    body, _ = _zeros_body(limit + 50 * 1024 * 1024)  # inflates to ~58 MiB; ~60 KiB on the wire
    status, error, seconds, growth = await _measured(client, body)
    assert status == 413 and error["type"] == "PayloadTooLargeError", error
    assert seconds < MAX_SECONDS and growth < MAX_GROWTH_BYTES, (seconds, growth)
    print(f"gzip bomb ({len(body)} B -> >{limit} B): 413 in {seconds * 1000:.1f} ms, "
          f"peak +{growth / 2**20:.1f} MiB")


@pytest.mark.parametrize("limit", [2 * 1024 * 1024 + 4096, 8 * 1024 * 1024])
async def test_a_gzip_body_just_under_the_limit_with_a_row_too_wide_is_422_quickly(api, celery, limit):
    client = await api(api_max_body_bytes=limit)
    body, zeros = _zeros_body(limit - 16)
    status, error, seconds, growth = await _measured(client, body)
    assert status == 422 and error["field"] == "inputs.series", error
    assert f"more than {MAX_CHANNELS} numbers" in error["message"] and celery.sent == []
    print(f"row of {zeros} zeros ({len(body)} B -> {limit - 16} B): 422 in {seconds * 1000:.1f} ms, "
          f"peak +{growth / 2**20:.1f} MiB")
    assert seconds < MAX_SECONDS and growth < MAX_GROWTH_BYTES, (seconds, growth)


@pytest.mark.parametrize("series, field", [
    ([[0.0] * (MAX_CHANNELS + 1)], "inputs.series.0"),
    ([[0.0] * 2] * 3 + [[0.0] * (MAX_CHANNELS + 1)], "inputs.series.3"),
])
async def test_series_width_is_bounded_naming_the_row(client, series, field):
    resp = await client.post("/v1/predict", json={**PREDICT, "inputs": {"series": series}})
    error = (await resp.json())["error"]
    assert resp.status == 422 and error["field"] == field, error
    batch = {"requests": [PREDICT, {**PREDICT, "inputs": {"series": series}}]}
    error = (await (await client.post("/v1/predict/batch", json=batch)).json())["error"]
    assert error["field"] == f"requests.1.{field}", error
    assert (await client.post("/v1/predict", json={**PREDICT, "inputs": {"series": [[0.0] * MAX_CHANNELS]}})
            ).status == 202


@pytest.mark.parametrize("shape, field", [
    ([4294967296, 4294967296], "inputs.tensor.shape"),  # overflowed np.prod to 0 and answered 500
    ([2**63, 2], "inputs.tensor.shape"),
    ([10, MAX_CHANNELS + 1], "inputs.tensor"),
])
async def test_tensor_shapes_are_bounded_with_python_ints(client, shape, field):
    resp = await client.post("/v1/predict", json={**PREDICT, "inputs": {"tensor": {"shape": shape, "data": ""}}})
    error = (await resp.json())["error"]
    assert resp.status == 422 and error["field"] == field, error


async def test_the_result_size_is_bounded_naming_the_field(api, tmp_path):
    client = await api(api_max_result_values=100)
    # 3 rows of 2 channels: n_steps x 2 values
    assert (await client.post("/v1/predict", json={**PREDICT, "n_steps": 50})).status == 202
    resp = await client.post("/v1/predict", json={**PREDICT, "n_steps": 51})
    error = (await resp.json())["error"]
    assert resp.status == 422 and error["field"] == "n_steps" and "API_MAX_RESULT_VALUES=100" in error["message"]
    # without n_steps, and no horizon in the store's config: the schema's longest forecast is assumed
    resp = await client.post("/v1/predict", json=PREDICT)
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "n_steps"
    # items add up in a batch
    item = {**PREDICT, "n_steps": 20}
    assert (await client.post("/v1/predict/batch", json={"requests": [item] * 2})).status == 202
    resp = await client.post("/v1/predict/batch", json={"requests": [item] * 3})
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "requests"


async def test_without_n_steps_the_estimate_uses_the_models_horizon(aiohttp_client, tmp_path, aredis, celery,
                                                                    admin_key):
    store = make_store(tmp_path / "store")
    (store / "AAPL" / "1h" / "patchtst" / "2" / "config.json").write_text(json.dumps({"prediction_length": 24}))
    app = create_app(settings_for(store, api_max_result_values=48), redis=aredis, celery_app=celery)
    client = await aiohttp_client(app, headers={"X-API-Key": admin_key})
    assert (await client.post("/v1/predict", json=PREDICT)).status == 202  # 24 steps x 2 channels
    wide = {**PREDICT, "inputs": {"series": [[1.0, 2.0, 3.0]]}}
    assert (await client.post("/v1/predict", json=wide)).status == 422  # 24 x 3
    # version 1 has no horizon in its config: the longest forecast is assumed
    assert (await client.post("/v1/predict", json={**PREDICT, "version": "1"})).status == 422
    texts = {"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment", "inputs": {"texts": ["up"] * 16}}
    assert (await client.post("/v1/predict", json=texts)).status == 202  # 16 texts x 3 classes
    assert (await client.post("/v1/predict", json={**texts, "inputs": {"texts": ["up"] * 17}})).status == 422


async def test_a_large_body_with_an_array_too_wide_is_refused_before_decoding(client, celery, monkeypatch):
    import producer_api.body as body

    decoded = []
    monkeypatch.setattr(body, "decode", lambda raw, ctype: decoded.append(1))
    wide = {**PREDICT, "inputs": {"series": [[0] * 40_000]}}  # ~80 KB: over SCAN_MIN_BYTES
    for path, payload, field in (("/v1/predict", wide, "inputs.series"),
                                 ("/v1/predict/batch", {"requests": [PREDICT, wide]}, "requests")):
        resp = await client.post(path, json=payload)
        error = (await resp.json())["error"]
        assert resp.status == 422 and error["field"] == field, error
    assert decoded == [] and celery.sent == []
    # numbers inside a string are text, not an array: such a body is decoded (and judged by the schema)
    quoted = {**PREDICT, "inputs": {"texts": ["[" + ",".join(["1"] * 300) + "]"] * 120}}
    await client.post("/v1/predict", json=quoted)
    assert decoded == [1]

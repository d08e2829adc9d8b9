"""The TorchServe adapter's parts that need no TorchServe: the handler's wire format and batching (called as
TorchServe calls it, on a real TorchScript module), the error mapping, the token file, the archive's reuse, and the
client against a small fake server (a registration another process made, the key each API gets)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from aiohttp import web

from shared.errors import AdapterUnavailableError, InvalidInputError, ModelNotFoundError, PredictionError
from shared.schemas import ModelKey
from shared.settings import FleetSettings, TorchServeSettings
from tests.helpers import free_port
from workers.models.registry import build_model, validate_config
from workers.serving.adapters import torchserve_handler as wire
from workers.serving.adapters.torchserve import (TorchServeClient, TorchServeServingAdapter, _error, _refused,
                                                 _token_refused, ready_workers)
from workers.store import ModelStore


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                   np.arange(6, dtype=np.int64).reshape(2, 3)])
def test_tensors_round_trip(array: np.ndarray) -> None:
    back = wire.decode(wire.encode(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("body, why", [
    (b"", "shorter than the header"),
    (b"XXXX\x00\x01\x02\x00\x00\x00", "not the fleet's tensor format"),
    (wire.encode(np.zeros((2, 3), np.float32))[:-4], "bytes of data"),
    (wire._HEAD.pack(wire.MAGIC, 0, 2) + np.array([2**31, 2**31], "<u4").tobytes(), "values; at most"),
])
def test_bad_bodies_are_refused_without_allocating(body: bytes, why: str) -> None:
    with pytest.raises(wire.BadTensorError, match=why):
        wire.decode(body)


def test_the_handler_runs_a_whole_batch_in_one_forward_and_answers_each(tmp_path: Path) -> None:
    class Doubler(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    torch.jit.script(Doubler()).save(str(tmp_path / "model.pt"))
    context = SimpleNamespace(system_properties={"model_dir": str(tmp_path), "gpu_id": None},
                              manifest={"model": {"serializedFile": "model.pt"}})
    handler = wire.FleetHandler()
    handler.initialize(context)
    a, b = np.ones((1, 3), np.float32), np.full((2, 3), 3, np.float32)
    answers = handler.handle([{"body": wire.encode(a)}, {"body": b"junk"}, {"data": wire.encode(b)}], context)
    np.testing.assert_array_equal(wire.decode(answers[0]), a * 2)
    assert answers[1].startswith("bad tensor:")  # only that request fails
    np.testing.assert_array_equal(wire.decode(answers[2]), b * 2)


@pytest.mark.parametrize("status, kind", [(404, ModelNotFoundError), (503, AdapterUnavailableError),
                                          (507, AdapterUnavailableError), (400, InvalidInputError),
                                          (500, PredictionError)])
def test_torchserve_statuses_map_onto_the_error_root(status: int, kind: type) -> None:
    err = _error(status, json.dumps({"code": status, "message": "boom"}).encode(), "predict m")
    assert type(err) is kind and "boom" in err.message


def test_a_refused_token_is_told_apart_from_a_bad_input() -> None:
    assert _token_refused(400, b'{"message": "Token Authorization failed. Token either incorrect"}')
    assert _token_refused(401, b"")
    assert not _token_refused(400, b'{"message": "bad tensor: shape"}')


def test_keys_come_from_the_key_file_and_a_missing_one_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"management": {"key": "m1"}, "inference": {"key": "i1"}, "API": {"key": "a"}}))
    client = TorchServeClient(TorchServeSettings(key_file=path))
    try:
        assert (client._key("management"), client._key("inference")) == ("m1", "i1")
        path.write_text(json.dumps({"management": {"key": "m2"}, "inference": {"key": "i2"}}))
        assert client._key("inference") == "i1"  # cached until a refusal asks to read again
        assert client._key("inference", reload=True) == "i2"
        path.unlink()
        with pytest.raises(AdapterUnavailableError, match="key file"):
            client._key("inference", reload=True)
    finally:
        client.close()


def test_an_unreachable_server_is_unavailable_within_the_timeout() -> None:
    client = TorchServeClient(TorchServeSettings(inference_url=f"http://127.0.0.1:{free_port()}",
                                                 timeout_seconds=1.0))
    try:
        with pytest.raises(AdapterUnavailableError, match="unreachable"):
            client.ping()
    finally:
        client.close()


def test_the_handler_groups_requests_by_shape_and_a_failed_forward_answers_only_its_requests(tmp_path: Path) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)  # takes rows of 3 values only
    torch.jit.trace(linear, torch.zeros(1, 3)).save(str(tmp_path / "model.pt"))
    context = SimpleNamespace(system_properties={"model_dir": str(tmp_path), "gpu_id": None},
                              manifest={"model": {"serializedFile": "model.pt"}})
    handler = wire.FleetHandler()
    handler.initialize(context)
    good, odd = np.zeros((2, 3), np.float32), np.zeros((1, 5), np.float32)
    answers = handler.handle([{"body": wire.encode(good)}, {"body": wire.encode(odd)}, {"body": wire.encode(good)}],
                             context)
    with torch.no_grad():
        want = linear(torch.from_numpy(good)).numpy()
    np.testing.assert_allclose(wire.decode(answers[0]), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(wire.decode(answers[2]), want, rtol=0, atol=1e-6)
    assert answers[1].startswith("forward failed on shape [1, 5]")
    assert type(_refused(answers[1], "m")) is InvalidInputError  # torch's own words for a shape it refuses


@pytest.mark.parametrize("answer, kind", [
    ("bad tensor: 3 bytes, shorter than the header", InvalidInputError),
    ("forward failed on shape [1, 5]: RuntimeError: expected input with shape [*, 3]", InvalidInputError),
    ("forward failed on shape [2, 3]: RuntimeError: out of memory", PredictionError),
    ("something else", PredictionError),
])
def test_answers_that_are_not_tensors_map_onto_the_error_root(answer: str, kind: type) -> None:
    assert type(_refused(answer, "m")) is kind


def test_ready_workers_counts_only_ready_ones() -> None:
    assert ready_workers(None) == 0
    assert ready_workers([{"workers": [{"status": "READY"}, {"status": "UNLOADING"}]},
                          {"workers": [{"status": "READY"}]}]) == 2


@pytest.mark.skipif(not (Path(sys.executable).parent / "torch-model-archiver").exists(),
                    reason="the torchserve extra is not installed")
def test_an_unchanged_model_reuses_its_archive_and_a_changed_one_is_archived_again(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    config = validate_config("patchtst", {"context_length": 48, "prediction_length": 12}).model_dump()
    key = ModelKey(symbol="T", timeframe="1h", model_type="patchtst")
    _, path = store.save(key, build_model("patchtst", config), config, {})
    settings = FleetSettings(model_store_dir=store.root, torchserve=TorchServeSettings(model_store=tmp_path / "mar"))
    adapter = TorchServeServingAdapter(settings, store=store)
    try:
        artifacts = store.load_from_path(path)
        name, first = adapter._archive(artifacts, "T_1h_patchtst")
        mar = tmp_path / "mar" / name
        assert name == "T_1h_patchtst.mar" and first["archive_reused"] is False and mar.is_file()
        with zipfile.ZipFile(mar) as archive:  # what TorchServe unpacks: the artefact and the fleet's handler
            assert {"model.pt", "torchserve_handler.py", "MAR-INF/MANIFEST.json"} <= set(archive.namelist())
        assert adapter._archive(artifacts, "T_1h_patchtst")[1]["archive_reused"] is True
        sidecar = mar.with_suffix(".mar.json")
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "handler": "an older handler"}))
        assert adapter._archive(artifacts, "T_1h_patchtst")[1]["archive_reused"] is False
        mar.unlink()
        assert adapter._archive(artifacts, "T_1h_patchtst")[1]["archive_reused"] is False and mar.is_file()
    finally:
        adapter.close()


class FakeTorchServe:
    """A loopback aiohttp server answering the few management and inference calls the client makes."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.describes = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        self.released = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path, request.headers.get("Authorization")))
        if request.path == "/ping":  # a server that accepted the connection and hangs
            await self.released.wait()
        if request.method == "POST" and request.path == "/models":
            return web.json_response({"code": 409, "message": "Model version 1.0 is already registered."}, status=409)
        if request.method == "GET" and request.path.startswith("/models/"):
            self.describes += 1  # the second look finds the other process's worker ready
            return web.json_response([{"workers": [{"status": "READY" if self.describes > 1 else "STARTING"}]}])
        if request.path.startswith("/predictions/"):
            return web.Response(body=b"forward failed on shape [1, 5]: RuntimeError: size of tensor a (5) must match")
        return web.json_response({"message": "not here"}, status=404)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.released.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_a_model_another_process_registered_is_waited_for_and_each_api_gets_its_own_key(tmp_path: Path) -> None:
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"management": {"key": "m1"}, "inference": {"key": "i1"}}))
    server = FakeTorchServe()
    url = f"http://127.0.0.1:{server.port}"
    client = TorchServeClient(TorchServeSettings(inference_url=url, management_url=url, key_file=keys,
                                                 load_timeout_seconds=10))
    try:
        client.register("m", "m.mar")  # 409: treated as done once the model has a READY worker
        assert server.describes == 2
        with pytest.raises(InvalidInputError, match="size of tensor"):
            client.predict("m", np.zeros((1, 5), np.float32))
    finally:
        client.close()
        server.close()
    assert [(method, path) for method, path, _ in server.seen] == [
        ("POST", "/models"), ("GET", "/models/m"), ("GET", "/models/m"), ("POST", "/predictions/m")]
    assert [auth for _, _, auth in server.seen] == ["Bearer m1"] * 3 + ["Bearer i1"]


def test_a_server_that_hangs_is_unavailable_within_the_timeout() -> None:
    server = FakeTorchServe()
    url = f"http://127.0.0.1:{server.port}"
    client = TorchServeClient(TorchServeSettings(inference_url=url, management_url=url, timeout_seconds=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(AdapterUnavailableError, match="unreachable"):
            client.ping()
        assert time.monotonic() - started < 0.5 + 1.0
    finally:
        client.close()
        server.close()

"""The TorchServe adapter's parts that need no server: the handler's wire format and batching (called as TorchServe
calls it, on a real TorchScript module), the error mapping, and the token file."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.errors import AdapterUnavailableError, InvalidInputError, ModelNotFoundError, PredictionError
from shared.settings import TorchServeSettings
from workers.serving.adapters import torchserve_handler as wire
from workers.serving.adapters.torchserve import TorchServeClient, _error, _token_refused


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
    from tests.helpers import free_port

    client = TorchServeClient(TorchServeSettings(inference_url=f"http://127.0.0.1:{free_port()}",
                                                 timeout_seconds=1.0))
    try:
        with pytest.raises(AdapterUnavailableError, match="unreachable"):
            client.ping()
    finally:
        client.close()

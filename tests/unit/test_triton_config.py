"""Triton repository generation, the Python-backend model, error mapping, and a server that cannot be reached."""

from __future__ import annotations

import json
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient.grpc", reason="the Triton extra is not installed (pip install '.[triton]')")
pytest.importorskip("tritonclient.http", reason="the Triton extra is not installed (pip install '.[triton]')")

from geventhttpclient.response import HTTPConnectionClosed  # noqa: E402
from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from shared.errors import (AdapterUnavailableError, InvalidInputError, ModelNotFoundError,  # noqa: E402
                           PredictionError)
from shared.schemas import ModelKey, ModelType  # noqa: E402
from shared.settings import FleetSettings, TritonSettings  # noqa: E402
from workers.serving.adapters import triton_repo  # noqa: E402
from workers.serving.adapters.triton import TritonConnection, TritonServingAdapter, map_error  # noqa: E402
from workers.serving.adapters.triton_model import TritonPythonModel  # noqa: E402
from workers.serving.adapters.triton_repo import RepoModel, model_io, render_config, write_model_files  # noqa: E402
from workers.models.registry import build_model, validate_config  # noqa: E402
from workers.store import ModelStore  # noqa: E402

TYPES = [t.value for t in ModelType]
DEVICES = ["cpu", "cuda", "cuda:1"]


def config_of(mtype: str) -> dict[str, Any]:
    extra = {"vocab": ["up", "down"], "max_len": 16} if mtype == "sentiment" else {}
    return {**validate_config(mtype, extra).model_dump(), "model_type": mtype}


def repo_model(mtype: str, backend: str = "python", device: str = "cpu", max_batch_size: int = 32) -> RepoModel:
    inp, out = model_io(mtype, config_of(mtype))
    return RepoModel(name=f"AAPL_1h_{mtype}", version=3, backend=backend, input=inp, output=out,
                     max_batch_size=max_batch_size, max_queue_delay_us=500, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["python", "pytorch_libtorch"])
@pytest.mark.parametrize("mtype", TYPES)
def test_every_generated_config_parses_into_model_config(mtype: str, backend: str, device: str) -> None:
    text = render_config(repo_model(mtype, backend, device))
    config = text_format.Parse(text, mc.ModelConfig())  # raises on anything that is not a valid ModelConfig
    assert config.name == f"AAPL_1h_{mtype}" and config.backend == backend and config.max_batch_size == 32
    (inp,), (out,) = config.input, config.output
    cfg = config_of(mtype)
    if mtype == "sentiment":
        assert (inp.data_type, list(inp.dims)) == (mc.TYPE_INT64, [cfg["max_len"]])
        assert (out.data_type, list(out.dims)) == (mc.TYPE_FP32, [3])
    else:
        assert (inp.data_type, list(inp.dims)) == (mc.TYPE_FP32, [cfg["context_length"], cfg["n_channels"]])
        assert (out.data_type, list(out.dims)) == (mc.TYPE_FP32, [cfg["prediction_length"], cfg["n_channels"]])
    assert (inp.name, out.name) == (triton_repo.INPUT_NAME, triton_repo.OUTPUT_NAME)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    (group,) = config.instance_group
    expected_kind = mc.ModelInstanceGroup.KIND_CPU if device == "cpu" else mc.ModelInstanceGroup.KIND_GPU
    assert group.kind == expected_kind and group.count == 1
    assert list(group.gpus) == ([1] if device == "cuda:1" else [])
    params = {k: v.string_value for k, v in config.parameters.items()}
    if backend == "python":
        assert params["torchscript_file"] == "model.pt" and int(params["torch_num_threads"]) >= 1
    else:
        assert params == {"INFERENCE_MODE": "true"}
    assert triton_repo.parse_config(text) == config


@pytest.mark.parametrize("max_batch_size,expected", [(1, [1]), (2, [1, 2]), (8, [2, 4, 8]), (100, [25, 50, 100])])
def test_preferred_batch_sizes_never_exceed_the_max(max_batch_size: int, expected: list[int]) -> None:
    assert triton_repo.preferred_batch_sizes(max_batch_size) == expected
    text = render_config(repo_model("patchtst", max_batch_size=max_batch_size))
    assert text_format.Parse(text, mc.ModelConfig()).max_batch_size == max_batch_size


def test_metadata_shapes_put_the_batch_dimension_first() -> None:
    inp, out = model_io("patchtst", config_of("patchtst"))
    assert inp.metadata_shape() == [-1, 96, 5] and out.metadata_shape() == [-1, 24, 5]
    assert (inp.datatype, model_io("sentiment", config_of("sentiment"))[0].datatype) == ("FP32", "INT64")


def test_repository_files_are_written_once_and_old_versions_go(tmp_path: Path) -> None:
    model = repo_model("patchtsmixer")
    stale = tmp_path / model.name / "2"
    stale.mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"old")
    assert write_model_files(tmp_path, model) is True
    assert not stale.exists()
    text = (tmp_path / model.name / "config.pbtxt").read_text()
    text_format.Parse(text, mc.ModelConfig())
    model_py = tmp_path / model.name / "3" / "model.py"
    assert model_py.read_bytes() == triton_repo.PYTHON_MODEL_SOURCE.read_bytes()
    assert write_model_files(tmp_path, model) is False  # unchanged: nothing rewritten, no reload needed
    libtorch = RepoModel(**{**model.__dict__, "backend": "pytorch_libtorch"})
    assert write_model_files(tmp_path, libtorch) is True
    assert 'backend: "pytorch_libtorch"' in (tmp_path / model.name / "config.pbtxt").read_text()
    assert not [p for p in (tmp_path / model.name).rglob("*.tmp")]


# -- the Python-backend model.py, with a stand-in for Triton's pb_utils ---------------------------------------
class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors, error


@pytest.fixture()
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _Tensor
    fake.InferenceResponse = _Response
    fake.TritonError = lambda message: message
    fake.triton_string_to_numpy = lambda name: {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}[name]
    fake.get_input_tensor_by_name = lambda request, name: request[name]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    yield fake


def test_python_backend_model_batches_requests_into_one_forward(tmp_path: Path, pb_utils: Any) -> None:
    torch.manual_seed(0)
    mtype = "patchtst"
    cfg = config_of(mtype)
    model = build_model(mtype, cfg)
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    torch.jit.save(torch.jit.script(model), str(version / "model.pt"))
    # Triton hands the backend its config as JSON with the enum names, as MessageToDict writes them.
    config = json_format.MessageToDict(triton_repo.build_config(repo_model(mtype)), preserving_proto_field_name=True)
    instance = TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / "m"),
                         "model_version": "1", "model_instance_kind": "CPU"})
    xs = [np.random.default_rng(i).standard_normal((n, 96, 5)).astype(np.float32) for i, n in enumerate((1, 3))]
    responses = instance.execute([{"INPUT__0": _Tensor("INPUT__0", x)} for x in xs])
    with torch.inference_mode():
        for x, response in zip(xs, responses):
            (out,) = response.output_tensors
            assert out.name == "OUTPUT__0" and out.array.dtype == np.float32
            np.testing.assert_allclose(out.array, model(torch.from_numpy(x)).numpy(), atol=1e-5)
    bad = instance.execute([{"INPUT__0": _Tensor("INPUT__0", np.zeros((1, 10, 5), np.float32))}])
    assert bad[0].error and "forward failed" in bad[0].error and bad[0].output_tensors == []
    instance.finalize()


# -- error mapping -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc,expected", [
    (InferenceServerException("unexpected shape for input 'INPUT__0' for model 'm'. Expected [-1,96,5], got "
                              "[1,50,5]", status="400"), InvalidInputError),
    (InferenceServerException("Request for unknown model: 'm' is not found", status="400"), ModelNotFoundError),
    (InferenceServerException("Request for unknown model: 'm' version 1 is not at ready state",
                              status="StatusCode.UNAVAILABLE"), ModelNotFoundError),
    (InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE"),
     AdapterUnavailableError),
    (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), AdapterUnavailableError),
    (InferenceServerException("forward failed: RuntimeError: boom", status="500"), PredictionError),
    (ConnectionRefusedError(111, "Connection refused"), AdapterUnavailableError),
    (socket.timeout("timed out"), AdapterUnavailableError),
    (HTTPConnectionClosed("connection closed."), AdapterUnavailableError),  # the server went away mid-call
    (ValueError("odd"), PredictionError),
])
def test_triton_errors_map_onto_the_error_root(exc: BaseException, expected: type) -> None:
    err = map_error(exc, "infer m", "127.0.0.1:1")
    assert type(err) is expected
    assert err.retryable is (expected is AdapterUnavailableError)


# -- a server that is not there ----------------------------------------------------------------------------
@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("grpc", [False, True], ids=["http", "grpc"])
@pytest.mark.parametrize("hung", [False, True], ids=["refused", "hung"])
def test_unreachable_server_is_a_retryable_error_within_the_timeout(grpc: bool, hung: bool, silent_port: int) -> None:
    port = silent_port if hung else closed_port()
    conn = TritonConnection(TritonSettings(server_url=f"127.0.0.1:{port}", server_grpc_url=f"127.0.0.1:{port}",
                                           use_grpc=grpc, timeout_seconds=0.5, load_timeout_seconds=0.8))
    inp, out = model_io("patchtst", config_of("patchtst"))
    calls = [("infer", lambda: conn.infer("m", 1, np.zeros((1, 96, 5), np.float32), inp, out), 0.5),
             ("health", conn.server_state, 0.5), ("load", lambda: conn.load("m"), 0.8)]
    for what, call, limit in calls:
        started = time.monotonic()
        with pytest.raises(AdapterUnavailableError) as info:
            call()
        assert time.monotonic() - started < limit + 1.0, what
        assert info.value.retryable and f"127.0.0.1:{port}" in info.value.message
    conn.close()


def test_adapter_with_no_server_fails_loads_typed_and_reports_unhealthy(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    cfg = config_of("patchtst")
    store.save(ModelKey(symbol="T", timeframe="1h", model_type="patchtst"), build_model("patchtst", cfg), cfg, {})
    port = closed_port()
    settings = FleetSettings(model_store_dir=store.root, triton=TritonSettings(
        server_url=f"127.0.0.1:{port}", model_repository=tmp_path / "repo", timeout_seconds=0.5))
    adapter = TritonServingAdapter(settings, "cpu")
    with pytest.raises(AdapterUnavailableError):
        adapter.load_model(store.root / "T" / "1h" / "patchtst" / "1", "T", "1h", "patchtst")
    assert adapter.list_loaded_models() == []
    # The repository was prepared all the same: a server that comes up finds the model there.
    config = (tmp_path / "repo" / "T_1h_patchtst" / "config.pbtxt").read_text()
    assert text_format.Parse(config, mc.ModelConfig()).name == "T_1h_patchtst"
    assert (tmp_path / "repo" / "T_1h_patchtst" / "1" / "model.pt").is_file()
    health = adapter.health_check()
    assert health["healthy"] is False and health["adapter"] == "triton" and "unreachable" in health["error"]
    adapter.close()


def test_a_stale_connection_is_retried_once_on_a_fresh_one() -> None:
    """A server that drops the first connection (as after a restart) costs no job: the call retries once."""
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.path)
            if len(seen) == 1:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no response at all
                return
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = TritonConnection(TritonSettings(server_url=f"127.0.0.1:{server.server_address[1]}",
                                               timeout_seconds=2.0))
        assert conn.server_state() == (True, True)
        assert seen[:2] == ["/v2/health/live", "/v2/health/live"] and len(seen) == 3
        conn.close()
    finally:
        server.shutdown()
        server.server_close()

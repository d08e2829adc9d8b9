"""(e) and (h): a real Triton Inference Server (the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel),
through its HTTP API (e) and its gRPC API (h).

The Python backend runs the same torch model (:mod:`bench.systems.triton_model`) with dynamic batching on.
Two layouts of the two cores are possible: 2 instances x 1 torch thread, or 1 instance x 2 threads
(:data:`bench.config.TRITON`); the runner measures each at saturation and keeps the best. Driven through
``tritonclient``'s HTTP aio client with binary tensors. The server is started as ``shared/real-servers.md``
describes (own backends directory with this interpreter's stub, venv first on PATH, LD_LIBRARY_PATH to the
interpreter's LIBDIR). :class:`TritonGrpc` measures the same running server through ``tritonclient.grpc``'s aio
client, beside the fleet's own gRPC (g).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from bench.config import TRITON
from bench.loadgen import Call
from bench.models import MODELS, BenchModel
from bench.procs import Proc, free_port, python_env, wait_until
from bench.systems.base import BenchContext, Point, System, model_of

ROOT = Path(__file__).resolve().parents[2]


def pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def triton_name(model: BenchModel) -> str:
    return f"bench_{model.name}"


def model_config(model: BenchModel, store_dir: Path, instances: int, threads: int) -> str:
    params = {"repo_root": str(ROOT), "store_dir": str(store_dir), "symbol": model.symbol,
              "torch_threads": str(threads)}
    param_text = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    preferred = ", ".join(str(b) for b in TRITON["preferred_batch_size"])
    delay = TRITON["max_queue_delay_us"]
    return f"""name: "{triton_name(model)}"
backend: "python"
max_batch_size: {TRITON['max_batch_size']}
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {model.context}, {model.channels} ] }} ]
output [ {{ name: "OUTPUT" data_type: TYPE_FP32 dims: [ {model.horizon}, {model.channels} ] }} ]
dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: {delay} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
{param_text}
"""


class Triton(System):
    key = "e"
    name = "Triton (Python backend, dynamic batching)"
    default_encoding = "binary"

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx, "")
        self.dir = ctx.workdir / "triton"
        self.repo = self.dir / "repository"
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.shm_prefix = f"fleet_bench_{os.getpid()}_"
        self.notes.append(f"dynamic batching: max batch {TRITON['max_batch_size']}, preferred "
                          f"{TRITON['preferred_batch_size']}, queue delay {TRITON['max_queue_delay_us']} us; "
                          "HTTP aio client, binary tensors")

    def _backends(self) -> Path:
        base = pytriton_dir()
        target = self.dir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(base / "backends" / "python" / name, target / name)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        # NOTE: a symlink, not a copy: the stub finds the wheel's bundled libraries (libcudart...) through an
        # $ORIGIN-relative RPATH, which only resolves from its real location.
        stub = target / "triton_python_backend_stub"
        stub.unlink(missing_ok=True)
        stub.symlink_to(base / "python_backend_stubs" / version / "triton_python_backend_stub")
        return target.parent

    def start(self) -> None:
        self.repo.mkdir(parents=True, exist_ok=True)
        backends = self._backends()
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        env = python_env(OMP_NUM_THREADS="1")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        bundled = pytriton_dir().parents[1] / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in [sysconfig.get_config_var("LIBDIR"), str(bundled), env.get("LD_LIBRARY_PATH", "")] if p)
        env.pop("PYTHONPATH", None)
        argv = [str(pytriton_dir() / "bin" / "tritonserver"), "--model-repository", str(self.repo),
                "--model-control-mode", "explicit", "--backend-directory", str(backends),
                "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}",
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--allow-gpu-metrics", "false", "--strict-readiness", "false", "--exit-timeout-secs", "5",
                "--log-verbose", "0"]
        self.procs.append(Proc("tritonserver", argv, env, self.ctx.log_dir, cpus=self.ctx.server_cpus, cwd=self.dir))
        wait_until(lambda: self._http("GET", "/v2/health/live") == 200, 90, "tritonserver", self.procs)

    def _http(self, method: str, path: str, timeout: float = 5) -> int:
        """One call to the server's HTTP API (plain urllib: tritonclient's sync client runs on gevent)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            if method == "POST":
                raise RuntimeError(f"{path}: HTTP {err.code}: {err.read()[:500]!r}\n"
                                   f"{self.procs[0].log_tail(1500)}") from None
            return err.code

    def set_variant(self, variant: str) -> None:
        """(Re)load both models with ``variant``'s instances x threads."""
        instances, threads = TRITON["variants"][variant]
        for model in MODELS.values():
            name = triton_name(model)
            if self._http("GET", f"/v2/models/{name}/ready") == 200:
                self._http("POST", f"/v2/repository/models/{name}/unload", timeout=60)
            path = self.repo / name
            (path / "1").mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(__file__).with_name("triton_model.py"), path / "1" / "model.py")
            (path / "config.pbtxt").write_text(model_config(model, self.ctx.store_dir, instances, threads))
            self._http("POST", f"/v2/repository/models/{name}/load", timeout=180)
            wait_until(lambda: self._http("GET", f"/v2/models/{name}/ready") == 200, 120, f"Triton model {name}",
                       self.procs)
        self.variant = f"{variant} ({instances} instance{'s' if instances > 1 else ''} x {threads} torch "\
                       f"thread{'s' if threads > 1 else ''})"

    def stop(self) -> None:
        super().stop()
        # A server that had to be killed leaves its Python-backend shared memory behind; ours has our prefix.
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        import tritonclient.http as httpclient
        from tritonclient.http.aio import InferenceServerClient

        model = model_of(point)
        name = triton_name(model)
        batches = [np.ascontiguousarray(s[None], dtype=np.float32) for s in self.ctx.inputs[point.model]]
        client = InferenceServerClient(f"127.0.0.1:{self.http_port}", conn_limit=max(100, point.concurrency))
        output = [httpclient.InferRequestedOutput("OUTPUT", binary_data=True)]
        try:
            async def call(i: int) -> None:
                x = batches[i % len(batches)]
                inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=True)
                result = await client.infer(name, [inp], outputs=output)
                y = result.as_numpy("OUTPUT")
                if y is None or y.shape != (1, model.horizon, model.channels):
                    raise RuntimeError(f"output of shape {None if y is None else y.shape}")
            yield call
        finally:
            await client.close()


class TritonGrpc(System):
    """The running :class:`Triton` server (its chosen layout), through gRPC; started and stopped by it."""

    key = "h"
    name = "Triton gRPC (Python backend, dynamic batching)"
    default_encoding = "binary"

    def __init__(self, server: Triton) -> None:
        super().__init__(server.ctx, server.variant)
        self.server = server
        self.notes.append("the same server and models as (e); gRPC aio client, raw FP32 tensors, one channel")

    def start(self) -> None:
        self.variant = self.server.variant

    def own_procs(self) -> list[Proc]:
        return self.server.own_procs()

    def stop(self) -> None:
        """Nothing: the server belongs to (e)'s system."""

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc.aio import InferenceServerClient

        model = model_of(point)
        name = triton_name(model)
        batches = [np.ascontiguousarray(s[None], dtype=np.float32) for s in self.ctx.inputs[point.model]]
        client = InferenceServerClient(f"127.0.0.1:{self.server.grpc_port}")
        output = [grpcclient.InferRequestedOutput("OUTPUT")]
        try:
            async def call(i: int) -> None:
                x = batches[i % len(batches)]
                inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                result = await client.infer(name, [inp], outputs=output, client_timeout=60)
                y = result.as_numpy("OUTPUT")
                if y is None or y.shape != (1, model.horizon, model.channels):
                    raise RuntimeError(f"output of shape {None if y is None else y.shape}")
            yield call
        finally:
            await client.close()

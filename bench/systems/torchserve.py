"""(f) A real TorchServe 0.12 with batching on: batch 32, max delay 10 ms, 2 workers of one torch thread each.

Both models are archived with ``torch-model-archiver`` around :mod:`bench.systems.torchserve_handler` and
registered through the management API. The client posts the series as raw float32 bytes
(``application/octet-stream``) to ``/predictions/<model>`` with aiohttp and gets the forecast back the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from bench.config import TORCHSERVE
from bench.loadgen import Call
from bench.models import MODELS, BenchModel
from bench.procs import Proc, free_port, python_env, wait_until
from bench.systems.base import BenchContext, Point, System, model_of

ROOT = Path(__file__).resolve().parents[2]


def ts_name(model: BenchModel) -> str:
    return f"bench_{model.name}"


class TorchServe(System):
    key = "f"
    name = "TorchServe 0.12 (batching)"
    default_encoding = "binary"

    def __init__(self, ctx: BenchContext) -> None:
        cfg = TORCHSERVE
        super().__init__(ctx, f"{cfg['workers']} workers x {cfg['torch_threads']} thread, batch {cfg['batch_size']}, "
                              f"delay {cfg['max_batch_delay_ms']} ms")
        self.dir = ctx.workdir / "torchserve"
        self.store = self.dir / "model-store"
        self.inference = self.management = ""
        self.notes.append("raw float32 bytes in and out (application/octet-stream), aiohttp client")

    def _archive(self, model: BenchModel, env: dict[str, str]) -> None:
        extra = self.dir / f"{ts_name(model)}-files"
        extra.mkdir(parents=True, exist_ok=True)
        params = extra / "bench_model.json"
        params.write_text(json.dumps({"repo_root": str(ROOT), "store_dir": str(self.ctx.store_dir),
                                      "symbol": model.symbol, "threads": TORCHSERVE["torch_threads"]}))
        archiver = Path(sys.executable).parent / "torch-model-archiver"
        subprocess.run([str(archiver), "--model-name", ts_name(model), "--version", "1.0",
                        "--handler", str(Path(__file__).with_name("torchserve_handler.py")),
                        "--extra-files", str(params), "--export-path", str(self.store), "--force"],
                       check=True, env=env, cwd=self.dir, capture_output=True, timeout=120)

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        ports = [free_port() for _ in range(3)]
        self.inference, self.management = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
        config = self.dir / "config.properties"
        config.write_text("\n".join([
            f"inference_address={self.inference}", f"management_address={self.management}",
            f"metrics_address=http://127.0.0.1:{ports[2]}", "disable_token_authorization=true",
            "enable_model_api=true", "install_py_dep_per_model=false", "default_response_timeout=120",
            "job_queue_size=1000"]) + "\n")
        env = python_env(OMP_NUM_THREADS=str(TORCHSERVE["torch_threads"]), LOG_LOCATION=str(self.dir / "logs"),
                         METRICS_LOCATION=str(self.dir / "logs"))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for model in MODELS.values():
            self._archive(model, env)
        argv = [str(Path(sys.executable).parent / "torchserve"), "--start", "--ncs", "--foreground",
                "--model-store", str(self.store), "--ts-config", str(config)]
        self.procs.append(Proc("torchserve", argv, env, self.ctx.log_dir, cpus=self.ctx.server_cpus, cwd=self.dir))

        def ping() -> bool:
            with urllib.request.urlopen(f"{self.inference}/ping", timeout=2) as resp:
                return resp.status == 200
        wait_until(ping, 120, "TorchServe", self.procs, interval=0.3)
        cfg = TORCHSERVE
        for model in MODELS.values():
            url = (f"{self.management}/models?url={ts_name(model)}.mar&initial_workers={cfg['workers']}"
                   f"&synchronous=true&batch_size={cfg['batch_size']}&max_batch_delay={cfg['max_batch_delay_ms']}")
            with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=180) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"registering {ts_name(model)} failed: {resp.status} {resp.read()[:300]!r}")

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        import aiohttp

        model = model_of(point)
        bodies = [np.ascontiguousarray(s, dtype="<f4").tobytes() for s in self.ctx.inputs[point.model]]
        url = f"{self.inference}/predictions/{ts_name(model)}"
        headers = {"Content-Type": "application/octet-stream"}
        expected = model.horizon * model.channels * 4
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def call(i: int) -> None:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                    raw = await resp.read()
                if resp.status != 200 or len(raw) != expected:
                    raise RuntimeError(f"HTTP {resp.status}, {len(raw)} bytes: {raw[:200]!r}")
            yield call

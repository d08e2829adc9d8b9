"""(c), (d) and (g): the fleet through its Celery interface, its HTTP API and the Open Inference Protocol over gRPC,
on the same worker pool.

A :class:`FleetDeployment` is one pool configuration of :data:`bench.config.FLEET_MODES` (the default batching
engine, or Celery's prefork engine, two processes each) started with the real ``fleet worker`` command on a
Redis database of its own. :class:`FleetCelery` sends ``fleet.predict`` / ``fleet.batch_predict`` by name with
:func:`shared.celery_app.create_celery_app` and the queue from :mod:`shared.routing`; :class:`FleetHttp` starts
``fleet api`` on the same Redis and posts ``/v1/predict?wait=30``; :class:`FleetOipGrpc` calls the same API's gRPC
port with ``tritonclient.grpc``'s aio client, as a Triton user would (``ModelInfer``, raw FP32 tensors).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from bench.config import BATCH_JOB_SIZE, FLEET_MODES, FLEET_RESULT_TTL_S
from bench.encodings import predict_body
from bench.loadgen import Call
from bench.procs import Proc, free_port, python_env, wait_until
from bench.systems.base import BenchContext, Point, System, model_of, threaded_calls
from bench.systems.plain_celery import CLIENT_CONF, drop_results

ROOT = Path(__file__).resolve().parents[2]
ADAPTER, DEVICE = "simple", "cpu"


def fleet_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from producer_api.cli import main; main()", *args]


def wait_api_ready(api: Proc, url: str, what: str) -> None:
    """Wait until ``fleet api`` at ``url`` answers ``/readyz`` with 200."""
    import urllib.request

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status == 200
    wait_until(ready, 60, f"the fleet API ({what})", [api])


def bench_api_key(env: dict[str, str]) -> str:
    """A key for the load generator, made the way an operator makes one (``fleet keys create``).

    The API runs as shipped, keys and rate limits on; the key's limit is one the benchmark never reaches (what
    is measured is serving).
    """
    made = subprocess.run(fleet_argv("keys", "create", f"bench-{uuid.uuid4().hex[:6]}", "--scopes", "submit,read",
                                     "--rate-limit", "100000000/minute"),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return made.stdout.strip().splitlines()[-1]


class FleetDeployment:
    """Workers of one mode (and, on demand, the API) on Redis database ``db``."""

    def __init__(self, ctx: BenchContext, mode: str, db: int) -> None:
        self.ctx = ctx
        self.mode = mode
        self.spec = FLEET_MODES[mode]
        self.url = ctx.redis_db_url(db)
        self.prefix = f"bench-{mode}"
        self.workers: Proc | None = None
        self.api: Proc | None = None
        self.api_url = ""
        self.grpc_address = ""
        self.api_key = ""
        from shared.settings import FleetSettings

        self.settings = FleetSettings(redis_url=self.url, redis_key_prefix=self.prefix,
                                      model_store_dir=ctx.store_dir, result_ttl_seconds=FLEET_RESULT_TTL_S)

    def env(self) -> dict[str, str]:
        return python_env(REDIS_URL=self.url, REDIS_KEY_PREFIX=self.prefix, MODEL_STORE_DIR=str(self.ctx.store_dir),
                          RESULT_TTL_SECONDS=str(FLEET_RESULT_TTL_S), LOG_LEVEL="WARNING", POOLS=f"{ADAPTER}:{DEVICE}",
                          **self.spec["env"])

    @property
    def processes(self) -> int:
        return self.spec["concurrency"]

    def start_workers(self) -> None:
        if self.workers is not None:
            return
        argv = fleet_argv("worker", "--engine", self.spec["engine"], "--adapter", ADAPTER, "--device", DEVICE,
                          "-c", str(self.spec["concurrency"]), "-l", "WARNING")
        self.workers = Proc(f"fleet-worker-{self.mode}", argv, self.env(), self.ctx.log_dir,
                            cpus=self.ctx.server_cpus, cwd=ROOT)
        import redis

        from shared.keys import Keys
        from shared.stats import StatsReader

        reader = StatsReader(redis.Redis.from_url(self.url), Keys(self.prefix))
        wait_until(lambda: len(reader.live_workers()) >= self.processes, 120, f"fleet workers ({self.mode})",
                   [self.workers])

    def start_api(self) -> None:
        if self.api is not None:
            return
        port, grpc_port = free_port(), free_port()
        self.api = Proc(f"fleet-api-{self.mode}", fleet_argv("api", "--host", "127.0.0.1", "--port", str(port),
                                                             "--grpc-port", str(grpc_port)),
                        self.env(), self.ctx.log_dir, cpus=self.ctx.server_cpus, cwd=ROOT)
        self.api_url = f"http://127.0.0.1:{port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        wait_api_ready(self.api, self.api_url, self.mode)
        self.api_key = bench_api_key(self.env())

    def procs(self, with_api: bool) -> list[Proc]:
        return [p for p in (self.workers, self.api if with_api else None) if p is not None]

    def stop(self) -> None:
        for proc in (self.api, self.workers):
            if proc is not None:
                proc.stop(15)
        self.api = self.workers = None


def predict_job(model_name: str, series: Any, encoding: str) -> dict[str, Any]:
    """A ``fleet.predict`` job payload: the compact tensor (raw bytes, for msgpack) or JSON lists."""
    model = model_of(Point(model=model_name, encoding=encoding))
    job: dict[str, Any] = {**model.key_fields(), "adapter": ADAPTER, "device": DEVICE}
    if encoding == "msgpack-tensor":
        job["inputs"] = {"tensor": {"dtype": "float32", "shape": list(series.shape),
                                    "data": series.astype("<f4").tobytes()}}
    elif encoding == "json-list":
        job["inputs"] = {"series": series.tolist()}
    else:
        raise ValueError(f"the Celery interface takes msgpack-tensor or json-list, not {encoding!r}")
    return job


class FleetCelery(System):
    key = "c"
    name = "fleet via Celery"
    uses_redis = True
    default_encoding = "msgpack-tensor"

    def __init__(self, ctx: BenchContext, deployment: FleetDeployment) -> None:
        super().__init__(ctx, deployment.mode)
        self.deployment = deployment
        from shared.celery_app import create_celery_app

        self.app = create_celery_app(deployment.settings, name="bench-fleet-producer")
        self.app.conf.update(CLIENT_CONF)
        spec = deployment.spec
        self.notes.append(f"{spec['engine']} engine, -c {spec['concurrency']}, env {spec['env'] or 'the defaults'}")

    def start(self) -> None:
        self.deployment.start_workers()

    def own_procs(self) -> list[Proc]:
        return self.deployment.procs(with_api=False)  # the API idles while the Celery interface is measured

    def between_reps(self) -> None:
        drop_results(self.deployment.url)

    def _send(self, task: str, job: dict[str, Any], serializer: str):  # type: ignore[no-untyped-def]
        from shared import routing

        queue = routing.queue_for_job(job, self.deployment.settings)
        # NOTE: exchange "" pushes straight onto the queue's list, as the fleet's own producer does.
        return self.app.send_task(task, kwargs={"job": job}, queue=queue, exchange="", serializer=serializer,
                                  priority=routing.broker_priority(5))

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        from shared import tasks

        model = model_of(point)
        inputs = self.ctx.inputs[point.model]
        serializer = "msgpack" if point.encoding == "msgpack-tensor" else "json"
        jobs = [predict_job(point.model, s, point.encoding) for s in inputs]

        def predict(i: int) -> None:
            out = self._send(tasks.PREDICT, jobs[i % len(jobs)], serializer).get(timeout=60)
            rows = out["predictions"]
            if len(rows) != model.horizon or len(rows[0]) != model.channels:
                raise RuntimeError(f"forecast of shape {len(rows)}x{len(rows[0])}")

        def batch(i: int) -> None:
            items = [jobs[(i * BATCH_JOB_SIZE + k) % len(jobs)] for k in range(BATCH_JOB_SIZE)]
            job = {"requests": items, "adapter": ADAPTER, "device": DEVICE}
            out = self._send(tasks.BATCH_PREDICT, job, serializer).get(timeout=120)
            if out["succeeded"] != BATCH_JOB_SIZE:
                failed = next((it["error"] for it in out["items"] if it.get("error")), None)
                raise RuntimeError(f"{out['failed']} of {out['total']} items failed: {failed}")

        async with threaded_calls(batch if point.kind == "batch" else predict, point.concurrency) as call:
            yield call

    def stop(self) -> None:
        self.deployment.stop()
        self.app.close()


class FleetHttp(System):
    key = "d"
    name = "fleet via HTTP API"
    uses_redis = True
    default_encoding = "msgpack-tensor"
    CONTENT_TYPES = {"msgpack-tensor": "application/msgpack", "json-list": "application/json",
                     "json-b64": "application/json"}

    def __init__(self, ctx: BenchContext, deployment: FleetDeployment) -> None:
        super().__init__(ctx, deployment.mode)
        self.deployment = deployment
        self.notes.append("POST /v1/predict?wait=30 on `fleet api` (aiohttp), one keep-alive connection per "
                          "request in flight")

    def start(self) -> None:
        self.deployment.start_workers()
        self.deployment.start_api()

    def own_procs(self) -> list[Proc]:
        return self.deployment.procs(with_api=True)

    def between_reps(self) -> None:
        drop_results(self.deployment.url)

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        import aiohttp

        model = model_of(point)
        form = {"msgpack-tensor": "msgpack", "json-list": "json-list", "json-b64": "json-b64"}[point.encoding]
        bodies = [predict_body(s, {**model.key_fields(), "adapter": ADAPTER, "device": DEVICE}, form)
                  for s in self.ctx.inputs[point.model]]
        headers = {"Content-Type": self.CONTENT_TYPES[point.encoding], "X-API-Key": self.deployment.api_key}
        url = f"{self.deployment.api_url}/v1/predict?wait=30"
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def call(i: int) -> None:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                    raw = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {raw[:200]!r}")
                doc = json.loads(raw)
                if doc.get("status") != "succeeded":
                    raise RuntimeError(f"job {doc.get('status')}: {json.dumps(doc.get('error'))[:200]}")
                rows = doc["result"]["predictions"]
                if len(rows) != model.horizon or len(rows[0]) != model.channels:
                    raise RuntimeError(f"forecast of shape {len(rows)}x{len(rows[0])}")
            yield call

    def stop(self) -> None:
        self.deployment.stop()


class FleetOipGrpc(System):
    key = "g"
    name = "fleet via OIP gRPC"
    uses_redis = True
    default_encoding = "binary"

    def __init__(self, ctx: BenchContext, deployment: FleetDeployment) -> None:
        super().__init__(ctx, deployment.mode)
        self.deployment = deployment
        self.notes.append("ModelInfer on `fleet api --grpc-port` with tritonclient.grpc.aio (raw FP32 tensors), "
                          "one channel; each infer is a predict job awaited by the API")

    def start(self) -> None:
        self.deployment.start_workers()
        self.deployment.start_api()

    def own_procs(self) -> list[Proc]:
        return self.deployment.procs(with_api=True)

    def between_reps(self) -> None:
        drop_results(self.deployment.url)

    @contextlib.asynccontextmanager
    async def client(self, point: Point) -> AsyncIterator[Call]:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc.aio import InferenceServerClient

        model = model_of(point)
        series = [np.ascontiguousarray(s, dtype=np.float32) for s in self.ctx.inputs[point.model]]
        headers = {"x-api-key": self.deployment.api_key}
        params = {"adapter": ADAPTER, "device": DEVICE}
        outputs = [grpcclient.InferRequestedOutput("predictions")]
        client = InferenceServerClient(self.deployment.grpc_address)
        try:
            async def call(i: int) -> None:
                x = series[i % len(series)]
                tensor = grpcclient.InferInput("series", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer(model.model_id, [tensor], outputs=outputs, headers=headers,
                                            parameters=params, client_timeout=60)
                y = result.as_numpy("predictions")
                if y is None or y.shape != (model.horizon, model.channels):
                    raise RuntimeError(f"forecast of shape {None if y is None else y.shape}")
            yield call
        finally:
            await client.close()

    def stop(self) -> None:
        self.deployment.stop()

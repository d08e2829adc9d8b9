"""(c) of the many-models benchmark: Ray Serve with model multiplexing over the fleet's own model store.

One Serve deployment of ``replicas`` replicas; each keeps an LRU of at most ``max_models_per_replica`` models
(``@serve.multiplexed``), and Serve's proxy routes a request carrying the ``serve_multiplexed_model_id`` header
to a replica that holds the model, falling back after 1-2 s to the replicas holding the fewest models. A model
is loaded with the fleet's :class:`~workers.store.ModelStore` (what the simple adapter's ``load_model`` does:
safetensors read, build, eval; no first forward) and run through the fleet's pre/post-processing
(:mod:`workers.models.inference`, as the simple adapter and ``bench/systems/forecaster.py``), so that the work
per request is the fleet's. One request is one forecast, no batching across requests (Serve's ``@serve.batch``
is not used).

HTTP contract: ``POST <url>`` with header ``serve_multiplexed_model_id: <SYMBOL>_<timeframe>_<model_type>`` and
the JSON body ``{"series": [[...], ...], "n_steps": int | null}`` (what the fleet's ``/v1/predict`` gets in
``inputs.series``; ``n_steps`` null means the model's horizon). 200 answers ``{"model_id", "predictions",
"confidence_score", "inference_time_ms", "replica"}``; errors are the fleet's ``{"error": {type, message,
retryable, field?}}`` with its status (404 unknown model, 422 invalid input, 400 unreadable body).

Counters: each replica writes its own ``requests`` / ``errors`` / ``loads`` into a small file in a directory
this object owns (one ``pwrite`` per request, no extra process or RPC on the request path) and appends one line
per cold load; :meth:`RayMultiplex.stats` reads them. A replica's proxy, controller and Ray's own daemons run
on the same cores: on a 2-core machine they are part of what this system costs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "manymodels"
DEPLOYMENT_NAME = "MultiplexedForecaster"
#: The request header Ray Serve's proxy reads the multiplexed model id from.
MODEL_ID_HEADER = "serve_multiplexed_model_id"


class RayServeRequestError(RuntimeError):
    """A request to the Ray Serve deployment got a non-200 answer."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def make_body(series: np.ndarray | list[list[float]], n_steps: int | None = None) -> bytes:
    """The JSON request body for one forecast of ``series`` (time x channels)."""
    import orjson

    rows = series.tolist() if isinstance(series, np.ndarray) else series
    return orjson.dumps({"series": rows, "n_steps": n_steps})


# -- inside a replica --------------------------------------------------------------------------------------------
class _StoredForecaster:
    """A stored forecaster, loaded as the fleet's simple adapter loads it, predicting as it predicts."""

    def __init__(self, store_dir: str, model_id: str) -> None:
        from shared.errors import InvalidInputError, ModelNotFoundError
        from shared.schemas import ModelKey, ModelType
        from workers.store import ModelStore

        try:
            key = ModelKey.parse(model_id)
        except ValueError:
            raise ModelNotFoundError(f"not a model id: {model_id!r}", field="model_id") from None
        if key.model_type is ModelType.SENTIMENT:
            raise InvalidInputError("this deployment serves forecasters only", field="model_id")
        loaded = ModelStore(store_dir).load(key)
        self.model_id = model_id
        self.module = loaded.model.eval()
        self.config = loaded.config
        self.meta = loaded.meta
        self.horizon = int(self.config["prediction_length"])

    def predict(self, series: Any, n_steps: int | None) -> dict[str, Any]:
        from shared.errors import InvalidInputError
        from workers.models import inference

        steps = n_steps or self.horizon
        try:
            # NOTE: float32 first, as the fleet's PredictInputs.series_array does, so the numbers match its own.
            array = np.asarray(series, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidInputError("series must be a rectangular array of numbers", field="series") from None
        prepared = inference.prepare_series(array, self.config)
        started = time.perf_counter()
        (forecast,) = inference.run_forecast(self.module, [prepared], steps, self.config)
        return {"model_id": self.model_id, "predictions": forecast.tolist(),
                "confidence_score": inference.forecast_confidence(self.meta, steps, self.horizon),
                "inference_time_ms": round((time.perf_counter() - started) * 1000, 3)}


class _Ledger:
    """One replica's counters in ``<dir>/<replica>.json`` and its cold loads in ``<dir>/<replica>.loads``."""

    def __init__(self, stats_dir: str, replica: str) -> None:
        self.replica = replica
        self.counts = {"replica": replica, "pid": os.getpid(), "requests": 0, "errors": 0, "loads": 0}
        base = Path(stats_dir) / replica
        self._fd = os.open(f"{base}.json", os.O_WRONLY | os.O_CREAT, 0o644)
        self._loads = open(f"{base}.loads", "a", buffering=1, encoding="utf-8")
        self._write()

    def _write(self) -> None:
        # NOTE: counters only grow, so the JSON never gets shorter and an in-place pwrite needs no truncate.
        os.pwrite(self._fd, json.dumps(self.counts).encode(), 0)

    def request(self, ok: bool) -> None:
        self.counts["requests"] += 1
        self.counts["errors"] += 0 if ok else 1
        self._write()

    def load(self, model_id: str, ms: float) -> None:
        self.counts["loads"] += 1
        self._loads.write(json.dumps({"model_id": model_id, "ms": round(ms, 3), "t": time.time()}) + "\n")


class MultiplexedForecaster:
    """The deployment's class: a multiplexed LRU of stored forecasters and one HTTP route.

    Runs in each replica process; ``__init__`` sets the torch threads and wires the multiplexed loader
    (``serve.multiplexed`` on an instance attribute, which Serve detects at runtime, so that the cache size is
    a constructor argument rather than fixed at import).
    """

    def __init__(self, store_dir: str, stats_dir: str, max_models: int, threads: int) -> None:
        import torch
        from ray import serve

        import workers.models.inference  # noqa: F401  (imported at setup, as a fleet process does: not in a load)
        import workers.store  # noqa: F401

        torch.set_num_threads(threads)
        self.store_dir = store_dir
        self.ledger = _Ledger(stats_dir, serve.get_replica_context().replica_id.unique_id)

        async def get_model(model_id: str) -> _StoredForecaster:
            started = time.perf_counter()
            # NOTE: blocking on the replica's event loop, as a fleet process blocks on a load: Serve's multiplex
            # wrapper loads one model at a time per replica anyway; hits meanwhile wait too.
            model = _StoredForecaster(self.store_dir, model_id)
            self.ledger.load(model_id, (time.perf_counter() - started) * 1000)
            return model

        self.get_model = serve.multiplexed(max_num_models_per_replica=max_models)(get_model)

    async def __call__(self, request: Any) -> Any:
        import orjson
        from ray import serve
        from starlette.responses import Response

        from shared.errors import FleetError, InvalidInputError

        body = await request.body()
        status = 200
        try:
            model_id = serve.get_multiplexed_model_id()
            if not model_id:
                raise InvalidInputError(f"missing the {MODEL_ID_HEADER} header", field=MODEL_ID_HEADER)
            try:
                doc = orjson.loads(body)
                series, n_steps = doc["series"], doc.get("n_steps")
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                status, out = 400, {"error": {"type": "MalformedBody", "retryable": False,
                                              "message": 'body must be JSON {"series": [[...]], "n_steps": ...}'}}
            else:
                model = await self.get_model(model_id)
                out = model.predict(series, n_steps)
                out["replica"] = self.ledger.replica
        except FleetError as exc:
            status, out = exc.http_status, {"error": exc.to_dict()}
        self.ledger.request(status == 200)
        return Response(orjson.dumps(out), status_code=status, media_type="application/json")


# -- the driver side ---------------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class RayMultiplex:
    """A local Ray cluster serving the store's forecasters with model multiplexing, over HTTP on loopback.

    Args:
        store_dir: the fleet's model store (``<SYMBOL>/<timeframe>/<model_type>/<version>/``).
        replicas: Serve replicas (``num_replicas``), one process each.
        max_models_per_replica: ``max_num_models_per_replica`` of ``@serve.multiplexed`` (LRU by count).
        threads_per_replica: torch threads of each replica.
        num_cpus: the CPUs Ray may schedule on (``ray.init(num_cpus=...)``), default the cores this process
            may run on; each replica asks for ``num_cpus / replicas`` of them (Serve's controller and proxy ask
            for none).
        max_ongoing_requests: Serve's per-replica bound on requests in flight (None: Serve's default, 5);
            requests above it wait in the proxy's router, which backs off while every candidate is full.
        env: extra environment for Ray's processes, e.g. ``{"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}`` (Serve's
            documented throughput mode; here its controller then took 30 s to shut down).
    """

    def __init__(self, store_dir: Path, replicas: int, max_models_per_replica: int, threads_per_replica: int = 1,
                 *, num_cpus: int | None = None, max_ongoing_requests: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.replicas = replicas
        self.max_models_per_replica = max_models_per_replica
        self.threads_per_replica = threads_per_replica
        self.num_cpus = num_cpus or len(os.sched_getaffinity(0))
        self.max_ongoing_requests = max_ongoing_requests
        self.env = {"RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.url = ""
        self.workdir: Path | None = None
        self._pids: set[int] = set()
        self._final: dict[str, Any] | None = None
        self.leftover: list[int] = []

    @property
    def stats_dir(self) -> Path:
        assert self.workdir is not None, "not started"
        return self.workdir / "stats"

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Start Ray and Serve, deploy, and wait until the HTTP route answers."""
        from ray import serve

        from bench.procs import free_port

        # NOTE: a short private temp dir: Ray's unix sockets live under it (path length limit) and two Ray
        # instances on one machine do not share a session_latest.
        self.workdir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
        self.stats_dir.mkdir()
        self._final = None
        port = free_port()
        try:
            self._init_ray()
            serve.start(http_options={"host": "127.0.0.1", "port": port},
                        logging_config={"enable_access_log": False, "log_level": "WARNING"})
            options: dict[str, Any] = {"name": DEPLOYMENT_NAME, "num_replicas": self.replicas,
                                       "ray_actor_options": {"num_cpus": self.num_cpus / self.replicas}}
            if self.max_ongoing_requests:
                options["max_ongoing_requests"] = self.max_ongoing_requests
            app = serve.deployment(MultiplexedForecaster, **options).bind(
                str(self.store_dir), str(self.stats_dir), self.max_models_per_replica, self.threads_per_replica)
            serve.run(app, name=APP_NAME, route_prefix="/")
            self.url = f"http://127.0.0.1:{port}/"
            self._wait_routes(port, time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        self._pids = self._ray_tree()

    def _init_ray(self) -> None:
        import ray

        # NOTE: Ray's daemons inherit the driver's environment at ray.init (the env of a Serve replica is not
        # enough: the controller and proxy read Serve's constants too); the driver's own is put back after.
        saved = {k: os.environ.get(k) for k in self.env}
        # NOTE: ray.init replaces the driver's SIGTERM handler; the bench's own (stop everything, then exit) stays.
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        os.environ.update(self.env)
        try:
            ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=80 * 2**20, _temp_dir=str(self.workdir / "ray"),
                     namespace="bench-manymodels", runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if main and sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)

    def _wait_routes(self, port: int, deadline: float) -> None:
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/routes", timeout=2) as resp:
                    if "/" in json.loads(resp.read()):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray Serve's proxy on :{port} has no route after start")
            time.sleep(0.2)

    def stop(self, grace: float = 15.0) -> None:
        """Shut Serve and Ray down and wait for every process they started to exit (SIGKILL after ``grace``).

        ``leftover`` lists the pids that had to be killed (empty when Ray went down by itself).
        """
        import psutil
        import ray
        from ray import serve

        pids = self._pids | self._ray_tree()
        if self.workdir is not None and self.stats_dir.is_dir():
            self._final = self.stats()
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        self.leftover = [p.pid for p in alive]
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self._pids = set()
        self.url = ""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def server_pids(self) -> list[int]:
        """The processes Ray started for this system (GCS, raylet, agents, controller, proxy, replicas)."""
        return sorted(self._pids | self._ray_tree())

    def _ray_tree(self) -> set[int]:
        """This process's children that name our Ray temp dir (GCS, raylet, ...) and everything under them."""
        import psutil

        if self.workdir is None:
            return set()
        found: set[int] = set()
        for child in psutil.Process().children():
            try:
                if any(str(self.workdir) in arg for arg in child.cmdline()):
                    found |= {child.pid, *(p.pid for p in child.children(recursive=True))}
            except psutil.Error:
                continue
        return found

    # -- requests ----------------------------------------------------------------------------------------------
    async def _post(self, session: Any, model_id: str, body: bytes) -> bytes:
        async with session.post(self.url, data=body, headers={MODEL_ID_HEADER: model_id,
                                                              "content-type": "application/json"}) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RayServeRequestError(resp.status, data.decode(errors="replace"))
            return data

    async def predict(self, session: Any, model_id: str, body: bytes) -> None:
        """POST one request (a :func:`make_body` body) for ``model_id``; raises unless it answered 200."""
        await self._post(session, model_id, body)

    async def forecast(self, session: Any, model_id: str, body: bytes) -> dict[str, Any]:
        """As :meth:`predict`, returning the decoded answer."""
        import orjson

        return orjson.loads(await self._post(session, model_id, body))

    # -- counters ----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per replica and in total: ``requests``, ``errors``, ``loads``, ``load_ms`` (every cold load, ms),
        ``load_ms_p50`` / ``load_ms_p99``, and ``loads_per_1000`` / ``hit_ratio`` (1 - loads / requests).

        Cumulative since :meth:`start` (subtract two calls for a window); after :meth:`stop`, the last counts.
        """
        if self.workdir is None:
            if self._final is None:
                raise RuntimeError("not started")
            return self._final
        replicas: dict[str, dict[str, Any]] = {}
        for path in sorted(self.stats_dir.glob("*.json")):
            counts = _read_json(path)
            loads_file = path.with_suffix(".loads")
            lines = loads_file.read_text(encoding="utf-8").splitlines() if loads_file.exists() else []
            events = [json.loads(line) for line in lines if line.endswith("}")]
            counts["load_ms"] = [e["ms"] for e in events]
            counts["loaded_models"] = [e["model_id"] for e in events]
            replicas[path.stem] = _summary(counts)
        total = {k: sum(r[k] for r in replicas.values()) for k in ("requests", "errors", "loads")}
        total["load_ms"] = [ms for r in replicas.values() for ms in r["load_ms"]]
        return {"replicas": replicas, "total": _summary(total)}


def _summary(counts: dict[str, Any]) -> dict[str, Any]:
    requests, loads = counts["requests"], counts["loads"]
    counts["load_ms_p50"] = _percentile(counts["load_ms"], 50)
    counts["load_ms_p99"] = _percentile(counts["load_ms"], 99)
    counts["loads_per_1000"] = round(1000 * loads / requests, 2) if requests else None
    counts["hit_ratio"] = round(1 - loads / requests, 4) if requests else None
    return counts


def _read_json(path: Path, attempts: int = 5) -> dict[str, Any]:
    # NOTE: a replica may be rewriting the file as it is read; the next read sees a whole one.
    for _ in range(attempts - 1):
        try:
            return json.loads(path.read_bytes())
        except ValueError:
            time.sleep(0.01)
    return json.loads(path.read_bytes())


"""``TorchServeServingAdapter``: the model's forward runs on a TorchServe server, the rest in the worker.

Loading a model compiles its TorchScript artefact (traced, portable; reused while its source is unchanged, as for
Triton), archives it with ``torch-model-archiver`` around :mod:`workers.serving.adapters.torchserve_handler` into
``TORCHSERVE_MODEL_STORE/<model_id>.mar`` (reused while the artefact and the handler are unchanged: a sidecar
``<model_id>.mar.json`` holds their hashes), and registers it through the management API (``batch_size``,
``max_batch_delay``, ``initial_workers``, ``synchronous=true``), then scales it to ``TORCHSERVE_MAX_WORKERS``.
Predictions reuse :class:`~workers.serving.adapters.local.LocalTorchAdapter` whole (validation, normalisation,
batching, de-normalisation); only the forward is a ``POST /predictions/<model_id>`` of the handler's binary
tensor, so forecasts match the other adapters'.

HTTP is aiohttp on a private event loop in a daemon thread: the adapter's methods run on the worker's job thread
and block on ``run_coroutine_threadsafe(...).result()`` within the call's timeout; one session keeps connections
alive across jobs. The per-process cache's eviction (LRU, memory, idle TTL) and unload jobs unregister the model;
a process exiting does not (the server is shared by the pool's processes). A model gone from the server (another
process unregistered it, TorchServe restarted) is registered again, once, and the forward retried.

Errors map onto the fleet's root: unreachable, refused, timed out or 503 -> retryable
:class:`~shared.errors.AdapterUnavailableError` (within ``TORCHSERVE_TIMEOUT_SECONDS``); a tensor the handler
refuses, or a forward that fails on its shape -> :class:`~shared.errors.InvalidInputError`; anything else ->
:class:`~shared.errors.PredictionError`. One request carries at most ``TORCHSERVE_BATCH_SIZE`` rows (a bigger
forward goes as several), so one TorchServe batch holds at most ``batch_size`` squared rows.
With token authorization on (TorchServe 0.12's default), the keys come from ``TORCHSERVE_KEY_FILE``, read again
after a 401 (TorchServe renews them).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine

import numpy as np
import torch

from shared.errors import (AdapterUnavailableError, FleetError, InvalidInputError, ModelLoadError,
                           ModelNotFoundError, PredictionError)
from shared.settings import FleetSettings, TorchServeSettings
from workers.models.registry import param_bytes
from workers.serving.adapters import torchserve_handler as wire
from workers.serving.adapters.local import Forward, LoadedModel, LocalTorchAdapter
from workers.serving.fileio import atomic_write
from workers.serving.torchscript_convert import CompileOptions, ensure_torchscript, model_id_of
from workers.store import LoadedArtifacts, ModelStore

log = logging.getLogger(__name__)

HANDLER_SOURCE = Path(wire.__file__)
ARTEFACT_NAME = "model.pt"


class TorchServeClient:
    """The management and inference APIs of one server, called from sync code over a private event loop."""

    def __init__(self, settings: TorchServeSettings) -> None:
        self.settings = settings
        self._keys: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="torchserve-http", daemon=True)
        self._thread.start()
        self._session: Any = None

    # -- plumbing --------------------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout + 1.0)  # the call's own timeout fires first; this is the backstop
        except TimeoutError:
            future.cancel()
            raise AdapterUnavailableError(f"TorchServe did not answer within {timeout:g} s") from None

    def _key(self, api: str, reload: bool = False) -> str | None:
        path = self.settings.key_file
        if path is None:
            return None
        if reload or api not in self._keys:
            try:
                doc = json.loads(Path(path).read_text())
                self._keys = {name: doc[name]["key"] for name in ("management", "inference") if name in doc}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AdapterUnavailableError(f"cannot read TorchServe's key file {path}: {exc}") from None
        return self._keys.get(api)

    async def _request(self, api: str, method: str, path: str, timeout: float, data: bytes | None = None,
                       headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        base = self.settings.management_url if api == "management" else self.settings.inference_url
        for attempt in (1, 2):
            sent = dict(headers or {})
            key = self._key(api, reload=attempt == 2)
            if key:
                sent["Authorization"] = f"Bearer {key}"
            try:
                async with self._session.request(method, f"{base}{path}", data=data, headers=sent,
                                                 timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise AdapterUnavailableError(f"TorchServe at {base} is unreachable ({method} {path}): "
                                              f"{type(exc).__name__}: {exc}") from None
            if not _token_refused(resp.status, body):
                return resp.status, body
            if attempt == 1 and self.settings.key_file is not None:
                continue  # the tokens expired, or TorchServe restarted and wrote new ones: read them again, once
        raise AdapterUnavailableError(f"TorchServe at {base} refused the token ({method} {path}): {_text(body)}; "
                                      f"check TORCHSERVE_KEY_FILE ({self.settings.key_file})")

    def call(self, api: str, method: str, path: str, timeout: float | None = None, data: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        timeout = timeout or self.settings.timeout_seconds
        return self._run(self._request(api, method, path, timeout, data, headers), timeout)

    def close(self) -> None:
        async def shut() -> None:
            if self._session is not None:
                await self._session.close()
        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- the calls the adapter makes -------------------------------------------------------------------------
    def ping(self) -> bool:
        status, _ = self.call("inference", "GET", "/ping")
        return status == 200

    def describe(self, name: str) -> list[dict[str, Any]] | None:
        """``GET /models/<name>`` (every version); None when the model is not registered."""
        status, body = self.call("management", "GET", f"/models/{name}")
        if status == 404:
            return None
        if status != 200:
            raise _error(status, body, f"describe {name}")
        return json.loads(body)

    def register(self, name: str, archive: str) -> None:
        s = self.settings
        query = (f"url={archive}&model_name={name}&batch_size={s.batch_size}&max_batch_delay={s.max_batch_delay_ms}"
                 f"&initial_workers={s.initial_workers}&synchronous=true&response_timeout={s.response_timeout_seconds}")
        status, body = self.call("management", "POST", f"/models?{query}", timeout=s.load_timeout_seconds)
        if status == 409:  # another process of the pool registered it meanwhile: wait until it serves
            self.wait_ready(name)
            return
        if status != 200:
            err = _error(status, body, f"register {name}")
            raise err if isinstance(err, AdapterUnavailableError) else ModelLoadError(err.message)
        if s.max_workers > s.initial_workers:
            status, body = self.call("management", "PUT", f"/models/{name}?min_worker={s.initial_workers}"
                                     f"&max_worker={s.max_workers}&synchronous=true", timeout=s.load_timeout_seconds)
            if status not in (200, 202):
                log.warning("could not scale %s on TorchServe: %s", name, _text(body))

    def wait_ready(self, name: str) -> None:
        """Wait (within the load timeout) until ``name`` has a READY worker, e.g. one another process registers."""
        deadline = time.monotonic() + self.settings.load_timeout_seconds
        while not ready_workers(self.describe(name)):
            if time.monotonic() > deadline:
                raise AdapterUnavailableError(f"{name} has no READY worker on TorchServe after "
                                              f"{self.settings.load_timeout_seconds:g} s")
            time.sleep(0.2)

    def unregister(self, name: str) -> bool:
        status, body = self.call("management", "DELETE", f"/models/{name}", timeout=self.settings.load_timeout_seconds)
        if status == 404:
            return False
        if status != 200:
            raise _error(status, body, f"unregister {name}")
        return True

    def predict(self, name: str, array: np.ndarray) -> np.ndarray:
        status, body = self.call("inference", "POST", f"/predictions/{name}", data=wire.encode(array),
                                 headers={"Content-Type": "application/octet-stream"})
        if status != 200:
            raise _error(status, body, f"predict {name}")
        if not body.startswith(wire.MAGIC):
            raise _refused(body.decode(errors="replace"), name)
        return np.array(wire.decode(body), copy=True)


def ready_workers(versions: list[dict[str, Any]] | None) -> int:
    """READY workers in a ``GET /models/<name>`` answer (0 when the model is not registered)."""
    return sum(1 for version in versions or [] for w in version.get("workers", []) if w.get("status") == "READY")


#: Words of torch's errors for a tensor whose shape the model does not take.
_SHAPE_TEXT = ("shape", "size of tensor", "dimension", "mat1 and mat2", "expected input", "sizes of tensors")


def _refused(message: str, name: str) -> FleetError:
    """The error for a request the handler answered with a message instead of a tensor."""
    error = message.partition("]: ")[2].lower()  # the forward's own error, after "forward failed on shape [..]"
    if message.startswith("bad tensor") or (message.startswith("forward failed")
                                            and any(t in error for t in _SHAPE_TEXT)):
        return InvalidInputError(f"TorchServe refused the input of {name}: {message[:500]}", field="inputs")
    return PredictionError(f"TorchServe failed (predict {name}): {message[:500]}")


def _token_refused(status: int, body: bytes) -> bool:
    # NOTE: TorchServe 0.12 answers a missing or stale token with 400 (not 401) and this message.
    return status == 401 or (status == 400 and b"Token Authorization failed" in body)


def _text(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("message", doc)) if isinstance(doc, dict) else str(doc)
    except ValueError:
        return body[:500].decode(errors="replace")


def _error(status: int, body: bytes, what: str) -> FleetError:
    message = f"TorchServe failed ({what}): HTTP {status}: {_text(body)}"
    if status == 404:
        return ModelNotFoundError(message)
    if status in (502, 503, 504, 507):  # no worker ready, overloaded, out of memory: try again later
        return AdapterUnavailableError(message)
    if 400 <= status < 500:
        return InvalidInputError(message, field="inputs")
    return PredictionError(message)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class TorchServeModel:
    """A model this process registered."""

    name: str
    version: str
    dtype: Any
    size_bytes: int
    report: dict[str, Any] = field(default_factory=dict)


class TorchServeServingAdapter(LocalTorchAdapter):
    """Forward on a TorchServe server; cache, validation, batching and post-processing shared with the others."""

    name = "torchserve"

    def __init__(self, settings: FleetSettings, device: str = "cpu", *, store: ModelStore | None = None,
                 timer: Callable[[], float] = time.monotonic) -> None:
        ts = settings.torchserve
        super().__init__(settings, "cpu", max_models=ts.max_models_loaded, ttl_seconds=ts.model_timeout_seconds,
                         store=store, timer=timer)
        self.device = device
        self.ts = ts
        self.model_store = Path(ts.model_store).resolve()
        self.server = TorchServeClient(ts)
        self._current: dict[str, TorchServeModel] = {}
        self._current_lock = threading.Lock()

    # -- archives --------------------------------------------------------------------------------------------
    def _archive(self, artifacts: LoadedArtifacts, model_id: str) -> tuple[str, dict[str, Any]]:
        """``<model_id>.mar`` in the model store, built unless the current one holds the same artefact."""
        workdir = self.model_store / f".{model_id}"
        options = CompileOptions(mode=self.settings.torchscript.compile_mode, optimize=False, device="cpu")
        _, report = ensure_torchscript(artifacts, model_id, workdir / ARTEFACT_NAME, options)
        mar = self.model_store / f"{model_id}.mar"
        sidecar = mar.with_suffix(".mar.json")
        wanted = {"artefact": _digest(workdir / ARTEFACT_NAME), "handler": _digest(HANDLER_SOURCE),
                  "version": artifacts.version}
        try:
            if mar.is_file() and json.loads(sidecar.read_text()) == wanted:
                return mar.name, {"archive_reused": True, "compile_ms": report.compile_ms}
        except (OSError, ValueError):
            pass
        started = time.perf_counter()
        archiver = Path(sys.executable).parent / "torch-model-archiver"
        out = workdir / "archive"
        out.mkdir(parents=True, exist_ok=True)
        # NOTE: built aside, then moved in: a server (or another process) reading the store never sees half a .mar.
        done = subprocess.run([str(archiver), "--model-name", model_id, "--version", artifacts.version,
                               "--serialized-file", str(workdir / ARTEFACT_NAME), "--handler", str(HANDLER_SOURCE),
                               "--export-path", str(out), "--force"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ModelLoadError(f"torch-model-archiver failed for {model_id}: {done.stderr[-500:]}")
        (out / f"{model_id}.mar").replace(mar)
        atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(wanted)))
        return mar.name, {"archive_reused": False, "compile_ms": report.compile_ms,
                          "archive_ms": round((time.perf_counter() - started) * 1000, 3)}

    # -- loading ---------------------------------------------------------------------------------------------
    def _materialize(self, artifacts: LoadedArtifacts) -> tuple[Any, Forward]:
        model_id = model_id_of(artifacts)
        self.model_store.mkdir(parents=True, exist_ok=True)
        archive, report = self._archive(artifacts, model_id)
        dtype = np.int64 if artifacts.config.get("model_type") == "sentiment" else np.float32
        handle = TorchServeModel(model_id, artifacts.version, dtype, param_bytes(artifacts.model), report)
        started = time.perf_counter()
        found = self.server.describe(model_id)
        if report["archive_reused"] is False and found is not None:
            self.server.unregister(model_id)  # an older archive is registered: replace it
            found = None
        if found is None:
            self.server.register(model_id, archive)
        elif not ready_workers(found):
            self.server.wait_ready(model_id)  # registered by another process, its worker still starting
        handle.report["register_ms"] = round((time.perf_counter() - started) * 1000, 3)
        handle.report["archive"] = archive
        with self._current_lock:
            self._current[model_id] = handle
        return handle, lambda x: self._forward(handle, x)

    def _size_bytes(self, handle: Any, artifacts: LoadedArtifacts) -> int:
        return handle.size_bytes

    def _load_metadata(self, handle: Any) -> dict[str, Any]:
        return {"device": self.device, "torchserve": {"inference_url": self.ts.inference_url,
                                                      "model_name": handle.name, **handle.report}}

    # -- inference -------------------------------------------------------------------------------------------
    def _forward(self, handle: TorchServeModel, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=handle.dtype)
        # NOTE: at most batch_size rows per request: the server batches requests, and bounds what one may hold.
        step = self.ts.batch_size
        parts = [self._predict(handle, array[lo:lo + step]) for lo in range(0, max(1, array.shape[0]), step)]
        return torch.from_numpy(np.concatenate(parts, axis=0))

    def _predict(self, handle: TorchServeModel, array: np.ndarray) -> np.ndarray:
        try:
            return self.server.predict(handle.name, array)
        except ModelNotFoundError:
            log.info("%s is gone from TorchServe (restart or another process's unload); registering it again",
                     handle.name)
            self.server.register(handle.name, f"{handle.name}.mar")
            return self.server.predict(handle.name, array)

    # -- unloading, health -----------------------------------------------------------------------------------
    def _release(self, entry: LoadedModel) -> None:
        handle: TorchServeModel | None = entry.handle
        entry.handle = None
        if handle is None:
            return
        with self._current_lock:
            if self._current.get(handle.name) is not handle:
                return  # superseded by a newer load of the same model, which stays registered
            del self._current[handle.name]
        try:
            self.server.unregister(handle.name)
        except FleetError as exc:  # an eviction must not fail the job that caused it
            log.warning("could not unregister %s from TorchServe: %s", handle.name, exc)

    def unload_model(self, model_id: str) -> bool:
        if super().unload_model(model_id):
            return True
        # Not loaded by this process; the server is shared by the pool, so the job still releases it there.
        return self.server.unregister(model_id)

    def health_check(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adapter": self.name, "device": self.device, "url": self.ts.inference_url,
                               "models_loaded": len(self.cache)}
        try:
            live = self.server.ping()
            with self._current_lock:
                names = list(self._current)
            workers = {}
            for name in names:
                workers[name] = ready_workers(self.server.describe(name))
        except FleetError as exc:
            return {**out, "healthy": False, "live": False, "error": exc.message}
        idle = [name for name, ready in workers.items() if not ready]
        return {**out, "healthy": live and not idle, "live": live, "ready_workers": workers,
                **({"reason": f"no READY worker for {', '.join(idle)}"} if idle else {})}

    def close(self) -> None:
        """Forget this process's models and close its connections, leaving them registered on the server.

        NOTE: the server is shared by every process of the pool: a process that exits must not unregister what
        the others serve. Unload jobs and cache evictions do unregister.
        """
        with self._current_lock:
            self._current.clear()
        try:
            super().close()
        finally:
            self.server.close()

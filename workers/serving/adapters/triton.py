"""``TritonServingAdapter``: the model's forward runs on a Triton Inference Server, the rest in the worker.

Loading a model writes it into the shared model repository (:mod:`workers.serving.adapters.triton_repo`: a TorchScript
``model.pt``, reused while its source is unchanged, plus ``config.pbtxt``), then asks the server, which runs
in explicit model-control mode, to load it through the repository API and waits until it is ready. Predictions
reuse :class:`~workers.serving.adapters.local.LocalTorchAdapter` whole (validation, normalisation, batching of many
requests into one forward, de-normalisation through :mod:`workers.models.inference`); only the forward is a Triton
``infer`` call with binary tensors, so forecasts match the other adapters'.

The per-process :class:`~workers.serving.cache.ModelCache` is this process's bookkeeping of the models it loaded: an
eviction (LRU, memory, idle TTL) or an unload job unloads the model on the server. The server is shared by
every process of the pool, so a process may find a model gone (another process unloaded it, or the server
restarted): the forward then loads it again, once, and retries.

Errors map onto the fleet's root: an unreachable server, a refused connection or a timeout is a retryable
:class:`~shared.errors.AdapterUnavailableError` (raised within ``TRITON_TIMEOUT_SECONDS``); an input the model
does not take is an :class:`~shared.errors.InvalidInputError`.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from billiard.exceptions import SoftTimeLimitExceeded

from shared.errors import (AdapterUnavailableError, FleetError, InvalidInputError, ModelLoadError,
                           ModelNotFoundError, PredictionError)
from shared.schemas import ModelType, TimeFrame
from shared.settings import FleetSettings, TritonSettings
from workers.serving.adapters.local import Forward, LoadedModel, LocalTorchAdapter
from workers.serving.adapters.triton_repo import (MODEL_FILE, RepoModel, TensorSpec, model_io, version_dir,
                                          write_model_files)
from workers.models.registry import param_bytes
from workers.store import LoadedArtifacts, ModelStore
from workers.serving.torchscript_convert import CompileOptions, ensure_torchscript, model_id_of

log = logging.getLogger(__name__)

_UNAVAILABLE_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED")
_UNAVAILABLE_TEXT = ("failed to connect", "connection refused", "connection reset", "timed out", "timeout",
                     "deadline exceeded", "broken pipe", "socket closed", "name resolution")
_SHAPE_TEXT = ("unexpected shape", "unexpected datatype", "batch-size must be", "unexpected number of inputs",
               "unexpected inference input", "input byte size")
_MISSING_TEXT = ("unknown model", "is not found", "not found", "is not ready", "unavailable model",
                 "no version is available")


def map_error(exc: BaseException, what: str, url: str) -> FleetError:
    """The fleet error for a failed call to Triton (``what`` names the call, for the message)."""
    if isinstance(exc, FleetError):
        return exc
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status() or ""), str(exc.message() or exc)
        low = message.lower()
        # NOTE: gRPC reports a model that is not ready as UNAVAILABLE too: the message tells them apart.
        if any(t in low for t in _MISSING_TEXT):
            return ModelNotFoundError(f"Triton has no ready model for {what}: {message}")
        if status in _UNAVAILABLE_STATUS or any(t in low for t in _UNAVAILABLE_TEXT):
            return AdapterUnavailableError(f"Triton at {url} is unreachable ({what}): {message}")
        if any(t in low for t in _SHAPE_TEXT):
            return InvalidInputError(f"Triton refused the input ({what}): {message}", field="inputs")
        return PredictionError(f"Triton failed ({what}): {message}")
    # OSError covers refused and reset connections and socket timeouts; HTTPException a connection the server
    # closed mid-response (geventhttpclient's HTTPConnectionClosed).
    if isinstance(exc, (OSError, http.client.HTTPException)) or _is_gevent_timeout(exc):
        return AdapterUnavailableError(f"Triton at {url} is unreachable ({what}): {type(exc).__name__}: {exc}")
    return PredictionError(f"Triton call failed ({what}): {type(exc).__name__}: {exc}")


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, socket.timeout)) or _is_gevent_timeout(exc):
        return True
    status = getattr(exc, "status", None)
    return callable(status) and str(status()) == "StatusCode.DEADLINE_EXCEEDED"


def _is_gevent_timeout(exc: BaseException) -> bool:
    # NOTE: gevent's Timeout (raised by the HTTP client's greenlets) derives from BaseException, not Exception.
    return type(exc).__module__.startswith("gevent") and "Timeout" in type(exc).__name__


class TritonConnection:
    """Protocol-neutral calls to one server, HTTP or gRPC, each within its timeout and with mapped errors.

    HTTP clients (geventhttpclient) must stay on the thread that made them: one per thread (the job thread and
    the heartbeat thread call the server). gRPC calls take their deadline per call.
    """

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self.grpc = settings.use_grpc
        self.url = settings.server_grpc_url if self.grpc else settings.server_url
        self.protocol = "grpc" if self.grpc else "http"
        self._local = threading.local()

    def _client(self, long: bool = False) -> Any:
        attr = "long" if long and not self.grpc else "short"
        client = getattr(self._local, attr, None)
        if client is None:
            s = self.settings
            if self.grpc:
                import tritonclient.grpc as grpcclient

                client = grpcclient.InferenceServerClient(self.url, ssl=s.ssl)
            else:
                import tritonclient.http as httpclient

                timeout = s.load_timeout_seconds if long else s.timeout_seconds
                client = httpclient.InferenceServerClient(self.url, connection_timeout=s.timeout_seconds,
                                                          network_timeout=timeout, ssl=s.ssl, insecure=s.insecure)
            setattr(self._local, attr, client)
        return client

    def call(self, what: str, method: str, *args: Any, long: bool = False, **kwargs: Any) -> Any:
        """``client.<method>(*args, **kwargs)`` within the timeout; failures raised as fleet errors."""
        if self.grpc:
            kwargs["client_timeout"] = self.settings.load_timeout_seconds if long else self.settings.timeout_seconds
        for attempt in (1, 2):
            try:
                return getattr(self._client(long), method)(*args, **kwargs)
            except BaseException as exc:
                if isinstance(exc, SoftTimeLimitExceeded) or (
                        not isinstance(exc, Exception) and not _is_gevent_timeout(exc)):
                    raise  # the job's time limit; KeyboardInterrupt, SystemExit
                err = map_error(exc, what, self.url)
                if not isinstance(err, AdapterUnavailableError):
                    raise err from None
                # NOTE: start afresh: an HTTP keep-alive connection or a gRPC channel may be stale (the server
                # restarted; a failed channel backs off for up to minutes). One retry on a fresh connection,
                # except after a timeout: that call had its whole budget already.
                self._drop(long)
                if attempt == 2 or _is_timeout(exc):
                    raise err from None
        raise AssertionError("unreachable")

    def _drop(self, long: bool) -> None:
        attr = "long" if long and not self.grpc else "short"
        client = getattr(self._local, attr, None)
        setattr(self._local, attr, None)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def close(self) -> None:
        self._drop(False)
        self._drop(True)

    # -- the calls the adapter makes -------------------------------------------------------------------------
    def server_state(self) -> tuple[bool, bool]:
        return bool(self.call("live", "is_server_live")), bool(self.call("ready", "is_server_ready"))

    def model_ready(self, name: str, version: int | str = "") -> bool:
        return bool(self.call(f"ready {name}", "is_model_ready", name, str(version)))

    def load(self, name: str) -> None:
        self.call(f"load {name}", "load_model", name, long=True)

    def unload(self, name: str) -> None:
        self.call(f"unload {name}", "unload_model", name)

    def metadata(self, name: str, version: int | str) -> dict[str, Any]:
        kwargs = {"as_json": True} if self.grpc else {}
        return self.call(f"metadata {name}", "get_model_metadata", name, str(version), **kwargs)

    def infer(self, name: str, version: int | str, array: np.ndarray, inp: TensorSpec,
              out: TensorSpec) -> np.ndarray:
        """One ``infer`` call with binary tensors; returns the output as a writable array."""
        if self.grpc:
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        request = mod.InferInput(inp.name, list(array.shape), inp.datatype)
        if self.grpc:
            request.set_data_from_numpy(array)
            outputs = [mod.InferRequestedOutput(out.name)]
        else:
            request.set_data_from_numpy(array, binary_data=True)
            outputs = [mod.InferRequestedOutput(out.name, binary_data=True)]
        result = self.call(f"infer {name}", "infer", name, [request], model_version=str(version), outputs=outputs)
        values = result.as_numpy(out.name)
        if values is None:
            raise PredictionError(f"Triton returned no {out.name} for {name}")
        return np.array(values, copy=True)


@dataclass
class TritonModel:
    """A model this process put on the server."""

    name: str
    version: int
    input: TensorSpec
    output: TensorSpec
    size_bytes: int
    report: dict[str, Any] = field(default_factory=dict)


class TritonServingAdapter(LocalTorchAdapter):
    """Forward on a Triton server; cache, validation, batching and post-processing shared with the local ones.

    ``device`` is where the *server* runs the model (``KIND_CPU`` / ``KIND_GPU`` instances); the worker's own
    tensors (pre- and post-processing) stay on its CPU.
    """

    name = "triton"

    def __init__(self, settings: FleetSettings, device: str = "cpu", *, store: ModelStore | None = None,
                 timer: Callable[[], float] = time.monotonic) -> None:
        tri = settings.triton
        super().__init__(settings, "cpu", max_models=tri.max_models_loaded, ttl_seconds=tri.model_timeout_seconds,
                         store=store, timer=timer)
        self.device = device
        self.triton = tri
        self.repository = Path(tri.model_repository).resolve()
        self.server = TritonConnection(tri)
        # NOTE: the newest handle of each model: reloading a model replaces its cache entry, and the old entry's
        # release must not unload the new one from the server.
        self._current: dict[str, TritonModel] = {}
        self._current_lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------------------------
    def load_model(self, model_path: str | Path, symbol: str, timeframe: TimeFrame | str,
                   model_type: ModelType | str, model_config: dict[str, Any] | None = None) -> Any:
        model_id = self.generate_model_id(symbol, TimeFrame(timeframe), ModelType(model_type))
        cached = self.cache.peek(model_id)
        if cached is not None and cached.info.model_path == str(Path(model_path).resolve()):
            # Loaded here, but the server may have lost it (restart, another process's unload).
            if not self.server.model_ready(cached.handle.name, cached.handle.version):
                self._load_on_server(cached.handle)
        return super().load_model(model_path, symbol, timeframe, model_type, model_config)

    def _materialize(self, artifacts: LoadedArtifacts) -> tuple[Any, Forward]:
        model_id = model_id_of(artifacts)
        model_type = ModelType(artifacts.config["model_type"])
        version = int(artifacts.version) if artifacts.version.isdigit() else self.triton.default_model_version
        inp, out = model_io(model_type, artifacts.config)
        repo_model = RepoModel(name=model_id, version=version, backend=self.triton.backend, input=inp, output=out,
                               max_batch_size=self.triton.max_batch_size,
                               max_queue_delay_us=self.triton.max_queue_delay_us, device=self.device)
        # The repository is Triton's artefact cache: model.pt is reused while its source hash matches. It is
        # traced but not frozen or optimised: one portable file for CPU and GPU instances, libtorch or python.
        options = CompileOptions(mode=self.settings.torchscript.compile_mode, optimize=False, device="cpu")
        _, report = ensure_torchscript(artifacts, model_id, version_dir(self.repository, model_id, version)
                                       / MODEL_FILE, options)
        changed = write_model_files(self.repository, repo_model) or not report.reused
        handle = TritonModel(model_id, version, inp, out, param_bytes(artifacts.model),
                             {"reused": report.reused, "compile_ms": report.compile_ms, "path": report.path})
        started = time.perf_counter()
        if changed or not self.server.model_ready(model_id, version):
            self._load_on_server(handle)
        else:
            self._check_metadata(handle)
        handle.report["server_load_ms"] = round((time.perf_counter() - started) * 1000, 3)
        with self._current_lock:
            self._current[model_id] = handle
        return handle, lambda x: self._forward(handle, x)

    def _load_on_server(self, handle: TritonModel) -> None:
        """Repository-API load, then wait (within the load timeout) until the version is ready; check shapes."""
        try:
            self.server.load(handle.name)
        except AdapterUnavailableError:
            raise
        except FleetError as exc:
            raise ModelLoadError(f"Triton could not load {handle.name}: {exc.message}") from None
        deadline = time.monotonic() + self.triton.load_timeout_seconds
        while not self.server.model_ready(handle.name, handle.version):
            if time.monotonic() > deadline:
                raise AdapterUnavailableError(f"{handle.name} version {handle.version} not ready on Triton "
                                              f"after {self.triton.load_timeout_seconds:g} s")
            time.sleep(0.1)
        self._check_metadata(handle)

    def _check_metadata(self, handle: TritonModel) -> None:
        meta = self.server.metadata(handle.name, handle.version)
        for spec, key in ((handle.input, "inputs"), (handle.output, "outputs")):
            found = {t.get("name"): t for t in meta.get(key, [])}.get(spec.name)
            shape = [int(d) for d in found.get("shape", [])] if found else None
            if found is None or shape != spec.metadata_shape() or found.get("datatype") != spec.datatype:
                raise ModelLoadError(f"Triton serves {handle.name} with {key} {meta.get(key)}, expected "
                                     f"{spec.name} {spec.datatype} {spec.metadata_shape()}")

    def _size_bytes(self, handle: Any, artifacts: LoadedArtifacts) -> int:
        return handle.size_bytes

    def _load_metadata(self, handle: Any) -> dict[str, Any]:
        return {"device": self.device,
                "triton": {"url": self.server.url, "protocol": self.server.protocol, "model_name": handle.name,
                           "model_version": str(handle.version), "backend": self.triton.backend,
                           "repository": str(self.repository), **handle.report}}

    # -- inference -------------------------------------------------------------------------------------------
    def _forward(self, handle: TritonModel, x: torch.Tensor) -> torch.Tensor:
        dtype = np.int64 if handle.input.datatype == "INT64" else np.float32
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)
        # NOTE: the server refuses batches over its max_batch_size; a big job goes as several requests.
        step = self.triton.max_batch_size
        parts = [self._infer(handle, array[lo:lo + step]) for lo in range(0, max(1, array.shape[0]), step)]
        return torch.from_numpy(np.concatenate(parts, axis=0))

    def _infer(self, handle: TritonModel, array: np.ndarray) -> np.ndarray:
        try:
            return self.server.infer(handle.name, handle.version, array, handle.input, handle.output)
        except ModelNotFoundError:
            log.info("%s is gone from Triton (restart or another process's unload); loading it again", handle.name)
            self._load_on_server(handle)
            return self.server.infer(handle.name, handle.version, array, handle.input, handle.output)

    # -- unloading, health -----------------------------------------------------------------------------------
    def _release(self, entry: LoadedModel) -> None:
        handle: TritonModel | None = entry.handle
        entry.handle = None
        if handle is None:
            return
        with self._current_lock:
            if self._current.get(handle.name) is not handle:
                return  # superseded by a newer load of the same model, which stays on the server
            del self._current[handle.name]
        try:
            self.server.unload(handle.name)
        except FleetError as exc:  # an eviction must not fail the job that caused it
            log.warning("could not unload %s from Triton: %s", handle.name, exc)

    def unload_model(self, model_id: str) -> bool:
        if super().unload_model(model_id):
            return True
        # Not loaded by this process; the server is shared by the pool, so the job still releases it there.
        if self.server.model_ready(model_id):
            self.server.unload(model_id)
            return True
        return False

    def health_check(self) -> dict[str, Any]:
        out: dict[str, Any] = {"adapter": self.name, "device": self.device, "protocol": self.server.protocol,
                               "url": self.server.url, "models_loaded": len(self.cache)}
        try:
            live, ready = self.server.server_state()
        except FleetError as exc:
            return {**out, "healthy": False, "live": False, "ready": False, "error": exc.message}
        return {**out, "healthy": live and ready, "live": live, "ready": ready}

    def close(self) -> None:
        """Forget this process's models and close its connections, leaving the models loaded on the server.

        NOTE: the server is shared by every process of the pool: a process that exits (a restart, a scale-down)
        must not unload what the others are serving. Unload jobs and cache evictions do unload.
        """
        with self._current_lock:
            self._current.clear()  # so that the cache's release callbacks leave the server alone
        try:
            super().close()
        finally:
            self.server.close()


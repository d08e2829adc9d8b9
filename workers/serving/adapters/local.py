"""Shared machinery of the adapters that run torch inside the worker process (simple, TorchScript).

They differ only in what they turn a stored model into (an eager ``nn.Module`` or a compiled TorchScript
module); the per-process cache, input validation, batching of several requests into one forward, and the
de-normalisation are here, once.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from billiard.exceptions import SoftTimeLimitExceeded

from shared.errors import FleetError, InvalidInputError, ModelLoadError, ModelNotFoundError, PredictionError
from shared.schemas import ModelInfo, ModelType, PredictInputs, PredictionResult, TimeFrame
from shared.settings import FleetSettings
from workers.models import inference
from workers.serving.adapters.base import InputData, ServingAdapter
from workers.serving.cache import ModelCache
from workers.store import LoadedArtifacts, ModelStore

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LoadedModel:
    """A model resident in this process."""

    info: ModelInfo
    forward: Forward
    config: dict[str, Any]
    meta: dict[str, Any]
    size_bytes: int
    handle: Any


def model_bytes(module: Any) -> int:
    """Real bytes of parameters and buffers (works for eager and TorchScript modules)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class LocalTorchAdapter(ServingAdapter):
    """Base of the in-process torch adapters: a cache of :class:`LoadedModel` and batched inference."""

    def __init__(self, settings: FleetSettings, device: str = "cpu", *, max_models: int, ttl_seconds: float,
                 store: ModelStore | None = None, timer: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings, device)
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device} asked for, but CUDA is not available in this process")
        self.store = store or ModelStore(settings.model_store_dir)
        self.cache: ModelCache[LoadedModel] = ModelCache(
            max_models=max_models,
            max_bytes=int(settings.simple.cache_size_mb * 2**20),
            ttl_seconds=ttl_seconds,
            sizeof=lambda entry: entry.size_bytes,
            on_evict=self._on_evict,
            timer=timer,
        )

    # -- what subclasses provide ----------------------------------------------------------------------------
    @abstractmethod
    def _materialize(self, artifacts: LoadedArtifacts) -> tuple[Any, Forward]:
        """Turn stored artefacts into (handle, forward) on ``self.torch_device``."""

    def _size_bytes(self, handle: Any, artifacts: LoadedArtifacts) -> int:
        """Bytes the cache charges for a model: by default the real parameter and buffer bytes of ``handle``."""
        return model_bytes(handle)

    def _load_metadata(self, handle: Any) -> dict[str, Any]:
        """Extra ``ModelInfo.metadata`` of a freshly materialised model (a compile report, a server's view)."""
        return {}

    def _release(self, entry: LoadedModel) -> None:
        """Free what ``_materialize`` took (device memory is returned by dropping references)."""
        entry.handle = None
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the contract ----------------------------------------------------------------------------------------
    def load_model(self, model_path: str | Path, symbol: str, timeframe: TimeFrame | str,
                   model_type: ModelType | str, model_config: dict[str, Any] | None = None) -> ModelInfo:
        model_id = self.generate_model_id(symbol, TimeFrame(timeframe), ModelType(model_type))
        cached = self.cache.peek(model_id)
        if cached is not None and cached.info.model_path == str(Path(model_path).resolve()):
            self.cache.get(model_id)  # refresh recency: a load of a loaded model is a use
            return cached.info
        started = self.cache.timer()
        artifacts = self.store.load_from_path(model_path)
        if artifacts.config.get("model_type") != ModelType(model_type).value:
            raise ModelLoadError(f"{model_path} holds a {artifacts.config.get('model_type')} model, "
                                 f"not {ModelType(model_type).value}")
        if model_config:
            artifacts.config.update(model_config)
        try:
            handle, forward = self._materialize(artifacts)
        except FleetError:
            raise
        except Exception as exc:  # a corrupt or incompatible artefact must fail the job, not the worker
            raise ModelLoadError(f"could not load {model_id}: {type(exc).__name__}: {exc}") from exc
        size = self._size_bytes(handle, artifacts)
        info = ModelInfo(
            model_id=model_id, symbol=symbol, timeframe=TimeFrame(timeframe), model_type=ModelType(model_type),
            model_path=str(artifacts.path), is_loaded=True, loaded_at=time.time(),
            memory_usage_mb=round(size / 2**20, 4), version=artifacts.version,
            metadata={"adapter": self.name, "device": str(self.torch_device),
                      "config": _public_config(artifacts.config),
                      "heldout": artifacts.meta.get("heldout", {}), **self._load_metadata(handle)},
        )
        self.cache.put(model_id, LoadedModel(info, forward, artifacts.config, artifacts.meta, size, handle),
                       load_seconds=self.cache.timer() - started)
        return info

    def touch(self, model_id: str) -> bool:
        """Look a model up for a job: True on a cache hit (refreshing it), False on a miss. Counted."""
        return self.cache.get(model_id) is not None

    def unload_model(self, model_id: str) -> bool:
        return self.cache.pop(model_id) is not None

    def list_loaded_models(self) -> list[ModelInfo]:
        return [entry.info for _, entry in self.cache.items()]

    def cache_counters(self) -> dict[str, int]:
        return self.cache.counters.snapshot()

    def health_check(self) -> dict[str, Any]:
        healthy = self.torch_device.type != "cuda" or torch.cuda.is_available()
        reason = {} if healthy else {"reason": f"{self.torch_device} is not available in this process"}
        return {"healthy": healthy, **reason, "adapter": self.name, "device": str(self.torch_device),
                "models_loaded": len(self.cache), "cache_mb": round(self.cache.current_bytes / 2**20, 3)}

    def close(self) -> None:
        self.cache.clear()

    def _on_evict(self, model_id: Any, entry: LoadedModel, reason: str) -> None:
        self._release(entry)

    # -- inference -------------------------------------------------------------------------------------------
    def _entry(self, model_id: str) -> LoadedModel:
        entry = self.cache.peek(model_id)
        if entry is None:
            raise ModelNotFoundError(f"model {model_id} is not loaded in this worker process")
        return entry

    def predict(self, model_id: str, input_data: InputData, n_steps: int | None = None) -> PredictionResult:
        (outcome,) = self.predict_many(model_id, [(input_data, n_steps)])
        if isinstance(outcome, FleetError):
            raise outcome
        return outcome

    def predict_many(self, model_id: str,
                     requests: Sequence[tuple[InputData, int | None]]) -> list[PredictionResult | FleetError]:
        entry = self._entry(model_id)
        if entry.info.model_type is ModelType.SENTIMENT:
            return self._predict_sentiment(entry, requests)
        return self._predict_forecast(entry, requests)

    def _predict_forecast(self, entry: LoadedModel,
                          requests: Sequence[tuple[InputData, int | None]]) -> list[PredictionResult | FleetError]:
        out: list[PredictionResult | FleetError | None] = [None] * len(requests)
        horizon = int(entry.config["prediction_length"])
        groups: dict[int, list[tuple[int, inference.PreparedSeries]]] = defaultdict(list)
        for i, (input_data, n_steps) in enumerate(requests):
            try:
                prepared = inference.prepare_series(_series_of(input_data), entry.config)
                groups[n_steps or horizon].append((i, prepared))
            except FleetError as exc:
                out[i] = exc
        # NOTE: one forward per distinct n_steps: requests of a batch almost always share it.
        for steps, members in groups.items():
            started = time.perf_counter()
            try:
                forecasts = inference.run_forecast(entry.forward, [p for _, p in members], steps, entry.config)
            except FleetError as exc:
                for i, _ in members:
                    out[i] = exc
                continue
            except SoftTimeLimitExceeded:
                raise  # the job's time limit, not a failed forward: the executor ends the job with it
            except Exception as exc:
                for i, _ in members:
                    out[i] = PredictionError(f"forward failed: {type(exc).__name__}: {exc}")
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            confidence = inference.forecast_confidence(entry.meta, steps, horizon)
            for (i, _), forecast in zip(members, forecasts):
                out[i] = PredictionResult(predictions=forecast.tolist(), confidence_score=confidence,
                                          inference_time_ms=round(elapsed_ms, 3), model_info=entry.info)
        return out  # type: ignore[return-value]

    def _predict_sentiment(self, entry: LoadedModel,
                           requests: Sequence[tuple[InputData, int | None]]) -> list[PredictionResult | FleetError]:
        out: list[PredictionResult | FleetError | None] = [None] * len(requests)
        spans: list[tuple[int, int, int]] = []
        texts: list[str] = []
        for i, (input_data, _) in enumerate(requests):
            try:
                batch = _texts_of(input_data)
            except FleetError as exc:
                out[i] = exc
                continue
            spans.append((i, len(texts), len(texts) + len(batch)))
            texts.extend(batch)
        if texts:
            started = time.perf_counter()
            try:
                token_ids = inference.encode_texts(texts, entry.config)
                probs, labels, _ = inference.run_sentiment(entry.forward, token_ids, entry.config)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:
                err = exc if isinstance(exc, FleetError) else PredictionError(f"forward failed: {exc}")
                for i, _, _ in spans:
                    out[i] = err
                return out  # type: ignore[return-value]
            elapsed_ms = (time.perf_counter() - started) * 1000
            for i, lo, hi in spans:
                part = probs[lo:hi]
                out[i] = PredictionResult(
                    predictions=part.tolist(), labels=labels[lo:hi],
                    confidence_score=float(np.clip(part.max(axis=1).mean(), 0.0, 1.0)),
                    inference_time_ms=round(elapsed_ms, 3), model_info=entry.info)
        return out  # type: ignore[return-value]


def _public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as results show it. NOTE: a sentiment model's vocabulary (thousands of words) would otherwise
    travel inside every result's ``model_info``; its size is enough."""
    if "vocab" not in config:
        return config
    return {**{k: v for k, v in config.items() if k != "vocab"}, "vocab_size": len(config["vocab"])}


def _series_of(input_data: InputData) -> np.ndarray:
    if isinstance(input_data, PredictInputs):
        series = input_data.series_array()
        if series is None:
            raise InvalidInputError("a forecaster needs inputs.series or inputs.tensor, not texts",
                                    field="inputs.series")
        return series
    if isinstance(input_data, np.ndarray):
        return input_data
    raise InvalidInputError("a forecaster needs a (time, channels) series", field="inputs.series")


def _texts_of(input_data: InputData) -> list[str]:
    if isinstance(input_data, PredictInputs):
        if input_data.texts is None:
            raise InvalidInputError("a sentiment model needs inputs.texts", field="inputs.texts")
        return list(input_data.texts)
    if isinstance(input_data, (list, tuple)) and all(isinstance(t, str) for t in input_data) and input_data:
        return list(input_data)
    raise InvalidInputError("a sentiment model needs a non-empty list of texts", field="inputs.texts")

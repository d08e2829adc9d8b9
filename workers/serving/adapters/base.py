"""The serving adapter contract.

Lifecycle and processes:

* An adapter is constructed **inside the worker process**, after the fork (Celery's ``worker_process_init``,
  or lazily on the first job for solo/thread pools), never at import time and never in the producer.
* :meth:`ServingAdapter.load_model` runs in that process when a load job arrives or when a predict job finds
  its model missing from the cache; it puts the model on the adapter's device (or, for server-backed adapters,
  makes the remote server load it) and returns its :class:`ModelInfo`.
* :meth:`ServingAdapter.predict` / :meth:`ServingAdapter.predict_many` run in the same process, on the thread
  that runs the job (or the batching thread), for models already loaded.
* :meth:`ServingAdapter.unload_model` runs on an unload job and whenever the per-process cache evicts.
* :meth:`ServingAdapter.health_check` runs on the control command and periodically from the heartbeat thread.
* :meth:`ServingAdapter.close` runs once when the worker process shuts down.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence, Union

import numpy as np

from shared.errors import FleetError
from shared.schemas import ModelInfo, ModelType, PredictInputs, PredictionResult, TimeFrame, model_id_for
from shared.settings import FleetSettings

#: What ``predict`` accepts as input: the job's inputs, a (time, channels) array, or headlines.
InputData = Union[PredictInputs, np.ndarray, Sequence[str]]


class ServingAdapter(ABC):
    """One serving runtime (in-process torch, TorchScript, Triton, TorchServe) behind one interface."""

    name: ClassVar[str]

    def __init__(self, settings: FleetSettings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = device

    @abstractmethod
    def load_model(self, model_path: str | Path, symbol: str, timeframe: TimeFrame | str,
                   model_type: ModelType | str, model_config: dict[str, Any] | None = None) -> ModelInfo:
        """Load the stored model at ``model_path`` (a version directory of the store) and return its info.

        Idempotent: loading a loaded model refreshes it in the cache and returns the same info.
        """

    @abstractmethod
    def predict(self, model_id: str, input_data: InputData, n_steps: int | None = None) -> PredictionResult:
        """Run one prediction on a loaded model; raises a :class:`FleetError` subclass on failure."""

    def predict_many(self, model_id: str,
                     requests: Sequence[tuple[InputData, int | None]]) -> list[PredictionResult | FleetError]:
        """Run several predictions of one model; each gets its own result or its own error.

        Adapters that can batch override this to run the valid requests as one forward. The default runs
        them one by one.
        """
        out: list[PredictionResult | FleetError] = []
        for input_data, n_steps in requests:
            try:
                out.append(self.predict(model_id, input_data, n_steps))
            except FleetError as exc:
                out.append(exc)
        return out

    @abstractmethod
    def unload_model(self, model_id: str) -> bool:
        """Release a model (memory, device, remote server slot). False if it was not loaded."""

    @abstractmethod
    def list_loaded_models(self) -> list[ModelInfo]:
        """The models this process holds now."""

    @abstractmethod
    def health_check(self) -> dict[str, Any]:
        """``{"healthy": bool, ...}`` with whatever the runtime can tell (device, server liveness)."""

    def is_loaded(self, model_id: str) -> bool:
        return any(info.model_id == model_id for info in self.list_loaded_models())

    def cache_counters(self) -> dict[str, int]:
        """Cache counters of this process: hits, misses, evictions (and ``evictions_<reason>``), ``loads``,
        ``load_ms``, ``evicted_age_s`` (see :class:`~workers.serving.cache.CacheCounters`); zeros for adapters
        without a cache."""
        return {"hits": 0, "misses": 0, "evictions": 0}

    def close(self) -> None:
        """Release everything (worker shutdown)."""
        for info in self.list_loaded_models():
            self.unload_model(info.model_id)

    @staticmethod
    def generate_model_id(symbol: str, timeframe: TimeFrame | str, model_type: ModelType | str) -> str:
        """``{symbol}_{timeframe}_{model_type}``: the id every part of the fleet uses for a model."""
        return model_id_for(symbol, timeframe, model_type)

"""The same model and the same math in every baseline: the fleet's store loader and its pre/post-processing.

Plain Celery, celery-batches, Triton's Python backend, TorchServe's handler and the in-process limit all call
:meth:`Forecaster.predict_batch`, which is what the fleet's in-process adapter does for a batch: validate and
normalise each window (:func:`workers.models.inference.prepare_series`), one forward for the whole batch, and
de-normalise (:func:`workers.models.inference.run_forecast`). Only the transport differs between systems.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


class Forecaster:
    """A stored benchmark model, loaded on CPU with ``threads`` torch threads."""

    def __init__(self, store_dir: str | Path, symbol: str, threads: int | None = None) -> None:
        import torch

        from shared.schemas import ModelKey
        from workers.store import ModelStore

        if threads:
            torch.set_num_threads(threads)
        loaded = ModelStore(store_dir).load(ModelKey(symbol=symbol, timeframe="1h", model_type="patchtst"))
        self.model = loaded.model.eval()
        self.config = loaded.config
        self.horizon = int(self.config["prediction_length"])
        self.shape = (int(self.config["context_length"]), int(self.config["n_channels"]))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.model(x)

    def predict_batch(self, series: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One ``[horizon, channels]`` float64 forecast per series, in the units of the input."""
        from workers.models import inference

        prepared = [inference.prepare_series(s, self.config) for s in series]
        return inference.run_forecast(self.forward, prepared, self.horizon, self.config)


def load_all(store_dir: str | Path, threads: int | None = None) -> dict[str, Forecaster]:
    """Both benchmark models, by bench name (``ref``, ``small``)."""
    from bench.models import MODELS

    return {name: Forecaster(store_dir, m.symbol, threads) for name, m in MODELS.items()}

"""The two benchmark models, built from the project's own PatchTST with fixed seeds, and their inputs.

Weights are random-init (seeded): the benchmark measures serving, not accuracy. Both models are saved with
the project's :class:`~workers.store.ModelStore`, so the fleet loads them with its real loading code and every
baseline loads the very same weights from the same store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TIMEFRAME = "1h"


@dataclass(frozen=True)
class BenchModel:
    """One benchmark model: its name in this bench, its store key and its PatchTST config."""

    name: str
    symbol: str
    config: dict[str, Any]
    seed: int

    @property
    def model_type(self) -> str:
        return "patchtst"

    @property
    def context(self) -> int:
        return int(self.config["context_length"])

    @property
    def channels(self) -> int:
        return int(self.config["n_channels"])

    @property
    def horizon(self) -> int:
        return int(self.config["prediction_length"])

    @property
    def model_id(self) -> str:
        return f"{self.symbol}_{TIMEFRAME}_{self.model_type}"

    def key_fields(self) -> dict[str, str]:
        return {"symbol": self.symbol, "timeframe": TIMEFRAME, "model_type": self.model_type}


#: The paper's reference PatchTST size: 512 x 7 -> 96, about 1.2 M parameters.
REFERENCE = BenchModel("ref", "BENCHREF", dict(context_length=512, n_channels=7, prediction_length=96,
                                                patch_len=16, stride=8, d_model=128, n_layers=3, n_heads=4,
                                                d_ff=256), seed=1)
#: A small PatchTST: 96 x 5 -> 24, d_model 32, 2 layers (the fleet's default size).
SMALL = BenchModel("small", "BENCHSMALL", dict(context_length=96, n_channels=5, prediction_length=24,
                                                patch_len=16, stride=8, d_model=32, n_layers=2, n_heads=4,
                                                d_ff=64), seed=2)
MODELS: dict[str, BenchModel] = {m.name: m for m in (REFERENCE, SMALL)}


def save_models(store_dir: Path) -> dict[str, dict[str, Any]]:
    """Build both models (seeded) and save them into a store at ``store_dir``; returns name -> summary."""
    import torch

    from shared.schemas import ModelKey
    from workers.models.registry import build_model, n_params
    from workers.store import ModelStore

    store = ModelStore(store_dir)
    out = {}
    for model in MODELS.values():
        torch.manual_seed(model.seed)
        module = build_model(model.model_type, model.config)
        key = ModelKey(**model.key_fields())
        version, path = store.save(key, module, dict(model.config),
                                   {"seed": model.seed, "note": "random-init benchmark weights"})
        out[model.name] = {"model_id": model.model_id, "version": version, "path": str(path),
                           "n_params": n_params(module), "config": dict(model.config)}
    return out


def model_path(store_dir: Path, model: BenchModel) -> Path:
    from shared import store_layout
    from shared.schemas import ModelKey

    return store_layout.model_dir(store_dir, ModelKey(**model.key_fields()))


def sample_series(model: BenchModel, n: int = 16, seed: int = 0) -> list[np.ndarray]:
    """``n`` raw (un-normalised) float32 series of ``context x channels`` cut from synthetic bars.

    The project's synthetic bars have five channels (OHLC + log volume); they are cycled to the model's count.
    """
    from workers.training.synthetic import generate_bars

    values = generate_bars(model.symbol, TIMEFRAME, n_bars=model.context + 16 * n, seed=seed).values
    values = np.resize(values.T, (model.channels, values.shape[0])).T
    return [np.ascontiguousarray(values[16 * i: 16 * i + model.context], dtype=np.float32) for i in range(n)]

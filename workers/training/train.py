"""Training: forecasters on synthetic bars, sentiment on the shipped headlines, and ``fleet models create``.

Forecasters train on windows normalised exactly as at serving time (:func:`workers.models.inference.normalise_windows`:
each window's context sets the mean/std that also scale its target). The split is chronological: the last
``heldout_fraction`` of the bars are held out, training windows end before them, and held-out windows predict
only held-out bars. Held-out MAE is in those normalised units (each window weighs the same whatever the price
level), averaged over steps and channels, and is compared with the naive forecast (the context's last value,
repeated) on the same windows. A model that does not beat its baseline raises :class:`TrainingError`.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from shared.errors import FleetError
from shared.schemas import ModelKey, ModelType, TimeFrame
from workers.models.inference import normalise_windows
from workers.models.registry import CONFIG_CLASSES, build_model, validate_config
from workers.models.sentiment import LABELS, encode
from workers.store import ModelStore
from workers.training.headlines import Headline, build_vocab, load_headlines, stratified_split
from workers.training.synthetic import generate_bars

Progress = Callable[[str, int, int], None]
#: Optimiser steps per forecaster: 3-5 s each on one CPU thread, and every one clearly beats naive by then.
DEFAULT_STEPS: dict[ModelType, int] = {
    ModelType.PATCHTST: 150, ModelType.PATCHTSMIXER: 200, ModelType.ENHANCED_TRANSFORMER: 100,
}


class TrainingError(FleetError):
    """A trained model did not beat its baseline on held-out data."""


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _windows(series: np.ndarray, starts: np.ndarray, length: int,
             horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(x [N, L, C], y [N, H, C])`` of the windows starting at ``starts``."""
    idx = starts[:, None] + np.arange(length + horizon)[None, :]
    windows = series[idx]
    _, mean, std = normalise_windows(windows[:, :length])
    z = (windows - mean[:, None, :]) / std[:, None, :]
    return torch.from_numpy(z[:, :length].astype(np.float32)), torch.from_numpy(z[:, length:].astype(np.float32))


def _warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first 10% of steps, then cosine decay to 5%."""
    warm = max(1, steps // 10)
    return min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _range(timestamps: np.ndarray | None, lo: int, hi: int) -> dict[str, Any]:
    if timestamps is None:
        return {"start": lo, "end": hi - 1, "n_bars": hi - lo}
    return {"start": str(timestamps[lo]), "end": str(timestamps[hi - 1]), "n_bars": hi - lo}


def train_forecaster(model_type: ModelType | str, series: np.ndarray, config: dict[str, Any], seed: int = 0, *,
                     timestamps: np.ndarray | None = None, steps: int | None = None, batch_size: int = 64,
                     lr: float = 3e-3, heldout_fraction: float = 0.2, threads: int | None = None,
                     check: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train a forecaster on ``series`` ``[T, C]``; returns the model (eval mode) and its ``meta``.

    Args:
        model_type: a forecaster type.
        series: bars in their own units, oldest first; ``C`` must equal the config's ``n_channels``.
        config: the model's config fields (validated here).
        seed: seeds weight init and minibatch sampling (the global torch RNG is restored afterwards).
        timestamps: bar times, recorded as the training and held-out ranges (indices when omitted).
        steps: optimiser steps (:data:`DEFAULT_STEPS` of the type when None).
        threads: torch intra-op threads while training (unchanged when None).
        check: raise when the model does not beat the naive forecast on the held-out windows.

    Raises:
        ValueError: the series does not fit the config or is too short for it and the held-out split.
        TrainingError: ``check`` is on and the held-out MAE is not below the naive forecast's.
    """
    fields = validate_config(model_type, config).model_dump()
    steps = steps or DEFAULT_STEPS[ModelType(model_type)]
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    length, horizon = fields["context_length"], fields["prediction_length"]
    series = np.asarray(series, dtype=np.float64)
    if series.ndim != 2 or series.shape[1] != fields["n_channels"]:
        raise ValueError(f"series must be [T, {fields['n_channels']}], got {list(series.shape)}")
    split = int(len(series) * (1 - heldout_fraction))
    train_starts = np.arange(0, split - length - horizon + 1)
    held_starts = np.arange(max(0, split - length), len(series) - length - horizon + 1)
    if len(train_starts) < batch_size or len(held_starts) < 1:
        raise ValueError(f"{len(series)} bars are too few for context {length} + horizon {horizon} and a "
                         f"{heldout_fraction:.0%} held-out tail")
    x_train, y_train = _windows(series, train_starts, length, horizon)
    x_held, y_held = _windows(series, held_starts, length, horizon)
    started = time.perf_counter()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_type, fields).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, partial(_warmup_cosine, steps=steps))
        for _ in range(steps):
            batch = torch.randint(0, len(x_train), (batch_size,))
            loss = nn.functional.mse_loss(model(x_train[batch]), y_train[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        model.eval()
        with torch.inference_mode():
            pred = torch.cat([model(chunk) for chunk in torch.split(x_held, 512)])
    train_seconds = time.perf_counter() - started
    mae = float((pred - y_held).abs().mean())
    naive_mae = float((x_held[:, -1:, :] - y_held).abs().mean())
    heldout = {"mae": mae, "naive_mae": naive_mae, "skill": 1 - mae / naive_mae, "n_windows": len(held_starts),
               "units": "window-normalised", "range": _range(timestamps, split, len(series))}
    if check and not mae < naive_mae:
        raise TrainingError(f"{ModelType(model_type).value} held-out MAE {mae:.4f} does not beat the naive "
                            f"forecast's {naive_mae:.4f}")
    meta = {"model_type": ModelType(model_type).value, "seed": seed, "train_seconds": round(train_seconds, 3),
            "training_range": _range(timestamps, 0, split), "heldout": heldout,
            "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "final_loss": float(loss.detach())}}
    return model, meta


def train_sentiment(rows: list[Headline] | None = None, config: dict[str, Any] | None = None, seed: int = 0, *,
                    epochs: int = 30, batch_size: int = 32, lr: float = 1e-2, heldout_fraction: float = 0.2,
                    threads: int | None = None,
                    check: bool = True) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train a sentiment classifier; returns ``(model, config, meta)``.

    The config is returned because training builds it: the vocabulary comes from the training split only
    (held-out words the model never saw map to "unknown", as they would in production).

    Raises:
        TrainingError: ``check`` is on and held-out accuracy does not beat the majority class.
    """
    rows = rows if rows is not None else load_headlines()
    train_rows, held_rows = stratified_split(rows, heldout_fraction, seed)
    fields = {**(config or {}), "vocab": build_vocab([r.text for r in train_rows])}
    typed = validate_config(ModelType.SENTIMENT, fields).model_dump()
    x_train = encode([r.text for r in train_rows], typed["vocab"], typed["max_len"])
    y_train = torch.tensor([r.label_id for r in train_rows])
    x_held = encode([r.text for r in held_rows], typed["vocab"], typed["max_len"])
    y_held = torch.tensor([r.label_id for r in held_rows])
    started = time.perf_counter()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(ModelType.SENTIMENT, typed).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for batch in torch.randperm(len(x_train)).split(batch_size):
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.inference_mode():
            accuracy = float((model(x_held).argmax(dim=1) == y_held).double().mean())
    majority = int(torch.bincount(y_train, minlength=len(LABELS)).argmax())
    majority_accuracy = float((y_held == majority).double().mean())
    if check and not accuracy > majority_accuracy:
        raise TrainingError(f"sentiment held-out accuracy {accuracy:.3f} does not beat the majority class's "
                            f"{majority_accuracy:.3f}")
    meta = {"model_type": ModelType.SENTIMENT.value, "seed": seed,
            "train_seconds": round(time.perf_counter() - started, 3),
            "training_range": {"dataset": "headlines.jsonl", "n_train": len(train_rows),
                               "n_heldout": len(held_rows)},
            "heldout": {"accuracy": accuracy, "majority_accuracy": majority_accuracy,
                        "n_examples": len(held_rows), "majority_label": LABELS[majority]},
            "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                         "final_loss": float(loss.detach())}}
    return model, typed, meta


def create_models(store: ModelStore, symbols: list[str], timeframes: list[TimeFrame | str],
                  types: list[ModelType | str], seed: int = 0, progress: Progress | None = None, *, n_bars: int = 3000,
                  threads: int | None = 1, steps: int | None = None,
                  configs: dict[ModelType, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Train and save one model per (symbol, timeframe, type) into ``store``.

    Forecasters train on each symbol's own synthetic bars; sentiment models share one training on the
    headlines (the data does not depend on the symbol), saved under each symbol's id. ``progress`` is called
    as ``progress(model_id, done, total)`` before each model starts and once more when all are done.
    ``steps`` and ``configs`` (config fields by model type, over the defaults) exist for tests and tuning.

    NOTE: one torch thread by default. These models are too small to gain much from more (on 2 cores, one
    thread trains as fast as two), and OpenMP threads that spin-wait slow down up to tenfold as soon as another
    process (a worker, a test) takes a core. ``None`` leaves torch's setting alone.

    Returns:
        One summary per model: ``model_id``, ``version``, ``path``, ``heldout`` metrics, ``train_seconds``.
    """
    keys = [ModelKey(symbol=s, timeframe=tf, model_type=mt) for s in symbols for tf in timeframes for mt in types]
    overrides = {ModelType(k): v for k, v in (configs or {}).items()}
    sentiment: tuple[nn.Module, dict[str, Any], dict[str, Any]] | None = None
    summaries = []
    for done, key in enumerate(keys):
        if progress:
            progress(key.model_id, done, len(keys))
        if key.model_type is ModelType.SENTIMENT:
            sentiment = sentiment or train_sentiment(config=overrides.get(ModelType.SENTIMENT), seed=seed,
                                                     threads=threads)
            model, config, meta = sentiment
        else:
            bars = generate_bars(key.symbol, key.timeframe, n_bars=n_bars, seed=seed)
            config = CONFIG_CLASSES[key.model_type](**overrides.get(key.model_type, {})).model_dump()
            model, meta = train_forecaster(key.model_type, bars.values, config, seed, timestamps=bars.timestamps,
                                           steps=steps, threads=threads)
            meta["data"] = {"source": "synthetic", "symbol": key.symbol, "timeframe": key.timeframe.value,
                            "n_bars": n_bars, "seed": seed}
        version, path = store.save(key, model, config, meta)
        summaries.append({"model_id": key.model_id, "model_type": key.model_type.value, "version": version,
                          "path": str(path), "heldout": meta["heldout"], "train_seconds": meta["train_seconds"]})
    if progress:
        progress("", len(keys), len(keys))
    return summaries

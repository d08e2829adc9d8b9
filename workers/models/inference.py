"""Pre- and post-processing shared by every serving adapter (in-process, TorchScript, Triton).

Adapters only supply a ``forward`` callable (``[B, L, C] -> [B, H, C]`` for forecasters, ``[B, T] -> [B, 3]``
logits for sentiment) that takes and returns CPU tensors; everything else is here, once, so that a forecast is
the same whichever runtime computed it:

* :func:`prepare_series` validates a series and normalises its last window, per channel;
* :func:`run_forecast` runs several windows as one batch, rolls forward past the horizon, de-normalises;
* :func:`forecast_confidence` turns the model's held-out skill into a score;
* :func:`encode_texts` / :func:`run_sentiment` do the same for headlines.

Training (:mod:`workers.training.train`) uses :func:`normalise_windows` too, so that models see at serving
time exactly the normalisation they were trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from shared.errors import InvalidInputError, PredictionError
from workers.models.sentiment import encode

Forward = Callable[[torch.Tensor], torch.Tensor]
#: The std of a flat channel is floored at this fraction of its level (plus ``ABS_EPS``): a constant series
#: normalises to zeros instead of dividing by zero, and tiny wiggles on a large level are not blown up.
REL_EPS = 1e-4
ABS_EPS = 1e-8


@dataclass
class PreparedSeries:
    """One normalised window: ``x`` ``[L, C]`` float32 and the per-channel ``mean`` / ``std`` to undo it."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def normalise_windows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-window, per-channel z-scores of ``[..., L, C]`` windows: ``(z, mean [..., C], std [..., C])``."""
    mean = windows.mean(axis=-2)
    std = windows.std(axis=-2)
    std = np.maximum(std, REL_EPS * np.abs(mean) + ABS_EPS)
    return (windows - mean[..., None, :]) / std[..., None, :], mean, std


def prepare_series(series: np.ndarray, config: dict[str, Any]) -> PreparedSeries:
    """Validate ``series`` (time x channels) against a forecaster's config and normalise its last window.

    Raises:
        InvalidInputError: not 2-D, wrong channel count, too short, or holding NaN / infinity.
    """
    length, channels = int(config["context_length"]), int(config["n_channels"])
    try:
        arr = np.asarray(series, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError("series must be a rectangular array of numbers", field="inputs.series") from None
    if arr.ndim != 2:
        raise InvalidInputError(f"series must be 2-D (time x channels), got {arr.ndim}-D", field="inputs.series")
    if arr.shape[1] != channels:
        raise InvalidInputError(f"series has {arr.shape[1]} channels, the model needs {channels}",
                                field="inputs.series")
    if arr.shape[0] < length:
        raise InvalidInputError(f"series has {arr.shape[0]} rows, the model needs at least {length} "
                                f"(its context length)", field="inputs.series")
    window = arr[-length:]
    if not np.isfinite(window).all():
        bad = int((~np.isfinite(window)).any(axis=1).sum())
        raise InvalidInputError(f"series holds NaN or infinite values in {bad} of its last {length} rows",
                                field="inputs.series")
    z, mean, std = normalise_windows(window)
    return PreparedSeries(x=z.astype(np.float32), mean=mean, std=std)


def run_forecast(forward: Forward, prepared: list[PreparedSeries], n_steps: int,
                 config: dict[str, Any]) -> list[np.ndarray]:
    """Forecast ``n_steps`` bars for every prepared window, all in one batch.

    Past the model's horizon the forecast rolls forward: predictions are appended to the (normalised) window,
    the window slides to its last ``context_length`` rows and the model runs again, for the whole batch.

    Returns:
        One ``[n_steps, C]`` float64 array per item, in the units of its input.
    """
    if n_steps < 1:
        raise InvalidInputError(f"n_steps must be at least 1, got {n_steps}", field="n_steps")
    if not prepared:
        return []
    length, horizon = int(config["context_length"]), int(config["prediction_length"])
    window = torch.from_numpy(np.stack([p.x for p in prepared]))
    expected = (len(prepared), horizon, window.shape[2])
    chunks: list[torch.Tensor] = []
    produced = 0
    with torch.inference_mode():
        while produced < n_steps:
            out = forward(window)
            if tuple(out.shape) != expected:
                raise PredictionError(f"model returned shape {tuple(out.shape)}, expected {expected}")
            out = out.to(torch.float32)
            chunks.append(out)
            produced += horizon
            if produced < n_steps:
                window = torch.cat([window, out], dim=1)[:, -length:]
    forecast = torch.cat(chunks, dim=1)[:, :n_steps].double().numpy()
    if not np.isfinite(forecast).all():
        raise PredictionError("model produced NaN or infinite values")
    return [forecast[i] * p.std + p.mean for i, p in enumerate(prepared)]


def forecast_confidence(meta: dict[str, Any], n_steps: int, horizon: int) -> float:
    """A confidence score in [0, 1] for a forecast of ``n_steps`` bars.

    It is the model's held-out skill over the naive last-value forecast, ``1 - mae / naive_mae`` from
    ``meta["heldout"]`` (0 when the model is no better than naive, 1 for a perfect model), clipped to [0, 1].
    Past the horizon the forecast feeds on its own predictions, so the score is discounted by
    ``horizon / n_steps``. A model with no held-out metrics scores 0.
    """
    heldout = meta.get("heldout") or {}
    try:
        mae, naive = float(heldout["mae"]), float(heldout["naive_mae"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    if not naive > 0 or not np.isfinite(mae):
        return 0.0
    skill = float(np.clip(1.0 - mae / naive, 0.0, 1.0))
    if n_steps > horizon:
        skill *= horizon / n_steps
    return skill


def encode_texts(texts: list[str], config: dict[str, Any]) -> torch.Tensor:
    """Token ids ``[B, max_len]`` (int64) of headlines, with the vocabulary stored in the model's config."""
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidInputError("texts must be a non-empty list of strings", field="inputs.texts")
    return encode(list(texts), list(config["vocab"]), int(config["max_len"]))


def run_sentiment(forward: Forward, token_ids: torch.Tensor,
                  config: dict[str, Any]) -> tuple[np.ndarray, list[str], float]:
    """Class probabilities ``[B, 3]``, the most likely label of each text, and the mean top probability."""
    with torch.inference_mode():
        logits = forward(token_ids)
    labels_all = list(config.get("labels") or ("negative", "neutral", "positive"))
    expected = (token_ids.shape[0], len(labels_all))
    if tuple(logits.shape) != expected:
        raise PredictionError(f"model returned shape {tuple(logits.shape)}, expected {expected}")
    probs = torch.softmax(logits.to(torch.float64), dim=1).numpy()
    if not np.isfinite(probs).all():
        raise PredictionError("model produced NaN or infinite values")
    labels = [labels_all[i] for i in probs.argmax(axis=1)]
    return probs, labels, float(probs.max(axis=1).mean())

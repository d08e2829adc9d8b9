"""Realistic example inputs for tracing, compiling and warming up a model of a given config."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared.schemas import ModelType, TimeFrame
from workers.models.inference import encode_texts, normalise_windows
from workers.models.registry import validate_config
from workers.training.synthetic import generate_bars

EXAMPLE_HEADLINES: tuple[str, ...] = (
    "Shares jump after quarterly earnings beat analyst estimates",
    "Regulators open investigation into accounting practices",
    "Company to present at annual technology conference",
)


def example_inputs(model_type: ModelType | str, config: dict[str, Any], batch: int = 1) -> torch.Tensor:
    """A realistic input batch for tracing or warming up a model of this config.

    Forecasters: ``batch`` normalised windows ``[batch, L, C]`` cut from a synthetic series (channels are
    repeated or cut when ``n_channels`` is not 5). Sentiment: token ids of real headlines ``[batch, max_len]``.
    """
    typed = validate_config(model_type, config)
    if ModelType(model_type) is ModelType.SENTIMENT:
        texts = [EXAMPLE_HEADLINES[i % len(EXAMPLE_HEADLINES)] for i in range(batch)]
        return encode_texts(texts, typed.model_dump())
    length, channels = typed.context_length, typed.n_channels  # type: ignore[attr-defined]
    values = generate_bars("EXAMPLE", TimeFrame.H1, n_bars=length + 8 * batch).values
    values = np.resize(values.T, (channels, values.shape[0])).T  # cycle channels to the config's count
    windows = np.stack([values[8 * i: 8 * i + length] for i in range(batch)])
    z, _, _ = normalise_windows(windows)
    return torch.from_numpy(z.astype(np.float32))

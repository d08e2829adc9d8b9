"""The "enhanced transformer" forecaster: a time-step transformer plus a linear skip path.

Each bar is one token (all channels projected together, so channels mix from the first layer), with fixed
sinusoidal positions plus a learned correction. The encoder's mean-pooled and last tokens feed an MLP head
that predicts all ``H x C`` values. A DLinear-style skip path (moving-average trend + seasonal remainder,
each mapped ``L -> H`` by a linear layer shared over channels) is added to the head's output. The head's last
layer starts at zero, so training starts from the linear model and the transformer learns what it misses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from workers.models import ForecasterConfig, heads_divide, transformer_encoder


class EnhancedTransformerConfig(ForecasterConfig):
    """Enhanced transformer hyper-parameters (defaults: the fleet's small size)."""

    d_model: int = Field(32, ge=1)
    n_heads: int = Field(2, ge=1)
    """Two, not four: CPU attention over ``L`` time-step tokens costs per head, and 16-wide heads train well."""
    n_layers: int = Field(2, ge=1)
    d_ff: int = Field(64, ge=1)
    moving_avg: int = Field(25, ge=1)
    """Kernel of the skip path's trend filter (odd, so that it is centred)."""

    @model_validator(mode="after")
    def _check(self) -> "EnhancedTransformerConfig":
        heads_divide(self.d_model, self.n_heads)
        if self.moving_avg % 2 == 0:
            raise ValueError(f"moving_avg must be odd, got {self.moving_avg}")
        return self


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The ``[1, length, dim]`` sine/cosine table of "Attention Is All You Need"."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table.unsqueeze(0)


class LinearSkip(nn.Module):
    """DLinear: ``[B, L, C]`` -> ``[B, H, C]`` from a trend / remainder split, weights shared over channels."""

    def __init__(self, context_length: int, prediction_length: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.half = (kernel - 1) // 2
        self.trend = nn.Linear(context_length, prediction_length)
        self.seasonal = nn.Linear(context_length, prediction_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        series = x.transpose(1, 2)  # [B, C, L]
        # Pad both ends with the edge values so that the moving average keeps the window's length.
        padded = torch.cat([series[:, :, :1].repeat(1, 1, self.half), series,
                            series[:, :, -1:].repeat(1, 1, self.half)], dim=2)
        trend = F.avg_pool1d(padded, kernel_size=self.kernel, stride=1)
        out = self.trend(trend) + self.seasonal(series - trend)
        return out.transpose(1, 2)


class EnhancedTransformer(nn.Module):
    """``[B, L, C]`` normalised window -> ``[B, H, C]`` normalised forecast."""

    def __init__(self, config: EnhancedTransformerConfig) -> None:
        super().__init__()
        self.prediction_length = config.prediction_length
        self.n_channels = config.n_channels
        self.input_proj = nn.Linear(config.n_channels, config.d_model)
        # NOTE: not persistent: it is a function of the config, so it stays out of the stored weights.
        self.register_buffer("sinusoid", sinusoidal_positions(config.context_length, config.d_model),
                             persistent=False)
        self.position = nn.Parameter(torch.zeros(1, config.context_length, config.d_model))
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = transformer_encoder(config.d_model, config.n_heads, config.n_layers, config.d_ff,
                                           config.dropout)
        self.head = nn.Sequential(nn.Linear(2 * config.d_model, config.d_ff), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(config.d_ff, config.prediction_length * config.n_channels))
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.skip = LinearSkip(config.context_length, config.prediction_length, config.moving_avg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.dropout(self.input_proj(x) + self.sinusoid + self.position)
        encoded = self.encoder(tokens)
        pooled = torch.cat([encoded.mean(dim=1), encoded[:, -1]], dim=1)
        y = self.head(pooled).reshape(-1, self.prediction_length, self.n_channels)
        return y + self.skip(x)

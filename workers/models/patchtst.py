"""PatchTST (Nie et al., 2023, "A Time Series is Worth 64 Words"): channel-independent patch transformer.

Each channel is forecast on its own with shared weights (channels are folded into the batch), its window is
cut into overlapping patches, each patch becomes one token, and a flatten head maps all tokens to the horizon.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from workers.models import PatchedConfig, Patcher, heads_divide, transformer_encoder


class PatchTSTConfig(PatchedConfig):
    """PatchTST hyper-parameters; the defaults are the fleet's small, CPU-friendly size.

    The paper's "reference" size is ``context_length=512, n_channels=7, prediction_length=96, d_model=128,
    n_layers=3, n_heads=4, d_ff=256`` (about 1.2M parameters, most of them in the flatten head).
    """

    d_model: int = Field(32, ge=1)
    n_heads: int = Field(4, ge=1)
    n_layers: int = Field(2, ge=1)
    d_ff: int = Field(64, ge=1)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads(self) -> "PatchTSTConfig":
        heads_divide(self.d_model, self.n_heads)
        return self


class PatchTST(nn.Module):
    """``[B, L, C]`` normalised window -> ``[B, H, C]`` normalised forecast."""

    def __init__(self, config: PatchTSTConfig) -> None:
        super().__init__()
        self.context_length = config.context_length
        self.prediction_length = config.prediction_length
        self.n_channels = config.n_channels
        self.patcher = Patcher(config.context_length, config.patch_len, config.stride)
        n_patches = self.patcher.n_patches
        self.embed = nn.Linear(config.patch_len, config.d_model)
        # Learned positions, initialised small as in the reference implementation.
        self.position = nn.Parameter(torch.empty(1, n_patches, config.d_model).uniform_(-0.02, 0.02))
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = transformer_encoder(config.d_model, config.n_heads, config.n_layers, config.d_ff,
                                           config.dropout)
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(n_patches * config.d_model, config.prediction_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channel independence: [B, L, C] -> [B*C, L]; every channel is a sequence of its own.
        z = x.transpose(1, 2).reshape(-1, self.context_length)
        tokens = self.dropout(self.embed(self.patcher(z)) + self.position)
        encoded = self.encoder(tokens)
        y = self.head(self.head_dropout(encoded.flatten(1)))
        return y.reshape(-1, self.n_channels, self.prediction_length).transpose(1, 2)

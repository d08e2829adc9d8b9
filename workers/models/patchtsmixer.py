"""PatchTSMixer (Ekambaram et al., 2023, "TSMixer"): an all-MLP model over patches.

Each block mixes information across patches (inter-patch, along time), within a patch's hidden features
(intra-patch) and, optionally, across channels, each step with a pre-LayerNorm and a residual. Without channel
mixing the model is channel-independent like PatchTST; with it, channels inform each other's forecasts.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from workers.models import PatchedConfig, Patcher


class PatchTSMixerConfig(PatchedConfig):
    """PatchTSMixer hyper-parameters (defaults: the fleet's small size)."""

    d_model: int = Field(32, ge=1)
    """Hidden size of a patch."""
    n_layers: int = Field(3, ge=1)
    """Mixer blocks."""
    expansion: int = Field(2, ge=1)
    """Hidden width of each mixing MLP, as a multiple of the dimension it mixes."""
    channel_mixing: bool = False
    """Add a channel-mixing MLP to each block (the paper's ``mix_channel`` mode)."""
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class MixerMLP(nn.Module):
    """Two-layer MLP over the last dimension, width ``dim`` -> ``dim * expansion`` -> ``dim``."""

    def __init__(self, dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * expansion), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * expansion, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchMixerBlock(nn.Module):
    """Inter-patch then intra-patch mixing of ``[B, C, N, D]``."""

    def __init__(self, n_patches: int, d_model: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm_time = nn.LayerNorm(d_model)
        self.mix_time = MixerMLP(n_patches, expansion, dropout)
        self.norm_feat = nn.LayerNorm(d_model)
        self.mix_feat = MixerMLP(d_model, expansion, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Inter-patch: the MLP runs along the patch axis, so swap it into the last position and back.
        h = h + self.mix_time(self.norm_time(h).transpose(-1, -2)).transpose(-1, -2)
        return h + self.mix_feat(self.norm_feat(h))


class ChannelMixerBlock(nn.Module):
    """Mixing across channels of ``[B, C, N, D]``."""

    def __init__(self, n_channels: int, d_model: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mix = MixerMLP(n_channels, expansion, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(self.norm(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return h + mixed


class PatchTSMixer(nn.Module):
    """``[B, L, C]`` normalised window -> ``[B, H, C]`` normalised forecast."""

    def __init__(self, config: PatchTSMixerConfig) -> None:
        super().__init__()
        self.context_length = config.context_length
        self.prediction_length = config.prediction_length
        self.n_channels = config.n_channels
        self.patcher = Patcher(config.context_length, config.patch_len, config.stride)
        n_patches = self.patcher.n_patches
        self.n_patches = n_patches
        self.patch_len = config.patch_len
        self.embed = nn.Linear(config.patch_len, config.d_model)
        blocks: list[nn.Module] = []
        for _ in range(config.n_layers):
            blocks.append(PatchMixerBlock(n_patches, config.d_model, config.expansion, config.dropout))
            if config.channel_mixing:
                blocks.append(ChannelMixerBlock(config.n_channels, config.d_model, config.expansion,
                                                config.dropout))
        # NOTE: a Sequential (not a flag checked in forward) keeps the optional part scriptable.
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(config.d_model)
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(n_patches * config.d_model, config.prediction_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.transpose(1, 2).reshape(-1, self.context_length)
        patches = self.patcher(z).reshape(-1, self.n_channels, self.n_patches, self.patch_len)
        h = self.norm(self.blocks(self.embed(patches)))
        y = self.head(self.head_dropout(h.flatten(2)))  # [B, C, H]
        return y.transpose(1, 2)

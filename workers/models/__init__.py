"""The model families the fleet serves, in plain torch, plus the building blocks they share.

Every forecaster maps a *normalised* window ``[B, L, C]`` to ``[B, H, C]`` (``L`` = ``context_length``,
``H`` = ``prediction_length``); normalisation and de-normalisation live in :mod:`workers.models.inference`, so that
every serving runtime (eager, TorchScript, Triton) does them the same way. Every model is written to be both
``torch.jit.trace``-able and ``torch.jit.script``-able: shapes that matter are fixed by the config at
construction time, never read from the input in Python control flow.

Build models through :mod:`workers.models.registry`, which validates their configs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class ForecasterConfig(BaseModel):
    """Fields every forecaster's config has."""

    model_config = ConfigDict(extra="forbid")

    context_length: int = Field(96, ge=2, le=4096)
    """Bars the model reads (``L``)."""
    prediction_length: int = Field(24, ge=1, le=1024)
    """Bars the model predicts in one forward (``H``)."""
    n_channels: int = Field(5, ge=1, le=256)
    """Channels of the series (``C``): open, high, low, close, log-volume for the synthetic bars."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Off by default: training sees thousands of windows for a few seconds, and on CPU drawing dropout masks
    costs about a third of each step."""


class PatchedConfig(ForecasterConfig):
    """A forecaster that cuts each channel into overlapping patches."""

    patch_len: int = Field(16, ge=1)
    stride: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _patch_fits(self) -> "PatchedConfig":
        if self.patch_len > self.context_length:
            raise ValueError(f"patch_len {self.patch_len} is longer than context_length {self.context_length}")
        return self

    @property
    def n_patches(self) -> int:
        return patch_count(self.context_length, self.patch_len, self.stride)


def patch_count(context_length: int, patch_len: int, stride: int) -> int:
    """Patches of a window after the end is padded with ``stride`` copies of its last value (PatchTST)."""
    return (context_length + stride - patch_len) // stride + 1


class Patcher(nn.Module):
    """``[N, L]`` -> ``[N, n_patches, patch_len]``.

    As in the PatchTST paper, the end of the window is padded with ``stride`` copies of the last value so
    that the newest bars get a patch of their own.
    """

    def __init__(self, context_length: int, patch_len: int, stride: int) -> None:
        super().__init__()
        self.patch_len = patch_len
        self.stride = stride
        self.n_patches = patch_count(context_length, patch_len, stride)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([z, z[:, -1:].repeat(1, self.stride)], dim=1)
        return padded.unfold(1, self.patch_len, self.stride)


def heads_divide(d_model: int, n_heads: int) -> None:
    """Raise ``ValueError`` unless attention heads split ``d_model`` evenly (a config validator helper)."""
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} must be a multiple of n_heads {n_heads}")


class EncoderLayer(nn.TransformerEncoderLayer):
    """A pre-norm ``nn.TransformerEncoderLayer`` with one code path in every mode.

    NOTE: PyTorch's layer (and its ``MultiheadAttention``) switch to fused "fast path" kernels in eval mode
    when autograd is off and run the standard path otherwise, whose shape checks turn traced sizes into Python
    values (``TracerWarning``). A trace would then depend on the grad mode it was taken in, and
    ``torch.jit.trace``'s own check (which re-runs the model) fails when the two differ. Attention here is
    ``scaled_dot_product_attention`` on the layer's own projection weights, with every reshape by constants,
    so eager, traced and scripted models compute the same thing. Parameter names are PyTorch's.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__(d_model, n_heads, d_ff, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.attn_dropout = dropout

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        # The masks are in the signature because nn.TransformerEncoder passes them; windows are dense, never masked.
        x = src + self._attend(self.norm1(src))
        return x + self._ff_block(self.norm2(x))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3*D], rows ordered q, k, v
        qkv = qkv.unflatten(-1, [3, self.n_heads, self.head_dim]).permute(2, 0, 3, 1, 4)  # [3, B, H, L, Dh]
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        out = F.linear(out.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)
        return self.dropout1(out)


def transformer_encoder(d_model: int, n_heads: int, n_layers: int, d_ff: int, dropout: float) -> nn.Module:
    """A pre-norm ``nn.TransformerEncoder`` with a final LayerNorm (pre-norm leaves the output unnormalised)."""
    layer = EncoderLayer(d_model, n_heads, d_ff, dropout)
    # NOTE: nested tensors are for padded batches; ours are dense, and norm_first would warn about them.
    return nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)

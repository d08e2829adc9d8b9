"""``SimpleServingAdapter``: eager PyTorch in the worker process."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from shared.settings import FleetSettings
from workers.serving.adapters.local import Forward, LocalTorchAdapter
from workers.store import LoadedArtifacts, ModelStore


class SimpleServingAdapter(LocalTorchAdapter):
    """Runs the stored ``nn.Module`` as it is, in eval mode, on the worker's device."""

    name = "simple"

    def __init__(self, settings: FleetSettings, device: str = "cpu", *, store: ModelStore | None = None,
                 timer: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings, device, max_models=settings.simple.max_models_in_memory,
                         ttl_seconds=settings.simple.model_timeout_seconds, store=store, timer=timer)

    def _materialize(self, artifacts: LoadedArtifacts) -> tuple[Any, Forward]:
        module = artifacts.model  # eval mode, on CPU: the store's contract
        if self.torch_device.type != "cpu":  # NOTE: .to(cpu) is a no-op that still walks every parameter
            module = module.to(self.torch_device)
        device = self.torch_device

        def forward(x: torch.Tensor) -> torch.Tensor:
            return module(x.to(device, non_blocking=True)).to("cpu")

        return module, forward

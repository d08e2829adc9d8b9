"""Serving adapters: one runtime per module, one factory mapping names to classes."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from shared.settings import FleetSettings

if TYPE_CHECKING:
    from workers.adapters.base import ServingAdapter

#: adapter name -> "module:class". Imported on demand so a pool never imports runtimes it does not serve.
ADAPTER_CLASSES: dict[str, str] = {
    "simple": "workers.adapters.simple:SimpleServingAdapter",
    "torchscript": "workers.adapters.torchscript:TorchScriptServingAdapter",
    "triton": "workers.adapters.triton:TritonServingAdapter",
    "torchserve": "workers.adapters.torchserve:TorchServeServingAdapter",
}


def create_adapter(name: str, settings: FleetSettings, device: str = "cpu") -> "ServingAdapter":
    """Build the adapter ``name`` for ``device``. Call inside the worker process, after the fork."""
    target = ADAPTER_CLASSES.get(name)
    if target is None:
        raise ValueError(f"unknown adapter {name!r}; expected one of {', '.join(ADAPTER_CLASSES)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(settings, device)

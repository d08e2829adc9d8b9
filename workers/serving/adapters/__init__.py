"""Serving adapters: one runtime per module, one factory mapping names to classes."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from shared.settings import FleetSettings

if TYPE_CHECKING:
    from workers.serving.adapters.base import ServingAdapter

#: adapter name -> "module:class". Imported on demand so a pool never imports runtimes it does not serve.
ADAPTER_CLASSES: dict[str, str] = {
    "simple": "workers.serving.adapters.simple:SimpleServingAdapter",
    "torchscript": "workers.serving.adapters.torchscript:TorchScriptServingAdapter",
    "triton": "workers.serving.adapters.triton:TritonServingAdapter",
    # NOTE: TorchServe is in limited maintenance upstream: its adapter sits behind the same interface as the
    # others, so a deployment can drop it without touching the API.
    "torchserve": "workers.serving.adapters.torchserve:TorchServeServingAdapter",
}


def create_adapter(name: str, settings: FleetSettings, device: str = "cpu") -> "ServingAdapter":
    """Build the adapter ``name`` for ``device``. Call inside the worker process, after the fork."""
    target = ADAPTER_CLASSES.get(name)
    if target is None:
        from shared.errors import AdapterUnavailableError

        raise AdapterUnavailableError(f"adapter {name!r} is not available in this worker; "
                                      f"available: {', '.join(ADAPTER_CLASSES)}", field="adapter")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(settings, device)

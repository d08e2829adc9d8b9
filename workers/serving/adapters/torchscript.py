"""``TorchScriptServingAdapter``: TorchScript modules in the worker process, compiled once per stored model.

A stored model is compiled (traced with a real example input, or scripted), frozen and optimised for
inference, and saved next to it as ``<model_dir>/<model_id>_torchscript.pt`` with a sidecar JSON holding the
hash of its source; later loads, in any worker process, reuse that artefact while the source is unchanged (see
:mod:`workers.serving.torchscript_convert`). Everything else (the per-process cache, validation, batching,
de-normalisation) is :class:`~workers.serving.adapters.local.LocalTorchAdapter`'s, so forecasts match the simple
adapter's within :data:`workers.serving.torchscript_convert.ATOL` / ``RTOL`` on the normalised outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from shared.settings import FleetSettings
from workers.serving.adapters.local import Forward, LocalTorchAdapter
from workers.models.registry import param_bytes
from workers.store import LoadedArtifacts, ModelStore
from workers.serving.torchscript_convert import (CompileOptions, CompileReport, configure_fusion, ensure_torchscript,
                                         model_id_of, store_artefact_path)


@dataclass
class CompiledModel:
    """A loaded TorchScript module and how it was obtained."""

    module: torch.jit.ScriptModule
    report: CompileReport
    size_bytes: int


def resolve_device(pool_device: str, configured: str) -> str:
    """The pool's device, refined by ``TORCHSCRIPT_DEVICE`` when that names the same kind (``cuda:1``)."""
    return configured if torch.device(configured).type == torch.device(pool_device).type else pool_device


class TorchScriptServingAdapter(LocalTorchAdapter):
    """Runs compiled TorchScript modules on the worker's device, sharing the in-process cache machinery."""

    name = "torchscript"

    def __init__(self, settings: FleetSettings, device: str = "cpu", *, store: ModelStore | None = None,
                 timer: Callable[[], float] = time.monotonic) -> None:
        ts = settings.torchscript
        super().__init__(settings, resolve_device(device, ts.device), max_models=ts.max_models_in_memory,
                         ttl_seconds=ts.model_timeout_seconds, store=store, timer=timer)
        self.options = CompileOptions(mode=ts.compile_mode, optimize=ts.optimize_for_inference,
                                      device=str(self.torch_device))
        self.fusion = configure_fusion(ts.enable_fusion, str(self.torch_device))

    def _materialize(self, artifacts: LoadedArtifacts) -> tuple[Any, Forward]:
        model_id = model_id_of(artifacts)
        artefact = store_artefact_path(artifacts.path, model_id, str(self.torch_device))
        module, report = ensure_torchscript(artifacts, model_id, artefact, self.options)
        device = self.torch_device

        def forward(x: torch.Tensor) -> torch.Tensor:
            return module(x.to(device, non_blocking=True)).to("cpu")

        # NOTE: a frozen module holds its weights as graph constants, not parameters: size it by the source's.
        return CompiledModel(module, report, param_bytes(artifacts.model)), forward

    def _size_bytes(self, handle: Any, artifacts: LoadedArtifacts) -> int:
        return handle.size_bytes

    def _load_metadata(self, handle: Any) -> dict[str, Any]:
        return {"torchscript": {**handle.report.as_metadata(), "fusion": self.fusion}}

    def health_check(self) -> dict[str, Any]:
        return {**super().health_check(), "compile_mode": self.options.mode, "optimize": self.options.optimize,
                "fusion": self.fusion}


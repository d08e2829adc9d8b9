"""Compile stored models to TorchScript, and keep the compiled artefact next to its source while unchanged.

An artefact is a TorchScript archive (``torch.jit.save``: code and constants, no pickled Python objects) with
two copies of its provenance: one inside the archive (an extra file, read back by ``torch.jit.load``) and one
in a sidecar JSON next to it, for people and tools. The provenance holds the *source hash*: sha256 over the
stored weights, the config, the compile options that change the artefact and the torch version. A later load
reuses the artefact only when the hash it carries is the hash of the source now; anything else (new weights,
another compile mode, a torch upgrade, a corrupt or half-written file) compiles again.

Several worker processes may compile the same model at once: each writes a temporary file in the target
directory and renames it into place (``os.replace``), so readers see a whole old artefact or a whole new one.
The hash is checked inside the archive itself, so even a sidecar from another writer cannot make a stale
archive look fresh.

Equivalence with eager PyTorch (checked after every compilation, and tested for every model type): on the
model's own outputs (normalised forecasts, sentiment logits) ``|compiled - eager| <= ATOL + RTOL * |eager|``.
Freezing and ``optimize_for_inference`` fold and fuse ops (measured: at most ~2e-7 here), far below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from shared import store_layout
from shared.errors import ModelLoadError
from shared.schemas import ModelKey, ModelType
from workers.serving.fileio import atomic_write
from workers.serving.examples import example_inputs
from workers.store import LoadedArtifacts

log = logging.getLogger(__name__)

#: Tolerance of compiled vs eager outputs (normalised forecasts, logits); see the module docstring.
ATOL = 1e-4
RTOL = 1e-4
#: Bump when the conversion itself changes, so that artefacts made by older code are not reused.
CONVERTER_VERSION = 1
#: Suffix of the artefact in a model's version directory: ``<model_dir>/<model_id>_torchscript.pt``.
ARTEFACT_SUFFIX = "_torchscript.pt"
#: Name of the provenance file stored inside the archive.
PROVENANCE = "fleet_provenance.json"

# NOTE: tracing and the warning filters below are process-global; one compilation at a time per process.
_compile_lock = threading.Lock()


@dataclass(frozen=True)
class CompileOptions:
    """What changes the compiled artefact (and so its hash)."""

    mode: Literal["trace", "script"] = "trace"
    """``trace`` runs a real example input through the model; ``script`` compiles its source."""
    optimize: bool = True
    """``torch.jit.freeze`` + ``torch.jit.optimize_for_inference`` (device-specific: part of the hash)."""
    device: str = "cpu"
    """Torch device the module is compiled and frozen on."""

    def fingerprint(self) -> dict[str, Any]:
        return {"mode": self.mode, "optimize": self.optimize, "device_type": torch.device(self.device).type,
                "converter": CONVERTER_VERSION, "torch": torch.__version__}


@dataclass
class CompileReport:
    """How a model's TorchScript module was obtained; goes into ``ModelInfo.metadata["torchscript"]``."""

    path: str
    source_hash: str
    reused: bool
    compile_ms: float
    """Time spent compiling, checking and saving (0 when the artefact was reused)."""
    load_ms: float
    """Time spent in ``torch.jit.load`` (0 when freshly compiled)."""
    saved: bool
    mode: str
    optimize: bool

    def as_metadata(self) -> dict[str, Any]:
        return asdict(self)


def store_artefact_path(model_dir: Path | str, model_id: str, device: str = "cpu") -> Path:
    """Where the TorchScript adapter keeps a stored model's artefact.

    CPU artefacts use the documented name ``<model_id>_torchscript.pt``; other devices get the device type in the
    name (``<model_id>_torchscript.cuda.pt``), so that a CPU pool and a GPU pool sharing a store do not
    overwrite each other's artefact (frozen modules are device-specific).
    """
    kind = str(device).split(":", 1)[0]
    suffix = ARTEFACT_SUFFIX if kind == "cpu" else ARTEFACT_SUFFIX.replace(".pt", f".{kind}.pt")
    return Path(model_dir) / f"{model_id}{suffix}"


def model_id_of(artifacts: LoadedArtifacts) -> str:
    """The fleet's id of a stored model: from its meta, else from the store layout ``<sym>/<tf>/<type>/<v>``."""
    stored = artifacts.meta.get("model_id")
    if stored:
        return str(stored)
    parts = artifacts.path.parts
    return f"{parts[-4]}_{parts[-3]}_{parts[-2]}"


def sidecar_path(artefact: Path) -> Path:
    return artefact.with_suffix(".json")


def source_hash(model_dir: Path | str, config: dict[str, Any], options: CompileOptions) -> str:
    """sha256 of the weights, the stored and effective configs, the compile options and the torch version."""
    directory = Path(model_dir)
    digest = hashlib.sha256()
    for name in (store_layout.WEIGHTS_FILE, store_layout.CONFIG_FILE):
        digest.update(name.encode() + b"\0")
        with open(directory / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    # The effective config may differ from config.json (a load job's overrides): it shapes the module too.
    digest.update(b"effective\0" + json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(b"options\0" + json.dumps(options.fingerprint(), sort_keys=True).encode())
    return digest.hexdigest()


def compile_module(model: nn.Module, model_type: ModelType | str, config: dict[str, Any],
                   options: CompileOptions) -> torch.jit.ScriptModule:
    """TorchScript of ``model`` (eval mode) on ``options.device``, frozen and optimised when asked."""
    device = torch.device(options.device)
    model = model.to(device).eval()
    with _compile_lock, warnings.catch_warnings():
        # torch 2.x marks TorchScript deprecated and the tracer warns about Python control flow it folds (the
        # transformer's fast-path checks, constant for inference): expected here, noise in worker logs.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*was found in ScriptModule constants", category=UserWarning)
        with torch.no_grad():
            if options.mode == "trace":
                example = example_inputs(model_type, config, batch=2).to(device)
                # NOTE: check_trace re-runs the model; check_equivalence below does more (another batch size).
                module = torch.jit.trace(model, example, check_trace=False)
            elif options.mode == "script":
                module = torch.jit.script(model)
            else:
                raise ModelLoadError(f"unknown TorchScript compile mode {options.mode!r}")
            module = module.eval()
            if options.optimize:
                module = torch.jit.optimize_for_inference(torch.jit.freeze(module))
    return module


def check_equivalence(model: nn.Module, module: torch.jit.ScriptModule, model_type: ModelType | str,
                      config: dict[str, Any], device: str) -> float:
    """Max |compiled - eager| on a real input of another batch size than the trace's; raises beyond tolerance."""
    x = example_inputs(model_type, config, batch=3).to(device)
    with torch.inference_mode():
        want = model.to(device).eval()(x).float().cpu()
        got = module(x).float().cpu()
    if got.shape != want.shape:
        raise ModelLoadError(f"compiled module returns shape {tuple(got.shape)}, eager {tuple(want.shape)}")
    diff = (got - want).abs()
    if not bool((diff <= ATOL + RTOL * want.abs()).all()):
        raise ModelLoadError(f"compiled module differs from eager by {float(diff.max()):.3g} "
                             f"(tolerance {ATOL} + {RTOL} x |value|)")
    return float(diff.max())


def _read_sidecar(artefact: Path) -> dict[str, Any]:
    try:
        return json.loads(sidecar_path(artefact).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def save_artefact(module: torch.jit.ScriptModule, artefact: Path, provenance: dict[str, Any]) -> None:
    """Write the archive (provenance inside) and its sidecar, each atomically."""
    blob = json.dumps(provenance, sort_keys=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        atomic_write(artefact, lambda tmp: torch.jit.save(module, tmp, _extra_files={PROVENANCE: blob}))
    atomic_write(sidecar_path(artefact), lambda tmp: Path(tmp).write_text(blob + "\n", encoding="utf-8"))


def load_artefact(artefact: Path, map_location: str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """``torch.jit.load`` the archive and return it with the provenance stored inside it."""
    extra = {PROVENANCE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        module = torch.jit.load(str(artefact), map_location=map_location, _extra_files=extra)
    raw = extra[PROVENANCE]
    provenance = json.loads(raw.decode() if isinstance(raw, bytes) else raw or "{}")
    return module.eval(), provenance


def ensure_torchscript(artifacts: LoadedArtifacts, model_id: str, artefact: Path,
                       options: CompileOptions) -> tuple[torch.jit.ScriptModule, CompileReport]:
    """The TorchScript module of a stored model: the artefact at ``artefact`` when it is current, else compiled.

    A fresh compilation is checked against eager PyTorch (:func:`check_equivalence`) and saved at
    ``artefact``; a directory that cannot be written (a read-only store) only costs the reuse next time.
    """
    model_type = artifacts.config.get("model_type") or ModelKey.parse(model_id).model_type.value
    config = {k: v for k, v in artifacts.config.items() if k != "model_type"}
    expected = source_hash(artifacts.path, artifacts.config, options)
    if artefact.is_file() and _read_sidecar(artefact).get("source_hash") == expected:
        started = time.perf_counter()
        try:
            module, provenance = load_artefact(artefact, options.device)
        except Exception as exc:  # a corrupt archive: compile a new one
            log.warning("TorchScript artefact %s is unreadable (%s); recompiling", artefact, exc)
        else:
            if provenance.get("source_hash") == expected:
                load_ms = (time.perf_counter() - started) * 1000
                log.info("reusing TorchScript artefact %s for %s (%.1f ms)", artefact, model_id, load_ms)
                return module, CompileReport(str(artefact), expected, True, 0.0, round(load_ms, 3), False,
                                             options.mode, options.optimize)
            log.info("TorchScript artefact %s was replaced by another source; recompiling", artefact)
    log.info("compiling %s to TorchScript (%s%s) -> %s", model_id, options.mode,
             ", frozen + optimised" if options.optimize else "", artefact)
    started = time.perf_counter()
    module = compile_module(artifacts.model, model_type, config, options)
    max_diff = check_equivalence(artifacts.model, module, model_type, config, options.device)
    provenance = {"source_hash": expected, "model_id": model_id, "source": str(artifacts.path),
                  "max_abs_diff_vs_eager": max_diff, "compiled_at": time.time(), **options.fingerprint()}
    saved = True
    try:
        artefact.parent.mkdir(parents=True, exist_ok=True)
        save_artefact(module, artefact, provenance)
    except OSError as exc:
        saved = False
        log.warning("could not save TorchScript artefact %s (%s); it will be compiled again next load",
                    artefact, exc)
    compile_ms = (time.perf_counter() - started) * 1000
    log.info("compiled %s in %.1f ms (max |diff| vs eager %.2g)", model_id, compile_ms, max_diff)
    return module, CompileReport(str(artefact), expected, False, round(compile_ms, 3), 0.0, saved,
                                 options.mode, options.optimize)


def configure_fusion(enabled: bool, device: str) -> bool:
    """Turn the TorchScript fuser on or off for this process; returns whether fusion is effectively on.

    On CPU the tensor-expression fuser needs LLVM, which the CPU wheels lack: without it fusing on CPU would
    run an interpreter, slower than not fusing, so CPU fusion is only enabled where LLVM is built in.
    """
    torch._C._jit_set_texpr_fuser_enabled(enabled)
    on_cpu = torch.device(device).type == "cpu"
    cpu_ok = enabled and on_cpu and torch._C._llvm_enabled()
    torch._C._jit_override_can_fuse_on_cpu(cpu_ok)
    return enabled and (not on_cpu or cpu_ok)

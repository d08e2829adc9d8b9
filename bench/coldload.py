"""``python -m bench coldload``: cold-load time of a small and a reference model of every type, old path vs new.

A cold load is one cache miss as a worker meets it: from the version directory on disk to the result of the
model's first forward, through :class:`~workers.serving.adapters.simple.SimpleServingAdapter`'s real
``load_model`` and ``predict`` (a fresh adapter, so a fresh cache, for every load). Four ways, interleaved
load by load so that a noisy neighbour weighs on all of them alike:

* ``old``: the load path before issue 13, kept here only (:class:`LegacyStore`): the weights hashed on every
  load, the module constructed (every initialiser runs) and the stored weights copied into it.
* ``new``: today's path for a file this process has not met: hashed once, the module cloned from the warm
  template of its architecture, the weights memory-mapped (a fresh :class:`~workers.store.ModelStore` per load,
  so nothing about the file is remembered).
* ``reload``: today's path for a file the store has already checked (a model evicted and loaded again).
* ``first``: today's path for the first model of its architecture in the process (templates cleared first).

Beside them, each stage of a load timed one by one (:func:`stages`: config read, sha256, validation, the
safetensors read, the old build and the new one, the first forward) shows where the time goes. Weights are
random-init (seeded): loading does not depend on what the weights learnt.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.models import REFERENCE, SMALL, TIMEFRAME
from bench.stats import percentile

PATHS = ("old", "new", "reload", "first")
#: The small and reference size of each type. Forecasters share the PatchTST benchmark models' shapes (96 x 5
#: -> 24 small, the paper's 512 x 7 -> 96 reference); sentiment: the defaults with a vocabulary of the shipped
#: headlines' size (small) and one at the trainer's vocabulary cap of 20,000 words with wider embeddings.
_SMALL_SHAPE = {k: SMALL.config[k] for k in ("context_length", "n_channels", "prediction_length")}
_REF_SHAPE = {k: REFERENCE.config[k] for k in ("context_length", "n_channels", "prediction_length")}
SIZES: dict[tuple[str, str], dict[str, Any]] = {
    ("patchtst", "small"): dict(SMALL.config),
    ("patchtst", "ref"): dict(REFERENCE.config),
    ("patchtsmixer", "small"): {**_SMALL_SHAPE, "patch_len": 16, "stride": 8, "d_model": 32, "n_layers": 3},
    ("patchtsmixer", "ref"): {**_REF_SHAPE, "patch_len": 16, "stride": 8, "d_model": 128, "n_layers": 3,
                              "expansion": 2},
    ("enhanced_transformer", "small"): {**_SMALL_SHAPE, "d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64},
    ("enhanced_transformer", "ref"): {**_REF_SHAPE, "d_model": 128, "n_heads": 4, "n_layers": 3, "d_ff": 256},
    ("sentiment", "small"): {"vocab_words": 1000},
    ("sentiment", "ref"): {"vocab_words": 20000, "embed_dim": 64, "hidden_dim": 64, "n_buckets": 16384},
}
HEADLINE = "Shares jump after quarterly earnings beat analyst estimates"


def _legacy_classes() -> tuple[type, type]:
    """The store and adapter of the load path before issue 13 (imports torch, so built on demand)."""
    from safetensors.torch import load_file

    from workers.models.registry import MODEL_CLASSES
    from workers.serving.adapters.simple import SimpleServingAdapter
    from workers.store import ModelStore, file_sha256
    from shared.errors import ModelLoadError
    from shared.schemas import ModelType

    class LegacyStore(ModelStore):
        """Hashes the weights on every load; constructs the module and copies the stored weights into it."""

        def _verify(self, weights: Path, expected: str) -> None:
            if file_sha256(weights) != expected:
                raise ModelLoadError(f"{weights} does not match the sha256 recorded in meta.json")

        def _restore(self, model_type: str, typed: Any, weights: Path) -> Any:
            model = MODEL_CLASSES[ModelType(model_type)](typed).eval()
            model.load_state_dict(load_file(str(weights)), strict=True)
            return model.eval()

    class LegacyAdapter(SimpleServingAdapter):
        def _materialize(self, artifacts: Any) -> Any:
            artifacts.model = artifacts.model.to(self.torch_device).eval()
            return super()._materialize(artifacts)

    return LegacyStore, LegacyAdapter


@dataclass
class Subject:
    """One stored model to load: its type, size name, version directory and first-forward input."""

    model_type: str
    size: str
    path: Path
    symbol: str
    inputs: Any
    n_params: int
    weights_bytes: int


def _symbol(size: str) -> str:
    return f"COLD{size.upper()}"


def build_models(store_dir: Path) -> list[Path]:
    """Save the small and reference model of every type (seeded random init) into a store; their directories."""
    import torch

    from shared.schemas import ModelKey
    from workers.models.registry import build_model, validate_config
    from workers.store import ModelStore

    store = ModelStore(store_dir)
    out = []
    for seed, ((model_type, size), spec) in enumerate(SIZES.items()):
        spec = dict(spec)
        if "vocab_words" in spec:
            spec["vocab"] = [f"word{i}" for i in range(spec.pop("vocab_words"))]
        config = validate_config(model_type, spec).model_dump()  # NOTE: every field stored, defaults too
        torch.manual_seed(seed)
        key = ModelKey(symbol=_symbol(size), timeframe=TIMEFRAME, model_type=model_type)
        _, path = store.save(key, build_model(model_type, config), config,
                             {"seed": seed, "note": "random-init cold-load benchmark weights"})
        out.append(path)
    return out


def _subject(store_dir: Path, path: Path) -> Subject:
    from workers.store import ModelStore

    artifacts = ModelStore(store_dir).load_from_path(path)
    config = artifacts.config
    model_type = config["model_type"]
    if model_type == "sentiment":
        inputs: Any = [HEADLINE]
    else:
        rng = np.random.default_rng(0)
        inputs = 100 + rng.normal(size=(int(config["context_length"]), int(config["n_channels"]))).cumsum(axis=0)
    symbol = artifacts.path.parts[-4]
    size = {_symbol(s): s for s in ("small", "ref")}.get(symbol, symbol)
    return Subject(model_type, size, artifacts.path, symbol, inputs,
                   sum(p.numel() for p in artifacts.model.parameters()),
                   (artifacts.path / "weights.safetensors").stat().st_size)


def _cold_load(make_adapter: Callable[[], Any], subject: Subject) -> float:
    """Milliseconds from ``load_model`` on a fresh adapter to the first prediction's result."""
    adapter = make_adapter()
    started = time.perf_counter()
    info = adapter.load_model(subject.path, subject.symbol, TIMEFRAME, subject.model_type)
    adapter.predict(info.model_id, subject.inputs)
    elapsed = (time.perf_counter() - started) * 1000
    adapter.close()
    return elapsed


#: The stages of a load, timed one by one outside the adapter (:func:`stages`); ``construct`` and
#: ``load_state_dict`` are the old path's build, ``clone`` the new one's.
STAGES = ("read_json", "sha256", "validate", "load_file", "construct", "load_state_dict", "clone", "forward")


def stages(subject: Subject, repeats: int) -> dict[str, float]:
    """Median milliseconds of each stage of loading ``subject`` (see :data:`STAGES`), after one warm-up."""
    import torch
    from safetensors.torch import load_file

    from shared import store_layout
    from shared.schemas import ModelType
    from workers.models import templates
    from workers.models.registry import MODEL_CLASSES, validate_config
    from workers.serving.examples import example_inputs
    from workers.store import file_sha256

    weights = subject.path / store_layout.WEIGHTS_FILE
    config = store_layout.read_json(subject.path / store_layout.CONFIG_FILE)
    x = example_inputs(subject.model_type, config, batch=1)
    samples: dict[str, list[float]] = {name: [] for name in STAGES}
    for i in range(repeats + 1):
        marks = [time.perf_counter()]
        config = store_layout.read_json(subject.path / store_layout.CONFIG_FILE)
        store_layout.read_json(subject.path / store_layout.META_FILE)
        marks.append(time.perf_counter())
        file_sha256(weights)
        marks.append(time.perf_counter())
        typed = validate_config(subject.model_type, config)
        marks.append(time.perf_counter())
        state = load_file(str(weights))
        marks.append(time.perf_counter())
        old = MODEL_CLASSES[ModelType(subject.model_type)](typed).eval()
        marks.append(time.perf_counter())
        old.load_state_dict(state, strict=True)
        marks.append(time.perf_counter())
        new = templates.restore(subject.model_type, typed, state)
        marks.append(time.perf_counter())
        with torch.inference_mode():
            new(x)
        marks.append(time.perf_counter())
        if i:
            for name, lo, hi in zip(STAGES, marks, marks[1:]):
                samples[name].append((hi - lo) * 1000)
    return {name: round(statistics.median(v), 3) for name, v in samples.items()}


def _summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(samples, 50), 3), "p99_ms": round(percentile(samples, 99), 3),
            "mean_ms": round(statistics.fmean(samples), 3), "n": len(samples)}


def measure(store_dir: Path, model_dirs: list[Path] | None = None, repeats: int = 50) -> dict:
    """Cold-load each model ``repeats`` times per path (``old``, ``new``, ``reload``, ``first``), interleaved.

    Args:
        store_dir: the model store; when ``model_dirs`` is None the small and reference model of every type are
            saved into it first.
        model_dirs: version directories inside the store to measure.
        repeats: loads per model and path (after one unmeasured warm-up load of each).

    Returns:
        ``{"models": [{model_type, size, n_params, weights_bytes, <path>: {p50_ms, p99_ms, mean_ms, n}}],
        "torch_threads", "repeats", "target"}``.
    """
    import torch

    from shared.settings import FleetSettings
    from workers.models import templates
    from workers.serving.adapters.simple import SimpleServingAdapter
    from workers.store import ModelStore

    store_dir = Path(store_dir)
    dirs = model_dirs if model_dirs is not None else build_models(store_dir)
    settings = FleetSettings(model_store_dir=store_dir)
    legacy_store_cls, legacy_adapter_cls = _legacy_classes()
    legacy_store, shared_store = legacy_store_cls(store_dir), ModelStore(store_dir)

    def first() -> Any:
        templates.clear()
        return SimpleServingAdapter(settings, store=ModelStore(store_dir))

    makers: dict[str, Callable[[], Any]] = {
        "old": lambda: legacy_adapter_cls(settings, store=legacy_store),
        "new": lambda: SimpleServingAdapter(settings, store=ModelStore(store_dir)),
        "reload": lambda: SimpleServingAdapter(settings, store=shared_store),
        "first": first,
    }
    models = []
    for path in dirs:
        subject = _subject(store_dir, path)
        for make in makers.values():  # warm-up: the process's first forward of a shape, the store's first check
            _cold_load(make, subject)
        samples: dict[str, list[float]] = {name: [] for name in PATHS}
        for _ in range(repeats):
            for name in PATHS:
                samples[name].append(_cold_load(makers[name], subject))
        row = {"model_type": subject.model_type, "size": subject.size, "n_params": subject.n_params,
               "weights_bytes": subject.weights_bytes, **{name: _summary(s) for name, s in samples.items()}}
        row["speedup_p50"] = round(row["old"]["p50_ms"] / row["new"]["p50_ms"], 2)
        row["stages_ms"] = stages(subject, repeats)
        models.append(row)
    small = next((m for m in models if m["model_type"] == "patchtst" and m["size"] == "small"), None)
    target = None
    if small is not None:
        target = {"what": "cold load of the small model (PatchTST 96 x 5 -> 24), new path, p50 <= 10 ms",
                  "measured_ms": small["new"]["p50_ms"], "met": small["new"]["p50_ms"] <= 10.0}
    return {"models": models, "repeats": repeats, "torch_threads": torch.get_num_threads(), "target": target}


def render(result: dict) -> str:
    """The markdown report of a :func:`measure` result (plus ``machine`` and ``date`` when present)."""
    lines = [f"# Cold loads, {result.get('date', '')}", "",
             "From the version directory on disk to the first forward's result, through the simple adapter's "
             "`load_model` + `predict` (a fresh adapter and cache each load), "
             f"{result['repeats']} loads per model and path after one warm-up, interleaved; "
             f"{result['torch_threads']} torch thread(s). Command: `python -m bench coldload`.", "",
             "- **old**: before issue 13: weights hashed every load, module constructed (initialisers run), "
             "weights copied in.",
             "- **new**: a file the process has not met: hashed once, module cloned from the warm template of its "
             "architecture, weights memory-mapped.",
             "- **reload**: a file the store has already checked (a model evicted and loaded again).",
             "- **first**: the first model of its architecture in the process (the template is built).", "",
             f"A p99 of {result['repeats']} loads is the worst load or two: on a machine shared with other work a "
             "single garbage collection or a neighbour's burst sets it; compare the p50s.", "",
             "| model | size | params | old p50 / p99 ms | new p50 / p99 ms | reload p50 / p99 ms "
             "| first p50 / p99 ms | old / new (p50) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        cells = " | ".join(f"{m[p]['p50_ms']:.2f} / {m[p]['p99_ms']:.2f}" for p in PATHS)
        lines.append(f"| {m['model_type']} | {m['size']} | {m['n_params']:,} | {cells} | {m['speedup_p50']:.1f}x |")
    lines += ["", "Where the time goes: median ms of each stage, timed one by one outside the adapter (`construct` "
                  "runs every initialiser and `load_state_dict` copies the weights in: the old build; `clone` is the "
                  "new one; `forward` is the first forward of the new model, batch 1).", "",
              "| model | size | " + " | ".join(STAGES) + " |", "|---|---|" + "---:|" * len(STAGES)]
    for m in result["models"]:
        if "stages_ms" in m:
            lines.append(f"| {m['model_type']} | {m['size']} | "
                         + " | ".join(f"{m['stages_ms'][name]:.2f}" for name in STAGES) + " |")
    target = result.get("target")
    if target:
        lines += ["", f"Target: {target['what']}: {target['measured_ms']:.2f} ms, "
                      f"{'met' if target['met'] else 'missed'}."]
    machine = result.get("machine")
    if machine:
        lines += ["", f"Machine: {machine.get('cpu')} x {machine.get('cpu_count')}, torch {machine.get('torch')}, "
                      f"Python {machine.get('python')}, commit {machine.get('commit')}"
                      f"{' (uncommitted changes)' if machine.get('dirty') else ''}, load average at start "
                      f"{', '.join(f'{x:.2f}' for x in machine.get('loadavg_start', ()))}."]
    return "\n".join(lines) + "\n"


def run(out_dir: Path, repeats: int = 50, threads: int = 1) -> dict[str, Path]:
    """Measure in a temporary store and write ``<date>-coldload.md`` and ``.json`` under ``out_dir``."""
    import torch

    from bench.host import machine

    torch.set_num_threads(threads)  # NOTE: as a worker process sets it, after the fork, before any model
    with tempfile.TemporaryDirectory(prefix="coldload-") as tmp:
        result = measure(Path(tmp) / "store", repeats=repeats)
    result["machine"], result["date"] = machine(), date.today().isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{result['date']}-coldload.md", out_dir / f"{result['date']}-coldload.json"
    md.write_text(render(result), encoding="utf-8")
    js.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"md": md, "json": js}

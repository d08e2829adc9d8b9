"""The many-models workload: a store of small random-init forecasters, a Zipf request trace over them, and the
ideal a cache could reach on that trace.

The models are the benchmark's small PatchTST (``bench.models.SMALL``: 96 x 5 -> 24), one architecture built once
and saved under ``MM0000 .. MM0999`` with weights drawn from per-model seeds: every model is a distinct file the
fleet loads with its real code, written in seconds (serving is measured, not accuracy).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.models import SMALL, TIMEFRAME

MODEL_TYPE = "patchtst"


def model_key(index: int) -> dict[str, str]:
    """The store key of model ``index`` (the fleet's ``symbol`` / ``timeframe`` / ``model_type``)."""
    return {"symbol": f"MM{index:04d}", "timeframe": TIMEFRAME, "model_type": MODEL_TYPE}


def model_id(index: int) -> str:
    return f"MM{index:04d}_{TIMEFRAME}_{MODEL_TYPE}"


def write_store(store_dir: Path, n_models: int, seed: int = 0) -> dict[str, Any]:
    """Save ``n_models`` small models (one architecture, per-model seeded weights); returns what it took."""
    import torch

    from shared.schemas import ModelKey
    from workers.models.registry import build_model
    from workers.store import ModelStore

    started = time.perf_counter()
    store = ModelStore(store_dir)
    torch.manual_seed(seed)
    module = build_model(MODEL_TYPE, dict(SMALL.config))
    params = list(module.parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index in range(n_models):
            for p in params:  # a distinct model per index: fresh weights, same shapes
                p.normal_(0.0, 0.05, generator=generator)
            store.save(ModelKey(**model_key(index)), module, dict(SMALL.config),
                       {"seed": seed, "index": index, "note": "random-init many-models benchmark weights"})
    return {"models": n_models, "seconds": time.perf_counter() - started}


def zipf_trace(n_models: int, n_requests: int, s: float, seed: int = 0) -> np.ndarray:
    """Model indices of ``n_requests`` requests, Zipf(``s``) over ``n_models`` (rank r has weight r^-s); which
    model has which rank is shuffled, so popularity has nothing to do with the index."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_models + 1) ** s
    ranks = rng.choice(n_models, size=n_requests, p=weights / weights.sum())
    return rng.permutation(n_models)[ranks]


def ideal_lru(trace: Sequence[int], capacity: int) -> dict[str, float]:
    """One LRU cache of ``capacity`` models fed the whole trace: the bound on a fleet's hit ratio with that many
    model slots in all (``d`` in the report)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for model in trace:
        if model in cache:
            hits += 1
            cache.move_to_end(model)
            continue
        cache[model] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    n = max(1, len(trace))
    return {"hit_ratio": hits / n, "loads_per_1000": 1000.0 * (n - hits) / n}


def sample_series(n: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Inputs of the small model's shape (every model takes the same shape)."""
    from bench.models import sample_series as small_series

    return small_series(SMALL, n=n, seed=seed)

"""The TorchServe handler of the benchmark: a function entry point over the same :class:`Forecaster`.

TorchServe calls ``handle(None, context)`` once to initialise, then ``handle(batch, context)`` with up to
``batch_size`` requests gathered within ``max_batch_delay``; each request body is the series as raw
little-endian float32 bytes, each answer the forecast the same way. Settings come from ``bench_model.json``
in the archive (``repo_root``, ``store_dir``, ``symbol``, ``threads``).
"""

import json
import os
import sys

import numpy as np

_forecaster = None


def _initialise(context):
    model_dir = context.system_properties["model_dir"]
    with open(os.path.join(model_dir, "bench_model.json")) as fh:
        cfg = json.load(fh)
    if cfg["repo_root"] not in sys.path:
        sys.path.insert(0, cfg["repo_root"])
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    from bench.systems.forecaster import Forecaster

    return Forecaster(cfg["store_dir"], cfg["symbol"], int(cfg["threads"]))


def handle(data, context):
    global _forecaster
    if _forecaster is None:
        _forecaster = _initialise(context)
    if data is None:
        return None
    series = []
    for row in data:
        body = row.get("body") or row.get("data")
        series.append(np.frombuffer(bytes(body), dtype="<f4").reshape(_forecaster.shape))
    return [out.astype("<f4").tobytes() for out in _forecaster.predict_batch(series)]

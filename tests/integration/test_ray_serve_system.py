"""The many-models benchmark's Ray Serve system: multiplexed replicas serve the store's models as the fleet does."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")
aiohttp = pytest.importorskip("aiohttp")

from bench.manymodels.ray_serve import RayMultiplex, RayServeRequestError, make_body  # noqa: E402
from bench.models import SMALL, sample_series  # noqa: E402

pytestmark = pytest.mark.timeout(180)
SYMBOLS = ("RSA", "RSB", "RSC")


def _write_models(root: Path) -> list[str]:
    import torch

    from shared.schemas import ModelKey
    from workers.models.registry import build_model
    from workers.store import ModelStore

    store = ModelStore(root)
    ids = []
    for seed, symbol in enumerate(SYMBOLS):
        torch.manual_seed(seed)
        key = ModelKey(symbol=symbol, timeframe="1h", model_type="patchtst")
        store.save(key, build_model("patchtst", SMALL.config), dict(SMALL.config), {"seed": seed})
        ids.append(key.model_id)
    return ids


def _in_process(root: Path, model_id: str, series: np.ndarray) -> np.ndarray:
    """The fleet's own path: store load, float32 series, prepare_series, one forward, de-normalisation."""
    from shared.schemas import ModelKey
    from workers.models import inference
    from workers.store import ModelStore

    loaded = ModelStore(root).load(ModelKey.parse(model_id))
    prepared = inference.prepare_series(np.asarray(series, dtype=np.float32), loaded.config)
    (forecast,) = inference.run_forecast(loaded.model.eval(), [prepared], int(loaded.config["prediction_length"]),
                                         loaded.config)
    return forecast


def _ray_pids_under(path: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", str(path)], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_multiplexed_replica_serves_evicts_and_counts(tmp_path: Path) -> None:
    ids = _write_models(tmp_path / "store")
    series = sample_series(SMALL, 1)[0]
    system = RayMultiplex(tmp_path / "store", replicas=1, max_models_per_replica=2)
    order = [ids[0], ids[1], ids[2], ids[0]]  # the third load evicts ids[0], which then loads again

    async def drive() -> list[dict]:
        async with aiohttp.ClientSession() as session:
            answers = [await system.forecast(session, model_id, make_body(series)) for model_id in order]
            await system.predict(session, ids[0], make_body(series))  # a hit
            with pytest.raises(RayServeRequestError) as missing:
                # NOTE: Serve evicts its LRU model (ids[2]) before trying the load, which fails: ids[0] stays
                await system.predict(session, "NOPE_1h_patchtst", make_body(series))
            assert missing.value.status == 404
            with pytest.raises(RayServeRequestError) as short:
                await system.predict(session, ids[0], make_body(series[:10]))
            assert short.value.status == 422
            return answers

    try:
        system.start()
        workdir, pids = system.workdir, system.server_pids()
        assert workdir is not None and pids
        answers = asyncio.run(drive())
        stats = system.stats()
    finally:
        system.stop()

    for model_id, answer in zip(order, answers):
        assert answer["model_id"] == model_id
        np.testing.assert_allclose(np.asarray(answer["predictions"]), _in_process(tmp_path / "store", model_id, series),
                                   rtol=1e-5, atol=1e-6)
    assert system.stats()["total"]["requests"] == stats["total"]["requests"]  # the last counts survive stop()
    total = stats["total"]
    assert len(stats["replicas"]) == 1
    (replica,) = stats["replicas"].values()
    assert replica["loaded_models"] == order  # every request of `order` was a cold load, the fifth a hit
    assert total["requests"] == 7 and total["errors"] == 2
    assert total["loads"] == 4 and len(total["load_ms"]) == 4 and total["load_ms_p50"] > 0
    # Ray went down by itself: nothing needed a SIGKILL and nothing it started is left
    assert system.leftover == []
    assert _ray_pids_under(workdir) == []
    import psutil

    assert [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []

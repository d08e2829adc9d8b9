"""A real ``fleet worker --adapter torchscript`` pool: compile once, reuse the artefact, agree with eager."""

from __future__ import annotations

import pytest

from shared import tasks
from shared.schemas import ModelKey
from shared.settings import FleetSettings
from workers.serving.adapters.simple import SimpleServingAdapter
from workers.store import ModelStore
from workers.serving.torchscript_convert import sidecar_path, store_artefact_path
from tests.integration.compare import assert_same_prediction, inputs_for
from tests.integration.conftest import send

TIMEOUT = 120
TYPES = ["patchtst", "patchtsmixer", "enhanced_transformer", "sentiment"]


@pytest.fixture()
def clean_artefacts(model_store) -> None:
    """Start from no artefacts: another test of the session may have compiled these models already."""
    store = ModelStore(model_store)
    for version_dir in store.root.glob("MSFT/1h/*/*"):
        for artefact in version_dir.glob("*_torchscript.pt"):
            artefact.unlink()
            sidecar_path(artefact).unlink(missing_ok=True)


def test_torchscript_pool_compiles_once_then_reuses(clean_artefacts, start_worker, producer,
                                                    fleet_settings: FleetSettings) -> None:
    worker = start_worker(adapter="torchscript", concurrency=1)
    simple = SimpleServingAdapter(fleet_settings)
    store = ModelStore(fleet_settings.model_store_dir)
    key = {"symbol": "MSFT", "timeframe": "1h", "model_type": "patchtst", "adapter": "torchscript"}

    first = send(producer, tasks.LOAD, key).get(timeout=TIMEOUT)
    compiled = first["metadata"]["torchscript"]
    assert first["metadata"]["adapter"] == "torchscript" and first["is_loaded"]
    assert compiled["reused"] is False and compiled["saved"] is True and compiled["compile_ms"] > 0
    artefact = store_artefact_path(first["model_path"], "MSFT_1h_patchtst")
    assert compiled["path"] == str(artefact) and artefact.is_file() and sidecar_path(artefact).is_file()

    assert send(producer, tasks.UNLOAD, key).get(timeout=TIMEOUT)["unloaded"] is True
    second = send(producer, tasks.LOAD, key).get(timeout=TIMEOUT)
    reused = second["metadata"]["torchscript"]
    assert reused["reused"] is True and reused["source_hash"] == compiled["source_hash"]
    assert reused["load_ms"] < compiled["compile_ms"]
    log = worker.output()
    assert "compiling MSFT_1h_patchtst to TorchScript" in log and "reusing TorchScript artefact" in log
    print(f"\nTorchScript MSFT_1h_patchtst: compile {compiled['compile_ms']:.1f} ms, "
          f"reuse (torch.jit.load) {reused['load_ms']:.1f} ms")

    # Every model type, through the pool, agrees with the eager adapter on the same input.
    for mtype in TYPES:
        job_inputs, data = inputs_for("MSFT", mtype, seed=321)
        res = send(producer, tasks.PREDICT, {**key, "model_type": mtype, "inputs": job_inputs}).get(timeout=TIMEOUT)
        model_id = f"MSFT_1h_{mtype}"
        info = simple.load_model(store.model_dir(ModelKey.parse(model_id)), "MSFT", "1h", mtype)
        assert res["model_info"]["metadata"]["adapter"] == "torchscript"
        assert_same_prediction(res, simple.predict(model_id, data), mtype, info.metadata["config"], data)


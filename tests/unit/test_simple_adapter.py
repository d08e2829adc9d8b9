"""The in-process adapter over a real store: load, batched predict with per-item errors, lean result metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.errors import InvalidInputError, ModelNotFoundError
from shared.schemas import ModelKey, ModelType, PredictInputs
from shared.settings import FleetSettings
from workers.serving.adapters.simple import SimpleServingAdapter
from workers.models.registry import build_model
from workers.store import ModelStore
from tests.unit.test_models import TINY_CONFIGS


@pytest.fixture()
def adapter(tmp_path: Path) -> SimpleServingAdapter:
    store = ModelStore(tmp_path)
    for mtype in (ModelType.PATCHTST, ModelType.SENTIMENT):
        key = ModelKey(symbol="T", timeframe="1h", model_type=mtype)
        store.save(key, build_model(mtype, TINY_CONFIGS[mtype]), TINY_CONFIGS[mtype], {"heldout": {"skill": 0.5}})
    return SimpleServingAdapter(FleetSettings(model_store_dir=tmp_path), store=store)


def load(adapter: SimpleServingAdapter, mtype: ModelType):
    path = adapter.store.model_dir(ModelKey(symbol="T", timeframe="1h", model_type=mtype))
    return adapter.load_model(path, "T", "1h", mtype)


def test_batched_forecasts_keep_per_item_errors(adapter: SimpleServingAdapter) -> None:
    info = load(adapter, ModelType.PATCHTST)
    cfg = TINY_CONFIGS[ModelType.PATCHTST]
    rng = np.random.default_rng(0)
    good = 100 + rng.normal(size=(cfg["context_length"] + 5, cfg["n_channels"]))
    outcomes = adapter.predict_many(info.model_id, [(good, None), (good[:, :1], None), (good, 3)])
    assert np.asarray(outcomes[0].predictions).shape == (cfg["prediction_length"], cfg["n_channels"])
    assert isinstance(outcomes[1], InvalidInputError)
    assert np.asarray(outcomes[2].predictions).shape == (3, cfg["n_channels"])
    assert abs(np.asarray(outcomes[0].predictions).mean() - 100) < 10  # de-normalised into the input's units


def test_sentiment_results_do_not_carry_the_vocabulary(adapter: SimpleServingAdapter) -> None:
    info = load(adapter, ModelType.SENTIMENT)
    result = adapter.predict(info.model_id, PredictInputs(texts=["shares jump", "earnings beat"]))
    assert len(result.labels) == 2 and len(result.predictions) == 2
    config = result.model_info.metadata["config"]
    assert "vocab" not in config and config["vocab_size"] == len(TINY_CONFIGS[ModelType.SENTIMENT]["vocab"])


def test_unloaded_model_is_a_typed_not_found(adapter: SimpleServingAdapter) -> None:
    info = load(adapter, ModelType.PATCHTST)
    assert adapter.unload_model(info.model_id)
    with pytest.raises(ModelNotFoundError):
        adapter.predict(info.model_id, np.zeros((40, 3)))

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


def test_a_config_that_leaves_fields_to_their_defaults_serves(tmp_path: Path) -> None:
    # a sentiment config without max_len and labels (their defaults: 32 tokens, three labels) and a forecaster
    # without its optional sizes, as a hand-written or older config.json holds them
    store = ModelStore(tmp_path)
    sparse = {ModelType.SENTIMENT: {"vocab": ["shares", "jump"], "embed_dim": 8, "hidden_dim": 8, "n_buckets": 64},
              ModelType.PATCHTST: {"context_length": 32, "prediction_length": 4, "n_channels": 5}}
    for mtype, config in sparse.items():
        key = ModelKey(symbol="T", timeframe="1h", model_type=mtype)
        store.save(key, build_model(mtype, config), config, {})
    adapter = SimpleServingAdapter(FleetSettings(model_store_dir=tmp_path), store=store)
    result = adapter.predict(load(adapter, ModelType.SENTIMENT).model_id, PredictInputs(texts=["shares jump"]))
    assert result.labels[0] in ("negative", "neutral", "positive") and len(result.predictions[0]) == 3
    assert result.model_info.metadata["config"]["max_len"] == 32
    series = np.random.default_rng(0).normal(size=(32, 5)).tolist()
    result = adapter.predict(load(adapter, ModelType.PATCHTST).model_id, PredictInputs(series=series))
    assert np.asarray(result.predictions).shape == (4, 5)


def test_unloaded_model_is_a_typed_not_found(adapter: SimpleServingAdapter) -> None:
    info = load(adapter, ModelType.PATCHTST)
    assert adapter.unload_model(info.model_id)
    with pytest.raises(ModelNotFoundError):
        adapter.predict(info.model_id, np.zeros((40, 3)))


def test_cold_loads_and_ages_at_eviction_reach_the_worker_and_fleet_stats(tmp_path: Path) -> None:
    import fakeredis

    from shared.keys import Keys
    from shared.settings import SimpleSettings
    from shared.stats import StatsReader, StatsWriter
    from workers.serving.pool import AdapterPool

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock, store = Clock(), ModelStore(tmp_path)
    settings = FleetSettings(model_store_dir=tmp_path, simple=SimpleSettings(max_models_in_memory=1))
    for mtype in (ModelType.PATCHTST, ModelType.SENTIMENT):
        key = ModelKey(symbol="T", timeframe="1h", model_type=mtype)
        store.save(key, build_model(mtype, TINY_CONFIGS[mtype]), TINY_CONFIGS[mtype], {})
    adapter = SimpleServingAdapter(settings, store=store, timer=clock)
    real_load = store.load_from_path

    def slow_load(path):  # every read from the store takes 250 ms on the adapter's clock
        clock.now += 0.25
        return real_load(path)

    store.load_from_path = slow_load  # type: ignore[method-assign]
    pool = AdapterPool(settings, {("simple", "cpu"): adapter})
    load(adapter, ModelType.PATCHTST)
    load(adapter, ModelType.PATCHTST)  # a hit: no load
    clock.now += 30
    load(adapter, ModelType.SENTIMENT)  # the count bound evicts the forecaster, 30.25 s after its load
    deltas = pool.cache_deltas()
    assert {k: deltas[k] for k in ("loads", "load_ms", "evicted_age_s", "evictions")} == {
        "loads": 2, "load_ms": 500, "evicted_age_s": 30, "evictions": 1}
    redis, keys = fakeredis.FakeRedis(), Keys("t")
    StatsWriter(redis, keys, "w1").record([], cache=deltas)
    assert pool.cache_deltas()["loads"] == 0  # deltas, not totals
    reader = StatsReader(redis, keys)
    for stats in (reader.worker("w1"), reader.fleet()):
        assert (stats.cache_loads, stats.cache_load_ms_total, stats.cache_evicted_age_seconds_total) == (2, 500, 30)
    assert redis.hget(keys.worker_stats("w1"), "cache_load_ms") == b"500"

"""Training: synthetic bars, headlines, held-out checks against baselines, create_models and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from producer_api.cli.models import models as models_cli
from shared.schemas import ModelType, TimeFrame
from workers.models import inference
from workers.store import ModelStore
from workers.training.headlines import build_vocab, load_headlines, stratified_split
from workers.training.synthetic import CHANNELS, SEASON_BARS, generate_bars
from workers.training.train import TrainingError, create_models, train_forecaster, train_sentiment

SMALL = {"context_length": 48, "prediction_length": 12, "n_channels": 5}
TINY_CONFIGS = {
    ModelType.PATCHTST: {**SMALL, "patch_len": 8, "stride": 8, "d_model": 16, "n_heads": 2, "n_layers": 1,
                         "d_ff": 32},
    ModelType.PATCHTSMIXER: {**SMALL, "patch_len": 8, "stride": 8, "d_model": 16, "n_layers": 1},
    ModelType.ENHANCED_TRANSFORMER: {**SMALL, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32,
                                     "moving_avg": 5},
}
FORECASTERS = list(TINY_CONFIGS)

def test_synthetic_bars_are_deterministic_per_symbol() -> None:
    a = generate_bars("AAPL", "1h", n_bars=500)
    again = generate_bars("AAPL", "1h", n_bars=500)
    other = generate_bars("MSFT", "1h", n_bars=500)
    assert a.values.shape == (500, len(CHANNELS)) and a.timestamps.shape == (500,)
    np.testing.assert_array_equal(a.values, again.values)
    assert not np.allclose(a.values, other.values)
    assert not np.allclose(a.values, generate_bars("AAPL", "1h", n_bars=500, seed=1).values)
    assert np.all(np.diff(a.timestamps).astype(int) == 3600)


def test_synthetic_bars_look_like_ohlcv() -> None:
    bars = generate_bars("NVDA", "1d", n_bars=400).values
    open_, high, low, close = bars[:, 0], bars[:, 1], bars[:, 2], bars[:, 3]
    assert np.all(high >= np.maximum(open_, close)) and np.all(low <= np.minimum(open_, close))
    assert np.all(low > 0) and np.isfinite(bars).all()
    # The seasonal cycle is visible: returns correlate with themselves one period apart.
    log_close = np.log(close)
    season = SEASON_BARS[TimeFrame.D1]
    detrended = log_close - np.convolve(log_close, np.ones(season) / season, mode="same")
    x = detrended[season:-season]
    assert np.corrcoef(x[:-season], x[season:])[0, 1] > 0.3


@pytest.mark.parametrize("model_type", FORECASTERS)
def test_forecasters_beat_the_naive_forecast_on_held_out_bars(model_type: ModelType) -> None:
    bars = generate_bars("AAPL", "1h", n_bars=900)
    model, meta = train_forecaster(model_type, bars.values, TINY_CONFIGS[model_type], seed=0,
                                   timestamps=bars.timestamps, steps=60, batch_size=32, threads=1)
    held = meta["heldout"]
    assert held["mae"] < held["naive_mae"] and held["skill"] > 0.2
    assert not model.training
    # Chronological split: training ends before the held-out range starts, and they cover the series.
    assert meta["training_range"]["end"] < held["range"]["start"]
    assert meta["training_range"]["n_bars"] + held["range"]["n_bars"] == 900
    # The trained model serves through the shared inference path with sensible output.
    prepared = inference.prepare_series(bars.values, TINY_CONFIGS[model_type])
    (forecast,) = inference.run_forecast(model, [prepared], 30, TINY_CONFIGS[model_type])
    assert forecast.shape == (30, 5) and np.all(np.abs(forecast[:, 3] / bars.values[-1, 3] - 1) < 0.2)


def test_training_is_reproducible_for_a_seed() -> None:
    bars = generate_bars("AAPL", "1h", n_bars=600).values
    config = TINY_CONFIGS[ModelType.PATCHTSMIXER]
    _, first = train_forecaster(ModelType.PATCHTSMIXER, bars, config, seed=3, steps=5, batch_size=32, check=False)
    _, second = train_forecaster(ModelType.PATCHTSMIXER, bars, config, seed=3, steps=5, batch_size=32, check=False)
    assert first["heldout"]["mae"] == second["heldout"]["mae"]


def test_a_model_that_cannot_beat_naive_is_refused() -> None:
    # A pure random walk: the last value is the best forecast there is.
    walk = np.cumsum(np.random.default_rng(0).normal(size=(700, 5)), axis=0)
    with pytest.raises(TrainingError, match="does not beat the naive"):
        train_forecaster(ModelType.PATCHTSMIXER, walk, TINY_CONFIGS[ModelType.PATCHTSMIXER], steps=3,
                         batch_size=32)
    with pytest.raises(ValueError, match="too few"):
        train_forecaster(ModelType.PATCHTSMIXER, walk[:80], TINY_CONFIGS[ModelType.PATCHTSMIXER], steps=3)


def test_headlines_are_balanced_and_split_by_label() -> None:
    rows = load_headlines()
    assert len(rows) >= 300
    counts = {label: sum(r.label == label for r in rows) for label in ("negative", "neutral", "positive")}
    assert min(counts.values()) >= 80
    train, held = stratified_split(rows, 0.2, seed=0)
    assert len(held) == 60 and not {r.text for r in train} & {r.text for r in held}
    assert build_vocab(["b a b", "c"]) == ["b", "a", "c"]


def test_sentiment_beats_the_majority_class() -> None:
    model, config, meta = train_sentiment(seed=0, epochs=15, threads=1)
    held = meta["heldout"]
    assert held["accuracy"] > held["majority_accuracy"] + 0.2
    assert config["vocab"] and config["labels"] == ["negative", "neutral", "positive"]
    ids = inference.encode_texts(["Shares plunge after profit warning", "Shares soar on record profit"], config)
    _, labels, _ = inference.run_sentiment(model, ids, config)
    assert labels == ["negative", "positive"]


def test_create_models_trains_and_saves_every_combination(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    seen: list[tuple[str, int, int]] = []
    summaries = create_models(store, ["AAPL", "MSFT"], ["1h"], ["patchtsmixer", "sentiment"], seed=0,
                              progress=lambda *args: seen.append(args), n_bars=700, threads=1, steps=40,
                              configs={ModelType.PATCHTSMIXER: TINY_CONFIGS[ModelType.PATCHTSMIXER]})
    assert [s["model_id"] for s in summaries] == ["AAPL_1h_patchtsmixer", "AAPL_1h_sentiment",
                                                  "MSFT_1h_patchtsmixer", "MSFT_1h_sentiment"]
    assert seen[0] == ("AAPL_1h_patchtsmixer", 0, 4) and seen[-1] == ("", 4, 4)
    for summary in summaries:
        held = summary["heldout"]
        assert held.get("mae", 0) < held.get("naive_mae", 1) and held.get("accuracy", 1) > held.get(
            "majority_accuracy", 0)
    assert len(store.list_models()) == 4


def test_cli_create_and_list(tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(models_cli, ["create", "--symbols", "TSLA", "--types", "sentiment",
                                         "--store", str(tmp_path), "--threads", "1"])
    assert created.exit_code == 0, created.output
    assert "TSLA_1h_sentiment" in created.output
    listed = runner.invoke(models_cli, ["list", "--store", str(tmp_path), "--json"])
    assert listed.exit_code == 0
    (entry,) = json.loads(listed.output)
    assert entry["model_id"] == "TSLA_1h_sentiment" and entry["latest"] == "1"
    bad = runner.invoke(models_cli, ["create", "--types", "lstm", "--store", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown model type" in bad.output

"""Pre/post-processing shared by the serving adapters: validation, normalisation, batching, rolling, sentiment."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from shared.errors import InvalidInputError, PredictionError
from workers.models import inference

CONFIG = {"context_length": 8, "prediction_length": 3, "n_channels": 2}


def _series(rows: int = 20, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 + np.cumsum(rng.normal(size=(rows, channels)), axis=0)


class Recorder:
    """A fake forward: repeats each window's last row over the horizon, and records its calls."""

    def __init__(self, horizon: int = 3) -> None:
        self.horizon = horizon
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        return x[:, -1:, :].repeat(1, self.horizon, 1) + 1.0  # +1 normalised unit per call


@pytest.mark.parametrize(("series", "problem"), [
    (np.zeros(20), "2-D"),
    (np.zeros((20, 3)), "3 channels"),
    (np.zeros((5, 2)), "5 rows"),
])
def test_prepare_series_rejects_bad_shapes(series: np.ndarray, problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem) as info:
        inference.prepare_series(series, CONFIG)
    assert info.value.field == "inputs.series"


def test_prepare_series_rejects_non_finite_values_in_the_window_only() -> None:
    series = _series()
    series[0, 0] = np.nan  # outside the last 8 rows: ignored
    inference.prepare_series(series, CONFIG)
    series[-1, 1] = np.inf
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        inference.prepare_series(series, CONFIG)


def test_prepare_series_normalises_the_last_window_per_channel() -> None:
    series = _series()
    prepared = inference.prepare_series(series, CONFIG)
    window = series[-8:]
    assert prepared.x.shape == (8, 2) and prepared.x.dtype == np.float32
    np.testing.assert_allclose(prepared.mean, window.mean(axis=0))
    np.testing.assert_allclose(prepared.std, window.std(axis=0))
    np.testing.assert_allclose(prepared.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(prepared.x.std(axis=0), 1.0, atol=1e-5)


def test_flat_series_have_a_floored_std() -> None:
    prepared = inference.prepare_series(np.full((8, 2), 250.0), CONFIG)
    assert np.all(prepared.std > 0) and np.all(prepared.std <= 250.0 * 1e-3)
    assert np.all(prepared.x == 0.0)


def test_run_forecast_batches_items_into_one_forward_and_denormalises() -> None:
    items = [inference.prepare_series(_series(seed=s), CONFIG) for s in range(3)]
    forward = Recorder()
    out = inference.run_forecast(forward, items, 3, CONFIG)
    assert len(forward.calls) == 1 and forward.calls[0].shape == (3, 8, 2)
    for item, forecast in zip(items, out):
        assert forecast.shape == (3, 2) and forecast.dtype == np.float64
        expected = (item.x[-1].astype(np.float64) + 1.0) * item.std + item.mean
        np.testing.assert_allclose(forecast, np.tile(expected, (3, 1)), rtol=1e-6)


def test_run_forecast_rolls_forward_past_the_horizon() -> None:
    item = inference.prepare_series(_series(), CONFIG)
    forward = Recorder()
    (forecast,) = inference.run_forecast(forward, [item], 7, CONFIG)
    assert forecast.shape == (7, 2)
    assert len(forward.calls) == 3  # ceil(7 / 3)
    # The second call sees the window slid by the horizon, ending with the first call's predictions.
    second = forward.calls[1][0]
    np.testing.assert_allclose(second[:5].numpy(), item.x[3:], rtol=1e-6)
    np.testing.assert_allclose(second[-1].numpy(), item.x[-1] + 1.0, rtol=1e-6)
    steps = (forecast - item.mean) / item.std  # back to normalised units: +1 per call
    np.testing.assert_allclose(steps[[0, 3, 6]] - item.x[-1], [[1, 1], [2, 2], [3, 3]], rtol=1e-5)


def test_run_forecast_errors() -> None:
    item = inference.prepare_series(_series(), CONFIG)
    with pytest.raises(InvalidInputError):
        inference.run_forecast(Recorder(), [item], 0, CONFIG)
    with pytest.raises(PredictionError, match="shape"):
        inference.run_forecast(Recorder(horizon=2), [item], 3, CONFIG)
    with pytest.raises(PredictionError, match="NaN"):
        inference.run_forecast(lambda x: torch.full((1, 3, 2), float("nan")), [item], 3, CONFIG)
    assert inference.run_forecast(Recorder(), [], 3, CONFIG) == []


def test_forecast_confidence_is_held_out_skill_discounted_past_the_horizon() -> None:
    meta = {"heldout": {"mae": 0.4, "naive_mae": 1.0}}
    assert inference.forecast_confidence(meta, 24, 24) == pytest.approx(0.6)
    assert inference.forecast_confidence(meta, 48, 24) == pytest.approx(0.3)
    assert inference.forecast_confidence({"heldout": {"mae": 2.0, "naive_mae": 1.0}}, 24, 24) == 0.0
    assert inference.forecast_confidence({}, 24, 24) == 0.0


def test_sentiment_encoding_and_postprocessing() -> None:
    config = {"vocab": ["profit", "soars"], "max_len": 4, "labels": ["negative", "neutral", "positive"]}
    ids = inference.encode_texts(["Profit soars", "something else"], config)
    assert ids.tolist() == [[2, 3, 0, 0], [1, 1, 0, 0]]
    logits = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 0.0]])
    probs, labels, confidence = inference.run_sentiment(lambda _: logits, ids, config)
    assert labels == ["positive", "negative"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert confidence == pytest.approx(probs.max(axis=1).mean())
    with pytest.raises(InvalidInputError):
        inference.encode_texts([], config)
    with pytest.raises(PredictionError):
        inference.run_sentiment(lambda _: torch.zeros(2, 2), ids, config)

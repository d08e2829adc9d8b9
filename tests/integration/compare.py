"""What the integration tests of the compiled adapters share: inputs, and the documented tolerance."""

from __future__ import annotations

import numpy as np

from workers.models import inference
from workers.serving.torchscript_convert import ATOL, RTOL
from workers.training.synthetic import generate_bars

TEXTS = ["Shares plunge after profit warning", "Company beats estimates, raises guidance"]


def inputs_for(symbol: str, mtype: str, seed: int) -> tuple[dict, object]:
    """A job's ``inputs`` and the raw data behind them (a series of unseen bars, or headlines)."""
    if mtype == "sentiment":
        return {"texts": TEXTS}, TEXTS
    series = generate_bars(symbol, "1h", n_bars=700, seed=seed).values[-200:]
    return {"series": series.tolist()}, series


def assert_same_prediction(got: dict, want, mtype: str, config: dict, data) -> None:
    """The documented tolerance: forecasts within ``(ATOL + RTOL * |z|) * std`` per channel after
    de-normalisation (z: the normalised output, std: the input window's), probabilities within ``ATOL``."""
    got_arr, want_arr = np.asarray(got["predictions"]), np.asarray(want.predictions)
    assert got_arr.shape == want_arr.shape
    if mtype == "sentiment":
        np.testing.assert_allclose(got_arr, want_arr, rtol=0, atol=ATOL)
        assert got["labels"] == want.labels
        return
    prepared = inference.prepare_series(np.asarray(data), config)
    z = np.abs((want_arr - prepared.mean) / prepared.std)
    assert (np.abs(got_arr - want_arr) <= (ATOL + RTOL * z) * prepared.std + 1e-9).all()

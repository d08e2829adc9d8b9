"""Deterministic synthetic OHLCV-like bars, so that models can be trained and checked with no market data.

A symbol's series is a function of ``(symbol, timeframe, seed)`` only (``zlib.crc32`` of the names seeds the
generator; Python's ``hash`` is salted per process and would not do). The log close is the sum of:

* a random walk whose drift and volatility switch at random regime changes,
* a seasonal cycle (period set by the timeframe: a day of 1h bars, a week of 1d bars, ...), strong enough
  that a model that learns it beats the naive "last value" forecast,
* mean-reverting AR(1) noise.

Open, high and low follow from the close; log-volume has its own intraday-like cycle and regime level.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from shared.schemas import TimeFrame

CHANNELS: tuple[str, ...] = ("open", "high", "low", "close", "log_volume")
#: Bars per seasonal cycle: an hour of 1m bars, a session-like 4h of 5m bars, a week of 1d (trading) bars...
SEASON_BARS: dict[TimeFrame, int] = {
    TimeFrame.M1: 60, TimeFrame.M5: 48, TimeFrame.M15: 32, TimeFrame.M30: 48,
    TimeFrame.H1: 24, TimeFrame.H4: 42, TimeFrame.D1: 5, TimeFrame.W1: 52,
}
BAR_SECONDS: dict[TimeFrame, int] = {
    TimeFrame.M1: 60, TimeFrame.M5: 300, TimeFrame.M15: 900, TimeFrame.M30: 1800,
    TimeFrame.H1: 3600, TimeFrame.H4: 14400, TimeFrame.D1: 86400, TimeFrame.W1: 604800,
}
#: The last bar's timestamp. Fixed, not "now", so that the same call always returns the same series.
END = np.datetime64("2024-01-01T00:00:00", "s")


@dataclass(frozen=True)
class SyntheticSeries:
    """``values[t]`` = (open, high, low, close, log_volume) of bar ``t``, stamped ``timestamps[t]``."""

    values: np.ndarray
    timestamps: np.ndarray
    channels: tuple[str, ...] = CHANNELS


def _rng(symbol: str, timeframe: TimeFrame, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(symbol.encode()), zlib.crc32(timeframe.value.encode()), seed])


def _regimes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-bar drift and volatility multiplier, constant within regimes of random length (~400 bars)."""
    drift = np.empty(n)
    vol = np.empty(n)
    start = 0
    while start < n:
        length = int(rng.integers(150, 650))
        drift[start:start + length] = rng.normal(0.0, 1.5e-4)
        vol[start:start + length] = rng.choice([0.6, 1.0, 1.6])
        start += length
    return drift, vol


def _ar1(rng: np.random.Generator, n: int, phi: float, scale: np.ndarray | float) -> np.ndarray:
    shocks = rng.normal(0.0, 1.0, n) * scale
    out = np.empty(n)
    level = 0.0
    for t in range(n):
        level = phi * level + shocks[t]
        out[t] = level
    return out


def generate_bars(symbol: str, timeframe: TimeFrame | str, n_bars: int = 3000, seed: int = 0) -> SyntheticSeries:
    """``n_bars`` synthetic bars of ``symbol`` at ``timeframe``; the same arguments give the same series."""
    timeframe = TimeFrame(timeframe)
    if n_bars < 2:
        raise ValueError("n_bars must be at least 2")
    rng = _rng(symbol, timeframe, seed)
    period = SEASON_BARS[timeframe]
    t = np.arange(n_bars, dtype=np.float64)
    drift, vol = _regimes(rng, n_bars)

    walk = np.cumsum(drift + vol * rng.normal(0.0, 8e-4, n_bars))
    amplitude = rng.uniform(0.008, 0.014)
    phase = rng.uniform(0, 2 * np.pi, 2)
    season = amplitude * (np.sin(2 * np.pi * t / period + phase[0])
                          + 0.5 * np.sin(4 * np.pi * t / period + phase[1]))
    noise = _ar1(rng, n_bars, 0.6, 1.2e-3 * vol)
    log_close = np.log(rng.uniform(20.0, 500.0)) + walk + season + noise
    close = np.exp(log_close)

    gap = np.exp(rng.normal(0.0, 3e-4 * vol))
    open_ = np.concatenate([[close[0]], close[:-1]]) * gap
    wick = np.abs(rng.normal(0.0, 1.5e-3 * vol, (2, n_bars)))
    high = np.maximum(open_, close) * np.exp(wick[0])
    low = np.minimum(open_, close) * np.exp(-wick[1])

    volume_cycle = 0.35 * np.cos(2 * np.pi * t / period + phase[0])
    log_volume = (rng.uniform(11.0, 15.0) + volume_cycle + 0.3 * np.log(vol)
                  + _ar1(rng, n_bars, 0.7, 0.08))

    values = np.stack([open_, high, low, close, log_volume], axis=1)
    step = np.timedelta64(BAR_SECONDS[timeframe], "s")
    timestamps = END - step * np.arange(n_bars - 1, -1, -1)
    return SyntheticSeries(values=values, timestamps=timestamps)

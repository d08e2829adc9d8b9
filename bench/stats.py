"""Pure helpers: percentiles, the summary of one measurement window, medians over repetitions, ratios."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

#: Numeric fields of a summary that are reduced to their median over repetitions.
SUMMARY_FIELDS = ("throughput", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "cpu_per_1k_s", "client_cpu_per_1k_s",
                  "other_load", "completed", "errors", "seconds")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default).

    NaN for no values.
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Window:
    """What one measurement window saw: latencies of the requests that finished in it, counts, CPU."""

    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    items_per_request: int = 1
    server_cpu_s: float = math.nan
    client_cpu_s: float = math.nan
    #: CPU seconds the machine spent on processes that are neither the servers nor the load generator.
    other_cpu_s: float = math.nan
    first_error: str | None = None


def summarize(window: Window) -> dict[str, Any]:
    """Throughput (predictions/s), latency percentiles (ms) and CPU seconds per 1,000 predictions."""
    done = len(window.latencies_ms)
    predictions = done * window.items_per_request
    per_1k = (lambda cpu: cpu / predictions * 1000 if predictions and not math.isnan(cpu) else math.nan)
    out: dict[str, Any] = {
        "throughput": predictions / window.seconds if window.seconds > 0 else math.nan,
        "p50_ms": percentile(window.latencies_ms, 50),
        "p95_ms": percentile(window.latencies_ms, 95),
        "p99_ms": percentile(window.latencies_ms, 99),
        "mean_ms": statistics.fmean(window.latencies_ms) if done else math.nan,
        "cpu_per_1k_s": per_1k(window.server_cpu_s),
        "client_cpu_per_1k_s": per_1k(window.client_cpu_s),
        "other_load": window.other_cpu_s / window.seconds if window.seconds > 0 else math.nan,
        "completed": predictions,
        "errors": window.errors,
        "seconds": window.seconds,
    }
    if window.first_error:
        out["first_error"] = window.first_error
    return out


def median_summary(reps: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of repetition summaries (NaNs ignored; NaN when every repetition lacks a value)."""
    reps = list(reps)
    out: dict[str, Any] = {}
    for name in SUMMARY_FIELDS:
        values = [r[name] for r in reps if name in r and r[name] is not None and not _isnan(r[name])]
        out[name] = statistics.median(values) if values else math.nan
    errors = [r["first_error"] for r in reps if r.get("first_error")]
    if errors:
        out["first_error"] = errors[0]
    return out


def ratio(a: float | None, b: float | None) -> float:
    """``a / b``, NaN when either is missing or ``b`` is zero."""
    if a is None or b is None or _isnan(a) or _isnan(b) or b == 0:
        return math.nan
    return a / b


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)

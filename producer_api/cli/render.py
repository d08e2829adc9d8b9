"""Rich renderings of job documents for the CLI."""

from __future__ import annotations

from typing import Any

from rich.table import Table

FORECAST_CHANNELS = ["open", "high", "low", "close", "log_volume"]


def forecast_table(doc: dict[str, Any], title: str | None = None, max_rows: int = 24) -> Table:
    """A finished predict job's forecast (steps x channels) or sentiment (texts x labels) as a table."""
    result = doc["result"]
    preds = result["predictions"]
    info = result.get("model_info", {})
    table = Table(title=title or f"{info.get('model_id', 'prediction')} (job {doc.get('job_id', '?')})",
                  caption=(f"confidence {result['confidence_score']:.2f} · "
                           f"inference {result['inference_time_ms']:.1f} ms"))
    if result.get("labels"):
        for name in ("text #", "label", "negative", "neutral", "positive"):
            table.add_column(name, justify="right")
        for i, (label, probs) in enumerate(zip(result["labels"], preds)):
            table.add_row(str(i), label, *(f"{p:.3f}" for p in probs))
        return table
    width = len(preds[0]) if preds else 0
    names = FORECAST_CHANNELS if width == len(FORECAST_CHANNELS) else [f"ch{i}" for i in range(width)]
    table.add_column("step", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for step, row in enumerate(preds[:max_rows], start=1):
        table.add_row(f"+{step}", *(f"{v:,.4f}" for v in row))
    if len(preds) > max_rows:
        table.add_row("…", *("…" for _ in names))
    return table

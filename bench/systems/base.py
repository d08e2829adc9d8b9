"""The interface every measured system implements: start, warm up, run a load pattern, stop.

A system owns the server processes it starts (their CPU time is what "server CPU" counts) and builds a client
``call(i)`` per measurement point. :meth:`System.measure` runs the repetitions of one point with the shared
load generator and reduces them to medians.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from bench.config import RunMode
from bench.loadgen import Call, Pattern, run_pattern
from bench.models import MODELS, BenchModel
from bench.procs import Proc, machine_busy_seconds, own_cpu_seconds, tree_cpu_seconds
from bench.stats import median_summary, summarize


@dataclass
class Point:
    """One measurement: a model, a wire encoding, a load pattern and what one request carries."""

    model: str
    encoding: str
    pattern: str = "closed"
    concurrency: int = 1
    rate: float = 0.0
    kind: str = "predict"  # "predict" | "batch" (explicit batch jobs of BATCH_JOB_SIZE predictions)
    items: int = 1

    @property
    def label(self) -> str:
        load = f"c={self.concurrency}" if self.pattern == "closed" else f"open {self.rate:.0f}/s"
        return f"{self.model} {self.kind} {self.encoding} {load}"


@dataclass
class BenchContext:
    """What every system gets: where to write, the Redis to use, the store, the cores, the inputs."""

    mode: RunMode
    workdir: Path
    store_dir: Path
    redis_url: str
    redis_proc: Proc | None
    server_cpus: set[int] | None
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    log: Callable[[str], None] = print

    @property
    def log_dir(self) -> Path:
        path = self.workdir / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def redis_db_url(self, db: int) -> str:
        return self.redis_url.rsplit("/", 1)[0] + f"/{db}"


class System(ABC):
    """A served system under test."""

    key = "?"
    name = "?"
    #: Whether the Redis server's CPU counts as this system's (it is the broker and backend of Celery systems).
    uses_redis = False

    def __init__(self, ctx: BenchContext, variant: str = "") -> None:
        self.ctx = ctx
        self.variant = variant
        self.procs: list[Proc] = []
        self.notes: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Start the server processes and wait until they serve both models."""

    async def warm_up(self) -> None:
        """Send a few requests of each model so that every server process has loaded and run it."""
        for model in MODELS:
            point = Point(model=model, encoding=self.default_encoding, concurrency=4)
            async with self.client(point) as call:
                await run_pattern(call, Pattern("closed", concurrency=4, warmup_s=0, window_s=1.0, drain_s=60))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(10)
        self.procs.clear()

    # -- measuring -------------------------------------------------------------------------------------------
    default_encoding = "json-list"

    @abstractmethod
    def client(self, point: Point) -> contextlib.AbstractAsyncContextManager[Call]:
        """An async context manager yielding ``call(i)`` for ``point``."""

    def own_procs(self) -> list[Proc]:
        """The processes this system started (what it is stopped by and charged for)."""
        return list(self.procs)

    def server_procs(self) -> list[Proc]:
        procs = self.own_procs()
        if self.uses_redis and self.ctx.redis_proc is not None:
            procs.append(self.ctx.redis_proc)
        return procs

    def cpu_probe(self) -> tuple[float, float, float]:
        return tree_cpu_seconds(self.server_procs()), own_cpu_seconds(), machine_busy_seconds()

    def check_alive(self) -> None:
        for proc in self.own_procs():
            proc.check()

    async def measure(self, point: Point) -> dict[str, Any]:
        """Run ``point`` ``mode.reps`` times; the record holds every repetition and the medians."""
        mode = self.ctx.mode
        window = mode.window_c1_s if point.pattern == "closed" and point.concurrency == 1 else mode.window_s
        pattern = Pattern(point.pattern, concurrency=point.concurrency, rate=point.rate, warmup_s=mode.warmup_s,
                          window_s=window, max_requests=mode.max_requests_per_window)
        reps = []
        async with self.client(point) as call:
            for _ in range(mode.reps):
                self.check_alive()
                reps.append(summarize(await run_pattern(call, pattern, self.cpu_probe, items=point.items)))
                self.between_reps()
        record = {"system": self.key, "name": self.name, "variant": self.variant, **asdict(point),
                  "reps": reps, **median_summary(reps)}
        return record

    def between_reps(self) -> None:
        """Housekeeping outside the measurement windows (dropping stored results, for instance)."""

    def describe(self) -> dict[str, Any]:
        return {"system": self.key, "name": self.name, "variant": self.variant, "notes": list(self.notes)}


@contextlib.asynccontextmanager
async def threaded_calls(blocking: Callable[[int], Any], threads: int) -> AsyncIterator[Call]:
    """Run a blocking client call on a pool of ``threads`` threads (Celery's client API is blocking)."""
    executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="bench-client")
    loop = asyncio.get_running_loop()

    async def call(i: int) -> Any:
        return await loop.run_in_executor(executor, blocking, i)

    try:
        yield call
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def model_of(point: Point) -> BenchModel:
    return MODELS[point.model]

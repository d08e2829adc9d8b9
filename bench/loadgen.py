"""An asyncio load generator: closed loop (N requests in flight) and open loop (a fixed arrival rate).

A system hands in ``call(i)``, an awaitable that sends request ``i`` and raises unless a correct answer came
back. A run is a warm-up followed by one measurement window; only requests that *finish* inside the window
count (throughput = those / window length), and CPU is sampled at the window's two edges. Both loops are
bounded in time and in requests; requests still in flight at the end get a bounded drain.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from bench.stats import Window

Call = Callable[[int], Awaitable[object]]
#: () -> (server, client, whole machine) busy CPU seconds, cumulative; sampled at the window's edges.
CpuProbe = Callable[[], tuple[float, float, float]]


@dataclass
class Pattern:
    """A load pattern: closed loop at ``concurrency``, or open loop at ``rate`` requests/s."""

    kind: str  # "closed" | "open"
    concurrency: int = 1
    rate: float = 0.0
    warmup_s: float = 1.0
    window_s: float = 5.0
    max_requests: int = 200_000
    drain_s: float = 30.0
    max_in_flight: int = 1024


class _Recorder:
    def __init__(self, w0: float, w1: float, items: int) -> None:
        self.w0, self.w1 = w0, w1
        self.window = Window(seconds=w1 - w0, items_per_request=items)
        self.issued = 0

    def done(self, started: float, ok: bool, error: BaseException | None = None) -> None:
        ended = time.perf_counter()
        if not self.w0 <= ended <= self.w1:
            return
        if ok:
            self.window.latencies_ms.append((ended - started) * 1000)
        else:
            self.window.errors += 1
            if self.window.first_error is None and error is not None:
                self.window.first_error = f"{type(error).__name__}: {error}"[:300]


async def _sample_cpu(rec: _Recorder, probe: CpuProbe | None) -> None:
    if probe is None:
        return
    await asyncio.sleep(max(0.0, rec.w0 - time.perf_counter()))
    s0, c0, m0 = probe()
    await asyncio.sleep(max(0.0, rec.w1 - time.perf_counter()))
    s1, c1, m1 = probe()
    rec.window.server_cpu_s, rec.window.client_cpu_s = s1 - s0, c1 - c0
    rec.window.other_cpu_s = max(0.0, (m1 - m0) - (s1 - s0) - (c1 - c0))


async def _timed(call: Call, i: int, started: float, rec: _Recorder) -> None:
    try:
        await call(i)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        rec.done(started, False, exc)
    else:
        rec.done(started, True)


async def closed_loop(call: Call, pattern: Pattern, probe: CpuProbe | None = None, items: int = 1) -> Window:
    """``pattern.concurrency`` users, each sending its next request as soon as the previous one answered."""
    start = time.perf_counter()
    rec = _Recorder(start + pattern.warmup_s, start + pattern.warmup_s + pattern.window_s, items)

    async def user(uid: int) -> None:
        i = uid
        while time.perf_counter() < rec.w1 and rec.issued < pattern.max_requests:
            rec.issued += 1
            await _timed(call, i, time.perf_counter(), rec)
            i += pattern.concurrency

    users = [asyncio.ensure_future(user(u)) for u in range(pattern.concurrency)]
    await _run_bounded(users, _sample_cpu(rec, probe), rec, pattern)
    return rec.window


async def open_loop(call: Call, pattern: Pattern, probe: CpuProbe | None = None, items: int = 1,
                    seed: int = 0) -> Window:
    """Poisson arrivals at ``pattern.rate``/s; latency counts from the *scheduled* send time.

    Counting from the schedule (not from when the request got out) keeps a slow server from hiding its queue
    (coordinated omission). Arrivals beyond ``max_in_flight`` outstanding requests count as errors.
    """
    rng = random.Random(seed)
    start = time.perf_counter()
    rec = _Recorder(start + pattern.warmup_s, start + pattern.warmup_s + pattern.window_s, items)
    in_flight: set[asyncio.Future] = set()

    async def arrivals() -> None:
        t, i = start, 0
        while rec.issued < pattern.max_requests:
            t += rng.expovariate(pattern.rate)
            if t >= rec.w1:
                break
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            rec.issued += 1
            if len(in_flight) >= pattern.max_in_flight:
                rec.done(t, False, RuntimeError(f"over {pattern.max_in_flight} requests in flight"))
                continue
            task = asyncio.ensure_future(_timed(call, i, t, rec))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
        if in_flight:
            await asyncio.wait(list(in_flight))

    await _run_bounded([asyncio.ensure_future(arrivals())], _sample_cpu(rec, probe), rec, pattern)
    for task in list(in_flight):
        task.cancel()
    return rec.window


async def _run_bounded(tasks: list[asyncio.Future], sampler: Awaitable[None], rec: _Recorder,
                       pattern: Pattern) -> None:
    sampling = asyncio.ensure_future(sampler)
    limit = pattern.warmup_s + pattern.window_s + pattern.drain_s
    done, pending = await asyncio.wait([*tasks, sampling], timeout=limit)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def run_pattern(call: Call, pattern: Pattern, probe: CpuProbe | None = None, items: int = 1) -> Window:
    if pattern.kind == "closed":
        return await closed_loop(call, pattern, probe, items)
    if pattern.kind == "open":
        return await open_loop(call, pattern, probe, items)
    raise ValueError(f"unknown load pattern {pattern.kind!r}")

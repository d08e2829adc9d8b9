"""``python -m bench models``: thousands of per-symbol models, the fleet's routing against Ray Serve's multiplexing.

Side by side in one run, on one machine, the same store and the same Zipf trace (each system takes requests in
trace order from the start):

* (a) the fleet with plain pool routing (``ROUTING_CACHE_AWARE=false``): any free process takes any job;
* (b) the fleet as shipped: cache-aware routing, copies of hot models, placement by eviction cost;
* (c) Ray Serve with model multiplexing: as many replicas as (a)/(b) have processes, ``max_num_models_per_replica``
  equal to their cache size, the same models, pre- and post-processing, and load generator;
* (d) the ideal: one LRU of the fleet's total cache size fed the same stretch of the trace (computed).

Each system: a warm-up (caches fill), an open loop at a fixed rate (the same for all), then a saturated closed
loop. Hit ratio = 1 - cold loads / requests, from the systems' own counters. The routing code is then run in a
trace-driven simulation of 8, 32 and 128 processes (:mod:`bench.manymodels.simulate`), with the service and load
times measured here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

from bench.manymodels import workload
from bench.stats import percentile


@dataclass(frozen=True)
class ModelsMode:
    n_models: int = 1000
    zipf_s: float = 1.1
    processes: int = 8
    cache_per_process: int = 16
    trace_requests: int = 200_000
    warmup_s: float = 15.0
    open_rate: float = 30.0
    open_s: float = 30.0
    concurrency: int = 32
    saturated_s: float = 30.0
    sim_processes: tuple[int, ...] = (8, 32, 128)
    sim_cache_per_process: int = 4
    sim_requests: int = 60_000
    sim_warmup: int = 10_000
    notes: tuple[str, ...] = ()


MODES = {
    "full": ModelsMode(),
    "quick": ModelsMode(processes=4, cache_per_process=16, warmup_s=6.0, open_s=10.0, saturated_s=10.0,
                        sim_requests=30_000, sim_warmup=5_000,
                        notes=("quick: 4 processes, 10 s windows, 30,000 simulated requests; indicative only",)),
}


class Sequencer:
    """Hands out requests in trace order: request ``n`` of a system is model ``trace[n]``."""

    def __init__(self, trace: Any) -> None:
        self.trace = trace
        self.next = 0

    def take(self) -> tuple[int, int]:
        n = self.next
        self.next += 1
        return n, int(self.trace[n % len(self.trace)])


async def _phase(send: Callable[[int], Any], seq: Sequencer, kind: str, mode: ModelsMode, seconds: float) -> dict:
    """One load phase; every request counts (completed or failed), latencies of those that succeeded."""
    latencies: list[float] = []
    errors: list[str] = []
    first = seq.next
    started = time.perf_counter()
    end = started + seconds

    async def one(scheduled: float) -> None:
        _, model = seq.take()
        try:
            await send(model)
        except Exception as exc:  # counted, first kept for the report
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        else:
            latencies.append((time.perf_counter() - scheduled) * 1000)

    if kind == "closed":
        async def user() -> None:
            while time.perf_counter() < end:
                await one(time.perf_counter())
        await asyncio.gather(*(user() for _ in range(mode.concurrency)))
    else:
        tasks, t = [], started
        while True:
            t += 1.0 / mode.open_rate
            if t >= end:
                break
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(t)))
        await asyncio.gather(*tasks)
    took = time.perf_counter() - started
    return {"kind": kind, "requests": seq.next - first, "ok": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": took, "throughput": len(latencies) / took,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "trace_span": [first, seq.next]}


def _cpu_seconds(parts: Callable[[], dict[str, float]] | None) -> dict[str, float]:
    """CPU seconds so far: the whole machine's, the load generator's (this process) and ``parts``' own."""
    from bench.procs import machine_busy_seconds, own_cpu_seconds

    return {"machine": machine_busy_seconds(), "load generator": own_cpu_seconds(), **(parts() if parts else {})}


async def _measure(send: Callable[[int], Any], counters: Callable[[], dict], mode: ModelsMode, trace: Any,
                   cpu: Callable[[], dict[str, float]] | None = None) -> dict:
    """The phases of one system; ``cpu`` gives the CPU seconds of its parts so far (API, workers, Redis)."""
    seq = Sequencer(trace)
    out: dict[str, Any] = {}
    await _phase(send, seq, "closed", dataclasses.replace(mode, concurrency=16), mode.warmup_s)
    for name, kind, seconds in (("open", "open", mode.open_s), ("saturated", "closed", mode.saturated_s)):
        before, cpu_before = counters(), _cpu_seconds(cpu)
        phase = await _phase(send, seq, kind, mode, seconds)
        cpu_after, after = _cpu_seconds(cpu), counters()
        # CPU milliseconds per completed request, by part: where a request's cost goes (and a cold load's)
        phase["cpu_ms_per_request"] = {part: 1000.0 * (cpu_after[part] - cpu_before[part]) / phase["ok"]
                                       for part in cpu_after} if phase["ok"] else {}
        loads = after["loads"] - before["loads"]
        phase["loads"] = loads
        phase["loads_per_1000"] = 1000.0 * loads / phase["requests"] if phase["requests"] else None
        phase["hit_ratio"] = 1.0 - loads / phase["requests"] if phase["requests"] else None
        phase["load_ms_mean"] = (after["load_ms"] - before["load_ms"]) / loads if loads else None
        start, end = phase["trace_span"]
        ideal_hits = _ideal_hits(trace, start, end, mode.processes * mode.cache_per_process)
        phase["ideal_hit_ratio"] = ideal_hits / (end - start) if end > start else None
        out[name] = phase
    return out


def _ideal_hits(trace: Any, start: int, end: int, capacity: int) -> int:
    """Hits of one LRU of ``capacity`` over ``trace[start:end]``, warmed by everything before it (d)."""
    from collections import OrderedDict

    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for n in range(end):
        model = int(trace[n % len(trace)])
        if model in cache:
            cache.move_to_end(model)
            hits += n >= start
            continue
        cache[model] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def _fleet(name: str, cache_aware: bool, ctx: dict, mode: ModelsMode, log: Callable[[str], None]) -> dict:
    import aiohttp

    from bench.procs import tree_cpu_seconds

    from bench.manymodels.fleet import FleetManyModels

    db = {"a": 1, "b": 2}[name]
    fleet = FleetManyModels(name, ctx["redis_url"].rsplit("/", 1)[0] + f"/{db}", ctx["store"], ctx["logs"],
                            mode.processes, mode.cache_per_process, cache_aware)
    try:
        fleet.start()
        log(f"({name}) fleet up: {mode.processes} processes x {mode.cache_per_process} models, "
            f"cache-aware {cache_aware}")

        async def go() -> dict:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=60)) as session:
                async def send(model: int) -> None:
                    await fleet.predict(session, workload.model_key(model), ctx["series"][model % len(ctx["series"])])
                return await _measure(send, fleet.counters, mode, ctx["trace"],
                                      lambda: {**fleet.cpu_seconds(), "redis": tree_cpu_seconds([ctx["redis"]])})
        result = asyncio.run(go())
        result["copies"] = fleet.copies()
        return result
    finally:
        fleet.stop()


def _ray(ctx: dict, mode: ModelsMode, log: Callable[[str], None]) -> dict:
    import aiohttp

    from bench.manymodels.ray_serve import RayMultiplex, make_body

    # NOTE: Serve's default of 5 requests in flight per replica collapses its throughput at 32 in flight (its
    # router backs off while every replica is full); it is given what the load generator sends at most.
    ray = RayMultiplex(ctx["store"], mode.processes, mode.cache_per_process, 1, max_ongoing_requests=mode.concurrency)
    bodies = [make_body(s) for s in ctx["series"]]
    try:
        ray.start()
        log(f"(c) Ray Serve up: {mode.processes} replicas, max_num_models_per_replica={mode.cache_per_process}")

        def counters() -> dict:
            total = ray.stats()["total"]
            return {"loads": float(total["loads"]), "load_ms": float(sum(total["load_ms"]))}

        async def go() -> dict:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=60)) as session:
                async def send(model: int) -> None:
                    await ray.predict(session, workload.model_id(model), bodies[model % len(bodies)])
                return await _measure(send, counters, mode, ctx["trace"])
        result = asyncio.run(go())
        total = ray.stats()["total"]
        result["cold_load_ms"] = {"p50": total["load_ms_p50"], "p99": total["load_ms_p99"], "n": total["loads"]}
        return result
    finally:
        ray.stop()


def _cold_loads(store: Path, log: Callable[[str], None]) -> dict:
    """The fleet's cold-load time of the store's small models, through the simple adapter's real load path."""
    from bench.coldload import measure

    from shared import store_layout
    from shared.schemas import ModelKey

    result = measure(store, [store_layout.model_dir(store, ModelKey(**workload.model_key(0)))], repeats=50)
    new = result["models"][0]["new"]
    log(f"cold load of a small model: p50 {new['p50_ms']:.2f} ms, p99 {new['p99_ms']:.2f} ms")
    return result


def _simulate(ctx: dict, mode: ModelsMode, hit_ms: float, load_ms: float, log: Callable[[str], None]) -> list:
    from bench.manymodels.simulate import simulate

    trace = workload.zipf_trace(mode.n_models, mode.sim_requests, mode.zipf_s, seed=1)
    rows = []
    for processes in mode.sim_processes:
        capacity = processes * mode.sim_cache_per_process
        plain_miss = 1.0 - workload.ideal_lru(trace, mode.sim_cache_per_process)["hit_ratio"]
        rate = 0.7 * processes / ((hit_ms + plain_miss * load_ms) / 1000.0)
        row: dict[str, Any] = {"processes": processes, "cache_per_process": mode.sim_cache_per_process,
                               "rate": rate, "ideal": workload.ideal_lru(trace[mode.sim_warmup:], capacity)}
        for aware in (False, True):
            row["cache_aware" if aware else "plain"] = simulate(
                trace, processes, mode.sim_cache_per_process, hit_ms, load_ms, rate, aware, ctx["redis_url"],
                warmup=mode.sim_warmup)
        rows.append(row)
        log(f"simulated {processes} processes: plain {row['plain']['hit_ratio']:.3f}, cache-aware "
            f"{row['cache_aware']['hit_ratio']:.3f}, ideal {row['ideal']['hit_ratio']:.3f}")
    return rows


def run(mode: ModelsMode, systems: tuple[str, ...], out_dir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    from bench.broker import start_redis
    from bench.host import machine
    from bench.procs import install_cleanup, orphans, stop_all

    install_cleanup()
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    logs = work / "logs"
    logs.mkdir()
    result: dict[str, Any] = {"mode": dataclasses.asdict(mode), "machine": machine(), "systems": {}, "failures": []}
    redis_proc, redis_url = start_redis(work, logs, None)
    try:
        store = work / "store"
        result["store"] = workload.write_store(store, mode.n_models)
        log(f"{mode.n_models} models written in {result['store']['seconds']:.1f} s")
        ctx = {"redis_url": redis_url, "redis": redis_proc, "store": store, "logs": logs,
               "trace": workload.zipf_trace(mode.n_models, mode.trace_requests, mode.zipf_s, seed=0),
               "series": [s.tolist() for s in workload.sample_series(16)]}
        result["cold_loads"] = _cold_loads(store, log)
        steps = {"a": lambda: _fleet("a", False, ctx, mode, log), "b": lambda: _fleet("b", True, ctx, mode, log),
                 "c": lambda: _ray(ctx, mode, log)}
        for key in systems:
            try:
                result["systems"][key] = steps[key]()
                sat = result["systems"][key]["saturated"]
                log(f"({key}) saturated {sat['throughput']:.1f}/s, hit ratio {sat['hit_ratio']:.3f}, "
                    f"p99 {sat['p99_ms']:.0f} ms")
            except Exception as exc:  # one system failing is reported, the others still run
                log(f"({key}) failed: {type(exc).__name__}: {exc}")
                result["failures"].append({"system": key, "error": f"{type(exc).__name__}: {exc}"[:500]})
        hit_ms, load_ms = _service_times(result)
        result["simulation"] = {"hit_ms": hit_ms, "load_ms": load_ms, "rows": _simulate(ctx, mode, hit_ms, load_ms,
                                                                                         log)}
    finally:
        redis_proc.stop(5)
        stop_all()
    result["leftover_processes"] = orphans()
    from bench.manymodels.report import write

    return write(result, out_dir, date.today().isoformat())


def _service_times(result: dict) -> tuple[float, float]:
    """A hit's and a cold load's cost for the simulation: the fleet's measured cold load (p50, small model, new
    path) and the per-job service time of (b)'s saturated phase less its loads."""
    load_ms = result["cold_loads"]["models"][0]["new"]["p50_ms"]
    b = result["systems"].get("b") or result["systems"].get("a")
    if not b:
        return 1.0, load_ms
    sat = b["saturated"]
    per_job_ms = 1000.0 * result["mode"]["processes"] / max(sat["throughput"], 1e-9)
    hit_ms = max(0.1, per_job_ms - (sat["loads_per_1000"] or 0) / 1000.0 * load_ms)
    return hit_ms, load_ms


def dumps(result: dict) -> str:
    return json.dumps(result, indent=1, default=str)

"""One benchmark run: set up, measure every system in turn, tear down, hand the records to the report.

Order: models and inputs, the wire-encoding micro-measurement, Redis, (a) in-process, (b) plain Celery,
(b2) celery-batches, (c)+(d) the fleet with batching off then on, (e) Triton, (f) TorchServe. Each system is
started, warmed up, measured and stopped before the next starts, so that only one system uses the server cores
at a time. Whatever happens, every process the run started is stopped (``finally`` + ``atexit``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench import host
from bench import config
from bench.config import BATCH_JOB_CONCURRENCY, BATCH_JOB_SIZE, OPEN_LOOP_FRACTION, SATURATION_CONCURRENCY, RunMode
from bench.report import DEFAULT_ENGINE
from bench.procs import core_split, install_cleanup, orphans, stop_all
from bench.systems.base import BenchContext, Point, System

SAT = SATURATION_CONCURRENCY
ALL_SYSTEMS = ("a", "b", "b2", "c", "d", "g", "e", "h", "f")


def plan(system: str, mode: RunMode, fleet_mode: str = "") -> list[Point]:
    """The points measured on ``system`` in ``mode`` (open-loop points are added once the rate is known)."""
    cs = mode.concurrencies
    # NOTE: quick mode measures the default engine (batching) in full and Celery's prefork engine in brief.
    on_quick = fleet_mode != "batching" and not mode.extended
    if system == "b":
        return [Point("ref", "json-list", concurrency=c) for c in cs] + [Point("small", "json-list", concurrency=SAT)]
    if system == "b2":
        extra = [Point("small", "msgpack-tensor", concurrency=SAT)] if mode.extended else []
        return [Point("ref", "msgpack-tensor", concurrency=c) for c in (cs if mode.extended else (SAT,))] + extra
    if system == "c":
        points = [Point("ref", "msgpack-tensor", concurrency=c) for c in cs]
        points.append(Point("small", "msgpack-tensor", concurrency=SAT))
        if not on_quick:
            points += [Point("ref", "json-list", concurrency=SAT),
                       Point("ref", "msgpack-tensor", concurrency=BATCH_JOB_CONCURRENCY, kind="batch",
                             items=BATCH_JOB_SIZE)]
        return points
    if system == "d":
        points = [Point("ref", "msgpack-tensor", concurrency=c) for c in (cs if not on_quick else (1, SAT))]
        if not on_quick:
            points.append(Point("ref", "json-list", concurrency=SAT))
        if mode.extended or not on_quick:
            points.append(Point("small", "msgpack-tensor", concurrency=SAT))
        return points
    if system in ("e", "f", "g", "h"):
        points = [Point("ref", "binary", concurrency=c) for c in cs]
        return points + ([Point("small", "binary", concurrency=SAT)] if mode.extended else [])
    raise ValueError(system)


class Runner:
    def __init__(self, mode: RunMode, systems: tuple[str, ...], log: Callable[[str], None] = print,
                 keep: bool = False) -> None:
        self.mode = mode
        self.systems = systems
        self.log = log
        self.keep = keep
        self.records: list[dict[str, Any]] = []
        self.systems_info: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []
        self.meta: dict[str, Any] = {}

    # -- set-up ----------------------------------------------------------------------------------------------
    def _context(self, workdir: Path) -> BenchContext:
        import torch

        from bench.broker import start_redis
        from bench.models import MODELS, sample_series, save_models

        torch.set_num_threads(1)  # the load generator never runs a model; keep torch off the server cores
        server_cpus, client_cpus = core_split(config.SERVER_CORES)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        store = workdir / "model-store"
        self.meta["models"] = save_models(store)
        inputs = {name: sample_series(m, 16) for name, m in MODELS.items()}
        ctx = BenchContext(mode=self.mode, workdir=workdir, store_dir=store, redis_url="", redis_proc=None,
                           server_cpus=server_cpus, inputs=inputs, log=self.log)
        ctx.redis_proc, ctx.redis_url = start_redis(workdir, ctx.log_dir, server_cpus)
        self.meta["cores"] = {"server": sorted(server_cpus) if server_cpus else "shared",
                              "client": sorted(client_cpus) if client_cpus else "shared",
                              "machine": len(os.sched_getaffinity(0)) if not client_cpus else
                              len(server_cpus or ()) + len(client_cpus)}
        return ctx

    # -- the run ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        install_cleanup()
        started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
        self.meta.update(host.machine(), mode=self.mode.name, mode_notes=list(self.mode.notes),
                         started_at=time.strftime("%Y-%m-%d %H:%M:%S %z"), workdir=str(workdir))
        ok = False
        try:
            ctx = self._context(workdir)
            self._encodings(ctx)
            asyncio.run(self._measure_all(ctx))
            ok = not self.failures
        finally:
            gc.collect()  # drop unconsumed Celery results while Redis still answers their unsubscribe
            stop_all()
            self.meta["orphans"] = orphans()
            self.meta["loadavg_end"] = os.getloadavg()
            self.meta["duration_s"] = round(time.monotonic() - started, 1)
            if ok and not self.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                self.log(f"bench: work directory (logs) kept at {workdir}")
        return {"meta": self.meta, "records": self.records, "systems": self.systems_info,
                "failures": self.failures}

    def _encodings(self, ctx: BenchContext) -> None:
        from bench.encodings import measure
        from bench.models import REFERENCE

        self.log("wire encodings: 512x7 float32 as JSON lists, JSON+base64, msgpack")
        self.meta["encodings"] = measure(ctx.inputs["ref"][0], REFERENCE.key_fields(),
                                         budget_s=0.2 if self.mode.name == "quick" else 1.0)

    async def _measure_all(self, ctx: BenchContext) -> None:
        from bench.systems.celery_batches import CeleryBatches
        from bench.systems.fleet import FleetCelery, FleetDeployment, FleetHttp, FleetOipGrpc
        from bench.systems.inprocess import InProcess
        from bench.systems.plain_celery import PlainCelery
        from bench.systems.torchserve import TorchServe
        from bench.systems.triton import Triton, TritonGrpc

        if "a" in self.systems:
            self._step("a", "in-process limit", lambda: self.records.extend(InProcess(ctx).run()))
            self.systems_info.append(InProcess(ctx).describe())
        if "b" in self.systems:
            await self._system(PlainCelery(ctx), plan("b", self.mode))
        if "b2" in self.systems:
            await self._system(CeleryBatches(ctx), plan("b2", self.mode))
        for db, fleet_mode in enumerate(config.FLEET_MODES, start=3):
            if not {"c", "d", "g"} & set(self.systems):
                break
            deployment = FleetDeployment(ctx, fleet_mode, db)
            try:
                if "c" in self.systems:
                    await self._system(FleetCelery(ctx, deployment), plan("c", self.mode, fleet_mode), stop=False)
                if "d" in self.systems:
                    await self._system(FleetHttp(ctx, deployment), plan("d", self.mode, fleet_mode), stop=False,
                                       open_loop=True)
                if "g" in self.systems and fleet_mode == DEFAULT_ENGINE:  # the default, beside Triton's gRPC
                    await self._system(FleetOipGrpc(ctx, deployment), plan("g", self.mode), stop=False)
            finally:
                deployment.stop()
        if "e" in self.systems or "h" in self.systems:
            triton = Triton(ctx)
            try:
                if "e" in self.systems:
                    await self._system(triton, plan("e", self.mode), stop=False, variants=self.mode.triton_variants)
                elif self._step("e", "start Triton for (h)", triton.start):
                    triton.set_variant(self.mode.triton_variants[0])
                if "h" in self.systems and triton.variant:
                    await self._system(TritonGrpc(triton), plan("h", self.mode), stop=False)
            finally:
                triton.stop()
        if "f" in self.systems:
            await self._system(TorchServe(ctx), plan("f", self.mode))

    def _step(self, key: str, what: str, fn: Callable[[], None]) -> bool:
        t = time.monotonic()
        self.log(f"[{key}] {what} ...")
        try:
            fn()
            self.log(f"[{key}] {what}: done in {time.monotonic() - t:.1f} s")
            return True
        except Exception as exc:
            self.log(f"[{key}] {what} FAILED: {type(exc).__name__}: {exc}")
            self.failures.append({"system": key, "step": what, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]})
            return False

    async def _system(self, system: System, points: list[Point], stop: bool = True, open_loop: bool = False,
                      variants: tuple[str, ...] = ()) -> None:
        def tag() -> str:
            return f"{system.key}{' ' + system.variant if system.variant else ''}"
        try:
            if not self._step(system.key, f"start {system.name} {system.variant}".strip(), system.start):
                return
            if variants:
                points = await self._pick_variant(system, points, variants)
            else:
                await system.warm_up()
            for point in points:
                await self._point(system, point, tag())
            if open_loop:
                sat = self._find(system.key, system.variant, "ref", "msgpack-tensor", SAT)
                if sat and sat["throughput"] > 0:
                    rate = round(OPEN_LOOP_FRACTION * sat["throughput"], 1)
                    await self._point(system, Point("ref", "msgpack-tensor", pattern="open", rate=rate,
                                                    concurrency=0), tag())
            self.systems_info.append(system.describe())
        except Exception as exc:
            self.log(f"[{tag()}] FAILED: {type(exc).__name__}: {exc}")
            self.failures.append({"system": system.key, "step": "measure", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]})
        finally:
            if stop:
                system.stop()

    async def _pick_variant(self, system: Any, points: list[Point], variants: tuple[str, ...]) -> list[Point]:
        """Measure the saturated reference point on each variant; keep the best for the other points."""
        sat_point = next(p for p in points if p.model == "ref" and p.concurrency == SAT)
        best: tuple[float, str] | None = None
        for variant in variants:
            system.set_variant(variant)
            await system.warm_up()
            record = await self._point(system, sat_point, f"{system.key} {system.variant}")
            if record and (best is None or record["throughput"] > best[0]):
                best = (record["throughput"], variant)
        if best is None:
            raise RuntimeError("no variant could be measured")
        if len(variants) > 1:
            system.set_variant(best[1])
            await system.warm_up()
        for record in self.records:
            if record["system"] == system.key:
                record["chosen"] = record["variant"] == system.variant
        system.notes.append(f"best layout at c={SAT}: {system.variant} (of {', '.join(variants)})")
        return [p for p in points if p is not sat_point]

    async def _point(self, system: System, point: Point, tag: str) -> dict[str, Any] | None:
        t = time.monotonic()
        try:
            record = await system.measure(point)
        except Exception as exc:
            self.log(f"[{tag}] {point.label} FAILED: {type(exc).__name__}: {exc}")
            self.failures.append({"system": system.key, "step": point.label, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-3000:]})
            return None
        self.records.append(record)
        err = f", {record['errors']:.0f} errors ({record.get('first_error', '')})" if record["errors"] else ""
        self.log(f"[{tag}] {point.label}: {record['throughput']:.1f}/s, p50 {record['p50_ms']:.1f} ms, "
                 f"p99 {record['p99_ms']:.1f} ms, cpu {record['cpu_per_1k_s']:.2f} s/1k{err} "
                 f"({time.monotonic() - t:.1f} s)")
        return record

    def _find(self, system: str, variant: str, model: str, encoding: str, concurrency: int) -> dict[str, Any] | None:
        for record in self.records:
            if (record["system"], record["variant"], record["model"], record["encoding"], record["concurrency"],
                    record["pattern"]) == (system, variant, model, encoding, concurrency, "closed"):
                return record
        return None

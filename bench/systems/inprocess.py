"""(a) The in-process limit: the model's batched forward with the fleet's own pre/post-processing, no transport.

Two layouts on the two server cores: one process with two torch threads (``1x2``) and two processes with one
thread each (``2x1``, throughputs summed). Each process is a child (``python -m bench.systems.inprocess``)
that loads both models, warms up, reports READY, and on the parent's start time runs one time slot per
(repetition, model, batch size), all processes on the same clock. The limit is the best throughput of these.
The one-thread, batch-1 latency (the reference for target "(c) at one request in flight") is measured after,
in the ``1x2`` process switched to one thread, alone on the machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import Proc, machine_busy_seconds, own_cpu_seconds, python_env, wait_until
from bench.stats import median_summary, percentile

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}


class InProcess:
    key = "a"
    name = "in-process forward"

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def _spawn(self, tag: str, threads: int, plan: list[tuple[str, int]], c1: bool, out: Path) -> Proc:
        argv = [sys.executable, "-m", "bench.systems.inprocess", "--store", str(self.ctx.store_dir), "--out", str(out),
                "--threads", str(threads), "--slot", str(self.ctx.mode.inproc_slot_s),
                "--plan", json.dumps(plan)] + (["--c1"] if c1 else [])
        env = python_env(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        # NOTE: stdout is the log file; the child talks through files next to ``out`` (no pipes to drain).
        return Proc(f"inprocess-{tag}", argv, env, self.ctx.log_dir, cpus=self.ctx.server_cpus, cwd=ROOT)

    def run(self) -> list[dict[str, Any]]:
        """Start every child at once (they load in parallel), then run the layouts one after the other."""
        mode = self.ctx.mode
        plan = [(model, batch) for _ in range(mode.reps) for model in ("ref", "small") for batch in mode.inproc_batches]
        layouts: dict[str, list[tuple[Proc, Path]]] = {}
        try:
            for layout, (n_procs, threads) in LAYOUTS.items():
                layouts[layout] = []
                for k in range(n_procs):
                    out = self.ctx.workdir / f"inproc-{layout}-{k}.jsonl"
                    for stale in (out, out.with_suffix(".ready"), out.with_suffix(".go")):
                        stale.unlink(missing_ok=True)
                    layouts[layout].append((self._spawn(f"{layout}-{k}", threads, plan, layout == "1x2", out), out))
            everyone = [pair for pairs in layouts.values() for pair in pairs]
            wait_until(lambda: all(out.with_suffix(".ready").exists() for _, out in everyone), 120,
                       "the in-process children", [proc for proc, _ in everyone])
            records: list[dict[str, Any]] = []
            for layout, pairs in layouts.items():
                n_procs, threads = LAYOUTS[layout]
                busy0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
                results = self._drive(pairs, len(plan) + 2)
                # Noise: what the machine spent on anything but these children and the bench itself meanwhile.
                children = sum(row["cpu_s"] for rows in results for row in rows)
                other = (machine_busy_seconds() - busy0 - children - (own_cpu_seconds() - own0))
                other_load = max(0.0, other) / max(1e-9, time.monotonic() - t0)
                for record in self._combine(layout, n_procs, threads, results):
                    record["other_load"] = other_load
                    records.append(record)
            return records
        finally:
            for pairs in layouts.values():
                for proc, _ in pairs:
                    proc.stop(5)

    def _drive(self, procs: list[tuple[Proc, Path]], n_slots: int) -> list[list[dict[str, Any]]]:
        """Give the (ready) children of one layout a common start time; collect their slot results."""
        start_at = time.time() + 0.2
        for _, out in procs:
            out.with_suffix(".go").write_text(str(start_at))
        deadline = time.monotonic() + n_slots * self.ctx.mode.inproc_slot_s * 4 + 60
        for proc, _ in procs:
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.alive():
                raise TimeoutError(f"{proc.name} did not finish its slots")
            if proc.proc.returncode != 0:
                raise RuntimeError(f"{proc.name} failed:\n{proc.log_tail()}")
        return [[json.loads(line) for line in out.read_text().splitlines() if line.strip()] for _, out in procs]

    def _combine(self, layout: str, n_procs: int, threads: int,
                 results: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        by_point: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
        for slot_rows in zip(*results):  # the same slot in every process
            first = slot_rows[0]
            predictions = sum(r["predictions"] for r in slot_rows)
            cpu = sum(r["cpu_s"] for r in slot_rows)
            lat = [x for r in slot_rows for x in r["latencies_ms"]]
            variant = layout if first["kind"] == "slot" else "1x1"
            rep = {"throughput": sum(r["predictions"] / r["seconds"] for r in slot_rows),
                   "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
                   "mean_ms": statistics.fmean(lat) if lat else float("nan"),
                   "cpu_per_1k_s": cpu / predictions * 1000 if predictions else float("nan"),
                   "client_cpu_per_1k_s": float("nan"), "completed": predictions, "errors": 0,
                   "seconds": statistics.fmean(r["seconds"] for r in slot_rows)}
            by_point.setdefault((first["model"], first["batch"], variant), []).append(rep)
        records = []
        for (model, batch, variant), reps in by_point.items():
            records.append({"system": self.key, "name": self.name, "variant": variant, "model": model,
                            "encoding": "numpy", "pattern": "inprocess", "concurrency": batch, "rate": 0.0,
                            "kind": "forward", "items": batch, "reps": reps, **median_summary(reps),
                            "layout": {"processes": n_procs if variant != "1x1" else 1,
                                       "threads": threads if variant != "1x1" else 1}})
        return records

    def describe(self) -> dict[str, Any]:
        return {"system": self.key, "name": self.name, "variant": "1x2, 2x1",
                "notes": ["prepare_series + one batched forward + de-normalisation (workers.models.inference), inputs "
                          "already in memory as numpy arrays; 2x1 sums two processes running the same slots"]}


# -- the child process -------------------------------------------------------------------------------------------
def _child(store: str, threads: int, slot: float, plan: list[tuple[str, int]], c1: bool, out: Path) -> None:
    import torch

    from bench.models import MODELS, sample_series
    from bench.systems.forecaster import load_all

    torch.set_num_threads(threads)
    models = load_all(store, threads)
    inputs = {name: sample_series(MODELS[name], 64) for name in models}
    for name, f in models.items():  # warm-up: allocator, kernels, caches
        for batch in (1, 8):
            f.predict_batch(inputs[name][:batch])
    out.with_suffix(".ready").write_text("1")
    go = out.with_suffix(".go")
    while not go.exists():
        time.sleep(0.01)
    start_at = float(go.read_text() or time.time())
    slots = [(m, b, "slot") for m, b in plan]
    if c1:
        slots += [(m, 1, "c1") for m in ("ref", "small")]
    with open(out, "w") as fh:
        for k, (name, batch, kind) in enumerate(slots):
            if kind == "c1":
                torch.set_num_threads(1)
            begin = start_at + k * slot
            while time.time() < begin:
                time.sleep(0.001)
            end = time.perf_counter() + slot
            f, series = models[name], inputs[name][:batch]
            lat: list[float] = []
            cpu0, t0 = time.process_time(), time.perf_counter()
            while True:
                t = time.perf_counter()
                f.predict_batch(series)
                lat.append((time.perf_counter() - t) * 1000)
                if time.perf_counter() >= end:
                    break
            seconds = time.perf_counter() - t0
            fh.write(json.dumps({"model": name, "batch": batch, "kind": kind, "threads": torch.get_num_threads(),
                                 "predictions": batch * len(lat), "seconds": seconds, "latencies_ms": lat,
                                 "cpu_s": time.process_time() - cpu0}) + "\n")
            fh.flush()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--slot", type=float, required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--c1", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    _child(args.store, args.threads, args.slot, [tuple(p) for p in json.loads(args.plan)], args.c1, Path(args.out))


if __name__ == "__main__":
    main()

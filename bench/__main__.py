"""``python -m bench run [--quick]``: the whole benchmark in one command; ``python -m bench chaos [--quick]``: the
chaos run (faults under load, every job accounted for)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from bench.config import MODES
from bench.runner import ALL_SYSTEMS

RESULTS = Path(__file__).resolve().parent / "results"


@click.group()
def cli() -> None:
    """FinSight Fleet benchmark: the fleet against the in-process limit, plain Celery, Triton and TorchServe."""


@cli.command()
@click.option("--quick", is_flag=True, help="Under three minutes: 1 repetition, short windows, fewer points.")
@click.option("--systems", default=",".join(ALL_SYSTEMS), show_default=True,
              help="Comma-separated subset of a,b,b2,c,d,e,f (c and d share the fleet's workers).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default=True, help="Where the .md, .json and .png go.")
@click.option("--keep", is_flag=True, help="Keep the temporary work directory (logs, model store, repositories).")
@click.option("--reps", type=click.IntRange(1, 20), default=None, help="Override the repetitions per point.")
@click.option("--window", type=click.FloatRange(0.5, 600), default=None,
              help="Override the measurement window (seconds) of every point.")
def run(quick: bool, systems: str, out_dir: Path, keep: bool, reps: int | None, window: float | None) -> None:
    """Start everything on loopback, measure every system, stop everything, write the results."""
    from bench import report
    from bench.runner import Runner

    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = [s for s in chosen if s not in ALL_SYSTEMS]
    if unknown:
        raise click.BadParameter(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    started = time.monotonic()

    def log(message: str) -> None:
        click.echo(f"{time.monotonic() - started:7.1f}s  {message}", err=True)

    mode = MODES["quick" if quick else "full"]
    if reps or window:
        mode = dataclasses.replace(
            mode, reps=reps or mode.reps, window_s=window or mode.window_s,
            window_c1_s=min(window or mode.window_c1_s, mode.window_c1_s),
            inproc_slot_s=min(window or mode.inproc_slot_s, mode.inproc_slot_s),
            notes=[*mode.notes, f"overridden: {reps or mode.reps} repetition(s), {window or mode.window_s} s windows"])
    result = Runner(mode, chosen, log=log, keep=keep).run()
    paths = report.write(result, out_dir)
    log(f"results: {paths['md']}, {paths['json']}, {paths['png']}")
    if result["failures"]:
        log(f"{len(result['failures'])} step(s) failed; see the Failures section")
        sys.exit(1)


@cli.command()
@click.option("--quick", is_flag=True, help="A smoke run: 1,500 jobs, shorter gaps between faults.")
@click.option("--engine", type=click.Choice(["batching", "celery"]), default="batching", show_default=True,
              help="The workers' engine (`fleet worker --engine`).")
@click.option("--jobs", type=click.IntRange(100, 1_000_000), default=None,
              help="Accepted predict jobs to reach (default: 10,000; 1,500 with --quick).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default=True, help="Where the .md and .json go.")
@click.option("--keep", is_flag=True, help="Keep the temporary work directory (every process's log, Redis' AOF).")
def chaos(quick: bool, engine: str, jobs: int | None, out_dir: Path, keep: bool) -> None:
    """Load a real fleet over HTTP while killing its processes, poisoning it and restarting Redis; account for
    every job (lost, run twice, failed) and each fault's recovery."""
    from bench.chaos import report
    from bench.chaos.plan import MODES
    from bench.chaos.run import ChaosRun

    started = time.monotonic()

    def log(message: str) -> None:
        click.echo(f"{time.monotonic() - started:7.1f}s  {message}", err=True)

    mode = MODES["quick" if quick else "full"]
    if jobs:
        mode = dataclasses.replace(mode, jobs=jobs, notes=[*mode.notes, f"overridden: {jobs:,} jobs"])
    result = ChaosRun(mode, engine, log=log, keep=keep).run()
    paths = report.write(result, out_dir)
    for line in report.summary(result):
        log(line)
    log(f"results: {paths['md']}, {paths['json']}")
    if result["failures"] or not result.get("verdict", {}).get("ok"):
        sys.exit(1)


@cli.command()
@click.argument("results_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def render(results_json: Path) -> None:
    """Re-render the .md and .png of a results .json (after editing bench/limits.py, say); a chaos run's .md."""
    import json

    from bench import report

    run = json.loads(results_json.read_text())
    if "plan" in run:  # a chaos run's results (python -m bench chaos)
        from bench.chaos import report as chaos_report

        paths = chaos_report.write(run, results_json.parent)
        click.echo(f"results: {paths['md']}, {paths['json']}")
        return
    run.pop("targets", None)
    paths = report.write(run, results_json.parent)
    click.echo(f"results: {paths['md']}, {paths['json']}, {paths['png']}")


@cli.command()
@click.option("--repeats", type=click.IntRange(2, 10_000), default=50, show_default=True,
              help="Cold loads per model and path.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Torch threads (a worker process on this 2-core machine gets 1).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default=True, help="Where the .md and .json go.")
def coldload(repeats: int, threads: int, out_dir: Path) -> None:
    """Cold-load time (disk to first forward) of a small and a reference model of every type, old path vs new."""
    from bench import coldload as cold

    paths = cold.run(out_dir, repeats=repeats, threads=threads)
    click.echo(paths["md"].read_text(), nl=False)
    click.echo(f"results: {paths['md']}, {paths['json']}", err=True)


@cli.command()
@click.option("--quick", is_flag=True, help="4 processes, 10 s windows, a shorter simulation: indicative only.")
@click.option("--systems", default="a,b,c", show_default=True,
              help="Comma-separated subset of a (plain routing), b (cache-aware), c (Ray Serve multiplexing).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default=True, help="Where the .md and .json go.")
def models(quick: bool, systems: str, out_dir: Path) -> None:
    """1,000 models under a Zipf trace: the fleet's plain and cache-aware routing, Ray Serve's multiplexing, the
    ideal LRU, and a simulation of 8, 32 and 128 processes."""
    from bench.manymodels import run as many

    chosen = tuple(s.strip() for s in systems.split(",") if s.strip())
    unknown = [s for s in chosen if s not in ("a", "b", "c")]
    if unknown:
        raise click.BadParameter(f"unknown systems {unknown}; choose from a, b, c")
    started = time.monotonic()

    def log(message: str) -> None:
        click.echo(f"{time.monotonic() - started:7.1f}s  {message}", err=True)

    paths = many.run(many.MODES["quick" if quick else "full"], chosen, out_dir, log)
    click.echo(paths["md"].read_text(), nl=False)
    click.echo(f"results: {paths['md']}, {paths['json']}", err=True)


if __name__ == "__main__":
    cli()

"""Every knob of the benchmark, in one place: run modes (quick / full) and each system's tuning.

The lead tunes the fleet's batching mode here (:data:`FLEET_MODES`); the baselines' settings are those the
issue names (plain Celery as users start from it, celery-batches 32 / 10 ms, Triton and TorchServe batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Cores every system serves on. Servers are pinned to the first two cores when the machine has four or more
#: (the load generator then runs on the others); on a two-core machine everything shares both cores.
SERVER_CORES = 2
#: The concurrency at which "saturated" numbers are compared across systems (targets (c) and (d)).
SATURATION_CONCURRENCY = 64
#: Open-loop rate as a fraction of the saturated throughput of the same system and encoding in this run.
OPEN_LOOP_FRACTION = 0.6
#: Items in one explicit batch job (``fleet.batch_predict``), and batch jobs kept in flight.
BATCH_JOB_SIZE = 64
BATCH_JOB_CONCURRENCY = 4

#: The fleet's pool configurations (engines), each started with the real ``fleet worker`` command; ``env`` is
#: added to the worker's environment. ``batching`` is the default configuration, exactly what ``fleet up`` and
#: ``fleet worker`` run (no setting changed: users run the defaults); ``celery`` is Celery's own prefork worker.
FLEET_MODES: dict[str, dict[str, Any]] = {
    "batching": {"engine": "batching", "concurrency": 2, "env": {}},
    # Measured in brief in quick mode (see bench.runner.plan) to stay under three minutes; in full otherwise.
    "celery": {"engine": "celery", "concurrency": 2, "env": {}},
}
#: Result and job-record TTL given to the fleet under test (the bench makes ~10^5 results; a day would pile up).
FLEET_RESULT_TTL_S = 300

#: celery-batches baseline (b2): flush every 32 requests or every 10 ms, 64 prefetched, two solo workers.
CELERY_BATCHES = {"flush_every": 32, "flush_interval_s": 0.010, "prefetch": 64, "workers": 2}

#: Triton (e): dynamic batching on the Python backend. Variants: instances x torch threads per instance.
TRITON = {"max_batch_size": 64, "max_queue_delay_us": 2000, "preferred_batch_size": [16, 32, 64],
          "variants": {"2x1": (2, 1), "1x2": (1, 2)}}
#: TorchServe (f): batch 32, max delay 10 ms, two workers of one torch thread each.
TORCHSERVE = {"batch_size": 32, "max_batch_delay_ms": 10, "workers": 2, "torch_threads": 1}


@dataclass(frozen=True)
class RunMode:
    """How long and how often to measure; quick mode trades precision for a run under three minutes."""

    name: str
    reps: int
    warmup_s: float
    window_s: float
    #: Window of the one-request-in-flight points (latency, not throughput, is what they measure).
    window_c1_s: float
    concurrencies: tuple[int, ...]
    #: In-process (a): batch sizes and seconds per (batch size, configuration) slot.
    inproc_batches: tuple[int, ...]
    inproc_slot_s: float
    triton_variants: tuple[str, ...]
    #: Per-system switches for the optional points (small model on each baseline, JSON on the batching pool).
    extended: bool
    max_requests_per_window: int = 200_000
    notes: list[str] = field(default_factory=list)


QUICK = RunMode(
    name="quick", reps=1, warmup_s=0.7, window_s=2.5, window_c1_s=1.5,
    concurrencies=(1, SATURATION_CONCURRENCY), inproc_batches=(1, 32, 64), inproc_slot_s=0.8,
    triton_variants=("2x1",), extended=False,
    notes=["quick mode: 1 repetition, 2.5 s windows after 0.7 s warm-up, concurrencies 1 and 64 only, "
           "in-process batches 1/32/64, Triton 2 instances x 1 thread only, "
           "the thread-pool batching engine left out and fewer points on the prefork one; "
           "numbers are indicative, not medians"],
)
FULL = RunMode(
    name="full", reps=3, warmup_s=2.0, window_s=8.0, window_c1_s=5.0,
    concurrencies=(1, 8, 32, SATURATION_CONCURRENCY), inproc_batches=(1, 8, 32, 64), inproc_slot_s=4.0,
    triton_variants=("2x1", "1x2"), extended=True,
    notes=["full mode: medians of 3 repetitions, 8 s windows after 2 s warm-up, concurrencies 1/8/32/64"],
)
MODES = {"quick": QUICK, "full": FULL}

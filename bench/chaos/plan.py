"""What the chaos run does and when: its modes (quick / full) and the fault timeline they give.

The timeline is fixed in advance (offsets from the start of the load) so that the load can be paced to span it:
the load generator submits at ``jobs / planned_s`` per second and keeps going, past the last fault, until
``jobs`` are accepted. Faults that take time to play out (the reaper after a whole worker is lost, the poison
job's deliveries) get a longer gap after them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The fault kinds, in the order they happen.
FAULT_KINDS = ("pool-kill", "worker-kill", "poison", "malformed", "redis-restart")
#: What ``--engine`` accepts: the fleet's two engines (``fleet worker --engine``).
ENGINES = ("batching", "celery")


@dataclass(frozen=True)
class ChaosMode:
    """How many jobs, and how the faults are spaced (all durations in seconds)."""

    name: str
    jobs: int
    #: Load before the first fault (the fleet warms up: models load, batches settle).
    baseline_s: float
    #: Between two faults.
    gap_s: float
    #: After the whole worker is killed: WORKER_LOST_AFTER_SECONDS, a reaper round and the jobs given back.
    reap_wait_s: float
    #: After the poison job is planted: its deliveries, each killed, and the consumers that replace the killed.
    poison_wait_s: float
    #: How long Redis stays down.
    outage_s: float
    #: Load after Redis is back.
    tail_s: float
    #: After the last submission, how long every accepted job has to end before it counts as lost.
    deadline_s: float
    pool_kills: int = 3
    #: Worker processes (``fleet worker``), and processes (consumers) each.
    workers: int = 2
    concurrency: int = 2
    #: Requests the load generator keeps in flight at most.
    in_flight: int = 16
    notes: list[str] = field(default_factory=list)


QUICK = ChaosMode(name="quick", jobs=1_500, baseline_s=4.0, gap_s=3.0, reap_wait_s=12.0, poison_wait_s=8.0,
                  outage_s=2.0, tail_s=5.0, deadline_s=90.0,
                  notes=["quick mode: 1,500 jobs, 3 s between faults, a 2 s Redis outage; a smoke run"])
FULL = ChaosMode(name="full", jobs=10_000, baseline_s=8.0, gap_s=6.0, reap_wait_s=16.0, poison_wait_s=12.0,
                 outage_s=3.0, tail_s=10.0, deadline_s=180.0,
                 notes=["full mode: 10,000 jobs, 6 s between faults, a 3 s Redis outage"])
MODES = {"quick": QUICK, "full": FULL}


@dataclass(frozen=True)
class Step:
    """One fault of the timeline: when (seconds after the load started), which kind, and its label."""

    at_s: float
    kind: str
    label: str


def timeline(mode: ChaosMode) -> list[Step]:
    """The faults of ``mode`` in order, each with its planned offset from the start of the load."""
    steps, t = [], mode.baseline_s
    for i in range(mode.pool_kills):
        steps.append(Step(t, "pool-kill", f"pool process SIGKILL #{i + 1}"))
        t += mode.gap_s
    steps.append(Step(t, "worker-kill", "whole worker SIGKILL (+ a new one)"))
    t += mode.reap_wait_s
    steps.append(Step(t, "poison", "poison job planted"))
    t += mode.poison_wait_s
    steps.append(Step(t, "malformed", "malformed message pushed"))
    t += mode.gap_s
    steps.append(Step(t, "redis-restart", f"Redis SIGKILL, {mode.outage_s:g} s down, restarted (AOF)"))
    return steps


def planned_seconds(mode: ChaosMode) -> float:
    """How long the load is planned to last: the timeline, the outage and the tail."""
    return timeline(mode)[-1].at_s + mode.outage_s + mode.tail_s


def submit_rate(mode: ChaosMode) -> float:
    """Submissions per second that spread ``mode.jobs`` over :func:`planned_seconds`."""
    return mode.jobs / planned_seconds(mode)

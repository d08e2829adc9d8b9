"""Policies the executor applies to every job, each a small class (dramatiq's middleware, as classes).

Before a job runs, :meth:`Policy.check` of each policy, in order, may end it with a typed error (or, for a
duplicate delivery, skip it). :class:`TimeLimit` works around the run instead: the soft limit interrupts the job
in its process, the engine enforces the hard one by replacing the process.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from billiard.exceptions import SoftTimeLimitExceeded

from shared.errors import (DeadlineExceededError, PoisonJobError, FleetError, JobCancelledError,
                           JobTimeoutError)
from shared.settings import soft_time_limit
from workers.executor.delivery import Begun, Delivery


class Skip:
    """A verdict: acknowledge the message without running the job or writing an outcome."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


Verdict = FleetError | Skip | None


class Policy:
    """Decides, before a job runs, whether it may."""

    def check(self, delivery: Delivery, job: Any, begun: Begun) -> Verdict:
        raise NotImplementedError


class AlreadyFinished(Policy):
    """A message delivered again after its job's outcome was stored (a worker died before acknowledging it)
    is acknowledged, never run twice."""

    def check(self, delivery: Delivery, job: Any, begun: Begun) -> Verdict:
        return Skip("the job already finished") if begun.finished_before else None


class DeliveryLimit(Policy):
    """A job whose every run killed its process (OOM, a native crash) fails instead of coming back forever; the
    executor dead-letters its message.

    Args:
        max_deliveries: ``JOB_MAX_DELIVERIES``.
        last_failure: Job id -> what ended its last run, as the engine recorded it ("killed by signal 9 in
            <worker>"), or None; looked up only for a job past the limit.
    """

    def __init__(self, max_deliveries: int, last_failure: Callable[[str], str | None] | None = None) -> None:
        self.max_deliveries = max_deliveries
        self.last_failure = last_failure

    def check(self, delivery: Delivery, job: Any, begun: Begun) -> Verdict:
        if begun.deliveries > self.max_deliveries:
            cause = self.last_failure(delivery.job_id) if self.last_failure else None
            return PoisonJobError(
                f"job {delivery.job_id} was delivered {begun.deliveries} times and never finished "
                f"(JOB_MAX_DELIVERIES={self.max_deliveries}); last run: {cause or 'unknown'}; "
                "it is not run again and its message is in its pool's dead letters")
        return None


class Cancelled(Policy):
    """A job cancelled while it waited never runs."""

    def check(self, delivery: Delivery, job: Any, begun: Begun) -> Verdict:
        if begun.cancelled:
            return JobCancelledError(f"job {delivery.job_id} was cancelled before it started")
        return None


class Deadline(Policy):
    """A job that waited in the queue past its own deadline is not worth running any more."""

    def check(self, delivery: Delivery, job: Any, begun: Begun) -> Verdict:
        passed = getattr(job, "deadline_passed", None)
        if passed is not None and passed(begun.started_at):
            return DeadlineExceededError(f"job {delivery.job_id} waited past its deadline of {job.deadline_s} s")
        return None


def default_policies(max_deliveries: int, last_failure: Callable[[str], str | None] | None = None) -> list[Policy]:
    """The order matters: a duplicate is skipped before it counts against the limit, the rest fail typed."""
    return [AlreadyFinished(), DeliveryLimit(max_deliveries, last_failure), Cancelled(), Deadline()]


class TimeLimit:
    """Per-job time limits: ``hard`` seconds in all (the engine replaces a process past it), ``soft`` before.

    The soft limit raises :class:`SoftTimeLimitExceeded` inside the job (Celery's own exception: its prefork pool
    raises it the same way), which the executor turns into :class:`JobTimeoutError`.
    """

    def __init__(self, hard_s: float, *, arm_soft: bool) -> None:
        self.hard_s = hard_s
        self.soft_s = soft_time_limit(hard_s)
        self.arm_soft = arm_soft
        """Whether this policy arms the soft limit itself (the batching engine) or the engine does (Celery)."""

    def error(self, job_id: str) -> JobTimeoutError:
        return JobTimeoutError(f"job {job_id} ran past its time limit of {self.hard_s:g} s")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Arm the soft limit around a job (or a batch) in this process's main thread."""
        if not self.arm_soft or threading.current_thread() is not threading.main_thread():
            yield
            return

        def expired(*_: Any) -> None:
            raise SoftTimeLimitExceeded()

        previous = signal.signal(signal.SIGALRM, expired)
        armed_at = time.monotonic()
        delay, interval = signal.setitimer(signal.ITIMER_REAL, self.soft_s)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if delay:  # a timer armed before this guard runs on, less the time spent inside it
                signal.setitimer(signal.ITIMER_REAL, max(1e-3, delay - (time.monotonic() - armed_at)), interval)

"""The executor's policies, each alone: what each one decides for a delivery, in which order they decide, and
the soft time limit that really interrupts a job in the main thread (and leaves SIGALRM as it found it)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Iterator

import pytest
from billiard.exceptions import SoftTimeLimitExceeded

from shared import tasks
from shared.errors import DeadlineExceededError, PoisonJobError, JobCancelledError, JobTimeoutError
from shared.schemas import LoadJob, PredictJob
from shared.settings import soft_time_limit
from workers.executor.delivery import Begun, Delivery
from workers.executor.policies import (AlreadyFinished, Cancelled, Deadline, DeliveryLimit, Policy, Skip, TimeLimit,
                                       default_policies)

pytestmark = pytest.mark.unit
NOW = 1_700_000_000.0
JOB_ID = "job-7f3a"


def delivery(task: str = tasks.PREDICT, job_id: str = JOB_ID) -> Delivery:
    return Delivery(job_id, task, {}, tag="tag-1")


def begun(*, cancelled: bool = False, deliveries: int = 1, finished_before: bool = False,
          started_at: float = NOW) -> Begun:
    return Begun(started_at, cancelled, deliveries, finished_before)


def predict_job(**fields: Any) -> PredictJob:
    return PredictJob(symbol="AAPL", timeframe="1h", model_type="patchtst", inputs={"series": [[1.0], [2.0]]},
                      **fields)


def verdict_of(policies: list[Policy], d: Delivery, job: Any, b: Begun) -> Any:
    """What the executor does with the policies: the first verdict that is not None wins."""
    return next((v for v in (p.check(d, job, b) for p in policies) if v is not None), None)


# -- AlreadyFinished ---------------------------------------------------------------------------------------------

def test_a_duplicate_delivery_of_a_finished_job_is_skipped() -> None:
    verdict = AlreadyFinished().check(delivery(), predict_job(), begun(finished_before=True, deliveries=0))
    assert isinstance(verdict, Skip) and "finished" in verdict.reason


def test_a_job_that_did_not_finish_before_is_not_skipped() -> None:
    assert AlreadyFinished().check(delivery(), predict_job(), begun(deliveries=2)) is None


# -- DeliveryLimit -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("deliveries", [1, 2, 3])
def test_deliveries_up_to_the_max_may_run(deliveries: int) -> None:
    assert DeliveryLimit(3).check(delivery(), predict_job(), begun(deliveries=deliveries)) is None


@pytest.mark.parametrize("deliveries", [4, 50])
def test_a_delivery_above_the_max_fails_typed_naming_the_job(deliveries: int) -> None:
    verdict = DeliveryLimit(3).check(delivery(), predict_job(), begun(deliveries=deliveries))
    assert isinstance(verdict, PoisonJobError)
    assert JOB_ID in verdict.message and str(deliveries) in verdict.message and "=3" in verdict.message


# -- Cancelled ---------------------------------------------------------------------------------------------------

def test_a_job_cancelled_while_it_waited_fails_cancelled() -> None:
    verdict = Cancelled().check(delivery(tasks.LOAD), LoadJob(symbol="AAPL", timeframe="1h", model_type="patchtst"),
                                begun(cancelled=True))
    assert isinstance(verdict, JobCancelledError) and JOB_ID in verdict.message


def test_a_job_not_cancelled_may_run() -> None:
    assert Cancelled().check(delivery(), predict_job(), begun()) is None


# -- Deadline ----------------------------------------------------------------------------------------------------

def test_a_predict_that_waited_past_its_deadline_fails_typed() -> None:
    job = predict_job(deadline_s=5, enqueued_at=NOW - 10)
    verdict = Deadline().check(delivery(), job, begun())
    assert isinstance(verdict, DeadlineExceededError) and JOB_ID in verdict.message and "5" in verdict.message


def test_the_deadline_is_judged_at_the_start_the_begin_script_recorded() -> None:
    job = predict_job(deadline_s=5, enqueued_at=NOW)
    assert Deadline().check(delivery(), job, begun(started_at=NOW + 4.9)) is None  # well before the wall clock
    assert isinstance(Deadline().check(delivery(), job, begun(started_at=NOW + 5.1)), DeadlineExceededError)


@pytest.mark.parametrize("fields", [{}, {"deadline_s": 5}, {"enqueued_at": NOW - 3600},
                                    {"deadline_s": 60, "enqueued_at": NOW - 10}])
def test_a_predict_without_a_passed_deadline_may_run(fields: dict[str, Any]) -> None:
    assert Deadline().check(delivery(), predict_job(**fields), begun()) is None


@pytest.mark.parametrize("job", [LoadJob(symbol="AAPL", timeframe="1h", model_type="patchtst"), None, object()],
                         ids=["load", "none", "object"])
def test_jobs_without_a_deadline_are_never_late(job: Any) -> None:
    assert Deadline().check(delivery(tasks.LOAD), job, begun(started_at=NOW + 10 ** 6)) is None


# -- default_policies --------------------------------------------------------------------------------------------

def test_default_policies_are_applied_in_order() -> None:
    policies = default_policies(3)
    assert [type(p) for p in policies] == [AlreadyFinished, DeliveryLimit, Cancelled, Deadline]
    assert policies[1].max_deliveries == 3


def test_a_duplicate_is_skipped_before_it_counts_against_the_limit() -> None:
    late = predict_job(deadline_s=1, enqueued_at=NOW - 100)
    verdict = verdict_of(default_policies(3), delivery(), late,
                         begun(finished_before=True, deliveries=10, cancelled=True))
    assert isinstance(verdict, Skip)


def test_the_delivery_limit_comes_before_cancel_and_deadline() -> None:
    late = predict_job(deadline_s=1, enqueued_at=NOW - 100)
    policies = default_policies(3)
    assert isinstance(verdict_of(policies, delivery(), late, begun(deliveries=4, cancelled=True)),
                      PoisonJobError)
    assert isinstance(verdict_of(policies, delivery(), late, begun(deliveries=3, cancelled=True)), JobCancelledError)
    assert isinstance(verdict_of(policies, delivery(), late, begun(deliveries=3)), DeadlineExceededError)
    assert verdict_of(policies, delivery(), predict_job(), begun(deliveries=3)) is None


def test_the_base_policy_decides_nothing_by_itself() -> None:
    with pytest.raises(NotImplementedError):
        Policy().check(delivery(), predict_job(), begun())


# -- TimeLimit ---------------------------------------------------------------------------------------------------

def _previous_handler(*_: Any) -> None:
    raise AssertionError("the guard let an alarm reach the previous handler")


@pytest.fixture()
def alarm() -> Iterator[None]:
    """SIGALRM with a known handler and no timer armed; pytest-timeout's own handler and timer put back after."""
    handler = signal.getsignal(signal.SIGALRM)
    delay, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, _previous_handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if delay:
            signal.setitimer(signal.ITIMER_REAL, delay, interval)


@pytest.mark.parametrize("hard, soft", [(1.2, 0.6), (1.9, 0.95), (5, 4), (60, 54), (300, 270), (3600, 3570)])
def test_the_soft_limit_comes_from_the_settings_rule(hard: float, soft: float) -> None:
    limit = TimeLimit(hard, arm_soft=True)
    assert limit.hard_s == hard and limit.soft_s == pytest.approx(soft) == soft_time_limit(hard)


def test_the_timeout_error_names_the_job_and_the_hard_limit() -> None:
    err = TimeLimit(1.2, arm_soft=True).error(JOB_ID)
    assert isinstance(err, JobTimeoutError) and JOB_ID in err.message and "1.2 s" in err.message


def test_the_soft_limit_interrupts_a_busy_job_in_the_main_thread(alarm: None) -> None:
    limit = TimeLimit(1.2, arm_soft=True)
    assert limit.soft_s == pytest.approx(0.6)
    started = time.monotonic()

    def busy() -> None:  # pure Python, never sleeps: only the signal can end it early
        deadline = started + 10
        while time.monotonic() < deadline:
            pass
        pytest.fail("the soft time limit never interrupted the job")

    with pytest.raises(SoftTimeLimitExceeded):
        with limit.guard():
            busy()
    elapsed = time.monotonic() - started
    assert limit.soft_s - 0.05 <= elapsed < limit.hard_s
    # the previous handler is back and no alarm is left armed
    assert signal.getsignal(signal.SIGALRM) is _previous_handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_job_that_ends_in_time_leaves_nothing_armed(alarm: None) -> None:
    limit = TimeLimit(1.2, arm_soft=True)
    with limit.guard():
        armed = signal.getitimer(signal.ITIMER_REAL)[0]
        installed = signal.getsignal(signal.SIGALRM)
    assert 0 < armed <= limit.soft_s and installed is not _previous_handler  # it was armed while the job ran
    assert signal.getsignal(signal.SIGALRM) is _previous_handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_job_that_raises_leaves_nothing_armed(alarm: None) -> None:
    with pytest.raises(ValueError, match="boom"):
        with TimeLimit(1.2, arm_soft=True).guard():
            raise ValueError("boom")
    assert signal.getsignal(signal.SIGALRM) is _previous_handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_engine_armed_limit_is_left_alone(alarm: None) -> None:
    """arm_soft=False (the Celery engine arms its own): no handler installed, no timer set."""
    with TimeLimit(1.2, arm_soft=False).guard():
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is _previous_handler
    assert signal.getsignal(signal.SIGALRM) is _previous_handler


def test_off_the_main_thread_the_guard_does_nothing(alarm: None) -> None:
    seen: dict[str, Any] = {}

    def job() -> None:
        try:
            with TimeLimit(1.2, arm_soft=True).guard():
                seen["timer"] = signal.getitimer(signal.ITIMER_REAL)
                seen["handler"] = signal.getsignal(signal.SIGALRM)
        except BaseException as exc:  # signal.signal() off the main thread raises ValueError
            seen["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert seen == {"timer": (0.0, 0.0), "handler": _previous_handler}
    assert signal.getsignal(signal.SIGALRM) is _previous_handler


def test_a_timer_armed_before_the_guard_is_restored(alarm: None) -> None:
    fired = threading.Event()
    signal.signal(signal.SIGALRM, lambda *_: fired.set())
    signal.setitimer(signal.ITIMER_REAL, 30)  # an outer alarm (pytest-timeout's, say), far in the future
    with TimeLimit(1.2, arm_soft=True).guard():
        pass
    remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    assert 25 < remaining <= 30 and not fired.is_set()


def test_an_outer_alarm_due_while_the_guard_ran_fires_after_it_not_never(alarm: None) -> None:
    fired = threading.Event()
    signal.signal(signal.SIGALRM, lambda *_: fired.set())
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    with TimeLimit(1.2, arm_soft=True).guard():
        deadline = time.monotonic() + 0.2  # past the outer alarm, well before the soft limit
        while time.monotonic() < deadline:
            pass
    assert not fired.is_set()  # the guard's own handler held SIGALRM meanwhile
    deadline = time.monotonic() + 5
    while not fired.is_set():  # re-armed for right after the guard: a pure-Python loop lets the handler run
        assert time.monotonic() < deadline, "the outer alarm was lost"

"""The one executor: a delivered job's whole life, the same under both engines.

Given deliveries (task name, job id, raw payload) it parses each, begins them (unless the engine's fetch already
did, in the same round trip), applies the policies in order, runs what may run through the handler table
(the predicts of one call as one forward per model, each other job alone under its time limit), and stores every
outcome — Celery-format result, job record, event, stats and, where the engine acknowledges itself, the ack — in
one MULTI per call (per job for the long kinds). Engines only fetch, dispatch and acknowledge.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from shared import tasks as names
from shared.errors import FleetError, InvalidInputError, PoisonJobError, as_fleet_error
from workers.executor import deadletters
from workers.executor.begin import BeginScript
from workers.executor.delivery import Begun, Delivery
from workers.executor.handlers import SCHEMAS, Handlers
from workers.executor.outcomes import FinishedJob, OutcomeWriter
from workers.executor.payloads import parse_job
from workers.executor.policies import Policy, Skip, TimeLimit

log = logging.getLogger(__name__)
Outcome = BaseModel | FleetError | Skip
#: ``ack(pipe, deliveries)`` adds the engine's acknowledgement of those deliveries to the outcome's MULTI.
Ack = Callable[[Any, Sequence[Delivery]], None]


class JobExecutor:
    """Runs deliveries of one worker process."""

    def __init__(self, handlers: Handlers, outcomes: OutcomeWriter, begin: BeginScript,
                 policies: Sequence[Policy], time_limit: TimeLimit) -> None:
        self.handlers = handlers
        self.outcomes = outcomes
        self.begin = begin
        self.policies = list(policies)
        self.time_limit = time_limit

    def run(self, deliveries: Sequence[Delivery], begun: Sequence[Begun] | None = None,
            ack: Ack | None = None) -> list[Outcome]:
        """Run and record ``deliveries``; returns each one's outcome, in order."""
        if not deliveries:
            return []
        begun = list(begun) if begun is not None else self.begin([d.job_id for d in deliveries])
        outcomes: list[Outcome | None] = [None] * len(deliveries)
        predicts: list[tuple[int, Any]] = []
        others: list[tuple[int, Any]] = []
        for i, (delivery, started) in enumerate(zip(deliveries, begun)):
            verdict, job = self._admit(delivery, started)
            if verdict is not None:
                outcomes[i] = verdict
            elif delivery.task == names.PREDICT:
                predicts.append((i, job))
            else:
                others.append((i, job))
        finished = [FinishedJob(deliveries[i].job_id, None, o) for i, o in enumerate(outcomes)
                    if isinstance(o, FleetError)]
        letters = self._dead_letters(deliveries, begun, outcomes)
        if predicts:
            items = [(deliveries[i].job_id, job) for i, job in predicts]
            ran = self._guarded(lambda: self.handlers.predict(items), [job_id for job_id, _ in items])
            for (i, _), done in zip(predicts, ran):
                outcomes[i] = done.outcome
            finished += ran
        # NOTE: the batch's quick outcomes (and acks) go first, in one MULTI: they must not wait on a long job.
        now_done = [d for d, o in zip(deliveries, outcomes) if o is not None]

        def ack_and_bury(pipe: Any) -> None:
            if ack and now_done:
                ack(pipe, now_done)
            for queue, letter in letters:
                deadletters.push(pipe, self.outcomes.recorder.keys, queue, letter)

        self.outcomes.finish(finished, self.handlers.pool.cache_deltas(),
                             ack_and_bury if (ack and now_done) or letters else None)
        for i, job in others:
            delivery = deliveries[i]
            (done,) = self._guarded(lambda: [self.handlers.table[delivery.task](delivery.job_id, job)],
                                    [delivery.job_id])
            outcomes[i] = done.outcome
            self.outcomes.finish([done], self.handlers.pool.cache_deltas(),
                                 (lambda pipe: ack(pipe, [delivery])) if ack else None)
        return outcomes  # type: ignore[return-value]  (every entry is set by now)

    @staticmethod
    def _dead_letters(deliveries: Sequence[Delivery], begun: Sequence[Begun],
                      outcomes: Sequence[Outcome | None]) -> list[tuple[str, bytes]]:
        """``(queue, entry)`` of each poison job and each unreadable message: they go to their pool's dead letters
        in the MULTI that fails and acknowledges them."""
        found = []
        for delivery, started, outcome in zip(deliveries, begun, outcomes):
            if delivery.queue is None or not isinstance(outcome, FleetError):
                continue
            if isinstance(outcome, PoisonJobError):
                found.append((delivery.queue, deadletters.entry(delivery, outcome, started.deliveries, "poison")))
            elif delivery.refused is not None:
                found.append((delivery.queue, deadletters.entry(delivery, outcome, started.deliveries,
                                                                "unreadable")))
        return found

    def _admit(self, delivery: Delivery, begun: Begun) -> tuple[Outcome | None, Any]:
        """Parse the job and apply the policies: ``(verdict, job)``, the verdict None when the job may run."""
        if delivery.refused is not None:
            return delivery.refused, None
        schema = SCHEMAS.get(delivery.task)
        if schema is None:
            return InvalidInputError(f"unknown task {delivery.task!r}; the fleet runs {', '.join(SCHEMAS)}"), None
        try:
            job = parse_job(schema, delivery.payload)
        except FleetError as err:
            return err, None
        for policy in self.policies:
            verdict = policy.check(delivery, job, begun)
            if verdict is not None:
                if isinstance(verdict, Skip):
                    log.warning("job %s skipped: %s", delivery.job_id, verdict.reason)
                return verdict, job
        return None, job

    def _guarded(self, run: Callable[[], list[FinishedJob]], job_ids: Sequence[str]) -> list[FinishedJob]:
        """Run a handler under the soft time limit; a failure outside the jobs fails them all, typed."""
        try:
            with self.time_limit.guard():
                return run()
        except SoftTimeLimitExceeded:
            return [FinishedJob(job_id, None, self.time_limit.error(job_id)) for job_id in job_ids]
        except Exception as exc:
            err = as_fleet_error(exc)
            if not isinstance(exc, FleetError):
                log.exception("jobs %s failed unexpectedly", ", ".join(job_ids))
            return [FinishedJob(job_id, None, err) for job_id in job_ids]

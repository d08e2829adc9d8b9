"""The Celery engine's request class: a job past its hard time limit ends as the job's typed error.

Celery's pool kills the child and, in the worker's main process, calls :meth:`on_timeout`; Celery acknowledges
the message (it is never run again) and stores a ``TimeLimitExceeded``, over which this stores the job's
``JobTimeoutError`` outcome (result, record, event) the way the executor does.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery.worker.request import Request

from workers.engines.celery import holdings

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _parent_outcomes() -> Any:
    """An outcome writer for the worker's main process (no stats: the job made no prediction)."""
    from shared.settings import get_settings
    from workers.executor.outcomes import outcome_writer
    from workers.process import redis_client

    settings = get_settings()
    return outcome_writer(redis_client(settings), settings)


class FleetRequest(Request):
    """Celery's request, plus the job's typed time-out and the end of its holding (see ``holdings``)."""

    def acknowledge(self) -> None:
        was_acknowledged = self.acknowledged
        super().acknowledge()
        if not was_acknowledged:
            holdings.release(self.message.delivery_tag)

    def reject(self, requeue: bool = False) -> None:
        was_acknowledged = self.acknowledged
        super().reject(requeue)
        if not was_acknowledged:
            holdings.release(self.message.delivery_tag)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        # NOTE: a pool process that died mid-job (WorkerLostError) requeues the job: its record says why, so that
        # a job that keeps killing its process ends as a PoisonJobError naming the cause.
        from billiard.einfo import ExceptionWithTraceback
        from billiard.exceptions import WorkerLostError

        exc = getattr(exc_info, "exception", None)
        exc = exc.exc if isinstance(exc, ExceptionWithTraceback) else exc  # how the pool hands it over
        if isinstance(exc, WorkerLostError):
            from workers.executor.deadletters import record_failed_run

            try:
                pipe = _parent_outcomes().redis.pipeline(transaction=False)
                record_failed_run(pipe, _parent_outcomes().recorder.keys, [self.id],
                                  f"{exc} in {self.hostname}")
                pipe.execute()
            except Exception as err:
                log.warning("could not record why job %s's process died: %s", self.id, err)
        super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        # NOTE: Celery first (it acknowledges, and may store its own TimeLimitExceeded), then the job's own error.
        super().on_timeout(soft, timeout)
        if not soft:
            from workers.executor.outcomes import FinishedJob
            from workers.executor.policies import TimeLimit

            try:
                err = TimeLimit(timeout, arm_soft=False).error(self.id)
                _parent_outcomes().finish([FinishedJob(self.id, None, err)])
            except Exception:  # Celery acknowledged already: the job does not run again either way
                log.exception("could not store the time-out of job %s", self.id)

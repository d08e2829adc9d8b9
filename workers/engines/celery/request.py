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

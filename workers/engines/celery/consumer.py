"""The Celery engine's consumer: Celery's own, except that a message it cannot run is quarantined, not dropped.

Celery acknowledges (or rejects) an undecodable message, one of an unknown format, an unknown task or an invalid
task, and logs it; the message is gone. Here each also lands, raw, in its pool's dead letters with the reason,
and a job whose id is readable fails with a typed ``InvalidInputError`` (its record, result and event), as under
the batching engine. Celery's own handling then runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from shared.errors import InvalidInputError
from workers.executor.delivery import Delivery

log = logging.getLogger(__name__)


def quarantine(message: Any, reason: str) -> None:
    """Dead-letter ``message`` (a kombu message) and fail its job when its id is readable; never raises."""
    from workers.engines.celery.request import _parent_outcomes
    from workers.executor import deadletters
    from workers.executor.outcomes import FinishedJob

    try:
        headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
        job_id = headers.get("id") if isinstance(headers.get("id"), str) else ""
        task = headers.get("task") if isinstance(headers.get("task"), str) else ""
        queue = (getattr(message, "delivery_info", None) or {}).get("routing_key") or "unknown"
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        error = InvalidInputError(f"the message cannot be run: {reason}")
        letter = deadletters.entry(Delivery(job_id, task, None, refused=error, queue=queue, raw=body), error, 1,
                                   "unreadable")
        outcomes = _parent_outcomes()
        keys = outcomes.recorder.keys
        if job_id:
            outcomes.finish([FinishedJob(job_id, None, error)],
                            also=lambda pipe: deadletters.push(pipe, keys, queue, letter))
        else:
            pipe = outcomes.redis.pipeline(transaction=True)
            deadletters.push(pipe, keys, queue, letter)
            pipe.execute()
        log.error("quarantined message of job %r (%s) in the dead letters of %s", job_id or None, reason, queue)
    except Exception:  # quarantine is best effort: Celery's own handling still acknowledges the message
        log.exception("could not quarantine a message Celery refused")


class FleetConsumer(Consumer):
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        quarantine(message, f"undecodable ({type(exc).__name__}: {exc})")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        quarantine(message, "not a task message")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"unknown task ({exc})")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"invalid task message ({exc})")
        super().on_invalid_task(body, message, exc)

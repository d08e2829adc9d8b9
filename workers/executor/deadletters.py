"""Dead letters: the messages no worker will run, kept per pool for an operator to read and requeue.

Two kinds land here, each in the MULTI that stores its job's failure and acknowledges it:

- a **poison job**, delivered past ``JOB_MAX_DELIVERIES`` (every run killed its process or ran out of time),
  with its payload, so that ``POST /v1/dead-letters`` can requeue it once the cause is fixed;
- a **quarantined message** that could not be read at all (not a kombu envelope, invalid UTF-8, a pickled body),
  kept raw (up to :data:`RAW_MAX_BYTES`) with the reason; it cannot be requeued.

Entries are JSON: ``{job_id, task, queue, reason, error: {type, message}, deliveries, dead_at, payload?, raw?}``.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from shared.errors import FleetError
from shared.keys import DEAD_LETTERS_MAX, Keys
from workers.executor.delivery import Delivery

#: Bytes of an unreadable message kept in its entry (enough to see what it was; a giant one is not kept whole).
RAW_MAX_BYTES = 64 * 1024


def entry(delivery: Delivery, error: FleetError, deliveries: int, reason: str) -> bytes:
    """The dead letter of ``delivery``, failed with ``error``."""
    body: dict[str, Any] = {"job_id": delivery.job_id or None, "task": delivery.task or None,
                            "queue": delivery.queue, "reason": reason, "error": error.to_dict(),
                            "deliveries": deliveries, "dead_at": time.time()}
    if delivery.refused is None:
        body["payload"] = delivery.payload
    if delivery.raw is not None:
        raw = delivery.raw if isinstance(delivery.raw, bytes) else str(delivery.raw).encode()
        body["raw"] = raw[:RAW_MAX_BYTES].decode("utf-8", "replace")
        body["raw_bytes"] = len(raw)
    # NOTE: a payload is whatever the producer sent; orjson refuses what JSON cannot hold, and then only its repr
    # is kept, so that writing a dead letter can never fail the MULTI that acknowledges the message.
    try:
        return orjson.dumps(body, default=repr)
    except TypeError:
        body["payload"] = repr(body.get("payload"))[:RAW_MAX_BYTES]
        return orjson.dumps(body, default=repr)


def push(pipe: Any, keys: Keys, queue: str, letter: bytes) -> None:
    """Add ``letter`` to ``queue``'s dead letters on ``pipe``, keeping the newest :data:`DEAD_LETTERS_MAX`."""
    key = keys.dead_letters(queue)
    pipe.rpush(key, letter)
    pipe.ltrim(key, -DEAD_LETTERS_MAX, -1)


#: Field of a job's record: what ended its last run when no outcome could be stored (the engine writes it).
LAST_FAILURE_FIELD = "last_failure"


def record_failed_run(pipe: Any, keys: Keys, job_ids: list[str], cause: str) -> None:
    """Note on each job's record why its run ended without an outcome (its process was killed, say)."""
    for job_id in job_ids:
        pipe.hset(keys.job(job_id), LAST_FAILURE_FIELD, cause)


def last_failure(redis: Any, keys: Keys, job_id: str) -> str | None:
    raw = redis.hget(keys.job(job_id), LAST_FAILURE_FIELD)
    return raw.decode() if isinstance(raw, bytes) else raw

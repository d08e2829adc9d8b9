"""Dead letters from the API side: list them, and requeue a poison job once its cause is fixed (admin scope).

Workers write the entries (``workers.executor.deadletters``: one JSON entry per message, per pool queue). A
requeue takes the entry off its list, gives the job a fresh start (queued record, delivery count 0, no stored
result) and pushes the very message ``send_task`` would write, all in one transaction watched on the list, so
that two requeues of one entry cannot both succeed.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from pydantic import BaseModel, Field
from redis.exceptions import WatchError

from shared import celery_wire, routing
from shared.errors import FleetError, JobNotFoundError
from shared.jobs import event_message
from shared.keys import Keys
from shared.schemas import JobErrorBody

#: Record fields a requeue clears: what the previous runs left (the job starts over).
_RESET_FIELDS = ("error", "finished_at", "started_at", "worker", "last_failure", "progress_done", "progress_total")


class NotRequeueableError(FleetError):
    """The dead letter is an unreadable message (quarantined raw): there is no job to run again."""

    http_status = 409


class DeadLetter(BaseModel):
    """One dead letter: a poison job (with its payload) or a quarantined, unreadable message (raw)."""

    job_id: str | None = None
    task: str | None = None
    queue: str | None = None
    reason: str
    """``poison`` (delivered past ``JOB_MAX_DELIVERIES``) or ``unreadable`` (quarantined)."""
    error: JobErrorBody | None = None
    deliveries: int = 0
    dead_at: float | None = None
    payload: Any = None
    raw: str | None = None
    """The first bytes of an unreadable message, as text (invalid UTF-8 replaced)."""
    raw_bytes: int | None = None


class DeadLetterList(BaseModel):
    dead_letters: list[DeadLetter]


class RequeueRequest(BaseModel):
    job_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")


def pool_queues() -> list[str]:
    return [routing.queue_name(a, d) for a in routing.ADAPTERS for d in routing.DEVICES]


def _parse(raw: bytes) -> DeadLetter | None:
    try:
        return DeadLetter.model_validate(orjson.loads(raw))
    except (ValueError, TypeError):
        return None  # an entry that is not ours (written by hand): listed by nobody, left alone


async def list_dead_letters(redis: Any, keys: Keys, queue: str | None, limit: int) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of ``queue`` (every pool's when None), newest first."""
    queues = [queue] if queue else pool_queues()
    pipe = redis.pipeline(transaction=False)
    for name in queues:
        pipe.lrange(keys.dead_letters(name), -limit, -1)
    found = [letter for raws in await pipe.execute() for raw in raws if (letter := _parse(raw)) is not None]
    found.sort(key=lambda letter: letter.dead_at or 0, reverse=True)
    return found[:limit]


async def requeue(redis: Any, keys: Keys, job_id: str, ttl_s: int) -> DeadLetter:
    """Put a poison job back on its queue, as new.

    Raises:
        JobNotFoundError: no dead letter has that job id (404).
        NotRequeueableError: its dead letter is an unreadable message (409).
    """
    for queue in pool_queues():
        key = keys.dead_letters(queue)
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                match = next(((raw, letter) for raw in await pipe.lrange(key, 0, -1)
                              if (letter := _parse(raw)) is not None and letter.job_id == job_id), None)
                if match is None:
                    continue
                raw, letter = match
                if letter.reason != "poison" or letter.task is None or not isinstance(letter.payload, dict):
                    raise NotRequeueableError(f"dead letter of {job_id!r} is an unreadable message; it cannot run",
                                              field="job_id")
                payload = letter.payload
                list_key, message = celery_wire.task_message(
                    letter.task, job_id, {"job": payload}, queue, routing.broker_priority(payload.get("priority", 5)),
                    kwargsrepr=f"{{'job': <requeued {letter.task}>}}")
                record = keys.job(job_id)
                pipe.multi()
                pipe.lrem(key, 1, raw)
                pipe.hdel(record, *_RESET_FIELDS)
                pipe.hset(record, mapping={"status": "queued", "deliveries": 0, "queue": queue,
                                           "enqueued_at": time.time()})
                pipe.expire(record, ttl_s)
                pipe.delete(keys.celery_result(job_id), keys.job_cancelled(job_id))
                pipe.publish(keys.job_events(job_id), event_message(job_id, "queued"))
                pipe.lpush(list_key, message)
                await pipe.execute()
                return letter
            except WatchError:
                raise JobNotFoundError(f"dead letter of {job_id!r} changed meanwhile; list again",
                                       field="job_id") from None
    raise JobNotFoundError(f"no dead letter for job {job_id!r}", field="job_id")

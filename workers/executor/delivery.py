"""What an engine hands the executor: one delivered job, and what its start recorded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import FleetError


@dataclass
class Delivery:
    """One delivered message: a public task name, the job id and its raw ``job`` payload."""

    job_id: str
    task: str
    payload: Any
    tag: str | None = None
    """The broker's delivery tag, for engines that acknowledge themselves (the batching engine)."""
    refused: FleetError | None = None
    """Set when the message itself could not be read (pickle, say): the job fails with it, unrun."""
    queue: str | None = None
    """The pool queue it came from (dead letters are kept per pool)."""
    raw: bytes | None = None
    """The message as it arrived, kept only for one that could not be read (it is quarantined raw)."""


@dataclass(frozen=True)
class Begun:
    """What marking a job running found (see :mod:`workers.executor.begin`)."""

    started_at: float
    cancelled: bool
    """The job was cancelled while it waited."""
    deliveries: int
    """How many times the job has now been delivered (1 the first time)."""
    finished_before: bool
    """The job's record already says it ended: a duplicate delivery, acknowledged without running again."""

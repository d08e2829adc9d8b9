"""Watching a job without polling: Redis pub/sub on the job's two channels.

A job changes state in two places, and both announce it: Celery's Redis result backend PUBLISHes the result
meta on ``celery-task-meta-<id>`` as it stores it, and the fleet publishes each record change on
``Keys.job_events(id)``. A watch subscribes to both *before* reading the current state, so a change that lands
between the read and the wait still wakes it; every message triggers a fresh read of the document.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from producer_api.jobdoc import JobDocument
from producer_api.records import JobRecords


class JobWatch:
    """A subscription to one job's channels (an async context manager)."""

    def __init__(self, redis: Any, records: JobRecords, job_id: str) -> None:
        self.redis = redis
        self.records = records
        self.job_id = job_id
        self.pubsub: Any = None

    async def __aenter__(self) -> "JobWatch":
        self.pubsub = self.redis.pubsub()
        try:
            await self.pubsub.subscribe(self.records.keys.celery_result(self.job_id),
                                        self.records.keys.job_events(self.job_id))
        except BaseException:
            await self.pubsub.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # NOTE: closing drops the connection; a read cancelled by a timeout may have left it mid-reply.
        await self.pubsub.aclose()

    async def current(self) -> JobDocument:
        """The document now; :class:`JobNotFoundError` for an unknown job."""
        return await self.records.require(self.job_id)

    async def _message(self) -> None:
        # NOTE: timeout=None blocks on the socket without the client's socket_timeout; callers bound the wait.
        while await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=None) is None:
            pass

    async def changes(self, first: JobDocument) -> AsyncIterator[JobDocument]:
        """Each new document after ``first`` (duplicates skipped) until a final one, which is yielded last."""
        last = first
        while not last.final:
            await self._message()
            doc = await self.records.document(self.job_id)
            if doc is not None and doc != last:
                last = doc
                yield doc

    async def until_final(self, timeout: float) -> tuple[JobDocument, bool]:
        """The final document within ``timeout`` s, else the latest one; and whether the job was already final."""
        doc = await self.current()
        if doc.final:
            return doc, True

        async def _final() -> JobDocument:
            latest = doc
            async for latest in self.changes(doc):
                pass
            return latest

        try:
            return await asyncio.wait_for(_final(), timeout), False
        except TimeoutError:
            return await self.current(), False


async def wait_for_job(redis: Any, records: JobRecords, job_id: str, timeout: float) -> tuple[JobDocument, bool]:
    """Subscribe, read, and wait up to ``timeout`` s for ``job_id`` to end (see :meth:`JobWatch.until_final`)."""
    async with JobWatch(redis, records, job_id) as watch:
        return await watch.until_final(timeout)

"""Watching jobs without polling: one shared Redis pub/sub connection for every waiting request.

Every change of a job is announced on its event channel ``Keys.job_events(id)``: the worker's executor
publishes the final event in the same MULTI that stores the result and the record, so a watcher woken by it
always finds both. An event is a small JSON object whose ``status`` field says whether the job ended. A watch
subscribes and waits for the subscription to be *confirmed* before anything reads the job or enqueues it, so a
change that lands in between still wakes it.

Why one connection: a subscription per request costs a pooled connection, and closing it drops the socket, so
every ``?wait`` paid a TCP connect and the client's handshake. :class:`JobChannels` multiplexes: it subscribes
a channel when its first watcher arrives, unsubscribes when its last one leaves, and hands each message to the
watchers' queues. If the connection drops, every watcher is woken to re-read its job and the reader
resubscribes; watchers also re-read on a slow timer, so a lost wake-up costs latency, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, AsyncIterator

import orjson

from producer_api.jobdoc import JobDocument
from producer_api.records import JobRecords, check_job_id
from producer_api.security.principal import Principal
from shared.errors import JobNotFoundError
from shared.jobs import FINAL_STATUSES

log = logging.getLogger(__name__)

#: Seconds a watcher waits for a change before re-reading the job anyway (a safety net, not the mechanism).
RECHECK_S = 2.0
#: Seconds to wait for Redis to confirm a subscription before answering 503.
CONFIRM_TIMEOUT_S = 2.0
#: Seconds between cancels of the reader task on close (see :meth:`JobChannels.close`).
CLOSE_RETRY_S = 0.1
#: What a watcher's queue receives when the connection was lost: re-read, something may have been missed.
RESET = ("", b"")


class JobChannels:
    """Channel subscriptions of many watchers on one pub/sub connection; a background task reads it."""

    def __init__(self, redis: Any, idle_channel: str) -> None:
        self.redis = redis
        self.idle_channel = idle_channel  # keeps the connection subscribed (and so readable) with no watchers
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        self._confirmed: dict[str, asyncio.Future] = {}
        self._pubsub: Any = None
        self._write = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._unsubscribing: set[asyncio.Task] = set()  # held: the loop keeps only weak references to tasks

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._run(), name="job-channels")

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        # NOTE: cancelled until it has stopped: a cancel that lands while a message is being delivered can be
        # swallowed inside the client's read (Python 3.11's asyncio.wait_for), and close must not hang on it.
        while reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait({reader}, timeout=CLOSE_RETRY_S)
        await asyncio.gather(*self._unsubscribing, return_exceptions=True)
        await self._drop_connection()

    async def add(self, channels: tuple[str, ...], queue: asyncio.Queue) -> None:
        """Deliver ``channels``' messages to ``queue`` from now on; returns once Redis confirmed them.

        Raises:
            redis.exceptions.ConnectionError: no confirmation within :data:`CONFIRM_TIMEOUT_S` (503).
        """
        self.start()
        loop = asyncio.get_running_loop()
        new = [ch for ch in channels if ch not in self._watchers]
        for ch in channels:
            self._watchers.setdefault(ch, set()).add(queue)
        for ch in new:
            self._confirmed[ch] = loop.create_future()
        if new and self._pubsub is not None:
            try:
                async with self._write:
                    await self._pubsub.subscribe(*new)
            except Exception as exc:  # the reader notices too, reconnects and subscribes every channel
                log.debug("subscribe failed: %s", exc)
        try:
            await asyncio.wait_for(asyncio.gather(*(asyncio.shield(self._confirmed[ch]) for ch in channels)),
                                   CONFIRM_TIMEOUT_S)
        except TimeoutError:
            self.remove(channels, queue)
            from redis.exceptions import ConnectionError as RedisConnectionError

            raise RedisConnectionError("Redis did not confirm a job subscription in time") from None
        except BaseException:
            self.remove(channels, queue)
            raise

    def remove(self, channels: tuple[str, ...], queue: asyncio.Queue) -> None:
        gone = []
        for ch in channels:
            watchers = self._watchers.get(ch)
            if watchers is None:
                continue
            watchers.discard(queue)
            if not watchers:
                del self._watchers[ch]
                self._confirmed.pop(ch, None)
                gone.append(ch)
        if gone and self._pubsub is not None:
            task = asyncio.get_running_loop().create_task(self._unsubscribe(gone))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, channels: list[str]) -> None:
        try:
            async with self._write:
                # NOTE: checked under the lock: a watcher that came back for a channel meanwhile has sent (or
                # will send, after this) its own SUBSCRIBE, and must not be unsubscribed behind its back.
                channels = [ch for ch in channels if ch not in self._watchers]
                if channels and self._pubsub is not None:
                    await self._pubsub.unsubscribe(*channels)
        except Exception as exc:  # the connection is gone; a new one subscribes only live channels
            log.debug("unsubscribe failed: %s", exc)

    async def _connect(self) -> None:
        pubsub = self.redis.pubsub()
        async with self._write:
            self._pubsub = pubsub
            await pubsub.subscribe(self.idle_channel, *self._watchers)

    async def _drop_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:
                pass

    def _fail_pending(self, exc: BaseException) -> None:
        """Fail the watchers still waiting for a confirmation (503 now, not at the timeout); every channel is
        confirmed afresh after the reconnect."""
        from redis.exceptions import ConnectionError as RedisConnectionError

        loop = asyncio.get_running_loop()
        for ch, future in list(self._confirmed.items()):
            if not future.done():
                future.set_exception(RedisConnectionError(f"Redis is unreachable: {exc}"))
                future.exception()  # retrieved: its watchers raise it themselves
            self._confirmed[ch] = loop.create_future()

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if message["type"] == "subscribe":
            future = self._confirmed.get(channel)
            if future is not None and not future.done():
                future.set_result(None)
        elif message["type"] == "message":
            for queue in self._watchers.get(channel, ()):
                queue.put_nowait((channel, message["data"]))

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._pubsub is None:
                    await self._connect()
                message = await self._pubsub.get_message(timeout=None)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job watch connection lost (%s); reconnecting", exc)
                await self._drop_connection()
                self._fail_pending(exc)
                for queue in {q for watchers in self._watchers.values() for q in watchers}:
                    queue.put_nowait(RESET)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            if message is not None:
                self._dispatch(message)


def announces_final(channel: str, data: bytes | str) -> bool:
    """Whether an event says its job ended: its ``status`` field is a final one.

    Events are small JSON objects (see :func:`shared.jobs.event_message`); one that cannot be read counts as
    final: the watcher re-reads the job, which is the safe side.
    """
    if not channel:
        return True  # RESET
    try:
        status = orjson.loads(data).get("status")
    except (orjson.JSONDecodeError, AttributeError):
        return True
    return status in FINAL_STATUSES


class JobWatch:
    """One job's subscription on the shared connection (an async context manager), for one caller.

    The caller's right to see the job is checked once, by :meth:`current` (every watch starts with it, or with a
    job the caller just enqueued); later reads only follow the same job.

    NOTE: waits are deadlines checked in a loop, never ``asyncio.wait_for`` around a loop of its own: on Python
    3.11 a ``wait_for`` whose inner wait completes in the same step as the outer timeout swallows the
    cancellation, and ``?wait=1e-22`` then spun on the recheck timer forever.
    """

    def __init__(self, channels: JobChannels, records: JobRecords, job_id: str, principal: Principal) -> None:
        self.hub = channels
        self.records = records
        self.job_id = job_id
        self.principal = principal
        self.channels = (records.keys.job_events(job_id),)
        self.queue: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> "JobWatch":
        check_job_id(self.job_id)  # before subscribing: nothing is asked of Redis for an id that cannot exist
        await self.hub.add(self.channels, self.queue)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.hub.remove(self.channels, self.queue)

    async def current(self) -> JobDocument:
        """The document now; :class:`JobNotFoundError` for an unknown job or one the caller does not own."""
        return await self.records.require(self.job_id, self.principal)

    async def _get(self, timeout: float) -> tuple[str, Any] | None:
        """The next message on the queue within ``timeout`` seconds, else None (no cancellation involved)."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        if timeout <= 0:
            return None
        getter = asyncio.ensure_future(self.queue.get())
        try:
            done, _ = await asyncio.wait((getter,), timeout=timeout)
        finally:
            # A getter cancelled before it ran leaves its message on the queue (asyncio.Queue.get's contract).
            if not getter.done():
                getter.cancel()
        return getter.result() if done else None

    async def _next(self, final_only: bool, deadline: float) -> None:
        """Wait for the next event (the next final one when ``final_only``), at most RECHECK_S and never past
        ``deadline`` (the loop's clock)."""
        loop = asyncio.get_running_loop()
        until = min(deadline, loop.time() + RECHECK_S)
        while True:
            message = await self._get(until - loop.time())
            if message is None or not final_only or announces_final(*message):
                return

    async def changes(self, first: JobDocument, final_only: bool = False,
                      deadline: float = math.inf) -> AsyncIterator[JobDocument]:
        """Each new document after ``first`` (duplicates skipped) until a final one, which is yielded last, or
        until ``deadline`` (the loop's clock) has passed, the job being read once more at the deadline.

        With ``final_only``, intermediate messages (queued, running, progress) do not trigger a read.

        Raises:
            JobNotFoundError: the job's record (and result) expired meanwhile.
        """
        loop = asyncio.get_running_loop()
        last = first
        while not last.final:
            await self._next(final_only, deadline)
            doc = await self.records.document(self.job_id)
            if doc is None:
                raise JobNotFoundError(f"job {self.job_id!r} expired while it was watched", field="job_id")
            if doc != last:
                last = doc
                yield doc
            if loop.time() >= deadline:
                return

    async def until_final(self, timeout: float, first: JobDocument | None = None) -> tuple[JobDocument, bool]:
        """The final document within ``timeout`` s, else the latest one; and whether it was final at first.

        ``first``: the document as the caller knows it (a job it just enqueued), saving the initial read. The
        job is read again at the deadline, however short: the answer is never older than the wait.
        """
        doc = first or await self.current()
        if doc.final:
            return doc, True
        latest = doc
        async for latest in self.changes(doc, final_only=True, deadline=asyncio.get_running_loop().time() + timeout):
            pass
        return latest, False

"""Celery events for the batching engine: worker heartbeats from the supervisor, task events from the children.

Flower and ``celery events`` learn of workers and tasks only from the ``celeryev`` exchange. The batching
engine sends the same events as a Celery worker, with Celery's own :class:`celery.events.EventDispatcher`:

* :class:`WorkerHeartbeat` (supervisor): ``worker-online``, ``worker-heartbeat`` every ``interval`` and
  ``worker-offline``, with the fields of :class:`celery.worker.heartbeat.Heart`;
* :class:`TaskEvents` (one per consumer child): ``task-received`` / ``-started`` / ``-succeeded`` / ``-failed``,
  buffered and published per batch as one ``task.multi`` message (one PUBLISH), as Celery's worker does with
  its buffered task group.

Both are best effort: with Redis gone an event is logged and dropped, never raised into a job.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.events import EventDispatcher
from celery.utils.sysinfo import load_average
from celery.worker.state import SOFTWARE_INFO
from kombu import Connection

from workers.engines.batching.remote import NodeInfo

log = logging.getLogger(__name__)

#: NOTE: events are always json: Flower or ``celery events`` configured with nothing but the broker URL accept
#: only json, whatever the fleet's ``event_serializer``.
EVENT_SERIALIZER = "json"
#: How many task events a child buffers at most; past this the buffer is published before the next event.
TASK_BUFFER_LIMIT = 100_000


def _connect(app: Celery) -> Connection:
    """A connection to the broker, established with one attempt.

    kombu would otherwise connect on first publish with its retry loop (seconds of sleeps, or for ever), inside
    a job's hook or a heartbeat that must notice ``stop()``.
    """
    conn = app.connection_for_write()
    try:
        conn.ensure_connection(max_retries=0)
    except Exception:
        _close_quietly(conn)
        raise
    return conn


def _close_quietly(conn: Connection | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except Exception as exc:  # closing a connection to a Redis that went away
        log.debug("events: ignored %r while closing", exc)


class WorkerHeartbeat:
    """Sends a node's worker events from a daemon thread, as Celery's ``Heart`` does.

    Args:
        app: The Celery app (broker URL, event exchange, clock).
        node: What the supervisor knows of its node (hostname, jobs in hand, jobs finished).
        interval: Seconds between heartbeats; sent as ``freq`` (Flower marks a worker offline after a few
            missed ones).
    """

    def __init__(self, app: Celery, node: NodeInfo, interval: float = 2.0) -> None:
        self.app = app
        self.node = node
        self.interval = float(interval)
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        self._dispatcher: EventDispatcher | None = None
        self._failing = False

    def start(self) -> None:
        """Send ``worker-online``, then a heartbeat every ``interval`` (returns at once)."""
        if self._thread is not None:
            raise RuntimeError("WorkerHeartbeat already started")
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.node.hostname}", daemon=True)
        self._thread.start()

    def beat(self, **_: Any) -> dict[str, Any]:
        """Ask for a heartbeat now (Celery's ``heartbeat`` control command; pass it to RemoteControl's extra)."""
        self._wake.set()
        return {"ok": "heartbeat requested"}

    def stop(self, timeout: float = 3.0) -> None:
        """Send ``worker-offline`` (best effort) and stop; returns within ``timeout`` even with Redis gone."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            log.warning("heartbeat: thread still busy after %.1fs; left behind as a daemon", timeout)

    def _run(self) -> None:
        # Every event is sent from this thread: a kombu channel must not be shared between threads.
        self._send("worker-online")
        while not self._stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            self._send("worker-heartbeat")
        self._send("worker-offline")
        self._close()

    def _send(self, event_type: str) -> None:
        try:
            if self._dispatcher is None:
                self._conn = _connect(self.app)
                self._dispatcher = EventDispatcher(self._conn, hostname=self.node.hostname, app=self.app,
                                                   serializer=EVENT_SERIALIZER, buffer_while_offline=False)
            self._dispatcher.send(event_type, freq=self.interval, active=len(self.node.active()),
                                  processed=sum(self.node.processed().values()), loadavg=load_average(),
                                  retry=False, **SOFTWARE_INFO)
        except Exception as exc:  # Redis gone: the next beat reconnects
            # One warning per outage, not one per beat.
            (log.debug if self._failing else log.warning)("heartbeat: could not send %s: %r", event_type, exc)
            self._failing = True
            self._close()
        else:
            if self._failing:
                log.info("heartbeat: sending again")
            self._failing = False

    def _close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
        _close_quietly(self._conn)
        self._dispatcher, self._conn = None, None


class TaskEvents:
    """Task events of one consumer child, buffered and published per batch.

    Create it in the child (after the fork): the dispatcher records its process id, which Flower shows as the
    task's pid. Safe to call from several threads of that process.

    Args:
        app: The Celery app (broker URL, event exchange, clock).
        hostname: The Celery node name the events come from (the supervisor's, so that Flower puts the task
            on that worker).
    """

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._lock = threading.Lock()
        self._pending = 0
        self._conn, self._dispatcher = self._new_dispatcher()

    def _new_dispatcher(self) -> tuple[Connection, EventDispatcher]:
        # The connection is lazy: events buffer without Redis, and flush() connects (one attempt) before it
        # publishes, so that kombu's retry loop never runs inside a job's hook.
        conn = self.app.connection_for_write()
        return conn, EventDispatcher(conn, hostname=self.hostname, app=self.app, serializer=EVENT_SERIALIZER,
                                     buffer_while_offline=False, buffer_group=["task"],
                                     # Never reached: TaskEvents flushes at TASK_BUFFER_LIMIT itself, after
                                     # connecting with one attempt (the dispatcher's own flush would not).
                                     buffer_limit=TASK_BUFFER_LIMIT + 1)

    def received(self, job_id: str, task_name: str, kwargsrepr: str = "", routing_key: str = "") -> None:
        """The job was taken from its queue (fields of Celery's ``task-received``)."""
        self._buffer("task-received", uuid=job_id, name=task_name, args="()", kwargs=kwargsrepr,
                     root_id=job_id, parent_id=None, retries=0, eta=None, expires=None, routing_key=routing_key)

    def started(self, job_id: str) -> None:
        """The job began to run (Celery's ``task-started``; the event's ``pid`` is this process)."""
        self._buffer("task-started", uuid=job_id)

    def succeeded(self, job_id: str, runtime_s: float, result_repr: str = "") -> None:
        """The job finished (Celery's ``task-succeeded``)."""
        self._buffer("task-succeeded", uuid=job_id, result=result_repr, runtime=runtime_s)

    def failed(self, job_id: str, runtime_s: float, exception: str) -> None:
        """The job failed (Celery's ``task-failed``); ``exception`` is its repr."""
        self._buffer("task-failed", uuid=job_id, exception=exception, traceback="", runtime=runtime_s)

    def _buffer(self, event_type: str, **fields: Any) -> None:
        with self._lock:
            try:
                if self._pending >= TASK_BUFFER_LIMIT:
                    self._flush_locked()  # a batch of extraordinary size: publish what came before
                self._dispatcher.send(event_type, **fields)
                self._pending += 1
            except Exception as exc:  # never fail the job for its events
                self._drop(exc)

    def flush(self) -> int:
        """Publish every buffered event as one ``task.multi`` message.

        Returns:
            How many events were published: 0 when none was buffered or Redis could not be reached (then the
            events are logged and dropped).
        """
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        if not self._pending:
            return 0  # EventDispatcher.flush would publish an empty list
        try:
            self._conn.ensure_connection(max_retries=0)
            self._dispatcher.flush(errors=False, groups=True)
        except Exception as exc:
            self._drop(exc)
            return 0
        sent, self._pending = self._pending, 0
        return sent

    def _drop(self, exc: Exception) -> None:
        log.warning("task events: dropped %d event(s) of %s: %r", self._pending, self.hostname, exc)
        self._pending = 0
        # A fresh dispatcher drops the buffer, and its fresh connection makes the next flush reconnect.
        self._dispatcher.close()
        _close_quietly(self._conn)
        self._conn, self._dispatcher = self._new_dispatcher()

    def close(self) -> None:
        """Flush what is buffered (best effort) and close the connection."""
        self.flush()
        with self._lock:
            self._dispatcher.close()
            _close_quietly(self._conn)

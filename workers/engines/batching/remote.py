"""Celery remote control for the batching engine, answered through kombu's pidbox.

The batching engine is not a Celery worker, but it must look like one from outside: ``celery inspect ping``,
``celery inspect stats``, ``celery control shutdown`` and Flower's inspector all talk to a node through kombu's
process mailbox (``<hostname>.celery.pidbox``). :class:`RemoteControl` listens on that mailbox with kombu's own
:class:`kombu.pidbox.Node`, from a daemon thread of the supervisor process, and answers with replies shaped as
Celery's worker shapes them (:mod:`celery.worker.control`), so that any Celery client configured with nothing
but the broker URL reads them.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from celery import Celery
from celery.utils.serialization import jsonify
from kombu import Connection, Producer
from kombu.pidbox import Node
from kombu.utils.encoding import safe_repr

from shared import tasks as names

log = logging.getLogger(__name__)

#: What ``stats`` reports as the pool implementation (Celery reports ``module:Class`` of its pool).
POOL_IMPLEMENTATION = "workers.engines.batching"
#: How long one ``drain_events`` waits: the control thread notices ``stop()`` within this.
DRAIN_TIMEOUT_S = 1.0
#: NOTE: no retry of a reply. kombu's ``ensure`` reconnects the connection it publishes on, which is the one the
#: node listens on; the drain loop reconnects anyway, and a lost reply reads as a timed-out inspect.
REPLY_RETRY_POLICY = {"max_retries": 0}
#: The serializer of replies: a plain Celery client accepts only json.
REPLY_SERIALIZER = "json"

Handler = Callable[..., Any]


class NodeInfo(Protocol):
    """What the supervisor knows of its node.

    Called from the control thread and the heartbeat thread (:mod:`workers.engines.batching.events`), so the
    methods must be safe to call from a thread other than the supervisor's main one.
    """

    hostname: str
    """The Celery node name, e.g. ``batching-simple-cpu-ab12cd@host``."""
    queues: list[str]
    """The queues the node consumes, e.g. ``["infer.simple.cpu"]``."""
    concurrency: int
    """The number of child processes."""

    def child_pids(self) -> list[int]:
        """The pids of the consumer children alive now."""
        ...

    def active(self) -> list[dict[str, Any]]:
        """Jobs in hand, each ``{"id", "name", "time_start" (unix s), "worker_pid"}``.

        A job may also carry ``"args"``, ``"kwargs"``, ``"argsrepr"``, ``"kwargsrepr"`` and ``"routing_key"``.
        """
        ...

    def processed(self) -> dict[str, int]:
        """Task name -> jobs finished since start (Celery's stats ``total``)."""
        ...


def ok(value: Any) -> dict[str, Any]:
    return {"ok": value}


def nok(value: Any) -> dict[str, Any]:
    return {"error": value}


def _json_safe(reply: Any) -> Any:
    """``reply`` with anything JSON cannot carry replaced by its repr (Celery's own ``jsonify``)."""
    return jsonify(reply, unknown_type_filter=safe_repr)


class ControlCommands:
    """The replies of the Celery control commands a batching node answers, shaped as a Celery worker's.

    Each method takes the command's arguments as keyword arguments and returns the reply (made JSON-safe by
    the caller). Commands that touch a Celery worker's internals (revoke, rate limits, pool resizing) are not
    here: a client asking for them gets an error reply.

    Args:
        app: The Celery app (its configuration, clock and queue declarations).
        node: What the supervisor knows of its node.
        on_shutdown: Called by ``shutdown``; it must return quickly (it runs on the control thread).
    """

    def __init__(self, app: Celery, node: NodeInfo, on_shutdown: Callable[[], None]) -> None:
        self.app = app
        self.node = node
        self.on_shutdown = on_shutdown
        self.started = time.monotonic()
        self.broker = self._broker_info(app)

    @staticmethod
    def _broker_info(app: Celery) -> dict[str, Any]:
        # Connection.info() only reads the URL and options: no round trip, so it is computed once.
        conn = app.connection_for_read()
        try:
            info = conn.info()
        finally:
            conn.close()
        info.pop("password", None)  # as Celery's worker does: never sent
        return info

    def handlers(self) -> dict[str, Handler]:
        """Command name -> method, the names Celery's clients send."""
        return {
            "ping": self.ping, "stats": self.stats, "active": self.active, "active_queues": self.active_queues,
            "registered": self.registered, "reserved": self.reserved, "scheduled": self.scheduled,
            "revoked": self.revoked, "query_task": self.query_task, "conf": self.conf, "report": self.report,
            "clock": self.clock, "hello": self.hello, "shutdown": self.shutdown, "heartbeat": self.heartbeat,
            "enable_events": self.enable_events, "disable_events": self.disable_events,
        }

    def ping(self, **_: Any) -> dict[str, Any]:
        return ok("pong")

    def stats(self, **_: Any) -> dict[str, Any]:
        """The keys of ``celery.worker.WorkController.stats``."""
        conf = self.app.conf
        return {
            "total": dict(self.node.processed()),
            "pid": os.getpid(),
            "clock": str(self.app.clock),
            "uptime": round(time.monotonic() - self.started),
            "pool": {
                "implementation": POOL_IMPLEMENTATION,
                "max-concurrency": self.node.concurrency,
                "processes": list(self.node.child_pids()),
                "max-tasks-per-child": "N/A",
                "put-guarded-by-semaphore": False,
                "timeouts": [conf.task_soft_time_limit or 0, conf.task_time_limit or 0],
                "writes": "N/A",
            },
            "broker": self.broker,
            # A child pops up to a batch per fetch; the supervisor may say how many it holds, else one per child.
            "prefetch_count": getattr(self.node, "prefetch_count", self.node.concurrency),
            "rusage": self._rusage(),
        }

    @staticmethod
    def _rusage() -> dict[str, Any]:
        s = resource.getrusage(resource.RUSAGE_SELF)
        fields = ("utime", "stime", "maxrss", "ixrss", "idrss", "isrss", "minflt", "majflt", "nswap", "inblock",
                  "oublock", "msgsnd", "msgrcv", "nsignals", "nvcsw", "nivcsw")
        return {name: getattr(s, f"ru_{name}") for name in fields}

    def active(self, safe: bool | None = False, **_: Any) -> list[dict[str, Any]]:
        """Jobs in hand, as ``celery.worker.request.Request.info`` describes a request."""
        return [self._request_info(job, bool(safe)) for job in self.node.active()]

    def _request_info(self, job: Mapping[str, Any], safe: bool) -> dict[str, Any]:
        args, kwargs = job.get("args", []), job.get("kwargs", {})
        routing_key = job.get("routing_key") or (self.node.queues[0] if self.node.queues else "")
        queue = self.app.amqp.queues.get(routing_key)
        return {
            "id": job["id"],
            "name": job["name"],
            # safe=True (Flower asks so): the reprs, never the arguments themselves.
            "args": job.get("argsrepr", safe_repr(args)) if safe else args,
            "kwargs": job.get("kwargsrepr", safe_repr(kwargs)) if safe else kwargs,
            "type": job["name"],
            "hostname": self.node.hostname,
            "time_start": job.get("time_start"),
            # Late acknowledgement, as the fleet's Celery workers: a job in hand is acked once it finished.
            "acknowledged": False,
            "delivery_info": {"exchange": queue.exchange.name if queue is not None and queue.exchange else "",
                              "routing_key": routing_key, "priority": job.get("priority"), "redelivered": False},
            "worker_pid": job.get("worker_pid"),
        }

    def active_queues(self, **_: Any) -> list[dict[str, Any]]:
        """The node's queues as declared on the app (``kombu.Queue.as_dict``), as Celery's worker lists them."""
        queues = self.app.amqp.queues
        return [dict((queues.get(name) or queues.new_missing(name)).as_dict(recurse=True))
                for name in self.node.queues]

    def registered(self, **_: Any) -> list[str]:
        return sorted(names.ALL)

    def reserved(self, **_: Any) -> list[Any]:
        return []  # messages a child popped are in hand at once: nothing waits in the node

    def scheduled(self, **_: Any) -> list[Any]:
        return []

    def revoked(self, **_: Any) -> list[Any]:
        return []  # cancellation goes through the job record, not Celery's revoke list

    def query_task(self, **_: Any) -> dict[str, Any]:
        return {}

    def conf(self, with_defaults: bool = False, **_: Any) -> dict[str, Any]:
        """The app's configuration, censored and made JSON-safe as Celery's ``conf`` command does."""
        return jsonify(self.app.conf.table(with_defaults=bool(with_defaults)),
                       keyfilter=lambda key: isinstance(key, str) and not key.startswith("__"),
                       unknown_type_filter=safe_repr)

    def report(self, **_: Any) -> dict[str, Any]:
        return ok(self.app.bugreport())

    def clock(self, **_: Any) -> dict[str, Any]:
        return {"clock": self.app.clock.value}

    def hello(self, from_node: str = "", **_: Any) -> dict[str, Any] | None:
        """Mingle: a Celery worker starting beside this node asks for revoked ids and the clock."""
        if from_node == self.node.hostname:
            return None
        return {"revoked": {}, "clock": self.app.clock.forward()}

    def shutdown(self, **_: Any) -> dict[str, Any]:
        self.on_shutdown()
        return ok("shutdown requested")

    def heartbeat(self, **_: Any) -> dict[str, Any]:
        # Pass WorkerHeartbeat.beat as extra["heartbeat"] to really send one.
        return ok("heartbeat requested")

    def enable_events(self, **_: Any) -> dict[str, Any]:
        # Flower casts this every few seconds: the engine always sends task events.
        return ok("task events already enabled")

    def disable_events(self, **_: Any) -> dict[str, Any]:
        return nok("task events cannot be disabled on a batching engine node")


class _Handlers(dict):
    """kombu's handler table; an unknown command answers an error instead of raising ``KeyError``."""

    def __missing__(self, method: str) -> Handler:
        def unknown(_state: Any, **_: Any) -> dict[str, Any]:
            log.warning("remote control: no such command %r", method)
            return nok(f"No such control command: {method}")

        return unknown


class _ReplyNode(Node):
    """kombu's pidbox node, replying on the node's own channel without kombu's unbounded retry.

    kombu replies through the app's producer pool with ``retry=True`` and no limit: with Redis gone the control
    thread would retry for ever and could not stop. The reply itself is still kombu's (``_publish_reply``).
    """

    def reply(self, data: Any, exchange: str, routing_key: str, ticket: str, **_: Any) -> None:
        self.mailbox._publish_reply(data, exchange, routing_key, ticket, channel=self.channel,
                                    producer=Producer(self.channel, auto_declare=False),
                                    serializer=REPLY_SERIALIZER, retry_policy=REPLY_RETRY_POLICY)


class _Backoff:
    """Exponential delays between reconnection attempts, reset once a connection works."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.cap, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class RemoteControl:
    """Answers Celery remote control for one batching-engine node through kombu's pidbox.

    Args:
        app: The Celery app; its ``control.mailbox`` names the exchange and queue, its broker URL the Redis.
        node: What the supervisor knows of its node.
        on_shutdown: Called (on the control thread) when a client sends ``shutdown``.
        extra: More commands, name -> ``fn(**arguments) -> reply``; they replace a built-in of the same name.
    """

    def __init__(self, app: Celery, node: NodeInfo, on_shutdown: Callable[[], None],
                 extra: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.app = app
        self.node = node
        commands = ControlCommands(app, node, on_shutdown)
        table = {**commands.handlers(), **(extra or {})}
        self.handlers = _Handlers({name: self._guarded(name, fn) for name, fn in table.items()})
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pidbox: Node | None = None

    @staticmethod
    def _guarded(name: str, fn: Callable[..., Any]) -> Handler:
        """``fn`` as a kombu handler ``(state, **arguments)``: never raises, always answers JSON."""

        def handler(_state: Any, **arguments: Any) -> Any:
            try:
                return _json_safe(fn(**arguments))
            except Exception as exc:  # a broken command must not take the node down
                log.exception("remote control: command %r failed", name)
                return nok(f"{type(exc).__name__}: {exc}")

        handler.__name__ = name
        return handler

    def start(self) -> None:
        """Listen on the node's mailbox from a daemon thread (returns at once)."""
        if self._thread is not None:
            raise RuntimeError("RemoteControl already started")
        self._thread = threading.Thread(target=self._run, name=f"remote-control-{self.node.hostname}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening; returns within ``timeout`` whatever state Redis is in (the thread is a daemon)."""
        self._stopping.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return  # stop() from a handler (on_shutdown): the loop ends after this message
        thread.join(timeout)
        if thread.is_alive():
            log.warning("remote control: thread still busy after %.1fs; left behind as a daemon", timeout)

    def _run(self) -> None:
        backoff = _Backoff()
        while not self._stopping.is_set():
            try:
                self._serve(on_listening=backoff.reset)
            except Exception as exc:  # Redis gone, or anything else: the node must come back with Redis
                delay = backoff.next()
                log.warning("remote control of %s: %r; reconnecting in %.1fs", self.node.hostname, exc, delay)
                self._stopping.wait(delay)

    def _serve(self, on_listening: Callable[[], None]) -> None:
        """One connection's life: listen on the mailbox and drain it until stopped or the connection fails."""
        conn: Connection = self.app.connection_for_read()
        try:
            # One attempt: kombu's own retry loop sleeps without looking at stop(); this thread's loop retries.
            conn.ensure_connection(max_retries=0)
            channel = conn.channel()
            mailbox = self.app.control.mailbox(conn)
            self._pidbox = _ReplyNode(self.node.hostname, channel=channel, handlers=self.handlers, mailbox=mailbox)
            consumer = self._pidbox.listen(callback=self._on_message)
            log.info("remote control of %s: listening on %s", self.node.hostname, conn.as_uri())
            on_listening()
            while not self._stopping.is_set():
                try:
                    conn.drain_events(timeout=DRAIN_TIMEOUT_S)
                except socket.timeout:
                    pass
            self._quietly(consumer.cancel)
            self._quietly(channel.close)
        finally:
            self._quietly(conn.close)

    def _on_message(self, body: Any, message: Any) -> None:
        # As Celery's worker: clients seldom carry a useful clock, so the node's clock moves on each message.
        self.app.clock.forward()
        try:
            if self._pidbox is not None:
                self._pidbox.handle_message(body, message)
        except Exception:  # e.g. the reply could not be published: the drain loop finds out if Redis is gone
            log.warning("remote control: could not answer %r", body.get("method") if isinstance(body, dict)
                        else body, exc_info=True)

    @staticmethod
    def _quietly(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # closing a connection to a Redis that went away
            log.debug("remote control: ignored %r while closing", exc)

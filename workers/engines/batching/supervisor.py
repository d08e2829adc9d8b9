"""The batching engine's supervisor: forks the consumer processes and keeps the pool whole.

It is the node Celery clients see: it answers remote control through kombu's pidbox and sends worker
heartbeats (:mod:`workers.engines.batching.remote`, :mod:`workers.engines.batching.events`); each consumer
sends its own task events. It never imports torch (children are forked before any of them do).

What it guarantees:

* a consumer that dies (OOM kill, segfault) is replaced at once, and what it held and what waited in its own
  queue go back to the head of its pool's queue at once, not after the visibility timeout (the executor's
  delivery limit stops a job that kills every process it runs in);
* a job past its hard time limit (``JOB_TIME_LIMIT_SECONDS``; the soft limit interrupts it inside the consumer
  first) gets its consumer killed and replaced, and ends as a typed ``JobTimeoutError``, never run again;
* SIGTERM (or ``celery control shutdown``) stops it within ``WORKER_SHUTDOWN_GRACE_SECONDS`` whatever state
  Redis is in: consumers finish the batch in hand, what is left is killed and given back; a second SIGTERM
  kills at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from shared import tasks as names
from shared.routing import queue_name
from shared.settings import FleetSettings

log = logging.getLogger(__name__)
#: How often the supervisor looks at its consumers.
TICK_S = 0.2


class Slot:
    """What one consumer shares with the supervisor: since when it holds a batch (0: idle), jobs done."""

    def __init__(self, ctx: Any) -> None:
        self._busy = ctx.RawValue("d", 0.0)
        self._done = ctx.RawValue("q", 0)
        self.process: Any = None

    def busy(self, since: float) -> None:
        self._busy.value = since

    def done(self, n: int) -> None:
        self._done.value += n

    @property
    def busy_since(self) -> float:
        return self._busy.value

    @property
    def jobs_done(self) -> int:
        return self._done.value


def consume(slot: Slot, adapter: str, device: str) -> None:
    """A consumer process: set up after the fork, consume until SIGTERM/SIGINT."""
    # NOTE: first of all: the handlers inherited from the supervisor would swallow a SIGTERM that lands while
    # this process sets up (it imports torch, builds its adapters) and it would never stop.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from shared.celery_app import app
    from workers import process
    from workers.engines.batching.consumer import Consumer
    from workers.engines.batching.events import TaskEvents

    queue = queue_name(adapter, device)
    context = process.init_process(queues=[queue], arm_soft_limit=True, routed=True)
    events = TaskEvents(app, process.node["hostname"])
    consumer = Consumer(context, queue, events, slot, stop=stop)
    try:
        consumer.run()
    finally:
        events.close()
        process.shutdown_process()


class Supervisor:
    """Runs ``processes`` consumers of one pool and the node's remote control (a ``NodeInfo``)."""

    def __init__(self, settings: FleetSettings, adapter: str, device: str, processes: int, hostname: str) -> None:
        from shared.keys import Keys
        from shared.routing import JobRouter
        from workers import process
        from workers.engines.batching.redelivery import Redelivery
        from workers.executor.outcomes import outcome_writer
        from workers.executor.policies import TimeLimit

        self.settings = settings
        self.adapter, self.device = adapter, device
        self.hostname = hostname
        self.queues = [queue_name(adapter, device)]
        self.concurrency = processes
        self.keys = Keys(settings.redis_key_prefix)
        # NOTE: short timeouts: the supervisor must keep supervising (and stop on time) while Redis is away.
        from shared import redis_options

        self.redis = redis_options.client(settings, socket_connect_timeout=2, socket_timeout=5)
        self.redelivery = Redelivery(self.redis, self.keys)
        self.router = JobRouter(self.keys, settings)
        self.outcomes = outcome_writer(self.redis, settings)
        self.time_limit = TimeLimit(settings.job_time_limit_seconds, arm_soft=False)
        self._ctx = multiprocessing.get_context("fork")
        self.slots = [Slot(self._ctx) for _ in range(processes)]
        self._stop = threading.Event()
        self._kill_now = threading.Event()
        self.started_at = time.time()
        process.node.update(hostname=hostname, processes=processes, queues=self.queues)

    # -- NodeInfo (remote control, heartbeats) -----------------------------------------------------------------
    def child_pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None and s.process.pid]

    def _worker_id(self, pid: int) -> str:
        return f"{self.hostname}|{pid}"

    def active(self) -> list[dict[str, Any]]:
        jobs = []
        for slot in self.slots:
            if slot.process is None or not slot.busy_since:
                continue
            for job_id, task in self.redelivery.held(self._worker_id(slot.process.pid)).values():
                jobs.append({"id": job_id, "name": task, "time_start": slot.busy_since, "worker_pid": slot.process.pid})
        return jobs

    def processed(self) -> dict[str, int]:
        return {"fleet.jobs": sum(s.jobs_done for s in self.slots)}

    # -- supervision -----------------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, _: Any) -> None:
        if self._stop.is_set():
            self._kill_now.set()  # a second signal: stop now
        log.info("signal %d: stopping (a second one kills the consumers at once)", signum)
        self._stop.set()

    def _start(self, slot: Slot) -> None:
        slot.busy(0.0)
        slot.process = self._ctx.Process(target=consume, args=(slot, self.adapter, self.device),
                                         name=f"consumer-{self.slots.index(slot)}", daemon=False)
        slot.process.start()

    def _fail_held(self, worker_id: str) -> None:
        """End what a consumer killed past the hard limit held with ``JobTimeoutError`` (never run again)."""
        from workers.engines.batching.redelivery import ack
        from workers.executor.outcomes import FinishedJob

        held = self.redelivery.held(worker_id)
        key = self.keys.worker_deliveries(worker_id)
        self.outcomes.finish([FinishedJob(job_id, None, self.time_limit.error(job_id)) for job_id, _ in held.values()],
                             also=lambda pipe: ack(pipe, key, list(held)))

    def _retire(self, pid: int, timed_out: bool, exitcode: int | None = None) -> None:
        """After a consumer died: end or give back what it held (noting why on each job: a job that keeps killing
        its process ends as a ``PoisonJobError`` that says so), take it off the live set."""
        from workers.executor.deadletters import record_failed_run

        worker_id = self._worker_id(pid)
        try:
            # First out of routing (nothing more is sent to its own queue), what waited there back to the pool.
            self.router.retire(self.redis, worker_id, self.queues[0])
            if timed_out:
                self._fail_held(worker_id)
            else:
                cause = describe_exit(exitcode, worker_id)
                job_ids = [job_id for job_id, _ in self.redelivery.held(worker_id).values() if job_id]
                if job_ids:
                    pipe = self.redis.pipeline(transaction=False)
                    record_failed_run(pipe, self.keys, job_ids, cause)
                    pipe.execute()
                self.redelivery.give_back_held(worker_id)
            self.redis.zrem(self.keys.workers(), worker_id)
        except Exception as exc:  # Redis away: the visibility sweep gives the messages back later
            log.error("could not hand back what consumer %s held: %s", worker_id, exc)

    def _check(self, slot: Slot) -> None:
        proc = slot.process
        hard = self.settings.job_time_limit_seconds
        timed_out = bool(slot.busy_since) and time.time() - slot.busy_since > hard
        if proc.is_alive() and not timed_out:
            return
        if timed_out and proc.is_alive():
            log.error("consumer %s ran a batch past the hard time limit of %s s: killed", proc.pid, hard)
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        log.warning("consumer %s exited (%s); replacing it", proc.pid, proc.exitcode)
        self._retire(proc.pid, timed_out, proc.exitcode)
        if not self._stop.is_set():
            self._start(slot)

    def run(self) -> None:
        from shared.celery_app import app
        from workers.engines.batching.events import WorkerHeartbeat
        from workers.engines.batching.remote import RemoteControl
        from workers.engines.celery.control import health, list_models

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for slot in self.slots:
            self._start(slot)
        remote = RemoteControl(app, self, on_shutdown=self.request_stop, extra={
            names.CONTROL_LIST_MODELS: lambda **_: list_models(self.hostname),
            names.CONTROL_HEALTH: lambda **_: health(self.hostname)})
        beat = WorkerHeartbeat(app, self)
        remote.start()
        beat.start()
        log.info("batching engine %s: %d consumer(s) on %s", self.hostname, self.concurrency, self.queues[0])
        try:
            while not self._stop.wait(TICK_S):
                for slot in self.slots:
                    self._check(slot)
        finally:
            self._shutdown()
            remote.stop()
            beat.stop()

    def _shutdown(self) -> None:
        alive = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for proc in alive:
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.worker_shutdown_grace_seconds
        while any(p.is_alive() for p in alive) and time.monotonic() < deadline and not self._kill_now.is_set():
            self._kill_now.wait(TICK_S)
        for proc in alive:
            if proc.is_alive():
                log.warning("consumer %s did not stop within the grace period: killed", proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)
            if proc.exitcode != 0:
                self._retire(proc.pid, timed_out=False)


def describe_exit(exitcode: int | None, worker_id: str) -> str:
    """What ended a consumer, for its jobs' records: ``killed by signal 9 (SIGKILL) in <worker>``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-exitcode} ({name}) in {worker_id}"
    return f"exited with code {exitcode} in {worker_id}"


def run(adapter: str, device: str, processes: int, loglevel: str, name: str | None = None) -> None:
    """``fleet worker`` with the batching engine: supervise ``processes`` consumers until stopped."""
    import uuid

    from shared.settings import get_settings

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(processName)s %(message)s")
    node = (name or f"{adapter}-{device}-{uuid.uuid4().hex[:6]}@%h").replace("%h", os.uname().nodename)
    Supervisor(get_settings(), adapter, device, processes, node).run()

"""The direct consumer: a worker engine that reads a pool's queue from Redis in batches, without Celery's
per-message dispatch.

Why: on CPU the fleet's cost per job is not the forward but what surrounds it. Celery's worker fetches one
message per round trip, dispatches it through its pool, acks it in another round trip, and so pays a fixed
cost per job that no batching inside the task can remove (see README "Batching" and ``bench/results``). This
engine keeps Celery's wire contract — producers still ``send_task('fleet.predict', kwargs={'job': ...})`` on
``infer.<adapter>.<device>``, results land in Celery's result backend, any Celery client reads them — and
changes only how messages are taken:

* one Lua call (:mod:`workers.fetch`) pops up to ``max_batch_size`` messages (highest priority list first),
  records them as unacknowledged in kombu's own ``unacked`` hash and ``unacked_index`` set, so a worker that
  dies loses nothing (its messages are restored after the visibility timeout, by this engine's sweep or any
  Celery worker's), and marks the predict jobs among them running;
* the batch runs through :meth:`WorkerRuntime.serve` (one forward per model);
* results, job records, events, stats **and the acks** go in one MULTI.

It serves all four public tasks; it emits no Celery task events (Flower does not list its jobs) and answers no
remote-control commands: run Celery workers (``fleet worker``) where those matter.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from shared import routing
from shared.celery_wire import message_ids, read_message
from shared import tasks as names
from shared.errors import FleetError, InvalidInputError, JobCancelledError, as_fleet_error
from shared.schemas import BatchPredictJob, LoadJob, PredictJob, UnloadJob
from workers.fetch import UNACKED, UNACKED_INDEX, UNACKED_MUTEX, BatchFetcher
from workers.payloads import parse_job
from workers.results import Begun, FinishedJob
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

@dataclass
class Delivery:
    tag: str
    job_id: str
    task: str
    job: Any
    cancelled: bool | None = None
    """For predict jobs, marked running by the fetch: whether the job had been cancelled."""


@dataclass
class Refused:
    """A message that could not be read (pickle, say): acknowledged, and its job failed when its id is known."""

    tag: str
    job_id: str | None
    error: FleetError


def decode(raw: bytes, cancelled: bool | None = None) -> Delivery:
    """A kombu message (Celery protocol 2) -> the task name, id and the ``job`` keyword argument."""
    msg = read_message(raw)
    return Delivery(msg.tag, msg.task_id, msg.task, msg.kwargs.get("job"), cancelled)


class DirectConsumer:
    """Consumes one pool queue in batches until stopped (SIGTERM/SIGINT finish the batch in hand)."""

    def __init__(self, runtime: WorkerRuntime, queue: str, max_batch_size: int, visibility_timeout: float) -> None:
        self.runtime = runtime
        self.redis = runtime.redis
        self.lists = routing.redis_list_keys(queue)
        self.max_batch_size = max_batch_size
        self.visibility_timeout = visibility_timeout
        self.fetcher = BatchFetcher(self.redis, self.lists, runtime.keys, runtime.worker_id,
                                    runtime.settings.result_ttl_seconds, max_batch_size)
        self._stop = threading.Event()
        self._next_sweep = 0.0

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)

    def fetch(self, block_s: float = 1.0) -> tuple[list[Delivery | Refused], float]:
        """The next batch, decoded, and when it was taken (predict jobs are marked running as of then)."""
        batch = self.fetcher.fetch(block_s)
        out: list[Delivery | Refused] = []
        for raw, cancelled in zip(batch.raws, batch.cancelled):
            try:
                out.append(decode(raw, cancelled))
            except Exception as exc:  # an undecodable message is acked and failed, never retried forever
                tag, job_id = message_ids(raw)
                log.error("refused message %s (job %s): %s", tag, job_id, exc)
                out.append(Refused(tag, job_id, as_fleet_error(exc)))
        return out, batch.started_at

    def _ack(self, tags: list[str]):
        def add(pipe: Any) -> None:
            if tags:
                pipe.zrem(UNACKED_INDEX, *tags)
                pipe.hdel(UNACKED, *tags)
        return add

    def handle(self, batch: list[Delivery | Refused], started_at: float | None = None) -> None:
        predicts: list[tuple[str, PredictJob]] = []
        pred_tags: list[str] = []
        pred_cancelled: list[bool | None] = []
        others: list[Delivery] = []
        failed: list[FinishedJob] = []  # refused messages and predict payloads that do not fit the schema
        failed_tags: list[str] = []
        for item in batch:
            if isinstance(item, Refused):
                failed_tags.append(item.tag)
                if item.job_id:
                    failed.append(FinishedJob(item.job_id, None, item.error))
            elif item.task != names.PREDICT:
                others.append(item)
            else:
                try:
                    predicts.append((item.job_id, parse_job(PredictJob, item.job)))
                    pred_tags.append(item.tag)
                    pred_cancelled.append(item.cancelled)
                except FleetError as err:
                    failed.append(FinishedJob(item.job_id, None, err))
                    failed_tags.append(item.tag)
        if failed_tags:
            self.runtime.outcomes.finish(failed, {}, self._ack(failed_tags))
        if predicts:
            begun = None
            if started_at is not None and None not in pred_cancelled:  # the fetch marked them running already
                begun = Begun(started_at, [bool(c) for c in pred_cancelled])
            self.runtime.serve(predicts, also=self._ack(pred_tags), begun=begun)
        for item in others:  # loads, unloads and batch jobs: rare and long, one at a time
            self._run_other(item)

    def _run_other(self, item: Delivery) -> None:
        runtime = self.runtime
        started = time.time()
        (cancelled,) = runtime.outcomes.begin([item.job_id], runtime.worker_id, started)
        try:
            if cancelled:  # as the Celery tasks do: a job cancelled while queued never runs
                outcome: Any = JobCancelledError(f"job {item.job_id} was cancelled before it started")
            elif item.task == names.LOAD:
                outcome = runtime.load(parse_job(LoadJob, item.job))[0]
            elif item.task == names.UNLOAD:
                outcome = runtime.unload(parse_job(UnloadJob, item.job))
            elif item.task == names.BATCH_PREDICT:
                def progress(done: int, total: int) -> None:
                    runtime.jobs.progress(item.job_id, done, total)
                outcome = runtime.batch_predict(parse_job(BatchPredictJob, item.job), progress=progress,
                                                cancelled=lambda: runtime.jobs.is_cancelled(item.job_id))[0]
            else:
                outcome = InvalidInputError(f"unknown task {item.task!r}")
        except Exception as exc:
            outcome = as_fleet_error(exc)
        runtime.outcomes.finish([FinishedJob(item.job_id, None, outcome)], {}, self._ack([item.tag]))

    def sweep(self) -> int:
        """Give messages of dead workers (unacked past the visibility timeout) back to their queues."""
        lock = str(uuid.uuid4())
        if not self.redis.set(UNACKED_MUTEX, lock, nx=True, ex=300):
            return 0  # another consumer (or a Celery worker) is sweeping
        restored = 0
        try:
            ceiling = time.time() - self.visibility_timeout
            for tag in self.redis.zrangebyscore(UNACKED_INDEX, "-inf", ceiling):
                raw = self.redis.hget(UNACKED, tag)
                pipe = self.redis.pipeline(transaction=True)
                pipe.zrem(UNACKED_INDEX, tag).hdel(UNACKED, tag)
                if raw:
                    payload, _exchange, routing_key = json.loads(raw)
                    payload.setdefault("headers", {})["redelivered"] = True
                    pipe.rpush(routing.priority_list(routing_key, payload.get("properties", {}).get("priority") or 0),
                               json.dumps(payload))
                    restored += 1
                pipe.execute()
        finally:
            if self.redis.get(UNACKED_MUTEX) == lock.encode():
                self.redis.delete(UNACKED_MUTEX)
        if restored:
            log.warning("restored %d unacknowledged message(s) of dead workers", restored)
        return restored

    def run(self) -> None:
        log.info("direct consumer on %s, batches of up to %d", self.lists[0], self.max_batch_size)
        while not self._stop.is_set():
            if time.monotonic() >= self._next_sweep:
                self.sweep()
                self._next_sweep = time.monotonic() + max(1.0, self.visibility_timeout / 4)
            try:
                batch, started_at = self.fetch()
            except Exception:
                log.exception("fetching from Redis failed; retrying")
                self._stop.wait(1.0)
                continue
            if batch:
                try:
                    self.handle(batch, started_at)
                except Exception:  # the batch stays unacked and comes back after the visibility timeout
                    log.exception("a batch of %d failed outside the jobs", len(batch))

